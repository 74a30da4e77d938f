"""Probes of text users send and the bot echoes back: captions, listings, refusals, commands.

What is already covered elsewhere (HTML and Markdown in Telegram captions and answers, one masked
link and mentions pinging nobody on Discord, invisible and huge prompts, huge option values,
groups' `/cmd@otherbot`) is not repeated. These probes add what a real user does next: a prompt
with two masked links or mention syntax on Discord, the bot's @username inside a longer handle,
the dashes, colons and slash a Chinese input method types, unicode digits, format braces and
exotic Unicode, an unknown command a page long, and every text of every language rendered with
hostile values. Telegram probes run the real `TelegramAdapter` against the fake Bot API (text
and captions counted in UTF-16 after HTML parsing, as Telegram does); Discord probes run the real
`DiscordAdapter` against the fake Discord plus the 2,000-character content rule
(`tests.test_discord_hostile.StrictDiscord`). A failing probe names the defect it shows.
"""

from __future__ import annotations

import re
import string
from collections.abc import AsyncIterator

import aiosqlite
import pytest

from bot.chat import Chat
from bot.jobs import Target, UserRef
from bot.texts import CATALOGS, LANGS, t
from tests import test_discord as dbase
from tests import test_telegram as tbase
from tests.conftest import Harness
from tests.fake_discord import FakeInteraction
from tests.fake_telegram import FakeTelegram, parse_html, utf16_len
from tests.test_discord_hostile import StrictDiscord
from tests.test_telegram import Rig, group_chat

# The base modules' fixtures, found by pytest under these names.
_ptb_timedelta = tbase._ptb_timedelta
tg = tbase.tg
provider = tbase.provider
rig = tbase.rig
bot = dbase.bot  # uses this module's `fake` below

SHORT = 300  # a "short" answer, in characters
CONTENT_MAX = 2000  # Discord's message content limit

# Discord markup that is still live (not backslash-escaped) in what the bot posted.
LIVE_MASKED_LINK = re.compile(r"(?<!\\)\[[^\[\]\n]*\]\(\s*<?https?://[^\s)]+>?\)")
LIVE_BOLD = re.compile(r"(?<!\\)\*\*")
LIVE_MENTION = re.compile(r"(?<!\\)<(?:@[!&]?\d|#\d|t:-?\d|/[\w-]+:\d)")


@pytest.fixture
async def fake() -> AsyncIterator[StrictDiscord]:
    server = StrictDiscord()
    await server.start()
    yield server
    await server.close()


async def prompts(h: Harness) -> list[str]:
    path = h.data_dir / "drawbridge.db"
    if not path.exists():
        return []
    async with aiosqlite.connect(path) as db:
        found = await db.execute_fetchall("SELECT prompt FROM jobs ORDER BY created_at, rowid")
    return [str(r[0]) for r in found]


def contents(fake: StrictDiscord) -> list[str]:
    """The content of every message the bot posted or edited successfully."""
    return [
        str(c.json["content"])
        for c in fake.calls
        if c.status == 200 and isinstance(c.json, dict) and c.json.get("content")
    ]


def no_content_over_the_limit(fake: StrictDiscord) -> None:
    refused = [c for c in fake.calls if c.status == 400 and isinstance(c.json, dict)]
    assert not refused, [(c.path, len(str(c.json.get("content", "")))) for c in refused]
    assert all(len(text) <= CONTENT_MAX for text in contents(fake))


async def caption_of(fake: StrictDiscord, inter: FakeInteraction) -> str:
    await dbase.wait_ended(fake, inter)
    (followup,) = fake.followups(inter.token)
    return str(followup.payload["content"])


# ---- every language's texts ------------------------------------------------------------------

HOSTILE = "{0} {job.__class__} {prompt!r:>{9}} %s %(x)s }{ <b>&amp; **@everyone**"


@pytest.mark.parametrize("lang", LANGS)
def test_every_text_renders_hostile_values_literally(lang: str) -> None:
    fields = string.Formatter()
    for key, template in CATALOGS[lang].items():
        names = {f for _, f, _, _ in fields.parse(template) if f}
        values = {name: f"<{name}:{HOSTILE}>" for name in names}
        text = t(lang, key, **values)
        for name, value in values.items():
            assert value in text, (lang, key, name, text)
        leftover = [f for _, f, _, _ in fields.parse(text.replace(HOSTILE, "")) if f]
        assert not leftover, (lang, key, leftover)


async def test_stats_for_a_chinese_admin_are_in_chinese(harness: Harness) -> None:
    engine = await harness.engine(admin_ids=frozenset({"test:boss"}))
    chat = Chat(engine)
    boss, where = UserRef("test", "boss"), Target("test", chat_id="dm-boss")
    queued = await chat.handle(boss, where, "/imagine a fox", lang="zh")
    assert queued is not None and queued.ticket is not None
    await engine.run_until_idle()
    reply = await chat.handle(boss, where, "/stats", lang="zh")
    assert reply is not None and "今天" in reply.text
    english = re.findall(r"\b(?:jobs|images|latency|failures)\b", reply.text)
    assert not english, f"/stats in Chinese still says {english} in English: {reply.text!r}"


