"""Probes of what users read, third round: languages, lists a refusal names, prices, cut text.

Earlier rounds (`test_texts`, `test_text_probes`, the hostile suites) cover markup and mentions
echoed back, exotic and huge prompts, a long emoji prompt's caption staying within Telegram's 1,024
UTF-16 units, and Chinese input-method options. These probes go further: every answer a Chinese
user gets on a failure path (at once, or at the end of a job, on Telegram, Discord and the console)
is in Chinese; `/help` names only commands the bot answers; a refusal that says what a model or a
chat does take names all of it; `/models` shows prices as they are charged and only the models the
chat may use; a 🔄 pressed by someone else speaks the presser's language; and a caption cut to fit
Telegram's or Discord's limit ends on a whole character as people see it (not inside an emoji).

Telegram probes run the real `TelegramAdapter` against the fake Bot API (which counts text and
captions in UTF-16 after parsing the HTML, as Telegram does); Discord probes run the real
`DiscordAdapter` against the fake Discord with its 2,000-character rule
(`tests.test_discord_hostile.StrictDiscord`); the console probe runs the real `ConsoleAdapter`.
A strict xfail asserts the behaviour users are owed; its reason names what is wrong today.
"""

from __future__ import annotations

import asyncio
import io
import re
import unicodedata
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from adapters.console_adapter import ConsoleAdapter
from bot.catalog import Catalog
from bot.chat import Chat
from bot.errors import AuthFailed, BadRequest, Expired, RateLimited, Refused, Transient
from bot.jobs import Target, UserRef
from bot.quota import Limits
from bot.texts import EN, ZH
from tests import test_discord as dbase
from tests import test_telegram as tbase
from tests.conftest import TEST_MODELS, Harness
from tests.fake_discord import FakeInteraction
from tests.fake_telegram import Call, FakeTelegram, parse_html, utf16_len
from tests.test_discord_hostile import StrictDiscord
from tests.test_telegram import GROUP, Rig, button, group_chat, is_status

# The base modules' fixtures, found by pytest under these names.
_ptb_timedelta = tbase._ptb_timedelta
tg = tbase.tg
provider = tbase.provider
rig = tbase.rig
bot = dbase.bot  # uses this module's `fake` below

ZH_USER = 77
ADMIN = 42  # tg.user()'s default id
FAMILY = (
    "👨\u200d👩\u200d👧\u200d👦"  # one emoji as people see it: seven code points, 11 UTF-16 units
)
STATUS_WORDS = re.compile(r"\b(?:queued|running|succeeded|failed|refused|cancelled)\b")
JOB_ID = re.compile(r"(?:job|任务) ([a-z0-9]{10})")


@pytest.fixture
async def fake() -> AsyncIterator[StrictDiscord]:
    server = StrictDiscord()
    await server.start()
    yield server
    await server.close()


def use_models(harness: Harness, tmp_path: Path, extra: str) -> None:
    """The test catalog plus `extra` (a MODELS_FILE's tables), for the engines started next."""
    path = tmp_path / "more-models.toml"
    path.write_text(TEST_MODELS + extra)
    harness.catalog = Catalog.load(path)


def english_words(text: str, *allowed: str) -> list[str]:
    """Latin words in `text` that are not a command, an option, or one of `allowed` (a job id,
    a model name, a value the user typed)."""
    for word in sorted(allowed, key=len, reverse=True):
        text = text.replace(word, " ")
    text = re.sub(r"/\w+|--\w+", " ", text)
    return re.findall(r"[A-Za-z]{3,}", text)


