"""Settings from the environment and `.env` (the environment wins), validated once at start-up.

Every name of the contract's settings table is a field here, spelled as its environment variable
in upper case. A bad value raises `SettingsError` with one line naming the variable; a secret's
value never appears in that line, in `repr`, or in the logs (see `secret_values`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dotenv import dotenv_values
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from bot.errors import SettingsError
from bot.jobs import PLATFORMS

IdSet = frozenset[str]
_SNOWFLAKE = re.compile(r"[0-9]{1,20}")
# Who ADMIN_IDS and ALLOWED_IDS can name: a user on a platform, a chat, a Discord guild.
ID_KINDS = frozenset({*PLATFORMS, *(f"{kind}-chat" for kind in PLATFORMS), "discord-guild"})
_IDENT = re.compile(r"[A-Za-z0-9_.@-]+")  # a number (a chat's may be negative) or a login

# Model family → providers to try in order. Same model, different vendor: a GrsAI outage moves
# nano-banana jobs to Gemini's own API (when both keys are set), and back when it recovers.
DEFAULT_FALLBACKS = (
    "nano-banana=grsai,gemini;nano-banana-pro=grsai,gemini;"
    "nano-banana-2=grsai,gemini;gpt-image-2=openai,grsai"
)
PROVIDERS = ("demo", "grsai", "openai", "gemini")


def parse_fallbacks(value: str) -> dict[str, tuple[str, ...]]:
    """`family=p1,p2;family2=p3` → {family: (p1, p2), …}."""
    chains: dict[str, tuple[str, ...]] = {}
    for part in value.split(";"):
        if not part.strip():
            continue
        family, sep, names = part.partition("=")
        providers = tuple(n.strip().lower() for n in names.split(",") if n.strip())
        if not sep or not family.strip() or not providers:
            raise ValueError(f"{part.strip()!r} is not family=provider,provider")
        unknown = [n for n in providers if n not in PROVIDERS]
        if unknown:
            raise ValueError(f"unknown provider {unknown[0]!r} (known: {', '.join(PROVIDERS)})")
        chains[family.strip().lower()] = providers
    return chains


def parse_per_provider(value: str) -> dict[str, int]:
    """`grsai=8,openai=4` → {"grsai": 8, "openai": 4}."""
    result: dict[str, int] = {}
    for part in value.split(","):
        if not part.strip():
            continue
        name, sep, number = part.partition("=")
        name = name.strip().lower()
        if not sep or name not in PROVIDERS or not number.strip().isdigit():
            raise ValueError(f"{part.strip()!r} is not provider=number ({', '.join(PROVIDERS)})")
        result[name] = int(number)
    return result


class Settings(BaseModel):
    """The validated settings; field names are the environment variables in lower case."""

    # No setting takes `inf` or `nan`: `QUOTA_USER_DAILY_USD=inf` is no limit, and said
    # "of $Infinity" to users; a timeout of `inf` is none.
    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        hide_input_in_errors=True,
        populate_by_name=True,
        allow_inf_nan=False,
    )

    data_dir: Path = Field(Path("data"), alias="DRAWBRIDGE_DATA_DIR")

    telegram_bot_token: SecretStr | None = None
    telegram_api_url: str = "https://api.telegram.org"
    telegram_webhook_url: str | None = None
    telegram_webhook_secret: SecretStr | None = None
    # Stars a day Telegram paid broadcasts may cost (sends past the free ~30 a second); 0 = off.
    telegram_paid_broadcast_stars: float = Field(0.0, ge=0, le=1_000_000)

    discord_bot_token: SecretStr | None = None
    discord_api_url: str = "https://discord.com/api/v10"
    discord_gateway_url: str = "wss://gateway.discord.gg/"
    discord_guild_ids: frozenset[int] = frozenset()

    grsai_api_key: SecretStr | None = None
    grsai_base_url: str = "https://grsaiapi.com"
    openai_api_key: SecretStr | None = None
    openai_base_url: str = "https://api.openai.com/v1"
    gemini_api_key: SecretStr | None = None
    gemini_base_url: str = "https://generativelanguage.googleapis.com/v1beta"

    grsai_mode: Literal["stream", "poll"] = "stream"
    provider_fallbacks: str = DEFAULT_FALLBACKS
    provider_concurrency: str = ""
    provider_rpm: str = ""

    default_model: str | None = None
    models_file: Path | None = None
    blocklist_file: Path | None = None
    concurrency: int = Field(16, ge=1, le=10_000)
    queue_max: int = Field(200, ge=1, le=1_000_000)
    max_pending_per_user: int = Field(3, ge=1, le=100_000)
    quota_user_daily_images: int = Field(20, ge=0)
    quota_user_daily_usd: float = Field(0.0, ge=0)
    budget_daily_usd: float = Field(0.0, ge=0)
    admin_ids: IdSet = frozenset()
    allowed_ids: IdSet = frozenset()
    quota_tz: str = "UTC"

    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)
    public_url: str | None = None

    image_retention_days: float = Field(30.0, ge=0)
    result_cache_ttl: float = Field(0.0, ge=0)
    max_prompt_chars: int = Field(2000, ge=1, le=100_000)
    generate_timeout: float = Field(600.0, gt=0)
    deliver_timeout: float = Field(120.0, gt=0)
    queue_timeout: float = Field(3600.0, gt=0)
    shutdown_grace: float = Field(20.0, ge=0)
    demo_latency: float = Field(0.0, ge=0, le=3600)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["plain", "json"] = "plain"

    @field_validator("data_dir", "models_file", "blocklist_file")
    @classmethod
    def _home(cls, value: Path | None) -> Path | None:
        # `~/botdata` as a shell would read it: `.env` and systemd's EnvironmentFile do not, and
        # a folder named `~` in the working directory invites an `rm -rf ~`.
        return value.expanduser() if value is not None else None

    @field_validator("admin_ids", "allowed_ids", mode="before")
    @classmethod
    def _split_ids(cls, value: Any) -> Any:
        if isinstance(value, str):
            return frozenset(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("discord_guild_ids", mode="before")
    @classmethod
    def _check_guild_ids(cls, value: Any) -> Any:
        # Plain digits only (int() alone would take "+5", "1_000" or Arabic-Indic digits), and the
        # error names the bad id, as ADMIN_IDS does, rather than pydantic's generic int message.
        if not isinstance(value, str):
            return value
        ids: set[int] = set()
        for part in value.split(","):
            item = part.strip()
            if not item:
                continue
            if not _SNOWFLAKE.fullmatch(item) or not 0 < int(item) < 2**64:
                raise ValueError(f"{item!r} is not a guild id (a number, like 1200000000000000001)")
            ids.add(int(item))
        return frozenset(ids)

    @field_validator("admin_ids", "allowed_ids")
    @classmethod
    def _check_ids(cls, value: IdSet) -> IdSet:
        for item in value:
            kind, _, ident = item.partition(":")
            if not kind or not _IDENT.fullmatch(ident):
                raise ValueError(
                    f"{item!r} is not platform:id (like telegram:123; several are separated "
                    "by commas: telegram:123,discord:456)"
                )
            if kind not in ID_KINDS:
                known = ", ".join(sorted(ID_KINDS))
                raise ValueError(f"{item!r}: {kind!r} is not one of {known}")
        return value

    @field_validator("provider_fallbacks")
    @classmethod
    def _check_fallbacks(cls, value: str) -> str:
        parse_fallbacks(value)
        return value

    @field_validator("provider_concurrency", "provider_rpm")
    @classmethod
    def _check_per_provider(cls, value: str) -> str:
        parse_per_provider(value)
        return value

    @field_validator("quota_tz")
    @classmethod
    def _check_tz(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator(
        "telegram_api_url",
        "telegram_webhook_url",
        "discord_api_url",
        "discord_gateway_url",
        "grsai_base_url",
        "openai_base_url",
        "gemini_base_url",
        "public_url",
    )
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://", "ws://", "wss://")):
            raise ValueError(f"{value!r} is not an http(s) or ws(s) URL")
        return value.rstrip("/") if not value.startswith(("ws://", "wss://")) else value

    @model_validator(mode="after")
    def _check_webhook_has_a_server(self) -> Settings:
        # Telegram would be told to POST to a URL that no server of ours answers: every update lost.
        if self.telegram_webhook_url is not None and self.http_port == 0:
            raise ValueError(
                "TELEGRAM_WEBHOOK_URL: webhook mode needs the HTTP server, but HTTP_PORT=0 turns "
                "it off; set HTTP_PORT, or unset TELEGRAM_WEBHOOK_URL to use long polling"
            )
        return self

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.quota_tz)

    @property
    def fallbacks(self) -> dict[str, tuple[str, ...]]:
        return parse_fallbacks(self.provider_fallbacks)

    @property
    def concurrency_by_provider(self) -> dict[str, int]:
        return parse_per_provider(self.provider_concurrency)

    @property
    def rpm_by_provider(self) -> dict[str, int]:
        return parse_per_provider(self.provider_rpm)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "drawbridge.db"

    def secret_values(self) -> list[str]:
        """Every configured secret, for the log filter that redacts them."""
        secrets = (
            self.telegram_bot_token,
            self.telegram_webhook_secret,
            self.discord_bot_token,
            self.grsai_api_key,
            self.openai_api_key,
            self.gemini_api_key,
        )
        return [s.get_secret_value() for s in secrets if s is not None and s.get_secret_value()]

    def configured_providers(self) -> list[str]:
        """Paid providers with a key, in the order the contract lists them."""
        keys = (
            ("grsai", self.grsai_api_key),
            ("openai", self.openai_api_key),
            ("gemini", self.gemini_api_key),
        )
        return [name for name, key in keys if key is not None]

    def admin(self, *ids: str) -> bool:
        return any(i in self.admin_ids for i in ids)

    def allowed(self, *ids: str) -> bool:
        return not self.allowed_ids or any(i in self.allowed_ids for i in ids)


def _env_name(name: str, field: Any) -> str:
    alias = getattr(field, "alias", None)
    return alias if isinstance(alias, str) else name.upper()


ENV_NAMES: dict[str, str] = {
    name: _env_name(name, field) for name, field in Settings.model_fields.items()
}


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: Path | None = Path(".env")
) -> Settings:
    """Read `.env` (when it exists), let the environment override it, validate everything."""
    values: dict[str, str] = {}
    if env_file is not None and env_file.is_file():
        try:
            loaded = dotenv_values(env_file)
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"{env_file}: cannot read ({exc.__class__.__name__})") from None
        values.update({k: v for k, v in loaded.items() if v is not None})
    values.update(os.environ if environ is None else environ)
    data: dict[str, str] = {}
    for name, env in ENV_NAMES.items():
        raw = values.get(env)
        if raw is not None and raw.strip():  # empty means unset
            data[env if env != name.upper() else name] = raw.strip()
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(_first_error(exc)) from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors(include_input=False, include_url=False)[0]
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:  # a check across settings: its message names them all
        return message
    field = str(error["loc"][0])
    return f"{ENV_NAMES.get(field, field.upper())}: {message}"
