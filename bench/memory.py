"""Memory benchmarks (issue 7): RSS per queued job at 10,000 queued, peak RSS while big images
are delivered.

    .venv/bin/python -m bench.memory                      # both tables, default sizes
    .venv/bin/python -m bench.memory --skip images --queued 10000 --users 100,3334
    .venv/bin/python -m bench.memory --skip queued --images 50 --image-mb 8 --upload 2
    .venv/bin/python -m bench.memory --skip images --users 3334 \
        --variants baseline,share-keys,share-day,share-options,list-lines

Both run the real engine on a real, durable SQLite store in a temp dir under the working
directory, as `bench.engine` does. Every measurement runs in a fresh child process of its own
(`--child`), so none inherits another's heap, and tracemalloc (which costs memory itself) runs
in a separate child from the RSS figures.

Queued jobs: CONCURRENCY=1 and a provider that blocks until released, so after one warm-up job
takes the only slot, every job submitted stays queued. Requests are built as the Telegram adapter
builds them (fresh strings for the user id, chat id and message id of every update). The figure
is (RSS after − RSS before) / jobs, after gc.collect(); beside it, tracemalloc's retained Python
bytes per job, SQLite's own heap, and a breakdown of what each queued job holds.

Images: a provider that returns a fresh copy of an ~8 MB PNG of random noise (incompressible,
made once with Pillow) for each job, and an adapter that reads each stored file's bytes (as the
Telegram and Discord adapters do before uploading), holds them for an "upload" and drops them.
VmHWM is reset (/proc/self/clear_refs) at the baseline; a sampler also reads VmRSS every 2 ms.

`--variants` (queued jobs) and `--image-variants` run the same measurement with prototype fixes
monkeypatched in (this file only; `a+b` combines them), for the before/after of each change
proposed for bot/:
    share-keys    FairQueue keeps one user-key string per user, not one per job
    share-day     Quotas.day_of hands out one shared string per day, not one per job
    share-options jobs share one Options object per distinct (ratio, n, size, seed)
    list-lines    FairQueue keeps each user's line in a list, not a 760-byte deque
    drop-images   the generated image bytes are let go once stored, before delivery
    mmap-threshold  glibc's mmap threshold fixed at 1 MiB (mallopt), so big buffers are
                  mmapped and go back to the OS when freed
    settled-gc    the collector as `drawbridge run` serves with it (`bot.runtime.settled_gc`)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import io
import json
import linecache
import math
import os
import subprocess
import sys
import time
import traceback
import tracemalloc
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import bot.fairqueue
from bench.datadir import scratch_dir
from bot import runtime
from bot.adapter import StatusUpdate
from bot.catalog import Catalog
from bot.engine import Engine, EngineConfig
from bot.fairqueue import FairQueue
from bot.jobs import (
    GeneratedImage,
    Job,
    Options,
    Request,
    StoredImage,
    Target,
    UserRef,
)
from bot.providers.base import GenerationRequest, JobHooks
from bot.quota import Limits, Quotas
from bot.store import Store

KB = 1024
MB = 1024 * 1024

# About the length of a typical /imagine prompt; the job index goes first so each is unique.
BASE_PROMPT = (
    "a red fox curled up in fresh snow at dawn, watercolor, soft rim light, muted palette, "
    "paper texture, wide shot, high detail "
) * 20


# ---- reading the process's memory -------------------------------------------------------------


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[name] = int(rest.split()[0]) * KB
    return out


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _libsqlite() -> Any:
    try:
        # The same shared library the sqlite3 module linked: one heap, one counter.
        lib = ctypes.CDLL("libsqlite3.so.0")
        lib.sqlite3_memory_used.restype = ctypes.c_int64
        return lib
    except OSError:
        return None


_SQLITE = _libsqlite()


def sqlite_heap() -> int:
    """Bytes SQLite's allocator holds now (page caches, schema, statements), all connections."""
    return int(_SQLITE.sqlite3_memory_used()) if _SQLITE is not None else 0


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def malloc_in_use() -> int:
    """glibc's main-arena bytes in use plus mmapped blocks (mallinfo2), or 0 elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return 0
    return int(info.uordblks + info.hblkhd)


def malloc_trim() -> int:
    """Hand free heap back to the OS (glibc malloc_trim); the VmRSS after it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return proc_status()["VmRSS"]


