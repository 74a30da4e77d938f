"""First-reply latency: a command pushed into the fake Bot API → the bot's first message there.

    .venv/bin/python -m bench.first_reply            # 300 commands at once, then 20
    .venv/bin/python -m bench.first_reply --quick    # 60 commands at once, then 20
    .venv/bin/python -m bench.first_reply --commands 300 --latency 0

The real bot (`bench.botrig`: `open_core`, `serve`, the real `TelegramAdapter` over long polling)
runs the offline demo model with `DEMO_LATENCY` (10 s by default, so the first message in a chat
is the status message, not the picture). N users each send `/imagine` in their private chat, all
at once; the fake Bot API (in a process of its own, `bench.fakehost`) notes when each command was
pushed and when each call arrived, and the latency of a chat is the time from its command to the
first message the bot posted there. Each run starts with a warm-up (20 users send `/help`, then
1.5 s for the send budget to refill), so it measures a bot that has been running, not one that is
still opening its first connections.

Telegram lets a bot post about 30 messages a second in all, and the fake enforces it: N replies
in N chats cannot all go out in 100 ms. The table gives that bound (a leaky bucket of 30: the k-th
message no earlier than (k - 30)/30 s) beside the measured figures, and two runs that show what
the bot adds on its own: a burst small enough to fit the budget, and the same N with the flood
limits off on both sides (the fake's and the bot's own send budget), which a real bot must never
do but which isolates the bot's own latency. One more run gives the bot Telegram's paid
broadcasts (`TELEGRAM_PAID_BROADCAST_STARS`): messages past the free 30 a second go at up to 1000
a second, for 0.1 Star each.

The last rows are the parts alone (`bare_client`): no engine, no rows, no budget, just the same
long poll, each update parsed into PTB's `Update` and answered with one `sendMessage` over aiohttp
(as many connections at once as the bot's, then only 16), with the fake's flood limits off: what
the libraries and the fake Bot API cost on this machine for the burst before the bot does
anything of its own, and how much of that is opening a connection for each message.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from bench.botrig import running_bot
from bench.e2e import SEND_BURST, SEND_RATE
from bench.fakehost import POSTS, RESULTS, CallRecord, FakeHost
from bot import runtime

FIRST_USER = 5000
PAID_RATE = 1000.0  # Telegram's paid broadcasts: messages a second
WARM_USER = 90_000
WARM_COMMANDS = 20
BARE_POOL = 16  # connections for the parts alone's second run


@dataclass(frozen=True)
class Result:
    label: str
    commands: int
    latencies: list[float]  # seconds, sorted
    acks: int  # chats whose first message was a status message (else it was the result)
    floor: list[float]  # the send bound for the same ranks, sorted

    def pct(self, values: Sequence[float], p: float) -> float:
        if not values:
            return math.nan
        return values[min(len(values) - 1, math.ceil(p / 100 * len(values)) - 1)]


def send_floor(n: int, rate: float = SEND_RATE, burst: float = SEND_BURST) -> list[float]:
    """The earliest the k-th of n messages posted at once can go, under a leaky bucket."""
    return [max(0.0, (k + 1 - burst) / rate) for k in range(n)]


async def measure(
    label: str,
    commands: int,
    latency: float,
    *,
    limits: bool,
    paid_stars: float = 0.0,
    within: float = 120.0,
) -> Result:
    from adapters.telegram_budget import SendBudget

    env = {
        "DEMO_LATENCY": str(latency),
        "QUEUE_MAX": str(max(200, commands)),
        "SHUTDOWN_GRACE": "0",  # the run is over once every chat had its first reply
        "TELEGRAM_PAID_BROADCAST_STARS": str(paid_stars),
    }
    options = {} if limits else {"rate_limiter": SendBudget(overall=None, group=None)}
    gc.collect()  # no garbage from an earlier run collected during this one
    async with FakeHost(flood_limits=limits) as host, running_bot(host, env, **options):
        users, stamps, calls = await _burst(host, label, commands, within)
    if not limits:
        floor = [0.0] * commands
    elif paid_stars > 0:
        floor = send_floor(commands, PAID_RATE, PAID_RATE)  # 1000 a second past the free 30
    else:
        floor = send_floor(commands)
    return _result(label, users, stamps, calls, floor)


async def _burst(
    host: FakeHost, label: str, commands: int, within: float
) -> tuple[list[int], list[float], list[CallRecord]]:
    """Warm up, then `commands` users each send `/imagine` at once; the fake's record of it."""
    # Warm up as a bot that has been running would be: connections open, code paths taken.
    # `/help` makes no job, so nothing of the warm-up is left to compete with the run.
    warm = [WARM_USER + i for i in range(WARM_COMMANDS)]
    await host.push([(u, "/help") for u in warm])
    await host.wait_chats(len(warm), within)
    await asyncio.sleep(1.5)  # the send budget refills
    await host.reset_calls()
    users = [FIRST_USER + i for i in range(commands)]
    stamps = await host.push([(u, f"/imagine a lighthouse number {u}") for u in users])
    if not await host.wait_chats(commands, within):
        print(f"  ! {label}: not every chat had a reply within {within:g} s")
    return users, stamps, await host.calls()


