"""The HTTP client under python-telegram-bot for the bot's calls: aiohttp, uploads in one piece.

PTB's default client is httpx, whose connection pool (httpcore) rescans every connection, and
polls each idle socket, for every request it places, and which writes a multipart body (a photo
with its caption, buttons and reply parameters) as some thirty small socket writes. Measured with
`bench/first_reply.py` and `bench/e2e.py`, that made a Bot API call cost 3–10 ms of the one
thread that runs the bot, and 300 acks at once took seconds of CPU. `AiohttpRequest` is a PTB
request on aiohttp (already the providers' client): a connector that hands out idle connections
without a scan, parameters sent as one JSON body (not PTB's per-parameter JSON, url-encoded),
multipart bodies rendered to one buffer.

`getUpdates` keeps PTB's own request object: one long poll at a time, where none of this matters.
"""

from __future__ import annotations

import io
import json
import random
from typing import IO

import aiohttp
from telegram._utils.defaultvalue import DefaultValue
from telegram._utils.types import ODVInput
from telegram.error import NetworkError, TimedOut
from telegram.request import BaseRequest, RequestData

from bot import __version__

POOL_SIZE = 256  # connections at once, as PTB's ApplicationBuilder gives the bot's own calls
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 5.0
POOL_TIMEOUT = 1.0
MEDIA_TIMEOUT = 20.0  # sending an upload, at least (PTB's media_write_timeout)
UPLOAD_RATE = 250_000  # bytes a second an upload may be as slow as before it times out
STREAM_ABOVE = 1 << 20  # bodies bigger than this are streamed in chunks (aiohttp's advice)


def _quote(value: str) -> str:
    """A multipart header parameter value, escaped as browsers (and httpx) do."""
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def multipart_body(
    fields: dict[str, str], files: dict[str, tuple[str, bytes | IO[bytes], str]]
) -> tuple[bytes, str]:
    """A multipart/form-data body in one buffer, and its content type.

    The boundary needs to be unlikely in the body, not secret: `random`, not `uuid4`, whose
    `os.urandom` is a system call per upload (1–2 % of the loop at 200 photos a second).
    """
    boundary = f"{random.getrandbits(128):032x}"
    dash = f"--{boundary}\r\n".encode()
    parts: list[bytes] = []
    for name, value in fields.items():
        parts += [
            dash,
            f'Content-Disposition: form-data; name="{_quote(name)}"\r\n\r\n'.encode(),
            value.encode(),
            b"\r\n",
        ]
    for name, (filename, content, mimetype) in files.items():
        data = content if isinstance(content, bytes) else content.read()
        parts += [
            dash,
            (
                f'Content-Disposition: form-data; name="{_quote(name)}"; '
                f'filename="{_quote(filename)}"\r\nContent-Type: {mimetype}\r\n\r\n'
            ).encode(),
            data,
            b"\r\n",
        ]
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _seconds(value: ODVInput[float], default: float | None) -> float | None:
    return default if isinstance(value, DefaultValue) else value


class AiohttpRequest(BaseRequest):
    """A PTB `BaseRequest` on one aiohttp session (see the module docstring)."""

    def __init__(self, pool_size: int = POOL_SIZE, read_timeout: float | None = READ_TIMEOUT):
        self.pool_size = pool_size
        self._read_timeout = read_timeout
        self._session: aiohttp.ClientSession | None = None

    @property
    def read_timeout(self) -> float | None:
        return self._read_timeout

    async def initialize(self) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.pool_size, ttl_dns_cache=300),
                headers={"User-Agent": f"drawbridge/{__version__} (python-telegram-bot)"},
            )

    async def shutdown(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def do_request(
        self,
        url: str,
        method: str,
        request_data: RequestData | None = None,
        read_timeout: ODVInput[float] = BaseRequest.DEFAULT_NONE,
        write_timeout: ODVInput[float] = BaseRequest.DEFAULT_NONE,
        connect_timeout: ODVInput[float] = BaseRequest.DEFAULT_NONE,
        pool_timeout: ODVInput[float] = BaseRequest.DEFAULT_NONE,
    ) -> tuple[int, bytes]:
        if self._session is None or self._session.closed:
            raise RuntimeError("This AiohttpRequest is not initialized!")
        body: bytes | io.BytesIO | None = None
        headers: dict[str, str] = {}
        files = request_data.multipart_data if request_data is not None else None
        total: float | None = None
        if request_data is not None and files:
            raw, headers["Content-Type"] = multipart_body(request_data.json_parameters, files)
            body = io.BytesIO(raw) if len(raw) > STREAM_ABOVE else raw
            # aiohttp has no write timeout: bound the whole call, by the size of the upload.
            write = _seconds(write_timeout, MEDIA_TIMEOUT)
            if write is not None:
                write = max(write, len(raw) / UPLOAD_RATE)
                total = write + (_seconds(read_timeout, self._read_timeout) or 0.0)
        elif request_data is not None:
            body = json.dumps(request_data.parameters).encode()
            headers["Content-Type"] = "application/json"
        connect = _seconds(connect_timeout, CONNECT_TIMEOUT)
        pool = _seconds(pool_timeout, POOL_TIMEOUT)
        timeout = aiohttp.ClientTimeout(
            total=total,
            connect=None if connect is None or pool is None else connect + pool,
            sock_connect=connect,
            sock_read=_seconds(read_timeout, self._read_timeout),
        )
        try:
            async with self._session.request(
                method, url, data=body, headers=headers, timeout=timeout
            ) as response:
                return response.status, await response.read()
        except TimeoutError as exc:
            raise TimedOut from exc
        except aiohttp.ClientError as exc:
            raise NetworkError(f"aiohttp.{exc.__class__.__name__}: {exc}") from exc
