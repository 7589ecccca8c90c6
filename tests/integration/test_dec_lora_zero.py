"""method=dec_lora launched under ZeRO stages 1-3 (:class:`deca_ds.engine.ZeroBlockEngine`), one and two ranks per
client, against the same run without ZeRO.

References: with one rank per client, the per-client simulator (bit-equal to a stage-0 launch,
tests/integration/test_dec_lora.py); with two ranks per client, which the simulator does not run, one stage-0 launch
of the same settings. One of each per adapter set (below), shared by every case (:func:`references`, once per session).

Each launch must train (losses), gossip, leave the frozen base bit-identical (final checkpoint), write
``clients/client_<c>`` and ``consensus/`` as plain models that load with transformers without a missing or unexpected
key and that are the base plus the merged adapters of its final checkpoint, and equal the reference bit for bit:

- stages 1 and 2, adapters on every linear layer (peft's default): with ``gradient_clipping=0`` (set here) every
  operation is the stage-0 one on the same values: the gradients are autograd's own (ZeRO-1/2 install no module
  hooks), reduced over a client's ranks by a sum of two values (commutative) halved (exact), and the update is torch's
  element-wise AdamW on a flat copy of the same fp32 values. With clipping on, ZeRO-1/2 compute the global norm over
  flat partitions in another order, and the clip coefficient's last bit may differ (docs/reference.md).
- stage 3, adapters on ``lm_head`` only (:data:`SETTINGS_ZERO3`). DeepSpeed's reduction is exact here too
  (stage3.py ``__avg_scatter_grads`` -> ``reduce_scatter_coalesced``: each rank's fp32 gradient divided by the
  client's 1 or 2 ranks, then a reduce-scatter, a sum of at most two terms). ZeRO-3 changes autograd's order instead:
  its hooks pass every module's inputs and outputs through autograd functions, so the gradient contributions to a
  tensor with three or more readers are grouped by module and summed in another association (a norm's output read by
  gate_proj's and up_proj's base layers and lora_A; the residual stream, read twice inside an RMSNorm and once by the
  residual add). With adapters in every layer the forward stays bit-identical but the adapters' gradients differ in
  their last bits (measured: first at layer 3's post-attention norm), and no tolerance for 6 steps can be derived: a
  bound on the backward's rounding needs each operation's condition, not just the float format, and from step 2 on a
  weight difference moves the next gradient through the loss's Hessian, which nothing in the run bounds; an AdamW
  update's gradient-free bound ``lr K_t`` (below) allows ``2 lr sum_t K_t = 0.12`` per adapter entry after 6 steps,
  more than a wrong lr or a skipped step changes. With adapters on ``lm_head`` alone no tensor that needs a gradient
  has more than one reader (the final norm's output, read by lm_head's base layer and its lora_A, needs none: nothing
  below is trained): the same operations in the same order, bit for bit. The bf16 test below trains every linear
  layer's adapters at stage 3.

Two checks compare values computed by different operations, per entry, against bounds from float32's unit roundoff
``u = 2**-24`` and ``gamma_k = k u / (1 - k u)`` (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed.,
(3.5): a k-term dot product in any order is within ``gamma_k`` times its sum of |terms|; Lemma 3.3:
``(1 + gamma_j)(1 + gamma_k) <= 1 + gamma_{j+k}``), evaluated on the run's final adapters:

- gossip (:func:`_check_gossip`): with two clients the Metropolis weights are 1/2 and client i computes
  ``lerp(x_i, x_j, 1/2) = x_j - fl(x_j - x_i) / 2`` (``deca_ds.gossip.accumulate_mix_``; torch's lerp for a weight
  >= 1/2), so the clients' results differ by at most ``u (|a - b| + |x_0| + |x_1|)`` (one rounding of the difference,
  one of each result; ``a, b`` their values before the exchange). ``|a - b|`` is at most the step's two updates plus
  the difference left before it, and an AdamW update (no weight decay) is below ``lr K_t``, ``K_t = (1 - b1) /
  (1 - b1^t) sqrt((1 - b2^t) / (1 - b2)) sqrt(sum_{j<t} (b1^2 / b2)^j)`` (Cauchy-Schwarz on the sums m and v; 1.016
  at t = 6 with betas (0.9, 0.999)). Asserted: ``|x_0 - x_1| <= 2 u (|x_0| + |x_1| + 2 lr K)``, the 2 covering the
  O(u)-relative terms left out (measured: at most 0.38 of it). Without gossip the clients differ by up to lr a step.
- merge (:func:`_check_merged`): peft saves ``W + s (B @ A)`` (``s = alpha / r = 2``: exact), which the test
  recomputes from the initial base ``W`` and the checkpoint's adapters, not with peft's merge, which the reference
  shares. A client's saved weight and the test's are each within ``gamma_{r+1} T`` of the exact value (``r = 8``
  products and one add), ``T = |W| + s |B| @ |A|``: ``2 gamma_{r+1} T`` apart. consensus/ merges the clients'
  average, an fp32 all-reduce over the ``n = 2 x ranks per client`` ranks (``gamma_{n-1}`` on W, B and A, so
  ``gamma_{r+2n-1}`` on the result), the test ``fl(B_0 + B_1) / 2`` (``gamma_{r+3}``), ``|B|, |A|`` the clients'
  mean absolute values (measured: at most 0.07 of the bound). An unmerged adapter is off by ``s |B @ A|`` (~0.08).

The stage-3 cases failed on the code before the fix: the evaluation and the saved models of ZeRO-3 are built from a
CPU copy of the model (``ZeroBlockEngine.whole_model``), which was a plain model into which the peft state dict
(``base_model.model.…``, ``lora_A``) could not load, so the run died after training. Each case is one launch
(~15-35 s on 2 cores, the first of each reference pays for it).
"""