def is_cjk(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


async def reply_after(tg: FakeTelegram, seen: int, chat: int | None = None) -> Call:
    """The first answer (a sent message that is not a job's status) after the first `seen` calls."""

    def new_answer(c: Call) -> bool:
        return (
            c.method == "sendMessage"
            and not is_status(c)
            and (chat is None or c.chat_id == chat)
            and any(c is d for d in tg.calls[seen:])
        )

    (found, *_) = await tg.wait_for(new_answer)
    return found


async def say(tg: FakeTelegram, text: str, **where: Any) -> str:
    """Send `text` and return the visible text of the answer to it."""
    seen = len(tg.calls)
    msg = tg.message(text, **where)
    answer = await reply_after(tg, seen, msg["chat"]["id"])
    return answer.text or ""


def ends_on_a_whole_character(kept: str, typed: str) -> bool:
    """Whether `kept` (a cut of `typed`) stops between two characters as people see them: not
    inside a ZWJ sequence, before a skin tone, a variation selector or a combining mark."""
    if not typed.startswith(kept) or kept == typed:
        return kept == typed
    last, following = kept[-1], typed[len(kept)]
    joins = last == "\u200d" or following == "\u200d"
    modifies = following in "\ufe0e\ufe0f" or "\U0001f3fb" <= following <= "\U0001f3ff"
    return not (joins or modifies or unicodedata.combining(following))


# ---- /help and the menu --------------------------------------------------------------------


async def test_help_names_only_commands_the_bot_answers_and_both_languages_name_the_same(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    named = {lang: set(re.findall(r"(?<![\w<])/([a-z]+)", text["help"])) for lang, text in
             (("en", EN), ("zh", ZH))}  # fmt: skip
    assert named["en"] == named["zh"], named
    menu = {c["command"] for c in tg.sent("setMyCommands")[0].params["commands"]}
    assert menu <= named["en"], f"the menu offers {menu - named['en']} that /help does not name"
    for name in sorted(named["en"]):
        text = await say(tg, f"/{name}" if name != "imagine" else "/imagine")
        assert "I don't know" not in text, f"/help names /{name}, and the bot says: {text!r}"


# ---- a Chinese user hears every failure in Chinese ---------------------------------------------


async def test_a_chinese_users_refusals_at_once_are_all_in_chinese(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start(limits=Limits(user_images=3))
    user = tg.user(ZH_USER, lang="zh-CN", name="小明")
    cases = [
        ("/imagine 猫 --foo 1", ()),
        ("/imagine 猫 --n 11", ()),
        ("/imagine 猫 --ar wide", ("wide",)),
        ("/imagine 猫 --model nope", ("nope",)),
        ("/imagine 猫 --ar 7:3", ("demo",)),
        ("/imagine 猫 --size 8K", ("demo",)),
        ("/imagine 猫 --model paid --n 5", ("paid",)),
        ("/imagine 猫 --model paid --n 4", ()),  # more than the 3 left today
        ("/imagine --ar 1:1", ()),
        ("/imagine 猫 --seed", ()),
        ("/imagine " + "猫" * 2001, ()),
        ("/bogus", ()),
        ("/cancel", ()),
        ("/cancel abc", ("abc",)),
        ("/show", ()),
        ("/link WRONG", ()),
        ("/grant telegram:1 5", ()),
    ]
    for text, allowed in cases:
        answer = await say(tg, text, user=user)
        assert is_cjk(answer), (text, answer)
        leaked = english_words(answer, *allowed, "demo", "paid")
        assert not leaked, f"{text!r} answered a Chinese user with {leaked}: {answer!r}"


@pytest.mark.parametrize(
    "error",
    [
        Refused("blocked by safety system"),
        AuthFailed("invalid api key"),
        BadRequest("size not supported"),
        Expired("result url gone"),
        Transient("upstream 502"),
        RateLimited("slow down", retry_after=1800),
        RateLimited("daily quota", retry_after=8 * 3600),
    ],
    ids=["refused", "auth", "bad-request", "expired", "transient", "busy-30-min", "busy-8-h"],
)
async def test_a_chinese_users_failed_job_is_told_in_chinese_and_not_charged(
    rig: Rig, tg: FakeTelegram, provider: tbase.ShapedProvider, error: Exception
) -> None:
    provider.errors["一只猫"] = [error]
    await rig.start(retry_attempts=1)
    tg.message("/imagine 一只猫 --model paid", user=tg.user(ZH_USER, lang="zh"))
    (status,) = await tg.wait_for(is_status)
    job = button(status, "cx:")
    (end,) = await tg.wait_for(
        lambda c: c.method == "editMessageText" and "未扣费" in (c.text or "")
    )
    text = end.text or ""
    assert not english_words(text, job), text
    assert str(error) not in text  # the provider's own words never reach the user
    if isinstance(error, RateLimited):
        assert ("30 分钟" if error.retry_after == 1800 else "8 小时") in text, text
    await rig.idle()
    assert (await tbase.rows(rig.harness, "SELECT cost_usd FROM jobs")) == [(0.0,)]


async def test_a_chinese_users_cancelled_job_is_told_in_chinese(
    rig: Rig, tg: FakeTelegram, provider: tbase.ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    await rig.start(concurrency=1)
    user = tg.user(ZH_USER, lang="zh")
    tg.message("/imagine 第一只猫", user=user)
    tg.message("/imagine 第二只猫", user=user)
    statuses = await tg.wait_for(is_status, count=2)
    second = statuses[1]
    assert "排队" in (second.text or ""), second.text
    query = tg.callback(f"cx:{button(second, 'cx:')}", second.result, user=user)
    await tbase.until(lambda: query in tg.callback_answers)
    assert "已取消" in tg.callback_answers[query]["text"]
    (edit,) = await tg.wait_for(
        lambda c: c.method == "editMessageText" and "已取消" in (c.text or "")
    )
    assert not english_words(edit.text or "", button(second, "cx:")), edit.text
    provider.gate.set()


async def test_jobs_for_a_chinese_user_says_each_jobs_status_in_chinese(
    rig: Rig, tg: FakeTelegram, provider: tbase.ShapedProvider
) -> None:
    provider.errors["第二只猫"] = [Refused("no")]
    await rig.start()
    user = tg.user(ZH_USER, lang="zh")
    tg.message("/imagine 第一只猫", user=user)
    await tg.wait_for("sendPhoto")
    tg.message("/imagine 第二只猫", user=user)
    await tg.wait_for(lambda c: "服务商拒绝" in (c.text or ""))
    await rig.idle()
    listing = await say(tg, "/jobs", user=user)
    assert "你最近的任务" in listing and "第一只猫" in listing, listing
    words = STATUS_WORDS.findall(listing)
    assert not words, f"/jobs tells a Chinese user {words} in English: {listing!r}"


async def test_the_console_in_chinese_speaks_chinese_from_welcome_to_result(
    harness: Harness,
) -> None:
    engine = await harness.engine()
    out = io.StringIO()
    lines = ["/imagine 雪中的狐狸 --n 2", "/usage", "/imagine 猫 --n 0", "/help"]
    console = ConsoleAdapter(
        engine, lang="zh", stdin=io.StringIO("".join(f"{x}\n" for x in lines)), stdout=out, user="u"
    )
    await console.open()
    await console.start()
    await asyncio.wait_for(console.finished.wait(), 15)
    await console.stop_intake()
    text = out.getvalue()
    for expected in ["drawbridge 控制台", "排队第 1 位", "已保存", "今天：", "不能是 0", "本帮助"]:
        assert expected in text, (expected, text)
    paths = re.findall(r"\S+\.png", text)
    assert len(paths) == 2, text
    jobs = set(JOB_ID.findall(text))
    leaked = english_words(text, "drawbridge", "demo", "PNG", "NAME", *paths, *jobs)
    assert not leaked, f"the Chinese console says {leaked}: {text!r}"


async def test_a_chinese_discord_users_refused_job_ends_in_chinese(
    bot: dbase.Bot, fake: StrictDiscord, harness: Harness
) -> None:
    harness.provider.errors["一只猫"] = [Refused("unsafe")]
    inter = await fake.slash("imagine", {"prompt": "一只猫"}, locale="zh-CN")
    await fake.wait_for(lambda: "未扣费" in dbase.content(fake, inter))
    text = dbase.content(fake, inter)
    (job,) = JOB_ID.findall(text)
    assert "服务商拒绝" in text and not english_words(text, job), text


async def test_stats_failures_for_a_chinese_admin_are_named_in_chinese(harness: Harness) -> None:
    harness.provider.errors["a fox"] = [Refused("no")]
    harness.provider.errors["a cat"] = [RateLimited("busy", retry_after=3600)]
    engine = await harness.engine(admin_ids=frozenset({"test:boss"}), retry_attempts=1)
    chat = Chat(engine)
    boss, where = UserRef("test", "boss"), Target("test", chat_id="dm-boss")
    for prompt in ("a fox", "a cat"):
        assert (await chat.handle(boss, where, f"/imagine {prompt}", lang="zh")) is not None
    await engine.run_until_idle()
    reply = await chat.handle(boss, where, "/stats", lang="zh")
    assert reply is not None
    (failures, *_) = [line for line in reply.text.split("\n") if "失败" in line]
    leaked = english_words(failures)
    assert not leaked, f"/stats names the failures {leaked} in English: {failures!r}"


# ---- 🔄 pressed by someone else speaks the presser's language -----------------------------------


async def test_a_reroll_pressed_by_a_chinese_member_is_captioned_in_chinese(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    chat = group_chat(tg)
    tg.message("/imagine a tiny robot", user=tg.user(ADMIN, lang="en"), chat=chat)
    (photo,) = await tg.wait_for("sendPhoto")
    first = button(photo, "rr:")
    query = tg.callback(f"rr:{first}", photo.result, user=tg.user(ZH_USER, lang="zh"))
    await tbase.until(lambda: query in tg.callback_answers)
    assert "已重新提交" in tg.callback_answers[query]["text"]  # the press is answered in zh
    second = (await tg.wait_for("sendPhoto", count=2))[1]
    caption = second.text or ""
    assert "任务" in caption and "job" not in caption, (
        f"the Chinese member's own job is captioned in English: {caption!r}"
    )


async def test_a_discord_reroll_pressed_by_a_chinese_member_talks_chinese(
    bot: dbase.Bot, fake: StrictDiscord
) -> None:
    inter = await fake.slash("imagine", {"prompt": "a tiny robot"})
    job = await dbase.wait_ended(fake, inter)
    (result,) = [
        m for m in fake.messages.values() if f"drawbridge:reroll:{job}" in dbase.buttons(m)
    ]
    press = await fake.press(
        result["id"], f"drawbridge:reroll:{job}", user=dbase.BOB, locale="zh-CN"
    )
    await fake.wait_for(lambda: "✅" in dbase.content(fake, press))
    status = dbase.content(fake, press)
    (followup,) = fake.followups(press.token)
    caption = str(followup.payload["content"])
    assert "完成" in status and "任务" in caption, (
        f"the Chinese member's own job talks English: status {status!r}, caption {caption!r}"
    )


# ---- a refusal names all that a model or a chat takes ------------------------------------------


@pytest.mark.parametrize("model", ["nano-banana-2", "gemini-3.1-flash-image"])
async def test_a_ratio_refusal_names_every_ratio_the_model_takes(
    rig: Rig, tg: FakeTelegram, tmp_path: Path, model: str
) -> None:
    # The shipped model, served here by the demo provider (as a relay would be).
    use_models(rig.harness, tmp_path, f'\n[models."{model}"]\nprovider = "demo"\n')
    await rig.start()
    answer = await say(tg, f"/imagine a fox --model {model} --ar 7:3")
    assert f"{model} does not do aspect ratio 7:3" in answer, answer
    spec = rig.harness.catalog.get(model)
    assert spec is not None
    missing = [r for r in spec.aspect_ratios if not re.search(rf"(?<![\d:]){r}(?![\d:])", answer)]
    assert not missing, f"the answer hides {missing} that {model} does take: {answer!r}"


async def test_a_policy_refusal_names_every_model_the_chat_allows(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start(admin_ids=frozenset({f"telegram:{ADMIN}"}))
    chat = group_chat(tg)
    allowed = ["nano-banana-pro", "gemini-3-pro-image", "gpt-image-2", "nano-banana-2", "demo"]
    set_ = await say(tg, f"/policy models={','.join(allowed)}", chat=chat)
    assert "Policy for" in set_, set_
    answer = await say(tg, "/imagine a fox --model paid", user=tg.user(7), chat=chat)
    assert "paid is not allowed in this chat" in answer, answer
    listed = answer.split("Allowed here: ", 1)[-1].removesuffix(".").split(", ")
    assert listed == allowed, f"the member is told only {listed} are allowed: {answer!r}"


# ---- /models shows what users can use, at the price they pay ------------------------------------


async def test_models_shows_a_fraction_of_a_cent_as_the_queued_line_charges_it(
    rig: Rig, tg: FakeTelegram, tmp_path: Path
) -> None:
    use_models(rig.harness, tmp_path, '\n[models.cheap]\nprovider = "demo"\nprice_usd = 0.0004\n')
    await rig.start()
    tg.message("/imagine a fox --model cheap")
    (status,) = await tg.wait_for(is_status)
    assert "$0.0004" in (status.text or ""), status.text  # what the job says it costs
    listing = await say(tg, "/models")
    (line,) = [x for x in listing.split("\n") if x.startswith("cheap ")]
    assert "$0.0004" in line, f"/models prices cheap differently from its job: {line!r}"


async def test_models_in_a_chat_whose_policy_allows_one_model_lists_that_model(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start(admin_ids=frozenset({f"telegram:{ADMIN}"}))
    chat = group_chat(tg)
    assert "Policy for" in await say(tg, "/policy models=demo", chat=chat)
    member = tg.user(7)
    refused = await say(tg, "/imagine a fox --model paid", user=member, chat=chat)
    assert "not allowed in this chat" in refused, refused
    listing = await say(tg, "/models", user=member, chat=chat)
    listed = [line.split(" · ")[0] for line in listing.split("\n")[1:]]
    assert listed == ["demo"], f"/models offers {listed} in a chat that allows only demo"


# ---- captions cut to fit end on a whole character ----------------------------------------------


async def test_a_caption_of_exactly_1024_units_is_whole_and_one_more_is_cut_within_limits(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    tg.message("/imagine probe")
    (probe,) = await tg.wait_for("sendPhoto")
    frame = utf16_len(parse_html(probe.params["caption"])) - len("probe")  # "\ndemo · job …"
    room = 1024 - frame
    # CJK (1 unit), an emoji (2 units) and markup characters (escaped, counted once each).
    unit = "雪<&>🦊"
    fits = (unit * (room // 6 + 1))[:room]
    while utf16_len(fits) > room:
        fits = fits[:-1]
    fits = fits.rstrip() + "a" * (room - utf16_len(fits.rstrip()))
    assert utf16_len(fits) == room
    for prompt, whole in ((fits, True), (fits + "b", False)):
        seen = len(tg.sent("sendPhoto"))
        tg.message(f"/imagine {prompt}")
        photo = (await tg.wait_for("sendPhoto", count=seen + 1))[seen]
        caption = parse_html(photo.params["caption"])
        assert utf16_len(caption) <= 1024
        shown = caption.split("\n")[0]
        if whole:
            assert shown == prompt, "a caption that fits exactly was cut"
        else:
            assert shown.endswith("…") and prompt.startswith(shown[:-1]), shown[-20:]


async def test_a_telegram_caption_cut_to_1024_units_ends_on_a_whole_emoji(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    prompt = "a family portrait " + FAMILY * 150  # 1,068 code points, 1,668 UTF-16 units
    tg.message(f"/imagine {prompt}")
    (photo,) = await tg.wait_for("sendPhoto")
    caption = parse_html(photo.params["caption"])
    assert utf16_len(caption) <= 1024
    shown = caption.split("\n")[0]
    assert shown.endswith("…"), shown[-20:]
    kept = shown[:-1]
    assert ends_on_a_whole_character(kept, prompt), (
        f"the caption ends inside an emoji: {[hex(ord(c)) for c in kept[-4:]]} then …"
    )


async def test_a_discord_caption_cut_to_fit_ends_on_a_whole_emoji(
    bot: dbase.Bot, fake: StrictDiscord
) -> None:
    prompt = "a family portrait " + FAMILY * 280  # 1,978 code points: within MAX_PROMPT_CHARS
    inter: FakeInteraction = await fake.slash("imagine", {"prompt": prompt})
    await dbase.wait_ended(fake, inter)
    (followup,) = fake.followups(inter.token)
    shown = str(followup.payload["content"]).split("\n")[0]
    assert shown.endswith("…") and len(followup.payload["content"]) <= 2000
    kept = shown[:-1]
    assert ends_on_a_whole_character(kept, prompt), (
        f"the caption ends inside an emoji: {[hex(ord(c)) for c in kept[-4:]]} then …"
    )


# ---- money reads the same in both languages ------------------------------------------------------


async def test_a_price_reads_the_same_in_english_and_chinese_from_queue_to_usage(
    rig: Rig, tg: FakeTelegram, tmp_path: Path
) -> None:
    use_models(rig.harness, tmp_path, '\n[models.odd]\nprovider = "demo"\nprice_usd = 0.055\n')
    await rig.start(limits=Limits(user_usd=0.1))
    seen: dict[str, tuple[str, str, str]] = {}
    for lang, uid in (("en", 11), ("zh", 12)):
        user = tg.user(uid, lang=lang)
        tg.message("/imagine a fox --model odd", user=user)
        (status,) = await tg.wait_for(lambda c, u=uid: is_status(c) and c.chat_id == u)
        await tg.wait_for(lambda c, u=uid: c.method == "sendPhoto" and c.chat_id == u)
        await rig.idle()
        usage = await say(tg, "/usage", user=user)
        refused = await say(tg, "/imagine a fox --model odd", user=user)
        prices = [re.findall(r"\$[\d.]+", s) for s in (status.text or "", usage, refused)]
        seen[lang] = tuple(" ".join(sorted(p)) for p in prices)  # type: ignore[assignment]
    assert seen["en"] == seen["zh"], seen  # (the words around them may come in another order)
    assert seen["en"] == ("$0.055", "$0.055 $0.10", "$0.045 $0.055 $0.10"), seen


async def test_a_group_of_members_in_two_languages_each_read_their_own_jobs_lines(
    rig: Rig, tg: FakeTelegram, provider: tbase.ShapedProvider
) -> None:
    # Acks to one chat may be coalesced into one message: each line keeps its own job's language.
    provider.gate = asyncio.Event()
    await rig.start(concurrency=1)
    chat = group_chat(tg)
    tg.message("/imagine a fox", user=tg.user(11, lang="en"), chat=chat)
    tg.message("/imagine 一只猫", user=tg.user(12, lang="zh"), chat=chat)
    tg.message("/imagine a cat", user=tg.user(13, lang="en"), chat=chat)
    await tg.wait_for(lambda c: c.chat_id == GROUP and "排队" in (c.text or ""))
    provider.gate.set()
    await tg.wait_for(lambda c: c.method == "sendPhoto", count=3)
    await rig.idle()
    langs = {
        job: ("zh" if "任务" in (c.text or "") else "en")
        for c in tg.sent("sendPhoto")
        for job in JOB_ID.findall(c.text or "")
    }
    assert sorted(langs.values()) == ["en", "en", "zh"], langs
    texts = [c.text or "" for c in tg.sent(chat_id=GROUP) if c.method != "sendPhoto"]
    for line in (line for text in texts for line in text.split("\n")):
        for job in JOB_ID.findall(line):
            assert is_cjk(line) == (langs[job] == "zh"), (line, langs[job])


# ---- what a refusal repeats cannot turn the bot's own words around -----------------------------

BIDI_OPEN = "\u202a\u202b\u202d\u202e\u2066\u2067\u2068"  # embeddings, overrides, isolates
BIDI_CLOSE = "\u202c\u2069"


def bidi_depth(text: str) -> int:
    """How many direction embeddings, overrides or isolates are still open at the end of `text`."""
    depth = 0
    for char in text:
        if char in BIDI_OPEN:
            depth += 1
        elif char in BIDI_CLOSE:
            depth = max(0, depth - 1)
    return depth


async def test_a_right_to_left_override_in_an_echoed_value_is_closed_before_the_bots_words(
    rig: Rig, tg: FakeTelegram
) -> None:
    # In a group everyone reads the refusal; "\u202e" (RIGHT-TO-LEFT OVERRIDE) typed in a value
    # reverses every character after it on the line, the bot's own words included.
    await rig.start()
    answer = await say(
        tg, "/imagine a fox --model \u202edeep-fake", user=tg.user(7), chat=group_chat(tg)
    )
    assert "There is no model called" in answer and answer.endswith(". See /models."), answer
    own = answer.rindex(". See /models.")
    assert bidi_depth(answer[:own]) == 0, (
        f"the bot's '. See /models.' is shown under an open override: {answer!r}"
    )


# ---- Discord's 2,000 characters ----------------------------------------------------------------


async def test_discord_models_with_a_long_catalog_shows_whole_lines_and_says_there_is_more(
    harness: Harness, fake: StrictDiscord, tmp_path: Path
) -> None:
    ratios = '["1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "5:4", "4:5", "21:9"]'
    relay = "".join(
        f'\n[models.relay-{i:02d}-flux-kontext-pro]\nprovider = "demo"\nprice_usd = 0.04\n'
        f"aspect_ratios = {ratios}\n"
        for i in range(40)
    )
    use_models(harness, tmp_path, relay)
    b = await dbase.open_bot(harness, fake)
    try:
        inter = await fake.slash("models")
        text = await fake.wait_for(lambda: dbase.content(fake, inter))
        full = b.adapter.chat.models_text("en").split("\n")
        assert len("\n".join(full)) > 2000  # (the rig: more than one message holds)
        lines = str(text).split("\n")
        partial = [line for line in lines if line not in full and line != "…"]
        assert not partial and lines[-1] == "…", f"/models ends {lines[-1]!r} ({len(text)} chars)"
    finally:
        await dbase.close_bot(b)
