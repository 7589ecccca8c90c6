"""ZeRO stages 1-3 (:mod:`deca_ds.engine.zero`) against the stage-0 path, on 2 clients x 2 ranks (4 gloo processes).

One launch (the three stages in turn, stage 3 last; fixture ``zero_launch``) runs, for each stage, the stage-0
reference (:class:`deca_ds.engine.DecaEngine`, BlockAdam) and the ZeRO engine
on the same tiny Llama and the same per-client data, recording every weight after every step, and checks:
- only the scheduled block moves at every step, switching steps included (BAdam's ZeRO-3 path loses those);
- the ZeRO weights equal the stage-0 weights BIT FOR BIT (``torch.equal``), at every step at stages 1 and 2 and at
  stage 3 while the top block trains (below); no tolerance;
- gossip parity: with two clients the Metropolis weights are 1/2, so after every step both clients hold the same
  active block up to the two lerps' rounding (a bound from the float format and the largest mixed value, derived in
  ``_check``), and the two ranks of a client hold identical weights;
- resume: state_dict -> fresh engine -> load_state_dict continues bit-identically;
- memory held by DeepSpeed does not grow across switches (live tensor bytes).
Also a unit check of ``Mixer.mix_(presharded=True)`` against the closed form.

Why the comparison with stage 0 is exact (``gradient_clipping: 0``, set here for both runs):
- stages 1 and 2: every operation is the stage-0 one on the same values. The forward and backward are autograd's
  own (ZeRO-1/2 install no module hooks); a client's gradient is reduced over its 2 ranks as a sum of two values
  (commutative) halved (exact); the update is torch's AdamW (``foreach=False``, the optimizer
  ``ZeroBlockEngine._build`` gives DeepSpeed) on a flat fp32 copy of the same values, which BlockAdam's ``_adam_step``
  reproduces operation for operation (``deca_ds/optim/block_adam.py``); DECA's readings of v and the gossip are the
  same element-wise code. With clipping on, ZeRO-1/2/3 compute the global gradient norm over flat partitions in
  another order than stage 0's per-tensor norms, and when clipping acts the clip coefficient can differ in its last
  bit (docs/reference.md); hence clipping is off here, and clipping under ZeRO is not compared with stage 0 by
  this test (test_recipe's ZeRO-2 bf16 launch runs with clipping 1.0 and is checked to train, not compared).
- stage 3: DeepSpeed's reduction is exact as well (stage3.py ``__avg_scatter_grads``: each rank's fp32 gradient
  divided by the client's 2 ranks, then a reduce-scatter, a sum of two terms), and ``memory_efficient_linear``
  (default true: F.linear replaced by ``LinearFunctionForZeroStage3``) changed no bit in this model (measured with
  it off: the same differences). What differs is autograd's order: ZeRO-3's module hooks pass every module's inputs
  and outputs through autograd functions, so the gradient contributions to a tensor with three or more readers (the
  residual stream, read twice inside an RMSNorm and once by the residual add) are grouped by module and summed in
  another association. Every decoder layer's gradient passes through such a sum, so a decoder-layer block's update
  differs from stage 0's in its last bits (measured: 1.96e-8 on layer 0's v_proj after one step, 1.2e-7 on a
  post-attention norm after 4 steps), and no tolerance for those steps can be derived from the float format: a bound
  on the backward's rounding needs each operation's condition, and from the next step on a weight difference moves
  the next gradient through the loss's Hessian, which nothing in the run bounds (the same finding as
  tests/integration/test_dec_lora_zero.py). The top block (final norm and lm_head) has no gradient-carrying tensor
  with more than one reader outside one module, so its steps are bit-identical. Stage 3 therefore visits the blocks
  in ``descending`` order and is compared bit for bit on its first ``SWITCH_EVERY`` steps (the top block, with
  gossip and the signal reading from this rank's shard of exp_avg_sq) and on the weights it holds when it first
  switches away; from the first decoder-layer step on, its weights are not compared with stage 0 (what is no longer
  covered: stage 3's decoder-layer updates and the offload policy's restore at the return to a block, against stage
  0; the block moves, the ranks' equality, the gossip parity, resume and memory are still checked at every step).
"""

import gc
import warnings

import pytest
import torch

from dist import run_distributed

pytestmark = pytest.mark.integration

STEPS = 7          # 3 blocks x switch_every 2: switches after steps 1, 3, 5
SWITCH_EVERY = 2