def alloc_size(obj: object) -> int:
    """What an object really takes: getsizeof (with its GC header), rounded to pymalloc's 16."""
    n = sys.getsizeof(obj)
    return (n + 15) // 16 * 16 if n <= 512 else n


# ---- prototype fixes (monkeypatched here only; the proposals for bot/ say the same in code) ---


class ListLine(list[Any]):
    """A user's line as a list (56 B + 8 B a job) with the deque methods FairQueue uses; a
    deque takes 760 B from its first job on. A line is at most MAX_PENDING_PER_USER long, so
    the list's O(n) ends are cheap."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)

    def rotate(self, n: int = 1) -> None:
        if self:
            n %= len(self)
            self[:] = self[-n:] + self[:-n]


def _share_keys() -> None:
    FairQueue.push = _push_sharing_key(FairQueue.push)  # type: ignore[method-assign]


def _push_sharing_key(push: Callable[..., None]) -> Callable[..., None]:
    def push_sharing_key(self: FairQueue, job: Job, *, front: bool = False) -> None:
        line = self._by_user.get(str(job.user))
        push(self, job, front=front)
        if line:  # the user already had a line: use the key string its jobs already share
            other = line[-1] if front else line[0]
            self._owner[job.id] = self._owner[other.id]

    return push_sharing_key


def _share_day() -> None:
    day_of = Quotas.day_of
    days: dict[str, str] = {}

    def shared_day_of(self: Quotas, ts: float) -> str:
        day = day_of(self, ts)
        return days.setdefault(day, day)

    Quotas.day_of = shared_day_of  # type: ignore[method-assign]


def _share_options() -> None:
    import bot.engine

    validate: Callable[..., Any] = getattr(bot.engine, "validate_request")  # noqa: B009
    shared: dict[Options, Options] = {}

    def validate_shared(*args: Any, **kwargs: Any) -> Any:
        spec, prompt, options = validate(*args, **kwargs)
        if len(shared) < 1024:
            options = shared.setdefault(options, options)
        return spec, prompt, shared.get(options, options)

    setattr(bot.engine, "validate_request", validate_shared)  # noqa: B010


def _list_lines() -> None:
    # FairQueue's own code (its position index included), with lists for its lines.
    setattr(bot.fairqueue, "deque", ListLine)  # noqa: B010


def _drop_images() -> None:
    settle = Engine._settle

    async def settle_then_drop(
        self: Engine, job: Job, spec: Any, images: Sequence[GeneratedImage]
    ) -> tuple[Job, list[StoredImage]]:
        try:
            return await settle(self, job, spec, images)
        finally:
            # Stands in for `del images` in Engine._run before `_deliver`: the bytes are on
            # disk (or the job failed) and nothing reads them again.
            for img in images:
                object.__setattr__(img, "data", b"")

    setattr(Engine, "_settle", settle_then_drop)  # noqa: B010


def _mmap_threshold() -> None:
    # A fixed threshold turns off glibc's dynamic one, which after the first big free serves
    # every later 8 MB buffer from the heap, where the pages stay after the buffer is freed.
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB


def _settled_gc() -> None:
    # What `drawbridge run` serves with (bot.runtime.settled_gc), entered here for the process.
    from bot.runtime import settled_gc

    settled_gc().__enter__()


VARIANTS: dict[str, Callable[[], None]] = {
    "baseline": lambda: None,
    "share-keys": _share_keys,
    "share-day": _share_day,
    "share-options": _share_options,
    "list-lines": _list_lines,
    "drop-images": _drop_images,
    "mmap-threshold": _mmap_threshold,
    "settled-gc": _settled_gc,
}


def apply_variants(names: Iterable[str]) -> None:
    for name in names:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        VARIANTS[name]()


# ---- queued jobs ------------------------------------------------------------------------------


class GateProvider:
    """The demo model's name, but every call waits until `release` is set."""

    name = "demo"

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def generate(self, request: GenerationRequest, hooks: JobHooks) -> list[GeneratedImage]:
        self.started.set()
        await self.release.wait()
        return []

    async def aclose(self) -> None:
        return None


