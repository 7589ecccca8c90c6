"""8-bit active-block moments (``optim.moment_dtype=int8``, issue 15 item 4) against independent references.

The reference for the format is bitsandbytes itself (``quantize_blockwise``/``dequantize_blockwise`` with its dynamic
maps, 256 values per block; m signed, ``sqrt(v)`` unsigned), for the arithmetic ``torch.optim.AdamW`` and
:func:`deca_ds.consensus.fold_moments_` on the dequantized tensors: the int8 step must be exactly
"dequantize -> AdamW -> quantize", bit for bit. The distance from fp32 moments is bounded by the code map's spacing.
"""

import copy

import pytest
import torch
from torch import nn

from deca_ds import consensus
from deca_ds.blocks import partition_blocks
from deca_ds.config import ConfigError, load_config
from deca_ds.optim import BlockAdam, memory_report, quantization_bound
from deca_ds.optim.block_adam import INT8_MOMENT_KEYS, moments_of
from tiny import batches, reload_through_checkpoint, tiny_llama

bnbf = pytest.importorskip("bitsandbytes.functional")

HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
BLOCK = 256  # values per quantization block (bitsandbytes blocksize)
SIGNED = bnbf.create_dynamic_map(signed=True)
UNSIGNED = bnbf.create_dynamic_map(signed=False)




def train(model, opt, data):
    for ids in data:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def ref_moments(st):
    """(m, v) from 8-bit state, decoded with bitsandbytes directly: m signed map, v = (unsigned-map value)**2."""
    m = bnbf.dequantize_blockwise(st["exp_avg_codes"], absmax=st["exp_avg_absmax"], code=SIGNED, blocksize=BLOCK)
    s = bnbf.dequantize_blockwise(st["exp_avg_sq_codes"], absmax=st["exp_avg_sq_absmax"], code=UNSIGNED,
                                  blocksize=BLOCK)
    return m.float(), s.float() * s.float()


def ref_codes(m, v):
    """bitsandbytes' encoding of (m, sqrt(v)): ``(codes_m, absmax_m, codes_s, absmax_s)``."""
    cm, qm = bnbf.quantize_blockwise(m.contiguous(), code=SIGNED, blocksize=BLOCK)
    cs, qs = bnbf.quantize_blockwise(v.sqrt().contiguous(), code=UNSIGNED, blocksize=BLOCK)
    return cm, qm.absmax, cs, qs.absmax


def assert_codes_equal(st, codes):
    for key, want in zip(INT8_MOMENT_KEYS, codes):
        assert torch.equal(st[key], want), key


