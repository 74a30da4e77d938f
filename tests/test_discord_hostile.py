"""Hostile and unusual input through the real Discord adapter.

DESIGN rule 7, "hostile input is normal", and the README's promise: bad input gets a clear, short
answer, never a crash or a silent drop, and every job ends with a message to its user. Each probe
drives the real `DiscordAdapter` (real discord.py over the gateway and REST) against the project's
fake Discord, as `tests/test_discord.py` does; its fixtures and helpers are reused. The `bot`
fixture fails a test on any logged ERROR (what a command or button raised).

The fake is used through a subclass that adds three rules real Discord has and the fake leaves
out: message content is at most 2,000 characters (400 50035), autocomplete answers at most 25
choices of 1-100 characters, and the CDN can be made to hang.

A note on a probe says what it once found wrong.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiosqlite
import pytest
from aiohttp import web
from discord.utils import escape_markdown
from PIL import Image

from adapters.discord_parts import escape_text
from tests import test_discord as base
from tests.conftest import Harness
from tests.fake_discord import (
    CHANNEL_ID,
    GUILD_ID,
    USER,
    Call,
    FakeDiscord,
    FakeInteraction,
    HTTPError,
)
from tests.fakes import png_bytes
from tests.test_discord import BOB, answer, buttons, close_bot, content, job_of, open_bot

bot = base.bot  # the base module's fixture; it uses this module's `fake` below

SHORT = 300  # a "short" answer, in characters
FINAL = {"succeeded", "failed", "refused", "cancelled"}
CONTENT_MAX = 2000  # Discord's limit on a message's content


class StrictDiscord(FakeDiscord):
    """The project's fake, plus Discord rules it does not hold itself."""

    def __init__(self) -> None:
        super().__init__()
        self.cdn_hold: dict[str, asyncio.Event] = {}  # attachment id → held until set

    def _apply_edit(
        self, message: dict[str, Any], data: dict[str, Any], files: list[Any], limit: int
    ) -> None:
        text = data.get("content")
        if isinstance(text, str) and len(text) > CONTENT_MAX:
            raise HTTPError(
                400, 50035, "Invalid Form Body: content: Must be 2000 or fewer in length."
            )
        super()._apply_edit(message, data, files, limit)

    def _callback(self, iid: str, token: str, call: Call) -> tuple[int, Any]:
        body = call.json or {}
        if body.get("type") == 8:
            choices = (body.get("data") or {}).get("choices", [])
            if len(choices) > 25 or any(
                not 1 <= len(str(c.get("name", ""))) <= 100 or len(str(c.get("value"))) > 100
                for c in choices
            ):
                raise HTTPError(400, 50035, "Invalid Form Body: choices")
        return super()._callback(iid, token, call)

    async def _attachment(self, request: web.Request) -> web.Response:
        hold = self.cdn_hold.get(request.match_info["id"])
        if hold is not None:
            await hold.wait()
        return await super()._attachment(request)


@pytest.fixture
async def fake() -> AsyncIterator[StrictDiscord]:
    server = StrictDiscord()
    await server.start()
    yield server
    for hold in server.cdn_hold.values():
        hold.set()
    await server.close()


# ---- helpers -----------------------------------------------------------------------------


async def rows(harness: Harness) -> list[dict[str, Any]]:
    path = harness.data_dir / "drawbridge.db"
    if not path.exists():
        return []
    async with aiosqlite.connect(path) as db:
        db.row_factory = aiosqlite.Row
        found = await db.execute_fetchall("SELECT * FROM jobs ORDER BY created_at")
    return [dict(r) for r in found]


