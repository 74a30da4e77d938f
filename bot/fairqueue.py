"""The in-memory run queue: round-robin across users, first-in-first-out within one user."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

from bot.jobs import Job


class FairQueue:
    """Users take turns, so one user's batch of ten never starves another's single job.

    Pop order: the user at the head of the rotation gives up their oldest job and moves to the
    back; a user who arrives later joins the back of the rotation. The durable copy of the queue
    is the `jobs` table; this is rebuilt from it on start.
    """

    def __init__(self) -> None:
        self._by_user: dict[str, deque[Job]] = {}
        self._rotation: deque[str] = deque()
        self._owner: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._owner)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._owner

    def __iter__(self) -> Iterator[Job]:
        for jobs in self._by_user.values():
            yield from jobs

    def push(self, job: Job, *, front: bool = False) -> None:
        """Add a job; `front` puts it first in its user's line (a resumed, already-paid task)."""
        key = str(job.user)
        jobs = self._by_user.get(key)
        if jobs is None:
            jobs = self._by_user[key] = deque()
            if front:
                self._rotation.appendleft(key)
            else:
                self._rotation.append(key)
        if front:
            jobs.appendleft(job)
        else:
            jobs.append(job)
        self._owner[job.id] = key

    def pop(self, ready: Callable[[Job], bool] | None = None) -> Job | None:
        """The next job in turn whose `ready(job)` holds (say, its provider has a free slot)."""
        for _ in range(len(self._rotation)):
            key = self._rotation[0]
            jobs = self._by_user[key]
            if ready is None or ready(jobs[0]):
                job = jobs.popleft()
                del self._owner[job.id]
                if jobs:
                    self._rotation.rotate(-1)
                else:
                    self._rotation.popleft()
                    del self._by_user[key]
                return job
            self._rotation.rotate(-1)
        return None

    def remove(self, job_id: str) -> Job | None:
        key = self._owner.pop(job_id, None)
        if key is None:
            return None
        jobs = self._by_user[key]
        for job in jobs:
            if job.id == job_id:
                jobs.remove(job)
                break
        else:  # pragma: no cover - _owner and _by_user are kept together
            raise AssertionError(job_id)
        if not jobs:
            del self._by_user[key]
            self._rotation.remove(key)
        return job

    def position(self, job_id: str) -> int:
        """1-based place in the order jobs will start (0 when not queued)."""
        key = self._owner.get(job_id)
        if key is None:
            return 0
        mine = self._by_user[key]
        if mine[-1].id == job_id:  # the common case: a job just pushed is last in its line
            depth = len(mine) - 1
        else:
            depth = next(i for i, job in enumerate(mine) if job.id == job_id)
        if depth == 0:
            # Each user ahead in the rotation starts one job first; nobody behind does.
            return self._rotation.index(key) + 1
        ahead = 0
        before = True
        for other in self._rotation:
            if other == key:
                ahead += depth
                before = False
                continue
            # Users ahead of ours in the rotation get depth + 1 turns before this job; later ones, depth.
            ahead += min(len(self._by_user[other]), depth + 1 if before else depth)
        return ahead + 1
