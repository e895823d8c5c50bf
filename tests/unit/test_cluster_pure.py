"""The cluster controller's pure decisions: where a volume goes, how a node's failure is
re-raised. The API server and the agents are exercised for real in tests/kubernetes."""

from __future__ import annotations

import pytest

from csi_vduse import errors
from csi_vduse.cluster.resources import AgentError, raise_reported, settled
from csi_vduse.csi.cluster_controller import choose_node
from csi_vduse.csi.proto import csi_pb2 as pb

KEY = "topology.vduse.csi.dev/node"


def requirement(requisite: list[str], preferred: tuple[str, ...] = ()) -> pb.TopologyRequirement:
    def seg(n: str) -> pb.Topology:
        return pb.Topology(segments={KEY: n})

    return pb.TopologyRequirement(
        requisite=[seg(n) for n in requisite], preferred=[seg(n) for n in preferred]
    )


def test_the_first_preferred_node_the_requisite_allows() -> None:
    req = requirement(["a", "b"], ("c", "b", "a"))
    assert choose_node(req, KEY, None, {"a": 10, "b": 1}) == "b"


def test_without_a_preference_the_allowed_node_with_most_space() -> None:
    assert choose_node(requirement(["a", "b"]), KEY, None, {"a": 10, "b": 20, "c": 99}) == "b"
    assert choose_node(requirement([]), KEY, None, {"a": 10, "c": 99}) == "c"
    # a requisite node without a report yet is still allowed, after the ones with space
    assert choose_node(requirement(["x"]), KEY, None, {"a": 10}) == "x"


def test_a_source_pins_the_node_or_the_request_is_rescheduled() -> None:
    assert choose_node(requirement(["a", "b"], ("a",)), KEY, "b", {}) == "b"
    assert choose_node(requirement([]), KEY, "b", {}) == "b"
    with pytest.raises(errors.ResourceExhausted, match="node b"):
        choose_node(requirement(["a"], ("a",)), KEY, "b", {"b": 100})


def test_no_node_at_all_is_resource_exhausted() -> None:
    with pytest.raises(errors.ResourceExhausted):
        choose_node(requirement([]), KEY, None, {})


def test_segments_of_other_keys_do_not_count() -> None:
    req = pb.TopologyRequirement(preferred=[pb.Topology(segments={"zone": "z1"})])
    assert choose_node(req, KEY, None, {"a": 1}) == "a"


@pytest.mark.parametrize(
    ("code", "kind"),
    [("NOT_FOUND", errors.NotFound), ("RESOURCE_EXHAUSTED", errors.ResourceExhausted),
     ("FAILED_PRECONDITION", errors.FailedPrecondition), ("OUT_OF_RANGE", errors.OutOfRange),
     ("INTERNAL", AgentError), ("SOMETHING_NEW", AgentError)],
)  # fmt: skip
def test_a_reported_failure_keeps_its_code_and_names_the_node(code: str, kind: type) -> None:
    with pytest.raises(kind, match=r"no space \(node b\)"):
        raise_reported(code, "no space", "b")


def test_ok_raises_nothing() -> None:
    raise_reported("OK", "", "b")


def test_settled_means_answered_for_the_current_generation() -> None:
    status: dict[str, object] = {"code": "OK", "observedGeneration": 1}
    obj = {"metadata": {"generation": 2}, "status": status}
    assert not settled(obj)
    status["observedGeneration"] = 2
    assert settled(obj)
    assert not settled({"metadata": {"generation": 1}})
