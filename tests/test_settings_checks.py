"""Settings checked at load: Discord guild ids, and a Telegram webhook that needs the HTTP server."""

from __future__ import annotations

import pytest

from bot.errors import SettingsError
from bot.settings import load_settings


def test_guild_ids_are_parsed_to_numbers_and_blanks_are_ignored() -> None:
    s = load_settings({"DISCORD_GUILD_IDS": " 1200000000000000001, ,34,"}, env_file=None)
    assert s.discord_guild_ids == frozenset({1200000000000000001, 34})
    assert load_settings({"DISCORD_GUILD_IDS": " , "}, env_file=None).discord_guild_ids == set()


@pytest.mark.parametrize(
    "bad", ["abc", "discord:34", "1.5", "-3", "0", "1_000", "١٢", "99999999999999999999"]
)
def test_a_bad_guild_id_is_one_line_naming_the_setting_and_the_id(bad: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"DISCORD_GUILD_IDS": f"1200000000000000001,{bad}"}, env_file=None)
    message = str(info.value)
    assert message.startswith("DISCORD_GUILD_IDS: ") and "\n" not in message
    assert repr(bad) in message


def test_a_webhook_with_the_http_server_off_names_both_settings() -> None:
    env = {"TELEGRAM_WEBHOOK_URL": "https://bot.example/tg", "HTTP_PORT": "0"}
    with pytest.raises(SettingsError) as info:
        load_settings(env, env_file=None)
    message = str(info.value)
    assert message.startswith("TELEGRAM_WEBHOOK_URL: ") and "\n" not in message
    assert "HTTP_PORT" in message
    # With the server on (the default port, or one named) the same webhook is fine.
    assert load_settings({"TELEGRAM_WEBHOOK_URL": "https://bot.example/tg"}, env_file=None)
    assert load_settings({**env, "HTTP_PORT": "8443"}, env_file=None).http_port == 8443
