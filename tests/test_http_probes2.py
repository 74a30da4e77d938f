"""Adversarial probes of the HTTP server an operator exposes: the GrsAI callback route, the
Telegram webhook route, health, metrics, and what strangers send to the port.

The real composition throughout: `open_core` from settings, the real `HttpServer`, the real
GrsAI client against the loopback fake (the rig of `tests/test_money_paths.py`), and the real
`TelegramAdapter` behind the route `drawbridge run` mounts (`bot.cli.telegram_webhook`).
The defects they found are fixed: a non-ASCII secret (path or header) made a 500; JSON nested
past the parser's depth made a 500; a callback signed for one job could drive another job's
task; bodies for unknown tasks were kept whole; /healthz said ok while no row could be written.
"""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.telegram_adapter import TelegramAdapter
from bot.app import Core, open_core
from bot.cli import telegram_webhook
from bot.errors import StorageUnavailable
from bot.http import HttpServer
from bot.jobs import Options, Request, Target, UserRef
from bot.settings import load_settings
from tests.fake_grsai import FakeGrsai
from tests.fake_telegram import FakeTelegram
from tests.fakes import RecordingAdapter
from tests.test_money_paths import Rig, bot, grsai_env, post, settle, until

TG_SECRET = "probe-webhook-secret-value"
TG_PATH = "/tg-hook"


