"""Crashes and faults on the real process and the real engine: nothing lost, nothing twice."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path

from bot.catalog import Catalog
from bot.engine import Engine, EngineConfig
from bot.jobs import Options, Request, Target, UserRef
from bot.providers.grsai import GrsaiProvider
from bot.store import Store
from tests.fake_discord import USER, FakeDiscord
from tests.fake_grsai import FakeGrsai, Fault
from tests.fakes import RecordingAdapter
from tests.test_blackbox import drawbridge, rows


def users(n: int) -> list[dict[str, object]]:
    return [{**USER, "id": str(1400000000000000100 + i), "username": f"user{i}"} for i in range(n)]


async def test_kill_9_mid_flight_then_restart_delivers_every_job_exactly_once(
    tmp_path: Path,
) -> None:
    discord = FakeDiscord()
    await discord.start()
    try:
        async with FakeGrsai(line_delay=0.15, steps=[0, 20, 40, 60, 80]) as grsai:
            env = dict(
                DISCORD_BOT_TOKEN=discord.token,
                DISCORD_API_URL=discord.api_url,
                DISCORD_GATEWAY_URL=discord.gateway_url,
                GRSAI_API_KEY=grsai.api_key,
                GRSAI_BASE_URL=grsai.base_url,
                GRSAI_MODE="stream",
                DEFAULT_MODEL="nano-banana",
                CONCURRENCY="6",
                MAX_PENDING_PER_USER="4",
                QUOTA_USER_DAILY_IMAGES="0",
            )
            interactions = []
            async with drawbridge(tmp_path, **env) as first:
                await discord.wait_identified(within=20)
                for i in range(4):
                    for user in users(5):
                        interactions.append(
                            await discord.slash(
                                "imagine", {"prompt": f"job {i} of {user['username']}"}, user=user
                            )
                        )
                # Some tasks are submitted and streaming, some jobs may be done, most are queued.
                await discord.wait_for(lambda: grsai.submits >= 6, within=20)
                first.proc.kill()  # kill -9: no shutdown, no grace
                await first.proc.wait()
            assert len(rows(tmp_path, "SELECT id FROM jobs")) == 20
            async with drawbridge(tmp_path, **env) as second:
                await discord.wait_identified(within=20)

                def finished() -> bool:
                    done = rows(
                        tmp_path, "SELECT count(*) FROM jobs WHERE delivered_at IS NOT NULL"
                    )
                    return done[0][0] == 20

                try:
                    async with asyncio.timeout(40):  # the database, not the fake, says when
                        while not finished():  # noqa: ASYNC110 - polling another process's db
                            await asyncio.sleep(0.05)
                except TimeoutError:
                    state = rows(
                        tmp_path,
                        "SELECT status, error, delivered_at IS NOT NULL, delivery_attempts "
                        "FROM jobs",
                    )
                    raise AssertionError(
                        f"not all delivered: {state}\n{second.stderr[-3000:]!r}"
                    ) from None
                assert await second.stop() == 0
            statuses = rows(tmp_path, "SELECT status, count(*) FROM jobs GROUP BY status")
            assert statuses == [("succeeded", 20)]
            assert grsai.submits <= 24  # a resumed task is polled, not paid for again
            # Every interaction got its image exactly once (as a followup or in the channel).
            with_files = [
                c for c in discord.calls if c.method == "POST" and c.files and c.status == 200
            ]
            per_token = {inter.token: 0 for inter in interactions}
            for call in with_files:
                for token in per_token:
                    if token in call.path:
                        per_token[token] += 1
            channel_posts = [c for c in with_files if "/channels/" in c.path]
            assert sum(per_token.values()) + len(channel_posts) == 20
            assert all(n <= 1 for n in per_token.values())
    finally:
        await discord.close()


async def test_fault_soak_every_job_ends_with_a_message(tmp_path: Path) -> None:
    """20 % submit 5xx, 10 % 429 with Retry-After, 10 % poll errors, some hangs and bad bodies."""
    rng = random.Random(7)
    async with FakeGrsai(steps=[0, 50]) as fake:
        faults: list[Fault] = []
        for _ in range(200):
            roll = rng.random()
            if roll < 0.2:
                faults.append(Fault.http(503))
            elif roll < 0.3:
                faults.append(Fault.http(429, retry_after="0.05"))
            elif roll < 0.33:
                faults.append(Fault("hang"))
            elif roll < 0.36:
                faults.append(Fault("truncated"))
            else:
                faults.append(Fault("none"))
        fake.submit_faults.extend(faults)
        fake.result_faults.extend(  # 10 % of polls fail
            Fault.http(502) if rng.random() < 0.1 else Fault("none") for _ in range(200)
        )
        provider = GrsaiProvider(fake.api_key, fake.base_url, poll_interval=0.02, mode="poll")
        store = await Store.open(tmp_path)
        config = EngineConfig(
            concurrency=8, max_pending_per_user=50, retry_attempts=4, retry_initial=0.01,
            generate_timeout=3.0, queue_max=500,
        )  # fmt: skip
        engine = Engine(
            store, Catalog.load(), {"grsai": provider}, config, default_model="nano-banana"
        )
        adapter = RecordingAdapter()
        engine.register(adapter)
        await engine.start()
        try:
            tickets = [
                await engine.submit(
                    Request(
                        UserRef("test", f"u{i % 6}"),
                        Target("test", chat_id=f"c{i % 6}"),
                        f"soak {i}",
                        Options(),
                    )
                )
                for i in range(40)
            ]
            await engine.run_until_idle()
        finally:
            await engine.close()
            await store.close()
            await provider.aclose()
    with sqlite3.connect(tmp_path / "drawbridge.db") as db:
        statuses = dict(db.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall())
        charged_failures = db.execute(
            "SELECT count(*) FROM jobs WHERE status != 'succeeded' AND cost_usd != 0"
        ).fetchone()[0]
        errors = db.execute(
            "SELECT error_kind, error FROM jobs WHERE status != 'succeeded'"
        ).fetchall()
    assert "queued" not in statuses and "running" not in statuses
    assert sum(statuses.values()) == 40 and charged_failures == 0
    assert statuses.get("succeeded", 0) >= 30, errors  # retries carry most jobs through
    for ticket in tickets:
        delivered = adapter.delivered(ticket.job_id)
        final = [u for j, u in adapter.statuses if j == ticket.job_id and u.kind.final]
        assert delivered == 1 or (delivered == 0 and len(final) == 1), ticket.job_id


async def test_a_full_disk_is_a_clear_error_and_recovers(tmp_path: Path) -> None:
    """SQLite's page limit plays a full disk: writes fail cleanly, nothing half-written."""
    from bot.errors import StorageUnavailable
    from bot.texts import render_error

    store = await Store.open(tmp_path)
    provider_catalog = Catalog.load()
    from bot.providers.demo import DemoProvider

    engine = Engine(
        store, provider_catalog, {"demo": DemoProvider()}, EngineConfig(max_pending_per_user=99)
    )
    adapter = RecordingAdapter()
    engine.register(adapter)
    await engine.start()
    try:
        ok = await engine.submit(
            Request(UserRef("test", "a"), Target("test", chat_id="c"), "before", Options())
        )
        await engine.run_until_idle()
        pages = await store._writer.call(lambda db: db.execute("PRAGMA page_count").fetchone()[0])
        await store._writer.call(lambda db: db.execute(f"PRAGMA max_page_count = {pages}"))
        failures = 0
        for i in range(30):  # fill the last pages, then hit the wall
            try:
                await engine.submit(
                    Request(
                        UserRef("test", "a"),
                        Target("test", chat_id="c"),
                        f"filler {i} " + "x" * 1500,
                        Options(),
                    )
                )
            except StorageUnavailable as exc:  # the user's answer; the log has the cause
                failures += 1
                assert "full" in str(exc.__cause__)
                assert "cannot save new requests" in render_error("en", exc)
        assert failures > 0
        await engine.run_until_idle()
        await store._writer.call(lambda db: db.execute("PRAGMA max_page_count = 1073741823"))
        after = await engine.submit(
            Request(UserRef("test", "a"), Target("test", chat_id="c"), "after", Options())
        )
        await engine.run_until_idle()
        check = await store._writer.call(
            lambda db: db.execute("PRAGMA integrity_check").fetchone()[0]
        )
        assert check == "ok"
        statuses = dict(
            (r[0], r[1])
            for r in await store.fetch(
                "SELECT id, status FROM jobs WHERE id IN (?, ?)", (ok.job_id, after.job_id)
            )
        )
        assert statuses == {ok.job_id: "succeeded", after.job_id: "succeeded"}
        stuck = await store.fetch("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")
        assert stuck[0][0] == 0
    finally:
        await engine.close()
        await store.close()