async def all_jobs_ended(harness: Harness, within: float = 5.0) -> list[dict[str, Any]]:
    """Every job row reaches a final status (none left queued or running)."""
    deadline = time.monotonic() + within
    while True:
        found = await rows(harness)
        if all(r["status"] in FINAL for r in found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError([(r["id"], r["status"]) for r in found])
        await asyncio.sleep(0.05)


def acked_in_time(fake: FakeDiscord, inter: FakeInteraction) -> None:
    """Acknowledged within Discord's three seconds, before any other call for it."""
    assert inter.ack_delay is not None and inter.ack_delay < 3, inter
    first = next(c for c in fake.calls if inter.token in c.path)
    assert first.path.endswith("/callback"), first.path


async def short_answer(
    fake: FakeDiscord, inter: FakeInteraction, *, ephemeral: bool | None, within: float = 5.0
) -> str:
    """The interaction's resolved reply: in time, short, private when the command is
    (`ephemeral=None`: either)."""
    text = str(await asyncio.wait_for(answer(fake, inter), within))
    acked_in_time(fake, inter)
    if ephemeral is not None:
        assert inter.ephemeral is ephemeral, (inter.ephemeral, text)
    assert 0 < len(text) <= SHORT, text
    return text


def content_calls(fake: FakeDiscord) -> list[Call]:
    """Every successful request that posted or edited text."""
    return [
        c
        for c in fake.calls
        if c.status == 200 and isinstance(c.json, dict) and c.json.get("content")
    ]


def pings_nobody(fake: FakeDiscord, *, except_user: str | None = None) -> None:
    """No message the bot sent may ping: allowed_mentions present, parsing nothing, and at most
    the job's own user (on a channel post that mentions them on purpose)."""
    calls = content_calls(fake)
    assert calls
    for c in calls:
        mentions = c.json.get("allowed_mentions")
        assert mentions is not None, (c.path, c.json["content"][:80])
        assert mentions.get("parse") == [], (c.path, mentions)
        assert not mentions.get("roles"), (c.path, mentions)
        users = [str(u) for u in mentions.get("users", [])]
        assert users in ([], [except_user]), (c.path, mentions)


def literal(text: str, raw: str) -> None:
    """`raw` (markup a user typed) is shown as typed: escaped, never interpreted."""
    assert raw not in text, text
    assert escape_markdown(raw) in text, text


MARKUP = ["**bold**", "__under__", "||spoiler||", "`code`", "~~strike~~", "*it*"]
MENTIONS = "@everyone @here <@1400000000000000002> <@&1500000000000000001> <#1300000000000000001>"


@pytest.mark.parametrize(
    ("typed", "posted"),
    [
        ("[a](https://a.b) [b](https://c.d)", r"\[a](https://a.b) \[b](https://c.d)"),
        ("<@1> <@&2> <#3> <t:0:R> </ban:4>", r"\<@1\> \<@&2\> \<\#3\> \<t:0:R\> \</ban:4\>"),
        ("# big", r"\# big"),
        ("-# small", r"-\# small"),
        ("> quote", r"\> quote"),
        ("- item", r"\- item"),
        ("1. item", r"1\. item"),
        (r"\*", r"\\\*"),
        ("--ar 16:9 a - b", "--ar 16:9 a - b"),  # no markup: as typed
    ],
)
def test_the_escaper_leaves_no_markup_live(typed: str, posted: str) -> None:
    assert escape_text(typed) == posted


# ---- prompts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [
        "   ",
        "\n\t \n",
        "\u200b\u200d\ufeff\u2060",  # zero-width space, joiner, BOM, word joiner
        "\u3164\u2800\u115f",  # Hangul filler, Braille blank
        "\u202e\u200f",  # direction overrides and marks
    ],
)
async def test_a_prompt_of_nothing_visible_is_refused_at_once(
    bot: base.Bot, fake: StrictDiscord, harness: Harness, prompt: str
) -> None:
    inter = await fake.slash("imagine", {"prompt": prompt})
    text = await short_answer(fake, inter, ephemeral=False)
    assert "Please describe the image" in text
    assert harness.provider.calls == [] and await rows(harness) == []


async def test_a_6000_character_prompt_is_refused_with_its_length(
    bot: base.Bot, fake: StrictDiscord, harness: Harness
) -> None:
    inter = await fake.slash("imagine", {"prompt": "a fox " * 1000})
    text = await short_answer(fake, inter, ephemeral=False)
    assert "5999 characters; the limit is 2000" in text
    assert harness.provider.calls == [] and await rows(harness) == []


