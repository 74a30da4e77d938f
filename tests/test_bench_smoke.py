"""The end-to-end benches still run: a tiny makespan run and a tiny first-reply run.

Each starts the fakes in a process of their own (`bench.fakehost`) and the real bot in this one,
as `python -m bench.e2e` and `python -m bench.first_reply` do, at sizes that take a few seconds.
"""

from __future__ import annotations

import math

import pytest

from bench.e2e import Scenario, bot_run, naive_client, send_bound
from bench.fakehost import FakeHost
from bench.first_reply import measure, measure_bare, send_floor


@pytest.fixture(autouse=True)
def _ptb_timedelta(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTB_TIMEDELTA", "true")


def test_the_send_bounds() -> None:
    assert send_bound(300, 50, 2.0) == pytest.approx(12 + 20 / 30)
    assert send_bound(2000, 200, 1.0) == pytest.approx(1 + 1970 / 30, abs=0.01)
    assert send_bound(100, 25, 1.0) == pytest.approx(4.0)
    floor = send_floor(300)
    assert floor[29] == 0.0 and floor[-1] == pytest.approx(270 / 30)


@pytest.mark.timeout(30)
async def test_e2e_bench_smoke() -> None:
    scenario = Scenario(jobs=20, users=5, latency=0.1, concurrency=10)
    async with FakeHost(latency=scenario.latency) as host:
        naive = await naive_client(host.grsai_url, host.api_key, scenario, None)
        bot = await bot_run(host, scenario, within=20, quiet=0)
        counts = await host.grsai_counts()
    assert naive.done == 20 and math.isfinite(naive.makespan)
    assert bot.done == 20 and math.isfinite(bot.makespan)
    assert bot.methods["sendPhoto"] == 20
    assert bot.extra["429s"] == 0 and bot.extra["handler_errors"] == 0
    assert counts["submits"] == 40  # each side paid once a job


@pytest.mark.timeout(30)
async def test_first_reply_bench_smoke() -> None:
    result = await measure("smoke", 20, 0.1, limits=True, within=20)
    assert len(result.latencies) == 20
    assert all(0 < x < 5 for x in result.latencies)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("pool", [None, 2])  # the bot's connections; fewer than the chats
async def test_first_reply_parts_alone_answer_every_chat_once(pool: int | None) -> None:
    result = await measure_bare("parts alone", 20, within=20, pool=pool)
    assert len(result.latencies) == 20 and result.acks == 20
    assert all(0 < x < 5 for x in result.latencies)