@pytest.fixture(autouse=True)
def _ptb_timedelta(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTB_TIMEDELTA", "true")


async def raw_request(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 exchange written byte for byte (headers a client library would refuse)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest


async def valid_hook(rig: Rig, job: str = "job-probe") -> str:
    signer = rig.core.webhooks
    assert signer is not None
    return signer.url_for(job)


def early_bytes(rig: Rig) -> int:
    """Bytes of webhook bodies the GrsAI client keeps for tasks it is not waiting on."""
    return sum(len(json.dumps(t)) for q in rig.grsai._early.values() for t in q)


# ---- the GrsAI callback route ------------------------------------------------------------------


async def test_grsai_hook_with_a_non_ascii_secret_is_404_not_500(tmp_path: Path) -> None:
    async with FakeGrsai() as fake, bot(tmp_path, grsai_env(fake), http=True) as rig:
        assert await post(f"{rig.base}/hooks/grsai/job1/%C3%A9", json={"id": "t"}) == 404
        assert await post(f"{rig.base}/hooks/grsai/%C3%A9/%C3%A9", json={"id": "t"}) == 404


async def test_grsai_hook_with_deeply_nested_json_is_400_not_500(tmp_path: Path) -> None:
    async with FakeGrsai() as fake, bot(tmp_path, grsai_env(fake), http=True) as rig:
        hook = await valid_hook(rig)
        status = await post(hook, data=b"[" * 200_000 + b"]" * 200_000)
        assert status == 400


async def test_grsai_hook_with_a_huge_body_is_413_and_the_server_stays_well(
    tmp_path: Path,
) -> None:
    async with FakeGrsai() as fake, bot(tmp_path, grsai_env(fake), http=True) as rig:
        hook = await valid_hook(rig)
        big = json.dumps({"id": "t-huge", "status": "running", "pad": "x" * 5_000_000})
        assert await post(hook, data=io.BytesIO(big.encode())) == 413
        assert rig.grsai._early == {}  # nothing of it kept
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{rig.base}/healthz") as resp,
        ):
            assert resp.status == 200 and (await resp.json())["ok"] is True


async def test_grsai_hook_odd_json_values_are_answered_without_a_500(tmp_path: Path) -> None:
    async with FakeGrsai() as fake, bot(tmp_path, grsai_env(fake), http=True) as rig:
        hook = await valid_hook(rig)
        bodies: list[bytes] = [
            b"null",
            b"5",
            b'"text"',
            b"[]",
            b'{"id": {"x": 1}}',
            b'{"id": "t-odd", "progress": NaN}',
            b'{"id": "t-odd", "progress": 1e400}',
            b'{"data": "not a task"}',
            b"\xff\xfe\x00",  # not UTF-8
        ]
        statuses = [await post(hook, data=body) for body in bodies]
        assert all(s in (200, 400) for s in statuses), statuses
        assert statuses[-1] == 400


async def test_grsai_hook_failed_after_succeeded_changes_nothing(tmp_path: Path) -> None:
    """The job succeeded on its callbacks; a late `failed` (and a second `succeeded`) for the
    same task on the job's own URL: still one charge, one post, one download."""
    async with FakeGrsai() as fake, bot(tmp_path, grsai_env(fake), http=True) as rig:
        rig.grsai.poll_interval = 30  # the callbacks end it
        job = await rig.submit("nano-banana")
        await rig.idle()
        price = rig.price("nano-banana")
        row = await rig.row(job)
        assert (row["status"], row["cost_usd"]) == ("succeeded", pytest.approx(price))
        task_id = row["task_id"] or next(iter(fake.tasks))
        hook = await valid_hook(rig, job)
        late_fail = {
            "id": task_id,
            "status": "failed",
            "failure_reason": "error",
            "error": "late",
            "results": [],
        }
        gets = fake.file_gets
        assert await post(hook, json=late_fail) == 200
        assert await post(hook, json=fake.tasks[task_id].view(fake.base_url)) == 200
        await settle()
        await rig.idle()
        row = await rig.row(job)
        assert (row["status"], row["cost_usd"]) == ("succeeded", pytest.approx(price))
        assert rig.adapter.delivered(job) == 1 and fake.file_gets == gets
        assert fake.submits == 1
        assert await rig.used() == (1, pytest.approx(price))
        assert rig.spent_today() == pytest.approx(price)


async def test_grsai_hook_signed_for_one_job_cannot_drive_another_jobs_task(
    tmp_path: Path,
) -> None:
    async with (
        FakeGrsai(send_webhooks=False) as fake,
        bot(tmp_path, grsai_env(fake), http=True) as rig,
    ):
        rig.grsai.poll_interval = 30  # job B sits waiting for its callback
        victim = await rig.submit("nano-banana", user="bob")
        await until(lambda: fake.submits == 1)
        task_id = next(iter(fake.tasks))
        await settle(0.2)
        polls = fake.result_calls
        # Mallory holds the URL of her own job (say a leaked log line): not bob's.
        mallory_hook = await valid_hook(rig, "mallorys-job")
        forged_progress = {"id": task_id, "status": "running", "progress": 77}
        forged_end = {
            "id": task_id,
            "status": "succeeded",
            "results": [{"url": "http://127.0.0.1:9/evil.png"}],
        }
        assert await post(mallory_hook, json=forged_progress) in (200, 404)
        assert await post(mallory_hook, json=forged_end) in (200, 404)
        await settle(0.3)
        shown = [u.text for j, u in rig.adapter.statuses if j == victim]
        assert not any("77" in text for text in shown), shown
        assert fake.result_calls == polls  # a foreign URL woke no poll of bob's task
        # bob's own callback ends his job, once
        fake.tasks[task_id].finish()
        assert (
            await post(await valid_hook(rig, victim), json=fake.tasks[task_id].view(fake.base_url))
            == 200
        )
        await rig.idle()
        assert (await rig.row(victim))["status"] == "succeeded"
        assert rig.adapter.delivered(victim) == 1


async def test_grsai_bodies_for_unknown_tasks_are_bounded_in_memory(tmp_path: Path) -> None:
    async with FakeGrsai() as fake, bot(tmp_path, grsai_env(fake), http=True) as rig:
        hook = await valid_hook(rig)
        pad = "x" * 900_000
        async with aiohttp.ClientSession() as session:
            for i in range(24):
                body = {"id": f"never-submitted-{i}", "status": "running", "pad": pad}
                async with session.post(hook, json=body) as resp:
                    assert resp.status == 200
        assert early_bytes(rig) <= 4_000_000, f"{early_bytes(rig):,} bytes kept"


async def test_grsai_hook_burst_of_200_callbacks_all_answered_quickly(tmp_path: Path) -> None:
    async with FakeGrsai() as fake, bot(tmp_path, grsai_env(fake), http=True) as rig:
        hook = await valid_hook(rig)
        async with aiohttp.ClientSession() as session:

            async def one(i: int) -> int:
                body = {"id": f"burst-{i % 50}", "status": "running", "progress": i % 100}
                async with session.post(hook, json=body) as resp:
                    return resp.status

            began = time.monotonic()
            statuses = await asyncio.gather(*(one(i) for i in range(200)))
            took = time.monotonic() - began
        assert statuses == [200] * 200
        assert took < 5.0, took
        assert all(len(q) <= 8 for q in rig.grsai._early.values())


# ---- the Telegram webhook route ----------------------------------------------------------------


@dataclass
class TgRig:
    core: Core
    http: HttpServer
    adapter: TelegramAdapter
    tg: FakeTelegram

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.bound_port}{TG_PATH}"