@pytest.mark.parametrize("where", ["guild", "thread", "dm"])
async def test_markup_and_mentions_in_a_prompt_are_shown_literally_and_ping_no_one(
    bot: base.Bot, fake: StrictDiscord, harness: Harness, where: str
) -> None:
    channel = {
        "guild": None,
        "thread": fake.thread_channel("1300000000000000099"),
        "dm": fake.dm_channel("1300000000000000077"),
    }[where]
    prompt = " ".join(MARKUP) + " [link](https://evil.example) <:emoji:1> " + MENTIONS
    inter = await fake.slash("imagine", {"prompt": prompt}, channel=channel)
    job_id = await base.wait_ended(fake, inter)
    (followup,) = fake.followups(inter.token)
    caption = followup.payload["content"]
    for raw in MARKUP:
        literal(caption, raw)
    assert "\\[link](https://evil.example)" in caption  # no masked link
    assert harness.provider.calls[0].prompt == prompt  # the provider gets it unescaped
    listing = await fake.slash("jobs", channel=channel)
    await fake.wait_for(lambda: job_id in content(fake, listing))
    listed = content(fake, listing)  # the prompt is cut short there: what is left is escaped
    literal(listed, MARKUP[0])
    assert not any(raw in listed for raw in MARKUP), listed
    pings_nobody(fake)


async def test_a_channel_post_after_a_refused_ack_mentions_only_its_user(
    bot: base.Bot, fake: StrictDiscord
) -> None:
    """Discord refused the ack (10062): the result goes to the channel with one mention."""
    prompt = "**loud** " + MENTIONS
    await fake.slash("imagine", {"prompt": prompt}, deadline=0.0)
    (post,) = await fake.wait_for(lambda: [c for c in fake.channel_posts() if c.files])
    assert post.payload["content"].startswith(f"<@{USER['id']}> ")
    literal(post.payload["content"], "**loud**")
    await fake.wait_for(lambda: any("✅" in m["content"] for m in fake.messages.values()))
    pings_nobody(fake, except_user=USER["id"])


async def test_a_markup_heavy_prompt_at_the_length_limit_still_delivers(
    bot: base.Bot, fake: StrictDiscord, harness: Harness
) -> None:
    # The caption once escaped the prompt after cutting it to 1,500 characters, and escaping can
    # double it: 2,166 characters, which Discord rejects; the job stayed charged and its status
    # "Generating…" for good. It is cut to fit once escaped now (`escaped_prompt`), and a result
    # that cannot be posted says so on its status.
    prompt = ("**bold** " * 222).strip()
    assert len(prompt) <= 2000
    inter = await fake.slash("imagine", {"prompt": prompt, "model": "paid"})
    tries = await fake.wait_for(lambda: fake.calls_to("POST", rf"/{inter.token}$"))
    await asyncio.sleep(0.5)  # let the engine settle what it does after the first try
    assert [c.status for c in tries] == [200], [(c.status, len(c.json["content"])) for c in tries]
    assert len(tries[0].payload["content"]) <= CONTENT_MAX
    await base.wait_ended(fake, inter)


async def test_odd_characters_in_a_prompt_make_a_normal_job(
    bot: base.Bot, fake: StrictDiscord, harness: Harness
) -> None:
    prompt = "a fox\x00 in \u202esnow\u202c 🦊\U0001f3fd 狐狸 \\ \\\\ <script>alert(1)</script>"
    inter = await fake.slash("imagine", {"prompt": prompt})
    await base.wait_ended(fake, inter)
    (found,) = await all_jobs_ended(harness)
    assert found["status"] == "succeeded"
    assert "<script>" in found["prompt"]


# ---- options a modified client (or a stale command schema) sends ----------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"count": 11}, "demo makes 1 to 4 images per request, not 11"),  # beyond the Range(1, 10)
        ({"count": -3}, "not -3"),
        ({"count": 10**12}, "not 1000000000000"),
        ({"model": "paid", "count": 5}, "paid makes 1 to 4 images per request, not 5"),
        ({"seed": -1}, "The seed must be a whole number from 0 to 4294967295, not -1"),
        ({"seed": 2**32}, "not 4294967296"),
        ({"seed": 2**63}, "not 9223372036854775808"),
        ({"model": "nope"}, "There is no model called nope"),
        ({"model": "nano-banana"}, "not available on this bot"),  # catalogued, no key here
        ({"model": "m" * 3000}, "There is no model called mmm"),
        ({"size": "8K"}, "does not do size 8K"),
        ({"model": "paid", "size": "x" * 3000}, "paid does not do size xxx"),
        ({"aspect_ratio": "7:3"}, "does not do aspect ratio 7:3"),
        ({"aspect_ratio": "16:9" * 500}, "does not do aspect ratio 16:916:9"),
        ({"model": "paid", "aspect_ratio": "9:16"}, "It does: 1:1, 16:9"),
    ],
)
async def test_option_values_out_of_range_are_refused_shortly(
    bot: base.Bot,
    fake: StrictDiscord,
    harness: Harness,
    options: dict[str, Any],
    expected: str,
) -> None:
    inter = await fake.slash("imagine", {"prompt": "a fox", **options})
    text = await short_answer(fake, inter, ephemeral=False)
    assert expected in text
    assert harness.provider.calls == [] and await rows(harness) == []


