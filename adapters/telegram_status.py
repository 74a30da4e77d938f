"""What the Telegram adapter shows while a job runs: status lines, coalesced replies, chat actions.

Each job has one status message, posted as a reply to the command and then edited in place. Only
the newest wanted text is kept, so a stale progress edit is dropped rather than queued; edits to
one message are at least `edit_interval` apart, and progress edits wait while the chat's send
budget is low. When the result is posted the status message says "done" (an edit that also waits
for room, so results go first); a job whose result comes before its ack was sent posts no ack at
all. Short answers to one user in one chat that pile up while a send is in flight go out as one
message.

Acks to one chat are coalesced: while a chat's ack waits for the send budget
(`telegram_budget.SendBudget`), or for the chat's previous ack to come back from Telegram, the
acks of further jobs in that chat join it, and it goes as one message with a line per job, in the
first one's place in the queue. So a chat never has two acks in flight at once (Telegram allows
about one message a second in a chat), and five commands sent together cost two messages, not
five, however much room the budget has (a paid lane included). A shared message is not edited
for progress nor to say "done": each job's result says that; a job that fails says so in a
message of its own. So at load a burst of jobs in one chat costs one call plus their results.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from telegram.error import BadRequest, Forbidden, RetryAfter, TelegramError

from adapters.telegram_budget import Priority, Ticket, Withdrawn
from adapters.telegram_send import Buttons, Place, Sender, fit_text, retry_seconds
from bot.texts import t

log = logging.getLogger("drawbridge.telegram")

GIVE_UP_AFTER = 3  # failed attempts to post one status message


@dataclass
class _Line:
    """One job's status message."""

    job_id: str
    place: Place
    message_id: int | None = None
    wanted: tuple[str, Buttons] | None = None
    shown: tuple[str, Buttons] | None = None
    droppable: bool = False  # the wanted text may be skipped when the chat is busy
    final: bool = False  # the wanted text is the job's last word
    delivered: bool = False  # the result is out: say done if the ack was shown, else nothing
    dead: bool = False  # the chat refuses us: stop
    failures: int = 0
    last: float = float("-inf")
    shared: bool = False  # the message carries other jobs' acks too: not edited
    ack: tuple[str, Buttons] | None = None  # the text its ack goes with
    post: _Post | None = None  # the ack on its way
    posting: asyncio.Future[bool] | None = None  # True once the ack is posted
    task: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Post:
    """One ack message on its way, for one job or for several in one chat."""

    lines: list[_Line]
    ticket: Ticket = field(default_factory=Ticket)


