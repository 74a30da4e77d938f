"""Can the operator trust the numbers? Adversarial probes of what the operator reads.

The `jobs` table is the truth (DESIGN §1: `cost_usd` is what a job was charged, 0 unless it
succeeded; `day` is the quota day in `QUOTA_TZ`). "Agree" means, per user and per quota day:
the dollars charged (the sum of `cost_usd`) and the images charged (the `n_images` of succeeded
rows that a provider made). Every surface must say the same: the engine's quota tallies,
`/usage`, `/stats`, `/export` and `drawbridge usage --csv`, and the Prometheus counters of
`/metrics` (summed over the processes a restart splits the day into). The budget
(`BUDGET_DAILY_USD`) caps the whole bot's bill a day, admins and `drawbridge generate` included
(README), whatever restarts, midnights and failovers happen, and its alerts reach the admins.

Engines run on the real store with scripted providers (`tests/fakes.py`), the real chat syntax
(`bot.chat.Chat`), the real HTTP server for `/metrics`, and the real `drawbridge` program for
the CLI. A test that finds a defect fails with a message saying what went wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import aiosqlite
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.app import Core, open_core
from bot.catalog import Catalog
from bot.chat import Chat
from bot.cli import main
from bot.engine import Engine, EngineConfig
from bot.errors import BadRequest, BudgetExceeded, QuotaExceeded, Refused, Transient, UserError
from bot.http import HttpServer
from bot.jobs import BATCH_PLATFORM, GeneratedImage, Options, Request, Target, UserRef
from bot.locks import holding_batch
from bot.providers.base import GenerationRequest, JobHooks
from bot.quota import Limits, Quotas
from bot.routing import Router
from bot.settings import load_settings
from bot.store import Store
from tests.conftest import Clock, Harness
from tests.conftest import request as a_request
from tests.fakes import RecordingAdapter, ScriptedProvider

TZ = "Asia/Tokyo"  # UTC+9: a quota day that is not the UTC day
MIDNIGHT = 1_767_279_600.0  # 2026-01-02 00:00:00 in Tokyo (2026-01-01 15:00 UTC)
DAY1, DAY2 = "2026-01-01", "2026-01-02"

ALICE = UserRef("test", "alice")
BOB = UserRef("test", "bob")
BOSS = UserRef("test", "boss")
ADMINS = frozenset({"test:boss"})

# "paid" is served by `demo`; its family's backup on `backup` costs more (a pricier failover).
MODELS = """
[models.paid]
provider = "demo"
family = "fam"
remote_model = "fam-x"
price_usd = 0.5
aspect_ratios = ["1:1"]
max_images = 4
timeout_s = 30

[models.paid-backup]
provider = "backup"
family = "fam"
remote_model = "fam-x"
price_usd = 0.8
aspect_ratios = ["1:1"]
max_images = 4
timeout_s = 30
"""


class Provider(ScriptedProvider):
    """A scripted provider that can also return fewer images than asked for some prompts."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name  # type: ignore[misc]
        self.returns: dict[str, int] = {}

    async def generate(self, request: GenerationRequest, hooks: JobHooks) -> list[GeneratedImage]:
        images = await super().generate(request, hooks)
        count = self.returns.get(request.prompt)
        return images if count is None else images[:count]