@pytest.mark.parametrize(
    ("options", "raw"),
    [
        ({"model": "**@everyone**"}, "**@everyone**"),
        ({"size": "||8K||"}, "||8K||"),
        ({"aspect_ratio": "`7:3`"}, "`7:3`"),
    ],
)
async def test_a_refusal_shows_the_value_it_repeats_literally(
    bot: base.Bot, fake: StrictDiscord, options: dict[str, Any], raw: str
) -> None:
    # Refusals once repeated the typed value unescaped ("**@everyone**" in bold, "||8K||" a
    # spoiler); they are escaped as the captions are now.
    inter = await fake.slash("imagine", {"prompt": "a fox", **options})
    text = await short_answer(fake, inter, ephemeral=False)
    pings_nobody(fake)
    literal(text, raw)


async def test_count_zero_is_refused_like_minus_three(
    bot: base.Bot, fake: StrictDiscord, harness: Harness
) -> None:
    # `count or 1` once made 0 one image, where -3 and 11 were refused.
    inter = await fake.slash("imagine", {"prompt": "a fox", "count": 0})
    assert "1 to 4 images" in await base.answer(fake, inter)
    assert harness.provider.calls == []


async def test_an_option_the_command_does_not_have_is_ignored(
    bot: base.Bot, fake: StrictDiscord, harness: Harness
) -> None:
    inter = await fake.slash("imagine", {"prompt": "a fox", "style": "anime", "steps": 9999})
    await base.wait_ended(fake, inter)
    (found,) = await all_jobs_ended(harness)
    assert found["status"] == "succeeded"


async def test_text_options_in_a_discord_prompt_count_and_the_commands_own_win(
    bot: base.Bot, fake: StrictDiscord, harness: Harness
) -> None:
    # "a fox --ar 16:9 --n 2", as typed in Telegram and Midjourney, once went to the provider as
    # words. The options count now; where the command gives one too, the command's wins.
    inter = await fake.slash("imagine", {"prompt": "a fox --ar 16:9 --n 2"})
    await base.wait_ended(fake, inter)
    inter = await fake.slash(
        "imagine", {"prompt": "a cat --ar 16:9 --seed 5", "aspect_ratio": "1:1"}
    )
    await base.wait_ended(fake, inter)
    fox, cat = harness.provider.calls
    assert (fox.prompt, fox.aspect_ratio, fox.n) == ("a fox", "16:9", 2)
    assert (cat.prompt, cat.aspect_ratio, cat.seed) == ("a cat", "1:1", 5)
    inter = await fake.slash("imagine", {"prompt": "a fox --stylize 100"})
    assert "I don't know the option --stylize" in await base.answer(fake, inter)
    assert len(harness.provider.calls) == 2


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("draw", {"prompt": "a fox"}),  # a command Discord still shows but the bot no longer has
        ("imagine", {}),  # a required option missing (an outdated command schema)
    ],
)
async def test_an_interaction_the_tree_cannot_run_is_still_answered(
    bot: base.Bot,
    fake: StrictDiscord,
    caplog: pytest.LogCaptureFixture,
    name: str,
    options: dict[str, Any],
) -> None:
    # discord.py raises CommandNotFound / CommandSignatureMismatch before the command runs;
    # `_on_tree_error` once answered only an interaction already acknowledged ("The application
    # did not respond"); it answers this one too now.
    inter = await fake.slash(name, options)
    try:
        text = await short_answer(fake, inter, ephemeral=None, within=4)
        assert text
    finally:
        caplog.clear()  # one failure to show, not two: the logged ERROR is the same defect


@pytest.mark.parametrize("locale", ["xx-YY", "", "zh", "pt-BR"])
async def test_an_unknown_or_odd_locale_falls_back_to_english(
    bot: base.Bot, fake: StrictDiscord, locale: str
) -> None:
    inter = await fake.slash("usage", locale=locale)
    text = await short_answer(fake, inter, ephemeral=True)
    assert "Today" in text or "今天" in text