@dataclass
class _Outbox:
    pending: list[tuple[str, int | None]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


class ChatStatus:
    """Status lines, the replies outbox and the `upload_photo` heartbeat for one bot."""

    def __init__(
        self,
        sender: Sender,
        attach: Callable[[str, str], Awaitable[None]],
        *,
        edit_interval: float = 3.0,
        action_interval: float = 4.5,
        clock: Callable[[], float] = time.monotonic,
        told: Callable[[str], None] | None = None,
    ) -> None:
        self.sender = sender
        self.attach = attach
        # Hears a job id once its last word (an outcome, or "done") is out, or never can be.
        self.told = told
        self.edit_interval = edit_interval
        self.action_interval = action_interval
        self.clock = clock
        self._lines: dict[str, _Line] = {}
        self._outboxes: dict[tuple[int, int | None, str | None], _Outbox] = {}
        self._waiting_acks: dict[tuple[int, int | None], _Post] = {}  # per chat and topic
        self._acks_in_flight: dict[tuple[int, int | None], asyncio.Event] = {}  # set when back
        self._typing: dict[tuple[int, int | None], set[str]] = {}
        self._typing_keys: dict[str, tuple[int, int | None]] = {}
        self._typing_tasks: dict[tuple[int, int | None], asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    # ---- status lines ---------------------------------------------------------------------

    def show(
        self,
        job_id: str,
        place: Place,
        text: str,
        buttons: Buttons = (),
        *,
        droppable: bool = False,
        final: bool = False,
        initial: bool = False,
        message_id: int | None = None,
    ) -> None:
        """Want `text` on the job's status message; `initial` does not override a newer text."""
        line = self._line(job_id, place, message_id)
        if line.delivered or line.final or (initial and line.wanted is not None):
            return
        line.wanted = (fit_text(text), buttons)
        line.droppable = droppable
        line.final = final
        if final:  # the outcome gets tries of its own: failed acks do not use them up
            line.failures, line.dead = 0, False
        if line.post is not None:
            self._refresh_ack(line.post)  # an ack waiting for the budget takes the newest text
        if droppable and line.task is not None:
            return  # no hurry: the line's task takes the newest text when its pause ends
        self._kick(line)

    def delivered(
        self, job_id: str, place: Place, text: str, message_id: int | None = None
    ) -> None:
        """The result is posted: the status message says `text`, once the chat has room."""
        line = self._line(job_id, place, message_id)
        line.delivered = line.final = True
        line.droppable = False
        line.wanted = (fit_text(text), ())
        if line.post is not None:  # an ack still waiting for the budget is not worth sending
            self._drop_ack(line, line.post)
        self._kick(line)

    def _line(self, job_id: str, place: Place, message_id: int | None) -> _Line:
        line = self._lines.get(job_id)
        if line is None:
            line = self._lines[job_id] = _Line(job_id, place, message_id=message_id)
        return line

    def _kick(self, line: _Line) -> None:
        line.changed.set()
        if line.task is None:
            line.task = self._spawn(self._flush(line))

    async def _flush(self, line: _Line) -> None:
        try:
            while not line.dead:
                line.changed.clear()
                place = line.place
                if line.delivered and line.message_id is None:
                    break  # the result came before the ack went out: the result says it all
                if line.wanted is None or line.wanted == line.shown:
                    break
                if line.droppable and self._closing:
                    break
                if line.shared:
                    if not line.final or line.delivered:
                        break  # a shared ack is not edited; the result says "done"
                    line.message_id, line.shared = None, False  # a failure: a message of its own
                if line.message_id is None:
                    await self._post(line)
                    continue
                if self._closing:
                    await self._edit(line)  # the last word goes now, once
                    break
                wait = line.last + self.edit_interval - self.clock()
                deferrable = line.droppable or line.delivered
                priority = Priority.PROGRESS if line.droppable else Priority.DONE
                if wait <= 0 and deferrable and not self.sender.has_room(place.chat_id, priority):
                    # The chat is busy: results go first. A progress edit waits (and is replaced
                    # by a newer one meanwhile); the "done" edit waits for room.
                    wait = self.edit_interval
                if wait > 0:
                    await self._pause(line, wait)
                    continue
                await self._edit(line)
        finally:
            line.task = None
            if (
                line.dead
                or (line.final and line.wanted == line.shown)
                or (line.delivered and (line.message_id is None or line.shared))
            ):
                self._lines.pop(line.job_id, None)
                if line.final and self.told is not None:  # the outcome, or "done", is out
                    self.told(line.job_id)

    @staticmethod
    async def _pause(line: _Line, seconds: float) -> None:
        """Sleep until `seconds` pass or the line changes (`close` counts as a change).

        A timer that sets the line's event, not `wait_for`: that costs a task each time, and a
        busy bot pauses its status lines some ten times a job.
        """
        if line.changed.is_set():
            return
        timer = asyncio.get_running_loop().call_later(seconds, line.changed.set)
        try:
            await line.changed.wait()
        finally:
            timer.cancel()

    async def _post(self, line: _Line) -> None:
        """Post the job's first status message, or join the chat's ack that waits for budget."""
        line.ack = line.wanted
        posting = line.posting = asyncio.get_running_loop().create_future()
        key = (line.place.chat_id, line.place.thread_id)
        waiting = self._waiting_acks.get(key)
        try:
            if waiting is not None and waiting.ticket.withdraw():
                # That ack is redone at once, in its place in the queue, for this job too.
                waiting.lines.append(line)
                line.post = waiting
                for other in waiting.lines:
                    other.ack = other.wanted
            else:
                post = line.post = self._waiting_acks[key] = _Post([line])
                await self._send_post(key, post)
            posted = await posting
        finally:
            line.posting = line.post = None
        if not posted and not line.dead and not line.delivered:
            line.failures += 1
            line.dead = line.failures >= GIVE_UP_AFTER
            line.last = self.clock()
            await self._pause(line, self.edit_interval)

    @staticmethod
    def _refresh_ack(post: _Post) -> None:
        """Redo an ack that waits for the budget with the newest texts, in its place."""
        if post.ticket.withdraw():
            for line in post.lines:
                line.ack = line.wanted

    @staticmethod
    def _drop_ack(line: _Line, post: _Post) -> None:
        """The job's ack is no longer wanted: take it out unless it is on its way already."""
        if line in post.lines and post.ticket.withdraw():
            post.lines.remove(line)
            if line.posting is not None and not line.posting.done():
                line.posting.set_result(False)

    async def _send_post(self, key: tuple[int, int | None], post: _Post) -> None:
        """Send an ack, redoing it whenever it is withdrawn while it waits for the budget."""
        try:
            while post.lines:
                ahead = self._acks_in_flight.get(key)
                if ahead is not None:
                    await ahead.wait()  # meanwhile this chat's next acks join this one
                    continue
                lines = list(post.lines)
                ticket = post.ticket
                first = lines[0]
                if len(lines) == 1:
                    assert first.ack is not None
                    text, buttons = first.ack
                else:
                    text = fit_text("\n".join(line.ack[0] for line in lines if line.ack))
                    buttons = ()
                outcome = any(line.final and not line.delivered for line in lines)
                back = self._acks_in_flight[key] = asyncio.Event()
                try:
                    message = await self.sender.send_text(
                        key[0],
                        text,
                        thread_id=key[1],
                        reply_to=first.place.reply_to,
                        buttons=buttons,
                        priority=Priority.REPLY if outcome else Priority.ACK,
                        ticket=ticket,
                    )
                except Withdrawn:
                    if ticket.withdrawn:  # redone with the jobs and texts wanted now
                        post.ticket = Ticket(ticket.seq)
                    else:  # the adapter is closing
                        self._end_post(post, lines, dead=True)
                    continue
                except (Forbidden, BadRequest) as exc:
                    log.info("chat %s: status message refused: %s", key[0], exc.message)
                    self._end_post(post, lines, dead=True)
                    continue
                except TelegramError as exc:
                    log.info("chat %s: status message not sent (%s)", key[0], exc.message)
                    self._end_post(post, lines, dead=False)
                    continue
                finally:
                    self._ack_back(key, back)
                for line in lines:
                    line.message_id = message.message_id
                    line.place = Place(message.chat_id, line.place.thread_id, line.place.reply_to)
                    line.shared = len(lines) > 1
                    line.shown = line.ack
                    line.last = self.clock()
                self._end_post(post, lines, dead=False, posted=True)
                if len(lines) == 1:  # a shared message is not the job's own to edit later
                    try:
                        await self.attach(first.job_id, str(message.message_id))
                    except Exception:
                        log.warning(
                            "job=%s: status message id not recorded", first.job_id, exc_info=True
                        )
        finally:
            if self._waiting_acks.get(key) is post:
                del self._waiting_acks[key]

    def _ack_back(self, key: tuple[int, int | None], back: asyncio.Event) -> None:
        """The chat's ack in flight came back (or never went): the next one may go."""
        back.set()
        if self._acks_in_flight.get(key) is back:
            del self._acks_in_flight[key]

    @staticmethod
    def _end_post(post: _Post, lines: list[_Line], *, dead: bool, posted: bool = False) -> None:
        for line in lines:
            if line in post.lines:
                post.lines.remove(line)
            # A refused ack does not kill an outcome that came after it was sent: that text gets
            # a try of its own (and, refused too, ends the line).
            late_outcome = line.final and line.wanted != line.ack
            line.dead = line.dead or (dead and not late_outcome)
            if line.posting is not None and not line.posting.done():
                line.posting.set_result(posted)

    async def _edit(self, line: _Line) -> None:
        assert line.wanted is not None and line.message_id is not None
        wanted = line.wanted
        line.last = self.clock()
        if line.droppable:
            priority = Priority.PROGRESS
        elif line.delivered:
            priority = Priority.DONE  # the result said it already: when the budget is idle
        elif line.final:
            priority = Priority.REPLY  # the job's outcome (failed, cancelled): it must be heard
        else:
            priority = Priority.ACK
        try:
            await self.sender.edit_text(
                line.place.chat_id,
                line.message_id,
                wanted[0],
                wanted[1],
                essential=not line.droppable,
                priority=priority,
            )
        except RetryAfter as exc:
            line.last = self.clock() + retry_seconds(exc)  # a newer text may replace this one
            if not line.delivered:
                return
            # The result is out and said it all: its "done" edit gets a few tries against the
            # flood limits, not a fight for as long as they last.
            line.failures += 1
            if line.failures < GIVE_UP_AFTER:
                return
        except Forbidden:
            line.dead = True
            return
        except BadRequest as exc:
            if "not found" in exc.message.lower() or "can't be edited" in exc.message.lower():
                line.message_id = None  # deleted by someone: post a new one if it still matters
                line.shown = None
                if line.droppable:
                    line.wanted = None
                return
            log.info("job=%s: status edit refused: %s", line.job_id, exc.message)
        except TelegramError as exc:
            line.failures += 1
            log.info("job=%s: status edit failed: %s", line.job_id, exc.message)
            if line.failures < GIVE_UP_AFTER:
                return
        line.failures = 0
        line.shown = wanted

    # ---- replies --------------------------------------------------------------------------

    def reply(self, place: Place, text: str, lang: str, user: str | None = None) -> None:
        """Answer at once; answers to one user that pile up while one is sent go out together."""
        key = (place.chat_id, place.thread_id, user)
        box = self._outboxes.get(key)
        if box is None:
            box = self._outboxes[key] = _Outbox()
        box.pending.append((text, place.reply_to))
        if box.task is None:
            box.task = self._spawn(self._send_replies(key, box, place.thread_id, lang))

    async def _send_replies(
        self, key: tuple[int, int | None, str | None], box: _Outbox, thread: int | None, lang: str
    ) -> None:
        try:
            while box.pending:
                batch, box.pending = box.pending, []
                counts: dict[str, int] = {}
                for text, _ in batch:
                    counts[text] = counts.get(text, 0) + 1
                parts = [
                    text if n == 1 else t(lang, "notice.repeated", text=text, count=n)
                    for text, n in counts.items()
                ]
                try:
                    await self.sender.send_text(
                        key[0], fit_text("\n\n".join(parts)), thread_id=thread, reply_to=batch[0][1]
                    )
                except TelegramError as exc:
                    log.info("reply to chat %s not sent: %s", key[0], exc.message)
        finally:
            box.task = None
            if not box.pending:
                self._outboxes.pop(key, None)

    # ---- chat action ----------------------------------------------------------------------

    def typing(self, job_id: str, place: Place) -> None:
        """Show `upload_photo` in the chat while the job generates."""
        key = (place.chat_id, place.thread_id)
        jobs = self._typing.setdefault(key, set())
        jobs.add(job_id)
        self._typing_keys[job_id] = key
        if key not in self._typing_tasks:
            self._typing_tasks[key] = self._spawn(self._heartbeat(key, jobs))

    def stop_typing(self, job_id: str) -> None:
        key = self._typing_keys.pop(job_id, None)
        if key is not None:
            self._typing.get(key, set()).discard(job_id)

    async def _heartbeat(self, key: tuple[int, int | None], jobs: set[str]) -> None:
        try:
            while jobs:
                if self.sender.has_room(key[0]):
                    try:
                        await self.sender.chat_action(key[0], key[1])
                    except Forbidden:
                        return  # kicked or blocked: no more "uploading…" to this chat
                    except TelegramError:
                        pass
                await asyncio.sleep(self.action_interval)
        finally:
            self._typing_tasks.pop(key, None)
            if not jobs:
                self._typing.pop(key, None)

    # ---- lifecycle ------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self, grace: float = 2.0) -> None:
        """Let pending posts and final edits go out for `grace` seconds, then stop.

        Progress edits are dropped at once; "done" and failure edits go without waiting for the
        chat's budget or the edit interval.
        """
        self._closing = True
        for line in self._lines.values():
            line.changed.set()
        self._typing.clear()
        for task in list(self._typing_tasks.values()):
            task.cancel()
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
