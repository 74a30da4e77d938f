"""The Telegram text syntax, parsed without a platform: `/imagine a fox --ar 16:9 --n 2`.

Shared by the Telegram adapter, the console chat and `drawbridge generate`. Errors are
`InvalidRequest` with a text key, so every adapter answers them the same way in the user's language.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass

from bot.errors import InvalidRequest
from bot.jobs import Options

ALIASES = {"img": "imagine", "draw": "imagine", "image": "imagine"}
MAX_COUNT = 10
MAX_SEED = 2**32 - 1

_OPTIONS = {
    "ar": "aspect_ratio",
    "aspect": "aspect_ratio",
    "aspect-ratio": "aspect_ratio",
    "aspect_ratio": "aspect_ratio",
    "n": "n",
    "count": "n",
    "model": "model",
    "m": "model",
    "size": "size",
    "seed": "seed",
}
# What a value looks like, for the answer to an option typed without one.
_EXAMPLES = {"aspect_ratio": "16:9", "n": "2", "model": "nano-banana", "size": "2K", "seed": "42"}
_COMMAND = re.compile(r"^[/／]([A-Za-z0-9_]+)(?:@([A-Za-z0-9_]{1,64}))?(?:\s+|$)(.*)$", re.DOTALL)
_OPTION = re.compile(r"^--([A-Za-z][A-Za-z0-9_-]*)(?:=(.*))?$", re.DOTALL)
# `\d` is any script's digits (`１６`, `١٦`), which `int` reads; `²` is not one. A Chinese input
# method types `：` (and some fonts' `∶`), `／` and `ｘ` for the ASCII ones.
_RATIO = re.compile(r"^(\d{1,3})\s*[:：∶x×ｘ/／]\s*(\d{1,3})$")
# Phones turn `--` into an em or en dash; a Chinese input method types `——` (Shift+minus) or
# `－－` (full width). One or two of these before a letter start an option (one ASCII `-` not:
# `-1` or `-ish` are words). The `--` is ASCII here, and so is the option's name (NFKC).
_DASHED = re.compile(r"([-－﹣‐‑‒–—―−]{1,2})([^\W\d_][^=＝]*)(?:[=＝](.*))?", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    args: str


@dataclass(frozen=True, slots=True)
class ParsedPrompt:
    prompt: str
    options: Options
    model: str | None = None


def parse_command(text: str, bot_username: str | None = None) -> Command | None:
    """`/name[@bot] args` → Command; None for plain text or a command addressed to another bot."""
    match = _COMMAND.match(text.strip())
    if match is None:
        return None
    name, mention, args = match.groups()
    if mention and bot_username and mention.lower() != bot_username.lower().lstrip("@"):
        return None
    name = name.lower()
    return Command(ALIASES.get(name, name), args.strip())


def _normalize_dash(token: str) -> str:
    """`token` spelled as the option syntax reads it (`——ａｒ` → `--ar`), else as it is."""
    match = _DASHED.fullmatch(token)
    if match is None or match[1] == "-":
        return token
    value = "" if match[3] is None else "=" + match[3]
    return "--" + unicodedata.normalize("NFKC", match[2]) + value


def parse_ratio(value: str) -> str:
    match = _RATIO.match(value.strip())
    if match is None or int(match[1]) == 0 or int(match[2]) == 0:
        raise InvalidRequest("error.bad_aspect_ratio", value=value)
    return f"{int(match[1])}:{int(match[2])}"


def parse_prompt(text: str, max_chars: int = 2000) -> ParsedPrompt:
    """Split a prompt from its `--options`; unknown or malformed options are errors, not prompt."""
    words: list[str] = []
    values: dict[str, str] = {}
    tokens = text.split()
    i = 0
    while i < len(tokens):
        match = _OPTION.match(_normalize_dash(tokens[i]))
        i += 1
        if match is None:
            words.append(tokens[i - 1])  # a prompt word stays as typed
            continue
        raw_name, value = match[1], match[2]
        name = _OPTIONS.get(raw_name.lower())
        if name is None:
            raise InvalidRequest("error.unknown_option", option=f"--{raw_name}")
        if value is None and i < len(tokens) and not _OPTION.match(_normalize_dash(tokens[i])):
            value = tokens[i]
            i += 1
        if not value:  # none given, or `--n=`
            option = f"--{raw_name}"
            example = f"{option} {_EXAMPLES[name]}"
            raise InvalidRequest("error.option_needs_value", option=option, example=example)
        values[name] = value
    prompt = clean_prompt(" ".join(words))
    if not prompt:
        raise InvalidRequest("error.empty_prompt")
    if len(prompt) > max_chars:
        raise InvalidRequest("error.prompt_too_long", length=len(prompt), max=max_chars)
    n = 1
    if "n" in values:
        try:
            n = int(values["n"])
        except ValueError:
            n = 0
        if not 1 <= n <= MAX_COUNT:
            raise InvalidRequest("error.bad_count", value=values["n"], max=MAX_COUNT)
    seed: int | None = None
    if "seed" in values:
        try:
            seed = int(values["seed"])
        except ValueError:
            seed = -1
        if not 0 <= seed <= MAX_SEED:
            raise InvalidRequest("error.bad_seed", value=values["seed"])
    ratio = parse_ratio(values["aspect_ratio"]) if "aspect_ratio" in values else None
    options = Options(aspect_ratio=ratio, n=n, size=values.get("size"), seed=seed)
    return ParsedPrompt(prompt, options, values.get("model"))


def parse_job_ref(args: str) -> str | None:
    """The job id in `/cancel abc123` (a leading `#` allowed), or None for "my latest"."""
    token = args.strip().split(maxsplit=1)[0] if args.strip() else ""
    token = token.lstrip("#").lower()
    return token or None


# Characters that show nothing but are not whitespace to `str.split`: the fillers apps use for a
# "blank" message (Hangul fillers, the Braille blank). Format controls (zero-width spaces and
# joiners, direction marks and overrides, the BOM) are found by their category.
_BLANKS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


_SURROGATES = re.compile("[\ud800-\udfff]")


def readable(text: str) -> str:
    """`text` with lone surrogates (bytes a terminal or a file could not decode, kept as
    surrogate escapes) made U+FFFD: they cannot be stored, encoded or sent anywhere."""
    return _SURROGATES.sub("\ufffd", text) if _SURROGATES.search(text) else text


def clean_prompt(text: str) -> str:
    """`text` with its runs of whitespace made one space; "" when nothing in it is visible."""
    prompt = " ".join(readable(text).split())
    for char in prompt:
        if not (char == " " or char in _BLANKS or unicodedata.category(char) in ("Cf", "Cc")):
            return prompt
    return ""


_ZWJ = "\u200d"
_RI = range(0x1F1E6, 0x1F200)  # regional indicators: two make a flag


def _extends(char: str) -> bool:
    """Whether `char` belongs to the character before it (as a reader sees characters)."""
    code = ord(char)
    return (
        unicodedata.category(char) in ("Mn", "Me", "Mc")  # combining marks
        or char == _ZWJ
        or 0xFE00 <= code <= 0xFE0F  # variation selectors (emoji or text style)
        or 0x1F3FB <= code <= 0x1F3FF  # skin tones
        or 0xE0020 <= code <= 0xE007F  # tag characters (subdivision flags)
    )


def whole_chars(text: str, end: int) -> int:
    """`end`, moved back until `text[:end]` ends on a whole character as people see one: not
    inside an emoji's joined sequence, before its skin tone or style, between a letter and its
    accent, or between the two halves of a flag."""
    while 0 < end < len(text) and (_extends(text[end]) or text[end - 1] == _ZWJ):
        end -= 1
    if 0 < end < len(text) and ord(text[end]) in _RI and ord(text[end - 1]) in _RI:
        run = end  # a flag's second half is cut off when an odd count of indicators precede
        while run > 0 and ord(text[run - 1]) in _RI:
            run -= 1
        if (end - run) % 2:
            end -= 1
    return end


def shorten(text: str, limit: int) -> str:
    """Cut `text` to `limit` characters with an ellipsis, on one line, on a whole character."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    return flat[: whole_chars(flat, max(0, limit - 1))].rstrip() + "…"


def escape_html(text: str) -> str:
    """For Telegram's HTML parse mode and anywhere else a prompt is echoed into markup."""
    return html.escape(text, quote=False)