# ---- Telegram: what is echoed ------------------------------------------------------------------

EXOTIC = [
    ("a fox {0} {job.__class__} {prompt} %s %(x)s }{", "a fox {0} {job.__class__} {prompt} %s %(x)s }{"),
    ("👩🏽‍🚀 👨‍👩‍👧‍👦 🏳️‍🌈 astronauts", "👩🏽‍🚀 👨‍👩‍👧‍👦 🏳️‍🌈 astronauts"),
    ("Z̷̢̛a̴̡͝l̸̨͠g̵̢̕o̶̧͞ fox", "Z̷̢̛a̴̡͝l̸̨͠g̵̢̕o̶̧͞ fox"),
    ("fox \u202egnos\u202c and \u200fright", "fox \u202egnos\u202c and \u200fright"),
    ("a fox\r\nin\r\rthe  snow\u2028now", "a fox in the snow now"),
    ("\\ \\\\ `code` &lt; &#65; &amp;amp; </code></pre>", "\\ \\\\ `code` &lt; &#65; &amp;amp; </code></pre>"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("prompt", "shown"), EXOTIC, ids=["format", "zwj", "zalgo", "rtl", "crlf", "escapes"]
)
async def test_an_exotic_prompt_is_shown_as_typed_in_the_caption_and_in_jobs(
    rig: Rig, tg: FakeTelegram, prompt: str, shown: str
) -> None:
    await rig.start()
    tg.message(f"/imagine {prompt}")
    (photo,) = await tg.wait_for("sendPhoto")  # the fake refuses a caption that does not parse
    caption = parse_html(photo.params["caption"])
    assert caption.startswith(shown + "\n"), caption
    assert utf16_len(caption) <= 1024
    await rig.idle()
    tg.message("/jobs")
    listing = await tg.wait_text("succeeded")
    assert listing.params.get("parse_mode") is None
    assert shown[:30] in (listing.text or ""), listing.text


async def test_a_long_emoji_prompt_keeps_as_much_as_fits_in_the_caption(
    rig: Rig, tg: FakeTelegram
) -> None:
    # 2,000 characters: 1,000 emoji (2 UTF-16 units each) and 1,000 `&` (5 characters escaped).
    await rig.start()
    tg.message("/imagine " + "🦊&" * 1000)
    (photo,) = await tg.wait_for("sendPhoto")
    caption = parse_html(photo.params["caption"])
    assert utf16_len(caption) <= 1024
    assert utf16_len(caption) > 900, (
        f"a 2,000-character prompt is cut to {caption.split(chr(10))[0]!r} in a caption that "
        f"holds 1,024 UTF-16 units: only {utf16_len(caption)} are used"
    )


async def test_the_bots_username_inside_a_longer_handle_is_kept_in_the_prompt(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    tg.message("@drawbot a poster for @drawbotfans", user=tg.user(7), chat=group_chat(tg))
    (photo,) = await tg.wait_for("sendPhoto")
    stored = await prompts(rig.harness)
    assert stored == ["a poster for @drawbotfans"], (
        f"the mention of @drawbot was cut out of @drawbotfans too: prompt {stored!r}, "
        f"caption {photo.text!r}"
    )


@pytest.mark.parametrize(
    "text",
    [
        "一只猫 ——ar 16:9",  # a Chinese input method's Shift+minus: two em dashes
        "一只猫 －－ar 16:9",  # full-width hyphen-minus
        "/imagine 一只猫 --ar 16：9",  # full-width colon
        "/imagine 一只猫 --ar １６：９",  # full-width digits and colon
    ],
    ids=["double-em-dash", "fullwidth-hyphens", "fullwidth-colon", "fullwidth-ratio"],
)
async def test_options_typed_with_a_chinese_input_method_are_options(
    rig: Rig, tg: FakeTelegram, text: str
) -> None:
    await rig.start()
    tg.message(text, user=tg.user(lang="zh"))
    found = await tg.wait_for(
        lambda c: c.method in ("sendPhoto", "sendMessage") and not tbase.is_status(c)
    )
    await rig.idle()
    calls = rig.harness.provider.calls
    got = [(c.prompt, c.aspect_ratio) for c in calls]
    assert got == [("一只猫", "16:9")], (
        f"{text!r} made {got} (answer {found[0].text!r}); expected the prompt 一只猫 at 16:9"
    )


async def test_imagine_with_a_full_width_slash_is_the_command(rig: Rig, tg: FakeTelegram) -> None:
    await rig.start()
    tg.message("／imagine 一只猫", user=tg.user(lang="zh"))
    await tg.wait_for("sendPhoto")
    stored = await prompts(rig.harness)
    assert stored == ["一只猫"], f"the full-width ／imagine became part of the prompt: {stored!r}"


async def test_unicode_digits_in_options_are_read_as_numbers(rig: Rig, tg: FakeTelegram) -> None:
    await rig.start()
    tg.message("/imagine a cat --n ２ --seed ٤٢")  # full-width 2, Arabic-Indic 42
    (album,) = await tg.wait_for("sendMediaGroup")
    (call,) = rig.harness.provider.calls
    assert (call.n, call.seed) == (2, 42)
    assert "seed 42" in parse_html(album.params["media"][0]["caption"])
    tg.message("/imagine a cat --n ²")
    reply = await tg.wait_text("--n takes a number from 1 to 10, not ²")
    assert len(reply.text or "") < SHORT


async def test_an_unknown_command_a_page_long_is_not_echoed_in_full(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    tg.message("/" + "x" * 3000 + " a cat")
    (reply,) = await tg.wait_for("sendMessage")
    assert "I don't know /x" in (reply.text or "")
    assert len(reply.text or "") < SHORT, (
        f"the unknown command came back whole: a {len(reply.text or '')}-character answer"
    )


# ---- Discord: what is echoed ---------------------------------------------------------------------

TWO_LINKS = "[a](https://a.b) **bold** [Claim Nitro](https://evil.example)"  # 61: fits an echo


async def test_two_masked_links_in_a_prompt_are_no_link_in_the_caption(
    bot: dbase.Bot, fake: StrictDiscord
) -> None:
    inter = await fake.slash("imagine", {"prompt": TWO_LINKS})
    caption = await caption_of(fake, inter)
    live = LIVE_MASKED_LINK.findall(caption) + LIVE_BOLD.findall(caption)
    assert not live, f"the caption posts live markup {live}: {caption!r}"
    no_content_over_the_limit(fake)


async def test_two_masked_links_in_a_prompt_are_no_link_in_jobs(
    bot: dbase.Bot, fake: StrictDiscord
) -> None:
    made = await fake.slash("imagine", {"prompt": "[a](http://a.b) [pay](https://e.co)"})
    job_id = await dbase.wait_ended(fake, made)
    inter = await fake.slash("jobs")
    await fake.wait_for(lambda: job_id in dbase.content(fake, inter))
    listing = dbase.content(fake, inter)
    assert not LIVE_MASKED_LINK.findall(listing), f"/jobs posts a live masked link: {listing!r}"


async def test_two_masked_links_in_a_refused_value_are_no_link(
    bot: dbase.Bot, fake: StrictDiscord
) -> None:
    inter = await fake.slash("imagine", {"prompt": "a fox", "model": TWO_LINKS})
    text = await dbase.answer(fake, inter)
    assert "There is no model called" in text
    live = LIVE_MASKED_LINK.findall(text) + LIVE_BOLD.findall(text)
    assert not live, f"the public refusal posts live markup {live}: {text!r}"


async def test_mention_syntax_in_a_prompt_is_shown_as_typed_in_the_caption(
    bot: dbase.Bot, fake: StrictDiscord
) -> None:
    prompt = (
        "a fox <@1400000000000000002> <@&1500000000000000001> <#1300000000000000001> "
        "<t:0:R> </ban:1100000000000000009>"
    )
    inter = await fake.slash("imagine", {"prompt": prompt})
    caption = await caption_of(fake, inter)
    live = LIVE_MENTION.findall(caption)
    assert not live, f"the caption renders {live} as mentions/timestamps, not as typed: {caption!r}"


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("--ar 16:9", "Please describe the image"),
        ("--ar 16:9 --ar 1:1 --n 2", "Please describe the image"),
        ("a fox --n ²", "--n takes a number from 1 to 10, not ²"),
        ("a fox --model ||x||", r"There is no model called \|\|x\|\|"),
    ],
    ids=["only-options", "repeated-options-only", "superscript-digit", "spoiler-model"],
)
async def test_odd_option_prompts_get_a_short_clear_answer(
    bot: dbase.Bot, fake: StrictDiscord, harness: Harness, prompt: str, expected: str
) -> None:
    inter = await fake.slash("imagine", {"prompt": prompt})
    text = await dbase.answer(fake, inter)
    assert expected in text and len(text) < SHORT, text
    assert harness.provider.calls == []


async def test_a_6000_character_markup_prompt_in_options_is_answered_within_limits(
    bot: dbase.Bot, fake: StrictDiscord, harness: Harness
) -> None:
    # Discord lets a string option carry 6,000 characters: the answer must still fit 2,000.
    inter = await fake.slash("imagine", {"prompt": "a fox --model " + "*_|`@" * 1200})
    text = await dbase.answer(fake, inter)
    assert "There is no model called" in text and len(text) < SHORT
    no_content_over_the_limit(fake)