def _tiny_model(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = LlamaForCausalLM(cfg)
    return m.to(dtype)


def _batch(client, local_rank, step):
    g = torch.Generator().manual_seed(1000 * client + 10 * step + local_rank)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    return [{"input_ids": ids, "labels": ids}]


def _weights(engine):
    if hasattr(engine, "full_state_dict"):
        sd = engine.full_state_dict()
    else:
        sd = {k: v.detach().cpu().clone() for k, v in engine.model.state_dict().items()}
    return {k: v.float() for k, v in sd.items() if "rotary" not in k}


def _live_tensor_bytes():
    """Bytes of every tensor the Python heap still references (distinct storages)."""
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in gc.get_objects():
            if isinstance(t, torch.Tensor) and not t.is_meta:
                key = t.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
    return total


def _run(engine, layout, steps, start=0):
    out = []
    for s in range(start, steps):
        res = engine.train_step(_batch(layout.client_id, layout.local_rank, s))
        out.append((res.block, res.switched, _weights(engine)))
    return out


def _spy_premix(engine, seen):
    """Record in ``seen[step]`` the largest |value| this rank hands to the gossip mix at each step (the mixer's
    input: the active block's fp32 masters, or this rank's shard of them), for the clients-agree bound in
    :func:`_check`."""
    mix = engine.hook.mix

    def spy(masters, step, block_idx):
        seen[step] = max((float(m.detach().abs().max()) for m in masters if m.numel()), default=0.0)
        return mix(masters, step, block_idx)

    engine.hook.mix = spy


def _body(rank, world, stage, dtype_name, policy, zero_extra, signal, order):
    import deca_ds.engine as E
    from deca_ds.config import load_config
    from deca_ds.gossip import ClientGroups, ClientLayout, Mixer
    from deca_ds.topology import make_topology

    E.setup_distributed(120)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    layout = ClientLayout(world, rank, 2)
    topo = make_topology("ring", layout.num_clients)
    groups = ClientGroups.create(layout)
    # eps=1e-3 and betas (0.99, 0.999) predate the exact comparison (module docstring), which does not depend on them.
    cfg = load_config(None, ["method=deca", "clients.ranks_per_client=2", f"blocks.switch_every={SWITCH_EVERY}",
                             "blocks.include_embeddings=false",
                             f"optim.state_policy={policy}", "optim.lr=1e-2", "optim.eps=1e-3",
                             f"model.dtype={dtype_name}", f"blocks.order={order}", f"deca.signal={signal}",
                             "deca.betas=[0.99,0.999]"])
    report = {}

    # presharded gossip: each rank's own tensor, averaged with the same local rank of the other client, no gather.
    mixer = Mixer(layout, topo, dp_group=groups.client_group)
    mine = torch.arange(5, dtype=torch.float32) + 100 * rank
    mixer.mix_([mine], 0, 0, presharded=True)
    peer = layout.peer_rank(1 - layout.client_id, layout.local_rank)
    report["presharded"] = (mine.tolist(), (torch.arange(5.0) + 50 * (rank + peer)).tolist())

    # Count DeepSpeed's whole-model broadcasts: a ZeRO engine broadcasts at its first build only, not at switches.
    from deepspeed.runtime.engine import DeepSpeedEngine

    broadcasts = [0]
    real_broadcast = DeepSpeedEngine._broadcast_model

    def counting_broadcast(engine):
        broadcasts[0] += 1
        return real_broadcast(engine)

    DeepSpeedEngine._broadcast_model = counting_broadcast
    try:
        return _compare(report, cfg, layout, topo, groups, stage, dtype, dtype_name, zero_extra, broadcasts)
    finally:  # the next stage runs in the same processes (_stages)
        DeepSpeedEngine._broadcast_model = real_broadcast


def _compare(report, cfg, layout, topo, groups, stage, dtype, dtype_name, zero_extra, broadcasts):
    """The stage-0 and the ZeRO runs of :func:`_body` (after its presharded check), into ``report``."""
    import deca_ds.engine as E
    from deca_ds.ds_config import check_ds_config
    from deca_ds.gossip import Mixer

    base = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            # no clipping: with it the clip coefficient may differ in its last bit (module docstring)
            "gradient_clipping": 0.0,
            "steps_per_print": 10**9}
    runs = {}
    for st in (0, stage):
        ds = dict(base, zero_optimization={"stage": st, **(zero_extra if st else {})})
        if st and dtype_name == "bf16":
            ds["bf16"] = {"enabled": True}
        check_ds_config(ds, cfg)
        mixer = Mixer(layout, topo, dp_group=groups.client_group)
        eng = E.build_engine(cfg, _tiny_model(dtype), ds, groups, mixer=mixer)
        assert type(eng).__name__ == ("DecaEngine" if st == 0 else "ZeroBlockEngine")
        report.setdefault("premix", {})[st] = {}
        _spy_premix(eng, report["premix"][st])
        w0 = _weights(eng)
        if st == 0:
            runs[st] = [(None, None, w0)] + _run(eng, layout, STEPS)
            eng.close()
            continue
        # resume: run 3 steps, checkpoint, run the rest; then a fresh engine loads the checkpoint and runs the rest.
        before = broadcasts[0]
        first = _run(eng, layout, 3)
        state = eng.state_dict()
        rest = _run(eng, layout, STEPS, start=3)
        runs[st] = [(None, None, w0)] + first + rest
        live = _live_tensor_bytes()
        report["switch_seconds"] = list(eng.switch_seconds)
        report["broadcasts_at_switches"] = broadcasts[0] - before
        eng.close()
        eng2 = E.build_engine(cfg, _tiny_model(dtype), ds, groups, mixer=Mixer(layout, topo,
                                                                             dp_group=groups.client_group))
        eng2.load_state_dict(state)
        resumed = _run(eng2, layout, STEPS, start=3)
        report["resume_equal"] = all(torch.equal(a[2][k], b[2][k]) for a, b in zip(rest, resumed) for k in a[2])
        # more switches: live tensor bytes stay flat (compare two points 6 switches apart)
        _run(eng2, layout, STEPS + 2 * SWITCH_EVERY, start=STEPS)
        live_a = _live_tensor_bytes()
        _run(eng2, layout, STEPS + 8 * SWITCH_EVERY, start=STEPS + 2 * SWITCH_EVERY)
        live_b = _live_tensor_bytes()
        report["live_bytes"] = (live, live_a, live_b)
        report["blocks"] = [list(b.param_names) for b in eng2.block_optimizer.blocks]
        eng2.close()
    # numpy, not tensors: tensors would travel through shared-memory file descriptors
    report["runs"] = {st: [(b, sw, {k: v.numpy() for k, v in w.items()}) for b, sw, w in run]
                      for st, run in runs.items()}
    return report


