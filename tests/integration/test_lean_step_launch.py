"""The lean step (issue 15 item 2) equals the step it replaced, bit for bit, in a real launch.

2 clients x 1 rank (gloo, CPU), method=deca, gradient clipping on, blocks switching every 2 steps. Each client runs
the stage-0 engine twice on the same model and batches: as built now (one fused finite check, no DeepSpeed gradient
reduction for a one-rank client, foreach BlockAdam step and consensus fold), and as it was (the reference in
tests/lean_reference.py: per-tensor AdamW and fold, a host sync per tensor's finite check, DeepSpeed's flatten /
all-reduce / copy-back of every gradient). Every step's loss and the final weights must be equal.

The launch is shared with the other engine checks (tests/engine_launch.py, fixture ``engine_launch``): its two
processes run each file's ``_body`` in turn; the assertions stay here.
"""

import pytest

from dist import ring_of_clients, tiny_llama, token_batch

pytestmark = pytest.mark.integration

STEPS = 5


def _body(rank, world):
    import deca_ds.engine as E
    import deca_ds.engine.stage0 as stage0
    from deca_ds.config import load_config
    from deca_ds.gossip import Mixer
    from lean_reference import PerTensorBlockAdam, per_tensor_all_finite

    layout, topo, groups = ring_of_clients(world, rank)
    cfg = load_config(None, ["method=deca", "deca.signal=qgm", "blocks.switch_every=2", "optim.lr=1e-2",
                             "optim.weight_decay=0.01"])
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.5,
          "steps_per_print": 10**9}
    real_build, real_check = stage0.build_optimizer, stage0.all_finite

    def reference_build(cfg, model):
        opt = real_build(cfg, model)
        opt.__class__ = PerTensorBlockAdam  # same state and settings, the previous step and fold
        return opt

    report = {}
    for variant in ("lean", "previous"):
        if variant == "previous":
            stage0.build_optimizer, stage0.all_finite = reference_build, per_tensor_all_finite
        try:
            eng = E.build_engine(cfg, tiny_llama(), ds, groups, mixer=Mixer(layout, topo))
            reduced = eng.engine.enable_backward_allreduce
            if variant == "previous":
                eng.engine.enable_backward_allreduce = True  # DeepSpeed's reduction over the one-rank client
            losses = [eng.train_step(token_batch(layout.client_id, s)).loss for s in range(STEPS)]
            weights = {k: v.detach().numpy().copy() for k, v in eng.model.state_dict().items()}
            eng.close()
        finally:
            stage0.build_optimizer, stage0.all_finite = real_build, real_check
        report[variant] = (losses, weights, reduced)
    return report


def test_lean_step_equals_previous_step_bit_for_bit(engine_launch):
    results = [r["lean"] for r in engine_launch]  # _body in the shared launch (tests/engine_launch.py)
    for report in results:
        lean_losses, lean_w, lean_reduced = report["lean"]
        prev_losses, prev_w, _ = report["previous"]
        assert not lean_reduced  # the lean engine really skips DeepSpeed's reduction
        assert lean_losses == prev_losses  # floats: bit-equal
        assert len(set(lean_losses)) == len(lean_losses)  # the steps really trained
        for k in lean_w:
            assert (lean_w[k] == prev_w[k]).all(), k
    assert results[0]["lean"][0] != results[1]["lean"][0]  # the clients saw different data
