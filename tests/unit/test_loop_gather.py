"""Monitoring figures gathered only at gather steps (issue 15 item 2): the decision, and the loop over the launcher's
driver with a fake engine and a fake all-gather (no process group).

The launcher's :class:`deca_ds.trainer.LauncherDriver` runs here for real apart from its engine and its one
collective, ``_gather_rows``, which is replaced by a function that stacks this rank's row with a peer rank's row
(client 1, a deterministic table). Every figure the loop sees is therefore computable by hand from the two tables.
"""

import os
import signal

import pytest
import torch

from deca_ds.config import load_config
from deca_ds.gossip import ClientLayout
from deca_ds.loop import NonFiniteError, StepRecord, gather_step, run_loop
from deca_ds.metrics import JsonlWriter, read_jsonl
from deca_ds.step import StepResult
from deca_ds.supervise import LauncherWatch


def _cfg(**kw):
    return load_config(None, [f"{k}={v}" for k, v in kw.items()])


# -- the decision ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("log_every,eval_every,checkpoint_every,max_steps,expected", [
    (1, 0, 0, 5, [0, 1, 2, 3, 4]),
    (4, 0, 0, 8, [3, 7]),
    (4, 0, 0, 10, [3, 7, 9]),  # the last step always
    (4, 3, 5, 10, [2, 3, 4, 5, 7, 8, 9]),  # before evaluations after 3, 6, 9 steps and checkpoints after 5, 10
    (100, 0, 0, 3, [2]),
])
def test_gather_steps_by_hand(log_every, eval_every, checkpoint_every, max_steps, expected):
    cfg = _cfg(log_every=log_every, eval_every=eval_every, checkpoint_every=checkpoint_every, max_steps=max_steps)
    assert [s for s in range(max_steps) if gather_step(cfg, s)] == expected


@pytest.mark.parametrize("log_every", [1, 2, 3, 7])
@pytest.mark.parametrize("eval_every", [0, 2, 5])
@pytest.mark.parametrize("checkpoint_every", [0, 3, 4])
def test_gather_steps_are_where_the_loop_logs_evaluates_or_checkpoints(log_every, eval_every, checkpoint_every):
    """Reference: the steps after which run_loop logs, evaluates or checkpoints, as arithmetic progressions."""
    m = 23
    cfg = _cfg(log_every=log_every, eval_every=eval_every, checkpoint_every=checkpoint_every, max_steps=m)
    want = set(range(log_every - 1, m, log_every)) | {m - 1}
    for every in (eval_every, checkpoint_every):
        if every:
            want |= set(range(every - 1, m, every))
    assert {s for s in range(m) if gather_step(cfg, s)} == want


# -- the launcher's driver, with a fake engine and all-gather ----------------------------------------------------


