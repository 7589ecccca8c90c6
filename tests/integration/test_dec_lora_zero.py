"""method=dec_lora launched under ZeRO stages 1-3 (:class:`deca_ds.engine.ZeroBlockEngine`), one and two ranks per
client, against the same run without ZeRO.

References: with one rank per client, the per-client simulator (bit-equal to a stage-0 launch,
tests/integration/test_dec_lora.py); with two ranks per client, which the simulator does not run, one stage-0 launch
of the same settings shared by every case (:func:`rpc2_reference`, once per session).

Each launch must train (losses), gossip (every step sends bytes, and with two clients the Metropolis weights are 1/2,
so both clients end with the same adapters up to rounding), leave the frozen base bit-identical (final checkpoint), write
``clients/client_<c>`` and ``consensus/`` as plain models that load with transformers without a missing or unexpected
key, and equal the reference:

- stages 1 and 2: bit for bit. With ``gradient_clipping=0`` (set here) every operation is the stage-0 one on the same
  values: the gradients are autograd's own (ZeRO-1/2 install no module hooks), reduced over a client's ranks by a
  sum of two values (commutative) halved (exact), and the update is torch's element-wise AdamW on a flat copy of the
  same fp32 values. With clipping on, ZeRO-1/2 compute the global norm over flat partitions in another order, and the
  clip coefficient's last bit may differ (measured: <= 5.4e-8 on the merged weights after 6 steps; docs/reference.md).
- stage 3: within float32 reordering. ZeRO-3 runs backward with its module hooks and gathered parameter buffers, and
  the gradients autograd hands the adapters already differ from stage 0's (measured with a tensor hook on one rank,
  before any reduction: up to 2.4e-7 x the tensor's largest entry, i.e. the same float32 sums in another order).
  Tolerance, derived: Adam's update lr * m_hat / (sqrt(v_hat) + eps) moves by at most about lr / eps = 10 per unit of
  gradient change (lr 1e-2, eps 1e-3 as in tests/integration/test_zero.py: with the default eps 1e-8 that factor is
  1e6 and an entry whose gradient is near eps may move by up to lr differently - measured 3.8e-5 - so nothing tighter
  than lr could be asserted); with |g| <= 0.12 (measured) an adapter entry moves by at most 10 * 2.4e-7 * 0.12 ~ 3e-7
  differently per step, <= 2e-6 after 6 steps (gossip averages, never amplifies). A merged weight
  W + (alpha / r) B A adds r = 8 products with |A| <= 1/sqrt(64) + 6 lr ~ 0.19 (peft's Kaiming-uniform bound
  1/sqrt(fan_in), fan_in >= 64) and |B| <= 6 lr = 0.06:
  |delta| <= 2 * 8 * (2e-6 * 0.19 + 0.06 * 2e-6) ~ 8e-6, so 1e-5 (measured: 2e-8). Losses: rel 1e-4, the tolerance of
  the stage-3 end-to-end check in tests/integration/test_recipe.py for the same cause (measured 1e-7).

The stage-3 cases failed on the code before the fix: the evaluation and the saved models of ZeRO-3 are built from a
CPU copy of the model (``ZeroBlockEngine.whole_model``), which was a plain model into which the peft state dict
(``base_model.model.…``, ``lora_A``) could not load, so the run died after training. Each case is one launch
(~15-35 s on 2 cores, the first of each reference pays for it).
"""

import json
import subprocess
import sys

import pytest
import torch
from launch import FAST, RECIPE, ROOT, free_port, launch_env

pytestmark = pytest.mark.integration

SETTINGS = ["method=dec_lora", "max_steps=6", "optim.lr=1e-2", "optim.eps=1e-3", "topology.name=ring",
            "model.save_client_models=true", *FAST]
OUTPUTS = ("clients/client_0", "clients/client_1", "consensus")
WEIGHT_ATOL = 1e-5  # stage 3 against the reference (module docstring)
LOSS_REL = 1e-4
# Two clients mixed with weights 1/2 hold the same adapters up to the rounding of the Mixer's lerp, which is not
# symmetric in its arguments (a + (b - a) / 2): <= 1 ulp of |B| <= 6 lr = 0.06 (7e-9) or of |A| <= 0.19 (1.5e-8) per
# entry; a merged weight adds (alpha / r) * r = 16 such products: <= 16 * (7e-9 * 0.19 + 0.06 * 1.5e-8) ~ 4e-8
# (measured: 7.5e-9). Without gossip they would differ by about lr.
CLIENTS_ATOL = 1e-7


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


def _launch(out, nproc: int, ds_config: str, rpc: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), RECIPE, f"output_dir={out}", f"ds_config={ds_config}", f"clients.ranks_per_client={rpc}",
           *SETTINGS]
    res = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-6000:]


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
def rpc1_reference(request, tmp_path_factory):
    """The per-client simulator of :data:`SETTINGS` (2 clients): losses and merged client and consensus models."""
    from dist import once_per_session

    def run():
        pytest.importorskip("peft")
        from deca_ds.config import load_config
        from deca_ds.models import merged_model
        from deca_ds.simulate import Simulation

        tmp = tmp_path_factory.mktemp("dec_lora_sim")
        cfg = load_config(None, ["num_clients=2", "simulate.stacked=false", f"output_dir={tmp / 'sim'}",
                                 f"ds_config={_ds_config(tmp, 0)}", *SETTINGS])
        sim = Simulation(cfg)
        losses = {}
        for step in range(cfg.max_steps):
            for client, loss in enumerate(sim.step().losses):
                losses[(step, client)] = loss
        models = {f"clients/client_{c}": _numpy(merged_model(sim.model_of(c), keep=True).state_dict())
                  for c in range(2)}
        models["consensus"] = _numpy(sim.consensus_model().merge_and_unload().state_dict())
        return {"losses": losses, "models": models}

    return once_per_session(request, tmp_path_factory, "dec_lora_rpc1_reference", run)