class QuietAdapter:
    """Takes deliveries and status updates and drops them."""

    def __init__(self, platform: str) -> None:
        self.platform = platform

    async def deliver(self, job: Job, images: Sequence[StoredImage]) -> str:
        return f"{self.platform}:{job.id}"

    async def status(self, job: Job, update: StatusUpdate) -> None:
        return None

    async def notify(self, target: Target, text: str) -> None:
        return None


def telegram_request(i: int, users: int, prompt_chars: int) -> Request:
    """What the Telegram adapter builds for update `i`: every id string is a new object."""
    uid = 5_000_000_000 + (i % users) * 7919
    user = UserRef("telegram", str(uid))
    target = Target("telegram", chat_id=str(uid), reply_to=str(100_000 + i))
    prompt = f"#{i} {BASE_PROMPT}"[:prompt_chars]
    return Request(user=user, target=target, prompt=prompt, options=Options(aspect_ratio="1:1"))


def breakdown(engine: Engine, n: int) -> list[tuple[str, float]]:
    """Bytes per queued job by what holds them; an object shared by many jobs is counted once."""
    seen: set[int] = set()
    sizes: dict[str, int] = defaultdict(int)

    def take(what: str, *objs: object) -> None:
        for obj in objs:
            if obj is None or isinstance(obj, bool) or id(obj) in seen:
                continue
            seen.add(id(obj))
            sizes[what] += alloc_size(obj)

    queued = list(engine._queue)
    for job in queued:
        take("Job (dataclass, 26 slots)", job)
        take("job id string", job.id)
        take("prompt text", job.prompt)
        take("UserRef", job.user)
        take("UserRef strings (platform, user_id)", job.user.platform, job.user.user_id)
        t = job.target
        take("Target", t)
        take(
            "Target strings (chat_id, reply_to, …)",
            t.platform,
            t.chat_id,
            t.thread_id,
            t.reply_to,
            t.guild_id,
            t.meta,
        )
        take("Options", job.options)
        o = job.options
        take("Options fields", o.aspect_ratio, o.n, o.size, o.seed)
        take("day string", job.day)
        take("floats (created_at, reserved_usd)", job.created_at, job.reserved_usd)
        take(
            "other fields (model, provider, lang, …)",
            job.model,
            job.provider,
            job.lang,
            job.status,
            job.account,
            job.reference_paths,
            job.cost_usd,
        )
    take("Engine._jobs dict", engine._jobs)
    take("Engine._jobs keys/values not above", *engine._jobs.keys(), *engine._jobs.values())
    q = engine._queue
    take("FairQueue._owner dict", q._owner)
    take("FairQueue._owner values: str(user) per push", *q._owner.values())
    take("FairQueue._by_user dict + per-user deques", q._by_user, *q._by_user.values())
    take("FairQueue user keys + _rotation", *q._by_user.keys(), q._rotation)
    take("Engine._active_by_user (dict, keys, counts)", engine._active_by_user)
    take("Engine._active_by_user (dict, keys, counts)", *engine._active_by_user.keys())
    take("Engine._active_by_user (dict, keys, counts)", *engine._active_by_user.values())
    quotas = engine.quotas
    for users in quotas._days.values():
        take("quota tallies (per user, per day)", users, *users.keys(), *users.values())
    take("quota chat scopes (per chat, per day)", quotas._scopes)
    for key, held in quotas._scopes.items():
        take("quota chat scopes (per chat, per day)", key, key[0], held)
    return sorted(((k, v / n) for k, v in sizes.items()), key=lambda kv: -kv[1])


