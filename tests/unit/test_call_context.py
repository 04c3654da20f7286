"""The call context handlers read: a frozen record, whose text never shows the caller's bearer token."""

import dataclasses

import pytest

from bastion.grpc.context import CallContext
from tests.unit.test_service_client import ALICE


def test_a_handler_cannot_change_who_is_calling() -> None:
    call = CallContext("corr-1", "cli", ALICE, "/bastion.accounts.v1.Accounts/GetAccount", bearer="alices-token")
    with pytest.raises(dataclasses.FrozenInstanceError):
        call.principal = None  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        call.peer_identity = "payments"  # type: ignore[misc]


def test_the_bearer_token_never_shows_in_the_contexts_text() -> None:
    """A context logged or shown in an error's message must not hand the caller's token on."""
    call = CallContext("corr-1", "cli", ALICE, "/bastion.accounts.v1.Accounts/GetAccount", bearer="eyJ.secret.token")
    assert "eyJ.secret.token" not in repr(call) and "eyJ.secret.token" not in str(call)
    assert "corr-1" in repr(call)
