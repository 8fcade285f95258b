"""orchestrator.steer: which message is the orchestrator's answer to an operator's action."""

from __future__ import annotations

from uuid import uuid4

from messages.contract.models import (
    AbortSaga,
    ActionRefused,
    ActionTaken,
    RetrySaga,
    SagaFinished,
    SagaStatus,
)
from orchestrator.steer import answer_to

SAGA_ID = uuid4()
RETRY = RetrySaga(saga_id=SAGA_ID, reason="payment is back", requested_by="alice (web console)")


def test_the_answer_to_an_action_is_taken_or_refused_for_that_saga_and_action() -> None:
    accept = answer_to(RETRY)

    assert accept(ActionTaken(saga_id=SAGA_ID, action="RetrySaga", detail="sent again"))
    assert accept(ActionRefused(saga_id=SAGA_ID, action="RetrySaga", detail="FAILED is final"))


def test_answers_to_other_sagas_or_actions_and_results_are_not_it() -> None:
    accept = answer_to(RETRY)

    assert not accept(ActionTaken(saga_id=uuid4(), action="RetrySaga", detail="sent again"))
    assert not accept(ActionTaken(saga_id=SAGA_ID, action="AbortSaga", detail="compensating"))
    assert not accept(SagaFinished(saga_id=SAGA_ID, status=SagaStatus.COMPLETED))
    assert not accept(AbortSaga(saga_id=SAGA_ID, reason="x", requested_by="y"))