class _Engine:
    """Client 0's engine: step s makes loss 1 + s/100, tokens 10 + s, bytes 1000 + s; non-finite at ``bad``."""

    schedule = None

    def __init__(self, bad=(), signal_at=None):
        self.bad, self.signal_at, self.global_step, self.events = set(bad), signal_at, 0, []

    def train_step(self, micro_batches):
        s = self.global_step
        self.global_step += 1
        if s == self.signal_at:  # as a SIGTERM arriving during this step
            os.kill(os.getpid(), signal.SIGTERM)
        return StepResult(loss=1 + s / 100, nonfinite=s in self.bad, block=s // 2, tokens=10 + s, bytes_sent=1000 + s)

    def lr(self):
        return 0.5

    def block_tensors(self, block):
        return []

    def write_monitor_events(self, events):
        self.events += events


def _peer_row(step, peer_stop_at=None):
    """Client 1's monitoring row at a gather step: loss 2 + s/100, no non-finite step, tokens 7 per step (pending
    since its last gather: the caller's ``pending`` steps), bytes 2000 + s, distance 0.25."""
    return [2 + step / 100, 0.0, float(peer_stop_at is not None and step >= peer_stop_at), 2000.0 + step, 0.0, 0.25]


def _driver(cfg, engine, gathers, peer_stop_at=None, checkpoints=None, watch=None):
    from deca_ds.trainer import LauncherDriver

    class Driver(LauncherDriver):
        def _micro_batches(self, step):
            return []

        def _gather_rows(self, row):
            step = self.engine.global_step - 1
            pending = step - (gathers[-1] if gathers else -1)  # client 1's steps since its last gather
            gathers.append(step)
            peer = _peer_row(step, peer_stop_at)
            peer[4] = 7.0 * pending
            return torch.tensor([row, peer], dtype=torch.float64)

        def save_checkpoint(self, step):
            checkpoints.append(step)

        def evaluate(self, step):
            return None

    d = Driver(cfg, engine, None, None, ClientLayout(2, 0, 1), out=None)
    d.watch = watch or LauncherWatch([])
    return d


@pytest.fixture
def no_distance(monkeypatch):
    import deca_ds.trainer as trainer

    monkeypatch.setattr(trainer, "client_distance", lambda tensors: 0.125)


def _records(path):
    return [r for r in read_jsonl(path) if "loss" in r]


def test_records_are_gathered_at_log_steps_only_with_tokens_summed(tmp_path, no_distance):
    cfg = _cfg(log_every=4, max_steps=8, nan_policy="skip")
    gathers, ckpts, recs = [], [], []
    engine = _Engine(bad=[4, 5])
    d = _driver(cfg, engine, gathers, checkpoints=ckpts)
    real_step = d.step
    d.step = lambda *a, **k: recs.append(real_step(*a, **k)) or recs[-1]
    writer = JsonlWriter(tmp_path / "metrics.jsonl")
    out = run_loop(d, cfg, 0, writer)
    writer.close()
    assert gathers == [3, 7]
    assert [r.gathered for r in recs] == [False, False, False, True] * 2
    assert all(r.losses is None for r in recs if not r.gathered)
    # tokens: client 0's steps 0-3 (10..13) and 4-7 (14..17) plus client 1's 7 per step
    assert [r.tokens for r in recs if r.gathered] == [46 + 28, 62 + 28]
    assert [r.nonfinite_steps for r in recs if r.gathered] == [[0, 0], [2, 0]]
    got = [{k: r[k] for k in ("step", "client", "loss", "block", "lr", "bytes_sent", "consensus_distance",
                              "nonfinite")} for r in _records(tmp_path / "metrics.jsonl")]
    want = []
    for s in (3, 7):
        want += [{"step": s, "client": 0, "loss": 1 + s / 100, "block": s // 2, "lr": 0.5, "bytes_sent": 1000 + s,
                  "consensus_distance": 0.125, "nonfinite": s == 7},
                 {"step": s, "client": 1, "loss": 2 + s / 100, "block": s // 2, "lr": 0.5, "bytes_sent": 2000 + s,
                  "consensus_distance": 0.25, "nonfinite": False}]
    assert got == want
    assert sorted({e[2] for e in engine.events}) == [4, 8]  # monitors: the log steps' events only (1-based)
    assert out.step == 8 and not out.stopped_early
    assert out.last_loss == {0: 1.07, 1: 2.07}
    assert ckpts == [8]


def test_log_every_1_gathers_every_step_as_before(tmp_path, no_distance):
    cfg = _cfg(log_every=1, max_steps=3)
    gathers, ckpts = [], []
    writer = JsonlWriter(tmp_path / "metrics.jsonl")
    run_loop(_driver(cfg, _Engine(), gathers, checkpoints=ckpts), cfg, 0, writer)
    writer.close()
    assert gathers == [0, 1, 2]
    assert [(r["step"], r["client"], r["loss"], r["bytes_sent"]) for r in _records(tmp_path / "metrics.jsonl")] \
        == [(s, c, c + 1 + s / 100, 1000 * (c + 1) + s) for s in range(3) for c in range(2)]


def test_nonfinite_between_gathers_stops_in_the_driver_naming_client_and_step(no_distance):
    cfg = _cfg(log_every=4, max_steps=8, nan_policy="stop")
    gathers, ckpts = [], []
    with pytest.raises(NonFiniteError) as e:
        run_loop(_driver(cfg, _Engine(bad=[5]), gathers, checkpoints=ckpts), cfg)
    assert str(e.value) == ("client 0 produced a non-finite loss or gradient at step 5 (nan_policy=stop); the last "
                            "complete checkpoint is kept")
    assert gathers == [3] and ckpts == []


def test_nonfinite_at_a_gather_step_stops_every_rank_through_the_loop(no_distance):
    cfg = _cfg(log_every=4, max_steps=8, nan_policy="stop")
    gathers, ckpts = [], []
    with pytest.raises(NonFiniteError, match=r"^client 0 .* at step 3 \(nan_policy=stop\)"):
        run_loop(_driver(cfg, _Engine(bad=[3]), gathers, checkpoints=ckpts), cfg)
    assert gathers == [3] and ckpts == []  # gathered first, so the other ranks raise the same line


@pytest.mark.parametrize("how", ["signal", "peer", "launcher_gone"])
@pytest.mark.parametrize("checkpoint_every,stop_after", [(0, 7), (6, 5)])
def test_a_stop_request_is_agreed_at_the_next_gather_step(how, checkpoint_every, stop_after, no_distance):
    """Requested at step 4 (this rank's signal, a peer's request, or this rank's launcher gone): every rank goes on
    to the next gather step (7: a log step; 5: the step before a checkpoint) and stops there, checkpointing."""
    cfg = _cfg(log_every=4, max_steps=12, checkpoint_every=checkpoint_every)
    gathers, ckpts = [], []

    class Gone:
        calls = 0

        def gone(self):
            Gone.calls += 1
            return 4242 if Gone.calls >= 5 else None  # from step 4 on

    engine = _Engine(signal_at=3 if how == "signal" else None)  # arrives during step 3, seen by the loop at step 4
    d = _driver(cfg, engine, gathers, peer_stop_at=4 if how == "peer" else None, checkpoints=ckpts,
                watch=Gone() if how == "launcher_gone" else None)
    out = run_loop(d, cfg)
    assert out.stopped_early and out.step == stop_after + 1 and engine.global_step == stop_after + 1
    assert gathers == [3, stop_after] and ckpts == [stop_after + 1]
    if how == "launcher_gone":
        assert d.launcher_gone == 4242


def test_the_loop_refuses_an_ungathered_record_at_a_gather_step():
    cfg = _cfg(log_every=2, max_steps=4)

    class Bad:
        num_clients, checkpoints = 1, False

        def step(self, step, measure_distance, stop_requested):
            return StepRecord(block=0, round=0, lr=0.1, losses=None, nonfinite=None, bytes_sent=None,
                              consensus_distance=None, gathered=False)

        def set_lr(self, lr):
            pass

    with pytest.raises(RuntimeError, match="did not gather step 1"):
        run_loop(Bad(), cfg)
