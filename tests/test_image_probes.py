"""Adversarial probes about image bytes: what providers hand back, what users send, what is posted.

Each probe runs the real code: the real provider clients (GrsAI, OpenAI Images, Gemini) against
their loopback fakes serving chosen bytes, the real engine on a temp data dir, and where it
matters the real Telegram and Discord adapters against their fakes. What a probe asserts is what
a user and the paying operator expect:

- a result that is not a whole, usable image is never returned, stored, posted or charged; its
  job ends with a message saying "not charged", and no row is left queued or running;
- a result that is an odd but valid image (CMYK JPEG, 16-bit or palette PNG, animated WebP,
  base64 in another common spelling) is a good result the operator paid for: it is kept;
- a reference image the bot cannot use gets a short clear answer and no provider call;
- a result shrunk to fit a platform's upload limit still looks like the image that was made.

Already covered elsewhere (and not repeated here): empty bodies, HTML/text/GIF served as an image,
a PNG cut mid-chunk, redirects, oversized and endless downloads, downloads hanging mid-body
(tests/test_provider_hostile.py); Telegram's photo limits and document fall-backs, GIF and
oversized references (tests/test_telegram_media.py, tests/test_discord_hostile.py).

A probe that fails is a defect; its assertion message says what the user or operator sees.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from PIL import Image, ImageStat

import tests.fake_grsai as fake_grsai_module
import tests.fake_openai as fake_openai_module
from bot.catalog import Catalog
from bot.engine import Engine, EngineConfig
from bot.errors import InvalidRequest, Transient
from bot.images import MAX_PIXELS, verify_image
from bot.jobs import GeneratedImage, Options, Request, Target, UserRef
from bot.providers.base import GenerationRequest, JobHooks, NullHooks
from bot.providers.gemini import GeminiProvider
from bot.providers.grsai import NANO_BANANA, GrsaiProvider
from bot.providers.openai_images import OpenAIImagesProvider
from bot.store import Store
from tests import test_discord as discord_base
from tests import test_telegram as telegram_base
from tests.conftest import Harness
from tests.fake_discord import FakeDiscord
from tests.fake_gemini import FakeGemini
from tests.fake_grsai import FakeGrsai
from tests.fake_openai import FakeOpenAI
from tests.fake_telegram import FakeTelegram
from tests.fakes import RecordingAdapter, ScriptedProvider
from tests.test_telegram import Rig, ShapedProvider

# The Telegram rig (real PTB against the fake Bot API) and its PTB setting, reused as they are.
rig = telegram_base.rig
_ptb_timedelta = telegram_base._ptb_timedelta

FINAL = {"succeeded", "failed", "refused", "cancelled"}


# ---- images, good, broken and hostile -------------------------------------------------------


def encode(img: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Incompressible pixels, so a cut body really loses picture data."""
    return Image.frombytes(mode, (width, height), os.urandom(width * height * len(mode)))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, idat: bytes, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """A PNG assembled by hand: every chunk well formed, CRCs right, `idat` as given."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


@lru_cache(maxsize=8)
def flat_bilevel_png(side: int) -> bytes:
    """A one-colour 1-bit PNG of side×side pixels: tiny on the wire however large it is."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return raw_png(side, side, idat, bit_depth=1, color_type=0)