# ---- attachments -------------------------------------------------------------------------


def gif_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "GIF")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "ctype", "fetched", "expected"),
    [
        (b"<html>not a picture</html>", "image/png", True, "PNG, JPEG or WebP"),  # lying type
        (b"MZ\x90\x00" + b"\0" * 100, "image/jpeg", True, "PNG, JPEG or WebP"),  # an .exe
        (gif_bytes(), "image/gif", False, "PNG, JPEG or WebP"),
        (png_bytes(16, 16), None, False, "PNG, JPEG or WebP"),  # no content_type at all
        (png_bytes(16, 16), "IMAGE/PNG; charset=binary", True, None),  # odd but fine
        (b"%PDF-1.7", "application/pdf", False, "PNG, JPEG or WebP"),
    ],
)
async def test_an_attachment_that_is_not_a_usable_image_is_refused(
    bot: base.Bot,
    fake: StrictDiscord,
    harness: Harness,
    data: bytes,
    ctype: str | None,
    fetched: bool,
    expected: str | None,
) -> None:
    att = fake.add_attachment(data, "x.png", ctype)
    inter = await fake.slash("imagine", {"prompt": "use this", "model": "paid", "image": att})
    if expected is None:
        await base.wait_ended(fake, inter)
        assert harness.provider.calls[0].reference_images == (data,)
        return
    text = await short_answer(fake, inter, ephemeral=False)
    assert expected in text
    assert fake.fetched == ([att["id"]] if fetched else [])
    assert harness.provider.calls == [] and await rows(harness) == []


async def test_an_attachment_that_says_it_is_huge_is_refused_unfetched(
    bot: base.Bot, fake: StrictDiscord, harness: Harness
) -> None:
    att = fake.add_attachment(png_bytes(16, 16), "big.png", "image/png")
    att["size"] = 10**10
    inter = await fake.slash("imagine", {"prompt": "use this", "model": "paid", "image": att})
    text = await short_answer(fake, inter, ephemeral=False)
    assert "too large" in text and "20 MB" in text
    assert fake.fetched == [] and harness.provider.calls == []


async def test_an_attachment_to_a_model_without_reference_images_is_refused(
    bot: base.Bot, fake: StrictDiscord, harness: Harness
) -> None:
    harness.catalog._specs["paid"] = dataclasses.replace(
        harness.catalog._specs["paid"], reference_images=False
    )
    att = fake.add_attachment(png_bytes(16, 16), "ref.png", "image/png")
    inter = await fake.slash("imagine", {"prompt": "use this", "model": "paid", "image": att})
    text = await short_answer(fake, inter, ephemeral=False)
    assert "does not take reference images" in text
    assert harness.provider.calls == []


async def test_an_attachment_whose_cdn_url_is_gone_is_refused(
    bot: base.Bot, fake: StrictDiscord, harness: Harness
) -> None:
    att = fake.add_attachment(png_bytes(16, 16), "ref.png", "image/png")
    del fake.attachments[att["id"]]  # the CDN answers 404
    inter = await fake.slash("imagine", {"prompt": "use this", "model": "paid", "image": att})
    text = await short_answer(fake, inter, ephemeral=False)
    # Answered, though as "not a PNG, JPEG or WebP image I can read": the image was never seen.
    assert "PNG, JPEG or WebP" in text
    assert fake.fetched == [att["id"]] and harness.provider.calls == []


async def test_an_attachment_whose_cdn_hangs_is_answered_in_bounded_time(
    bot: base.Bot, fake: StrictDiscord, harness: Harness
) -> None:
    # The attachment was once read with only aiohttp's five-minute default: a stalled CDN left
    # the public "thinking…" reply hanging. The adapter's own bound is 30 s (shortened here).
    bot.adapter.reference_timeout = 0.5
    att = fake.add_attachment(png_bytes(16, 16), "ref.png", "image/png")
    fake.cdn_hold[att["id"]] = asyncio.Event()
    inter = await fake.slash("imagine", {"prompt": "use this", "model": "paid", "image": att})
    try:
        text = await short_answer(fake, inter, ephemeral=False, within=8)
        assert text
    finally:
        fake.cdn_hold[att["id"]].set()
        await asyncio.sleep(0.2)


