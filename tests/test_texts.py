"""The English and Chinese catalogs stay in step, and every reason and error has a text."""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest

from bot.errors import ErrorKind, QuotaExceeded, UserError
from bot.stats import Period, render_period
from bot.texts import EN, ZH, pick_lang, queued_text, render_error, t

ROOT = Path(__file__).parent.parent


def test_both_catalogs_have_the_same_keys_and_placeholders() -> None:
    assert set(EN) == set(ZH)
    fields = string.Formatter()
    for key in EN:
        en = {f for _, f, _, _ in fields.parse(EN[key]) if f}
        zh = {f for _, f, _, _ in fields.parse(ZH[key]) if f}
        assert en == zh, key


def test_every_key_the_code_uses_exists() -> None:
    used: set[str] = set()
    for path in [*ROOT.glob("bot/**/*.py"), *ROOT.glob("adapters/**/*.py")]:
        used |= set(
            re.findall(
                r'"((?:error|status|reason|usage|jobs|cancel|models|settings|delivered|batch|console)\.[a-z_]+)"',
                path.read_text(),
            )
        )
    missing = sorted(k for k in used if k not in EN and not k.endswith(".toml"))
    assert not missing


def test_every_error_kind_has_a_reason() -> None:
    for kind in ErrorKind:
        assert f"reason.{kind.value}" in EN


@pytest.mark.parametrize("code", ["zh", "zh-CN", "zh_TW", "ZH-hans"])
def test_chinese_codes(code: str) -> None:
    assert pick_lang(code) == "zh"


@pytest.mark.parametrize("code", [None, "", "en", "en-US", "ru", "zhx"])
def test_other_codes_are_english(code: str | None) -> None:
    assert pick_lang(code) == "en"


def test_rendering_is_safe() -> None:
    assert "3" in t("en", "status.queued", position=3, job="j", model="m", n=1)
    assert "?" in t("en", "status.queued")  # missing parameters never raise
    assert t("fr", "error.budget") == EN["error.budget"]
    assert t("en", "no.such.key") == "no.such.key"
    # a value is never formatted again, so braces in a prompt or reason stay text
    assert "{job.__class__}" in t("en", "status.failed", reason="{job.__class__}", job="x")
    text = render_error("zh", QuotaExceeded("error.quota_images", used=20, limit=20))
    assert "20" in text and text == ZH["error.quota_images"].format(used=20, limit=20)
    assert render_error("en", UserError()) == EN["error.generic"]


def test_an_error_escapes_the_value_it_echoes_and_not_its_own_words() -> None:
    exc = UserError("error.bad_count", value="*" * 100, max=10)
    text = render_error("en", exc, escape=lambda v: f"<{v}>")
    assert text == f"--n takes a number from 1 to 10, not <{'*' * 63}…>."


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_stats_lines_are_in_the_admins_language(lang: str) -> None:
    figures = Period("L", 3, 2, 0.5, [("demo", 2, 0.5)], [("refused", 1)], p50=1.0, p95=2.0)
    lines = render_period(figures, lang).split("\n")
    assert lines == [
        t(lang, "stats.period", label="L", jobs=3, images=2, spend="$0.50"),
        "  " + t(lang, "stats.latency", p50="1.0", p95="2.0"),
        "  " + t(lang, "stats.model", model="demo", images=2, spend="$0.50"),
        "  " + t(lang, "stats.failures", failures=f"{t(lang, 'kind.refused')} 1"),
    ]
    if lang == "en":  # what the operator's scripts read today
        assert lines[0] == "L: 3 jobs · 2 images · $0.50"


def test_the_queued_line_shows_the_price_of_a_paid_model_only() -> None:
    assert queued_text("en", "j1", 2, "demo", 1) == "🕒 Queued #2 · demo ×1 · job j1"
    assert queued_text("en", "j1", 1, "nano-banana", 5, 0.055) == (
        "🕒 Queued #1 · nano-banana ×5 · $0.055 · job j1"
    )
    assert "$0.08" in queued_text("zh", "j1", 1, "nano-banana", 2, 0.08)
