"""The intake gate: the next long poll waits for the updates taken before it, but not forever."""

from __future__ import annotations

import asyncio

import pytest

from adapters.telegram_intake import IntakeGate


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_the_gate_is_open_when_nothing_is_being_handled() -> None:
    gate = IntakeGate(wait=30)
    await asyncio.wait_for(gate.opened(), 1)


async def test_the_poll_waits_until_the_updates_taken_are_handled() -> None:
    gate = IntakeGate(wait=30)
    done = [asyncio.Event(), asyncio.Event()]
    handling = [asyncio.create_task(gate.process_update(i, d.wait())) for i, d in enumerate(done)]
    await turns()
    poll = asyncio.create_task(gate.opened())
    done[0].set()
    await turns()
    assert not poll.done()  # one update is still being handled
    done[1].set()
    await asyncio.wait_for(poll, 1)
    await asyncio.gather(*handling)
    assert gate.in_flight == 0


async def test_updates_still_queued_for_the_application_hold_the_poll() -> None:
    gate = IntakeGate(wait=30)
    gate.queue.put_nowait("an update not yet taken by the application")
    poll = asyncio.create_task(gate.opened())
    await turns()
    assert not poll.done()
    gate.queue.get_nowait()
    finished = asyncio.Event()
    finished.set()
    await gate.process_update("it", finished.wait())  # handled: the count drops to 0
    await asyncio.wait_for(poll, 1)


async def test_an_update_that_hangs_holds_the_next_poll_only_for_the_wait() -> None:
    gate = IntakeGate(wait=0.05)
    hung = asyncio.Event()
    handling = asyncio.create_task(gate.process_update("stuck", hung.wait()))
    await turns()
    await asyncio.wait_for(gate.opened(), 5)
    assert gate.in_flight == 1 and not handling.done()
    hung.set()
    await handling


async def test_a_failing_update_is_counted_out_too() -> None:
    gate = IntakeGate(wait=30)

    async def boom() -> None:
        raise RuntimeError("handler bug")

    with pytest.raises(RuntimeError):
        await gate.process_update("bad", boom())
    assert gate.in_flight == 0
    await asyncio.wait_for(gate.opened(), 1)


async def test_an_update_that_lets_go_no_longer_holds_the_poll() -> None:
    gate = IntakeGate(wait=30)
    slow = asyncio.Event()

    async def download_a_reference() -> None:
        gate.let_go()
        gate.let_go()  # once is enough: the count drops by one
        await slow.wait()

    handling = asyncio.create_task(gate.process_update("photo", download_a_reference()))
    await turns()
    await asyncio.wait_for(gate.opened(), 1)
    assert gate.in_flight == 0
    slow.set()
    await handling
    assert gate.in_flight == 0  # not counted out twice


async def test_let_go_outside_an_update_or_on_another_gate_changes_nothing() -> None:
    gate, other = IntakeGate(wait=30), IntakeGate(wait=30)
    busy = asyncio.Event()

    async def handle() -> None:
        other.let_go()  # not the gate this update came through
        await busy.wait()

    handling = asyncio.create_task(gate.process_update("busy", handle()))
    await turns()
    gate.let_go()  # this task handles no update
    assert gate.in_flight == 1 and other.in_flight == 0
    busy.set()
    await handling
    assert gate.in_flight == 0