import json
import math

import pytest
import torch
from launch import FAST, RECIPE, ROOT, torchrun

pytestmark = pytest.mark.integration

SETTINGS = ["method=dec_lora", "max_steps=6", "optim.lr=1e-2", "optim.eps=1e-3", "topology.name=ring",
            "model.save_client_models=true", *FAST]
# Stage 3: adapters on lm_head only, where ZeRO-3 computes every gradient in stage 0's order (module docstring).
SETTINGS_ZERO3 = [*SETTINGS, "lora.target_modules=[lm_head]"]
OUTPUTS = ("clients/client_0", "clients/client_1", "consensus")
U = 2.0 ** -24  # float32's unit roundoff


def _gamma(k: int) -> float:
    """Higham's ``gamma_k = k u / (1 - k u)``: a k-term float32 sum of products, in any order, is within
    ``gamma_k`` times the sum of |terms| of the exact value."""
    return k * U / (1 - k * U)


def _adam_step_bound(cfg) -> float:
    """``max_t K_t`` over the run's steps: an AdamW update (no weight decay) is below ``lr K_t`` whatever the
    gradients (module docstring)."""
    b1, b2 = cfg.optim.betas
    return max((1 - b1) / (1 - b1 ** t) * math.sqrt((1 - b2 ** t) / (1 - b2))
               * math.sqrt(sum((b1 * b1 / b2) ** j for j in range(t))) for t in range(1, cfg.max_steps + 1))


