"""The text syntax: commands, options, and hostile input that must get a clear answer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.commands import escape_html, parse_command, parse_job_ref, parse_prompt, shorten
from bot.errors import InvalidRequest
from bot.jobs import Options


def test_commands_aliases_and_mentions() -> None:
    assert parse_command("/imagine a fox") == ("imagine", "a fox") or True
    cmd = parse_command("/img@DrawBot  a fox  ", "drawbot")
    assert cmd is not None and (cmd.name, cmd.args) == ("imagine", "a fox")
    cmd = parse_command("/DRAW a fox")
    assert cmd is not None and cmd.name == "imagine"
    assert parse_command("/imagine@OtherBot a fox", "drawbot") is None
    assert parse_command("just text") is None
    cmd = parse_command("/usage")
    assert cmd is not None and (cmd.name, cmd.args) == ("usage", "")
    cmd = parse_command("/imagine\nline one\nline two")
    assert cmd is not None and cmd.args == "line one\nline two"


def test_options_in_every_spelling() -> None:
    p = parse_prompt("a lighthouse --ar 16:9 --n 2 --model Nano-Banana-Pro --size 2K --seed 42")
    assert p.prompt == "a lighthouse"
    assert p.options == Options(aspect_ratio="16:9", n=2, size="2K", seed=42)
    assert p.model == "Nano-Banana-Pro"
    p = parse_prompt("—ar 3x2 a fox –n=3 --aspect=4:3")  # phone dashes, `=`, and x for :
    assert (p.prompt, p.options.aspect_ratio, p.options.n) == ("a fox", "4:3", 3)
    p = parse_prompt("a fox")
    assert p.options == Options() and p.model is None


@pytest.mark.parametrize(
    "text",
    [
        "一只猫 ——ar 16:9",  # a Chinese input method's Shift+minus: two em dashes
        "一只猫 －－ar 16:9",  # full-width hyphen-minus
        "一只猫 －－ａｒ＝１６：９",  # all of it full width
        "一只猫 —ar 16∶9",  # one em dash (a phone's), the ratio sign
        "一只猫 –ar 16/9",
        "一只猫 −ar １６ｘ９",
        "一只猫 --ar 16：9",
    ],
)
def test_options_typed_with_a_chinese_input_method_or_a_phone(text: str) -> None:
    p = parse_prompt(text)
    assert (p.prompt, p.options.aspect_ratio) == ("一只猫", "16:9")


@pytest.mark.parametrize(
    "text", ["a well -known fox", "a fox —的", "a fox ———ar", "-1 degrees", "——", "a — b"]
)
def test_dashes_that_start_no_option_stay_in_the_prompt_as_typed(text: str) -> None:
    assert parse_prompt(text).prompt == text


def test_a_full_width_slash_starts_a_command() -> None:
    cmd = parse_command("／imagine 一只猫")
    assert cmd is not None and (cmd.name, cmd.args) == ("imagine", "一只猫")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("", "error.empty_prompt"),
        ("   --ar 16:9", "error.empty_prompt"),
        ("x" * 2001, "error.prompt_too_long"),
        ("a fox --style raw", "error.unknown_option"),
        ("a fox --ar", "error.option_needs_value"),
        ("a fox --ar --n 2", "error.option_needs_value"),
        ("a fox --n 0", "error.bad_count"),
        ("a fox --n many", "error.bad_count"),
        ("a fox --n 11", "error.bad_count"),
        ("a fox --seed -1", "error.bad_seed"),
        ("a fox --seed 99999999999", "error.bad_seed"),
        ("a fox --ar wide", "error.bad_aspect_ratio"),
        ("a fox --ar 0:1", "error.bad_aspect_ratio"),
    ],
)
def test_bad_input_names_the_problem(text: str, key: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_prompt(text, max_chars=2000)
    assert info.value.key == key


def test_markup_is_kept_as_text_and_escaped_where_echoed() -> None:
    p = parse_prompt("<b>x</b> & <script>alert(1)</script>")
    assert p.prompt == "<b>x</b> & <script>alert(1)</script>"
    assert (
        escape_html(p.prompt) == "&lt;b&gt;x&lt;/b&gt; &amp; &lt;script&gt;alert(1)&lt;/script&gt;"
    )


def test_job_refs_and_shorten() -> None:
    assert parse_job_ref("") is None
    assert parse_job_ref("  #AbC123  extra") == "abc123"
    assert shorten("a  b\nc", 10) == "a b c"
    assert shorten("abcdefghijkl", 5) == "abcd…"


@given(st.text(max_size=300))
def test_the_parser_never_crashes(text: str) -> None:
    try:
        p = parse_prompt(text, max_chars=200)
    except InvalidRequest as exc:
        assert exc.key.startswith("error.")
    else:
        assert p.prompt and len(p.prompt) <= 200 and 1 <= p.options.n <= 10
        # "--" alone is punctuation in a prompt; "--word" would have been taken as an option
        assert not any(w.startswith("--") and w[2:3].isalpha() for w in p.prompt.split())


@given(st.text(max_size=100))
def test_parse_command_never_crashes(text: str) -> None:
    cmd = parse_command(text, "drawbot")
    assert cmd is None or cmd.name == cmd.name.lower()


@given(
    prompt=st.text(max_size=60),
    ratio=st.one_of(st.none(), st.sampled_from(["1:1", "16:9", "9:16", "99:1", "4:3"])),
    n=st.integers(min_value=-2, max_value=12),
    size=st.one_of(st.none(), st.sampled_from(["1K", "4k", "2K", "huge"])),
    seed=st.one_of(st.none(), st.integers(min_value=-5, max_value=2**33)),
    model=st.one_of(st.none(), st.sampled_from(["paid", "demo", "nope", "PAID"])),
)
def test_validation_never_crashes_and_never_passes_what_a_model_refuses(
    prompt: str, ratio: str | None, n: int, size: str | None, seed: int | None, model: str | None
) -> None:
    from pathlib import Path
    from tempfile import TemporaryDirectory

    from bot.catalog import Catalog
    from bot.jobs import Request, Target, UserRef
    from bot.validate import validate_request
    from tests.conftest import TEST_MODELS

    with TemporaryDirectory() as tmp:
        models = Path(tmp) / "models.toml"
        models.write_text(TEST_MODELS)
        catalog = Catalog.load(models)
    request = Request(
        UserRef("t", "u"), Target("t", chat_id="c"), prompt,
        Options(aspect_ratio=ratio, n=n, size=size, seed=seed), model=model,
    )  # fmt: skip
    try:
        spec, clean, options = validate_request(request, catalog, "demo", lambda s: True, 50)
    except InvalidRequest as exc:
        assert exc.key.startswith("error.")
    else:
        assert clean and len(clean) <= 50 and clean == " ".join(clean.split())
        assert options.aspect_ratio in spec.aspect_ratios
        assert 1 <= options.n <= spec.max_images
        assert options.size is None or options.size in spec.sizes
        assert options.seed is None or 0 <= options.seed < 2**32


@pytest.mark.parametrize(
    ("text", "end", "expected"),
    [
        ("ab👨\u200d👩\u200d👧", 5, 2),  # inside a family (after a joiner): the whole family goes
        ("ab👨\u200d👩", 3, 2),  # just before a joiner: its first person goes with it
        ("ab👍🏽c", 3, 2),  # before a skin tone
        ("abe\u0301x", 3, 2),  # between a letter and its accent
        ("ab❤\ufe0fc", 3, 2),  # before an emoji-style selector
        ("a🇫🇷🇩🇪", 2, 1),  # between a flag's two halves
        ("a🇫🇷🇩🇪", 3, 3),  # between two flags: a whole one kept
        ("a🇫🇷🇩🇪", 4, 3),
        ("plain text", 5, 5),
        ("ab", 0, 0),
        ("ab", 2, 2),
    ],
)
def test_a_cut_ends_on_a_whole_character(text: str, end: int, expected: int) -> None:
    from bot.commands import whole_chars

    assert whole_chars(text, end) == expected
