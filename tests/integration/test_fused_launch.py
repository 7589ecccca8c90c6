"""``optim.fused_backward=true`` in a real launch equals the unfused step bit for bit (issue 15 item 4).

2 clients x 1 rank (gloo, CPU), method=deca with deca.signal=qgm (its pre-step snapshot must be taken before the
backward that now updates the weights), blocks switching every 2 steps, 3 steps (one switch). Each client runs the
stage-0 engine (DeepSpeed around BlockAdam, gossip through the Mixer) once unfused and once fused, on the same model
and batches; every step's loss and the final weights must be equal.

The launch is shared with the other engine checks (tests/engine_launch.py, fixture ``engine_launch``): its two
processes run each file's ``_body`` in turn; the assertions stay here.
"""

import pytest

from dist import ring_of_clients, tiny_llama, token_batch

pytestmark = pytest.mark.integration

STEPS = 3


def _body(rank, world):
    import deca_ds.engine as E
    from deca_ds.config import load_config
    from deca_ds.ds_config import check_ds_config
    from deca_ds.gossip import Mixer

    layout, topo, groups = ring_of_clients(world, rank)
    report = {}
    for fused in (False, True):
        cfg = load_config(None, ["method=deca", "deca.signal=qgm", "blocks.switch_every=2", "optim.lr=1e-2",
                                 "optim.weight_decay=0.01", f"optim.fused_backward={str(fused).lower()}"])
        ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "steps_per_print": 10**9}
        check_ds_config(ds, cfg, world_size=world)  # as preflight does
        eng = E.build_engine(cfg, tiny_llama(), ds, groups, mixer=Mixer(layout, topo))
        results = [eng.train_step(token_batch(layout.client_id, s)) for s in range(STEPS)]
        weights = {k: v.detach().numpy().copy() for k, v in eng.model.state_dict().items()}
        report[fused] = ([r.loss for r in results], [r.block for r in results], [r.nonfinite for r in results],
                         weights, eng.optimizer.fused_backward, eng.engine.enable_backward_allreduce)
        eng.close()
    return report


def test_fused_backward_launch_equals_unfused_bit_for_bit(engine_launch):
    results = [r["fused"] for r in engine_launch]  # _body in the shared launch (tests/engine_launch.py)
    for report in results:
        ref_losses, ref_blocks, ref_bad, ref_w, ref_fused, _ = report[False]
        losses, blocks, bad, w, fused, reduced = report[True]
        assert fused and not ref_fused and not reduced
        assert blocks == ref_blocks == [0, 0, 1]  # one block switch
        assert losses == ref_losses  # floats: bit-equal
        assert len(set(losses)) == len(losses)  # the steps really trained
        assert not any(bad) and not any(ref_bad)
        for k in ref_w:
            assert (w[k] == ref_w[k]).all(), k
    assert results[0][True][0] != results[1][True][0]  # the clients saw different data