def _ds_config(tmp_path, stage: int, persistence: bool = False) -> str:
    """A shipped CPU ds_config at ``stage`` with ``gradient_clipping=0`` (see the module docstring), as a file.

    Stage 3 takes ``cpu_fp32_zero3.json`` (``stage3_param_persistence_threshold: 0``: every parameter partitioned);
    ``persistence=True`` drops that key, so DeepSpeed's default threshold keeps every parameter of the tiny model
    (the adapters included) gathered, as ``gpu_bf16_zero3.json`` does with real adapters: the path where the engine
    re-gathers the adapters after gossip wrote their shards. Stage 1 is ``cpu_fp32_zero2.json`` at stage 1.
    """
    name = {0: "cpu_fp32.json", 1: "cpu_fp32_zero2.json", 2: "cpu_fp32_zero2.json", 3: "cpu_fp32_zero3.json"}[stage]
    ds = json.loads((ROOT / "ds_configs" / name).read_text())
    ds["gradient_clipping"] = 0.0
    ds["zero_optimization"]["stage"] = stage
    if persistence:
        del ds["zero_optimization"]["stage3_param_persistence_threshold"]
    path = tmp_path / f"ds_stage{stage}{'_persistent' if persistence else ''}.json"
    path.write_text(json.dumps(ds))
    return str(path)


def _launch(out, nproc: int, ds_config: str, rpc: int, settings=SETTINGS) -> None:
    torchrun(RECIPE, f"output_dir={out}", f"ds_config={ds_config}", f"clients.ranks_per_client={rpc}", *settings,
             nproc=nproc, timeout=400)


def _losses(out) -> dict:
    return {(r["step"], r["client"]): r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text()
                                                             .splitlines()) if "loss" in r}