@lru_cache(maxsize=1)
def truncated_jpeg() -> bytes:
    """A real JPEG whose body was cut in half (as a CDN that closed early and cached it)."""
    data = encode(noise(256, 256), "JPEG", quality=90)
    return data[: len(data) // 2]


@lru_cache(maxsize=1)
def short_pixel_png() -> bytes:
    """A 256×256 PNG whose compressed pixel data holds 10 of its 256 rows; chunks and CRCs fine."""
    rows = b"".join(b"\x00" + os.urandom(256 * 3) for _ in range(10))
    return raw_png(256, 256, zlib.compress(rows))


def bomb() -> bytes:
    """20000×20000 pixels (400 megapixels) in about 1 MB: a decompression bomb."""
    return flat_bilevel_png(20_000)


def over_max_pixels() -> bytes:
    side = 9_000
    assert side * side > MAX_PIXELS
    return flat_bilevel_png(side)


def sixteen_bit_grey(side: int = 128, noisy: bool = False) -> bytes:
    """A 16-bit greyscale PNG around mid-grey (32768 of 65535, i.e. 128 of 255)."""
    count = side * side
    values = [24_000 + 67 * b for b in os.urandom(count)] if noisy else [32_768] * count
    img = Image.frombytes("I;16", (side, side), struct.pack(f"<{side * side}H", *values))
    return encode(img, "PNG")


def animated_webp() -> bytes:
    frames = [Image.new("RGB", (64, 64), (i * 60, 20, 200)) for i in range(4)]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def apng() -> bytes:
    frames = [Image.new("RGB", (64, 64), (20, i * 60, 90)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


def palette_alpha_png() -> bytes:
    img = Image.new("P", (64, 64), 3)
    img.putpalette([i % 256 for i in range(768)])
    return encode(img, "PNG", transparency=0)


def odd_length_png() -> bytes:
    """A real PNG whose length is not a multiple of 3, so its base64 ends in `=` padding."""
    for side in range(60, 90):
        data = encode(Image.new("RGB", (side, side), (side, 90, 30)), "PNG")
        if len(data) % 3 and (
            "-" in base64.urlsafe_b64encode(data).decode()
            or "_" in base64.urlsafe_b64encode(data).decode()
        ):
            return data
    raise AssertionError("no PNG with padding and URL-safe characters found")


# Results no one should be handed (nor charged for). name → bytes.
BROKEN: dict[str, Callable[[], bytes]] = {
    "jpeg cut in half": truncated_jpeg,
    "png with pixel data short": short_pixel_png,
    "decompression bomb 20000x20000": bomb,
    "png over MAX_PIXELS": over_max_pixels,
    "svg": lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"/>',
    "tiff": lambda: encode(Image.new("RGB", (16, 16), (1, 2, 3)), "TIFF"),
    "avif": lambda: encode(Image.new("RGB", (16, 16), (1, 2, 3)), "AVIF"),
    "heic-like ftyp box": lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\0" * 64,
}

# Odd but valid images a provider may make: name → (bytes, expected mime).
VALID: dict[str, Callable[[], tuple[bytes, str]]] = {
    "cmyk jpeg": lambda: (
        encode(Image.new("CMYK", (64, 64), (0, 90, 200, 10)), "JPEG"),
        "image/jpeg",
    ),
    "16-bit grey png": lambda: (sixteen_bit_grey(64), "image/png"),
    "palette png with transparency": lambda: (palette_alpha_png(), "image/png"),
    "rgba png": lambda: (encode(Image.new("RGBA", (64, 64), (9, 9, 9, 0)), "PNG"), "image/png"),
    "1-bit png": lambda: (flat_bilevel_png(64), "image/png"),
    "animated webp": lambda: (animated_webp(), "image/webp"),
    "apng": lambda: (apng(), "image/png"),
    "progressive jpeg": lambda: (
        encode(noise(64, 64), "JPEG", progressive=True, quality=80),
        "image/jpeg",
    ),
}


def wrapped(text: str, width: int, sep: str = "\n") -> str:
    return sep.join(text[i : i + width] for i in range(0, len(text), width))


# Spellings of base64 seen from providers, relays and SDK re-serialisers: name → encoder.
BASE64_SPELLINGS: dict[str, Callable[[bytes], str]] = {
    "data: uri": lambda d: "data:image/png;base64," + base64.b64encode(d).decode(),
    "newlines every 76": lambda d: wrapped(base64.b64encode(d).decode(), 76),
    "crlf every 64": lambda d: wrapped(base64.b64encode(d).decode(), 64, "\r\n"),
    "url-safe alphabet": lambda d: base64.urlsafe_b64encode(d).decode(),
    "padding stripped": lambda d: base64.b64encode(d).decode().rstrip("="),
    "url-safe, padding stripped": lambda d: base64.urlsafe_b64encode(d).decode().rstrip("="),
}


# ---- the three real provider clients against their fakes, serving chosen bytes --------------


class BytesGemini(FakeGemini):
    """The fake Gemini, answering with `payload` (spelled by `spell`) as the image's inline data."""

    payload: bytes | None = None
    spell: Callable[[bytes], str] = staticmethod(lambda d: base64.b64encode(d).decode())

    def _png(self, ratio: str, size: str | None, label: str) -> str:
        if self.payload is None:
            return super()._png(ratio, size, label)
        return self.spell(self.payload)


class BytesOpenAI(FakeOpenAI):
    """The fake OpenAI Images API; `spell` re-spells each `b64_json` it sends."""

    spell: Callable[[bytes], str] | None = None

    async def _answer(self, request: Any, request_id: str, fault: Any, p: dict[str, Any]) -> Any:
        body = await super()._answer(request, request_id, fault, p)
        if self.spell is not None and isinstance(body, dict):
            for item in body.get("data", []):
                if "b64_json" in item:
                    item["b64_json"] = self.spell(base64.b64decode(item["b64_json"]))
        return body


def gen_request(model: str, endpoint: str = "") -> GenerationRequest:
    return GenerationRequest(
        job_id="job-bytes",
        model=model,
        remote_model=model,
        endpoint=endpoint,
        prompt="a lighthouse at dusk",
        n=1,
        aspect_ratio="1:1",
        size=None,
        seed=None,
        timeout_s=10.0,
    )


@asynccontextmanager
async def serving(
    path: str,
    payload: bytes,
    monkeypatch: pytest.MonkeyPatch,
    spell: Callable[[bytes], str] | None = None,
) -> AsyncIterator[tuple[Any, str, GenerationRequest, Any]]:
    """A real client and its fake, the fake serving `payload` as the generated image.

    Yields (provider, provider name, request, fake). Paths: `openai b64` (b64_json), `openai url`
    (a relay answering URLs), `grsai url` (a GrsAI result URL), `gemini inline` (inlineData).
    """
    if path.startswith("openai"):
        monkeypatch.setattr(fake_openai_module, "png", lambda *a, **k: payload)
        async with BytesOpenAI(url_output=path == "openai url") as fake:
            fake.spell = spell
            provider = OpenAIImagesProvider(fake.api_key, fake.base_url)
            try:
                yield provider, "openai", gen_request("gpt-image-1", "/images/generations"), fake
            finally:
                await provider.aclose()
    elif path == "grsai url":
        monkeypatch.setattr(fake_grsai_module, "_png", lambda seed: payload)
        async with FakeGrsai() as fake:
            provider = GrsaiProvider(fake.api_key, fake.base_url, poll_interval=0.01)
            try:
                yield provider, "grsai", gen_request("nano-banana", NANO_BANANA), fake
            finally:
                await provider.aclose()
    elif path == "gemini inline":
        async with BytesGemini() as fake:
            fake.payload = payload
            if spell is not None:
                fake.spell = spell
            provider = GeminiProvider(fake.api_key, fake.base_url)
            try:
                yield provider, "gemini", gen_request("gemini-2.5-flash-image"), fake
            finally:
                await provider.aclose()
    else:
        raise ValueError(path)


async def outcome(provider: Any, request: GenerationRequest, hooks: JobHooks | None = None) -> Any:
    """The images, or the exception the call raised (bounded, so a hang fails the probe)."""
    try:
        async with asyncio.timeout(15):
            return await provider.generate(request, hooks or NullHooks())
    except Exception as exc:
        return exc


PATHS = ["openai b64", "grsai url", "gemini inline"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", BROKEN)
async def test_a_result_that_is_not_a_whole_usable_image_is_never_returned(
    path: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What is returned here is stored, posted and charged: it must be a whole image that
    Telegram and Discord can show (and the bot itself can shrink)."""
    async with serving(path, BROKEN[kind](), monkeypatch) as (provider, _, request, _):
        value = await outcome(provider, request)
    returned = isinstance(value, list)
    assert not returned, (
        f"{path}: a {kind} came back as a good image {value[0].mime} "
        f"{value[0].width}x{value[0].height}; it would be stored, posted and charged"
    )
    assert isinstance(value, Transient), f"{path}: {type(value).__name__}: {value}"


@pytest.mark.parametrize("path", ["openai b64", "openai url", "grsai url", "gemini inline"])
@pytest.mark.parametrize("kind", VALID)
async def test_an_odd_but_valid_result_is_kept_with_its_real_type_and_size(
    path: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, mime = VALID[kind]()
    async with serving(path, data, monkeypatch) as (provider, _, request, _):
        value = await outcome(provider, request)
    kept = isinstance(value, list)
    assert kept, f"{path}: a valid {kind} was refused: {value!r}"
    (image,) = value
    with Image.open(io.BytesIO(data)) as img:
        size = img.size
    assert (image.data, image.mime, (image.width, image.height)) == (data, mime, size)


@pytest.mark.parametrize("path", ["openai b64", "gemini inline"])
@pytest.mark.parametrize("spelling", BASE64_SPELLINGS)
async def test_base64_in_any_common_spelling_is_the_image_the_operator_paid_for(
    path: str, spelling: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay or an SDK re-serialising the answer (pydantic writes bytes URL-safe; some
    encoders drop the `=` padding) still hands over the image that was made and billed.
    Refused as "broken base64", it is a Transient: the job is generated and billed again."""
    data = odd_length_png()
    async with serving(path, data, monkeypatch, BASE64_SPELLINGS[spelling]) as (p, _, req, _):
        value = await outcome(p, req)
    kept = isinstance(value, list)
    assert kept, (
        f"{path}: a valid PNG spelled '{spelling}' was refused ({value}); the operator pays "
        "for a retry and the user may get 'the image service had a temporary problem'"
    )
    assert value[0].data == data


# ---- through the engine: a broken result ends uncharged, a valid odd one is delivered -------


@asynccontextmanager
async def engine_on(
    name: str, provider: Any, model: str, data_dir: Path
) -> AsyncIterator[tuple[Engine, RecordingAdapter]]:
    store = await Store.open(data_dir)
    config = EngineConfig(
        retry_attempts=2, retry_initial=0.01, generate_timeout=8.0, deliver_backoff=0.01
    )
    engine = Engine(store, Catalog.load(), {name: provider}, config, default_model=model)
    adapter = RecordingAdapter()
    engine.register(adapter)
    await engine.start()
    try:
        yield engine, adapter
    finally:
        await engine.close()
        await store.close()


def user_request(prompt: str = "a lighthouse at dusk", refs: tuple[bytes, ...] = ()) -> Request:
    return Request(
        user=UserRef("test", "alice"),
        target=Target("test", chat_id="c1"),
        prompt=prompt,
        options=Options(aspect_ratio="1:1"),
        reference_images=refs,
    )


async def job_rows(data_dir: Path) -> dict[str, tuple[Any, ...]]:
    async with aiosqlite.connect(data_dir / "drawbridge.db") as db:
        found = await db.execute_fetchall(
            "SELECT id, status, cost_usd, error_kind, n_images FROM jobs"
        )
    return {r[0]: tuple(r[1:]) for r in found}


def paid_calls(name: str, fake: Any) -> int:
    """Generations the operator was billed for, as the fake counts them."""
    if name == "grsai":
        return int(fake.submits)
    if name == "openai":
        return len(fake.image_calls)
    return len(fake.calls())


ENGINE_BROKEN = [
    ("openai b64", "jpeg cut in half"),
    ("grsai url", "jpeg cut in half"),
    ("gemini inline", "png with pixel data short"),
    ("grsai url", "decompression bomb 20000x20000"),
    ("openai url", "png over MAX_PIXELS"),
]


@pytest.mark.parametrize(("path", "kind"), ENGINE_BROKEN)
async def test_a_broken_result_ends_the_job_uncharged_and_the_engine_goes_on(
    path: str, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        serving(path, BROKEN[kind](), monkeypatch) as (provider, name, request, fake),
        engine_on(name, provider, request.model, tmp_path) as (engine, adapter),
    ):
        ticket = await engine.submit(user_request())
        async with asyncio.timeout(20):
            await engine.run_until_idle()
        rows = await job_rows(tmp_path)
        status, cost, kind_, _ = rows[ticket.job_id]
        final = [u.text for j, u in adapter.statuses if j == ticket.job_id and u.kind.final]
        assert (status, cost) == ("failed", 0), (
            f"a {kind} from {path} ended {status} and was charged ${cost}; the user was sent "
            f"{adapter.delivered(ticket.job_id)} broken picture(s)"
        )
        assert not adapter.deliveries, "a broken image was posted"
        assert final and "not charged" in final[-1], final
        assert kind_ == "transient"
        if name == "grsai":  # a retry resumes the paid task: the same result, not a new bill
            assert fake.submits == 1, f"GrsAI was paid {fake.submits} times for one job"
        assert (await engine.usage(UserRef("test", "alice"))).images == 0
        # The engine is unharmed: a good result right after is stored, charged and posted.
        good = encode(Image.new("RGB", (32, 32), (40, 160, 90)), "PNG")
        if path.startswith("openai"):
            monkeypatch.setattr(fake_openai_module, "png", lambda *a, **k: good)
        elif path == "grsai url":
            monkeypatch.setattr(fake_grsai_module, "_png", lambda seed: good)
        else:
            fake.payload = good
        second = await engine.submit(user_request("a second lighthouse"))
        async with asyncio.timeout(20):
            await engine.run_until_idle()
        rows = await job_rows(tmp_path)
        assert rows[second.job_id][0] == "succeeded" and adapter.delivered(second.job_id) == 1
        assert all(r[0] in FINAL for r in rows.values()), rows


async def test_a_cmyk_jpeg_result_is_stored_charged_once_and_delivered_as_a_jpeg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, _ = VALID["cmyk jpeg"]()
    async with (
        serving("openai b64", data, monkeypatch) as (provider, name, request, fake),
        engine_on(name, provider, request.model, tmp_path) as (engine, adapter),
    ):
        ticket = await engine.submit(user_request())
        async with asyncio.timeout(20):
            await engine.run_until_idle()
        status, cost, _, n = (await job_rows(tmp_path))[ticket.job_id]
        assert (status, n, paid_calls(name, fake)) == ("succeeded", 1, 1)
        assert cost == pytest.approx(0.042)
        ((_, (stored,)),) = adapter.deliveries
        assert stored.mime == "image/jpeg" and stored.path.read_bytes() == data


async def test_a_url_safe_gemini_image_is_delivered_and_billed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Gemini answer with URL-safe base64 (as a proxy built on the google-genai SDK sends it):
    today the bot calls Gemini again (billed again) and finally tells the user the image service
    had a temporary problem."""
    data = odd_length_png()
    spell = BASE64_SPELLINGS["url-safe alphabet"]
    async with (
        serving("gemini inline", data, monkeypatch, spell) as (provider, name, request, fake),
        engine_on(name, provider, request.model, tmp_path) as (engine, adapter),
    ):
        ticket = await engine.submit(user_request())
        async with asyncio.timeout(20):
            await engine.run_until_idle()
        status, cost, kind, _ = (await job_rows(tmp_path))[ticket.job_id]
        calls = paid_calls(name, fake)
        assert (status, adapter.delivered(ticket.job_id)) == ("succeeded", 1), (
            f"job {status} ({kind}) after {calls} billed Gemini call(s); nothing was posted"
        )
        assert calls == 1 and cost == pytest.approx(0.039)


# ---- reference images from users ---------------------------------------------------------


BAD_REFERENCES: dict[str, Callable[[], bytes]] = {
    "decompression bomb 20000x20000": bomb,
    "png over MAX_PIXELS": over_max_pixels,
    "jpeg cut in half": truncated_jpeg,
    "png with pixel data short": short_pixel_png,
}


@pytest.mark.parametrize("kind", BAD_REFERENCES)
async def test_a_reference_no_provider_can_use_is_refused_at_submit_without_a_paid_call(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GrsAI bills per submit; a reference that is a bomb or a cut file is sent to it today
    (as a data URI), and the user learns only from the provider's failure, if at all."""
    good = encode(Image.new("RGB", (32, 32), (1, 2, 3)), "PNG")
    async with (
        serving("grsai url", good, monkeypatch) as (provider, name, request, fake),
        engine_on(name, provider, request.model, tmp_path) as (engine, _),
    ):
        try:
            ticket = await engine.submit(user_request(refs=(BAD_REFERENCES[kind](),)))
        except InvalidRequest as exc:
            assert exc.key == "error.reference_unreadable", exc.key
            ticket = None
        async with asyncio.timeout(20):
            await engine.run_until_idle()
        accepted = ticket is not None
        assert not accepted and fake.submits == 0, (
            f"a {kind} reference was accepted (job {ticket and ticket.job_id}) and sent to "
            f"GrsAI in {fake.submits} paid submit(s)"
        )


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as server:
        yield server


@pytest.fixture
def provider(harness: Harness) -> ShapedProvider:
    harness.provider = ShapedProvider()
    return harness.provider


def tg_texts(tg: FakeTelegram) -> list[str]:
    return [c.text or "" for c in tg.sent() if c.method.startswith(("send", "edit"))]


async def test_a_bomb_sent_to_telegram_as_an_image_file_gets_a_clear_answer_and_no_job(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    doc = {**tg.add_file(bomb(), "huge.png"), "file_name": "huge.png", "mime_type": "image/png"}
    tg.message(caption="as a watercolor --model paid", extra={"document": doc})
    await telegram_base.until(
        lambda: (
            any("PNG, JPEG or WebP" in t for t in tg_texts(tg)) or bool(rig.harness.provider.calls)
        ),
        within=10,
    )
    await rig.idle()
    calls = len(rig.harness.provider.calls)
    assert calls == 0, (
        f"a 400-megapixel reference went to the provider ({calls} call(s)); "
        f"the user saw {tg_texts(tg)}"
    )
    assert await telegram_base.jobs(rig.harness) == []


async def test_a_heic_photo_sent_as_a_file_gets_a_clear_answer_and_no_job(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    heic = BROKEN["heic-like ftyp box"]()
    doc = {**tg.add_file(heic, "IMG_0001.HEIC"), "file_name": "IMG_0001.HEIC"}
    doc["mime_type"] = "image/heic"
    tg.message(caption="as a watercolor --model paid", extra={"document": doc})
    await telegram_base.until(
        lambda: any("PNG, JPEG or WebP" in t for t in tg_texts(tg)), within=10
    )
    assert rig.harness.provider.calls == [] and await telegram_base.jobs(rig.harness) == []


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord()
    await server.start()
    yield server
    await server.close()


async def test_a_bomb_attached_on_discord_gets_a_clear_answer_and_no_provider_call(
    harness: Harness, fake: FakeDiscord
) -> None:
    bot = await discord_base.open_bot(harness, fake)
    try:
        att = fake.add_attachment(bomb(), "huge.png", "image/png")
        inter = await fake.slash("imagine", {"prompt": "use this", "model": "paid", "image": att})
        await fake.wait_for(
            lambda: (
                "PNG, JPEG or WebP" in discord_base.content(fake, inter) or harness.provider.calls
            ),
            within=10,
        )
        await bot.engine.run_until_idle()
        calls = len(harness.provider.calls)
        assert calls == 0, (
            f"a 400-megapixel attachment went to the provider ({calls} call(s)); the "
            f"user saw {discord_base.content(fake, inter)!r}"
        )
    finally:
        await discord_base.close_bot(bot)


# ---- delivery: an image shrunk to fit still looks like the one that was made ---------------


class BytesProvider(ScriptedProvider):
    """Scripted, returning `payload` verified as a provider's client verifies it."""

    def __init__(self, payload: bytes) -> None:
        super().__init__()
        self.payload = payload

    async def generate(self, request: GenerationRequest, hooks: JobHooks) -> list[GeneratedImage]:
        made = await super().generate(request, hooks)
        return [verify_image(self.payload) for _ in made]


async def test_a_16_bit_result_shrunk_for_discord_keeps_its_brightness(
    harness: Harness, fake: FakeDiscord
) -> None:
    """A 16-bit PNG over the upload limit is re-encoded as JPEG: today every value over 255 is
    clipped, and a mid-grey picture arrives pure white."""
    data = sixteen_bit_grey(160, noisy=True)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode.startswith("I")
        original = ImageStat.Stat(img.point(lambda v: v / 256).convert("L")).mean[0]
    harness.provider = BytesProvider(data)
    bot = await discord_base.open_bot(harness, fake)
    try:
        limit = len(data) // 2
        inter = await fake.slash("imagine", {"prompt": "grey static"}, limit=limit)
        (followup,) = await fake.wait_for(lambda: fake.followups(inter.token), within=10)
        (part,) = followup.files
        assert len(part.data) <= limit
        with Image.open(io.BytesIO(part.data)) as shrunk:
            mean = ImageStat.Stat(shrunk.convert("L")).mean[0]
        assert abs(mean - original) < 20, (
            f"the shrunk picture's mean brightness is {mean:.0f}/255, the original's "
            f"{original:.0f}/255"
        )
    finally:
        await discord_base.close_bot(bot)
