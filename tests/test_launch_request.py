"""The launch request (issue 18): built once, one JSON line, validated on arrival."""

from __future__ import annotations

import pytest

from cellblock.policy import load_policy
from cellblock.warden.request import LaunchRequest

ENV = {"PATH": "/usr/bin"}


def test_round_trip_is_exact() -> None:
    req = LaunchRequest(kernel_id="k-1", profile="agent", env=ENV, datasets=("sales",),
                        client_conn={"shell_port": 5, "key": "k"})
    assert req.line().endswith(b"\n") and req.line().count(b"\n") == 1
    assert LaunchRequest.parse(req.line()) == req
    assert LaunchRequest.parse(req.line()).datasets == ("sales",)  # a tuple, never a string


@pytest.mark.parametrize(("fields", "message"), [
    ({"kernel_id": "../x"}, "kernel id '../x' is not allowed"),
    ({"datasets": ("a,b",)}, "dataset name 'a,b' is not a dataset name"),
    ({"datasets": ("sales", "sales")}, "name one dataset twice"),
    ({"op": "fork"}, "Input should be 'launch' or 'pool'"),
    ({"colour": 1}, "Extra inputs are not permitted"),
    ({"profile": ""}, "at least 1 character"),
])
def test_bad_requests_are_refused_naming_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LaunchRequest.model_validate({"profile": "agent", "env": ENV, **fields})


def test_startable_is_one_answer(operator) -> None:
    from cellblock.errors import ProfileDisabled, UnknownProfile

    operator("[profiles.agent]\nenabled = false\n")
    policy = load_policy()
    with pytest.raises(ProfileDisabled, match="profile 'agent' is disabled by the operator"):
        policy.startable("agent")
    with pytest.raises(UnknownProfile, match="unknown profile 'nope'; known profiles"):
        policy.startable("nope")
    assert policy.startable("analyst").enabled
