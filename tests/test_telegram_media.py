"""Images in and out of Telegram, probed adversarially through the real adapter and real PTB.

Results (photo, album, document, the photo limits, Telegram refusing an upload), captions at
the 1024 limit, reference images (photos, image files, albums, replies, forwards, GIFs, files too
big to fetch, downloads that fail) and the 📎 original-file button. Each probe runs the real
`TelegramAdapter` against the loopback fake Bot API, as `tests/test_telegram.py` does (its rig is
reused here); `MediaTelegram` adds what real Telegram does and the fake does not: nginx's HTML
413 for a request body over the 50 MB upload limit, and a file download that 404s.

A probe that fails is a defect a user would see; its docstring says what they see.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from PIL import Image

from bot.jobs import GeneratedImage
from bot.providers.base import GenerationRequest, JobHooks
from tests import test_telegram as base
from tests.conftest import Harness
from tests.fake_telegram import DOCUMENT_BYTES, ApiError, Call, FakeTelegram, parse_html, utf16_len
from tests.fakes import png_bytes
from tests.test_telegram import ALICE, GROUP, Rig, ShapedProvider, button, group_chat, jobs, rows

_ptb_timedelta = base._ptb_timedelta
rig = base.rig

NGINX_413 = (
    b"<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n"
    b"<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
FINAL = {"succeeded", "failed", "refused", "cancelled"}


# ---- the rig: a fake with two more of real Telegram's behaviours, a provider of chosen bytes --


class MediaTelegram(FakeTelegram):
    """The fake Bot API, plus: a request body over the upload limit is refused by the front end
    with nginx's HTML 413 (as api.telegram.org does), `html_413` refuses the next calls of a
    method that way, and `missing_downloads` makes `/file/...` answer 404 for those file ids."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.html_413: dict[str, int] = {}
        self.missing_downloads: set[str] = set()

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        too_big = (request.content_length or 0) > DOCUMENT_BYTES + 1_000_000
        if too_big or self.html_413.get(method, 0) > 0:
            await request.read()  # (nginx takes the body in before it answers)
            if not too_big:
                self.html_413[method] -= 1
            call = Call(method, {}, {}, time.monotonic())
            call.error = ApiError(413, "Request Entity Too Large")
            self.calls.append(call)
            return web.Response(status=413, body=NGINX_413, content_type="text/html")
        return await super()._api(request)

    async def _download(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["path"].rsplit("/", 1)[-1].split(".")[0]
        if file_id in self.missing_downloads:
            raise web.HTTPNotFound()
        return await super()._download(request)


class MediaProvider(ShapedProvider):
    """The shaped provider, with results of exactly these bytes when `images` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[bytes, int, int]] | None = None

    async def generate(self, request: GenerationRequest, hooks: JobHooks) -> list[GeneratedImage]:
        made = await super().generate(request, hooks)
        if self.images is None:
            return made
        return [GeneratedImage(d, "image/png", w, h) for d, w, h in self.images[: len(made)]]


@pytest.fixture
async def tg() -> AsyncIterator[MediaTelegram]:
    async with MediaTelegram() as fake:
        yield fake


@pytest.fixture
def provider(harness: Harness) -> MediaProvider:
    harness.provider = MediaProvider()
    return harness.provider


# ---- helpers -----------------------------------------------------------------------------


def image(width: int, height: int, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """A real image of that size; mode "1" keeps huge sizes small and quick to encode."""
    buf = io.BytesIO()
    color: Any = 1 if mode == "1" else (30, 140, 90)
    Image.new(mode, (width, height), color).save(buf, fmt)
    return buf.getvalue()


def padded(total: int, width: int = 64, height: int = 64) -> bytes:
    """A valid PNG of `width`×`height` padded after its end to exactly `total` bytes."""
    data = image(width, height)
    return data + b"\0" * (total - len(data))


def texts(tg: FakeTelegram) -> list[str]:
    """Every visible text the bot sent or edited, and every button-press answer."""
    out = [c.text or "" for c in tg.sent() if c.method.startswith(("send", "edit"))]
    out += [str(a.get("text") or "") for a in tg.callback_answers.values()]
    return out


def said(tg: FakeTelegram, needle: str) -> bool:
    return any(needle in text for text in texts(tg))


async def settle(tg: FakeTelegram, seconds: float = 0.3) -> None:
    """Let every pushed update be taken and answered (for probes of what was *not* sent)."""
    await base.until(lambda: not tg._updates, within=5)
    await asyncio.sleep(seconds)


def doc_message(
    tg: FakeTelegram, data: bytes, name: str, mime: str | None, *, size: bool = True
) -> dict[str, Any]:
    doc = {**tg.add_file(data), "file_name": name}
    if mime is not None:
        doc["mime_type"] = mime
    if not size:
        doc.pop("file_size")  # optional in the Bot API's Document
    return doc


def failed(tg: FakeTelegram, method: str) -> list[Call]:
    return [c for c in tg.calls if c.method == method and not c.ok]


async def stored_bytes(h: Harness, job_id: str) -> list[bytes]:
    paths = await rows(h, f"SELECT path FROM images WHERE job_id = '{job_id}' ORDER BY idx")
    return [(h.data_dir / p).read_bytes() for (p,) in paths]


def is_buttons_message(c: Call) -> bool:
    return c.method == "sendMessage" and any(d.startswith("of:") for _, d in c.buttons())


# ---- results: photo, album, document -------------------------------------------------------


async def test_one_image_is_a_photo_with_the_escaped_caption_and_both_buttons(
    rig: Rig, tg: MediaTelegram
) -> None:
    await rig.start()
    msg = tg.message("/imagine a fox & a <hound> --seed 3")
    (photo,) = await tg.wait_for("sendPhoto")
    job_id = button(photo, "rr:")
    assert photo.params["parse_mode"] == "HTML"
    assert photo.text == f"a fox & a <hound>\ndemo · seed 3 · job {job_id}"
    assert [d for _, d in photo.buttons()] == [f"rr:{job_id}", f"of:{job_id}"]
    assert photo.params["reply_parameters"]["message_id"] == msg["message_id"]
    upload = photo.files["photo"]
    assert upload.filename == f"{job_id}-1.png"
    assert [upload.data] == await stored_bytes(rig.harness, job_id)
    assert not tg.sent("sendDocument") and not tg.sent("sendMediaGroup")


@pytest.mark.parametrize("n", [2, 3, 4])
async def test_several_images_are_one_album_and_the_buttons_follow_in_one_message(
    rig: Rig, tg: MediaTelegram, n: int
) -> None:
    await rig.start()
    msg = tg.message(f"/imagine a <b>bold</b> fox --n {n}")
    (album,) = await tg.wait_for("sendMediaGroup")
    media = album.params["media"]
    assert [m["type"] for m in media] == ["photo"] * n and len(album.files) == n
    assert parse_html(media[0]["caption"]).startswith("a <b>bold</b> fox\n")
    assert all("caption" not in m for m in media[1:])
    assert "reply_markup" not in album.params  # an album carries no buttons
    assert album.params["reply_parameters"]["message_id"] == msg["message_id"]
    (buttons,) = await tg.wait_for(is_buttons_message)
    job_id = button(buttons, "of:")
    assert [d for _, d in buttons.buttons()] == [f"rr:{job_id}", f"of:{job_id}"]
    assert buttons.params["reply_parameters"]["message_id"] == album.result[0]["message_id"]
    assert f"{n} images" in (buttons.text or "")
    await rig.idle()
    assert not tg.sent("sendPhoto") and not tg.sent("sendDocument")
    assert len([c for c in tg.sent("sendMessage") if c.buttons() and "rr:" in str(c.params)]) == 1
    ((_, status, _, _, _, ref, _),) = await jobs(rig.harness)
    ids = [m["message_id"] for m in album.result] + [buttons.result["message_id"]]
    assert status == "succeeded" and ref == ",".join(map(str, ids))


def made(spec: tuple[str, int, int]) -> tuple[bytes, int, int]:
    """("wxh", w, h): an image of that size; ("bytes", n, 0): a 64×64 PNG padded to n bytes."""
    kind, a, b = spec
    if kind == "bytes":
        return padded(a), 64, 64
    return image(a, b, mode="1" if a * b > 4_000_000 else "RGB"), a, b


@pytest.mark.parametrize(
    "spec",
    [("wxh", 2000, 100), ("wxh", 5000, 5000), ("bytes", 10_000_000, 0)],
    ids=["ratio-20", "sides-10000", "bytes-10MB"],
)
async def test_an_image_right_at_the_photo_limits_is_still_a_photo(
    rig: Rig, tg: MediaTelegram, provider: MediaProvider, spec: tuple[str, int, int]
) -> None:
    data, width, height = made(spec)
    provider.images = [(data, width, height)]
    await rig.start()
    tg.message("a picture at the limit")
    (photo,) = await tg.wait_for("sendPhoto")
    assert photo.files["photo"].data == data
    assert not [c for c in tg.calls if c.method in ("sendPhoto", "sendDocument") and not c.ok]


@pytest.mark.parametrize(
    "spec",
    [("wxh", 2100, 100), ("wxh", 5001, 5000), ("bytes", 10_000_001, 0)],
    ids=["ratio-21", "sides-10001", "bytes-10MB+1"],
)
async def test_an_image_past_a_photo_limit_is_a_document_with_caption_and_buttons(
    rig: Rig, tg: MediaTelegram, provider: MediaProvider, spec: tuple[str, int, int]
) -> None:
    data, width, height = made(spec)
    provider.images = [(data, width, height)]
    await rig.start()
    tg.message("a picture past the limit")
    (doc,) = await tg.wait_for("sendDocument")
    assert not [c for c in tg.calls if c.method == "sendPhoto"]  # not even tried
    job_id = button(doc, "rr:")
    assert doc.files["document"].data == data
    assert doc.files["document"].filename == f"{job_id}-1.png"
    assert doc.text == f"a picture past the limit\ndemo · job {job_id}"
    assert button(doc, "of:") == job_id
    await rig.idle()
    ((_, status, *_),) = await jobs(rig.harness)
    assert status == "succeeded"


async def test_an_album_with_one_image_past_the_limits_goes_as_documents_then_the_buttons(
    rig: Rig, tg: MediaTelegram, provider: MediaProvider
) -> None:
    wide = image(2100, 100)
    provider.images = [(image(64, 64), 64, 64), (wide, 2100, 100)]
    await rig.start()
    tg.message("/imagine two pictures --n 2")
    (album,) = await tg.wait_for("sendMediaGroup")
    assert [m["type"] for m in album.params["media"]] == ["document", "document"]
    assert "two pictures" in parse_html(album.params["media"][0]["caption"])
    (buttons,) = await tg.wait_for(is_buttons_message)
    assert buttons.params["reply_parameters"]["message_id"] == album.result[0]["message_id"]
    assert not [c for c in tg.calls if c.method == "sendPhoto" or not c.ok]


async def test_a_result_over_telegrams_50mb_upload_limit_ends_clearly_without_a_loop(
    rig: Rig, tg: MediaTelegram, provider: MediaProvider
) -> None:
    provider.images = [(padded(DOCUMENT_BYTES + 5_000_000), 64, 64)]
    engine, _ = await rig.start()
    tg.message("an enormous picture")
    await base.until(lambda: said(tg, "could not post"), within=30)
    await engine.run_until_idle()
    attempts = [c for c in tg.calls if c.method in ("sendPhoto", "sendDocument")]
    assert attempts and all(c.error is not None and c.error.code == 413 for c in attempts)
    assert not [c for c in attempts if c.method == "sendPhoto"]  # over 10 MB: no photo try
    assert len(attempts) <= engine.config.deliver_attempts  # bounded, not a loop
    ((job_id, status, *_),) = await jobs(rig.harness)
    assert status in FINAL and said(tg, job_id)


@pytest.mark.parametrize(
    "refusal",
    [
        "Bad Request: PHOTO_INVALID_DIMENSIONS",
        "Bad Request: IMAGE_PROCESS_FAILED",
        "Bad Request: PHOTO_SAVE_FILE_INVALID",
    ],
)
async def test_a_photo_telegram_refuses_goes_again_as_a_document_with_caption_and_buttons(
    rig: Rig, tg: MediaTelegram, refusal: str
) -> None:
    tg.fail("sendPhoto", 400, refusal)
    await rig.start()
    tg.message("a refused picture")
    (doc,) = await tg.wait_for("sendDocument")
    job_id = button(doc, "rr:")
    assert button(doc, "of:") == job_id
    assert doc.text == f"a refused picture\ndemo · job {job_id}"
    assert [doc.files["document"].data] == await stored_bytes(rig.harness, job_id)
    await rig.idle()
    assert len(failed(tg, "sendPhoto")) == 1 and len(tg.sent("sendDocument")) == 1
    ((_, status, *_),) = await jobs(rig.harness)
    assert status == "succeeded"


@pytest.mark.parametrize(
    "refusal",
    [
        "Bad Request: PHOTO_INVALID_DIMENSIONS",
        'Bad Request: failed to send message #2 with the error message "IMAGE_PROCESS_FAILED"',
    ],
    ids=["plain", "at-item"],
)
async def test_an_album_telegram_refuses_as_photos_goes_again_as_documents(
    rig: Rig, tg: MediaTelegram, refusal: str
) -> None:
    tg.fail("sendMediaGroup", 400, refusal)
    await rig.start()
    tg.message("/imagine three pictures --n 3")
    (album,) = await tg.wait_for("sendMediaGroup")
    assert [m["type"] for m in album.params["media"]] == ["document"] * 3
    await tg.wait_for(is_buttons_message)
    await rig.idle()
    ((_, status, *_),) = await jobs(rig.harness)
    assert status == "succeeded"


async def test_a_photo_upload_refused_with_413_goes_again_as_a_document(
    rig: Rig, tg: MediaTelegram
) -> None:
    """Telegram's front end refusing a photo upload with 413 Request Entity Too Large (an HTML
    page, no JSON) is not treated as "not as a photo": PTB raises `NetworkError` for a 413, not
    `BadRequest`, so `Delivery._single` (adapters/telegram_delivery.py, `except BadRequest`) never
    tries `sendDocument`, and `delivery_error` calls it transient. The engine uploads the same
    photo three times and the user gets "⚠ Job … is done, but I could not post the picture here"
    instead of the file."""
    tg.html_413["sendPhoto"] = 99  # the same upload is refused the same way every time
    await rig.start()
    tg.message("/imagine a picture Telegram will not take as a photo")
    await base.until(lambda: bool(tg.sent("sendDocument")) or said(tg, "⚠"), within=30)
    await rig.idle()
    assert not said(tg, "could not post"), texts(tg)
    (doc,) = tg.sent("sendDocument")
    assert button(doc, "of:") and "will not take as a photo" in (doc.text or "")
    assert len(failed(tg, "sendPhoto")) == 1  # refused once, not uploaded again as a photo


# ---- captions at the 1024 limit --------------------------------------------------------------

# What each unit of these prompts is, and how many UTF-16 units it takes.
PIECES = {
    "markup": ("<&>", 3),  # 3 units, 13 once escaped
    "emoji": ("🦊", 2),  # a surrogate pair
    "zwj": ("\U0001f469\u200d\U0001f52c", 5),  # woman scientist: 2 + 1 + 2
    "combining": ("e\u0301", 2),  # e and a combining acute
    "cjk": ("狐", 1),
}
SUFFIX_UNITS = utf16_len("\ndemo · job ") + 10  # the caption's second line (job ids are 10)


def prompt_of(kind: str, units: int) -> str:
    """A prompt of exactly `units` UTF-16 units: the pieces, topped up with "&"."""
    piece, size = PIECES[kind]
    text = piece * (units // size)
    return text + "&" * (units - utf16_len(text))


@pytest.mark.parametrize("kind", list(PIECES))
async def test_a_caption_of_exactly_1024_units_goes_uncut_and_parses(
    rig: Rig, tg: MediaTelegram, kind: str
) -> None:
    prompt = prompt_of(kind, 1024 - SUFFIX_UNITS)
    await rig.start()
    tg.message(f"/imagine {prompt}")
    (photo,) = await tg.wait_for("sendPhoto")  # the fake refuses captions that do not parse
    job_id = button(photo, "rr:")
    visible = parse_html(photo.params["caption"])
    assert visible == f"{prompt}\ndemo · job {job_id}" and utf16_len(visible) == 1024


@pytest.mark.parametrize("kind", list(PIECES))
@pytest.mark.parametrize("over", [1, 700])
async def test_a_caption_past_1024_units_is_cut_and_still_parses(
    rig: Rig, tg: MediaTelegram, kind: str, over: int
) -> None:
    prompt = prompt_of(kind, 1024 - SUFFIX_UNITS + over)
    await rig.start()
    tg.message(f"/imagine {prompt}")
    (photo,) = await tg.wait_for("sendPhoto")
    job_id = button(photo, "rr:")
    visible = parse_html(photo.params["caption"])
    assert utf16_len(visible) <= 1024 and visible.endswith(f"…\ndemo · job {job_id}")
    kept = visible.removesuffix(f"…\ndemo · job {job_id}")
    assert prompt.startswith(kept) and len(kept) > 0
    assert not [c for c in tg.calls if not c.ok]


async def test_a_long_markup_caption_in_an_album_and_a_document_fallback_parses(
    rig: Rig, tg: MediaTelegram
) -> None:
    tg.fail("sendPhoto", 400, "Bad Request: PHOTO_INVALID_DIMENSIONS")
    await rig.start()
    long = prompt_of("markup", 1500)
    tg.message(f"/imagine {long} --n 2")
    (album,) = await tg.wait_for("sendMediaGroup")
    first = parse_html(album.params["media"][0]["caption"])
    assert utf16_len(first) <= 1024 and first.startswith("<&><&>")
    tg.message(f"/imagine {long}", user=tg.user(8), chat=tg.chat(8))
    (doc,) = await tg.wait_for("sendDocument")
    assert utf16_len(doc.text or "") <= 1024 and (doc.text or "").startswith("<&><&>")


# ---- reference images in -----------------------------------------------------------------


async def test_a_captioned_photo_uses_its_largest_size_as_the_reference(
    rig: Rig, tg: MediaTelegram
) -> None:
    await rig.start()
    picture = png_bytes(120, 80)
    msg = tg.message(photo=picture, caption="as a watercolor")
    await tg.wait_for("sendPhoto")
    (get_file,) = tg.sent("getFile")
    assert get_file.params["file_id"] == msg["photo"][-1]["file_id"]  # not the thumbnail
    (call,) = rig.harness.provider.calls
    assert call.reference_images == (picture,) and call.prompt == "as a watercolor"


async def test_imagine_replying_to_a_photo_in_a_private_chat_uses_it(
    rig: Rig, tg: MediaTelegram
) -> None:
    await rig.start()
    picture = png_bytes(50, 40, color=(9, 9, 9))
    posted = tg.message(photo=picture)
    tg.message("/imagine as a poster", reply_to=posted)
    await tg.wait_for("sendPhoto")
    (call,) = rig.harness.provider.calls
    assert call.reference_images == (picture,) and call.prompt == "as a poster"


@pytest.mark.parametrize(
    ("fmt", "mime", "name"),
    [
        ("PNG", "image/png", "a.png"),
        ("JPEG", "image/jpeg", "a.jpg"),
        ("WEBP", "image/webp", "a.webp"),
    ],
)
async def test_imagine_replying_to_an_image_sent_as_a_file_uses_it(
    rig: Rig, tg: MediaTelegram, fmt: str, mime: str, name: str
) -> None:
    await rig.start()
    chat = group_chat(tg)
    picture = image(40, 30, fmt)
    posted = tg.message(
        user=tg.user(8), chat=chat, extra={"document": doc_message(tg, picture, name, mime)}
    )
    tg.message("/imagine as a mosaic", user=tg.user(7), chat=chat, reply_to=posted)
    await tg.wait_for("sendPhoto")
    (call,) = rig.harness.provider.calls
    assert call.reference_images == (picture,)


async def test_imagine_replying_to_a_non_image_file_fetches_nothing(
    rig: Rig, tg: MediaTelegram
) -> None:
    await rig.start()
    chat = group_chat(tg)
    pdf = doc_message(tg, b"%PDF-1.4 a report", "report.pdf", "application/pdf")
    posted = tg.message(user=tg.user(8), chat=chat, extra={"document": pdf})
    tg.message("/imagine a cover for this", user=tg.user(7), chat=chat, reply_to=posted)
    await tg.wait_for("sendPhoto")
    assert not tg.sent("getFile")
    (call,) = rig.harness.provider.calls
    assert call.reference_images == ()


@pytest.mark.parametrize("where", ["private", "group"])
async def test_an_album_of_photos_with_one_caption_is_one_request_with_every_photo(
    rig: Rig, tg: MediaTelegram, where: str
) -> None:
    """Telegram delivers an album as one message per photo sharing a `media_group_id`, the
    caption on the first only. The adapter reads each on its own (nothing looks at
    `media_group_id`, adapters/telegram_input.py `_read`/`fetch_reference`): the job uses the
    first photo alone, the others are dropped, and in a private chat each of them is answered
    "Add a caption to the photo…" although the album was captioned."""
    await rig.start()
    private = where == "private"
    user = tg.user(ALICE)
    chat = tg.chat(ALICE) if private else group_chat(tg)
    caption = "merge these into one scene" if private else "/imagine@drawbot merge these"
    first, second = png_bytes(30, 30, color=(1, 1, 1)), png_bytes(31, 31, color=(2, 2, 2))
    group = {"media_group_id": "13579"}
    tg.message(user=user, chat=chat, photo=first, caption=caption, extra=group)
    tg.message(user=user, chat=chat, photo=second, extra=group)
    await tg.wait_for("sendPhoto")
    await rig.idle()
    await settle(tg)
    assert not said(tg, "Add a caption"), texts(tg)
    assert len(await jobs(rig.harness)) == 1
    (call,) = rig.harness.provider.calls
    assert set(call.reference_images) == {first, second}


async def test_a_reference_too_big_for_getfile_is_called_too_large_not_asked_again(
    rig: Rig, tg: MediaTelegram
) -> None:
    """An image file whose message carries no `file_size` (optional in the Bot API) and is over
    getFile's 20 MB: Telegram answers 400 "file is too big", and the bot tells the user "I could
    not fetch that image from Telegram. Please send it again." Sending it again can never work;
    the answer should say it is too large (adapters/telegram_input.py `fetch_reference` turns
    every TelegramError from getFile into error.reference_download)."""
    await rig.start()
    huge = doc_message(tg, padded(21_000_000), "scan.png", "image/png", size=False)
    tg.message(caption="as a watercolor", extra={"document": huge})
    await base.until(lambda: said(tg, "image"), within=10)
    await settle(tg)
    assert failed(tg, "getFile")  # Telegram did refuse it as too big
    assert said(tg, "too large"), texts(tg)
    assert not said(tg, "send it again"), texts(tg)
    assert await jobs(rig.harness) == []


async def test_a_reference_that_says_it_is_too_big_is_refused_before_any_download(
    rig: Rig, tg: MediaTelegram
) -> None:
    await rig.start()
    doc = doc_message(tg, b"\x89PNG", "scan.png", "image/png")
    doc["file_size"] = 25_000_000
    tg.message(caption="as a watercolor", extra={"document": doc})
    await base.until(lambda: said(tg, "too large"), within=10)
    assert not tg.sent("getFile") and rig.harness.provider.calls == []


@pytest.mark.parametrize("failure", ["getFile-400", "download-404"])
async def test_a_reference_telegram_cannot_hand_over_is_answered_without_a_job(
    rig: Rig, tg: MediaTelegram, failure: str
) -> None:
    await rig.start()
    sizes = tg.photo_sizes(png_bytes(40, 40))
    if failure == "getFile-400":
        tg.fail("getFile", 400, "Bad Request: wrong file_id or the file is temporarily unavailable")
    else:
        tg.missing_downloads.add(sizes[-1]["file_id"])
    tg.message(caption="as a watercolor", extra={"photo": sizes})
    await base.until(lambda: said(tg, "could not fetch that image"), within=10)
    await settle(tg)
    assert await jobs(rig.harness) == [] and rig.harness.provider.calls == []


ANIMATION = {
    "file_name": "dance.mp4",
    "mime_type": "video/mp4",
    "duration": 2,
    "width": 240,
    "height": 240,
}


async def test_a_gif_with_a_caption_is_refused_clearly(rig: Rig, tg: MediaTelegram) -> None:
    await rig.start()
    gif = {**tg.add_file(b"\x00\x00\x00\x18ftypmp42"), **ANIMATION}
    # Telegram sends a GIF as an animation and, for old clients, as a document too.
    tg.message(caption="as an oil painting", extra={"animation": gif, "document": gif})
    await base.until(lambda: said(tg, "not a PNG, JPEG or WebP"), within=10)
    await settle(tg)
    assert not tg.sent("getFile") and await jobs(rig.harness) == []


async def test_a_gif_sent_as_an_image_file_is_refused_clearly_and_not_charged(
    rig: Rig, tg: MediaTelegram
) -> None:
    await rig.start()
    buf = io.BytesIO()
    Image.new("P", (20, 20)).save(buf, "GIF")
    doc = doc_message(tg, buf.getvalue(), "loop.gif", "image/gif")
    tg.message(caption="as an oil painting --model paid", extra={"document": doc})
    await base.until(lambda: said(tg, "not a PNG, JPEG or WebP"), within=10)
    await settle(tg)
    assert rig.harness.provider.calls == []
    for row in await jobs(rig.harness):
        assert row[1] in FINAL and row[2] == 0


@pytest.mark.parametrize("where", ["private", "group"])
async def test_a_forwarded_photo_is_not_a_request_but_a_reply_to_it_uses_it(
    rig: Rig, tg: MediaTelegram, where: str
) -> None:
    await rig.start()
    private = where == "private"
    chat = tg.chat(ALICE) if private else group_chat(tg)
    picture = png_bytes(44, 33, color=(5, 6, 7))
    origin = {"type": "user", "date": int(time.time()), "sender_user": tg.user(8, name="Eve")}
    forwarded = tg.message(
        chat=chat, photo=picture, caption="look at my cat", extra={"forward_origin": origin}
    )
    if private:
        await base.until(lambda: said(tg, "reply to it with /imagine"), within=10)
    await settle(tg)
    assert await jobs(rig.harness) == [] and not tg.sent("getFile")
    command = "/imagine as a comic" if private else "/imagine@drawbot as a comic"
    tg.message(command, chat=chat, reply_to=forwarded)
    await tg.wait_for("sendPhoto")
    (call,) = rig.harness.provider.calls
    assert call.reference_images == (picture,) and call.prompt == "as a comic"


# ---- the 📎 original-file button -------------------------------------------------------------


async def test_the_original_file_button_sends_the_png_once_per_window(
    rig: Rig, tg: MediaTelegram
) -> None:
    shift = [0.0]
    await rig.start({"clock": lambda: time.monotonic() + shift[0]})
    tg.message("a crisp mountain")
    (photo,) = await tg.wait_for("sendPhoto")
    job_id = button(photo, "of:")
    tg.callback(f"of:{job_id}", photo.result)
    (doc,) = await tg.wait_for("sendDocument")
    upload = doc.files["document"]
    assert upload.filename == f"{job_id}-1.png" and upload.data.startswith(b"\x89PNG")
    assert [upload.data] == await stored_bytes(rig.harness, job_id)
    assert doc.params["reply_parameters"]["message_id"] == photo.result["message_id"]
    again = tg.callback(f"of:{job_id}", photo.result)
    await base.until(lambda: again in tg.callback_answers)
    assert "already" in tg.callback_answers[again]["text"]
    assert len(tg.sent("sendDocument")) == 1
    shift[0] = 601.0  # past the window: the file may go again
    tg.callback(f"of:{job_id}", photo.result)
    await tg.wait_for("sendDocument", count=2)


async def test_the_original_file_button_works_after_a_restart(rig: Rig, tg: MediaTelegram) -> None:
    engine, adapter = await rig.start()
    tg.message("a lighthouse at dusk")
    (photo,) = await tg.wait_for("sendPhoto")
    await rig.idle()
    await rig.stop(engine, adapter)
    await rig.start()
    job_id = button(photo, "of:")
    query = tg.callback(f"of:{job_id}", photo.result)
    (doc,) = await tg.wait_for("sendDocument")
    assert [doc.files["document"].data] == await stored_bytes(rig.harness, job_id)
    await base.until(lambda: query in tg.callback_answers)
    assert len(tg.sent("sendPhoto")) == 1  # the result was not posted again


async def test_the_original_file_button_of_an_album_sends_every_file_as_documents(
    rig: Rig, tg: MediaTelegram
) -> None:
    await rig.start()
    tg.message("/imagine three foxes --n 3")
    (buttons,) = await tg.wait_for(is_buttons_message)
    job_id = button(buttons, "of:")
    tg.callback(f"of:{job_id}", buttons.result)
    albums = await tg.wait_for("sendMediaGroup", count=2)
    originals = albums[1]
    assert [m["type"] for m in originals.params["media"]] == ["document"] * 3
    sent = [
        originals.files[m["media"].removeprefix("attach://")].data
        for m in originals.params["media"]
    ]
    assert sent == await stored_bytes(rig.harness, job_id)


async def test_the_original_file_button_after_the_files_expired_says_they_are_gone(
    rig: Rig, tg: MediaTelegram
) -> None:
    """Once IMAGE_RETENTION_DAYS has deleted a result's files, 📎 under it answers "No job …
    of yours was found. See /jobs." (adapters/telegram_buttons.py `_send_originals` raises
    JobNotFound when the job has no image rows), though /jobs lists that job: the answer
    should say its files are gone, as /show does (error.no_images)."""
    engine, _ = await rig.start()
    tg.message("a fading memory")
    (photo,) = await tg.wait_for("sendPhoto")
    await rig.idle()
    assert await engine.store.expire_images(time.time() + 10**9) == 1
    query = tg.callback(f"of:{button(photo, 'of:')}", photo.result)
    await base.until(lambda: query in tg.callback_answers)
    answer = str(tg.callback_answers[query].get("text"))
    assert "No job" not in answer and "no stored images" in answer, answer


@pytest.mark.parametrize("failure", ["file-gone", "telegram-502"])
async def test_the_original_file_button_that_cannot_send_tells_the_user(
    rig: Rig, tg: MediaTelegram, failure: str
) -> None:
    """📎 answers the press with nothing first, then sends; when the send fails (the stored file
    is gone from disk, its row kept; or Telegram answers 502 Bad Gateway) `_send_originals`
    (adapters/telegram_buttons.py, the `except (TelegramError, OSError)` after
    `delivery.originals`) only logs it. The user presses the button and nothing ever happens;
    /show, for a missing file, says "Job … has no stored images to show"."""
    await rig.start()
    tg.message("a lost picture")
    (photo,) = await tg.wait_for("sendPhoto")
    await tg.wait_text("✅ Done")
    await rig.idle()
    job_id = button(photo, "of:")
    if failure == "file-gone":
        ((path,),) = await rows(rig.harness, f"SELECT path FROM images WHERE job_id = '{job_id}'")
        (rig.harness.data_dir / path).unlink()
    else:
        tg.fail("sendDocument", 502, "Bad Gateway")
    pressed = time.monotonic()
    query = tg.callback(f"of:{job_id}", photo.result)
    await base.until(lambda: query in tg.callback_answers)
    await base.until(lambda: failure == "file-gone" or bool(failed(tg, "sendDocument")))
    await settle(tg)
    assert not tg.sent("sendDocument")
    told = [c.text for c in tg.sent("sendMessage") if c.at >= pressed and c.text]
    told += [tg.callback_answers[query].get("text") or ""]
    assert any(told), "the press was answered with nothing and no message followed"


async def test_someone_else_in_the_chat_may_take_the_original_but_a_stranger_may_not(
    rig: Rig, tg: MediaTelegram
) -> None:
    await rig.start()
    chat = group_chat(tg)
    tg.message("/imagine a shared picture", user=tg.user(7), chat=chat)
    (photo,) = await tg.wait_for("sendPhoto")
    job_id = button(photo, "of:")
    tg.callback(f"of:{job_id}", photo.result, user=tg.user(9))
    (doc,) = await tg.wait_for("sendDocument")
    assert doc.chat_id == GROUP
    elsewhere = {**photo.result, "chat": {"id": 555, "type": "private"}}
    query = tg.callback(f"of:{job_id}", elsewhere, user=tg.user(555))
    await base.until(lambda: query in tg.callback_answers)
    assert "No job" in tg.callback_answers[query]["text"]
    assert len(tg.sent("sendDocument")) == 1