async def queued_child(
    n: int, users: int, prompt_chars: int, trace: bool, variants: list[str]
) -> dict[str, Any]:
    apply_variants(variants)
    with scratch_dir() as tmp:
        store = await Store.open(Path(tmp))
        config = EngineConfig(
            concurrency=1,
            queue_max=n + 1,
            max_pending_per_user=math.ceil(n / users),
            limits=Limits(user_images=0, user_usd=0, budget_usd=0),
            shutdown_grace=1.0,
        )
        gate = GateProvider()
        engine = Engine(store, Catalog.load(), {"demo": gate}, config)
        engine.register(QuietAdapter("telegram"))
        await engine.start()
        warm = telegram_request(-1, 1, prompt_chars)
        await engine.submit(Request(UserRef("telegram", "1"), warm.target, warm.prompt))
        await gate.started.wait()  # the only slot is taken: everything from here on queues
        gc.collect()
        before = proc_status()
        sql_before, malloc_before = sqlite_heap(), malloc_in_use()
        if trace:
            tracemalloc.start(1)
            snap_before = tracemalloc.take_snapshot()
        burst = 200
        started = time.perf_counter()
        for first in range(0, n, burst):
            batch = range(first, min(n, first + burst))
            await asyncio.gather(
                *(engine.submit(telegram_request(i, users, prompt_chars)) for i in batch)
            )
        submit_s = time.perf_counter() - started
        gc.collect()
        after = proc_status()
        sql_after, malloc_after = sqlite_heap(), malloc_in_use()
        result: dict[str, Any] = {
            "queued": engine.queue_depth,
            "rss_per_job": (after["VmRSS"] - before["VmRSS"]) / n,
            "anon_per_job": (after["RssAnon"] - before["RssAnon"]) / n,
            "sqlite_per_job": (sql_after - sql_before) / n,
            "malloc_per_job": (malloc_after - malloc_before) / n,
            "rss_before": before["VmRSS"],
            "rss_after": after["VmRSS"],
            "submit_per_s": n / submit_s,
        }
        if trace:
            snap_after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            diff = snap_after.compare_to(snap_before, "lineno")
            result["traced_per_job"] = sum(d.size_diff for d in diff) / n
            lines = []
            for d in sorted(diff, key=lambda d: -d.size_diff)[:14]:
                frame = d.traceback[0]
                where = _short(frame.filename)
                code = linecache.getline(frame.filename, frame.lineno).strip()
                lines.append((f"{where}:{frame.lineno}", code[:58], d.size_diff / n))
            result["traced_lines"] = lines
        else:
            result["breakdown"] = breakdown(engine, n)
        gate.release.set()
        await engine.close()
        await store.close()
    return result


def _short(filename: str) -> str:
    here = str(Path.cwd()) + os.sep
    if filename.startswith(here):
        return filename[len(here) :]
    return Path(filename).name


# ---- big images delivered ---------------------------------------------------------------------


def noise_png(megabytes: float) -> tuple[bytes, int, int]:
    """A real PNG of random RGB noise, about `megabytes` MiB (noise does not compress)."""
    from PIL import Image

    side = int(math.sqrt(megabytes * MB / 3))
    img = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), side, side


class Live:
    """Generated-image buffers alive (held by the engine), and jobs between generated and
    delivered ("images in flight")."""

    generated = 0
    generated_max = 0
    jobs = 0
    jobs_max = 0


class TrackedBytes(bytes):
    """A generated image's bytes that count themselves while alive."""

    def __del__(self) -> None:
        Live.generated -= 1


class BigImageProvider:
    """Returns a fresh copy of one big PNG per job, as a download would."""

    name = "demo"

    def __init__(self, png: bytes, width: int, height: int) -> None:
        self.png = png
        self.size = (width, height)

    async def generate(self, request: GenerationRequest, hooks: JobHooks) -> list[GeneratedImage]:
        await asyncio.sleep(0.01)
        data = TrackedBytes(self.png)  # a new 8 MB buffer per job
        Live.generated += 1
        Live.generated_max = max(Live.generated_max, Live.generated)
        Live.jobs += 1
        Live.jobs_max = max(Live.jobs_max, Live.jobs)
        return [GeneratedImage(data, "image/png", *self.size)]

    async def aclose(self) -> None:
        return None


class UploadingAdapter:
    """Reads each stored image's bytes (like the real adapters), holds them for the upload."""

    platform = "bench"

    def __init__(self, expected: int, upload_s: float) -> None:
        self.expected = expected
        self.upload_s = upload_s
        self.delivered = 0
        self.in_flight = 0
        self.in_flight_max = 0
        self.done = asyncio.Event()

    async def deliver(self, job: Job, images: Sequence[StoredImage]) -> str:
        datas = [await asyncio.to_thread(image.path.read_bytes) for image in images]
        self.in_flight += len(datas)
        self.in_flight_max = max(self.in_flight_max, self.in_flight)
        try:
            await asyncio.sleep(self.upload_s)  # the upload: the bytes stay alive meanwhile
        finally:
            self.in_flight -= len(datas)
        del datas
        Live.jobs -= 1
        self.delivered += 1
        if self.delivered >= self.expected:
            self.done.set()
        return f"bench:{job.id}"

    async def status(self, job: Job, update: StatusUpdate) -> None:
        return None

    async def notify(self, target: Target, text: str) -> None:
        return None


