"""Makespan efficiency end to end: /imagine in Telegram → GrsAI → photo back in the chat.

    .venv/bin/python -m bench.e2e            # N=300 U=60 L=2 C=50, then N=2000 U=400 L=1 C=200
    .venv/bin/python -m bench.e2e --quick    # N=100 U=20 L=1 C=25
    .venv/bin/python -m bench.e2e --jobs 300 --users 60 --latency 2 --concurrency 50
    .venv/bin/python -m bench.e2e --jobs 2000 --users 400 --concurrency 200 --lanes paid --repeat 3

The bot is the real one: `bot.app.open_core` with settings from `load_settings` (a durable SQLite
store in a temp dir under the working directory, the real GrsAI client in stream mode) served by
`bot.app.serve` with the real `TelegramAdapter` (python-telegram-bot, long polling). It talks to
the loopback fake Bot API, flood limits on (30 calls a second overall), and to the loopback fake
GrsAI, whose every task streams for L seconds; both fakes run in a process of their own
(`bench.fakehost`). N `/imagine` commands from U users (each a private chat) are pushed at once;
the makespan runs from the first push to the arrival of the last photo at the fake Bot API.

Beside it, on the same fake GrsAI, the naive batch client of the seed article: aiohttp, an
`asyncio.Semaphore(C)` and `asyncio.gather`, calling the draw API directly and downloading each
result, with no chat at all. Its makespan runs from its first request to its last download.

efficiency = ceil(N/C)·L / makespan. A bot also has to post N photos within Telegram's budget of
30 messages a second, which alone can take longer than ceil(N/C)·L; the table gives that bound
(a leaky bucket of 30, photos only, each released when its wave of C jobs ends) and the
efficiency against max(ideal, send bound).

This machine's speed varies by ±10 % from one minute to the next: `--repeat R` runs the naive
client and each bot lane R times, interleaved on the same fakes, and gives each makespan as the
median with the range of the R runs (efficiencies from the median).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

from bench.botrig import running_bot
from bench.fakehost import POSTS, RESULTS, CallRecord, FakeHost
from bot import runtime

SEND_RATE = 30.0  # Telegram: messages a second, all chats together (the fake's leaky bucket)
SEND_BURST = 30.0


@dataclass(frozen=True)
class Scenario:
    jobs: int
    users: int
    latency: float
    concurrency: int

    @property
    def ideal(self) -> float:
        return math.ceil(self.jobs / self.concurrency) * self.latency

    @property
    def label(self) -> str:
        return f"N={self.jobs} U={self.users} L={self.latency:g}s C={self.concurrency}"


@dataclass
class Outcome:
    makespan: float
    done: int
    extra: dict[str, float] = field(default_factory=dict)
    methods: Counter[str] = field(default_factory=Counter)
    cpu: Cpu | None = None


@dataclass(frozen=True)
class Cpu:
    """CPU seconds each process used during a run: where a two-core machine's time went."""

    loop: float  # this process's event-loop thread (the bot's, or the naive client's)
    threads: float  # this process's other threads (the database writer, the file pool)
    bot_api: float  # the fake Bot API's process
    grsai: float  # the fake GrsAI's process

    @classmethod
    async def start(cls, host: FakeHost) -> Cpu:
        bot_api, grsai = await host.cpu()
        return cls(time.thread_time(), time.process_time(), bot_api, grsai)

    async def since(self, host: FakeHost) -> Cpu:
        bot_api, grsai = await host.cpu()
        loop = time.thread_time() - self.loop
        process = time.process_time() - self.threads
        return Cpu(loop, process - loop, bot_api - self.bot_api, grsai - self.grsai)

    def line(self, makespan: float) -> str:
        return (
            f"CPU during the run: loop {self.loop:.2f} s ({self.loop / makespan:.0%} of the "
            f"makespan), other threads {self.threads:.2f} s, fake Bot API {self.bot_api:.2f} s, "
            f"fake GrsAI {self.grsai:.2f} s, on {os.cpu_count()} cores"
        )