@dataclass
class Rig:
    """What outlives one engine process: the data dir, providers, the platform, the clock."""

    data_dir: Path
    catalog: Catalog
    clock: Clock
    demo: Provider = field(default_factory=lambda: Provider("demo"))
    backup: Provider = field(default_factory=lambda: Provider("backup"))
    adapter: RecordingAdapter = field(default_factory=lambda: RecordingAdapter(platform="test"))
    opened: list[tuple[Engine, Store]] = field(default_factory=list)

    async def engine(self, **config: Any) -> Engine:
        store = await Store.open(self.data_dir)
        config.setdefault("shutdown_grace", 0.2)
        config.setdefault("deliver_backoff", 0.01)
        config.setdefault("retry_initial", 0.01)
        config.setdefault("retry_attempts", 2)
        config.setdefault("admin_ids", ADMINS)
        config.setdefault("max_pending_per_user", 9)
        cfg = EngineConfig(**config)
        providers = {"demo": self.demo, "backup": self.backup}
        router = Router(self.catalog, providers, fallbacks={"fam": ("demo", "backup")})
        engine = Engine(
            store,
            self.catalog,
            providers,
            cfg,
            default_model="paid",
            clock=self.clock,
            quotas=Quotas(cfg.limits, ZoneInfo(TZ), self.clock),
            router=router,
        )
        engine.register(self.adapter)
        self.opened.append((engine, store))
        await engine.start()
        return engine

    async def stop(self, engine: Engine) -> None:
        """A clean stop (a deploy): running jobs get the grace, the rest stay for the next start."""
        for e, store in list(self.opened):
            if e is engine:
                await engine.close()
                await store.close()
                self.opened.remove((e, store))

    async def crash(self, engine: Engine) -> None:
        """Stop the way a killed process does: no grace, the running job's row stays running."""
        for task in [engine._scheduler, engine._sweeper, *engine._running.values()]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*engine._running.values(), return_exceptions=True)
        for e, store in list(self.opened):
            if e is engine:
                await store.close()
                self.opened.remove((e, store))

    def budget_alerts(self) -> list[str]:
        return [text for t, text in self.adapter.notices if t.meta == "dm" and "budget" in text]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    models = tmp_path / "models.toml"
    models.write_text(MODELS)
    r = Rig(tmp_path / "data", Catalog.load(models), Clock(MIDNIGHT - 600))
    yield r
    for provider in (r.demo, r.backup):
        for gate in provider.gates.values():
            gate.set()
    for engine, store in reversed(r.opened):
        await engine.close()
        await store.close()


def ask(user: UserRef, prompt: str, n: int = 1, model: str = "paid") -> Request:
    return Request(
        user=user,
        target=Target("test", chat_id=f"dm-{user.user_id}"),
        prompt=prompt,
        options=Options(n=n),
        model=model,
    )


async def until(check: Callable[[], bool], within: float = 3.0) -> None:
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110 - the conditions are fakes' counters
            await asyncio.sleep(0.005)


# ---- the truth, and what each surface says -------------------------------------------------


async def table(data_dir: Path) -> list[dict[str, Any]]:
    async with aiosqlite.connect(data_dir / "drawbridge.db") as db:
        db.row_factory = aiosqlite.Row
        rows = await db.execute_fetchall("SELECT * FROM jobs ORDER BY created_at, rowid")
    return [dict(r) for r in rows]


def usd(values: list[float]) -> float:
    return round(sum(values), 6)


def truth(rows: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[int, float]]:
    """(platform:user, day) → (images charged, dollars charged), from the jobs table."""
    books: dict[tuple[str, str], tuple[int, float]] = defaultdict(lambda: (0, 0.0))
    for r in rows:
        key = (f"{r['platform']}:{r['user_id']}", r["day"])
        images, dollars = books[key]
        if r["status"] == "succeeded" and not r["cached_from"]:
            images += r["n_images"]
        books[key] = (images, round(dollars + r["cost_usd"], 6))
    return dict(books)


USAGE = re.compile(r"Today: (\d+) of (\S+) images · spent \$(\S+) of")
PERIOD = re.compile(r"^(?P<label>\S[^:]*): (?P<jobs>\d+) jobs · (?P<images>\d+) images · \$(\S+)$")


async def usage_line(chat: Chat, user: UserRef) -> tuple[int, str, float]:
    reply = await chat.handle(user, Target("test", chat_id=f"dm-{user.user_id}"), "/usage")
    assert reply is not None
    m = USAGE.search(reply.text)
    assert m is not None, reply.text
    return int(m[1]), m[2], float(m[3])


async def stats(chat: Chat) -> dict[str, tuple[int, int, float]]:
    reply = await chat.handle(BOSS, Target("test", chat_id="dm-boss"), "/stats")
    assert reply is not None and not reply.error, reply
    found = {}
    for line in reply.text.splitlines():
        if m := PERIOD.match(line):
            found[m["label"]] = (int(m["jobs"]), int(m["images"]), float(m[4]))
    return found


def csv_books(data: str) -> dict[tuple[str, str], tuple[int, float]]:
    books: dict[tuple[str, str], tuple[int, float]] = defaultdict(lambda: (0, 0.0))
    for line in csv.DictReader(io.StringIO(data)):
        key = (f"{line['platform']}:{line['user_id']}", line["day"])
        images, dollars = books[key]
        books[key] = (images + int(line["images"]), round(dollars + float(line["cost_usd"]), 6))
    return dict(books)


