"""The console's waterfall, from histories the engine really writes."""

from __future__ import annotations

from datetime import timedelta

from orchestrator.engine import on_abort, on_deadline
from orchestrator.web.views import Waterfall, waterfall
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

    chart = waterfall(done.state.history, deadline)

    assert bars(chart)[:2] == [
        ("ReserveStock", "timed_out", 0.0, TIMEOUT_S),
        ("ReserveStock (attempt 2)", "succeeded", TIMEOUT_S, TIMEOUT_S + 0.005),
    ]


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
