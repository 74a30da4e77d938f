"""Versioned schema migrations for `drawbridge.db`; `PRAGMA user_version` records the last applied."""

from __future__ import annotations

import logging
import sqlite3

from bot.errors import SettingsError

log = logging.getLogger("drawbridge.store")

# Each entry upgrades the schema from version i to i + 1. Never edit a shipped entry: append a new
# one, so that an old database opens in a new release.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE jobs (
            id                TEXT PRIMARY KEY,
            platform          TEXT NOT NULL,
            user_id           TEXT NOT NULL,
            chat_id           TEXT NOT NULL,
            thread_id         TEXT,
            reply_to          TEXT,
            guild_id          TEXT,
            target_meta       TEXT,
            status_message_id TEXT,
            lang              TEXT NOT NULL DEFAULT 'en',
            prompt            TEXT NOT NULL,
            model             TEXT NOT NULL,
            provider          TEXT NOT NULL,
            n_images          INTEGER NOT NULL,
            aspect_ratio      TEXT,
            size              TEXT,
            seed              INTEGER,
            refs              TEXT NOT NULL DEFAULT '[]',
            status            TEXT NOT NULL CHECK (status IN
                                ('queued','running','succeeded','failed','refused','cancelled')),
            day               TEXT NOT NULL,
            admin             INTEGER NOT NULL DEFAULT 0,
            reserved_usd      REAL NOT NULL DEFAULT 0,
            cost_usd          REAL NOT NULL DEFAULT 0,
            error             TEXT,
            error_kind        TEXT,
            task_id           TEXT,
            attempts          INTEGER NOT NULL DEFAULT 0,
            created_at        REAL NOT NULL,
            started_at        REAL,
            finished_at       REAL,
            delivered_at      REAL,
            delivery_ref      TEXT,
            delivery_attempts INTEGER NOT NULL DEFAULT 0,
            parent_id         TEXT
        )
        """,
        "CREATE INDEX jobs_active ON jobs(created_at) WHERE status IN ('queued','running')",
        "CREATE INDEX jobs_user ON jobs(platform, user_id, created_at)",
        "CREATE INDEX jobs_day ON jobs(day)",
        "CREATE INDEX jobs_undelivered ON jobs(finished_at) "
        "WHERE status = 'succeeded' AND delivered_at IS NULL",
        """
        CREATE TABLE images (
            job_id     TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
            idx        INTEGER NOT NULL,
            path       TEXT NOT NULL,
            mime       TEXT NOT NULL,
            width      INTEGER NOT NULL,
            height     INTEGER NOT NULL,
            size_bytes INTEGER NOT NULL,
            PRIMARY KEY (job_id, idx)
        )
        """,
    ),
    (
        # v2: the operator's side. Accounts join a user's identities across platforms; bans,
        # grants and per-chat policies are what admins change at run time; audit says who did.
        "ALTER TABLE jobs ADD COLUMN account TEXT",
        "CREATE INDEX jobs_account_day ON jobs(account, day)",
        "CREATE INDEX jobs_scope_day ON jobs(platform, chat_id, day)",
        """
        CREATE TABLE accounts (
            member  TEXT PRIMARY KEY,      -- platform:user_id
            account TEXT NOT NULL,         -- the member whose quota the group shares
            linked_at REAL NOT NULL
        )
        """,
        """
        CREATE TABLE link_codes (
            code       TEXT PRIMARY KEY,
            member     TEXT NOT NULL,
            expires_at REAL NOT NULL
        )
        """,
        """
        CREATE TABLE bans (
            member TEXT PRIMARY KEY,
            by     TEXT NOT NULL,
            at     REAL NOT NULL
        )
        """,
        """
        CREATE TABLE grants (
            account TEXT NOT NULL,
            day     TEXT NOT NULL,
            images  INTEGER NOT NULL,
            PRIMARY KEY (account, day)
        )
        """,
        """
        CREATE TABLE policies (
            scope        TEXT PRIMARY KEY,  -- telegram-chat:<id> or discord-guild:<id>
            models       TEXT NOT NULL DEFAULT '',
            max_images   INTEGER NOT NULL DEFAULT 0,
            daily_images INTEGER NOT NULL DEFAULT 0,
            blocklist    INTEGER NOT NULL DEFAULT 1,
            updated_by   TEXT NOT NULL,
            updated_at   REAL NOT NULL
        )
        """,
        """
        CREATE TABLE audit (
            at      REAL NOT NULL,
            actor   TEXT NOT NULL,
            action  TEXT NOT NULL,
            subject TEXT NOT NULL,
            detail  TEXT NOT NULL DEFAULT ''
        )
        """,
    ),
    (
        # v3: the result cache finds an identical earlier request by this key.
        "ALTER TABLE jobs ADD COLUMN cache_key TEXT",
        "ALTER TABLE jobs ADD COLUMN cached_from TEXT",
        "CREATE INDEX jobs_cache ON jobs(cache_key, finished_at) WHERE cache_key IS NOT NULL",
    ),
    (
        # v4: paid messages (Telegram's paid broadcasts) a day, so a restart keeps the count
        # against the operator's daily allowance of Stars.
        """
        CREATE TABLE paid_messages (
            platform TEXT NOT NULL,
            day      TEXT NOT NULL,
            messages INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (platform, day)
        )
        """,
    ),
    (
        # v5: when a job that ended without a result was told so: a restart tells again the
        # ends a crash cut off between their commit and their message.
        "ALTER TABLE jobs ADD COLUMN told_at REAL",
        "UPDATE jobs SET told_at = finished_at WHERE status IN ('failed','refused','cancelled')",
        "CREATE INDEX jobs_untold ON jobs(finished_at) "
        "WHERE told_at IS NULL AND status IN ('failed','refused','cancelled')",
        # and which platform messages the last day's jobs came from (a restart's replays)
        "CREATE INDEX jobs_created ON jobs(created_at)",
    ),
    (
        # v6: the platform messages whose command changed something (a /grant, a /link), in the
        # change's own transaction: a restart's replay of the same update is not applied twice.
        """
        CREATE TABLE commands (
            platform   TEXT NOT NULL,
            user_id    TEXT NOT NULL,
            chat_id    TEXT NOT NULL,
            message_id TEXT NOT NULL,
            at         REAL NOT NULL,
            PRIMARY KEY (platform, chat_id, message_id)
        )
        """,
        "CREATE INDEX commands_at ON commands(at)",
    ),
    (
        # v7: a delivered job is told too once its status says done (the adapters that send it
        # in the background confirm it): a restart shows "done" again where a crash cut it off.
        "UPDATE jobs SET told_at = delivered_at "
        "WHERE status = 'succeeded' AND told_at IS NULL AND delivered_at IS NOT NULL",
        "CREATE INDEX jobs_untold_done ON jobs(delivered_at) "
        "WHERE told_at IS NULL AND status = 'succeeded' AND delivered_at IS NOT NULL",
    ),
    (
        # v8: the images a job asked for, beside `n_images`, the images it made: a reroll asks
        # for what the user asked, not for the three an n=4 job happened to make.
        "ALTER TABLE jobs ADD COLUMN n_requested INTEGER",
        "UPDATE jobs SET n_requested = n_images",
    ),
    (
        # v9: a chat that moved to a new id (a Telegram group that became a supergroup): its
        # policy and its place in ALLOWED_IDS follow it.
        "CREATE TABLE chat_moves (scope TEXT PRIMARY KEY, moved_from TEXT NOT NULL, at REAL NOT NULL)",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)


def _version(db: sqlite3.Connection) -> int:
    row = db.execute("PRAGMA user_version").fetchone()
    version = int(row[0]) if row else 0
    if version > len(MIGRATIONS):
        raise SettingsError(
            f"DRAWBRIDGE_DATA_DIR: the database's schema version {version} is newer than this "
            f"release ({len(MIGRATIONS)}): run a newer drawbridge, or use another data dir"
        )
    return version


def migrate(db: sqlite3.Connection) -> None:
    """Bring the schema up to this release, one versioned step per transaction.

    Two processes may start on one database at once (the bot and `drawbridge usage` after an
    upgrade): each step reads the version again inside its write transaction, so a step the
    other one applied meanwhile is not applied twice ("duplicate column name").
    """
    while _version(db) < len(MIGRATIONS):
        db.execute("BEGIN IMMEDIATE")
        try:
            number = _version(db) + 1
            if number <= len(MIGRATIONS):  # (else the other process applied the last step)
                for sql in MIGRATIONS[number - 1]:
                    db.execute(sql)
                db.execute(f"PRAGMA user_version = {number}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        log.info("database at schema version %d", _version(db))