@pytest.fixture
async def tgrig(tmp_path: Path) -> AsyncIterator[TgRig]:
    async with FakeTelegram() as tg:
        settings = load_settings({"DRAWBRIDGE_DATA_DIR": str(tmp_path)}, env_file=None)
        async with open_core(settings) as core:
            http = HttpServer(core, "127.0.0.1", 0)
            adapter = TelegramAdapter(
                core.engine,
                tg.token,
                tg.url,
                webhook_url=f"https://bot.example{TG_PATH}",
                webhook_secret=TG_SECRET,
                poll_timeout=1,
                edit_interval=0.2,
                action_interval=0.2,
            )
            http.add_post(TG_PATH, telegram_webhook(adapter))
            await http.open()
            await adapter.open()
            await core.engine.start()
            await adapter.start()
            try:
                yield TgRig(core, http, adapter, tg)
            finally:
                await adapter.stop_intake()
                await http.close()
                await adapter.close()


SECRET_HEADER = {"X-Telegram-Bot-Api-Secret-Token": TG_SECRET}


async def test_telegram_hook_with_a_non_ascii_secret_header_is_403_not_500(
    tgrig: TgRig,
) -> None:
    port = tgrig.http.bound_port
    head = (
        b"POST " + TG_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\n"
        b"X-Telegram-Bot-Api-Secret-Token: \xc3\xa9t\xc3\xa9\r\n"
    )
    status, rest = await raw_request(port, head, b'{"update_id": 1}')
    assert status == 403
    assert b"Traceback" not in rest


async def test_telegram_hook_wrong_missing_secret_and_odd_bodies(tgrig: TgRig) -> None:
    update = {"update_id": 1, "message": tgrig.tg.message("/help")}
    async with aiohttp.ClientSession() as session:
        for headers in (
            {},
            {"X-Telegram-Bot-Api-Secret-Token": ""},
            {"X-Telegram-Bot-Api-Secret-Token": TG_SECRET + "x"},
        ):
            async with session.post(tgrig.url, json=update, headers=headers) as resp:
                assert resp.status == 403
        odd: list[bytes] = [b"[]", b"[1, 2]", b"null", b"7", b'"s"', b"{}", b"{not json", b"\xff"]
        for body in odd:
            async with session.post(tgrig.url, data=body, headers=SECRET_HEADER) as resp:
                assert resp.status == 400, body
                assert b"Traceback" not in await resp.read()
        async with session.post(
            tgrig.url, data=io.BytesIO(b"x" * 10_000_000), headers=SECRET_HEADER
        ) as resp:
            assert resp.status == 413
    await settle(0.3)
    assert not tgrig.tg.sent("sendMessage")  # none of that reached a chat
    assert list(tgrig.adapter.errors) == []


async def test_telegram_hook_with_deeply_nested_json_is_400_not_500(tgrig: TgRig) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            tgrig.url, data=b"[" * 200_000 + b"]" * 200_000, headers=SECRET_HEADER
        ) as resp,
    ):
        assert resp.status == 400


async def test_telegram_hook_burst_of_200_updates_each_twice_is_200_fast_and_taken_once(
    tgrig: TgRig,
) -> None:
    tg = tgrig.tg
    updates = [
        {
            "update_id": 10_000 + i,
            "message": tg.message("/help", user=tg.user(5000 + i), chat=tg.chat(5000 + i)),
        }
        for i in range(200)
    ]
    async with aiohttp.ClientSession() as session:

        async def one(update: dict[str, Any]) -> int:
            async with session.post(tgrig.url, json=update, headers=SECRET_HEADER) as resp:
                return resp.status

        began = time.monotonic()
        statuses = await asyncio.gather(*(one(u) for u in updates + updates))
        took = time.monotonic() - began
    assert statuses == [200] * 400
    assert took < 5.0, took
    await tg.wait_for("sendMessage", count=200, within=30)
    await settle(1.0)
    replied = {c.chat_id for c in tg.sent("sendMessage")}
    assert len(tg.sent("sendMessage")) == 200 and len(replied) == 200


