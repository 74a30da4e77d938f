"""The model catalog: shipped models, operator overrides, prices per size, defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.catalog import Catalog, CatalogError


def test_shipped_catalog_has_the_seed_models() -> None:
    catalog = Catalog.load()
    for name in (
        "demo", "nano-banana", "nano-banana-pro", "nano-banana-2", "grsai-gpt-image-2",
        "gpt-image-1", "gpt-image-2", "dall-e-3", "gemini-2.5-flash-image", "gemini-3-pro-image",
    ):  # fmt: skip
        assert name in catalog, name
    demo = catalog.get("DEMO")
    assert demo is not None and demo.provider == "demo" and demo.price_usd == 0
    assert "16:9" in demo.aspect_ratios and demo.max_images >= 2
    pro = catalog.get("nano-banana-pro")
    assert pro is not None and pro.provider == "grsai" and pro.endpoint == "/v1/draw/nano-banana"
    assert pro.price_for("4K") > pro.price_for("1K") == pro.price_usd
    assert pro.cost(2, "4k") == pytest.approx(2 * pro.price_for("4K"))
    dalle = catalog.get("dall-e-3")
    assert dalle is not None and not dalle.reference_images and dalle.max_images == 1
    gem = catalog.get("gemini-3-pro-image")
    assert gem is not None and gem.remote_model == "gemini-3-pro-image-preview"


def test_a_models_file_adds_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        "[models.demo]\nprice_usd = 0.25\n\n"
        '[models.my-flux]\nprovider = "openai"\nremote_model = "flux-kontext"\nprice_usd = 0.03\n'
    )
    catalog = Catalog.load(path)
    demo = catalog.get("demo")
    assert demo is not None and demo.price_usd == 0.25 and "16:9" in demo.aspect_ratios
    flux = catalog.get("my-flux")
    assert flux is not None and flux.remote_model == "flux-kontext"
    assert flux.aspect_ratios == ("1:1",) and flux.max_images == 1 and not flux.reference_images
    assert [s.name for s in catalog.for_provider("openai")][-1] == "my-flux"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[models.x]\nprice_usd = 1\n", "needs a provider"),
        ('[models.x]\nprovider = "demo"\nprice_usd = "cheap"\n', "wrong type"),
        ('[models.x]\nprovider = "demo"\ncolour = "red"\n', "unknown field"),
        (
            '[models.x]\nprovider = "demo"\naspect_ratios = ["1:1"]\ndefault_aspect_ratio = "2:1"\n',
            "default_aspect_ratio",
        ),
        ('[models.x]\nprovider = "demo"\nmax_images = 50\n', "max_images"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_a_broken_models_file_is_one_clear_line(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(CatalogError) as info:
        Catalog.load(path)
    assert fragment in str(info.value) and str(info.value).startswith("MODELS_FILE:")


def test_default_model_prefers_the_setting_then_configured_providers() -> None:
    catalog = Catalog.load()
    assert catalog.default_model([]) == "demo"
    assert catalog.default_model(["gemini", "openai"]) == "gemini-2.5-flash-image"
    assert catalog.default_model(["grsai"], "Nano-Banana-Pro") == "nano-banana-pro"
    with pytest.raises(CatalogError):
        catalog.default_model([], "no-such-model")