# ---- spam ----------------------------------------------------------------------------------


async def test_twenty_imagines_at_once_are_each_answered_and_three_run(
    bot: base.Bot, fake: StrictDiscord, harness: Harness
) -> None:
    harness.provider.gate = asyncio.Event()
    inters = await asyncio.gather(
        *(fake.slash("imagine", {"prompt": f"spam {i}"}) for i in range(20))
    )
    texts = [await short_answer(fake, i, ephemeral=False) for i in inters]
    busy = [t for t in texts if "You already have 3 jobs waiting" in t]
    taken = [i for i, t in zip(inters, texts, strict=True) if "job " in t and t not in busy]
    assert (len(busy), len(taken)) == (17, 3), texts
    assert len(await rows(harness)) == 3
    harness.provider.gate.set()
    for inter in taken:
        await base.wait_ended(fake, inter)
    assert {r["status"] for r in await all_jobs_ended(harness)} == {"succeeded"}


async def test_a_reroll_button_mashed_ten_times_is_answered_ten_times(
    bot: base.Bot, fake: StrictDiscord, harness: Harness
) -> None:
    first = await fake.slash("imagine", {"prompt": "mash me"})
    job_id = await base.wait_ended(fake, first)
    (result,) = [m for m in fake.messages.values() if f"drawbridge:reroll:{job_id}" in buttons(m)]
    harness.provider.gate = asyncio.Event()
    presses = await asyncio.gather(
        *(fake.press(result["id"], f"drawbridge:reroll:{job_id}") for _ in range(10))
    )
    texts = [await short_answer(fake, p, ephemeral=False) for p in presses]
    assert sum("You already have 3 jobs waiting" in t for t in texts) == 7, texts
    harness.provider.gate.set()
    found = await all_jobs_ended(harness)
    assert len(found) == 4 and {r["status"] for r in found} == {"succeeded"}


# ---- buttons -------------------------------------------------------------------------------


async def a_result(fake: FakeDiscord) -> tuple[FakeInteraction, str, dict[str, Any]]:
    inter = await fake.slash("imagine", {"prompt": "a button host"})
    job_id = await base.wait_ended(fake, inter)
    (result,) = [m for m in fake.messages.values() if f"drawbridge:reroll:{job_id}" in buttons(m)]
    return inter, job_id, result


async def press_any(
    fake: FakeDiscord, message: dict[str, Any], custom_id: str, user: dict[str, Any] = USER
) -> FakeInteraction:
    """A click on a button `message` shows as the user's client last saw it: one `custom_id`
    button, whatever the message holds now (a stale message, or one from another version)."""
    channel = fake._channel_payload(message["channel_id"])
    button = {"type": 2, "style": 2, "label": "?", "custom_id": custom_id}
    shown = {**message, "components": [{"type": 1, "components": [button]}]}
    return await fake.interact(
        3, {"custom_id": custom_id, "component_type": 2}, user=user, channel=channel, message=shown
    )


STRANGE_BUTTONS = [
    "garbage",
    "drawbridge:upscale:abc123",  # a button an older or newer version might have posted
    "drawbridge:reroll:" + "A" * 40,  # a job id the template does not take
    "drawbridge:cancel:",
]


async def test_a_button_with_a_custom_id_the_bot_never_made_is_answered(
    bot: base.Bot, fake: StrictDiscord
) -> None:
    # A component no DynamicItem template matches (a button another version of the bot posted)
    # was once dropped by discord.py, and the user saw "This interaction failed"; the client
    # answers it now.
    _, _, result = await a_result(fake)
    presses = [await press_any(fake, result, custom_id) for custom_id in STRANGE_BUTTONS]
    await asyncio.sleep(3.1)
    unanswered = [c for c, p in zip(STRANGE_BUTTONS, presses, strict=True) if p.acked_at is None]
    assert not unanswered, f"never acknowledged: {unanswered}"


async def test_cancel_for_a_job_that_does_not_exist_is_answered_privately(
    bot: base.Bot, fake: StrictDiscord
) -> None:
    _, _, result = await a_result(fake)
    inter = await press_any(fake, result, "drawbridge:cancel:zzzzzzzzzz")
    text = await short_answer(fake, inter, ephemeral=True)
    assert "No job zzzzzzzzzz of yours" in text


