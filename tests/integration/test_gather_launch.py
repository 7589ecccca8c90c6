"""Monitoring figures gathered only at gather steps, in a real 2-rank launch (issue 15 item 2).

2 clients x 1 rank (gloo, CPU), method=deca with gossip, the launcher's :class:`deca_ds.trainer.LauncherDriver`
under :func:`deca_ds.loop.run_loop` (only the batches are ``tiny_llama`` token batches instead of a dataset). The same
8 steps run twice from the same weights: ``log_every=4`` must all-gather exactly twice (after steps 3 and 7) and
nothing else of the all-gather family, ``log_every=1`` every step as before; the metrics records at steps 3 and 7
must be equal between the two (every logged figure but the wall time).

The launch is shared with the other engine checks (tests/engine_launch.py, fixture ``engine_launch``): its two
processes run each file's ``_body`` in turn; the assertions stay here.
"""

import pytest

from dist import tiny_llama, token_batch

pytestmark = pytest.mark.integration

STEPS = 8
FIELDS = ("step", "client", "loss", "block", "lr", "bytes_sent", "consensus_distance", "nonfinite")


def _body(rank, world, tmp):
    from pathlib import Path

    import torch.distributed as dist

    import deca_ds.engine as E
    from deca_ds.config import load_config
    from deca_ds.gossip import ClientGroups, ClientLayout, Mixer
    from deca_ds.loop import run_loop
    from deca_ds.metrics import JsonlWriter, read_jsonl
    from deca_ds.topology import make_topology
    from deca_ds.trainer import LauncherDriver

    E.setup_distributed(120)
    layout = ClientLayout(world, rank, 1)
    topo = make_topology("ring", layout.num_clients)
    groups = ClientGroups.create(layout)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9}

    class Driver(LauncherDriver):
        def _micro_batches(self, step):
            return token_batch(layout.client_id, step)

    names = ("all_gather", "all_gather_object", "all_gather_into_tensor", "_all_gather_base")
    real = {n: getattr(dist, n) for n in names if hasattr(dist, n)}
    report = {}
    for log_every in (4, 1):
        out = Path(tmp) / f"log{log_every}"
        cfg = load_config(None, ["method=deca", "blocks.switch_every=2", "optim.lr=1e-2", f"max_steps={STEPS}",
                                 f"log_every={log_every}", f"output_dir={out}"])
        eng = E.build_engine(cfg, tiny_llama(), ds, groups, mixer=Mixer(layout, topo))
        calls = []

        def wrap(name):
            def f(*a, **k):
                calls.append(name)
                return real[name](*a, **k)
            return f

        writer = JsonlWriter(out / "metrics.jsonl") if rank == 0 else None
        for n in real:
            setattr(dist, n, wrap(n))
        try:
            outcome = run_loop(Driver(cfg, eng, None, None, layout, out), cfg, 0, writer)
        finally:
            for n, f in real.items():
                setattr(dist, n, f)
            if writer is not None:
                writer.close()
        recs = [{k: r[k] for k in FIELDS} for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] \
            if rank == 0 else None
        report[log_every] = {"calls": calls, "records": recs, "last_loss": outcome.last_loss, "step": outcome.step}
        eng.close()
    return report


def test_log_every_4_gathers_twice_in_8_steps_and_logs_what_log_every_1_logs(engine_launch):
    results = [r["gather"] for r in engine_launch]  # _body in the shared launch (tests/engine_launch.py)
    for report in results:
        assert report[4]["calls"] == ["all_gather"] * 2
        assert report[1]["calls"] == ["all_gather"] * STEPS
        assert report[4]["step"] == report[1]["step"] == STEPS
        assert report[4]["last_loss"] == report[1]["last_loss"]
    lean, every = results[0][4]["records"], results[0][1]["records"]
    assert [(r["step"], r["client"]) for r in lean] == [(s, c) for s in (3, 7) for c in (0, 1)]
    assert lean == [r for r in every if r["step"] in (3, 7)]  # floats: bit-equal
    assert all(r["bytes_sent"] > 0 and r["consensus_distance"] > 0 for r in lean)  # gossip and distance measured
    assert lean[0]["loss"] != lean[1]["loss"]  # the clients saw different data