async def images_child(
    n: int, megabytes: float, upload_s: float, variants: list[str]
) -> dict[str, Any]:
    apply_variants(variants)
    png, width, height = noise_png(megabytes)
    with scratch_dir() as tmp:
        store = await Store.open(Path(tmp))
        config = EngineConfig(
            concurrency=n,
            queue_max=n,
            max_pending_per_user=n,
            limits=Limits(user_images=0, user_usd=0, budget_usd=0),
        )
        engine = Engine(
            store, Catalog.load(), {"demo": BigImageProvider(png, width, height)}, config
        )
        adapter = UploadingAdapter(n, upload_s)
        engine.register(adapter)
        await engine.start()
        gc.collect()
        base = proc_status()["VmRSS"]
        peak_reset = reset_peak()
        sampled = {"rss": base, "jobs": 0, "generated": 0, "uploading": 0}

        async def sample() -> None:
            while True:
                rss = proc_status()["VmRSS"]
                if rss > sampled["rss"]:
                    sampled.update(
                        rss=rss,
                        jobs=Live.jobs,
                        generated=Live.generated,
                        uploading=adapter.in_flight,
                    )
                await asyncio.sleep(0.002)

        sampler = asyncio.create_task(sample())
        started = time.perf_counter()
        for i in range(n):
            await engine.submit(
                Request(
                    user=UserRef("bench", f"u{i % 10}"),
                    target=Target("bench", chat_id=f"c{i % 10}"),
                    prompt=f"noise {i}",
                    options=Options(aspect_ratio="1:1", n=1),
                )
            )
        await adapter.done.wait()
        took = time.perf_counter() - started
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        status = proc_status()
        await asyncio.sleep(0.3)  # the last jobs' tasks end; the bot would now sit idle
        gc.collect()
        idle = proc_status()["VmRSS"]
        await engine.close()
        await store.close()
    image_bytes = len(png)
    del png
    gc.collect()
    after = proc_status()["VmRSS"]
    trimmed = malloc_trim()
    return {
        "image_bytes": image_bytes,
        "baseline": base,
        "hwm": status["VmHWM"] if peak_reset else 0,
        "sampled_peak": sampled["rss"],
        "at_peak_jobs": sampled["jobs"],
        "at_peak_generated": sampled["generated"],
        "at_peak_uploading": sampled["uploading"],
        "jobs_max": Live.jobs_max,
        "generated_max": Live.generated_max,
        "uploading_max": adapter.in_flight_max,
        "idle": idle,
        "after": after,
        "after_trim": trimmed,
        "seconds": took,
    }


# ---- the parent: run children, print tables ---------------------------------------------------


def child(kind: str, **params: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.memory", "--child", json.dumps({"kind": kind, **params})]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return result
    raise RuntimeError(f"child printed no result:\n{out.stdout}\n{out.stderr}")


def run_child(spec: str) -> None:
    p = json.loads(spec)
    kind = p.pop("kind")
    fn = queued_child if kind == "queued" else images_child
    try:
        print("RESULT " + json.dumps(runtime.run(fn(**p))))
    except BaseException:
        # Say why and go: the store's threads would otherwise keep the child, and so the
        # parent waiting for it, alive for ever.
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)