def send_bound(
    jobs: int,
    concurrency: int,
    latency: float,
    rate: float = SEND_RATE,
    burst: float = SEND_BURST,
) -> float:
    """The earliest the last photo can arrive: waves of C results every L s through the bucket."""
    level, stamp, t = 0.0, 0.0, 0.0
    for i in range(jobs):
        ready = (i // concurrency + 1) * latency
        t = max(t, ready)
        level = max(0.0, level - (t - stamp) * rate)
        if level + 1 > burst:
            t += (level + 1 - burst) / rate
            level = burst - 1
        stamp = t
        level += 1
    return t


# ---- the naive batch client -----------------------------------------------------------------


async def naive_client(
    base_url: str, api_key: str, scenario: Scenario, connector_limit: int | None
) -> Outcome:
    """The seed article's batch script: Semaphore(C) + gather, stream mode, download each image."""
    sem = asyncio.Semaphore(scenario.concurrency)
    headers = {"Authorization": f"Bearer {api_key}"}
    limit = scenario.concurrency if connector_limit is None else connector_limit
    done = 0
    last = 0.0

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal done, last
        async with sem:
            body = {"model": "nano-banana", "prompt": f"a fox number {i}", "aspectRatio": "1:1"}
            url = None
            async with session.post(
                f"{base_url}/v1/draw/nano-banana", json=body, headers=headers
            ) as resp:
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    task = json.loads(line[5:])
                    if task.get("status") == "succeeded":
                        url = task["results"][0]["url"]
                    if task.get("status") in ("succeeded", "failed"):
                        break
            if url is None:
                return
            async with session.get(url) as resp:
                await resp.read()
            done += 1
            last = time.monotonic()

    connector = aiohttp.TCPConnector(limit=limit)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.monotonic()
        await asyncio.gather(*(one(session, i) for i in range(scenario.jobs)))
    return Outcome(last - start, done)


# ---- the bot --------------------------------------------------------------------------------


async def bot_run(
    host: FakeHost, scenario: Scenario, within: float, quiet: float = 3.5, paid_stars: float = 0.0
) -> Outcome:
    """The real bot against the fakes; the makespan the fake Bot API saw.

    After the last result, the calls are counted until the bot has been `quiet` for that long.
    `paid_stars` is the bot's TELEGRAM_PAID_BROADCAST_STARS (0: the free ~30 a second only).
    """
    env = {
        "GRSAI_API_KEY": host.api_key,
        "GRSAI_BASE_URL": host.grsai_url,
        "GRSAI_MODE": "stream",
        "DEFAULT_MODEL": "nano-banana",
        "CONCURRENCY": str(scenario.concurrency),
        "QUEUE_MAX": str(max(200, scenario.jobs)),
        "MAX_PENDING_PER_USER": str(scenario.jobs),
        "TELEGRAM_PAID_BROADCAST_STARS": str(paid_stars),
    }
    async with running_bot(host, env) as adapter:
        messages = [
            (1000 + i % scenario.users, f"/imagine a fox number {i}") for i in range(scenario.jobs)
        ]
        cpu = await Cpu.start(host)
        stamps = await host.push(messages)
        finished = await host.wait_results(scenario.jobs, within)
        used = await cpu.since(host)
        calls = await host.calls()
        # The "done" edits wait for an idle budget, so they come after the last photo: let them
        # go out (until the bot is quiet for a few seconds) so the counts show a job's full cost.
        tail = calls
        for _ in range(30 if quiet > 0 else 0):
            await asyncio.sleep(0.5)
            later = await host.calls()
            if len(later) == len(tail) and later and later[-1].at < time.monotonic() - quiet:
                break
            tail = later
        errors = list(adapter.errors)
        paid = await host.paid_messages()
    if errors:
        print(f"  ! {len(errors)} handler errors, first: {errors[0]!r}")
    if not finished:
        print(f"  ! the bot did not post {scenario.jobs} results within {within:g} s")
    results = [c for c in calls if c.ok and c.method in RESULTS]
    makespan = max(c.at for c in results) - stamps[0] if results and finished else math.inf
    outcome = Outcome(makespan, len(results), cpu=used)
    outcome.methods = Counter(c.method for c in tail if c.ok)
    outcome.extra = {
        "429s": float(sum(1 for c in tail if c.code == 429)),
        "errors": float(sum(1 for c in tail if not c.ok and c.code != 429)),
        "first_post_p50": _first_post_p50(calls, stamps, messages),
        "handler_errors": float(len(errors)),
        "paid": float(paid),
    }
    return outcome


def _first_post_p50(
    calls: Sequence[CallRecord], stamps: Sequence[float], messages: Sequence[tuple[int, str]]
) -> float:
    pushed: dict[int, float] = {}
    for (chat, _), at in zip(messages, stamps, strict=True):
        pushed.setdefault(chat, at)
    first: dict[int, float] = {}
    for c in calls:
        if c.ok and c.method in POSTS and c.chat_id is not None and c.chat_id not in first:
            first[c.chat_id] = c.at - pushed.get(c.chat_id, c.at)
    values = sorted(first.values())
    return values[len(values) // 2] if values else math.nan


# ---- the table ------------------------------------------------------------------------------


async def run_scenario(
    scenario: Scenario,
    connector_limit: int | None,
    paid_stars: float,
    repeat: int = 1,
    lanes: Sequence[str] = ("free", "paid"),
) -> list[str]:
    from adapters.telegram_budget import PaidLane

    lines = [f"\n{scenario.label}"]
    runs = [("free ~30/s", 0.0)] if "free" in lanes else []
    if paid_stars > 0 and "paid" in lanes:
        runs.append((f"+ paid lane ({paid_stars:g} ★)", paid_stars))
    naives: list[Outcome] = []
    bots: dict[str, list[Outcome]] = {f"drawbridge, {label}": [] for label, _ in runs}
    async with FakeHost(latency=scenario.latency) as host:
        within = 4 * scenario.ideal + 2 * scenario.jobs / SEND_RATE + 60
        for _ in range(max(1, repeat)):
            gc.collect()  # each side starts without the other's garbage
            cpu = await Cpu.start(host)
            naive_run = await naive_client(host.grsai_url, host.api_key, scenario, connector_limit)
            naive_run.cpu = await cpu.since(host)
            naives.append(naive_run)
            for label, stars in runs:
                gc.collect()
                await host.reset_calls()
                outcome = await bot_run(host, scenario, within, 3.5, stars)
                bots[f"drawbridge, {label}"].append(outcome)
        counts = await host.grsai_counts()
    ideal = scenario.ideal
    bound = send_bound(scenario.jobs, scenario.concurrency, scenario.latency)
    floor = max(ideal, bound)
    naive = _median(naives)
    lines.append(f"  ideal ceil(N/C)·L            {ideal:9.2f} s")
    lines.append(
        f"  send bound (photos @ {SEND_RATE:g}/s)   {bound:9.2f} s"
        f"   → free-lane floor max(ideal, bound) {floor:.2f} s"
    )
    lines.append(
        f"  {'client':<34} {'done':>6} {'makespan':>10} {'eff (ideal)':>12} {'vs naive':>9}"
        f" {'eff (free floor)':>17}{'   runs' if repeat > 1 else ''}"
    )
    lines.append(
        f"  {'naive batch (no chat)':<34} {naive.done:>6} {naive.makespan:>9.2f}s "
        f"{ideal / naive.makespan:>12.3f} {'-':>9} {'-':>17}{_spread(naives, repeat)}"
    )
    for name, outcomes in bots.items():
        r = _median(outcomes)
        free = "paid" not in name
        vs_floor = f"{floor / r.makespan:>17.3f}" if free else f"{'-':>17}"
        lines.append(
            f"  {name:<34} {r.done:>6} {r.makespan:>9.2f}s {ideal / r.makespan:>12.3f} "
            f"{naive.makespan / r.makespan:>9.3f} {vs_floor}{_spread(outcomes, repeat)}"
        )
    if naive.cpu is not None:
        lines.append(f"  naive batch: {naive.cpu.line(naive.makespan)}")
    for name, outcomes in bots.items():
        bot = _median(outcomes)
        if bot.cpu is not None:
            lines.append(f"  {name}: {bot.cpu.line(bot.makespan)}")
        posts = sum(bot.methods[m] for m in ("sendMessage", "sendPhoto", "sendMediaGroup"))
        counted = posts + bot.methods["editMessageText"] + bot.methods["sendDocument"]
        paid = bot.extra["paid"]
        lines.append(
            f"  {name}: Bot API calls (to the last edit) {dict(sorted(bot.methods.items()))}; "
            f"{counted / scenario.jobs:.2f} counted calls a job; "
            f"429s {bot.extra['429s']:.0f}, other errors {bot.extra['errors']:.0f}; "
            f"paid messages {paid:.0f} ({paid * PaidLane.STARS_PER_MESSAGE:.1f} ★); "
            f"first message in a chat p50 {bot.extra['first_post_p50']:.2f} s"
        )
    done = sum(o.done for outcomes in bots.values() for o in outcomes)
    naive_done = sum(o.done for o in naives)
    lines.append(f"  GrsAI submits {counts['submits']} (naive {naive_done} + bots {done})")
    return lines


def _median(outcomes: Sequence[Outcome]) -> Outcome:
    """The run with the median makespan (the lower middle one of an even count)."""
    ordered = sorted(outcomes, key=lambda o: o.makespan)
    return ordered[(len(ordered) - 1) // 2]


def _spread(outcomes: Sequence[Outcome], repeat: int) -> str:
    if repeat <= 1:
        return ""
    spans = sorted(o.makespan for o in outcomes)
    return f"   {spans[0]:.2f}–{spans[-1]:.2f} s"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="one small run: N=100 U=20 L=1 C=25")
    p.add_argument("--jobs", type=int)
    p.add_argument("--users", type=int)
    p.add_argument("--latency", type=float)
    p.add_argument("--concurrency", type=int)
    p.add_argument(
        "--naive-connector-limit",
        type=int,
        help="aiohttp connection limit of the naive client (default: C, so the semaphore rules; "
        "aiohttp's own default is 100)",
    )
    p.add_argument(
        "--paid-stars",
        type=float,
        default=1000.0,
        help="TELEGRAM_PAID_BROADCAST_STARS for the paid-lane run (0: skip that run)",
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="runs of each client, interleaved (median shown)"
    )
    p.add_argument(
        "--lanes",
        default="free,paid",
        help="the bot's runs: free (Telegram's ~30 messages a second), paid, or both",
    )
    args = p.parse_args(argv)
    lanes = [lane.strip() for lane in args.lanes.split(",") if lane.strip()]
    if not lanes or set(lanes) - {"free", "paid"}:
        p.error(f"--lanes takes free, paid or free,paid, not {args.lanes!r}")
    if args.jobs is not None:
        scenarios = [
            Scenario(
                args.jobs,
                args.users or max(1, args.jobs // 5),
                args.latency if args.latency is not None else 1.0,
                args.concurrency or 50,
            )
        ]
    elif args.quick:
        scenarios = [Scenario(100, 20, 1.0, 25)]
    else:
        scenarios = [Scenario(300, 60, 2.0, 50), Scenario(2000, 400, 1.0, 200)]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(
        "makespan efficiency: real bot through Telegram vs the naive batch client, same fake GrsAI"
    )
    for scenario in scenarios:
        lines = run_scenario(
            scenario, args.naive_connector_limit, args.paid_stars, args.repeat, lanes
        )
        for line in runtime.run(lines):
            print(line, flush=True)


if __name__ == "__main__":
    main()
