"""Engine benchmarks: throughput on a zero-latency model, and makespan efficiency at 1 s latency.

    .venv/bin/python -m bench.engine              # both, default sizes
    .venv/bin/python -m bench.engine --jobs 10000 --users 100
    .venv/bin/python -m bench.engine --efficiency-jobs 500 --latency 1 --concurrency 50

Both run the real engine on a real, durable SQLite store in a temp dir (WAL, every job a row
before it is queued, images written to disk) with the offline demo provider and a null adapter
that records deliveries. Throughput counts submit → generate → store → settle → deliver.
The engine serves with the collector settled as `drawbridge run` settles it
(`bot.runtime.settled_gc`: start-up's objects frozen, a young generation of 50,000).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from collections.abc import Sequence
from pathlib import Path

from bench.datadir import bench_root, create_cost, memory_root, scratch_dir
from bot import runtime
from bot.adapter import StatusUpdate
from bot.catalog import Catalog
from bot.engine import Engine, EngineConfig
from bot.errors import QueueFull
from bot.jobs import GeneratedImage, Job, Options, Request, StoredImage, Target, UserRef
from bot.providers.base import GenerationRequest, JobHooks
from bot.providers.demo import DemoProvider
from bot.quota import Limits
from bot.runtime import settled_gc
from bot.store import Store


class PrerenderedDemo(DemoProvider):
    """The demo model with its Pillow work done once per shape: a provider that takes no time.

    Used for the engine-throughput figure, so it measures the engine (queue, SQLite, files,
    delivery) rather than PNG encoding; the full demo model is measured beside it.
    """

    def __init__(self) -> None:
        super().__init__(latency=0.0)
        self._cache: dict[tuple[str | None, str | None, int], list[GeneratedImage]] = {}

    async def generate(self, request: GenerationRequest, hooks: JobHooks) -> list[GeneratedImage]:
        key = (request.aspect_ratio, request.size, request.n)
        if key not in self._cache:
            self._cache[key] = await super().generate(request, hooks)
        return self._cache[key]


class NullAdapter:
    """Takes deliveries and status updates and does nothing with them but count."""

    platform = "bench"

    def __init__(self, expected: int) -> None:
        self.delivered = 0
        self.statuses = 0
        self.expected = expected
        self.done = asyncio.Event()
        self.last_delivery = 0.0

    async def deliver(self, job: Job, images: Sequence[StoredImage]) -> str:
        self.delivered += 1
        self.last_delivery = time.perf_counter()
        if self.delivered >= self.expected:
            self.done.set()
        return f"bench:{job.id}"

    async def status(self, job: Job, update: StatusUpdate) -> None:
        self.statuses += 1

    async def notify(self, target: Target, text: str) -> None:
        return None


async def run(
    jobs: int,
    users: int,
    latency: float,
    concurrency: int,
    size: str,
    *,
    prerendered: bool = False,
    burst: int = 200,
    root: Path | None = None,
) -> dict[str, float]:
    # The data dir sits where a real one would (the working directory's file system) unless
    # DRAWBRIDGE_BENCH_DIR or `root` moves it (bench.datadir).
    with scratch_dir(root) as tmp:
        store = await Store.open(Path(tmp))
        config = EngineConfig(
            concurrency=concurrency,
            queue_max=jobs,
            max_pending_per_user=jobs,
            limits=Limits(user_images=0, user_usd=0, budget_usd=0),
        )
        provider = PrerenderedDemo() if prerendered else DemoProvider(latency=latency)
        engine = Engine(store, Catalog.load(), {"demo": provider}, config)
        adapter = NullAdapter(jobs)
        engine.register(adapter)
        await engine.start()
        with settled_gc():  # as `drawbridge run` serves (bot.runtime)
            started = time.perf_counter()

            async def submit(i: int) -> None:
                user = UserRef("bench", f"u{i % users}")
                request = Request(
                    user=user,
                    target=Target("bench", chat_id=user.user_id),
                    prompt=f"bench prompt {i}",
                    options=Options(aspect_ratio="1:1", n=1, size=size),
                )
                while True:
                    try:
                        await engine.submit(request)
                        return
                    except QueueFull:
                        await asyncio.sleep(0.001)

            # Requests arrive the way chats send them: many at once, not one after another.
            for start in range(0, jobs, burst):
                await asyncio.gather(*(submit(i) for i in range(start, min(jobs, start + burst))))
            submitted = time.perf_counter()
            await adapter.done.wait()
            finished = adapter.last_delivery
            await engine.close()
        rows = sum(row.succeeded for row in await store.usage())
        await store.close()
    return {
        "jobs": jobs,
        "succeeded_rows": float(rows),
        "submit_s": submitted - started,
        "total_s": finished - started,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--throughput-concurrency", type=int, default=64)
    p.add_argument("--efficiency-jobs", type=int, default=500)
    p.add_argument("--latency", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--skip", choices=["throughput", "efficiency"])
    args = p.parse_args()

    print("drawbridge engine bench (real engine, durable SQLite store, demo model, null adapter)")
    if args.skip != "throughput":
        print(f"\nthroughput: {args.jobs} jobs from {args.users} users, zero latency, 256 px PNGs")
        _, cpu = create_cost()
        print(
            f"  (creating a 3 KB file under {bench_root()} costs {cpu:,.0f} µs of CPU just now; "
            "see bench/datadir.py)"
        )
        cases: list[tuple[str, bool, Path | None]] = [
            (f"engine (prerendered demo), data dir under {bench_root()}", True, None),
        ]
        if (shm := memory_root()) is not None:
            cases.append((f"the same, data dir on tmpfs ({shm}: no disk cost)", True, shm))
        cases.append(("demo model rendering", False, None))
        for label, prerendered, root in cases:
            r = runtime.run(
                run(
                    args.jobs,
                    args.users,
                    0.0,
                    args.throughput_concurrency,
                    "256",
                    prerendered=prerendered,
                    root=root,
                )
            )
            print(f"  {label}")
            print(
                f"    {'submit (persist + enqueue)':<28} {r['jobs'] / r['submit_s']:>10,.0f} jobs/s"
            )
            print(
                f"    {'end to end (to delivered)':<28} {r['jobs'] / r['total_s']:>10,.0f} jobs/s"
            )
            print(f"    {'succeeded rows':<28} {r['succeeded_rows']:>10,.0f}")
    if args.skip != "efficiency":
        n, c, lat = args.efficiency_jobs, args.concurrency, args.latency
        r = runtime.run(run(n, max(1, n // 5), lat, c, "256"))
        ideal = math.ceil(n / c) * lat
        print(f"\nefficiency: {n} jobs, latency {lat:g} s, CONCURRENCY={c}")
        print(f"  {'ideal makespan':<30} {ideal:>10.2f} s")
        print(f"  {'measured makespan':<30} {r['total_s']:>10.2f} s")
        print(f"  {'efficiency (ideal/measured)':<30} {ideal / r['total_s']:>10.3f}")
        print(f"  {'succeeded rows':<30} {r['succeeded_rows']:>10,.0f}")


if __name__ == "__main__":
    main()
