"""Fixtures shared by the integration tests: launches whose results several tests assert on, run once per session."""

import pickle

import pytest


def once_per_session(request, tmp_path_factory, name: str, fn):
    """``fn()``'s result, computed once for the whole test session, also under pytest-xdist.

    Without xdist a session fixture already runs once. Under xdist each worker has its own session, and the tests that
    share a launch may be drawn by different workers: the first worker to get here runs ``fn`` under a file lock in
    the directory every worker's temporary directory lives in, and stores the result; the others wait for the lock
    and read it (pytest-xdist's documented recipe). A failed ``fn`` stores nothing: the next worker runs it again and
    fails on its own.

    Args:
        request: the requesting fixture's ``request`` (its config tells whether this is an xdist worker).
        tmp_path_factory: pytest's session ``tmp_path_factory``.
        name: the file name the result is kept under (one per launch).
        fn: what to run; its result must pickle.
    """
    if getattr(request.config, "workerinput", None) is None:  # not an xdist worker
        return fn()
    from filelock import FileLock  # a dependency of transformers and huggingface_hub

    root = tmp_path_factory.getbasetemp().parent
    path = root / f"{name}.pickle"
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            return pickle.loads(path.read_bytes())
        result = fn()
        path.write_bytes(pickle.dumps(result))
        return result


@pytest.fixture(scope="session")
def engine_launch(request, tmp_path_factory):
    """The reports of one 2-process launch running the engine checks of several test files in sequence
    (:func:`engine_launch.engine_checks`): ``[rank_0_report, rank_1_report]``, each ``{body: that body's report}``.

    Run once per session (:func:`once_per_session`), whichever of those tests comes first.
    """
    from dist import run_distributed
    from engine_launch import engine_checks

    def launch():
        tmp = tmp_path_factory.mktemp("engine_launch")
        return run_distributed(engine_checks, 2, str(tmp), timeout=900)

    return once_per_session(request, tmp_path_factory, "engine_launch", launch)