def _stages(rank, world, cases):
    """Inside one launch: :func:`_body` for each ``(stage, dtype, policy, extra, signal)`` of ``cases`` in turn.

    Each report also holds ``live_left``: the live tensor bytes an earlier stage left in the process (0 for the
    first), which the memory check takes out of its 1% slack so that it is as tight as in a launch of its own."""
    reports, first = [], _live_tensor_bytes()
    for case in cases:
        left = _live_tensor_bytes() - first
        reports.append(dict(_body(rank, world, *case), live_left=left))
    return reports


def _check(results, stage, order, exact_steps):
    """The checks of the module docstring; the ZeRO weights equal stage 0's bit for bit after each of the first
    ``exact_steps`` steps (all when None)."""
    for rep in results:
        rep["runs"] = {st: [(b, sw, {k: torch.from_numpy(v) for k, v in w.items()}) for b, sw, w in run]
                       for st, run in rep["runs"].items()}
    blocks = results[0]["blocks"]
    owner = {n: i for i, names in enumerate(blocks) for n in names}
    for rank, rep in enumerate(results):
        got, want = rep["presharded"]
        # exact: integers below 2**24, their differences and halves (lerp at 1/2) are all float32 numbers
        assert got == want, f"rank {rank} presharded mix {got} != {want}"
        assert rep["resume_equal"], f"rank {rank}: resumed run differs from the uninterrupted one"
        # Switches re-initialize DeepSpeed without re-broadcasting the whole model (issue 15 item 5); the weights
        # checks below show the ranks of a client stay identical without it.
        assert len(rep["switch_seconds"]) >= 3 and rep["broadcasts_at_switches"] == 0, rep["broadcasts_at_switches"]
        live, live_a, live_b = rep["live_bytes"]
        left = max(rep.get("live_left", 0), 0)  # bytes an earlier stage of the shared launch left (see _stages)
        assert live_b <= (live_a - left) * 1.01 + left + 4096, \
            f"rank {rank}: tensor bytes grew over 12 switches {rep['live_bytes']} (earlier stages left {left})"
        for st in (0, stage):
            run = rep["runs"][st]
            for s in range(1, len(run)):
                block, _, w = run[s]
                prev = run[s - 1][2]
                visit = (s - 1) // SWITCH_EVERY % len(blocks)
                assert block == (visit if order == "ascending" else len(blocks) - 1 - visit)
                moved = {owner.get(k, -1) for k in w if not torch.equal(w[k], prev[k])}
                assert moved == {block}, f"stage {st} rank {rank} step {s - 1}: blocks {moved} moved, not {block}"
        zero, ref = rep["runs"][stage], rep["runs"][0]
        assert len(zero) == len(ref) == STEPS + 1
        for s in range(len(ref) if exact_steps is None else exact_steps + 1):
            for k in ref[s][2]:
                z, r = zero[s][2][k], ref[s][2][k]
                # exact (module docstring): any difference, a last bit included, is a defect (the message's max
                # difference is computed only on failure)
                assert torch.equal(z, r), (f"stage {stage} rank {rank} step {s - 1} {k}: "
                                           f"|zero - stage0| = {(z - r).abs().max().item():.3g}, not 0")
    # Ranks of a client identical; two clients hold the same active block after gossip (weights 1/2 each), up to
    # the rounding of the two lerps. Client 0 (a, neighbour's b) computes x1 = fl(b - h), client 1 x2 = fl(a + h),
    # with h = fl(b - a)/2 (torch.lerp at weight 1/2; halving is exact, fl(a - b) = -fl(b - a)). With
    # fl(b - a) = (b - a)(1 + e0) and x1 = (b - h)(1 + e1), x2 = (a + h)(1 + e2), |e| <= u = 2^-24 (fp32: every case
    # here), x1 - x2 = -e0 (b - a) + e1 (b - h) - e2 (a + h), so
    #     |x1 - x2| <= u (|b - a| + (|x1| + |x2|) / (1 - u)) <= u (2 M + (|x1| + |x2|) / (1 - u)),
    # M the largest |value| mixed at that step on any rank (recorded by _spy_premix), plus 2^-149 for a halving that
    # lands among the subnormals. Differences and bound in float64, where the fp32 difference is exact.
    u = 2.0 ** -24
    for st in (0, stage):
        for s in range(1, STEPS + 1):
            block, _, w = results[0]["runs"][st][s]
            big = max(rep["premix"][st][s - 1] for rep in results)
            for r in (1, 2, 3):
                wr = results[r]["runs"][st][s][2]
                for k in blocks[block]:
                    if r == 1:
                        assert torch.equal(w[k], wr[k]), f"stage {st}: ranks 0 and 1 differ at {k}"
                    else:
                        a, b = w[k].double(), wr[k].double()
                        bound = u * (2 * big + (a.abs() + b.abs()) / (1 - u)) + 2.0 ** -149
                        diff = (a - b).abs()
                        assert bool((diff <= bound).all()), \
                            (f"stage {st} step {s - 1}: clients differ at {k} by {diff.max().item():.3g}, over the "
                             f"two lerps' rounding bound (largest mixed value {big:.3g})")