@pytest.fixture(scope="module")
def rpc2_reference(request, tmp_path_factory):
    """A stage-0 launch of :data:`SETTINGS` with 2 clients x 2 ranks: losses and the saved models."""
    from dist import once_per_session

    def run():
        pytest.importorskip("peft")
        tmp = tmp_path_factory.mktemp("dec_lora_rpc2_stage0")
        out = tmp / "run"
        _launch(out, 4, _ds_config(tmp, 0), 2)
        return {"losses": _losses(out), "models": {name: _numpy(_load(out / name)) for name in OUTPUTS}}

    return once_per_session(request, tmp_path_factory, "dec_lora_rpc2_reference", run)


def _initial_peft_state() -> dict:
    """The run's model as it starts (embedded base, seeded adapters), peft-wrapped: the frozen base to compare."""
    import warnings

    from deca_ds.build import prepare_model
    from deca_ds.config import load_config
    from deca_ds.models import load_model_and_tokenizer

    cfg = load_config(None, SETTINGS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the embedded model's frozen-head hint
        return prepare_model(cfg, load_model_and_tokenizer(cfg.model, seed=cfg.seed)[0]).state_dict()


@pytest.mark.parametrize("stage,rpc,persistence", [
    (1, 1, False), (1, 2, False), (2, 1, False), (2, 2, False),  # bit-equal
    (3, 1, False), (3, 2, False), (3, 2, True),  # within float32 reordering; failed before the fix
], ids=["zero1-rpc1", "zero1-rpc2", "zero2-rpc1", "zero2-rpc2", "zero3-rpc1", "zero3-rpc2", "zero3-rpc2-persistent"])
def test_dec_lora_under_zero_equals_the_run_without_zero(stage, rpc, persistence, tmp_path, request):
    pytest.importorskip("peft")
    ref = request.getfixturevalue("rpc1_reference" if rpc == 1 else "rpc2_reference")
    out = tmp_path / "run"
    _launch(out, 2 * rpc, _ds_config(tmp_path, stage, persistence), rpc)
    exact = stage < 3

    # It trained, and gossiped every step.
    losses = _losses(out)
    assert sorted(losses) == sorted(ref["losses"])
    for key, loss in losses.items():
        if exact:
            assert loss == ref["losses"][key], key
        else:
            assert loss == pytest.approx(ref["losses"][key], rel=LOSS_REL), key
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["bytes_sent"] > 0 for r in records if "loss" in r)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "dec_lora" and summary["steps"] == 6
    assert all(len(c["rank_fingerprints"]) == rpc and len(set(c["rank_fingerprints"])) == 1
               for c in summary["clients"]), "the ranks of a client hold different weights"

    # Plain models that load, equal to the reference; with weights 1/2 both clients and the consensus agree.
    saved = {name: _load(out / name) for name in OUTPUTS}
    for name in OUTPUTS:
        want = {k: torch.from_numpy(v) for k, v in ref["models"][name].items()}
        assert saved[name].keys() == want.keys(), name
        for k in want:
            if exact:
                assert torch.equal(saved[name][k], want[k]), (name, k)
            else:
                diff = (saved[name][k] - want[k]).abs().max().item()
                assert diff <= WEIGHT_ATOL, f"{name} {k}: |zero{stage} - reference| = {diff:.3g}"
        for k in want:  # the clients trained on different rows: only gossip makes them agree
            diff = (saved[name][k] - saved["consensus"][k]).abs().max().item()
            assert diff <= CLIENTS_ATOL, f"{name} and consensus differ at {k} by {diff:.3g}: no gossip?"

    # The base stayed frozen (bit-identical, partitioned or not) and only the adapters moved.
    start = _initial_peft_state()
    latest = (out / "checkpoints" / "latest").read_text().strip()
    for client in range(2):
        final = torch.load(out / "checkpoints" / latest / f"client_{client}" / "state.pt",
                           weights_only=False)["model"]
        assert final.keys() == start.keys()
        moved = {k for k in start if not torch.equal(final[k], start[k])}
        assert moved and all("lora_" in k for k in moved), sorted(moved)[:3]
        assert any("lora_A" in k for k in moved) and any("lora_B" in k for k in moved)


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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           RECIPE, f"output_dir={out}", f"ds_config={tmp_path / 'ds_bf16.json'}", "model.dtype=bf16", *SETTINGS]
    res = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-6000:]

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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           RECIPE, f"output_dir={out}", f"ds_config={_ds_config(tmp_path, 3)}", *settings]
    res = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-6000:]

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
        assert torch.equal(loaded["model.embed_tokens.weight"], loaded["lm_head.weight"]), name  # still tied
        saved, want = load_file(out / name / "model.safetensors"), merged(state)  # as stored, not as loaded
        assert saved.keys() <= want.keys() and saved
        for k in saved:
            assert torch.equal(saved[k], want[k]), (name, k)
