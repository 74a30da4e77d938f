"""The operator's controls: bans, extra images, per-chat policy, linked accounts, the blocklist.

All of it lives in SQLite (migration v2) and in memory for the checks `Engine.submit` makes
without an `await`. Every change is one write unit with its audit row: who changed what, when.
"""

from __future__ import annotations

import json
import re
import secrets
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bot.dbwriter import Op
from bot.errors import InvalidRequest, SettingsError
from bot.jobs import Target, UserRef, chat_scope

LINK_CODE_TTL = 600.0
# A link code is 10 letters of an alphabet without look-alikes (~50 bits), and one user may try
# only a few wrong ones in a while: a guessed code joins the guesser to its owner's account, its
# quota and, for an admin's account, its admin rights.
LINK_CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
LINK_CODE_LENGTH = 10
LINK_TRIES = 5  # wrong codes a user may try in LINK_CODE_TTL
MAX_COUNT = 1_000_000  # the largest image count a grant or a policy takes


def scope_of(target: Target) -> str:
    """The policy scope of a place: a Discord guild, else the chat."""
    if target.platform == "discord" and target.guild_id:
        return f"discord-guild:{target.guild_id}"
    return chat_scope(target.platform, target.chat_id)


@dataclass(frozen=True, slots=True)
class Policy:
    """What one chat or guild allows; zero or empty means "no own limit"."""

    scope: str
    models: tuple[str, ...] = ()
    max_images: int = 0
    daily_images: int = 0
    blocklist: bool = True

    def describe(self) -> str:
        models = ", ".join(self.models) if self.models else "all"
        return (
            f"models={models} max_images={self.max_images or '-'} "
            f"daily_images={self.daily_images or '-'} blocklist={'on' if self.blocklist else 'off'}"
        )


POLICY_KEYS = ("models", "max_images", "daily_images", "blocklist")


def parse_policy_changes(policy: Policy, args: Sequence[str]) -> Policy:
    """`models=a,b max_images=2 daily_images=50 blocklist=off` applied to `policy`."""
    changes: dict[str, Any] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        key = key.strip().lower()
        if not sep or key not in POLICY_KEYS:
            raise InvalidRequest(
                "error.policy_syntax", keys=" ".join(f"{k}=…" for k in POLICY_KEYS)
            )
        value = value.strip()
        if key == "models":
            changes[key] = tuple(
                m for m in (v.strip() for v in value.split(",")) if m and m != "all"
            )
        elif key == "blocklist":
            if value.lower() not in ("on", "off", "true", "false", "1", "0"):
                raise InvalidRequest("error.policy_syntax", keys="blocklist=on|off")
            changes[key] = value.lower() in ("on", "true", "1")
        else:
            if not re.fullmatch(r"[0-9]{1,7}", value) or int(value) > MAX_COUNT:
                raise InvalidRequest("error.policy_syntax", keys=f"{key}=<number>")
            changes[key] = int(value)
    return replace(policy, **changes)


class Blocklist:
    """Words and patterns refused at submit, in any language.

    A file of one entry a line: a plain entry matches anywhere in the prompt, case- and
    width-insensitively (so Chinese works as well as English); `re:` starts a regular
    expression; `#` starts a comment.
    """

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.words: list[str] = []
        self.patterns: list[re.Pattern[str]] = []
        for raw in entries:
            entry = raw.strip()
            if not entry or entry.startswith("#"):
                continue
            if entry.startswith("re:"):
                self.patterns.append(re.compile(entry[3:], re.IGNORECASE))
            else:
                self.words.append(_fold(entry))

    @classmethod
    def load(cls, path: Path | None) -> Blocklist:
        if path is None:
            return cls()
        try:
            return cls(path.read_text(encoding="utf-8").splitlines())
        except OSError as exc:
            raise SettingsError(f"BLOCKLIST_FILE: cannot read {path} ({exc.strerror})") from None
        except re.error as exc:
            raise SettingsError(f"BLOCKLIST_FILE: bad pattern in {path} ({exc})") from None

    def __bool__(self) -> bool:
        return bool(self.words or self.patterns)

    def match(self, prompt: str) -> str | None:
        """The entry the prompt hits, or None."""
        folded = _fold(prompt)
        for word in self.words:
            if word in folded:
                return word
        for pattern in self.patterns:
            if pattern.search(prompt) or pattern.search(folded):
                return pattern.pattern
        return None


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


