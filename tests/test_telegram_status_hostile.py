"""The status board and delivery when Telegram misbehaves, through the real adapter.

DESIGN rule 4 (every job ends, and the user always hears the outcome where the platform lets
us) and rule 6 (the send budget: acks coalesced per chat, stale progress edits dropped, results
first), probed with the Bot API errors a live bot meets: a status message the user deleted or
that can no longer be edited, a deleted forum topic, a group that kicked the bot mid-job, a chat
that does not exist, a 429 on every edit, a sendPhoto that never answers, a group that migrated
mid-job, an ack that never went out, and several jobs of one user in one chat at once.

The real `TelegramAdapter` runs against `HostileTelegram`, the project's fake Bot API with the
misbehaviour it lacks added. The rig's stop asserts that no handler raised. A note on a probe
says what it once found wrong.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiosqlite
import pytest

from bot.errors import Refused
from tests import test_telegram as base
from tests.fake_telegram import ApiError, Call, FakeTelegram, Upload
from tests.test_telegram import (
    ALICE,
    GROUP,
    Rig,
    ShapedProvider,
    button,
    group_chat,
    is_status,
    jobs,
    rows,
    until,
)

# The base module's fixtures, found by pytest under these names (`tg` is this file's own).
_ptb_timedelta = base._ptb_timedelta
provider = base.provider
rig = base.rig

MIGRATED = -1009999
KICKED = "Forbidden: bot was kicked from the group chat"
THREAD_GONE = "Bad Request: message thread not found"
CANT_EDIT = "Bad Request: message can't be edited"
CHAT_GONE = "Bad Request: chat not found"
MESSAGE_METHODS = {"sendMessage", "sendPhoto", "sendDocument", "sendMediaGroup", "editMessageText"}


class HostileTelegram(FakeTelegram):
    """The fake Bot API, with the misbehaviour of a live Telegram it does not model."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.kicked: set[int] = set()  # 403 "bot was kicked" for every call to the chat
        self.gone_chats: set[int] = set()  # 400 "chat not found"
        self.gone_threads: set[tuple[int, int]] = set()  # 400 "message thread not found"
        self.frozen: set[tuple[int, int]] = set()  # 400 "message can't be edited"
        self.holds: dict[str, asyncio.Event] = {}  # method → held until the event is set
        self.hold_count: dict[str, int] = {}  # method → how many calls to hold (else all)
        self.delays: dict[str, float] = {}  # method → seconds before it answers
        self.after_hold: dict[str, ApiError] = {}  # method → refused once, after its hold
        self.dropped: set[str] = set()  # methods whose held calls end in a 502 when let go

    def delete(self, chat_id: int, message_id: int) -> None:
        """Someone deleted the bot's message."""
        self.messages[(chat_id, message_id)]["deleted"] = True

    def delete_topic(self, chat_id: int, thread_id: int) -> None:
        """An admin deleted a forum topic: it and every message in it are gone."""
        self.gone_threads.add((chat_id, thread_id))
        for (chat, _), msg in self.messages.items():
            if chat == chat_id and msg.get("message_thread_id") == thread_id:
                msg["deleted"] = True

    def _check_failures(self, call: Call) -> None:
        chat = call.chat_id
        if isinstance(chat, int):
            if chat in self.kicked:
                raise ApiError(403, KICKED)
            if chat in self.gone_chats:
                raise ApiError(400, CHAT_GONE)
            thread = call.params.get("message_thread_id")
            if thread is not None and (chat, int(thread)) in self.gone_threads:
                raise ApiError(400, THREAD_GONE)
            message = (chat, int(call.params.get("message_id") or 0))
            if call.method == "editMessageText" and message in self.frozen:
                raise ApiError(400, CANT_EDIT)
        super()._check_failures(call)

    async def _slow(self, method: str) -> None:
        delay = self.delays.get(method)
        if delay:
            await asyncio.sleep(delay)
        gate = self.holds.get(method)
        if gate is None:
            return
        left = self.hold_count.get(method)
        if left is not None:
            if left <= 0:
                return
            self.hold_count[method] = left - 1
        await gate.wait()
        if method in self.dropped:  # the caller gave up long ago: nothing was posted
            raise ApiError(502, "Bad Gateway")
        error = self.after_hold.pop(method, None)
        if error is not None:
            raise error

    async def _m_sendMessage(self, p: dict[str, Any], f: dict[str, Upload]) -> Any:
        await self._slow("sendMessage")
        return await super()._m_sendMessage(p, f)

    async def _m_sendPhoto(self, p: dict[str, Any], f: dict[str, Upload]) -> Any:
        await self._slow("sendPhoto")
        return await super()._m_sendPhoto(p, f)

    async def _m_editMessageText(self, p: dict[str, Any], f: dict[str, Upload]) -> Any:
        await self._slow("editMessageText")
        return await super()._m_editMessageText(p, f)