def per_element(absmax, shape):
    """A block's absmax broadcast to each of its values."""
    n = torch.Size(shape).numel()
    return absmax.repeat_interleave(BLOCK)[:n].view(shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_step_is_dequantize_then_torch_adamw_then_quantize(dtype):
    model = tiny_llama(dtype)
    opt = BlockAdam(model, partition_blocks(model), moment_dtype="int8", switch_every=10, **HP)
    data = batches(3)
    train(model, opt, data[:2])  # known 8-bit state (two steps in) for the step under test
    params = opt.active_params()
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    assert set(before[params[0]]) >= set(INT8_MOMENT_KEYS) and "exp_avg" not in before[params[0]]
    x0 = {p: before[p].get("master", p.detach().float()).clone() for p in params}
    model(input_ids=data[2], labels=data[2]).loss.backward()
    grads = {p: p.grad.float().clone() for p in params}
    opt.step()
    for p in params:
        x = nn.Parameter(x0[p].clone())
        x.grad = grads[p]
        ref = torch.optim.AdamW([x], lr=HP["lr"], betas=HP["betas"], eps=HP["eps"], weight_decay=HP["weight_decay"],
                                foreach=False)
        m, v = ref_moments(before[p])
        ref.state[x] = {"step": before[p]["step"].clone(), "exp_avg": m, "exp_avg_sq": v}
        ref.step()
        st = opt.state[p]
        assert float(st["step"]) == 3
        assert_codes_equal(st, ref_codes(ref.state[x]["exp_avg"], ref.state[x]["exp_avg_sq"]))
        assert torch.equal(st.get("master", p.detach()), x.detach())
        assert torch.equal(p.detach(), x.detach().to(dtype))


def test_int8_moments_stay_within_the_quantization_bound_of_fp32_moments():
    """Same gradients into an fp32 and an int8 BlockAdam: the moments differ by at most what the format allows.

    Per block with absolute maximum ``a`` (the stored absmax), a value is stored as one of the two code-map entries
    around it, so one quantization moves m by at most ``gap_s * a_m`` and ``sqrt(v)`` by ``e = gap_u * a_s``, i.e. v
    by ``e (2 a_s + e)`` (``gap_*``: the largest spacing of the signed/unsigned map, ``quantization_bound()``). Old
    error decays with the moment's own beta, so after step t: ``E_t <= beta E_{t-1} + (new quantization error)``.
    fp32 rounding: the lerp/addcmul of both paths and the dequantizing product each round by at most 2**-24 of
    operands no larger than ``|m~| + |m| + |g| + a`` (resp. ``v~ + v + g**2 + a_s**2``): 8 * 2**-24 of that sum.
    """
    torch.manual_seed(0)
    fp32_model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 40))  # 3072, 48, 1920, 40 values: partial blocks
    int8_model = copy.deepcopy(fp32_model)
    names = [n for n, _ in fp32_model.named_parameters()]
    exact = BlockAdam(fp32_model, [names], switch_every=100, **HP)
    quant = BlockAdam(int8_model, [names], switch_every=100, moment_dtype="int8", **HP)
    gap_s, gap_u = quantization_bound()
    beta1, beta2 = HP["betas"]
    slack = 8 * 2.0**-24
    pairs = list(zip(fp32_model.parameters(), int8_model.parameters()))
    bound_m = {p: torch.zeros_like(p) for p, _ in pairs}
    bound_v = {p: torch.zeros_like(p) for p, _ in pairs}
    g = torch.Generator().manual_seed(3)
    worst = 0.0
    for _ in range(6):
        grads = {}
        for p, q in pairs:
            # gradients spanning four orders of magnitude inside every quantization block
            grads[p] = torch.randn(p.shape, generator=g) * 10 ** (4 * torch.rand(p.shape, generator=g) - 3)
            p.grad, q.grad = grads[p].clone(), grads[p].clone()
        prev = {p: (exact.state[p]["exp_avg"].clone(), exact.state[p]["exp_avg_sq"].clone(),
                    *[t.clone() for t in moments_of(quant.state[q])]) if p in exact.state else None for p, q in pairs}
        exact.step()
        quant.step()
        for p, q in pairs:
            st = quant.state[q]
            a_m, a_s = per_element(st["exp_avg_absmax"], p.shape), per_element(st["exp_avg_sq_absmax"], p.shape)
            m_f, v_f, m_q0, v_q0 = prev[p] if prev[p] else (torch.zeros_like(p),) * 4
            gr = grads[p]
            e = gap_u * a_s
            bound_m[p] = beta1 * bound_m[p] + gap_s * a_m + slack * (m_q0.abs() + m_f.abs() + gr.abs() + a_m)
            bound_v[p] = beta2 * bound_v[p] + e * (2 * a_s + e) + slack * (v_q0 + v_f + gr * gr + a_s * a_s)
            m_q, v_q = moments_of(st)
            err_m = (m_q - exact.state[p]["exp_avg"]).abs()
            err_v = (v_q - exact.state[p]["exp_avg_sq"]).abs()
            assert torch.all(err_m <= bound_m[p]) and torch.all(err_v <= bound_v[p])
            worst = max(worst, float((err_m / bound_m[p]).max()), float((err_v / bound_v[p]).max()))
    assert worst > 0  # the moments really were quantized


