"""No token or API key ever reaches the logs, in messages, arguments or tracebacks."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.logs import setup_logging

SECRET = "123456789:AAE-secret-telegram-token"
KEY = "sk-live-0123456789abcdef"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_secrets_are_scrubbed_everywhere(tmp_path: Path, fmt: str, restore_logging: None) -> None:
    path = tmp_path / "log.txt"
    setup_logging("DEBUG", fmt, [SECRET, KEY], path)
    log = logging.getLogger("drawbridge.test")
    log.info("calling https://api.telegram.org/bot%s/getUpdates", SECRET)
    log.debug(f"header Authorization: Bearer {KEY}")
    try:
        raise RuntimeError(f"the API said: invalid key {KEY} for bot{SECRET}")
    except RuntimeError:
        log.exception("provider failed")
    logging.getLogger("httpx").warning("GET /bot%s/sendPhoto", SECRET)
    text = path.read_text()
    assert SECRET not in text and KEY not in text
    assert text.count("***") >= 5 and "RuntimeError" in text and "Traceback" in text
    if fmt == "json":
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        assert any("exc" in entry for entry in lines)
