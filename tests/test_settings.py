"""Settings: defaults, .env under the environment, one clear line per bad value, secrets hidden."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.errors import SettingsError
from bot.settings import ENV_NAMES, load_settings


def test_defaults_follow_the_contract(tmp_path: Path) -> None:
    s = load_settings({}, env_file=None)
    assert s.data_dir == Path("data")
    assert s.telegram_api_url == "https://api.telegram.org"
    assert s.discord_api_url == "https://discord.com/api/v10"
    assert s.discord_gateway_url == "wss://gateway.discord.gg/"
    assert s.grsai_base_url == "https://grsaiapi.com"
    assert s.openai_base_url == "https://api.openai.com/v1"
    assert s.gemini_base_url == "https://generativelanguage.googleapis.com/v1beta"
    assert (s.concurrency, s.queue_max, s.max_pending_per_user) == (16, 200, 3)
    assert (s.quota_user_daily_images, s.quota_user_daily_usd, s.budget_daily_usd) == (20, 0, 0)
    assert (s.http_host, s.http_port, s.quota_tz) == ("127.0.0.1", 8080, "UTC")
    assert s.telegram_bot_token is None and s.configured_providers() == []


def test_every_contract_name_is_a_setting() -> None:
    contract = {
        "DRAWBRIDGE_DATA_DIR", "TELEGRAM_BOT_TOKEN", "TELEGRAM_API_URL", "TELEGRAM_WEBHOOK_URL",
        "TELEGRAM_WEBHOOK_SECRET", "DISCORD_BOT_TOKEN", "DISCORD_API_URL", "DISCORD_GATEWAY_URL",
        "GRSAI_API_KEY", "GRSAI_BASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL", "GEMINI_API_KEY",
        "GEMINI_BASE_URL", "DEFAULT_MODEL", "CONCURRENCY", "QUEUE_MAX", "MAX_PENDING_PER_USER",
        "QUOTA_USER_DAILY_IMAGES", "QUOTA_USER_DAILY_USD", "BUDGET_DAILY_USD", "ADMIN_IDS",
        "ALLOWED_IDS", "HTTP_HOST", "HTTP_PORT", "PUBLIC_URL", "QUOTA_TZ",
    }  # fmt: skip
    assert contract <= set(ENV_NAMES.values())


def test_example_env_lists_every_setting() -> None:
    example = (Path(__file__).parent.parent / ".env.example").read_text()
    names = {
        line.split("=", 1)[0]
        for line in example.splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert set(ENV_NAMES.values()) <= names


def test_environment_wins_over_dotenv_and_empty_means_unset(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text(
        "CONCURRENCY=4\nQUEUE_MAX=50\nTELEGRAM_BOT_TOKEN=\nADMIN_IDS=telegram:1, discord:2\n"
    )
    s = load_settings({"CONCURRENCY": "8", "DRAWBRIDGE_DATA_DIR": str(tmp_path)}, env_file=env)
    assert (s.concurrency, s.queue_max, s.data_dir) == (8, 50, tmp_path)
    assert s.telegram_bot_token is None
    assert s.admin_ids == frozenset({"telegram:1", "discord:2"})
    assert s.admin("discord:2") and not s.admin("discord:3")
    assert s.allowed("anyone")  # no ALLOWED_IDS: everyone


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CONCURRENCY", "zero"),
        ("CONCURRENCY", "0"),
        ("HTTP_PORT", "70000"),
        ("QUOTA_TZ", "Mars/Olympus"),
        ("ADMIN_IDS", "12345"),
        ("TELEGRAM_API_URL", "api.telegram.org"),
        ("QUOTA_USER_DAILY_USD", "-1"),
        ("LOG_FORMAT", "xml"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_setting(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({name: value}, env_file=None)
    message = str(info.value)
    assert message.startswith(f"{name}:")
    assert "\n" not in message


def test_secrets_never_show() -> None:
    secret = "123456:AAE-very-secret-token"
    s = load_settings(
        {"TELEGRAM_BOT_TOKEN": secret, "OPENAI_API_KEY": "sk-secret-key"}, env_file=None
    )
    assert secret not in repr(s) and secret not in str(s)
    assert "sk-secret-key" not in repr(s)
    assert set(s.secret_values()) == {secret, "sk-secret-key"}
    assert s.configured_providers() == ["openai"]
    with pytest.raises(SettingsError) as info:
        load_settings({"GEMINI_API_KEY": "AIza-secret", "CONCURRENCY": "x"}, env_file=None)
    assert "AIza-secret" not in str(info.value)


def test_quota_tz_gives_a_zone() -> None:
    s = load_settings({"QUOTA_TZ": "Asia/Shanghai", "LOG_LEVEL": "debug"}, env_file=None)
    assert s.tz.key == "Asia/Shanghai" and s.log_level == "DEBUG"