def test_int8_consensus_fold_is_fold_of_dequantized_moments_requantized():
    model = tiny_llama()
    opt = BlockAdam(model, partition_blocks(model), moment_dtype="int8", switch_every=10, auto_switch=False, **HP)
    train(model, opt, batches(2))
    params = opt.active_params()
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    g = torch.Generator().manual_seed(7)
    signals = [torch.randn(p.shape, generator=g) * 1e-2 for p in params]
    betas = (0.99, 0.9999)
    opt.apply_consensus_(signals, betas)
    for p, h in zip(params, signals):
        m, v = ref_moments(before[p])
        consensus.fold_moments_(m, v, h, betas)
        assert_codes_equal(opt.state[p], ref_codes(m, v))
    # betas (1, 1) leave the moments unchanged: not even re-rounded
    after = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    opt.apply_consensus_(signals, (1.0, 1.0))
    for p in params:
        assert_codes_equal(opt.state[p], [after[p][k] for k in INT8_MOMENT_KEYS])


@pytest.mark.parametrize("moment_dtype", ["fp32", "int8"])
def test_adam_denominators_are_sqrt_v_hat_plus_eps_of_the_held_moments(moment_dtype):
    model = tiny_llama()
    opt = BlockAdam(model, partition_blocks(model), moment_dtype=moment_dtype, switch_every=10, **HP)
    train(model, opt, batches(2))
    beta2, eps = HP["betas"][1], HP["eps"]
    dens = consensus.adam_denominators(opt)  # calls BlockAdam.adam_denominators
    for p, d in zip(opt.active_params(), dens):
        st = opt.state[p]
        v = st["exp_avg_sq"] if moment_dtype == "fp32" else ref_moments(st)[1]
        # consensus.adam_denominators' own formula for fp32 state (before BlockAdam had the method)
        assert torch.equal(d, (v.sqrt() / (1 - beta2**2) ** 0.5).add_(eps))


@pytest.mark.parametrize("policy,offload_dtype", [("reset", "fp32"), ("offload", "fp32"), ("offload", "int8")])
def test_int8_state_dict_round_trip_is_bit_identical(policy, offload_dtype):
    data = batches(12)
    kw = dict(switch_every=3, state_policy=policy, offload_dtype=offload_dtype, order="random", seed=5,
              moment_dtype="int8", **HP)

    def build():
        m = tiny_llama()
        return m, BlockAdam(m, partition_blocks(m), **kw)

    model, opt = build()
    train(model, opt, data)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected_state = opt.state_dict()["state"]

    model, opt = build()
    train(model, opt, data[:7])
    assert opt.inner_step == 1  # mid-block
    model2, opt2, ckpt = reload_through_checkpoint(model, opt, build)
    train(model2, opt2, data[7:])
    for n, p in model2.named_parameters():
        assert torch.equal(p, expected[n]), n
    got_state = opt2.state_dict()["state"]
    assert got_state.keys() == expected_state.keys()
    for name, st in expected_state.items():
        for k, v in st.items():
            assert torch.equal(got_state[name][k], v), (name, k)
    # an fp32 optimizer refuses the 8-bit checkpoint (and the other way round), naming the fix
    fp32_model = tiny_llama()
    fp32_opt = BlockAdam(fp32_model, partition_blocks(fp32_model), **dict(kw, moment_dtype="fp32"))
    with pytest.raises(ValueError, match="optim.moment_dtype=int8"):
        fp32_opt.load_state_dict(ckpt["opt"])