def run_usage_cli(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> str:
    for name in list(os.environ):
        if name.endswith(("_TOKEN", "_API_KEY")) or name in ("HTTP_PORT", "DEFAULT_MODEL"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(data_dir.parent)  # no .env of the checkout's
    monkeypatch.setenv("DRAWBRIDGE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("QUOTA_TZ", TZ)
    capsys.readouterr()
    assert main(["usage", "--csv"]) == 0
    return capsys.readouterr().out


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape_text(engine: Engine, data_dir: Path, catalog: Catalog) -> str:
    settings = load_settings({"DRAWBRIDGE_DATA_DIR": str(data_dir)}, env_file=None)
    core = Core(settings, catalog, engine.store, engine, engine.providers)
    http = HttpServer(core, "127.0.0.1", 0)
    await http.open()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{http.bound_port}/metrics") as resp,
        ):
            assert resp.status == 200
            return await resp.text()
    finally:
        await http.close()


def samples_of(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **match: str) -> float:
    return sum(
        v
        for (n, labels), v in samples.items()
        if n == name and all(dict(labels).get(k) == want for k, want in match.items())
    )


def by_label(samples: Samples, name: str, label: str) -> Counter[str]:
    got: Counter[str] = Counter()
    for (n, labels), v in samples.items():
        if n == name and v:
            got[dict(labels)[label]] += int(v)
    return got


# ---- one mixed run, a crash at midnight, and every surface -----------------------------------


async def mixed_run(rig: Rig) -> tuple[Engine, dict[str, str], list[Samples]]:
    """Successes, a refusal, a failure, a cancel, a reroll, a pricier failover, an admin's job,
    an n=4 job that made 3, and a job submitted at 23:59:59 that a crash interrupts and the
    next process finishes after midnight. Returns the second engine, the job ids, and a scrape
    of `/metrics` from each process."""
    demo = rig.demo
    demo.returns["four asked"] = 3
    demo.errors["refuse me"] = [Refused("moderation")]
    demo.errors["bad request"] = [BadRequest("malformed")]
    demo.errors["fail over"] = [Transient("503")] * 4
    demo.gates["cancel me"] = asyncio.Event()
    demo.gates["late one"] = asyncio.Event()
    limits = Limits(user_images=20, budget_usd=50.0)
    ids: dict[str, str] = {}
    scrapes: list[Samples] = []

    rig.clock.now = MIDNIGHT - 600  # 23:50 in Tokyo
    first = await rig.engine(limits=limits)
    for name, user, n in (
        ("ok one", ALICE, 1),
        ("four asked", ALICE, 4),
        ("refuse me", BOB, 1),
        ("bad request", BOB, 1),
        ("fail over", BOB, 1),
        ("admin banner", BOSS, 2),
    ):
        rig.clock.now += 5
        ids[name] = (await first.submit(ask(user, name, n))).job_id
    await first.run_until_idle()
    ids["reroll"] = (await first.reroll(ALICE, ids["ok one"])).job_id
    ids["cancel me"] = (await first.submit(ask(BOB, "cancel me"))).job_id
    await until(lambda: ids["cancel me"] in demo.started)
    await first.cancel(BOB, ids["cancel me"])
    await first.run_until_idle()

    rig.clock.now = MIDNIGHT - 1  # 23:59:59 in Tokyo
    ids["late one"] = (await first.submit(ask(ALICE, "late one", 2))).job_id
    await until(lambda: ids["late one"] in demo.started)
    scrapes.append(samples_of(await scrape_text(first, rig.data_dir, rig.catalog)))
    await rig.crash(first)

    rig.clock.now = MIDNIGHT + 30  # the next process starts after midnight
    demo.gates["late one"].set()
    second = await rig.engine(limits=limits)
    await second.run_until_idle()
    rig.clock.now = MIDNIGHT + 9 * 3600
    ids["morning"] = (await second.submit(ask(BOB, "morning"))).job_id
    ids["morning two"] = (await second.submit(ask(ALICE, "morning two", 2))).job_id
    await second.run_until_idle()
    scrapes.append(samples_of(await scrape_text(second, rig.data_dir, rig.catalog)))
    return second, ids, scrapes


async def test_mixed_run_across_a_midnight_crash_agrees_on_every_surface(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    engine, ids, scrapes = await mixed_run(rig)
    rows = await table(rig.data_dir)
    by_id = {r["id"]: r for r in rows}

    # The table itself: what the run did.
    assert Counter(r["status"] for r in rows) == {
        "succeeded": 6 + 2,
        "refused": 1,
        "failed": 1,
        "cancelled": 1,
    }
    assert all(r["cost_usd"] == 0 for r in rows if r["status"] != "succeeded")
    assert (by_id[ids["four asked"]]["n_images"], by_id[ids["four asked"]]["cost_usd"]) == (3, 1.5)
    over = by_id[ids["fail over"]]
    assert (over["provider"], over["cost_usd"]) == ("backup", 0.8)
    late = by_id[ids["late one"]]
    # Submitted at 23:59:59, generated by the next process after midnight: charged on the day
    # it was submitted (and reserved) on.
    assert late["finished_at"] > MIDNIGHT and late["day"] == DAY1, late
    assert (late["status"], late["cost_usd"]) == ("succeeded", 1.0)
    books = truth(rows)
    assert books[("test:alice", DAY1)] == (1 + 3 + 1 + 2, 0.5 + 1.5 + 0.5 + 1.0)
    assert books[("test:bob", DAY1)] == (1, 0.8)
    assert books[("test:boss", DAY1)] == (2, 1.0)
    assert books[("test:alice", DAY2)] == (2, 1.0)
    assert books[("test:bob", DAY2)] == (1, 0.5)

    # The engine's quota tallies and /usage, for today (2026-01-02 in Tokyo).
    chat = Chat(engine)
    assert engine.quotas.today() == DAY2
    for user in (ALICE, BOB, BOSS):
        want = books.get((str(user), DAY2), (0, 0.0))
        images, dollars = engine.quotas.used(str(user), DAY2)
        assert (images, round(dollars, 6)) == want, f"quota tally of {user} on {DAY2}"
        shown = await usage_line(chat, user)
        assert (shown[0], shown[2]) == (want[0], pytest.approx(want[1], abs=0.005)), (
            f"/usage of {user} says {shown}, the table says {want}"
        )
    assert engine.quotas.charged_total(DAY2) == pytest.approx(1.5)

    # /stats: today is 2026-01-02 only; the week has both days.
    got = await stats(chat)
    today_rows = [r for r in rows if r["day"] == DAY2]
    ok = [r for r in rows if r["status"] == "succeeded"]
    assert got["Today"] == (
        len(today_rows),
        sum(r["n_images"] for r in today_rows if r["status"] == "succeeded"),
        pytest.approx(usd([r["cost_usd"] for r in today_rows]), abs=0.005),
    ), got
    assert got["7 days"] == (
        len(rows),
        sum(r["n_images"] for r in ok),
        pytest.approx(usd([r["cost_usd"] for r in rows]), abs=0.005),
    ), got

    # /export and `drawbridge usage --csv`: byte for byte the same, and the table's books.
    exported = (await engine.usage_csv()).decode()
    printed = await asyncio.to_thread(run_usage_cli, rig.data_dir, monkeypatch, capsys)
    assert printed == exported
    assert csv_books(exported) == books

    # /metrics, summed over the two processes (each counts what ended while it ran).
    def summed(name: str, label: str) -> Counter[str]:
        return by_label(scrapes[0], name, label) + by_label(scrapes[1], name, label)

    assert summed("drawbridge_jobs_total", "status") == Counter(r["status"] for r in rows)
    images = sum(total(s, "drawbridge_images_total") for s in scrapes)
    assert images == sum(r["n_images"] for r in ok)
    spend = sum(total(s, "drawbridge_spend_usd_total") for s in scrapes)
    assert spend == pytest.approx(usd([r["cost_usd"] for r in rows]), abs=1e-9)
    assert total(scrapes[1], "drawbridge_spend_usd_total", provider="backup") == 0
    assert total(scrapes[0], "drawbridge_spend_usd_total", provider="backup") == pytest.approx(0.8)


# ---- the budget across midnight, restarts and a second process -------------------------------


@pytest.mark.parametrize("limit", ["budget", "user_usd"])
async def test_a_failover_after_a_restart_past_midnight_keeps_yesterdays_limit(
    rig: Rig, limit: str
) -> None:
    """Yesterday's job, resumed by a process started after midnight, fails over to a pricier
    provider: the difference must still be held against *its* day's limit (README: "when either
    would be passed the job is not moved, and fails uncharged instead")."""
    limits = Limits(budget_usd=1.2) if limit == "budget" else Limits(user_usd=1.2)
    rig.clock.now = MIDNIGHT - 30  # 23:59:30 in Tokyo
    rig.demo.gates["fox"] = asyncio.Event()
    first = await rig.engine(limits=limits)
    ticket = await first.submit(ask(ALICE, "fox", 2))  # holds $1.00 of the day's $1.20
    assert ticket.reserved_usd == pytest.approx(1.0)
    await until(lambda: ticket.job_id in rig.demo.started)
    await rig.crash(first)

    rig.clock.now = MIDNIGHT + 30  # restarted at 00:00:30: a new quota day
    rig.demo.errors["fox"] = [Transient("503")] * 10  # the primary is down now
    rig.demo.gates["fox"].set()
    second = await rig.engine(limits=limits)
    await second.run_until_idle()

    rows = await table(rig.data_dir)
    (job,) = rows
    spent = usd([r["cost_usd"] for r in rows if r["day"] == DAY1])
    assert job["day"] == DAY1
    assert spent <= 1.2 + 1e-9 and job["provider"] == "demo", (
        f"{DAY1}'s {limit} limit is $1.20, yet the job was moved to {job['provider']} and "
        f"charged ${job['cost_usd']:.2f} on {DAY1}: the process that started after midnight "
        f"never loaded {DAY1}'s totals, so the failover's extra $0.60 was checked against $0"
    )


async def test_the_budget_holds_with_drawbridge_generate_running_beside_the_bot(
    tmp_path: Path,
) -> None:
    """BUDGET_DAILY_USD is "the operator's cap for the whole bot per day, admins and `drawbridge
    generate` included" (README), and `generate` runs beside a running bot (it takes no lock and
    leaves the bot's jobs alone: `start(resume=False)`)."""
    models = tmp_path / "models.toml"
    models.write_text("[models.demo]\nprice_usd = 0.5\n")  # the demo model, at a price
    data_dir = tmp_path / "data"
    store = await Store.open(data_dir)
    catalog = Catalog.load(models)
    demo = ScriptedProvider()
    cfg = EngineConfig(limits=Limits(budget_usd=1.0), shutdown_grace=0.2)
    bot = Engine(
        store,
        catalog,
        {"demo": demo},
        cfg,
        clock=time.time,
        quotas=Quotas(cfg.limits, ZoneInfo("UTC"), time.time),
    )
    bot.register(RecordingAdapter(platform="test"))
    await bot.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.endswith(("_TOKEN", "_API_KEY"))}
        env.update(
            DRAWBRIDGE_DATA_DIR=str(data_dir),
            MODELS_FILE=str(models),
            BUDGET_DAILY_USD="1.0",
            QUOTA_TZ="UTC",
            LANG="en_US.UTF-8",
        )
        env.pop("DEFAULT_MODEL", None)
        batch = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "bot", "generate", "two lighthouses", "--n", "2"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=30,
        )
        assert batch.returncode == 0, batch.stderr
        rows = await table(data_dir)
        assert [(r["platform"], r["status"], r["cost_usd"]) for r in rows] == [
            ("cli", "succeeded", 1.0)
        ]
        try:
            ticket = await bot.submit(ask(ALICE, "a fox", model="demo"))
        except BudgetExceeded:
            ticket = None
        await bot.run_until_idle()
        day = datetime.now(ZoneInfo("UTC")).date().isoformat()
        spent = usd([r["cost_usd"] for r in await table(data_dir) if r["day"] == day])
        assert ticket is None and spent <= 1.0 + 1e-9, (
            f"today's budget is $1.00 and `drawbridge generate` spent all of it, yet the running "
            f"bot accepted another $0.50 job: ${spent:.2f} charged today. The bot's budget is "
            f"its in-memory tally, loaded once at start; another process's spend never reaches it"
        )
    finally:
        await bot.close()
        await store.close()


async def test_raising_the_budget_and_restarting_still_alerts_at_the_new_budget(
    rig: Rig,
) -> None:
    """The operator hit the budget, raised BUDGET_DAILY_USD and restarted: when the new budget
    is spent too, the admins must hear it (README: a message when the day's charged spend
    reaches 80 % and 100 % of BUDGET_DAILY_USD)."""
    rig.clock.now = MIDNIGHT + 10 * 3600
    engine = await rig.engine(limits=Limits(budget_usd=1.0))
    for i in range(2):
        await engine.submit(ask(ALICE, f"kite {i}"))
        await engine.run_until_idle()
    await asyncio.sleep(0.02)  # alerts go out in the background
    assert rig.budget_alerts() == ["💸 drawbridge has spent $1.00 of today's $1.00 budget (100 %)."]

    rig.clock.now += 600
    await rig.stop(engine)
    engine = await rig.engine(limits=Limits(budget_usd=2.0))  # raised, the same day
    for i in range(2, 4):
        await engine.submit(ask(BOB, f"kite {i}"))
        await engine.run_until_idle()
    with pytest.raises(BudgetExceeded):  # $2.00 of $2.00: requests are turned away now
        await engine.submit(ask(BOB, "kite 4"))
    await asyncio.sleep(0.02)
    alerts = rig.budget_alerts()
    assert any("$2.00 budget" in text for text in alerts), (
        f"the new $2.00 budget is spent and requests are refused, but the admins heard only "
        f"{alerts}: alert keys are 'budget:80' / 'budget:100' / 'budget:full' per day, so the "
        f"marks of the old $1.00 budget silence those of the new one"
    )


async def test_a_budget_refusal_alert_is_sent_once_even_across_a_restart(rig: Rig) -> None:
    rig.clock.now = MIDNIGHT + 10 * 3600
    engine = await rig.engine(limits=Limits(budget_usd=1.0))
    await engine.submit(ask(ALICE, "kite"))
    await engine.run_until_idle()
    rig.demo.gates["held"] = asyncio.Event()
    held = await engine.submit(ask(ALICE, "held"))  # holds the last $0.50
    await until(lambda: held.job_id in rig.demo.started)
    with pytest.raises(BudgetExceeded):
        await engine.submit(ask(BOB, "refused"))
    await asyncio.sleep(0.02)
    first = rig.budget_alerts()
    assert len(first) == 1 and "turning requests away" in first[0], first
    rig.clock.now += 60
    await rig.crash(engine)
    engine = await rig.engine(limits=Limits(budget_usd=1.0))
    with pytest.raises(BudgetExceeded):  # the resumed job holds the $0.50 again
        await engine.submit(ask(BOB, "refused again"))
    await asyncio.sleep(0.02)
    assert rig.budget_alerts() == first
    rig.demo.gates["held"].set()
    await engine.run_until_idle()
    await asyncio.sleep(0.02)
    assert rig.budget_alerts()[1:] == [
        "💸 drawbridge has spent $1.00 of today's $1.00 budget (100 %)."
    ]
    rows = await table(rig.data_dir)
    assert usd([r["cost_usd"] for r in rows]) == 1.0


async def test_an_admins_exempt_jobs_count_toward_the_budget_and_show_everywhere(
    rig: Rig,
) -> None:
    rig.clock.now = MIDNIGHT + 10 * 3600
    engine = await rig.engine(limits=Limits(user_images=1, budget_usd=1.5))
    await engine.submit(ask(BOSS, "banner", 2))  # past the user limit: an admin
    await engine.run_until_idle()
    await engine.submit(ask(ALICE, "kite"))
    await engine.run_until_idle()
    with pytest.raises(BudgetExceeded):
        await engine.submit(ask(BOSS, "another banner"))  # admins never skip the budget
    chat = Chat(engine)
    got = await stats(chat)
    assert got["Today"] == (2, 3, pytest.approx(1.5)), got
    assert await usage_line(chat, BOSS) == (2, "unlimited", 1.0)
    assert csv_books((await engine.usage_csv()).decode()) == {
        ("test:boss", DAY2): (2, 1.0),
        ("test:alice", DAY2): (1, 0.5),
    }


# ---- /grant and the quota day ---------------------------------------------------------------


async def test_granted_images_are_for_that_quota_day_only(rig: Rig) -> None:
    rig.clock.now = MIDNIGHT - 120  # 23:58 in Tokyo on 2026-01-01 (14:58 UTC)
    engine = await rig.engine(limits=Limits(user_images=1))
    chat = Chat(engine)
    boss = Target("test", chat_id="dm-boss")
    reply = await chat.handle(BOSS, boss, "/grant alice 2")
    assert reply is not None and "gets 2 extra" in reply.text
    assert await usage_line(chat, ALICE) == (0, "3", 0.0)
    for i in range(3):
        await engine.submit(ask(ALICE, f"granted {i}"))
    with pytest.raises(QuotaExceeded):
        await engine.submit(ask(ALICE, "one too many"))
    await engine.run_until_idle()
    assert await usage_line(chat, ALICE) == (3, "3", 1.5)

    rig.clock.now = MIDNIGHT + 1  # the quota day rolls in Tokyo: the grant was for yesterday
    assert await usage_line(chat, ALICE) == (0, "1", 0.0)
    await engine.submit(ask(ALICE, "new day"))
    with pytest.raises(QuotaExceeded):
        await engine.submit(ask(ALICE, "new day, one too many"))
    await engine.run_until_idle()
    rig.clock.now += 60
    await rig.stop(engine)
    engine = await rig.engine(limits=Limits(user_images=1))  # the grant survives, for its day
    chat = Chat(engine)
    assert await usage_line(chat, ALICE) == (1, "1", 0.5)
    with pytest.raises(QuotaExceeded):
        await engine.submit(ask(ALICE, "after the restart"))
    assert csv_books((await engine.usage_csv()).decode()) == {
        ("test:alice", DAY1): (3, 1.5),
        ("test:alice", DAY2): (1, 0.5),
    }
    rows = await table(rig.data_dir)
    assert {r["day"] for r in rows if r["prompt"].startswith("granted")} == {DAY1}


async def test_quota_tz_from_the_settings_is_the_day_of_rows_and_usage(tmp_path: Path) -> None:
    """QUOTA_TZ through the real composition root: UTC+14 is a day ahead of UTC-12 all day."""
    days = {}
    for tz in ("Pacific/Kiritimati", "Etc/GMT+12"):
        data_dir = tmp_path / tz.replace("/", "-")
        settings = load_settings(
            {"DRAWBRIDGE_DATA_DIR": str(data_dir), "QUOTA_TZ": tz, "HTTP_PORT": "0"},
            env_file=None,
        )
        async with open_core(settings) as core:
            engine = core.engine
            engine.register(RecordingAdapter(platform="test"))
            await engine.start()
            now = time.time()
            ticket = await engine.submit(ask(ALICE, "a fox", model="demo"))
            await engine.run_until_idle()
            (row,) = await table(data_dir)
            want = datetime.fromtimestamp(now, ZoneInfo(tz)).date().isoformat()
            assert row["id"] == ticket.job_id
            assert (row["day"], engine.quotas.today(), (await engine.usage(ALICE)).day) == (
                want,
                want,
                want,
            ), tz
            days[tz] = want
    assert days["Pacific/Kiritimati"] != days["Etc/GMT+12"]


# ---- /metrics: valid, bounded, and honest about restarts ------------------------------------

HOSTILE_IDS = [
    'u"1',
    "u\\2",
    "u\n3",
    "u}4",
    "user 5",
    "👾6",
    'x",status="succeeded',
]
HOSTILE_PROMPTS = [
    'a "quoted" fox',
    "a fox\nwith a newline",
    'status="succeeded"} 1e9',
    "# HELP drawbridge_jobs_total lies",
    "狐狸 in the snow",
]
LABEL_NAMES = {"status", "provider", "model", "platform", "reason", "kind", "outcome", "le"}


async def hostile_traffic(engine: Engine, users: list[str], rig: Rig) -> None:
    for i, uid in enumerate(users):
        user = UserRef("test", uid)
        prompt = HOSTILE_PROMPTS[i % len(HOSTILE_PROMPTS)] + f" #{uid}"
        rig.clock.now += 1
        for request in (
            ask(user, prompt),
            ask(user, prompt + " again"),
            ask(user, prompt + " too many"),  # past the 2-image quota
            ask(user, prompt, model=f"no-such-model-{uid}"),
        ):
            with contextlib.suppress(UserError):
                await engine.submit(request)
    await engine.run_until_idle()


async def test_metrics_are_valid_exposition_with_bounded_labels(rig: Rig) -> None:
    rig.clock.now = MIDNIGHT + 10 * 3600
    engine = await rig.engine(limits=Limits(user_images=2))
    await hostile_traffic(engine, HOSTILE_IDS, rig)
    text = await scrape_text(engine, rig.data_dir, rig.catalog)
    families = list(text_string_to_metric_families(text))  # raises on invalid exposition
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")]
    assert len(helps) == len(set(helps)), "a metric family is described twice"
    before = {(s.name, tuple(sorted(s.labels.items()))) for f in families for s in f.samples}
    for name, labels in before:
        assert {k for k, _ in labels} <= LABEL_NAMES, (name, labels)
        for _, value in labels:
            for secret in (*HOSTILE_IDS, *HOSTILE_PROMPTS, "no-such-model"):
                assert secret not in value, f"{name} has a label from user input: {value!r}"
    assert total(samples_of(text), "drawbridge_spend_usd_total") == pytest.approx(
        0.5 * 2 * len(HOSTILE_IDS)
    )

    # Ten times the users, the same series: no label grows with users or prompts.
    await hostile_traffic(engine, [f"{uid}-{k}" for k in range(10) for uid in HOSTILE_IDS], rig)
    after_text = await scrape_text(engine, rig.data_dir, rig.catalog)
    after = {
        (s.name, tuple(sorted(s.labels.items())))
        for f in text_string_to_metric_families(after_text)
        for s in f.samples
    }
    assert after == before


async def test_metrics_counters_reset_visibly_on_restart(rig: Rig) -> None:
    """Counters live in the process: a restart resets them. Prometheus copes with a reset it can
    see (a `_created` that moves on, or a value that drops), never with one that looks like
    growth, so the operator's `increase(drawbridge_spend_usd_total[1d])` stays right."""
    rig.clock.now = MIDNIGHT + 10 * 3600
    engine = await rig.engine()
    await engine.submit(ask(ALICE, "kite", 2))
    await engine.run_until_idle()
    first = samples_of(await scrape_text(engine, rig.data_dir, rig.catalog))
    await rig.stop(engine)
    await asyncio.sleep(0.01)
    engine = await rig.engine()
    await engine.submit(ask(ALICE, "kite again"))
    await engine.run_until_idle()
    second = samples_of(await scrape_text(engine, rig.data_dir, rig.catalog))
    for name in ("drawbridge_spend_usd", "drawbridge_images", "drawbridge_jobs"):
        for (n, labels), value in first.items():
            if n != f"{name}_total" or (f"{name}_total", labels) not in second:
                continue
            later = second[(f"{name}_total", labels)]
            created = (first[(f"{name}_created", labels)], second[(f"{name}_created", labels)])
            assert later >= value or created[1] > created[0], (name, dict(labels))
    assert total(second, "drawbridge_spend_usd_total") == pytest.approx(0.5)
    rows = await table(rig.data_dir)
    assert usd([r["cost_usd"] for r in rows]) == pytest.approx(
        total(first, "drawbridge_spend_usd_total") + total(second, "drawbridge_spend_usd_total")
    )


async def test_a_bot_starting_beside_a_live_batch_leaves_the_batchs_jobs_to_it(
    harness: Harness,
) -> None:
    """A bot restarted while `drawbridge generate` runs resumed the batch's queued jobs as its
    own: both processes ran (and paid for) each. A dead batch's jobs it still finishes."""
    harness.provider.gate = asyncio.Event()  # the batch's job never gets past its provider
    batch = await harness.engine(start=False)
    await batch.start(resume=False)
    cli = Request(
        user=UserRef(BATCH_PLATFORM, "op"),
        target=Target(BATCH_PLATFORM, chat_id="1"),
        prompt="a lighthouse",
        options=Options(),
    )
    ticket = await batch.submit(cli)
    await harness.abandon(batch)  # its row stays queued or running, as a live batch's does
    with holding_batch(harness.data_dir):
        bot = await harness.engine()
        assert ticket.job_id not in bot._jobs, "the bot took a live batch's job as its own"
        await bot.close()
    after = await harness.engine()  # no batch alive: its job is a dead batch's
    assert ticket.job_id in after._jobs


class _ShortProvider(ScriptedProvider):
    """Makes one image fewer than asked (as a provider whose batch lost one)."""

    async def generate(self, request: GenerationRequest, hooks: JobHooks) -> list[GeneratedImage]:
        images = await super().generate(request, hooks)
        return images[: max(1, len(images) - 1)]


async def test_a_reroll_asks_for_the_images_the_user_asked_for_not_those_made(
    harness: Harness,
) -> None:
    harness.provider = _ShortProvider()
    engine = await harness.engine()
    first = await engine.submit(a_request(n=4, model="paid"))
    await engine.run_until_idle()
    made = await engine.store.get_job(first.job_id)
    assert made is not None and made.options.n == 3 and made.cost_usd == pytest.approx(1.5)
    again = await engine.reroll(UserRef("test", "alice"), first.job_id)
    assert again.n_images == 4 and again.reserved_usd == pytest.approx(2.0)
    await engine.run_until_idle()
