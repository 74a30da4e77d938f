"""The in-memory run queue: round-robin across users, first-in-first-out within one user."""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Iterator

from bot.jobs import Job


class FairQueue:
    """Users take turns, so one user's batch of ten never starves another's single job.

    Pop order: the first user in the rotation whose oldest job can start gives it up and moves
    to the back; users passed over keep their places; a user who arrives later joins the back
    of the rotation. The durable copy of the queue
    is the `jobs` table; this is rebuilt from it on start.

    Positions in O(log users): a job at depth d in its user's line starts after every job at a
    smaller depth (Σ_{k<d} users with more than k jobs) and after the depth-d jobs of the users
    ahead of its own in the rotation. Each user carries a stamp that orders the rotation (moved
    to the back, a user gets a new, larger one); `_levels[k]` keeps the sorted stamps of users
    with more than k jobs, so both counts are a len() and a bisect.
    """

    def __init__(self) -> None:
        self._by_user: dict[str, deque[Job]] = {}
        self._rotation: deque[str] = deque()
        self._owner: dict[str, str] = {}
        self._stamp: dict[str, int] = {}
        self._levels: list[list[int]] = []
        self._back = 0
        self._front = 0

    def __len__(self) -> int:
        return len(self._owner)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._owner

    def __iter__(self) -> Iterator[Job]:
        for jobs in self._by_user.values():
            yield from jobs

    def push(self, job: Job, *, front: bool = False) -> None:
        """Add a job; `front` puts it first in its user's line (a resumed, already-paid task)."""
        key = job.quota_key  # one turn for a linked account, whichever platform it asks on
        jobs = self._by_user.get(key)
        if jobs is None:
            jobs = self._by_user[key] = deque()
            if front:
                self._rotation.appendleft(key)
                self._front -= 1
                self._stamp[key] = self._front
            else:
                self._rotation.append(key)
                self._stamp[key] = self._back
                self._back += 1
        else:
            key = self._owner[jobs[0].id]  # one key string per user, not one per job
        if front:
            jobs.appendleft(job)
        else:
            jobs.append(job)
        self._owner[job.id] = key
        self._join(key, len(jobs) - 1, len(jobs))

    def pop(self, ready: Callable[[Job], bool] | None = None) -> Job | None:
        """The next job in turn whose `ready(job)` holds (say, its provider has a free slot).

        A user passed over (their next job waits for a busy provider) keeps their place: they
        go first once it is free, rather than to the back behind the batch of a user whose
        provider had room.
        """
        for i, key in enumerate(self._rotation):
            jobs = self._by_user[key]
            if ready is not None and not ready(jobs[0]):
                continue
            n = len(jobs)
            job = jobs.popleft()
            del self._owner[job.id]
            self._to_back(key, n, n - 1)
            if i == 0:
                self._rotation.popleft()
            else:
                del self._rotation[i]
            if jobs:
                self._rotation.append(key)
            else:
                del self._by_user[key]
            return job
        return None

    def remove(self, job_id: str) -> Job | None:
        key = self._owner.pop(job_id, None)
        if key is None:
            return None
        jobs = self._by_user[key]
        self._leave(key, len(jobs) - 1, len(jobs))
        for job in jobs:
            if job.id == job_id:
                jobs.remove(job)
                break
        else:  # pragma: no cover - _owner and _by_user are kept together
            raise AssertionError(job_id)
        if not jobs:
            del self._by_user[key]
            self._rotation.remove(key)
            del self._stamp[key]
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
        earlier = sum(len(self._levels[k]) for k in range(depth))
        return earlier + bisect.bisect_left(self._levels[depth], self._stamp[key]) + 1

    # ---- the position index ----------------------------------------------------------------

    def _join(self, key: str, first: int, upto: int) -> None:
        stamp = self._stamp[key]
        for k in range(first, upto):
            if k == len(self._levels):
                self._levels.append([])
            bisect.insort(self._levels[k], stamp)

    def _leave(self, key: str, first: int, upto: int) -> None:
        stamp = self._stamp[key]
        for k in range(first, upto):
            level = self._levels[k]
            del level[bisect.bisect_left(level, stamp)]

    def _to_back(self, key: str, before: int, after: int) -> None:
        """The user at the front moves to the back, its line going from `before` to `after`."""
        self._leave(key, 0, before)
        if after:
            self._stamp[key] = self._back
            self._back += 1
            self._join(key, 0, after)
        else:
            del self._stamp[key]