async def test_reroll_of_a_job_that_does_not_exist_is_answered(
    bot: base.Bot, fake: StrictDiscord, harness: Harness
) -> None:
    _, _, result = await a_result(fake)
    inter = await press_any(fake, result, "drawbridge:reroll:zzzzzzzzzz")
    # Public (the reroll defers publicly, as a job's status would live there).
    text = await short_answer(fake, inter, ephemeral=False)
    assert "No job zzzzzzzzzz" in text
    assert len(await rows(harness)) == 1


async def test_cancel_pressed_after_the_job_ended_is_answered_privately(
    bot: base.Bot, fake: StrictDiscord, harness: Harness
) -> None:
    inter, job_id, _ = await a_result(fake)
    # A client that has not yet seen the edit that removed the button.
    late = await press_any(fake, fake.original(inter), f"drawbridge:cancel:{job_id}")
    text = await short_answer(fake, late, ephemeral=True)
    # Answered, but as "No job … of yours was found", about a job that is theirs and finished.
    assert job_id in text
    assert (await all_jobs_ended(harness))[0]["status"] == "succeeded"


async def test_another_users_cancel_in_a_thread_is_refused_and_the_job_goes_on(
    harness: Harness, fake: StrictDiscord
) -> None:
    harness.provider.gate = asyncio.Event()
    b = await open_bot(harness, fake)
    try:
        thread = fake.thread_channel("1300000000000000099")
        inter = await fake.slash("imagine", {"prompt": "mine"}, channel=thread)
        await fake.wait_for(lambda: "Generating" in content(fake, inter))
        job_id = job_of(fake, inter)
        assert inter.original_id is not None
        other = await fake.press(inter.original_id, f"drawbridge:cancel:{job_id}", user=BOB)
        text = await short_answer(fake, other, ephemeral=True)
        assert "No job" in text
        harness.provider.gate.set()
        await base.wait_ended(fake, inter)
        assert (await all_jobs_ended(harness))[0]["status"] == "succeeded"
    finally:
        await close_bot(b)


async def test_cancel_double_clicked_cancels_once_and_answers_both(
    harness: Harness, fake: StrictDiscord
) -> None:
    harness.provider.gate = asyncio.Event()
    b = await open_bot(harness, fake)
    try:
        inter = await fake.slash("imagine", {"prompt": "double"})
        await fake.wait_for(lambda: "Generating" in content(fake, inter))
        job_id = job_of(fake, inter)
        assert inter.original_id is not None
        clicks = await asyncio.gather(
            fake.press(inter.original_id, f"drawbridge:cancel:{job_id}"),
            fake.press(inter.original_id, f"drawbridge:cancel:{job_id}"),
        )
        texts = [await short_answer(fake, c, ephemeral=True) for c in clicks]
        assert sum("cancelled, not charged" in t for t in texts) == 1, texts
        await fake.wait_for(lambda: "Cancelled" in content(fake, inter))
        (found,) = await all_jobs_ended(harness)
        assert (found["status"], found["cost_usd"]) == ("cancelled", 0)
    finally:
        harness.provider.gate.set()
        await close_bot(b)


# ---- /cancel and autocomplete ---------------------------------------------------------------


@pytest.mark.parametrize("where", ["guild", "thread", "dm"])
async def test_cancel_with_a_3000_character_job_id_is_answered_shortly(
    bot: base.Bot, fake: StrictDiscord, where: str
) -> None:
    channel = {
        "guild": None,
        "thread": fake.thread_channel("1300000000000000099"),
        "dm": fake.dm_channel("1300000000000000077"),
    }[where]
    inter = await fake.slash("cancel", {"job": "x" * 3000}, channel=channel)
    text = await short_answer(fake, inter, ephemeral=True)
    assert "No job xxx" in text and "…" in text


async def test_cancel_with_markup_in_the_job_id_shows_it_literally(
    bot: base.Bot, fake: StrictDiscord
) -> None:
    # As the refusals above: "/cancel job:**x**" once answered "No job **x**" in bold.
    inter = await fake.slash("cancel", {"job": "**x**"})
    text = await short_answer(fake, inter, ephemeral=True)
    literal(text, "**x**")


