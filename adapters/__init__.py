"""Platform adapters: all Telegram, Discord and console code lives here, never in `bot/`."""