async def test_a_telegram_flood_storm_loses_no_message(tmp_path: Path) -> None:
    """429 on every third call the bot makes: slower, but every result and answer arrives."""
    from tests.conftest import Clock, Harness
    from tests.fake_telegram import FakeTelegram
    from tests.fakes import ScriptedProvider
    from tests.test_telegram import Rig

    models = tmp_path / "models.toml"
    models.write_text("")
    harness = Harness(
        data_dir=tmp_path / "data",
        catalog=Catalog.load(models),
        clock=Clock(),
        adapter=RecordingAdapter(platform="unused"),
        provider=ScriptedProvider(),
        opened=[],
    )
    async with FakeTelegram() as tg:
        tg.fail(None, 429, retry_after=1, every=3)
        rig = Rig(harness, tg)
        await rig.start(max_pending_per_user=9)
        try:
            for i in range(6):
                user = tg.user(500 + i, name=f"user{i}")
                tg.message(f"/imagine storm picture {i}", user=user, chat=tg.chat(500 + i))
            tg.message("/usage", user=tg.user(600), chat=tg.chat(600))
            photos = await tg.wait_for("sendPhoto", count=6, within=40)
            await tg.wait_text("Today:", within=20)
            await rig.idle()
            assert sorted(c.chat_id for c in photos) == [500 + i for i in range(6)]
            floods = [c for c in tg.calls if c.error is not None and c.error.code == 429]
            assert len(floods) >= 3  # the storm really hit
        finally:
            for engine, adapter in reversed(list(rig.running)):
                await rig.stop(engine, adapter)
            for _, store in reversed(harness.opened):
                await store.close()
    with sqlite3.connect(tmp_path / "data" / "drawbridge.db") as db:
        assert db.execute(
            "SELECT count(*) FROM jobs WHERE status = 'succeeded' AND delivered_at IS NOT NULL"
        ).fetchone() == (6,)