# ---- health, metrics, strangers ----------------------------------------------------------------


@pytest.fixture
async def plain(tmp_path: Path) -> AsyncIterator[tuple[Core, HttpServer, Path]]:
    settings = load_settings({"DRAWBRIDGE_DATA_DIR": str(tmp_path)}, env_file=None)
    async with open_core(settings) as core:
        http = HttpServer(core, "127.0.0.1", 0)
        await http.open()
        await core.engine.start()
        try:
            yield core, http, tmp_path
        finally:
            await http.close()


async def test_unknown_paths_methods_and_head(plain: tuple[Core, HttpServer, Path]) -> None:
    _, http, _ = plain
    base = f"http://127.0.0.1:{http.bound_port}"
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/metrics"):
            async with session.head(base + path) as resp:
                assert resp.status == 200 and await resp.read() == b""
        for method, path, expected in [
            ("GET", "/", 404),
            ("GET", "/../../etc/passwd", 404),
            ("PUT", "/healthz", 405),
            ("OPTIONS", "/metrics", 405),
            ("PATCH", "/hooks/grsai/a/b", 405),
            ("POST", "/hooks/grsai/a/b/c", 404),
            ("POST", "/hooks/grsai/a/b", 404),  # PUBLIC_URL unset: no signer, every hook unknown
            ("GET", "/healthz?verbose=1&x=%ff", 200),
        ]:
            async with session.request(method, base + path) as resp:
                body = await resp.read()
                assert resp.status == expected, (method, path, resp.status)
                assert b"Traceback" not in body and b'File "' not in body
                if expected == 405:
                    assert "Allow" in resp.headers


async def test_metrics_count_what_happened_and_the_dollars_charged(
    plain: tuple[Core, HttpServer, Path],
) -> None:
    core, http, data_dir = plain
    core.engine.register(RecordingAdapter())
    for prompt in ("a fox", "an owl", "a cat [demo:refuse]"):
        await core.engine.submit(
            Request(
                UserRef("test", "a"),
                Target("test", chat_id="c"),
                prompt,
                Options(n=1),
                model="demo",
            )
        )
    await core.engine.run_until_idle()
    await core.store.flush()
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{http.bound_port}/metrics") as resp,
    ):
        text = await resp.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    with sqlite3.connect(data_dir / "drawbridge.db") as db:
        by_status = dict(db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
        (charged,) = db.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM jobs").fetchone()
    labels = (("model", "demo"), ("provider", "demo"))
    assert (
        samples[("drawbridge_jobs_total", (*labels, ("status", "succeeded")))]
        == by_status["succeeded"]
        == 2
    )
    assert (
        samples[("drawbridge_jobs_total", (*labels, ("status", "refused")))]
        == by_status["refused"]
        == 1
    )
    spend = sum(v for (name, _), v in samples.items() if name == "drawbridge_spend_usd_total")
    assert spend == pytest.approx(charged, abs=1e-9)
    submitted = sum(
        v for (name, _), v in samples.items() if name == "drawbridge_jobs_submitted_total"
    )
    assert submitted == 3
    assert samples[("drawbridge_in_flight", ())] == 0


async def test_healthz_is_unwell_while_the_database_cannot_be_written(
    plain: tuple[Core, HttpServer, Path],
) -> None:
    core, http, data_dir = plain
    blocker = sqlite3.connect(data_dir / "drawbridge.db", timeout=0.1, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        core.engine.register(RecordingAdapter())
        request = Request(
            UserRef("test", "a"), Target("test", chat_id="c"), "a fox", Options(n=1), model="demo"
        )
        with pytest.raises(StorageUnavailable):
            await asyncio.wait_for(core.engine.submit(request), 15)
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"http://127.0.0.1:{http.bound_port}/healthz",
                timeout=aiohttp.ClientTimeout(total=15),
            ) as resp,
        ):
            body = await resp.json()
        assert resp.status == 503 and body["checks"]["database"] is False, body
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