@dataclass
class Operator:
    """In-memory copy of the operator tables; methods return the ops that persist a change."""

    accounts: dict[str, str] = field(default_factory=dict)  # member → account
    bans: set[str] = field(default_factory=set)
    grants: dict[tuple[str, str], int] = field(default_factory=dict)  # (account, day) → images
    policies: dict[str, Policy] = field(default_factory=dict)
    blocklist: Blocklist = field(default_factory=Blocklist)
    moves: dict[str, str] = field(default_factory=dict)  # scope → the scope it moved from

    @classmethod
    def from_rows(
        cls,
        accounts: Iterable[Sequence[Any]],
        bans: Iterable[Sequence[Any]],
        grants: Iterable[Sequence[Any]],
        policies: Iterable[Sequence[Any]],
        blocklist: Blocklist | None = None,
        moves: Iterable[Sequence[Any]] = (),
    ) -> Operator:
        op = cls(blocklist=blocklist or Blocklist())
        op.accounts = {str(r[0]): str(r[1]) for r in accounts}
        op.bans = {str(r[0]) for r in bans}
        op.grants = {(str(r[0]), str(r[1])): int(r[2]) for r in grants}
        for r in policies:
            models = tuple(m for m in str(r[1]).split(",") if m)
            op.policies[str(r[0])] = Policy(str(r[0]), models, int(r[2]), int(r[3]), bool(r[4]))
        op.moves = {str(r[0]): str(r[1]) for r in moves}
        return op

    # ---- reads (no await: used inside submit's check-and-reserve) --------------------------

    def account_of(self, user: UserRef | str) -> str:
        key = str(user)
        return self.accounts.get(key, key)

    def members(self, account: str) -> list[str]:
        return sorted({account, *(m for m, a in self.accounts.items() if a == account)})

    def banned(self, user: UserRef | str) -> bool:
        """A ban holds for the whole account: every platform identity linked into it."""
        key = str(user)
        account = self.account_of(key)
        return (
            key in self.bans
            or account in self.bans
            or any(self.account_of(b) == account for b in self.bans)
        )

    def granted(self, account: str, day: str) -> int:
        return self.grants.get((account, day), 0)

    def policy(self, target: Target) -> Policy:
        scope = scope_of(target)
        return self.policies.get(scope) or Policy(scope)

    def origins(self, scope: str) -> list[str]:
        """The scopes `scope` moved from, nearest first (a group, then its supergroup …)."""
        found: list[str] = []
        while (scope := self.moves.get(scope, "")) and scope not in found and len(found) < 8:
            found.append(scope)
        return found

    # ---- changes -------------------------------------------------------------------------

    def ban(self, member: str, actor: str, now: float) -> list[Op]:
        self.bans.add(member)
        return [
            ("INSERT OR REPLACE INTO bans (member, by, at) VALUES (?, ?, ?)", (member, actor, now)),
            audit_op(now, actor, "ban", member),
        ]

    def unban(self, member: str, actor: str, now: float) -> list[Op]:
        """Lift the ban on `member` and on every identity of its account (a ban holds for all)."""
        account = self.account_of(member)
        lifted = {member, *(b for b in self.bans if self.account_of(b) == account)}
        self.bans -= lifted
        return [
            *(("DELETE FROM bans WHERE member = ?", (m,)) for m in sorted(lifted)),
            audit_op(now, actor, "unban", member),
        ]

    def grant(self, account: str, day: str, images: int, actor: str, now: float) -> list[Op]:
        total = self.grants.get((account, day), 0) + images
        self.grants[(account, day)] = total
        return [
            (
                "INSERT INTO grants (account, day, images) VALUES (?, ?, ?) "
                "ON CONFLICT(account, day) DO UPDATE SET images = excluded.images",
                (account, day, total),
            ),
            audit_op(now, actor, "grant", account, f"+{images} images on {day} (now {total})"),
        ]

    def move(self, old: str, new: str, actor: str, now: float) -> list[Op]:
        """The chat `old` lives on as `new` (Telegram upgraded a group to a supergroup): its
        policy goes with it, unless the new one has its own; ALLOWED_IDS follows `origins`."""
        if self.moves.get(new) == old or old == new:
            return []
        self.moves[new] = old
        ops: list[Op] = [
            (
                "INSERT OR REPLACE INTO chat_moves (scope, moved_from, at) VALUES (?, ?, ?)",
                (new, old, now),
            ),
            audit_op(now, actor, "move", new, f"from {old}"),
        ]
        policy = self.policies.get(old)
        if policy is not None and new not in self.policies:
            ops += self.set_policy(replace(policy, scope=new), actor, now)
        return ops

    def set_policy(self, policy: Policy, actor: str, now: float) -> list[Op]:
        self.policies[policy.scope] = policy
        return [
            (
                "INSERT OR REPLACE INTO policies "
                "(scope, models, max_images, daily_images, blocklist, updated_by, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    policy.scope,
                    ",".join(policy.models),
                    policy.max_images,
                    policy.daily_images,
                    int(policy.blocklist),
                    actor,
                    now,
                ),
            ),
            audit_op(now, actor, "policy", policy.scope, policy.describe()),
        ]

    def new_link_code(self, member: str, now: float) -> tuple[str, list[Op]]:
        code = "".join(secrets.choice(LINK_CODE_ALPHABET) for _ in range(LINK_CODE_LENGTH))
        return code, [
            ("DELETE FROM link_codes WHERE member = ? OR expires_at < ?", (member, now)),
            (
                "INSERT OR REPLACE INTO link_codes (code, member, expires_at) VALUES (?, ?, ?)",
                (code, member, now + LINK_CODE_TTL),
            ),
        ]

    def link(self, owner: str, joiner: str, now: float) -> tuple[str, str, list[Op]]:
        """Join `joiner`'s account into `owner`'s; returns (account, the old account, ops)."""
        account = self.account_of(owner)
        old = self.account_of(joiner)
        moved = [m for m in self.members(old)]
        ops: list[Op] = []
        for granted_to, day in list(self.grants):
            if granted_to == old and old != account:  # the joiner's extra images come along
                total = self.grants.pop((old, day)) + self.grants.get((account, day), 0)
                self.grants[(account, day)] = total
                ops += [
                    ("DELETE FROM grants WHERE account = ? AND day = ?", (old, day)),
                    (
                        "INSERT INTO grants (account, day, images) VALUES (?, ?, ?) "
                        "ON CONFLICT(account, day) DO UPDATE SET images = excluded.images",
                        (account, day, total),
                    ),
                ]
        for member in {owner, *moved}:
            self.accounts[member] = account
            ops.append(
                (
                    "INSERT OR REPLACE INTO accounts (member, account, linked_at) VALUES (?, ?, ?)",
                    (member, account, now),
                )
            )
        ops.append(audit_op(now, joiner, "link", account, json.dumps(sorted(moved))))
        return account, old, ops


COMMANDS_KEPT = 2 * 86400  # Telegram re-sends an update for 24 hours at most


def command_ops(user: UserRef, target: Target, now: float) -> list[Op]:
    """Record that the platform message `target` replies to changed something, so a restart's
    replay of it is not applied again (`Store.handled_messages`); older records go."""
    if target.reply_to is None:
        return []
    return [
        (
            "INSERT OR IGNORE INTO commands (platform, user_id, chat_id, message_id, at) "
            "VALUES (?, ?, ?, ?, ?)",
            (user.platform, user.user_id, target.chat_id, target.reply_to, now),
        ),
        ("DELETE FROM commands WHERE at < ?", (now - COMMANDS_KEPT,)),
    ]


def audit_op(now: float, actor: str, action: str, subject: str, detail: str = "") -> Op:
    return (
        "INSERT INTO audit (at, actor, action, subject, detail) VALUES (?, ?, ?, ?, ?)",
        (now, actor, action, subject, detail),
    )