CASES = [  # (stage, dtype, policy, extra, signal, order, exact_steps), run in this order in one launch
    # The gradient-unit readings read the Adam denominators: at stage 1 as full tensors (a collective inside the
    # client), at stage 3 from this rank's shard of exp_avg_sq; normalised-step units (qgm) at stage 2. raw differs
    # from qgm only in consensus_signal, which no backend touches.
    (1, "fp32", "offload", {}, "qgm_grad", "ascending", None),
    (2, "fp32", "reset", {"offload_optimizer": {"device": "cpu"}}, "qgm", "ascending", None),
    # stage 3: exact while the top block trains, visited first (module docstring)
    (3, "fp32", "offload", {}, "discrepancy_grad", "descending", SWITCH_EVERY),
]


@pytest.fixture(scope="module")
def zero_launch(request, tmp_path_factory):
    """One 4-process launch running every case of ``CASES`` (:func:`_stages`): ``{stage: [report of each rank]}``,
    once per session also under xdist (:func:`dist.once_per_session`)."""
    from dist import once_per_session

    def launch():
        # The timeout only catches a hang: under a parallel test run on 2 shared cores one stage has taken 240 s.
        per_rank = run_distributed(_stages, 4, [c[:6] for c in CASES], init=False, timeout=1800)
        return {case[0]: [reports[i] for reports in per_rank] for i, case in enumerate(CASES)}

    return once_per_session(request, tmp_path_factory, "zero_launch", launch)


@pytest.mark.parametrize("stage,dtype,policy,extra,signal,order,exact_steps", CASES)
def test_zero_matches_stage0_moves_only_the_active_block_and_resumes(stage, dtype, policy, extra, signal, order,
                                                                     exact_steps, zero_launch):
    _check(zero_launch[stage], stage, order, exact_steps)