@pytest.fixture
async def tg() -> AsyncIterator[HostileTelegram]:
    fake = HostileTelegram()
    await fake.start()
    try:
        yield fake
        for gate in fake.holds.values():  # let held handlers end before the server stops
            gate.set()
        await asyncio.sleep(0.05)
    finally:
        await fake.close()


# ---- helpers -----------------------------------------------------------------------------


def to_chat(tg: FakeTelegram, chat: int, methods: set[str] | None = None) -> list[Call]:
    """Every call to `chat` (refused ones too), optionally of some methods only."""
    return [c for c in tg.calls if c.chat_id == chat and (methods is None or c.method in methods)]


def about(tg: FakeTelegram, job_id: str) -> list[Call]:
    """Successful sends and edits whose text names the job (its status, in time order)."""
    return [
        c
        for c in tg.calls
        if c.ok and c.method in ("sendMessage", "editMessageText") and job_id in (c.text or "")
    ]


def shown(tg: FakeTelegram, chat: int, message_id: int) -> str:
    """What a message says now, as Telegram shows it."""
    return str(tg.messages[(chat, message_id)].get("text"))


def refused(c: Call) -> str:
    return c.error.description if c.error is not None else ""


async def quiet(tg: FakeTelegram, seconds: float) -> None:
    """Wait until no call has come for `seconds` (at most 10 s)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        last = max((c.at for c in tg.calls), default=0.0)
        if time.monotonic() - last >= seconds:
            return
        await asyncio.sleep(0.05)


async def job_row(rig: Rig) -> tuple[Any, ...]:
    (row,) = await rows(
        rig.harness, "SELECT id, status, cost_usd, delivered_at, delivery_attempts FROM jobs"
    )
    return row


# ---- a status message that is gone or frozen -------------------------------------------------


async def test_a_deleted_status_message_then_a_failure_is_told_in_a_new_message(
    rig: Rig, tg: HostileTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    provider.errors["a doomed kite"] = [Refused("no")]
    await rig.start()
    command = tg.message("a doomed kite")
    (ack,) = await tg.wait_for(is_status)
    job_id = button(ack, "cx:")
    await until(lambda: job_id in provider.started)
    tg.delete(ALICE, ack.result["message_id"])  # the user deleted the bot's status message
    provider.gate.set()
    told = await tg.wait_for(lambda c: c.method == "sendMessage" and "refused" in (c.text or ""))
    (failure,) = told
    assert f"job {job_id}" in (failure.text or "") and "not charged" in (failure.text or "")
    assert failure.params["reply_parameters"]["message_id"] == command["message_id"]
    await rig.idle()
    await quiet(tg, 0.5)
    assert (await job_row(rig))[1] == "refused"
    gone = [c for c in tg.calls if "not found" in refused(c)]
    assert len(gone) <= 2  # one progress edit and one final edit at most, never a loop
    assert about(tg, job_id)[-1] is failure  # nothing came after the last word


async def test_a_deleted_status_message_then_the_result_arrives_and_nothing_loops(
    rig: Rig, tg: HostileTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    provider.progress_steps = [10, 50]
    await rig.start()
    tg.message("a vanishing ship")
    (ack,) = await tg.wait_for(is_status)
    job_id = button(ack, "cx:")
    await until(lambda: job_id in provider.started)
    tg.delete(ALICE, ack.result["message_id"])
    provider.gate.set()
    (photo,) = await tg.wait_for("sendPhoto")
    assert button(photo, "rr:") == job_id
    await rig.idle()
    await quiet(tg, 0.6)
    row = await job_row(rig)
    assert row[1] == "succeeded" and row[3] is not None
    edits = to_chat(tg, ALICE, {"editMessageText"})
    assert len([c for c in edits if not c.ok]) <= 2
    # The result says it all: no fresh "queued" or "generating" message for a finished job.
    statuses = [c for c in tg.sent("sendMessage") if f"job {job_id}" in (c.text or "")]
    assert statuses == [ack]


async def test_a_status_message_that_cant_be_edited_gets_the_outcome_in_a_new_message(
    rig: Rig, tg: HostileTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    provider.errors["a frozen lake"] = [Refused("no")]
    await rig.start()
    tg.message("a frozen lake")
    (ack,) = await tg.wait_for(is_status)
    job_id = button(ack, "cx:")
    tg.frozen.add((ALICE, ack.result["message_id"]))
    provider.gate.set()
    (failure,) = await tg.wait_for(
        lambda c: c.method == "sendMessage" and "refused" in (c.text or "")
    )
    assert f"job {job_id}" in (failure.text or "")
    await rig.idle()
    await quiet(tg, 0.5)
    assert len([c for c in tg.calls if refused(c) == CANT_EDIT]) <= 2
    assert about(tg, job_id)[-1] is failure


async def test_a_cancel_after_the_status_message_was_deleted_is_still_told(
    rig: Rig, tg: HostileTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    await rig.start()
    tg.message("a patient heron")
    (ack,) = await tg.wait_for(is_status)
    job_id = button(ack, "cx:")
    tg.delete(ALICE, ack.result["message_id"])
    tg.message(f"/cancel {job_id}")
    await tg.wait_text(f"Job {job_id} cancelled, not charged")
    status = await tg.wait_for(
        lambda c: c.method == "sendMessage" and (c.text or "").startswith("✖ Cancelled")
    )
    assert f"job {job_id}" in (status[0].text or "")
    await rig.idle()
    assert (await job_row(rig))[1] == "cancelled"


# ---- forum topics, groups and chats that go away ------------------------------------------------


async def test_a_deleted_forum_topic_falls_back_to_the_chat(
    rig: Rig, tg: HostileTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    await rig.start()
    chat = group_chat(tg, forum=True)
    tg.message("/imagine a quiet library", user=tg.user(7), chat=chat, thread_id=77)
    (ack,) = await tg.wait_for(is_status)
    job_id = button(ack, "cx:")
    tg.delete_topic(GROUP, 77)  # an admin deleted the topic mid-job
    provider.gate.set()
    await rig.idle()
    await quiet(tg, 0.5)
    assert (await job_row(rig))[1] == "succeeded"
    tries = to_chat(tg, GROUP, {"sendPhoto"})
    assert len(tries) <= 2  # the doomed topic once, then the fallback: no retry loop
    # A deleted topic once silenced the job (the photo refused with "message thread not found",
    # the notice posted into the same dead topic); `Sender._api` posts in the chat instead.
    landed = [c for c in tg.sent("sendPhoto") if c.chat_id == GROUP]
    told = [c for c in tg.sent("sendMessage") if job_id in (c.text or "") and c is not ack]
    assert landed or told, [(c.method, refused(c)) for c in to_chat(tg, GROUP)]


async def test_kicked_from_the_group_mid_job_ends_the_job_and_stops_calling(
    rig: Rig, tg: HostileTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    provider.progress_steps = [10, 30, 50, 70, 90]
    await rig.start()
    tg.message("/imagine a stormy harbour", user=tg.user(7), chat=group_chat(tg))
    (ack,) = await tg.wait_for(is_status)
    job_id = button(ack, "cx:")
    await until(lambda: job_id in provider.started)
    tg.kicked.add(GROUP)
    kicked_at = time.monotonic()
    await asyncio.sleep(1.0)  # the job keeps generating a while: chat actions, progress
    provider.gate.set()
    await rig.idle()
    await quiet(tg, 0.6)
    row = await job_row(rig)
    assert row[1] == "succeeded" and row[3] is None  # stored, not posted: /show has it
    after = [c for c in to_chat(tg, GROUP) if c.at >= kicked_at]
    assert after and all(refused(c) == KICKED for c in after)
    photos = [c for c in after if c.method == "sendPhoto"]
    assert len(photos) == 1  # permanent: never retried
    # Once the group had answered 403 "kicked", the `upload_photo` heartbeat once went on for
    # the rest of the job; it stops at the first 403 now.
    actions = [c for c in after if c.method == "sendChatAction"]
    messages = [c for c in after if c.method in MESSAGE_METHODS]
    assert len(actions) <= 1, f"{len(actions)} chat actions to a chat that kicked the bot"
    assert len(messages) <= 3, [(c.method, c.text) for c in messages]


async def test_a_user_who_blocked_the_bot_costs_few_doomed_calls(
    rig: Rig, tg: HostileTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    provider.progress_steps = [10, 30, 50, 70, 90]
    tg.blocked.add(ALICE)
    await rig.start()
    tg.message("a lonely cloud")
    await until(lambda: len(provider.started) == 1)
    await asyncio.sleep(0.8)
    provider.gate.set()
    await rig.idle()
    await quiet(tg, 0.6)
    calls = to_chat(tg, ALICE, MESSAGE_METHODS)
    assert calls and all(c.error is not None and c.error.code == 403 for c in calls)
    assert len(calls) <= 3, [(c.method, c.text) for c in calls]


async def test_a_chat_that_does_not_exist_ends_the_job_without_a_loop(
    rig: Rig, tg: HostileTelegram
) -> None:
    tg.gone_chats.add(ALICE)
    await rig.start()
    tg.message("a ghost town")
    await until(lambda: any(c.method == "sendPhoto" for c in tg.calls))
    await rig.idle()
    await quiet(tg, 0.6)
    row = await job_row(rig)
    assert row[1] == "succeeded" and row[3] is None
    calls = to_chat(tg, ALICE)
    assert all(refused(c) == CHAT_GONE for c in calls)
    assert len([c for c in calls if c.method == "sendPhoto"]) == 1
    assert len(calls) <= 4, [c.method for c in calls]  # the ack, the photo, the last word


async def test_a_group_that_migrates_mid_job_gets_the_outcome_in_its_new_home(
    rig: Rig, tg: HostileTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    await rig.start()
    chat = group_chat(tg)
    tg.message("/imagine a moving day", user=tg.user(7), chat=chat)
    tg.message("/imagine a doomed move", user=tg.user(8), chat=chat)
    provider.errors["a doomed move"] = [Refused("no")]
    acks = await tg.wait_for(is_status, count=2)
    assert all(c.chat_id == GROUP for c in acks)
    tg.migrated[GROUP] = MIGRATED  # the group became a supergroup
    provider.gate.set()
    (photo,) = await tg.wait_for("sendPhoto")
    assert photo.chat_id == MIGRATED
    failure = await tg.wait_for(lambda c: "refused" in (c.text or "") and c.chat_id == MIGRATED)
    assert failure[0].method == "sendMessage"  # the old message stays behind in the old group
    await rig.idle()
    assert sorted(r[1] for r in await jobs(rig.harness)) == ["refused", "succeeded"]


# ---- flood limits and timeouts --------------------------------------------------------------


async def test_a_429_on_every_edit_does_not_hold_the_result_nor_loop_forever(
    rig: Rig, tg: HostileTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    provider.progress_steps = [20, 40, 60, 80]
    tg.fail("editMessageText", 429, retry_after=1, every=1)
    await rig.start()
    tg.message("a flooded valley")
    await tg.wait_for(is_status)
    await asyncio.sleep(0.5)
    released = time.monotonic()
    provider.gate.set()
    (photo,) = await tg.wait_for("sendPhoto")
    assert photo.at - released < 1.0  # results first: the edits' 429s do not hold the photo
    await rig.idle()
    assert (await job_row(rig))[3] is not None
    # The "done" edit is worth little (the photo said it): it gets a few tries, not a fight for
    # as long as the 429s last (it once went on, four edits every ~4.5 s, until `close`).
    await until(
        lambda: (
            not [
                c
                for c in tg.calls
                if c.method == "editMessageText" and c.at > time.monotonic() - 3.0
            ]
        ),
        within=25,
    )
    tries = [c for c in tg.calls if c.method == "editMessageText" and c.at >= released]
    assert len(tries) <= 3 * 4, (
        f"{len(tries)} edits after the result"
    )  # GIVE_UP_AFTER × (1 + retries)


async def test_a_progress_edit_refused_with_429_does_not_overtake_the_final_state(
    rig: Rig, tg: HostileTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    provider.progress_steps = [20, 40, 60, 80]
    provider.errors["a stormy night"] = [Refused("no")]
    tg.fail("editMessageText", 429, retry_after=1, times=1)
    tg.delays["editMessageText"] = 0.15  # edits are slow: the final one queues behind progress
    await rig.start()
    tg.message("a stormy night")
    (ack,) = await tg.wait_for(is_status)
    job_id = button(ack, "cx:")
    await until(lambda: any(c.method == "editMessageText" for c in tg.calls))
    provider.gate.set()
    await tg.wait_text("refused")
    await rig.idle()
    await quiet(tg, 0.8)
    final = about(tg, job_id)[-1]
    assert "refused" in (final.text or "")
    assert "refused" in shown(tg, ALICE, ack.result["message_id"])


async def test_a_send_photo_that_times_out_once_is_sent_again(
    rig: Rig, tg: HostileTelegram
) -> None:
    tg.holds["sendPhoto"] = asyncio.Event()  # never set: the first upload is never answered
    tg.hold_count["sendPhoto"] = 1
    tg.dropped.add("sendPhoto")
    await rig.start(deliver_timeout=1.0)
    tg.message("a slow upload")
    (photo,) = await tg.wait_for(lambda c: c.method == "sendPhoto" and c.result, within=10)
    await tg.wait_text("✅ Done")
    await rig.idle()
    row = await job_row(rig)
    assert row[1] == "succeeded" and row[3] is not None and row[4] == 1
    assert len([c for c in tg.calls if c.method == "sendPhoto"]) == 2
    assert (await rows(rig.harness, "SELECT delivery_ref FROM jobs"))[0][0] == str(
        photo.result["message_id"]
    )


async def test_a_send_photo_that_always_times_out_ends_with_the_show_hint(
    rig: Rig, tg: HostileTelegram
) -> None:
    tg.holds["sendPhoto"] = asyncio.Event()  # never answered
    tg.dropped.add("sendPhoto")
    await rig.start(deliver_timeout=0.6, deliver_attempts=2)
    tg.message("a black hole")
    (ack,) = await tg.wait_for(is_status)
    job_id = button(ack, "cx:")
    told = await tg.wait_text("could not post the picture", within=10)
    assert f"/show {job_id}" in (told.text or "")
    assert told.buttons() == []  # it succeeded (and was charged): no "try again" to pay twice
    await rig.idle()
    await quiet(tg, 0.5)
    row = await job_row(rig)
    assert row[1] == "succeeded" and row[3] is None
    assert len([c for c in tg.calls if c.method == "sendPhoto"]) == 2
    assert about(tg, job_id)[-1] is told


# ---- several jobs of one user in one chat -----------------------------------------------------


async def test_two_jobs_at_once_each_get_their_line_and_their_outcome(
    rig: Rig, tg: HostileTelegram, provider: ShapedProvider
) -> None:
    provider.gates["a red fox"] = asyncio.Event()
    provider.gates["a grey wolf"] = asyncio.Event()
    provider.errors["a grey wolf"] = [Refused("no")]
    await rig.start()
    tg.message("a red fox")
    tg.message("a grey wolf")
    await until(lambda: len(provider.started) == 2)
    await until(
        lambda: (
            {
                j
                for c in tg.sent("sendMessage")
                for j in provider.started
                if f"job {j}" in (c.text or "")
            }
            == set(provider.started)
        )
    )
    by_prompt = {c.prompt: c.job_id for c in provider.calls}
    fox, wolf = by_prompt["a red fox"], by_prompt["a grey wolf"]
    for job in (fox, wolf):  # each job's line is in exactly one ack, and names it
        carrying = [c for c in tg.sent("sendMessage") if f"job {job}" in (c.text or "")]
        assert len(carrying) == 1
        (line,) = [ln for ln in (carrying[0].text or "").split("\n") if f"job {job}" in ln]
        assert line.startswith(("🕒 Queued", "🎨 Generating"))
    provider.gates["a red fox"].set()
    provider.gates["a grey wolf"].set()
    (photo,) = await tg.wait_for("sendPhoto")
    assert button(photo, "rr:") == fox
    await tg.wait_text("refused")
    await rig.idle()
    await quiet(tg, 0.8)
    assert about(tg, wolf)[-1].text and "refused" in (about(tg, wolf)[-1].text or "")
    status = {r[0]: r[1] for r in await jobs(rig.harness)}
    assert status == {fox: "succeeded", wolf: "refused"}


async def test_three_jobs_at_once_share_an_ack_and_each_ends_right(
    rig: Rig, tg: HostileTelegram, provider: ShapedProvider
) -> None:
    prompts = ["a first kite", "a second kite", "a third kite"]
    for p in prompts:
        provider.gates[p] = asyncio.Event()
    provider.errors["a third kite"] = [Refused("no")]
    release = tg.holds["sendMessage"] = asyncio.Event()
    tg.hold_count["sendMessage"] = 1  # the first ack is slow to come back
    await rig.start()
    tg.message(prompts[0])
    await until(lambda: any(c.method == "sendMessage" for c in tg.calls))
    tg.message(prompts[1])
    tg.message(prompts[2])
    await until(lambda: len(provider.started) == 3)
    await asyncio.sleep(0.2)
    release.set()
    by_prompt = {c.prompt: c.job_id for c in provider.calls}
    first, second, third = (by_prompt[p] for p in prompts)
    await until(
        lambda: all(
            any(f"job {j}" in (c.text or "") for c in tg.sent("sendMessage"))
            for j in (first, second, third)
        )
    )
    acks = [c for c in tg.sent("sendMessage") if "job " in (c.text or "")]
    assert len(acks) == 2  # the first alone, the two that waited for it together
    shared = acks[1]
    lines = (shared.text or "").split("\n")
    assert len(lines) == 2 and f"job {second}" in lines[0] and f"job {third}" in lines[1]
    assert shared.buttons() == []
    for p in prompts:
        provider.gates[p].set()
    await tg.wait_for("sendPhoto", count=2)
    (failure,) = await tg.wait_for(lambda c: "refused" in (c.text or ""))
    assert failure.method == "sendMessage" and f"job {third}" in (failure.text or "")
    await rig.idle()
    await quiet(tg, 0.8)
    shared_id = shared.result["message_id"]
    assert not [
        c
        for c in tg.calls
        if c.method == "editMessageText" and c.params.get("message_id") == shared_id
    ]  # a shared ack is not edited
    await until(lambda: shown(tg, ALICE, acks[0].result["message_id"]).startswith("✅ Done"))
    status = {r[0]: r[1] for r in await jobs(rig.harness)}
    assert status == {first: "succeeded", second: "succeeded", third: "refused"}


# ---- an ack that never went out ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "description", "times"),
    [
        (500, "Internal Server Error", 1),
        (400, "Bad Request: PEER_ID_INVALID", 1),
        (429, None, 4),  # past the essential retries
    ],
    ids=["500-once", "400-once", "429-past-retries"],
)
async def test_a_job_whose_ack_was_never_posted_still_tells_its_outcome(
    rig: Rig,
    tg: HostileTelegram,
    provider: ShapedProvider,
    code: int,
    description: str | None,
    times: int,
) -> None:
    provider.gate = asyncio.Event()
    provider.errors["an unheard song"] = [Refused("no")]
    tg.fail("sendMessage", code, description, times=times)
    await rig.start()
    tg.message("an unheard song")
    await until(lambda: len(provider.started) == 1)
    await until(lambda: len([c for c in tg.calls if not c.ok]) >= times)
    await asyncio.sleep(0.5)  # the refused ack is over and done with
    provider.gate.set()
    told = await tg.wait_text("refused", within=10)  # a new message, or an edit of a late ack
    assert "not charged" in (told.text or "")
    await rig.idle()
    assert (await job_row(rig))[1] == "refused"


async def test_an_outcome_that_meets_a_short_telegram_outage_is_still_told(
    rig: Rig, tg: HostileTelegram, provider: ShapedProvider
) -> None:
    # Telegram answers 502 for a few seconds: the ack fails twice, then the job fails, and the
    # outcome's first try meets the outage's last 502.
    provider.gate = asyncio.Event()
    provider.errors["an unheard song"] = [Refused("no")]
    tg.fail("sendMessage", 502, "Bad Gateway", times=3)
    await rig.start()
    tg.message("an unheard song")
    await until(lambda: len([c for c in tg.calls if c.method == "sendMessage"]) == 2)
    provider.gate.set()
    await until(lambda: len([c for c in tg.calls if c.method == "sendMessage"]) == 3)
    third = [c for c in tg.calls if c.method == "sendMessage"][2]
    assert "refused" in (third.text or "") and not third.ok  # the outcome, tried once
    await rig.idle()
    # The outcome was once tried once and dropped: the line counted the ack's failed tries
    # against it. A final text gets tries of its own now.
    told = await tg.wait_text("refused", within=3)
    assert told.ok


async def test_a_failure_during_an_ack_that_is_then_refused_is_still_told(
    rig: Rig, tg: HostileTelegram, provider: ShapedProvider
) -> None:
    # The job fails while its ack is on its way; Telegram refuses that one ack with a 400.
    provider.errors["a quick refusal"] = [Refused("no")]
    release = tg.holds["sendMessage"] = asyncio.Event()
    tg.hold_count["sendMessage"] = 1
    tg.after_hold["sendMessage"] = ApiError(400, "Bad Request: PEER_ID_INVALID")
    await rig.start()
    tg.message("a quick refusal")
    await until(lambda: any(c.method == "sendMessage" for c in tg.calls))
    await rig.idle()  # the job has failed and asked to say so, while the ack is out
    release.set()
    # The ack refused with a 400 once marked the line dead while the job's failure waited to be
    # shown in it, and the failure was never posted. An outcome that came after the ack was sent
    # gets a try of its own now.
    told = await tg.wait_text("refused", within=3)
    assert told.method == "sendMessage"


async def test_an_outcome_counts_as_told_only_once_telegram_has_it(
    rig: Rig, tg: HostileTelegram, provider: ShapedProvider
) -> None:
    """`told_at` waits for the refusal's edit to come back from Telegram: killed before that,
    the restarted bot tells the user again (it was written as soon as the edit was queued)."""
    provider.gates["something forbidden"] = asyncio.Event()
    provider.errors["something forbidden"] = [Refused("no")]
    await rig.start()
    tg.message("something forbidden")
    await tg.wait_for(is_status)
    release = tg.holds["editMessageText"] = asyncio.Event()
    provider.gates["something forbidden"].set()
    await until(lambda: any(c.method == "editMessageText" for c in tg.calls))
    await rig.idle()
    told = "SELECT status, told_at IS NOT NULL FROM jobs"
    assert await rows(rig.harness, told) == [("refused", 0)]  # Telegram has not answered
    release.set()
    await tg.wait_text("refused")
    await until_row(rig, told, [("refused", 1)])


async def until_row(rig: Rig, sql: str, want: list[tuple[Any, ...]]) -> None:
    deadline = time.monotonic() + 10
    while (got := await rows(rig.harness, sql)) != want:
        assert time.monotonic() < deadline, got
        await asyncio.sleep(0.05)


async def test_a_done_edit_a_crash_cut_off_is_made_again_after_a_restart(
    rig: Rig, tg: HostileTelegram
) -> None:
    """The photo went out, but the status message's "✅ Done" edit did not (killed first): the
    row's `told_at` stays NULL and the next start edits the status message to done."""
    engine, adapter = await rig.start()
    tg.message("a red kite")
    await tg.wait_for("sendPhoto")
    await tg.wait_text("✅ Done")
    await until_row(rig, "SELECT status, told_at IS NOT NULL FROM jobs", [("succeeded", 1)])
    await rig.stop(engine, adapter)
    async with aiosqlite.connect(rig.harness.data_dir / "drawbridge.db") as db:
        await db.execute("UPDATE jobs SET told_at = NULL")  # as if the edit never went
        await db.commit()
    before = len(tg.calls)
    await rig.start()
    await until(lambda: any(c.method == "editMessageText" for c in tg.calls[before:]))
    (again,) = [c for c in tg.calls[before:] if c.method == "editMessageText"]
    assert (again.text or "").startswith("✅ Done")
    await until_row(rig, "SELECT status, told_at IS NOT NULL FROM jobs", [("succeeded", 1)])
    assert not [c for c in tg.calls[before:] if c.method in ("sendPhoto", "sendMessage")]
