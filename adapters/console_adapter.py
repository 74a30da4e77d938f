"""The console chat: type the Telegram text syntax in a terminal, see status lines and image paths."""

from __future__ import annotations

import asyncio
import getpass
import io
import logging
import sys
import threading
from collections.abc import Sequence
from typing import TextIO

from bot.adapter import StatusKind, StatusUpdate
from bot.chat import Chat
from bot.engine import Engine
from bot.jobs import Job, StoredImage, Target, UserRef
from bot.texts import t

log = logging.getLogger("drawbridge.console")

QUIT = ("/quit", "/exit", "/q")


class ConsoleAdapter:
    """One local user chatting with the engine through stdin and stdout.

    Lines are read by a daemon thread, so a blocked `readline` never holds up shutdown. At end of
    input the adapter waits for the jobs it submitted, so `echo "/imagine x" | drawbridge run
    --console` still produces its images.
    """

    platform = "console"

    def __init__(
        self,
        engine: Engine,
        *,
        lang: str = "en",
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        user: str | None = None,
    ) -> None:
        self.engine = engine
        self.chat = Chat(engine)
        self.lang = lang
        self._in = stdin or sys.stdin
        self._out = stdout or sys.stdout
        self.user = UserRef("console", user or _login())
        self.target = Target("console", chat_id="console")
        self.finished = asyncio.Event()
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def say(self, text: str) -> None:
        print(text, file=self._out, flush=True)

    async def open(self) -> None:
        self.engine.register(self)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(self._in, io.TextIOWrapper):  # (a test's StringIO has nothing to say)
            # A line that is not UTF-8 is read with U+FFFD for what it cannot decode.
            self._in.reconfigure(errors="replace")

        def read() -> None:
            for line in iter(self._in.readline, ""):
                loop.call_soon_threadsafe(self._lines.put_nowait, line)
            loop.call_soon_threadsafe(self._lines.put_nowait, None)

        threading.Thread(target=read, name="console-stdin", daemon=True).start()
        self.say(t(self.lang, "console.welcome", model=self.engine.default_model))
        self._task = asyncio.create_task(self._converse(), name="console-chat")

    async def stop_intake(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def close(self) -> None:
        return None

    async def _converse(self) -> None:
        try:
            while (line := await self._lines.get()) is not None:
                text = line.strip()
                if not text:
                    continue
                if text.lower() in QUIT:
                    if pending := self.engine.active_jobs(self.user):
                        jobs = ", ".join(job.id for job in pending)
                        self.say(t(self.lang, "console.left_pending", jobs=jobs))
                    break
                try:
                    reply = await self.chat.handle(self.user, self.target, text, lang=self.lang)
                except Exception:  # the chat goes on: one line is never the end of it
                    log.exception("console: a line could not be handled")
                    self.say(t(self.lang, "error.generic"))
                    continue
                if reply is not None:
                    self.say(reply.text)
            else:
                await self.engine.run_until_idle()  # end of input: let the last jobs finish
        finally:
            self.finished.set()

    # ---- the engine's side ----------------------------------------------------------------

    async def deliver(self, job: Job, images: Sequence[StoredImage]) -> str:
        paths = [str(image.path) for image in images]
        self.say(t(self.lang, "delivered.saved", job=job.id, paths="\n  ".join(["", *paths])))
        return "console:" + ",".join(paths)

    async def status(self, job: Job, update: StatusUpdate) -> None:
        if (
            update.kind is StatusKind.PROGRESS
            and update.percent not in (25, 50, 75)
            and (update.percent is None or update.percent % 25)
        ):
            return  # a terminal needs no more than every quarter
        self.say(update.text)

    async def notify(self, target: Target, text: str) -> None:
        self.say(text)


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "local"
