"""The test pipeline's order: a need must pass, an `after` stage must only have ended."""

from __future__ import annotations

import sys

from tests.pipeline import STAGES, Pipeline, Stage


def stage(name: str, code: str, **order: tuple[str, ...]) -> Stage:
    return Stage(name, name, ((sys.executable, "-c", code),), 60, **order)


def test_a_stage_after_another_starts_when_it_ends_even_failed() -> None:
    first = stage("first", "import time, sys; time.sleep(1); sys.exit(1)")
    later = stage("later", "pass", after=("first",))
    dependent = stage("dependent", "pass", needs=("first",))
    pipeline = Pipeline([first, later, dependent])

    assert pipeline.run() is False

    runs = pipeline.runs
    assert runs["first"].state == "failed"
    assert runs["later"].state == "passed"
    assert runs["later"].started >= runs["first"].ended
    assert runs["dependent"].state == "skipped"


def test_an_after_stage_that_is_not_selected_does_not_hold_one_back() -> None:
    pipeline = Pipeline([stage("later", "pass", after=("absent",))])

    assert pipeline.run() is True


def test_the_cluster_never_runs_beside_both_e2e_guests() -> None:
    by_name = {s.name: s for s in STAGES}
    assert "e2e-6.1" in by_name["cluster"].after
    assert "lab" in by_name["cluster"].needs