@pytest.mark.parametrize("offload_dtype", ["fp32", "int8"])
def test_offloading_int8_moments_stores_them_as_they_are(offload_dtype):
    model = tiny_llama()
    opt = BlockAdam(model, partition_blocks(model), moment_dtype="int8", state_policy="offload",
                    offload_dtype=offload_dtype, switch_every=10, **HP)
    train(model, opt, batches(2))
    before = {opt.param_name(p): {k: v.clone() for k, v in opt.state[p].items()} for p in opt.active_params()}
    bytes_active = memory_report(opt)["moments"]
    opt.switch_to(1)
    # parked: the same 8 bits (plus the 4-byte step counter per tensor), not quantized a second time
    assert memory_report(opt)["offloaded"] == bytes_active + 4 * len(before)
    opt.switch_to(0)
    for p in opt.active_params():
        for k, v in before[opt.param_name(p)].items():
            assert torch.equal(opt.state[p][k], v), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_moments_take_two_bytes_per_parameter_plus_scales(dtype):
    model = tiny_llama(dtype)
    opt = BlockAdam(model, partition_blocks(model), moment_dtype="int8", switch_every=10, **HP)
    train(model, opt, batches(1))
    sizes = [p.numel() for p in opt.active_params()]
    report = memory_report(opt)
    # m and sqrt(v): one byte each per value, one fp32 absmax each per 256 values (counted from the tensors)
    assert report["moments"] == sum(2 * n + 2 * 4 * -(-n // BLOCK) for n in sizes)
    assert report["moments"] < 2.1 * sum(sizes)  # vs 8 bytes per parameter in fp32
    assert report["master"] == (0 if dtype == torch.float32 else 4 * sum(sizes))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_backward_with_int8_moments_equals_unfused_bit_for_bit(dtype):
    fused_model = tiny_llama(dtype)
    ref_model = copy.deepcopy(fused_model)
    kw = dict(switch_every=2, moment_dtype="int8", state_policy="offload", **HP)
    fused = BlockAdam(fused_model, partition_blocks(fused_model), fused_backward=True, **kw)
    ref = BlockAdam(ref_model, partition_blocks(ref_model), **kw)
    g = torch.Generator().manual_seed(5)
    for step in range(8):  # blocks 0, 1, 2, 0 (two steps each): hooks and parked 8-bit state move with the switches
        ids = torch.randint(0, 128, (2, 8), generator=g)
        fl = fused_model(input_ids=ids, labels=ids).loss
        fl.backward()
        assert all(p.grad is None for p in fused_model.parameters())
        fused.step()
        rl = ref_model(input_ids=ids, labels=ids).loss
        rl.backward()
        ref.step()
        assert torch.equal(fl.detach(), rl.detach()), step
    for (n, p), q in zip(fused_model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), n
    for p, q in zip(fused_model.parameters(), ref_model.parameters()):
        for k, v in ref.state.get(q, {}).items():
            assert torch.equal(fused.state[p][k], v), k
    assert "exp_avg_codes" in fused.state[fused.active_params()[0]]


@pytest.mark.parametrize("overrides,words", [
    (["backend=simulate", "optim.moment_dtype=int8"], ["optim.moment_dtype=int8", "simulate.stacked=false"]),
    (["method=centralized", "centralized_optimizer=adamw", "optim.moment_dtype=int8"],
     ["optim.moment_dtype=int8", "centralized_optimizer=block_adam"]),
    (["optim.moment_dtype=int4"], ["optim.moment_dtype", "fp32, int8"]),
])
def test_config_refuses_int8_moments_where_blockadam_does_not_hold_them(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_config_accepts_int8_moments_where_blockadam_holds_them():
    assert load_config(None, ["optim.moment_dtype=int8"]).optim.moment_dtype == "int8"  # launcher
    cfg = load_config(None, ["backend=simulate", "simulate.stacked=false", "optim.moment_dtype=int8"])
    assert cfg.optim.moment_dtype == "int8"
    assert load_config(None, []).optim.moment_dtype == "fp32"
    model = tiny_llama()
    with pytest.raises(ValueError, match="moment_dtype"):
        BlockAdam(model, partition_blocks(model), moment_dtype="int4")


def test_int8_moments_are_refused_under_zero_and_by_the_stacked_simulator_whatever_the_backend():
    from deca_ds.ds_config import check_ds_config
    from deca_ds.stacked import StackedSimulation

    cfg = load_config(None, ["optim.moment_dtype=int8"])
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}
    check_ds_config(dict(ds), cfg, world_size=2)  # stage 0: BlockAdam holds the moments
    for stage in (1, 2, 3):
        with pytest.raises(ConfigError, match=f"ZeRO stage {stage}.*optim.moment_dtype=fp32 or zero_optimization.stage=0"):
            check_ds_config({**ds, "zero_optimization": {"stage": stage}}, cfg, world_size=2)
    with pytest.raises(ConfigError, match="simulate.stacked=false"):
        StackedSimulation(load_config(None, ["optim.moment_dtype=int8", "num_clients=2"]))
