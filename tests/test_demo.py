"""The demo model: real, deterministic PNGs at the asked ratio and size; its played failures."""

from __future__ import annotations

import base64
import io
import threading

import pytest
from PIL import Image

from bot.errors import AuthFailed, Refused, Transient
from bot.images import ratio_size, sniff_mime, verify_image
from bot.offload import OFF_LOOP_BYTES, off_loop
from bot.providers.base import GenerationRequest, NullHooks
from bot.providers.demo import DemoProvider
from bot.providers.http import decoded, verified


def gen(prompt: str = "a lighthouse", **kw: object) -> GenerationRequest:
    fields: dict[str, object] = dict(
        job_id="j1", model="demo", remote_model="demo", endpoint="", prompt=prompt, n=1,
        aspect_ratio="1:1", size=None, seed=None,
    )  # fmt: skip
    fields.update(kw)
    return GenerationRequest(**fields)  # type: ignore[arg-type]


class Hooks(NullHooks):
    def __init__(self) -> None:
        self.percents: list[int] = []
        self.tasks: list[str | None] = []

    async def progress(self, percent: int) -> None:
        self.percents.append(percent)

    async def task_submitted(self, task_id: str | None) -> None:
        self.tasks.append(task_id)

    def generated(self) -> None:
        return None


async def test_two_16_9_pngs_deterministic_per_prompt_seed_index() -> None:
    demo = DemoProvider()
    images = await demo.generate(gen(n=2, aspect_ratio="16:9", seed=7), NullHooks())
    assert len(images) == 2
    for img in images:
        assert img.mime == "image/png" and sniff_mime(img.data) == "image/png"
        with Image.open(io.BytesIO(img.data)) as pil:
            assert pil.size == (img.width, img.height) == (512, 288)
    assert images[0].data != images[1].data
    again = await demo.generate(gen(n=2, aspect_ratio="16:9", seed=7), NullHooks())
    assert [i.data for i in again] == [i.data for i in images]
    other = await demo.generate(gen(n=1, aspect_ratio="16:9", seed=8), NullHooks())
    assert other[0].data != images[0].data


@pytest.mark.parametrize(
    ("ratio", "size", "expected"),
    [("9:16", "1K", (576, 1024)), ("1:1", "256", (256, 256)), ("21:9", None, (512, 216))],
)
async def test_sizes_follow_ratio_and_size(
    ratio: str, size: str | None, expected: tuple[int, int]
) -> None:
    (img,) = await DemoProvider().generate(gen(aspect_ratio=ratio, size=size), NullHooks())
    assert (img.width, img.height) == expected


async def test_latency_reports_progress_and_a_task_id() -> None:
    hooks = Hooks()
    await DemoProvider(latency=0.04, steps=4).generate(gen(), hooks)
    assert hooks.percents == [25, 50, 75] and hooks.tasks == ["demo-j1"]


@pytest.mark.parametrize(
    ("marker", "error"),
    [("[demo:refuse]", Refused), ("[demo:fail]", Transient), ("[demo:auth]", AuthFailed)],
)
async def test_played_failures(marker: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        await DemoProvider().generate(gen(f"a fox {marker}"), NullHooks())


def test_verify_rejects_what_is_not_an_image() -> None:
    with pytest.raises(Transient):
        verify_image(b"")
    with pytest.raises(Transient):
        verify_image(b"<html>expired</html>")
    png = io.BytesIO()
    Image.new("RGB", (10, 10)).save(png, format="PNG")
    with pytest.raises(Transient):
        verify_image(png.getvalue()[:40])  # truncated
    with pytest.raises(Transient):
        verify_image(png.getvalue(), max_bytes=10)
    ok = verify_image(png.getvalue())
    assert (ok.width, ok.height, ok.mime) == (10, 10, "image/png")


async def test_big_results_are_verified_on_a_thread_as_strictly() -> None:
    png = io.BytesIO()
    Image.effect_noise((512, 512), 64).convert("RGB").save(png, format="PNG")
    data = png.getvalue()
    assert len(data) > OFF_LOOP_BYTES
    ok = await verified(data)
    assert (ok.width, ok.height, ok.mime) == (512, 512, "image/png")
    broken = data[:1000] + bytes(len(data) - 2000) + data[-1000:]  # a zeroed middle: bad CRCs
    with pytest.raises(Transient):
        await verified(broken)
    with pytest.raises(Transient):
        await verified(data, max_bytes=OFF_LOOP_BYTES)


async def test_big_inputs_go_off_the_loop_and_small_ones_stay() -> None:
    def where() -> str:
        return threading.current_thread().name

    assert await off_loop(OFF_LOOP_BYTES - 1, where) == threading.current_thread().name
    assert await off_loop(OFF_LOOP_BYTES, where) != threading.current_thread().name
    png = io.BytesIO()
    Image.effect_noise((512, 512), 64).convert("RGB").save(png, format="PNG")
    b64 = base64.b64encode(png.getvalue()).decode()
    ok = await decoded(b64)
    assert (ok.width, ok.height, ok.mime) == (512, 512, "image/png")
    with pytest.raises(Transient):
        await decoded(b64[:-4000])  # truncated: not a whole PNG


def test_ratio_size() -> None:
    assert ratio_size("16:9", 1024) == (1024, 576)
    assert ratio_size(None, 512) == (512, 512)
