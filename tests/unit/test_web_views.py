"""The console's waterfall, from histories the engine really writes."""

from __future__ import annotations

from datetime import timedelta

from orchestrator.engine import Decision, on_abort, on_deadline
from orchestrator.web.views import Waterfall, latencies, throughput, waterfall
from tests.unit.test_store import SAGA, T0, TIMEOUT_S, answer, started


def bars(chart: Waterfall) -> list[tuple[str, str, float, float | None]]:
    return [(b.label, b.outcome, b.start_s, b.end_s) for b in chart.bars]


def ms(n: float) -> timedelta:
    return timedelta(milliseconds=n)


def test_a_declined_payment_is_three_bars_ending_in_its_compensation() -> None:
    done = answer(started(T0), ok=True, at=T0 + ms(10))
    done = answer(done, ok=False, at=T0 + ms(30))
    done = answer(done, ok=True, at=T0 + ms(60))

    chart = waterfall(done.state.history, T0 + timedelta(hours=1))

    assert bars(chart) == [
        ("ReserveStock", "succeeded", 0.0, 0.01),
        ("ChargePayment", "failed", 0.01, 0.03),
        ("ReleaseStock", "compensated", 0.03, 0.06),
    ]
    assert [b.compensation for b in chart.bars] == [False, False, True]
    assert chart.total_s == 0.06  # a finished saga's axis ends at its end, not now
    assert [m.event for m in chart.marks] == ["started", "compensating", "compensated"]
    assert chart.left(0.03) == 50.0


def test_a_time_out_and_its_resend_are_bars_of_their_own() -> None:
    waiting = started(T0)
    deadline = T0 + timedelta(seconds=TIMEOUT_S)
    resent = on_deadline(SAGA, waiting.state, deadline, confirmed_at=T0)
    done = answer(resent, ok=True, at=deadline + ms(5))

    chart = waterfall(done.state.history, deadline + timedelta(seconds=1))

    assert bars(chart) == [
        ("ReserveStock", "timed_out", 0.0, TIMEOUT_S),
        ("ReserveStock (attempt 2)", "succeeded", TIMEOUT_S, TIMEOUT_S + 0.005),
        ("ChargePayment", "waiting", TIMEOUT_S + 0.005, None),
    ]
    assert chart.total_s == TIMEOUT_S + 1  # running: the axis reaches now


def test_a_running_saga_waits_up_to_now() -> None:
    chart = waterfall(started(T0).state.history, T0 + timedelta(seconds=2))
    assert bars(chart) == [("ReserveStock", "waiting", 0.0, None)]
    assert chart.total_s == 2.0
    assert chart.width(chart.bars[0]) == 100.0


def test_an_abort_ends_the_unanswered_command_where_its_compensation_starts() -> None:
    charging = answer(started(T0), ok=True, at=T0 + ms(10))  # ChargePayment pending
    aborted = on_abort(SAGA, charging.state, "customer called", "alice", T0 + ms(500))
    refunded = answer(aborted, ok=True, at=T0 + ms(520))
    released = answer(refunded, ok=True, at=T0 + ms(540))

    chart = waterfall(released.state.history, T0 + timedelta(hours=1))

    assert bars(chart) == [
        ("ReserveStock", "succeeded", 0.0, 0.01),
        ("ChargePayment", "unanswered", 0.01, 0.5),
        ("RefundPayment", "compensated", 0.5, 0.52),
        ("ReleaseStock", "compensated", 0.52, 0.54),
    ]
    assert "abort_requested" in [m.event for m in chart.marks]


def resent(decision: Decision, times: int) -> Decision:
    """The pending command's deadline passes ``times`` times: each time it is sent again."""
    for _ in range(times):
        state = decision.state
        assert state.deadline is not None
        decision = on_deadline(SAGA, state, state.deadline, confirmed_at=state.sent_at)
    return decision


def at_the_pivot() -> Decision:
    """Stock reserved and the card charged: CompleteOrder sent at +20 ms."""
    return answer(answer(started(T0), ok=True, at=T0 + ms(10)), ok=True, at=T0 + ms(20))


def test_sends_the_history_leaves_out_are_one_bar_up_to_the_reply() -> None:
    # CompleteOrder is resent until answered; the engine records attempts 1-5, then every 10th
    waiting = resent(at_the_pivot(), 7)  # attempt 8 in flight
    replied_at = waiting.state.sent_at + ms(3)  # type: ignore[operator]
    done = answer(waiting, ok=True, at=replied_at)

    chart = waterfall(done.state.history, replied_at)

    pivot = [b for b in chart.bars if b.step == "complete_order"]
    assert [(b.label, b.outcome) for b in pivot] == [
        ("CompleteOrder", "timed_out"),
        *[(f"CompleteOrder (attempt {n})", "timed_out") for n in (2, 3, 4)],
        ("CompleteOrder (attempt 5)", "timed_out"),
        ("CompleteOrder (attempts 6 on, not in the history)", "succeeded"),
    ]
    assert pivot[-1].end_s == chart.total_s  # the reply ends the axis: nothing is lost
    assert [m.event for m in chart.marks][-1] == "completed"


def test_while_unrecorded_sends_go_on_the_saga_waits_up_to_now() -> None:
    waiting = resent(at_the_pivot(), 7)
    now = waiting.state.sent_at + timedelta(seconds=1)  # type: ignore[operator]

    chart = waterfall(waiting.state.history, now)

    assert chart.bars[-1].label == "CompleteOrder (attempts 6 on, not in the history)"
    assert (chart.bars[-1].outcome, chart.bars[-1].end_s) == ("waiting", None)
    assert chart.total_s == (now - T0).total_seconds()


def test_latencies_count_only_replies_to_a_send_in_the_history() -> None:
    done = answer(resent(at_the_pivot(), 7), ok=True, at=T0 + timedelta(hours=1))
    rows = {row.command: row for row in latencies([done.state])}
    assert "CompleteOrder" not in rows  # its reply answers a send the history left out
    assert rows["ChargePayment"].p50_ms == 10.0


def test_the_throughput_chart_scales_to_the_busiest_minute_of_all_outcomes() -> None:
    minute = int(T0.timestamp()) // 60
    rows = [("COMPLETED", minute, 5), ("COMPENSATED", minute, 5), ("FAILED", minute - 1, 7)]
    chart = throughput(rows, T0, minutes=3)
    assert chart.by_outcome["COMPLETED"] == [0, 0, 5]
    assert chart.peak == 10  # the bars stack: 5 completed on 5 compensated
