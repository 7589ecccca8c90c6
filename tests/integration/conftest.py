"""Fixtures shared by the integration tests: launches whose results several tests assert on, run once per session."""

import pytest


@pytest.fixture(scope="session")
def engine_launch(request, tmp_path_factory):
    """The reports of one 2-process launch running the engine checks of several test files in sequence
    (:func:`engine_launch.engine_checks`): ``[rank_0_report, rank_1_report]``, each ``{body: that body's report}``.

    Run once per session (:func:`dist.once_per_session`), whichever of those tests comes first.
    """
    from dist import once_per_session, run_distributed
    from engine_launch import engine_checks

    def launch():
        tmp = tmp_path_factory.mktemp("engine_launch")
        return run_distributed(engine_checks, 2, str(tmp), timeout=900)

    return once_per_session(request, tmp_path_factory, "engine_launch", launch)
