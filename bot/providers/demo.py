"""The offline `demo` provider: a real, deterministic PNG per (prompt, seed, index), labelled DEMO.

It needs no key and no network, so a fresh checkout shows the whole path. A latency makes it
stand in for a slow paid API in benchmarks. A few prompt markers play provider failures:
`[demo:refuse]`, `[demo:fail]` (transient, every attempt), `[demo:auth]`, `[demo:hang]`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import textwrap

from PIL import Image, ImageDraw, ImageFont

from bot.errors import AuthFailed, Refused, Transient
from bot.images import ratio_size
from bot.jobs import GeneratedImage
from bot.providers.base import GenerationRequest, JobHooks

SIZES = {"256": 256, "512": 512, "1k": 1024, "2k": 2048, "4k": 4096}
DEFAULT_SIDE = 512


class DemoProvider:
    """Renders labelled PNGs with Pillow in a worker thread."""

    name = "demo"

    def __init__(self, latency: float = 0.0, steps: int = 4) -> None:
        self.latency = latency
        self.steps = max(1, steps)

    async def generate(self, request: GenerationRequest, hooks: JobHooks) -> list[GeneratedImage]:
        prompt = request.prompt.lower()
        if "[demo:refuse]" in prompt:
            raise Refused("the demo model refuses prompts marked [demo:refuse]")
        if "[demo:auth]" in prompt:
            raise AuthFailed("the demo model plays a rejected API key")
        if "[demo:fail]" in prompt:
            raise Transient("the demo model plays a provider outage")
        if "[demo:hang]" in prompt:
            await asyncio.Event().wait()
        if self.latency <= 0:
            return await asyncio.to_thread(render_all, request)
        if request.task_id is None:
            await hooks.task_submitted(f"demo-{request.job_id}")
        # The picture is drawn while the "API" works, so a job takes `latency` in all, the way
        # a real provider's latency includes its own rendering.
        images = asyncio.ensure_future(asyncio.to_thread(render_all, request))
        try:
            for step in range(1, self.steps + 1):
                await asyncio.sleep(self.latency / self.steps)
                if step < self.steps:
                    await hooks.progress(100 * step // self.steps)
            return await images
        finally:
            images.cancel()

    async def aclose(self) -> None:
        return None


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render_all(request: GenerationRequest) -> list[GeneratedImage]:
    return [render(request, i) for i in range(request.n)]


def render(request: GenerationRequest, index: int) -> GeneratedImage:
    """One image; the same request and index always give the same bytes."""
    side = SIZES.get((request.size or "").lower(), DEFAULT_SIDE)
    width, height = ratio_size(request.aspect_ratio, side)
    key = f"{request.prompt}\x00{request.seed}\x00{index}".encode()
    digest = hashlib.sha256(key).digest()
    background = (digest[0], digest[1], digest[2])
    band = (digest[3], digest[4], digest[5])
    # A four-colour palette image: a real, distinct picture per request that encodes in well
    # under a millisecond (a full-colour one costs ten times that), so benchmarks of the engine
    # measure the engine.
    img = Image.new("P", (width, height), 0)
    img.putpalette([*background, *band, 0, 0, 0, 255, 255, 255])
    img.paste(1, (0, height * 2 // 3, width, height))
    draw = ImageDraw.Draw(img)
    scale = min(width, height)
    font_big = _font(max(10, scale // 6))
    font_small = _font(max(8, scale // 24))
    shade = 2 if sum(background) > 380 else 3  # black or white, by palette index
    band_shade = 2 if sum(band) > 380 else 3
    margin = max(4, scale // 20)
    draw.text((margin, margin), "DEMO", fill=shade, font=font_big)
    chars = max(8, int(width / (scale / 24) * 1.6))
    body = textwrap.shorten(request.prompt, width=chars * 4, placeholder="…")
    lines = textwrap.wrap(body, width=chars)[:4]
    line_h = max(10, scale // 20)
    y = height - margin - line_h * (len(lines) + 1)
    for line in lines:
        draw.text(
            (margin, y), line, fill=band_shade if y >= height * 2 // 3 else shade, font=font_small
        )
        y += line_h
    label = f"{request.aspect_ratio or '1:1'} · #{index + 1}"
    if request.seed is not None:
        label += f" · seed {request.seed}"
    draw.text((margin, y), label, fill=band_shade, font=font_small)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return GeneratedImage(data=buf.getvalue(), mime="image/png", width=width, height=height)
