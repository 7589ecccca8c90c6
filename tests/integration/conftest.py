"""Fixtures shared by the integration tests."""

import pytest


@pytest.fixture(scope="session")
def engine_launch(tmp_path_factory):
    """The reports of one 2-process launch running the engine checks of several test files in sequence
    (:func:`engine_launch.engine_checks`): ``[rank_0_report, rank_1_report]``, each ``{body: that body's report}``.

    Session-scoped: the launch runs once per test process whichever of those files' tests it reaches first (with
    xdist, at most once per worker that draws one of them).
    """
    from dist import run_distributed
    from engine_launch import engine_checks

    tmp = tmp_path_factory.mktemp("engine_launch")
    return run_distributed(engine_checks, 2, str(tmp), timeout=900)