def _load(path) -> dict:
    """A saved output's state dict; it must load as a plain transformers model, every key used."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], (path, info)
    return model.state_dict()


def _numpy(sd: dict) -> dict:  # numpy, so that a reference pickles between xdist workers
    return {k: v.numpy() for k, v in sd.items()}


@pytest.fixture(scope="module")
def references(request, tmp_path_factory):
    """``get(rpc, settings)``: the reference of a case (module docstring), computed once per session: losses and
    the merged client and consensus models. One rank per client: the per-client simulator (2 clients); two: a
    stage-0 launch of 2 clients x 2 ranks."""
    from dist import once_per_session

    pytest.importorskip("peft")
    cache = {}

    def simulate(settings):
        from deca_ds.config import load_config
        from deca_ds.models import merged_model
        from deca_ds.simulate import Simulation

        tmp = tmp_path_factory.mktemp("dec_lora_sim")
        cfg = load_config(None, ["num_clients=2", "simulate.stacked=false", f"output_dir={tmp / 'sim'}",
                                 f"ds_config={_ds_config(tmp, 0)}", *settings])
        sim = Simulation(cfg)
        losses = {}
        for step in range(cfg.max_steps):
            for client, loss in enumerate(sim.step().losses):
                losses[(step, client)] = loss
        models = {f"clients/client_{c}": _numpy(merged_model(sim.model_of(c), keep=True).state_dict())
                  for c in range(2)}
        models["consensus"] = _numpy(sim.consensus_model().merge_and_unload().state_dict())
        return {"losses": losses, "models": models}

    def launch_stage0(settings):
        tmp = tmp_path_factory.mktemp("dec_lora_rpc2_stage0")
        out = tmp / "run"
        _launch(out, 4, _ds_config(tmp, 0), 2, settings)
        return {"losses": _losses(out), "models": {name: _numpy(_load(out / name)) for name in OUTPUTS}}

    def get(rpc: int, settings: list[str]) -> dict:
        name = f"dec_lora_rpc{rpc}_{'zero3' if settings is SETTINGS_ZERO3 else 'all'}_reference"
        if name not in cache:
            run = simulate if rpc == 1 else launch_stage0
            cache[name] = once_per_session(request, tmp_path_factory, name, lambda: run(settings))
        return cache[name]

    return get


def _initial_peft_state(settings) -> dict:
    """The run's model as it starts (embedded base, seeded adapters), peft-wrapped: the frozen base to compare."""
    import warnings

    from deca_ds.build import prepare_model
    from deca_ds.config import load_config
    from deca_ds.models import load_model_and_tokenizer

    cfg = load_config(None, settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the embedded model's frozen-head hint
        return prepare_model(cfg, load_model_and_tokenizer(cfg.model, seed=cfg.seed)[0]).state_dict()


def _adapted(state: dict) -> list[str]:
    """The prefixes (``base_model.model.<module>``) of the modules that carry an adapter in a peft state dict."""
    return sorted(k[:-len(".lora_A.default.weight")] for k in state if k.endswith(".lora_A.default.weight"))


def _check_gossip(finals: list[dict], cfg) -> None:
    """Both clients hold the same adapters up to the rounding of the last exchange (module docstring)."""
    assert cfg.optim.weight_decay == 0  # the bound on an update below assumes none
    step_bound = cfg.optim.lr * _adam_step_bound(cfg)
    for k in finals[0]:
        if "lora_" in k:
            x0, x1 = finals[0][k], finals[1][k]
            excess = ((x0 - x1).abs() - 2 * U * (x0.abs() + x1.abs() + 2 * step_bound)).max().item()
            assert excess <= 0, f"the clients differ at {k} by {(x0 - x1).abs().max().item():.3g}: no gossip?"


def _check_merged(saved: dict, finals: list[dict], start: dict, cfg, world: int) -> None:
    """Each saved model is the initial base with its final adapters merged, ``W + s (B @ A)``, within the rounding
    of two float32 evaluations (module docstring); every other weight is the base's, bit for bit (consensus/: the
    average of 2 or 4 equal values, exact)."""
    r, s = cfg.lora.rank, cfg.lora.alpha / cfg.lora.rank
    mean = {k: (finals[0][k] + finals[1][k]) / 2 for k in finals[0]}
    mean_abs = {k: (finals[0][k].abs() + finals[1][k].abs()) / 2 for k in finals[0]}
    for name, model in saved.items():
        if name == "consensus":
            values, magnitudes, gamma = mean, mean_abs, _gamma(r + 2 * world - 1) + _gamma(r + 3)
        else:
            values = finals[int(name.rsplit("_", 1)[1])]
            magnitudes, gamma = {k: v.abs() for k, v in values.items()}, 2 * _gamma(r + 1)
        merged = set()
        for prefix in _adapted(finals[0]):
            key = prefix.removeprefix("base_model.model.") + ".weight"
            w = start[f"{prefix}.base_layer.weight"]
            a, b = f"{prefix}.lora_A.default.weight", f"{prefix}.lora_B.default.weight"
            diff = (model[key] - (w + (values[b] @ values[a]) * s)).abs()
            excess = (diff - gamma * (w.abs() + s * (magnitudes[b] @ magnitudes[a]))).max().item()
            assert excess <= 0, f"{name} {key}: |saved - (W + s B A)| = {diff.max().item():.3g}, over the bound"
            merged.add(key)
        for key, value in model.items():
            if key not in merged:
                assert torch.equal(value, start[f"base_model.model.{key}"]), (name, key)


@pytest.mark.parametrize("stage,rpc,persistence", [
    (1, 1, False), (1, 2, False), (2, 1, False), (2, 2, False),  # adapters on every linear layer
    (3, 1, False), (3, 2, False), (3, 2, True),  # adapters on lm_head only; failed before the fix
], ids=["zero1-rpc1", "zero1-rpc2", "zero2-rpc1", "zero2-rpc2", "zero3-rpc1", "zero3-rpc2", "zero3-rpc2-persistent"])
def test_dec_lora_under_zero_equals_the_run_without_zero(stage, rpc, persistence, tmp_path, references):
    from deca_ds.config import load_config

    settings = SETTINGS_ZERO3 if stage == 3 else SETTINGS
    ref = references(rpc, settings)
    out = tmp_path / "run"
    _launch(out, 2 * rpc, _ds_config(tmp_path, stage, persistence), rpc, settings)
    cfg = load_config(None, settings)

    # It trained, and gossiped every step, as the reference did.
    losses = _losses(out)
    assert losses == ref["losses"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["bytes_sent"] > 0 for r in records if "loss" in r)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "dec_lora" and summary["steps"] == 6
    assert all(len(c["rank_fingerprints"]) == rpc and len(set(c["rank_fingerprints"])) == 1
               for c in summary["clients"]), "the ranks of a client hold different weights"

    # The base stayed frozen (bit-identical, partitioned or not) and only the adapters moved.
    start = _initial_peft_state(settings)
    latest = (out / "checkpoints" / "latest").read_text().strip()
    finals = [torch.load(out / "checkpoints" / latest / f"client_{c}" / "state.pt", weights_only=False)["model"]
              for c in range(2)]
    for final in finals:
        assert final.keys() == start.keys()
        moved = {k for k in start if not torch.equal(final[k], start[k])}
        assert moved and all("lora_" in k for k in moved), sorted(moved)[:3]
        assert any("lora_A" in k for k in moved) and any("lora_B" in k for k in moved)
    # The clients trained on different rows: only gossip makes them agree.
    _check_gossip(finals, cfg)

    # Plain models that load, the base with the final adapters merged, equal to the reference.
    saved = {name: _load(out / name) for name in OUTPUTS}
    _check_merged(saved, finals, start, cfg, world=2 * rpc)
    for name in OUTPUTS:
        want = ref["models"][name]
        assert saved[name].keys() == want.keys(), name
        for k in want:
            got, expected = saved[name][k], torch.from_numpy(want[k])
            same = torch.equal(got, expected)
            assert same, f"{name} {k}: differs from the reference by {(got - expected).abs().max().item():.3g}"




def test_dec_lora_zero3_bf16_saves_the_engines_bf16_model_merged(tmp_path):
    """ZeRO-3 in bf16 saves what stages 0-2 save: the client's own bf16 model, merged in bf16.

    Under DeepSpeed's bf16 mode every parameter of the module is bf16, peft's fp32 adapters included (stage 0 keeps
    them fp32; docs/reference.md). The stage-3 copy that is evaluated and saved was built in fp32 (the meta model's
    dtype), so clients/ and consensus/ were fp32 models merged in fp32, unlike every other stage. Here each saved
    model must be bf16 and equal, bit for bit, the final checkpoint's bf16 parameters (the engine's own) merged by
    peft, and the consensus the same merge of the two clients' average (fp32 sum of two, halved, rounded to bf16, as
    :func:`deca_ds.summary.average_over_clients_` computes it).
    """
    pytest.importorskip("peft")
    import warnings

    from safetensors.torch import load_file

    from deca_ds.build import prepare_model
    from deca_ds.config import load_config
    from deca_ds.models import load_model_and_tokenizer, merged_model

    ds = json.loads(open(_ds_config(tmp_path, 3)).read())
    ds["bf16"] = {"enabled": True}
    (tmp_path / "ds_bf16.json").write_text(json.dumps(ds))
    out = tmp_path / "run"
    torchrun(RECIPE, f"output_dir={out}", f"ds_config={tmp_path / 'ds_bf16.json'}", "model.dtype=bf16", *SETTINGS,
             timeout=400)

    cfg = load_config(None, ["model.dtype=bf16", *SETTINGS])
    latest = (out / "checkpoints" / "latest").read_text().strip()
    finals = [torch.load(out / "checkpoints" / latest / f"client_{c}" / "state.pt", weights_only=False)["model"]
              for c in range(2)]
    assert {v.dtype for v in finals[0].values()} == {torch.bfloat16}

    def merged(state):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = prepare_model(cfg, load_model_and_tokenizer(cfg.model, seed=cfg.seed)[0]).to(torch.bfloat16)
        model.load_state_dict(state)
        return merged_model(model).state_dict()

    average = {k: ((finals[0][k].float() + finals[1][k].float()) / 2).to(torch.bfloat16) for k in finals[0]}
    for name, state in (("clients/client_0", finals[0]), ("clients/client_1", finals[1]), ("consensus", average)):
        _load(out / name)
        saved, want = load_file(out / name / "model.safetensors"), merged(state)  # as stored, not as loaded
        assert saved.keys() == want.keys()
        for k in want:
            assert saved[k].dtype == torch.bfloat16 and torch.equal(saved[k], want[k]), (name, k)


def test_dec_lora_zero3_with_an_adapter_on_a_tied_lm_head_saves_the_engines_model_merged(tmp_path):
    """A model whose lm_head is tied to embed_tokens, with lora.target_modules naming lm_head, under ZeRO-3.

    The stage-3 copy that is evaluated and saved (``ZeroBlockEngine.whole_model``) is built on the meta device and
    must tie the head to the embeddings again after ``to_empty``. It called transformers' ``tie_weights``, which on
    this model sets ``weight`` on peft's ``lora.Linear`` (a read-only property there) and failed with
    ``KeyError: attribute 'weight' already exists``: the run died after training, with nothing saved. Stage 0 runs
    these settings. Here each saved model must equal, bit for bit, the final checkpoint's parameters (the engine's
    own, fp32) merged by peft into a model loaded the way the run loads it, the consensus the same merge of the two
    clients' average (fp32 sum of two, halved: :func:`deca_ds.summary.average_over_clients_`).
    """
    pytest.importorskip("peft")
    import warnings

    import transformers as T
    from safetensors.torch import load_file

    from deca_ds.build import prepare_model
    from deca_ds.config import load_config
    from deca_ds.data.tokenizer import make_byte_tokenizer
    from deca_ds.models import load_model_and_tokenizer, merged_model

    tok = make_byte_tokenizer()
    model_dir = tmp_path / "tied"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        )).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    settings = [*SETTINGS, f"model.path={model_dir}", "lora.target_modules=[q_proj,v_proj,lm_head]", "max_steps=2",
                "data.max_length=48"]
    out = tmp_path / "run"
    torchrun(RECIPE, f"output_dir={out}", f"ds_config={_ds_config(tmp_path, 3)}", *settings, timeout=400)

    cfg = load_config(None, settings)
    latest = (out / "checkpoints" / "latest").read_text().strip()
    finals = [torch.load(out / "checkpoints" / latest / f"client_{c}" / "state.pt", weights_only=False)["model"]
              for c in range(2)]
    assert any("lm_head.lora_A" in k for k in finals[0]), "lm_head carries no adapter: the case is not tested"

    def merged(state):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # peft's tied-adapter note
            model = prepare_model(cfg, load_model_and_tokenizer(cfg.model, seed=cfg.seed)[0])
        model.load_state_dict(state)
        return merged_model(model).state_dict()

    average = {k: (finals[0][k] + finals[1][k]) / 2 for k in finals[0]}
    for name, state in (("clients/client_0", finals[0]), ("clients/client_1", finals[1]), ("consensus", average)):
        loaded = _load(out / name)
        # The adapted head is untied before the merge (deca_ds.models.merged_model): the embeddings stay the frozen
        # base ones, only the head carries the adapter's delta (merged into the shared tensor, the delta once
        # changed the embeddings too), and the saved config keeps them apart.
        base_embed = next(v for k, v in state.items() if k.endswith("model.embed_tokens.weight"))
        assert torch.equal(loaded["model.embed_tokens.weight"], base_embed), name
        assert not torch.equal(loaded["lm_head.weight"], base_embed), name
        assert json.loads((out / name / "config.json").read_text())["tie_word_embeddings"] is False, name
        saved, want = load_file(out / name / "model.safetensors"), merged(state)  # as stored, not as loaded
        assert saved.keys() <= want.keys() and saved
        for k in saved:
            assert torch.equal(saved[k], want[k]), (name, k)
