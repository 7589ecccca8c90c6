"""The stage-0 engine and the ZeRO engine run one and the same between-steps code (deca_ds.consensus).

One launch of 2 clients x 1 rank (gloo, CPU). For the stage-0 engine (BlockAdam) and the ZeRO-1 engine
(ZeroBlockView over DeepSpeed's partitions), with the same model, data and settings:
- the consensus signal and the moment fold are the module functions ``deca_ds.consensus.consensus_signal`` and
  ``deca_ds.consensus.fold_moments_``: wrapped with counters (a fold counts the tensors it folds: stage 0 folds a
  block in one foreach call, ZeRO tensor by tensor), both engines use them once per active parameter per
  step (a private copy of the maths anywhere would leave a count at 0);
- replacing ``fold_moments_`` by one that folds with deliberately different betas changes the weights of both
  engines, and by the same amount: after 3 steps each engine's weights move away from its own unpatched run, and the
  two patched runs stay equal to each other as the unpatched runs do (ZeRO-1 with one rank per client reduces
  gradients in the stage-0 order, so equality is exact).

The launch is shared with the other engine checks (tests/engine_launch.py, fixture ``engine_launch``): its two
processes run each file's ``_body`` in turn; the assertions stay here.
"""

import pytest
import torch

from dist import ring_of_clients, tiny_llama, token_batch

pytestmark = pytest.mark.integration

STEPS = 3


def _body(rank, world):
    import deca_ds.consensus as consensus
    import deca_ds.engine as E
    from deca_ds.config import load_config
    from deca_ds.gossip import Mixer

    layout, topo, groups = ring_of_clients(world, rank)
    cfg = load_config(None, ["method=deca", "deca.signal=qgm", "blocks.switch_every=2", "optim.lr=1e-2",
                             "blocks.include_embeddings=false", "blocks.include_lm_head=false"])
    real_signal, real_fold = consensus.consensus_signal, consensus.fold_moments_
    counts = {"signal": 0, "fold": 0}

    def counting_signal(*args, **kwargs):
        counts["signal"] += 1
        return real_signal(*args, **kwargs)

    def folded(m):  # tensors folded by one call: one, or a block's list (the foreach form)
        return 1 if isinstance(m, torch.Tensor) else len(m)

    def counting_fold(m, v, h, betas):
        counts["fold"] += folded(m)
        return real_fold(m, v, h, betas)

    def other_betas_fold(m, v, h, betas):
        counts["fold"] += folded(m)
        return real_fold(m, v, h, (0.5, 0.5))

    base = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "steps_per_print": 10**9}
    report = {}
    for stage in (0, 1):
        for variant, fold in (("counted", counting_fold), ("other_betas", other_betas_fold)):
            counts.update(signal=0, fold=0)
            consensus.consensus_signal, consensus.fold_moments_ = counting_signal, fold
            try:
                ds = dict(base, zero_optimization={"stage": stage})
                eng = E.build_engine(cfg, tiny_llama(), ds, groups, mixer=Mixer(layout, topo))
                active = []
                for s in range(STEPS):
                    active.append(len(eng.block_tensors(eng.train_step(token_batch(layout.client_id, s)).block)))
                # numpy: tensors returned through the result queue would need the child alive (shared memory)
                weights = {k: v.detach().float().numpy().copy() for k, v in eng.model.state_dict().items()}
                eng.close()
            finally:
                consensus.consensus_signal, consensus.fold_moments_ = real_signal, real_fold
            report[(stage, variant)] = (dict(counts), sum(active), weights)
    return report


def test_stage0_and_zero_run_the_same_consensus_code(engine_launch):
    results = [r["consensus"] for r in engine_launch]  # _body in the shared launch (tests/engine_launch.py)
    for report in results:
        for stage in (0, 1):
            counts, expected, _ = report[(stage, "counted")]
            assert counts == {"signal": expected, "fold": expected}, (stage, counts, expected)
        w = {key: {k: torch.from_numpy(v) for k, v in report[key][2].items()} for key in report}
        moved = {stage: max(float((w[(stage, "other_betas")][k] - w[(stage, "counted")][k]).abs().max())
                            for k in w[(stage, "counted")]) for stage in (0, 1)}
        assert moved[0] > 0 and moved[1] > 0, moved  # the patched fold reached both engines
        for variant in ("counted", "other_betas"):
            for k in w[(0, variant)]:
                assert torch.equal(w[(0, variant)][k], w[(1, variant)][k]), (variant, k)