def queued_tables(n: int, user_counts: list[int], prompt_chars: int, variants: list[str]) -> None:
    print(
        f"\nRSS per queued job: {n:,} jobs queued (CONCURRENCY=1, the slot held), "
        f"{prompt_chars}-char prompts; target ≤ 2,048 B"
    )
    w = max(len(v) for v in variants)
    head = f"  {'variant':<{w}} {'users':>6} {'RSS/job':>9} {'py/job':>8} {'sqlite/job':>10}"
    print(head + f" {'submit/s':>9}")
    details: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
    for users in user_counts:
        for variant in variants:
            names = variant.split("+")
            rss = child("queued", n=n, users=users, prompt_chars=prompt_chars, trace=False,
                        variants=names)  # fmt: skip
            traced = child("queued", n=n, users=users, prompt_chars=prompt_chars, trace=True,
                           variants=names)  # fmt: skip
            if variant == "baseline":
                details[users] = (rss, traced)
            assert rss["queued"] == n, rss["queued"]
            print(
                f"  {variant:<{w}} {users:>6,} {rss['rss_per_job']:>7,.0f} B "
                f"{traced['traced_per_job']:>6,.0f} B {rss['sqlite_per_job']:>8,.0f} B "
                f"{rss['submit_per_s']:>9,.0f}"
            )
    print("  (RSS/job: VmRSS growth / jobs after gc.collect(); py/job: tracemalloc's retained")
    print("   Python bytes per job, separate run; sqlite/job: SQLite heap growth, page caches)")
    for users, (rss, traced) in details.items():
        print(f"\n  what one queued job holds (baseline, {users:,} users), bytes per job:")
        total = 0.0
        for what, size in rss["breakdown"]:
            total += size
            print(f"    {what:<46} {size:>7,.1f}")
        print(f"    {'= accounted Python objects':<46} {total:>7,.1f}")
        print(f"\n  where tracemalloc saw the retained bytes (baseline, {users:,} users):")
        for where, code, size in traced["traced_lines"]:
            print(f"    {size:>7,.1f} B  {where:<26} {code}")


def images_table(n: int, megabytes: float, upload_s: float, variants: list[str]) -> None:
    print(
        f"\npeak RSS while {n} × {megabytes:g} MiB images are delivered (CONCURRENCY={n}; "
        f"the adapter reads each file and holds it {upload_s:g} s)"
    )
    print(
        f"  {'variant':<26} {'base':>6} {'peak':>7} {'peak−base':>9} {'in flight':>9} "
        f"{'per image':>9} {'×size':>5}   {'buffers at peak':<16} {'idle':>6} {'closed':>6} {'trimmed':>7}"
    )
    for variant in variants:
        r = child("images", n=n, megabytes=megabytes, upload_s=upload_s,
                  variants=variant.split("+"))  # fmt: skip
        peak = max(r["hwm"], r["sampled_peak"])
        flight = max(1, r["jobs_max"])
        per = (peak - r["baseline"]) / flight
        buffers = f"{r['at_peak_generated']} gen + {r['at_peak_uploading']} read"
        print(
            f"  {variant:<26} {r['baseline'] / MB:>4,.0f} M {peak / MB:>5,.0f} M "
            f"{(peak - r['baseline']) / MB:>7,.0f} M {flight:>9} {per / MB:>7,.1f} M "
            f"{per / r['image_bytes']:>5.2f}   {buffers:<16} {r['idle'] / MB:>4,.0f} M "
            f"{r['after'] / MB:>4,.0f} M "
            f"{r['after_trim'] / MB:>5,.0f} M"
        )
    print(
        "  (peak: VmHWM, reset at the baseline, or the 2 ms sampler's, whichever is higher;"
        " in flight: the most\n   jobs generated but not yet delivered at once; per image:"
        " (peak − base) / in flight;\n   buffers: generated-image buffers and adapter-read"
        " copies alive then; idle: VmRSS 0.3 s after the last\n   delivery, engine still up;"
        " closed: engine and store closed, gc.collect(); trimmed: then\n   glibc malloc_trim(0))"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--queued", type=int, default=10_000)
    p.add_argument("--users", default="100,3334", help="comma-separated user counts")
    p.add_argument("--prompt-chars", type=int, default=120)
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--image-mb", type=float, default=8.0)
    p.add_argument("--upload", type=float, default=2.0, help="seconds each upload holds its bytes")
    p.add_argument(
        "--variants",
        default="baseline,share-keys+share-day+share-options+list-lines",
        help="queued-job variants, comma-separated; '+' combines prototype fixes",
    )
    p.add_argument(
        "--image-variants", default="baseline,drop-images,mmap-threshold,drop-images+mmap-threshold"
    )
    p.add_argument("--skip", choices=["queued", "images"])
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run_child(args.child)
        return
    print("drawbridge memory bench (real engine, durable SQLite store, null adapters)")
    if args.skip != "queued":
        users = [int(u) for u in args.users.split(",")]
        queued_tables(args.queued, users, args.prompt_chars, args.variants.split(","))
    if args.skip != "images":
        images_table(args.images, args.image_mb, args.upload, args.image_variants.split(","))


if __name__ == "__main__":
    main()
