"""The loopback fakes the end-to-end benches talk to, each served from a process of its own.

The fake Bot API (`tests.fake_telegram`, flood limits on) and the fake GrsAI (`tests.fake_grsai`,
stream mode) run in child processes, so that the process under test (the bot, or the naive batch
client) spends its CPU on its own work only, as it would against the real services, and so that
the bot's uploads to the one do not stretch the other's task latency (in one process, 200 photo
uploads at once made 1 s GrsAI tasks last up to 1.4 s). The parent drives the children over
pipes: push commands, wait for results, read the calls the fake Bot API recorded (with the
`time.monotonic()` at which each request arrived; that clock is system-wide, so all the
processes read the same one).

    async with FakeHost(latency=2.0) as host:
        ...  # host.tg_url, host.token, host.grsai_url, host.api_key
        t0 = await host.push_imagines([(user, chat, "a fox"), ...])
        await host.wait_results(n, within=60)
        calls = await host.calls()
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any, Self

# Methods that post a message into a chat (what a user sees arrive).
POSTS = frozenset({"sendMessage", "sendPhoto", "sendDocument", "sendMediaGroup"})
RESULTS = frozenset({"sendPhoto", "sendDocument", "sendMediaGroup"})
_GRSAI_COMMANDS = frozenset({"latency", "grsai", "task_times"})


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One Bot API call as the fake saw it: when it arrived and how it was answered."""

    method: str
    chat_id: int | None
    at: float
    ok: bool
    code: int | None  # the error code when not ok


def _grsai_shape(latency: float, progress_lines: int) -> tuple[list[int], float]:
    """`steps` and `line_delay` so that a stream task takes `latency` seconds in all."""
    lines = max(1, progress_lines)
    steps = [round(100 * i / lines) for i in range(lines)]
    return steps, latency / lines


# ---- the child process ----------------------------------------------------------------------


def _child(conn: Connection, which: str, options: dict[str, Any]) -> None:
    asyncio.run(_serve(conn, which, options))


def _timed_grsai(**kwargs: Any) -> Any:
    """The fake GrsAI, noting when each task was submitted and when its stream ended."""
    from aiohttp import web

    from tests.fake_grsai import FakeGrsai, FakeTask

    class TimedGrsai(FakeGrsai):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.times: dict[str, list[float]] = {}

        def _new_task(self, body: dict[str, Any]) -> FakeTask:
            task = super()._new_task(body)
            self.times[task.id] = [time.monotonic()]
            return task

        async def _stream(
            self, request: web.Request, task: FakeTask, shut: bool, flat_violation: bool = False
        ) -> web.StreamResponse:
            response = await super()._stream(request, task, shut, flat_violation)
            self.times[task.id].append(time.monotonic())
            return response

    return TimedGrsai(**kwargs)


async def _serve(conn: Connection, which: str, options: dict[str, Any]) -> None:
    """Serve one fake (`which`: "telegram" or "grsai") and answer the parent's commands."""
    fake: Any
    if which == "telegram":
        from tests.fake_telegram import FakeTelegram

        fake = FakeTelegram(chat_limit=options.get("chat_limit"))
        if not options.get("flood_limits", True):
            fake.overall_limit = fake.group_limit = None
    else:
        steps, delay = _grsai_shape(options["latency"], options["progress_lines"])
        fake = _timed_grsai(steps=steps, line_delay=delay)
    async with fake:
        if which == "telegram":
            conn.send({"tg_url": fake.url, "token": fake.token})
        else:
            conn.send({"grsai_url": fake.base_url, "api_key": fake.api_key})
        answer_for = _answer_telegram if which == "telegram" else _answer_grsai
        while True:
            command, args = await asyncio.to_thread(conn.recv)
            if command == "stop":
                conn.send(None)
                return
            try:
                # The CPU seconds this fake's process has used, to show what it took from a
                # machine it shares with the process under test.
                answer = (
                    time.process_time()
                    if command == "cpu"
                    else await answer_for(fake, command, args)
                )
            except Exception as exc:  # the parent re-raises it
                answer = exc
            conn.send(answer)


async def _answer_grsai(grsai: Any, command: str, args: tuple[Any, ...]) -> Any:
    if command == "latency":
        grsai.steps, grsai.line_delay = _grsai_shape(args[0], args[1])
        return None
    if command == "grsai":
        return {"submits": grsai.submits, "file_gets": grsai.file_gets}
    if command == "task_times":
        return [tuple(t) for t in grsai.times.values()]
    if command == "reset":
        grsai.times.clear()
        return None
    raise ValueError(f"unknown command {command!r}")


async def _answer_telegram(tg: Any, command: str, args: tuple[Any, ...]) -> Any:
    if command == "push":
        return _push(tg, args[0])
    if command == "wait":
        return await _wait(tg, *args)
    if command == "calls":
        return [
            CallRecord(
                c.method,
                c.chat_id if isinstance(c.chat_id, int) else None,
                c.at,
                c.ok,
                c.error.code if c.error is not None else None,
            )
            for c in tg.calls
        ]
    if command == "paid":
        return tg.paid_messages
    if command == "reset":
        tg.calls.clear()
        tg.paid_messages = 0
        return None
    raise ValueError(f"unknown command {command!r}")


