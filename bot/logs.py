"""Logging set-up: plain or JSON lines, and a filter that scrubs every configured secret."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path


class RedactSecrets(logging.Filter):
    """Replaces any configured token or key in a record (message, args, traceback) with `***`."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg = self.scrub(message)
        record.args = None
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
            record.exc_info = None  # the scrubbed text is what gets printed
        return True


class QuietReconnects(logging.Filter):
    """discord.py logs each try to reconnect its gateway as an ERROR with a full traceback (a
    minute's outage, a screenful): one plain warning a minute instead, naming the error."""

    def __init__(self, every: float = 60.0) -> None:
        super().__init__()
        self.every = every
        self._last = -math.inf

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Attempting a reconnect"):
            return True
        now = time.monotonic()
        if now - self._last < self.every:
            return False
        self._last = now
        exc = record.exc_info[1] if record.exc_info else None
        record.msg = "discord: the gateway connection was lost (%s); reconnecting"
        record.args = (type(exc).__name__ if exc is not None else "no reason given",)
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_text or record.exc_info:
            entry["exc"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(
    level: str = "INFO",
    fmt: str = "plain",
    secrets: Iterable[str] = (),
    file: Path | None = None,
) -> None:
    """Configure the root logger once: to `file` if given (the console chat), else stderr."""
    handler: logging.Handler
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactSecrets(secrets))
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries' chatter (every HTTP request) would drown the job lines.
    for noisy in ("httpx", "aiosqlite", "discord.gateway", "discord.http", "PIL"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    client = logging.getLogger("discord.client")
    for old_filter in [f for f in client.filters if isinstance(f, QuietReconnects)]:
        client.removeFilter(old_filter)
    client.addFilter(QuietReconnects())