@pytest.mark.parametrize("command", ["show", "link"])
@pytest.mark.parametrize("value", ["x" * 3000, "**x** ||y|| <@1400000000000000002> @everyone"])
async def test_show_and_link_with_hostile_arguments_answer_shortly_and_literally(
    bot: base.Bot, fake: StrictDiscord, harness: Harness, command: str, value: str
) -> None:
    option = "job" if command == "show" else "code"
    inter = await fake.slash(command, {option: value})
    text = await short_answer(fake, inter, ephemeral=True)
    assert "**x**" not in text and "||y||" not in text, text
    pings_nobody(fake)
    assert harness.provider.calls == []


ODD = [
    "x" * 6000,
    "",
    "\x00\x01\x7f",
    ".*[(\\",
    "\u200b\u202e",
    "<@1400000000000000002> **@everyone**",
    "🦊" * 500,
    "#",
]


@pytest.mark.parametrize("current", ODD, ids=range(len(ODD)))
async def test_autocomplete_with_odd_input_answers_within_discords_limits(
    bot: base.Bot, fake: StrictDiscord, harness: Harness, current: str
) -> None:
    # A job with a long, marked-up prompt, so the job lists have something to offer.
    made = await fake.slash("imagine", {"prompt": "**very** long " * 100})
    job_id = await base.wait_ended(fake, made)
    asks = [
        ("imagine", {"prompt": "x", "model": current}, "model"),
        ("imagine", {"prompt": "x", "model": current, "size": current}, "size"),
        ("imagine", {"prompt": "x", "size": current}, "size"),
        ("cancel", {"job": current}, "job"),
        ("show", {"job": current}, "job"),
        ("show", {"job": "#" + job_id[:4] if current == "#" else current}, "job"),
    ]
    for name, options, focused in asks:
        inter = await fake.slash(name, options, focused=focused)
        await fake.wait_for(lambda i=inter: i.choices is not None)
        choices = inter.choices
        assert inter.ack_type == 8, (name, focused)
        acked_in_time(fake, inter)
        assert isinstance(choices, list) and len(choices) <= 25
    assert [c.status for c in fake.calls if c.path.endswith("/callback")].count(400) == 0


# ---- where the bot may not post -----------------------------------------------------------


async def test_a_channel_the_bot_may_not_post_in_still_gets_its_result_through_the_token(
    bot: base.Bot, fake: StrictDiscord, harness: Harness
) -> None:
    fake.forbidden_channels.add(CHANNEL_ID)  # 50013 on every channel route
    inter = await fake.slash("imagine", {"prompt": "a locked channel"})
    await base.wait_ended(fake, inter)
    (followup,) = fake.followups(inter.token)
    assert followup.files
    assert not [c for c in fake.calls if c.path.startswith(f"/channels/{CHANNEL_ID}")]


async def test_no_channel_and_no_dm_to_post_in_still_ends_the_job(
    harness: Harness, fake: StrictDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    """Discord refused the ack, the channel says 50013 and the user's DMs are closed too."""
    caplog.set_level(logging.INFO)
    b = await open_bot(harness, fake)
    dm_id = fake.dm_channels.setdefault(USER["id"], "1300000000000000066")
    fake.forbidden_channels |= {CHANNEL_ID, dm_id}
    try:
        await fake.slash("imagine", {"prompt": "nowhere at all"}, deadline=0.0)
        await fake.wait_for(lambda: fake.calls_to("POST", rf"^/channels/{dm_id}/messages$"))
        (found,) = await all_jobs_ended(harness, within=8)
        # Nowhere to say anything: the job is "succeeded" (its images are kept for /show) and
        # the operator's log names the missing permission.
        assert found["status"] == "succeeded" and found["delivered_at"] is None
    finally:
        await close_bot(b)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and all("missing permissions in channel" in e for e in errors), errors


async def test_a_guild_without_the_bot_in_cache_is_served(
    bot: base.Bot, fake: StrictDiscord, harness: Harness
) -> None:
    other = fake.guild_channel("1300000000000000123", guild_id="1200000000000000999")
    inter = await fake.slash("imagine", {"prompt": "**elsewhere**"}, channel=other)
    await base.wait_ended(fake, inter)
    (found,) = await all_jobs_ended(harness)
    assert (found["chat_id"], found["guild_id"]) == ("1300000000000000123", "1200000000000000999")
    assert found["guild_id"] != GUILD_ID