def _push(tg: Any, messages: list[tuple[int, str]]) -> list[float]:
    """Push `/imagine`s, one per (user id, text), each in that user's private chat."""
    stamps = []
    for user_id, text in messages:
        user = tg.user(user_id, name=f"user{user_id}")
        stamps.append(time.monotonic())
        tg.message(text, user=user, chat=tg.chat(user_id))
    return stamps


async def _wait(tg: Any, count: int, within: float, what: str = "results") -> bool:
    """Until `count` results (photos, documents, albums) were accepted, or `within` s pass.

    `what="chats"` waits instead until `count` chats have had a message posted.
    """
    deadline = time.monotonic() + within
    seen = 0
    scanned = 0
    chats: set[object] = set()
    while True:
        calls = tg.calls
        for call in calls[scanned:]:
            # A call is recorded on arrival and answered later: count it once it is answered.
            if call.result is None and call.error is None:
                break
            scanned += 1
            if what == "results" and call.ok and call.method in RESULTS:
                seen += 1
            elif what == "chats" and call.ok and call.method in POSTS and call.chat_id not in chats:
                chats.add(call.chat_id)
                seen += 1
        if seen >= count:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)


# ---- the parent's handle --------------------------------------------------------------------


class _Child:
    """One fake in a process of its own, and the pipe to it."""

    def __init__(self, which: str, options: dict[str, Any]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, self._child_end = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(self._child_end, which, options), daemon=True)
        self.lock = asyncio.Lock()

    async def start(self) -> dict[str, str]:
        self.proc.start()
        self._child_end.close()
        info: dict[str, str] = await asyncio.wait_for(asyncio.to_thread(self.conn.recv), 30)
        return info

    async def ask(self, command: str, *args: Any) -> Any:
        async with self.lock:
            self.conn.send((command, args))
            answer = await asyncio.to_thread(self.conn.recv)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ask("stop"), 5)
        await asyncio.to_thread(self.proc.join, 5)
        if self.proc.is_alive():
            self.proc.kill()
            await asyncio.to_thread(self.proc.join, 5)
        self.conn.close()


class FakeHost:
    """Starts the fakes, each in a child process, and talks to them; an async context manager.

    The fake Bot API and the fake GrsAI live in processes of their own, as the real services
    do: a burst of uploads to the one does not hold up the other's streams.
    """

    def __init__(
        self,
        latency: float = 1.0,
        progress_lines: int = 2,
        chat_limit: tuple[float, float] | None = None,
        flood_limits: bool = True,
    ) -> None:
        self.options = {
            "latency": latency,
            "progress_lines": progress_lines,
            "chat_limit": chat_limit,
            "flood_limits": flood_limits,
        }
        self._tg = _Child("telegram", self.options)
        self._grsai = _Child("grsai", self.options)
        self.tg_url = self.token = self.grsai_url = self.api_key = ""

    async def __aenter__(self) -> Self:
        tg, grsai = await asyncio.gather(self._tg.start(), self._grsai.start())
        self.tg_url, self.token = tg["tg_url"], tg["token"]
        self.grsai_url, self.api_key = grsai["grsai_url"], grsai["api_key"]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.gather(self._tg.stop(), self._grsai.stop())

    async def _ask(self, command: str, *args: Any) -> Any:
        child = self._grsai if command in _GRSAI_COMMANDS else self._tg
        return await child.ask(command, *args)

    async def set_latency(self, latency: float, progress_lines: int = 2) -> None:
        await self._ask("latency", latency, progress_lines)

    async def push(self, messages: list[tuple[int, str]]) -> list[float]:
        """Push (user id, text) messages into private chats; the monotonic time of each push."""
        stamps: list[float] = await self._ask("push", messages)
        return stamps

    async def wait_results(self, count: int, within: float) -> bool:
        """Until `count` results were posted (False if `within` s passed first)."""
        done: bool = await self._ask("wait", count, within, "results")
        return done

    async def wait_chats(self, count: int, within: float) -> bool:
        """Until `count` chats have had a message posted (False if `within` s passed first)."""
        done: bool = await self._ask("wait", count, within, "chats")
        return done

    async def calls(self) -> list[CallRecord]:
        records: list[CallRecord] = await self._ask("calls")
        return records

    async def grsai_counts(self) -> dict[str, int]:
        counts: dict[str, int] = await self._ask("grsai")
        return counts

    async def paid_messages(self) -> int:
        """Messages sent as paid broadcasts since the last reset (0.1 Star each)."""
        count: int = await self._ask("paid")
        return count

    async def task_times(self) -> list[tuple[float, ...]]:
        """(submitted, stream ended) per GrsAI task since the last reset, monotonic seconds."""
        times: list[tuple[float, ...]] = await self._ask("task_times")
        return times

    async def reset_calls(self) -> None:
        await asyncio.gather(self._tg.ask("reset"), self._grsai.ask("reset"))

    async def cpu(self) -> tuple[float, float]:
        """CPU seconds used so far by the fake Bot API's process and by the fake GrsAI's."""
        tg, grsai = await asyncio.gather(self._tg.ask("cpu"), self._grsai.ask("cpu"))
        return float(tg), float(grsai)
