"""The fair queue: round-robin order, and positions that match a plain loop over every user."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterator

import pytest

from bot.fairqueue import FairQueue
from bot.jobs import Job, JobStatus, Options, Target, UserRef


def job(job_id: str, user: str) -> Job:
    return Job(
        id=job_id, user=UserRef("t", user), target=Target("t", chat_id=user), prompt="p",
        model="demo", provider="demo", options=Options(), status=JobStatus.QUEUED, lang="en",
        day="d", created_at=0.0,
    )  # fmt: skip


def test_round_robin_and_positions() -> None:
    q = FairQueue()
    for i in range(3):
        q.push(job(f"a{i}", "alice"))
    q.push(job("b0", "bob"))
    assert [q.position(j) for j in ("a0", "b0", "a1", "a2")] == [1, 2, 3, 4]
    q.push(job("r0", "bob"), front=True)  # a resumed, already-paid task goes first in its line
    assert q.position("r0") == 2 and q.position("b0") == 4
    assert [q.pop().id for _ in range(5)] == ["a0", "r0", "a1", "b0", "a2"]  # type: ignore[union-attr]
    assert len(q) == 0 and q.pop() is None and q.position("a0") == 0


@pytest.mark.parametrize("seed", range(6))
def test_positions_and_order_match_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    plain, indexed = ReferenceQueue(), FairQueue()
    for i in range(2500):
        roll = rng.random()
        if roll < 0.55:
            j = job(f"j{i}", f"u{rng.randrange(30)}")
            front = rng.random() < 0.05
            plain.push(j, front=front)
            indexed.push(j, front=front)
        elif roll < 0.85:
            busy = f"u{rng.randrange(30)}"

            def ready(j: Job, busy: str = busy) -> bool:
                return j.user.user_id != busy

            a, b = plain.pop(ready), indexed.pop(ready)
            assert (a and a.id) == (b and b.id)
        elif len(plain):
            victim = rng.choice([j.id for j in plain])
            assert plain.remove(victim) == indexed.remove(victim)
        if i % 25 == 0:
            assert [plain.position(j.id) for j in plain] == [indexed.position(j.id) for j in plain]


class ReferenceQueue:
    """The first FairQueue: positions by a loop over every user. The spec the index must meet.

    Pop order: the first user in the rotation whose oldest job can start gives it up and moves
    to the back; users passed over keep their places; a user who arrives later joins the back
    of the rotation. The durable copy of the queue
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
        for key in list(self._rotation):
            jobs = self._by_user[key]
            if ready is None or ready(jobs[0]):
                job = jobs.popleft()
                del self._owner[job.id]
                self._rotation.remove(key)  # passed-over users keep their places
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