async def bare_client(host: FakeHost, stop: asyncio.Event, pool: int) -> None:
    """Answer every update with one `sendMessage`: PTB's `Update` parsing and aiohttp, no more."""
    import json

    import aiohttp
    from telegram import Update

    api = f"{host.tg_url}/bot{host.token}"
    headers = {"Content-Type": "application/json"}

    async def answer(session: aiohttp.ClientSession, chat_id: int) -> None:
        body = json.dumps({"chat_id": chat_id, "text": "⏳ Queued: a lighthouse"}).encode()
        async with session.post(f"{api}/sendMessage", data=body, headers=headers) as response:
            json.loads(await response.read())

    connector = aiohttp.TCPConnector(limit=pool)
    async with aiohttp.ClientSession(connector=connector) as session:
        offset = 0
        tasks: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            poll = json.dumps({"offset": offset, "timeout": 0.2, "limit": 100}).encode()
            async with session.post(f"{api}/getUpdates", data=poll, headers=headers) as response:
                updates = json.loads(await response.read())["result"]
            for data in updates:
                update = Update.de_json(data, None)
                offset = update.update_id + 1
                if update.effective_chat is not None:
                    task = asyncio.create_task(answer(session, update.effective_chat.id))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)


async def measure_bare(
    label: str, commands: int, within: float = 120.0, pool: int | None = None
) -> Result:
    """The parts alone: the same burst answered by `bare_client`, the fake's flood limits off.

    `pool`: the connections it may hold at once (default: as many as the bot's).
    """
    from adapters.telegram_http import POOL_SIZE

    gc.collect()
    async with FakeHost(flood_limits=False) as host:
        stop = asyncio.Event()
        client = asyncio.create_task(bare_client(host, stop, pool or POOL_SIZE))
        users, stamps, calls = await _burst(host, label, commands, within)
        stop.set()
        await client
    return _result(label, users, stamps, calls, [0.0] * commands)


def _result(
    label: str,
    users: list[int],
    stamps: list[float],
    calls: Sequence[CallRecord],
    floor: list[float],
) -> Result:
    """Each chat's first message after its command, from the fake's record of the calls."""
    pushed = dict(zip(users, stamps, strict=True))
    first: dict[int, tuple[float, str]] = {}
    for call in calls:
        chat = call.chat_id
        if call.ok and call.method in POSTS and chat in pushed and chat not in first:
            first[chat] = (call.at - pushed[chat], call.method)
    latencies = sorted(at for at, _ in first.values())
    acks = sum(1 for _, method in first.values() if method not in RESULTS)
    return Result(label, len(users), latencies, acks, floor)


def table(results: Sequence[Result], latency: float) -> list[str]:
    lines = [
        f"first reply (command → the bot's first message in that chat), demo model, "
        f"DEMO_LATENCY={latency:g} s",
        f"  {'run':<44} {'p50':>8} {'p99':>8} {'max':>8}   {'bound p50/p99':>14}  first msgs",
    ]
    for r in results:
        lat = r.latencies
        bound = f"{r.pct(r.floor, 50):.2f}/{r.pct(r.floor, 99):.2f} s"
        lines.append(
            f"  {r.label:<44} {r.pct(lat, 50) * 1000:>6.0f}ms {r.pct(lat, 99) * 1000:>6.0f}ms "
            f"{(lat[-1] if lat else math.nan) * 1000:>6.0f}ms   {bound:>14}  "
            f"{len(lat)} chats, {r.acks} status / {len(lat) - r.acks} result"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="60 commands instead of 300")
    p.add_argument("--commands", type=int, help="commands at once (default 300)")
    p.add_argument("--small", type=int, default=20, help="the burst that fits the budget")
    p.add_argument("--latency", type=float, default=10.0, help="DEMO_LATENCY, seconds")
    p.add_argument(
        "--paid-stars",
        type=float,
        default=1000.0,
        help="TELEGRAM_PAID_BROADCAST_STARS for the paid-lane run (0: skip that run)",
    )
    args = p.parse_args(argv)
    n = args.commands or (60 if args.quick else 300)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    runs = [
        (f"{n} at once, flood limits on (30/s)", n, True, 0.0),
        (f"{n} at once, + paid lane ({args.paid_stars:g} ★)", n, True, args.paid_stars),
        (f"{args.small} at once, flood limits on", args.small, True, 0.0),
        (f"{n} at once, flood limits off (diagnostic)", n, False, 0.0),
    ]
    results = [
        runtime.run(measure(label, count, args.latency, limits=limits, paid_stars=stars))
        for label, count, limits, stars in runs
        if stars > 0 or "paid" not in label
    ]
    results.append(runtime.run(measure_bare(f"{n} at once, PTB + aiohttp alone, no bot", n)))
    results.append(
        runtime.run(
            measure_bare(f"{n} at once, the same, {BARE_POOL} connections", n, pool=BARE_POOL)
        )
    )
    for line in table(results, args.latency):
        print(line)


if __name__ == "__main__":
    main()
