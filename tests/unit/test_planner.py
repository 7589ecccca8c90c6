"""Planner arithmetic against hand-computed figures, DeepSpeed's own estimators and the published model sizes; the
blocks it plans against a partition of the recipe it writes."""

import dataclasses
import json
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from deca_ds.bench import planner
from deca_ds.bench.planner import (GIB, MIB, ModelShape, PlanRequest, activation_bytes, deca_state_bytes,
                                   full_adam_bytes, inspect_model, parse_bytes, ring_degree)
from deca_ds.blocks import partition_blocks
from deca_ds.cli import main as cli_main
from deca_ds.config import BlocksConfig, DecaConfig, RunConfig, load_config

LAYERS_ONLY = dict(include_embeddings=False, include_lm_head=False)

MODELS = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "models")


def _llama_layer_params(h, f, heads, kv):
    head_dim = h // heads
    return 2 * h * h + 2 * h * kv * head_dim + 3 * h * f + 2 * h  # q,o + k,v + gate/up/down + 2 norms


def test_parse_bytes_units():
    assert parse_bytes("24GiB") == 24 * 1024**3
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("512 MiB") == 512 * 1024**2
    assert parse_bytes("1e9") == 10**9
    with pytest.raises(ValueError, match="not a memory size"):
        parse_bytes("lots")


@pytest.mark.parametrize("name,params,layers,block", [
    ("llama-3.1-8b", 8_030_261_248, 32, _llama_layer_params(4096, 14336, 32, 8)),
    ("llama-2-7b", 6_738_415_616, 32, _llama_layer_params(4096, 11008, 32, 32)),
    # Qwen2 has q/k/v biases: h + 2·kv_dim per layer.
    ("qwen2.5-3b", 3_085_938_688, 36, _llama_layer_params(2048, 11008, 16, 2) + 2048 + 2 * 256),
    ("qwen2-1.5b", 1_543_714_304, 28, _llama_layer_params(1536, 8960, 12, 2) + 1536 + 2 * 256),
])
def test_shipped_configs_match_published_sizes(name, params, layers, block):
    model = planner.build_meta_model(os.path.join(MODELS, name))
    assert all(p.device.type == "meta" for p in model.parameters())
    shape = inspect_model(model, BlocksConfig(layers_per_block=2, **LAYERS_ONLY))
    assert shape.params == params  # the models' published parameter counts
    assert shape.num_layers == layers and shape.num_blocks == layers // 2
    assert shape.largest_block_params == 2 * block
    # The recipe defaults train every parameter: embeddings and final norm + head are blocks of their own.
    cfg = model.config
    full = inspect_model(model)
    assert full.num_blocks == layers + 2 and full.trainable_params == params
    vocab = cfg.vocab_size * cfg.hidden_size
    head = vocab if cfg.tie_word_embeddings else vocab + cfg.hidden_size  # tied: embeddings; else head + final norm
    assert full.largest_block_params == max(head, block)


def test_inspect_model_tiny_llama_closed_form():
    h, f, n, v, heads, kv = 64, 160, 5, 300, 4, 2
    cfg = LlamaConfig(hidden_size=h, intermediate_size=f, num_hidden_layers=n, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=v, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    layer = _llama_layer_params(h, f, heads, kv)
    shape = inspect_model(model, BlocksConfig(layers_per_block=2, **LAYERS_ONLY))
    assert shape.params == v * h + n * layer + h  # tied head counted once
    assert shape.num_blocks == 3 and shape.largest_block_params == 2 * layer
    assert shape.trainable_params == n * layer
    assert shape.largest_module_params == v * h
    # Defaults: the tied head goes with the embeddings block (v*h), the "lm_head" block is the final norm alone (h);
    # 5 blocks covering every parameter.
    full = inspect_model(model, BlocksConfig(layers_per_block=2))
    assert full.num_blocks == 5 and full.trainable_params == shape.params == v * h + n * layer + h
    assert (full.largest_block_name, full.largest_block_params) == ("layers.0-1", 2 * layer)
    wide = inspect_model(model, BlocksConfig(layers_per_block=1, include_lm_head=False))
    assert wide.trainable_params == v * h + n * layer and wide.largest_block_params == layer


@pytest.mark.parametrize("n", [1, 2, 8])
@pytest.mark.parametrize("offload", [False, True])
def test_full_adam_matches_deepspeed_estimators(n, offload):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    psi, largest = 1_234_567_891, 98_765_432
    cpu2, gpu2 = estimate_zero2_model_states_mem_needs(psi, num_gpus_per_node=n, cpu_offload=offload)
    assert full_adam_bytes(psi, 2, n, offload) == {"gpu": gpu2, "cpu": cpu2}
    cpu3, gpu3, _ = estimate_zero3_model_states_mem_needs(psi, largest, num_gpus_per_node=n, cpu_offload=offload,
                                                          cpu_offload_params=False)
    assert full_adam_bytes(psi, 3, n, offload, False, largest) == {"gpu": gpu3, "cpu": cpu3}
    if offload:
        cpu3p, gpu3p, _ = estimate_zero3_model_states_mem_needs(psi, largest, num_gpus_per_node=n)
        assert full_adam_bytes(psi, 3, n, True, True, largest) == {"gpu": gpu3p, "cpu": cpu3p}


def test_full_adam_hand_figures_and_errors():
    psi = 1000
    assert full_adam_bytes(psi, 0)["gpu"] == 20_000  # 2 bf16 weights + 18 (DeepSpeed's per-parameter figure)
    assert full_adam_bytes(psi, 1, ranks=4)["gpu"] == 2000 + 2000 + 16_000 // 4
    assert full_adam_bytes(psi, 0, dtype="fp32")["gpu"] == 16_000  # fp32 weights, grads, m, v
    with pytest.raises(ValueError, match="stage 1, 2 or 3"):
        full_adam_bytes(psi, 0, offload=True)
    with pytest.raises(ValueError, match="only at ZeRO stage 3"):
        full_adam_bytes(psi, 2, offload=True, offload_params=True)


def test_deca_state_bytes_hand_figures():
    psi, blk = 10_000, 1_000
    bf16 = deca_state_bytes(psi, blk, "bf16", "reset", degree=2)
    assert bf16["model_states"] == 2 * psi + 14 * blk == 34_000
    assert (bf16["weights"], bf16["grads"], bf16["master"], bf16["moments"]) == (20_000, 2_000, 4_000, 8_000)
    assert bf16["gossip_buffers"] == 2 * 4 * blk and bf16["cpu_offload"] == 0
    fp32 = deca_state_bytes(psi, blk, "fp32", "offload", trainable_params=9_000, degree=2)
    assert fp32["model_states"] == 4 * psi + 12 * blk and fp32["master"] == 0  # fp32 weights are the master
    assert fp32["cpu_offload"] == (9_000 - blk) * 8
    off = deca_state_bytes(psi, blk, "bf16", "offload", trainable_params=9_000)
    assert off["cpu_offload"] == 8_000 * (4 + 8)
    q = deca_state_bytes(psi, blk, "bf16", "offload", "int8", trainable_params=9_000)
    assert q["cpu_offload"] == int(8_000 * (4 + 2 * (1 + 4 / 256)))  # an fp32 absmax per 256 values
    # The receive buffer is bounded by the chunk, whatever the block size.
    big = deca_state_bytes(10**9, 10**8, "bf16", degree=3, gossip_chunk_bytes=64 * MIB)
    assert big["gossip_buffers"] == 3 * 64 * MIB


def test_activation_bytes_hand_figures():
    shape = ModelShape(params=0, trainable_params=0, num_blocks=4, largest_block_params=0, largest_module_params=0,
                       num_layers=4, hidden_size=8, intermediate_size=16, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=100)
    tokens = 3 * 5
    per_layer = tokens * (6 * 8 + 2 * 4 + 4 * 16) * 2  # = 15 * 120 * 2
    logits = tokens * 100 * (2 + 8)
    assert activation_bytes(shape, 5, 3, 2) == 4 * per_layer + logits == 3600 * 4 + 15_000
    assert activation_bytes(shape, 5, 3, 2, checkpointing=True) == 4 * tokens * 8 * 2 + per_layer + logits


def test_ring_degree():
    assert [ring_degree(n) for n in (1, 2, 3, 8)] == [0, 1, 2, 2]
    assert ring_degree(8, "complete") == 7 and ring_degree(8, "exponential") == 3
    with pytest.raises(ValueError, match="--max-degree"):
        ring_degree(8, "erdos_renyi")


def test_cli_plan_json_and_write(tmp_path, capsys):
    model = os.path.join(MODELS, "qwen2-1.5b")
    rc = cli_main(["plan", "--model", model, "--gpu-memory", "24GiB", "--seq-len", "1024", "--json",
                   "--write", str(tmp_path)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    psi, blk = 1_543_714_304, out["largest_block_params"]
    assert out["params"] == psi and out["num_blocks"] == 28 + 2  # embeddings (tied head) + layers + final norm
    assert out["largest_block_name"] == "embeddings" and blk == 151_936 * 1536
    assert out["deca_model_state_bytes"] == 2 * psi + 14 * blk
    assert out["full_adam_model_state_bytes"] == 20 * psi
    assert out["fits"] is True and out["full_adam_fits"] is True  # 1.5B fits 24 GiB only with ZeRO-3 offload
    assert out["deca_total_bytes"] == (out["deca_model_state_bytes"] + out["gossip_buffer_bytes"]
                                       + out["activation_bytes"] + GIB)
    from deca_ds.config import load_config

    cfg = load_config(str(tmp_path / "recipe.yaml"))
    assert cfg.method == "deca" and cfg.model.path.endswith("qwen2-1.5b") and cfg.optim.state_policy == "offload"
    assert cfg.blocks.include_embeddings and cfg.blocks.include_lm_head  # fits with every parameter trained
    ds = json.load(open(tmp_path / "ds_config.json"))
    assert ds["zero_optimization"]["stage"] == 0 and "bf16" not in ds  # BlockAdam owns the master (DESIGN §3)


def test_cli_plan_recommends_checkpointing_or_refuses(tmp_path, capsys):
    model = os.path.join(MODELS, "llama-3.1-8b")
    assert cli_main(["plan", "--model", model, "--gpu-memory", "24GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["recommended"]["activation_checkpointing"] is True
    assert out["recommended"]["total_gpu_bytes"] <= 24 * GIB < out["recommended"]["unfrozen_total_gpu_bytes"]
    assert cli_main(["plan", "--model", model, "--gpu-memory", "8GiB", "--write", str(tmp_path)]) == 2
    assert "nothing fits" in capsys.readouterr().err
    assert not (tmp_path / "recipe.yaml").exists()


@pytest.mark.parametrize("extra, words", [
    (["--clients", "0"], "--clients 0 is out of range"),
    (["--seq-len", "0"], "--seq-len 0 is out of range"),
    (["--micro-batch", "0"], "--micro-batch 0 is out of range"),
    (["--ranks-per-client", "0"], "--ranks-per-client 0 is out of range"),
    (["--max-degree", "8"], "--max-degree 8 is out of range for 8 clients: use 0 to 7"),
    (["--topology", "rnig", "--max-degree", "2"], "--topology 'rnig' is not known"),
    (["--gossip-chunk-mb", "nan"], "--gossip-chunk-mb nan is out of range"),
    (["--gossip-chunk-mb", "0"], "--gossip-chunk-mb 0.0 is out of range"),
    (["--gpu-memory", "0GiB"], "--gpu-memory '0GiB' is out of range"),
    (["--gpu-memory", "lots"], "--gpu-memory 'lots' is not a memory size"),
    (["--overhead", "1XB"], "--overhead '1XB' is not a memory size"),
    (["--layers-per-block", "0"], "--layers-per-block 0 is out of range: use an integer >= 1"),
])
def test_cli_plan_refuses_bad_arguments_in_one_line_and_writes_nothing(tmp_path, capsys, extra, words):
    """Once: --clients 0 wrote a recipe for 0 GPUs, --seq-len 0 blamed a planner bug, a NaN chunk size crashed."""
    model = os.path.join(MODELS, "llama-3.1-8b")
    assert cli_main(["plan", "--model", model, "--gpu-memory", "80GiB", "--write", str(tmp_path)] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err
    assert not os.listdir(tmp_path)


def test_cli_plan_write_keeps_existing_files_unless_forced(tmp_path, capsys):
    """A second ``plan --write DIR`` once overwrote a recipe the user had edited; now it refuses in one line and
    leaves both files as they were, and ``--force`` replaces them."""
    model = os.path.join(MODELS, "llama-3.1-8b")
    args = ["plan", "--model", model, "--gpu-memory", "80GiB", "--write", str(tmp_path)]
    assert cli_main(args) == 0
    (tmp_path / "recipe.yaml").write_text("# my edits\n")
    kept = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "already exist(s)" in err and "--force" in err and "\n" not in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == kept
    assert cli_main(args + ["--force"]) == 0
    assert (tmp_path / "recipe.yaml").read_text() != "# my edits\n"


def synthetic_shape(blocks):
    lpb = blocks.layers_per_block
    emb = 2 * 10**8 if blocks.include_embeddings else 0  # a block bigger than 6 layers
    layer_tensor = 10**7  # each layer: three tensors of 10M parameters
    profiles = ([("embeddings", emb, emb, -(-emb // 256))] if emb else []) + [
        (f"layers.{i}", 3 * layer_tensor * lpb, layer_tensor, 3 * lpb * -(-layer_tensor // 256))
        for i in range(0, 32, lpb)]
    return ModelShape(params=10**9, trainable_params=10**9 - 2 * 10**8 + emb, num_blocks=32 // lpb + bool(emb),
                      largest_block_params=max(3 * 10**7 * lpb, emb), largest_module_params=10**8, num_layers=32,
                      hidden_size=2048, intermediate_size=8192, num_attention_heads=16, num_key_value_heads=16,
                      vocab_size=32000, layers_per_block=lpb, include_embeddings=blocks.include_embeddings,
                      largest_block_name="embeddings" if emb else "layers.0",
                      largest_tensor_params=max(emb, layer_tensor), block_profiles=profiles,
                      largest_block_scale_blocks=max(p[3] for p in profiles))


# The structural search (checkpointing, layers per block, freezing) with the memory settings kept off.
STRUCTURAL = dict(fused_backward=False, moment_dtype="fp32")


def test_make_plan_search_order():
    req = PlanRequest(gpu_memory=parse_bytes("4.5GiB"), seq_len=2048, layers_per_block=4, overhead=0,
                      include_embeddings=False, **STRUCTURAL)
    plan = planner.make_plan(synthetic_shape, req)
    rec = plan.recommended
    # Checkpointing alone is not enough at 4 layers per block; the planner falls back to fewer layers per block.
    total_4 = planner._evaluate(synthetic_shape(req.blocks()),
                                dataclasses.replace(req, activation_checkpointing=True))[2]
    assert total_4 > req.gpu_memory
    assert rec["layers_per_block"] == 3 and rec["activation_checkpointing"] and rec["total_gpu_bytes"] <= req.gpu_memory
    assert plan.recommended_request.blocks().layers_per_block == 3


def test_make_plan_freezes_embeddings_last_and_only_when_left_to_defaults():
    base = dict(gpu_memory=parse_bytes("4.5GiB"), seq_len=2048, layers_per_block=2, overhead=0, **STRUCTURAL)
    plan = planner.make_plan(synthetic_shape, PlanRequest(**base))  # embeddings: the recipe default (trained)
    rec = plan.recommended
    assert plan.shape.include_embeddings and plan.shape.largest_block_name == "embeddings"
    # Every other relaxation was tried first (layers per block down to 1), then the embeddings were frozen.
    assert rec["layers_per_block"] == 1 and rec["include_embeddings"] is False
    assert rec["unfrozen_total_gpu_bytes"] > base["gpu_memory"] >= rec["total_gpu_bytes"]
    # Asked for explicitly, they are never frozen: nothing fits.
    assert planner.make_plan(synthetic_shape, PlanRequest(**base, include_embeddings=True)).recommended == {}


@pytest.mark.parametrize("gpu,trains_embeddings", [("24GiB", False), ("80GiB", True)])
def test_plan_covers_exactly_the_blocks_of_the_written_recipe(tmp_path, capsys, gpu, trains_embeddings):
    """Llama-3.1-8B: the plan's blocks are those partition_blocks gives for the recipe that --write writes."""
    model_dir = os.path.join(MODELS, "llama-3.1-8b")
    assert cli_main(["plan", "--model", model_dir, "--gpu-memory", gpu, "--seq-len", "2048", "--json",
                     "--write", str(tmp_path)]) == 0
    rec = json.loads(capsys.readouterr().out)["recommended"]
    cfg = load_config(str(tmp_path / "recipe.yaml"))
    meta = planner.build_meta_model(cfg.model.path)
    part = partition_blocks(meta, layers_per_block=cfg.blocks.layers_per_block,
                            include_embeddings=cfg.blocks.include_embeddings,
                            include_lm_head=cfg.blocks.include_lm_head, prefixes=cfg.blocks.prefixes)
    sizes = part.block_sizes(meta)
    largest = max(range(len(sizes)), key=sizes.__getitem__)
    assert (rec["num_blocks"], rec["largest_block_params"], rec["trainable_params"]) == (len(part), max(sizes),
                                                                                         sum(sizes))
    assert rec["largest_block_name"] == part[largest].name
    h, v = meta.config.hidden_size, meta.config.vocab_size
    if trains_embeddings:  # the 128k-token vocabulary: the head (+ final norm) is the largest block, not a layer
        assert cfg.blocks.include_embeddings and cfg.blocks.include_lm_head
        assert max(sizes) == v * h + h and sum(sizes) == 8_030_261_248
    else:  # on 24 GiB they do not fit as blocks: the written recipe freezes both, and the plan says so
        assert not cfg.blocks.include_embeddings and not cfg.blocks.include_lm_head
        assert max(sizes) == _llama_layer_params(4096, 14336, 32, 8) and sum(sizes) == 8_030_261_248 - 2 * v * h - h
    # The total, recomputed from that partition: 2Ψ + 14L model states (bf16), ring of 8 (2 neighbours) receive
    # buffers bounded by 64 MiB, activations of the written settings, 1 GiB overhead.
    psi, big = sum(p.numel() for p in meta.parameters()), max(sizes)
    act = activation_bytes(planner.inspect_model(meta, cfg.blocks), 2048, 1, 2,
                           checkpointing=cfg.model.gradient_checkpointing)
    assert rec["total_gpu_bytes"] == 2 * psi + 14 * big + 2 * min(4 * big, 64 * MIB) + act + GIB <= parse_bytes(gpu)
    # DECA settings and schedule are the project's defaults, not the planner's.
    assert dataclasses.asdict(cfg.deca) == dataclasses.asdict(DecaConfig()) and cfg.method == RunConfig().method
    assert cfg.blocks.switch_every == BlocksConfig().switch_every and cfg.blocks.order == BlocksConfig().order
    assert cfg.max_steps == planner.ROUNDS * len(part) * cfg.blocks.switch_every


def test_written_recipe_follows_changed_defaults(monkeypatch):
    @dataclasses.dataclass
    class OtherDeca(DecaConfig):
        signal: str = "qgm"
        betas: list = dataclasses.field(default_factory=lambda: [0.5, 0.75])

    @dataclasses.dataclass
    class OtherBlocks(BlocksConfig):
        switch_every: int = 48

    monkeypatch.setattr(planner, "DecaConfig", OtherDeca)
    monkeypatch.setattr(planner, "BlocksConfig", OtherBlocks)
    plan = planner.make_plan(synthetic_shape, PlanRequest(gpu_memory=80 * GIB, include_embeddings=False))
    recipe = planner.recommended_recipe(plan, "/m", "/ds.json")
    assert recipe["deca"] == {"signal": "qgm", "betas": [0.5, 0.75]}
    assert recipe["blocks"]["switch_every"] == 48 and recipe["max_steps"] == planner.ROUNDS * 32 * 48


# ---------------------------------------------------------------------------------------------------------------
# optim.fused_backward and optim.moment_dtype=int8.


def _quant_blocks(sizes, per=256):
    return sum(-(-n // per) for n in sizes)  # each tensor quantized on its own, an absmax per 256 values


def test_int8_figures_are_the_quantized_storage():
    """The planner's 8-bit bytes (1 per value + 4 per 256-value block) are what deca_ds's quantizer stores."""
    pytest.importorskip("bitsandbytes")
    from deca_ds.optim.state_store import quantize

    for n in (1, 256, 257, 5000):
        q = quantize(torch.randn(n), sqrt=False)
        assert sum(t.numel() * t.element_size() for t in q.tensors()) == n + 4 * _quant_blocks([n])
    psi, blk, tensor, blocks = 10_000, 1_000, 400, 5
    q = deca_state_bytes(psi, blk, "bf16", "reset", fused_backward=True, moment_dtype="int8",
                         largest_tensor_params=tensor, moment_scale_blocks=blocks)
    assert (q["weights"], q["grads"], q["master"]) == (2 * psi, 2 * tensor, 4 * blk)
    assert q["moments"] == 2 * blk + 2 * 4 * blocks and q["moment_scales"] == 40
    assert q["model_states"] == 2 * psi + 2 * tensor + 6 * blk + 40 and q["moment_scratch"] == 8 * tensor
    fused = deca_state_bytes(psi, blk, "fp32", fused_backward=True, largest_tensor_params=tensor)
    assert fused["model_states"] == 4 * psi + 4 * tensor + 8 * blk and fused["moment_scratch"] == 0
    # 8-bit active moments are offloaded as they are (1 byte + scales), whatever offload_dtype says.
    off = deca_state_bytes(psi, blk, "bf16", "offload", "fp32", trainable_params=9_000, moment_dtype="int8",
                           moment_scale_blocks=blocks)
    assert off["cpu_offload"] == int(8_000 * (4 + 2 * (1 + 4 / 256)))
    with pytest.raises(ValueError, match="moment_scale_blocks"):
        deca_state_bytes(psi, blk, moment_dtype="int8")


# The benchmark's model (tests/unit/test_benchmark.py): 4 layers, 2 per block, untied embedding and head.
BENCH_SHAPE = {"hidden": 32, "intermediate": 64, "layers": 4, "heads": 4, "kv_heads": 2, "vocab": 128}


@pytest.mark.parametrize("method,dtype", [("deca", "fp32"), ("deca", "bf16"), ("deca_fused", "fp32"),
                                          ("deca_fused", "bf16"), ("deca_fused_int8", "fp32"),
                                          ("deca_fused_int8", "bf16")])
def test_model_states_equal_the_tensors_the_benchmark_worker_counts(method, dtype):
    """Planner bytes by category == the worker's bytes counted from the tensors BlockAdam holds (exactly).

    Not modelled and not counted by the worker either: 0-d step counters, and the step's other temporaries (the
    fp32 copy of a bf16 gradient, the denominators), which are at most one tensor's and covered by ``--overhead``.
    """
    if method == "deca_fused_int8":
        pytest.importorskip("bitsandbytes")
    from deca_ds.bench.worker import build_model, measure

    spec = {"device": "cpu", "dtype": dtype, "model": None, "shape": BENCH_SHAPE, "seed": 0, "micro_batch": 2,
            "seq_len": 8, "steps": 2, "warmup": 1, "lr": 1e-3, "threads": 1, "offload_dtype": "fp32",
            "gradient_checkpointing": False, "layers_per_block": 2, "state_policy": "reset", "switch_every": 1,
            "method": method}
    r = measure(spec)
    shape = inspect_model(build_model(spec), BlocksConfig(layers_per_block=2, **LAYERS_ONLY))
    # The shape's int8 terms against the layer's tensors by hand: q, k, v, o, gate, up, down, two norms.
    h, f, kv_dim = 32, 64, 2 * (32 // 4)
    layer = [h * h, kv_dim * h, kv_dim * h, h * h, h * f, h * f, h * f, h, h]
    assert shape.largest_tensor_params == h * f and shape.largest_block_scale_blocks == 2 * _quant_blocks(layer)
    assert shape.largest_block_params == r["largest_block_params"] == 2 * sum(layer)
    req = PlanRequest(gpu_memory=GIB, dtype=dtype, state_policy="reset", fused_backward=method != "deca",
                      moment_dtype="int8" if method == "deca_fused_int8" else "fp32")
    d = planner._evaluate(shape, req)[0]
    assert d["weights"] == r["weight_bytes"] and d["grads"] == r["grad_bytes"]
    assert d["master"] + d["moments"] == r["optimizer_state_bytes"]
    assert d["model_states"] == r["model_state_bytes"]
    assert d["moment_scratch"] == r.get("moment_scratch_bytes", 0)


LLAMA2 = os.path.join(MODELS, "llama-2-7b")


def _llama2_layer_totals(seq_len=512):
    """GPU totals of Llama-2-7B trained as 32 one-layer blocks (embeddings and head frozen), bf16, by hand:
    Ψ, L, T (gate/up/down 4096 x 11008) and S (quantization blocks of a layer), ring of 8, 1 GiB overhead."""
    psi, h, f = 6_738_415_616, 4096, 11008
    layer = [h * h] * 4 + [h * f] * 3 + [h, h]  # q, k, v, o (32 kv heads), gate, up, down, two norms
    big, tensor, s = sum(layer), h * f, _quant_blocks(layer)
    meta = planner.build_meta_model(LLAMA2)
    act = activation_bytes(inspect_model(meta, BlocksConfig(**LAYERS_ONLY)), seq_len, 1, 2)
    rest = 2 * min(4 * big, 64 * MIB) + act + GIB
    return {"none": 2 * psi + 2 * big + 4 * big + 8 * big + rest,
            "fused": 2 * psi + 2 * tensor + 4 * big + 8 * big + rest,
            "int8": 2 * psi + 2 * big + 4 * big + 2 * big + 8 * s + 8 * tensor + rest,
            "both": 2 * psi + 2 * tensor + 4 * big + 2 * big + 8 * s + 8 * tensor + rest}


def test_only_fused_and_int8_make_it_fit_and_the_written_configs_run(tmp_path, capsys):
    from deca_ds.ds_config import check_ds_config

    totals = _llama2_layer_totals()
    assert totals["both"] < min(totals["fused"], totals["int8"]) < totals["none"]
    gpu = (totals["both"] + min(totals["fused"], totals["int8"])) // 2  # only both together fit
    args = ["plan", "--model", LLAMA2, "--gpu-memory", str(gpu), "--seq-len", "512", "--no-include-embeddings",
            "--no-include-lm-head"]
    assert cli_main(args + ["--json", "--write", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    rec = out["recommended"]
    assert out["fits"] is False and out["deca_total_bytes"] == totals["none"]
    # Tried before checkpointing: the cheapest settings that fit are the two memory settings.
    assert rec["fused_backward"] is True and rec["moment_dtype"] == "int8" and not rec["activation_checkpointing"]
    assert rec["total_gpu_bytes"] == totals["both"] and rec["layers_per_block"] == 1
    assert rec["fused_backward_saves_bytes"] == totals["int8"] - totals["both"]
    assert rec["moment_dtype_int8_saves_bytes"] == totals["fused"] - totals["both"]
    cfg = load_config(str(tmp_path / "recipe.yaml"))
    ds = json.load(open(tmp_path / "ds_config.json"))
    assert cfg.optim.fused_backward and cfg.optim.moment_dtype == "int8" and cfg.nan_policy != "skip"
    assert ds["gradient_clipping"] == 0 and ds["gradient_accumulation_steps"] == 1 and rec["gradient_clipping"] == 0
    check_ds_config(ds, cfg, world_size=8)  # what the launcher checks before anything starts
    # The plan says so in its text.
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert "optim.fused_backward=true, optim.moment_dtype=int8" in text
    assert "fused step:" in text and "gradient_clipping 0" in text and "int8 moments:" in text
    # One of them alone fits a little more memory; the search then stops there (fused first: it costs no time).
    assert cli_main(args[:4] + [str(totals["fused"])] + args[5:] + ["--json"]) == 0
    rec = json.loads(capsys.readouterr().out)["recommended"]
    assert rec["fused_backward"] is True and rec["moment_dtype"] == "fp32"
    assert rec["total_gpu_bytes"] == totals["fused"] and rec["gradient_clipping"] == 0


@pytest.mark.parametrize("extra,closed", [
    (["--ranks-per-client", "2"], ("fused_backward", "moment_dtype")),  # written with ZeRO-2: both refused there
    (["--no-fused-backward"], ("fused_backward",)),  # closed by the user
    (["--moment-dtype", "fp32"], ("moment_dtype",)),
])
def test_refused_or_closed_settings_are_never_recommended(tmp_path, capsys, extra, closed):
    """The memory where only both settings together fit without checkpointing: with either unavailable, the plan
    turns on checkpointing instead (then it needs neither), and what it writes runs."""
    from deca_ds.ds_config import check_ds_config

    totals = _llama2_layer_totals()
    gpu = (totals["both"] + min(totals["fused"], totals["int8"])) // 2
    assert cli_main(["plan", "--model", LLAMA2, "--gpu-memory", str(gpu), "--seq-len", "512", "--json",
                     "--no-include-embeddings", "--no-include-lm-head", "--write", str(tmp_path)] + extra) == 0
    rec = json.loads(capsys.readouterr().out)["recommended"]
    assert rec["activation_checkpointing"]  # what fits instead
    cfg = load_config(str(tmp_path / "recipe.yaml"))
    ds = json.load(open(tmp_path / "ds_config.json"))
    if "fused_backward" in closed:
        assert rec["fused_backward"] is False and cfg.optim.fused_backward is False and ds["gradient_clipping"] == 1
    if "moment_dtype" in closed:
        assert rec["moment_dtype"] == cfg.optim.moment_dtype == "fp32"
    check_ds_config(ds, cfg, world_size=8 * cfg.clients.ranks_per_client)


def test_asking_for_a_refused_setting_fails_with_the_fix(tmp_path, capsys):
    base = ["plan", "--model", LLAMA2, "--ranks-per-client", "2", "--write", str(tmp_path)]
    assert cli_main(base + ["--fused-backward"]) == 2
    err = capsys.readouterr().err
    assert "--fused-backward" in err and "ranks_per_client=1" in err and "drop --fused-backward" in err
    assert cli_main(base + ["--moment-dtype", "int8"]) == 2
    assert "--moment-dtype fp32" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_memory_settings_that_save_nothing_are_not_recommended(capsys):
    """Llama-3.1-8B: with the 525M-parameter embedding (one tensor) and head as blocks, the fused step saves
    nothing there (8 KiB: the head block's final norm) and 8-bit moments cost more than they save (8 bytes of fp32
    scratch per value of that one tensor against 6 saved): neither makes every parameter fit 24 GiB; freezing does."""
    model = os.path.join(MODELS, "llama-3.1-8b")
    assert cli_main(["plan", "--model", model, "--gpu-memory", "24GiB", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)["recommended"]
    assert not rec["include_embeddings"] and not rec["include_lm_head"]
    assert rec["fused_backward"] is False and rec["moment_dtype"] == "fp32"  # frozen, it fits without them
    meta = planner.build_meta_model(model)
    shape = inspect_model(meta, BlocksConfig())
    req = PlanRequest(gpu_memory=24 * GIB, activation_checkpointing=True)
    fp32_total = planner._evaluate(shape, req)[2]
    int8 = planner._evaluate(shape, dataclasses.replace(req, moment_dtype="int8"))
    v, h = meta.config.vocab_size, meta.config.hidden_size
    assert int8[0]["block"] in ("embeddings", "lm_head") and int8[0]["moment_scratch"] == 8 * v * h
    assert int8[2] > fp32_total


def test_search_tries_the_memory_settings_before_checkpointing():
    req = PlanRequest(gpu_memory=80 * GIB, seq_len=2048, layers_per_block=2, include_embeddings=False, overhead=0)
    shape = synthetic_shape(req.blocks())
    t = {k: planner._evaluate(shape, dataclasses.replace(req, **kw))[2] for k, kw in
         [("none", {}), ("fused", {"fused_backward": True}), ("both", {"fused_backward": True, "moment_dtype": "int8"}),
          ("ckpt", {"activation_checkpointing": True})]}
    assert t["both"] < t["fused"] < t["none"] and t["ckpt"] < t["both"]  # checkpointing saves most, costs most
    plan = planner.make_plan(synthetic_shape, dataclasses.replace(req, gpu_memory=t["both"]))
    rec = plan.recommended
    assert rec["fused_backward"] and rec["moment_dtype"] == "int8" and not rec["activation_checkpointing"]
    plan = planner.make_plan(synthetic_shape, dataclasses.replace(req, gpu_memory=t["both"] - 1))
    assert plan.recommended["activation_checkpointing"]
    # With checkpointing on, the memory settings are turned on only where it alone does not fit.
    assert not plan.recommended["fused_backward"] and plan.recommended["moment_dtype"] == "fp32"


def test_refused_settings_are_not_recommended_even_when_nothing_else_fits():
    req = PlanRequest(gpu_memory=GIB, seq_len=2048, layers_per_block=1, include_embeddings=False, overhead=0,
                      activation_checkpointing=True)
    shape = synthetic_shape(req.blocks())
    gpu = planner._evaluate(shape, dataclasses.replace(req, fused_backward=True, moment_dtype="int8"))[2]
    rec = planner.make_plan(synthetic_shape, dataclasses.replace(req, gpu_memory=gpu)).recommended
    assert rec["fused_backward"] and rec["moment_dtype"] == "int8" and rec["total_gpu_bytes"] == gpu
    # A client of two ranks is written with ZeRO-2, which refuses both: nothing fits rather than a refused recipe.
    two_ranks = planner.make_plan(synthetic_shape, dataclasses.replace(req, gpu_memory=gpu, ranks_per_client=2))
    assert two_ranks.recommended == {} and two_ranks.recommended_request is None
    with pytest.raises(ValueError, match="nothing fits"):
        planner.write_plan(two_ranks, "/m", "/x")


@pytest.mark.parametrize("extra", [
    ["--clients", "4"],
    ["--seq-len", "512", "--micro-batch", "2", "--clients", "4", "--ranks-per-client", "2", "--no-include-lm-head",
     "--activation-checkpointing", "--gossip-chunk-mb", "32", "--overhead", "2GiB", "--topology", "complete"],
])
def test_cli_plan_recipe_header_repeats_the_command_that_wrote_it(tmp_path, capsys, extra):
    """The recipe's "# Written by:" line gave only --model, --gpu-memory and --seq-len: a plan made with
    ``--clients 4`` said it was written by a command that plans 8 clients (other settings were lost as well)."""
    import shlex

    model = os.path.join(MODELS, "qwen2-1.5b")
    first, second = tmp_path / "a", tmp_path / "b"
    assert cli_main(["plan", "--model", model, "--gpu-memory", "40GiB", *extra, "--write", str(first)]) == 0
    header = (first / "recipe.yaml").read_text().splitlines()[0]
    assert header.startswith("# Written by: deca-ds plan ")
    argv = shlex.split(header[len("# Written by: deca-ds "):])
    assert argv[-2:] == ["--write", str(first)]
    assert cli_main(argv[:-1] + [str(second)]) == 0  # the written command, into another directory
    capsys.readouterr()
    for name in ("recipe.yaml", "ds_config.json"):
        a, b = ((d / name).read_text().replace(str(d), "DIR") for d in (first, second))
        assert a == b, name


@pytest.mark.parametrize("where, words", [("file", "is a file, not a directory"),
                                          ("file/sub", "cannot create the directory")])
def test_cli_plan_write_into_a_file_is_one_line(tmp_path, capsys, where, words):
    """``--write`` naming a file (or a path below one) was a FileExistsError / NotADirectoryError traceback."""
    (tmp_path / "file").write_text("mine\n")
    model = os.path.join(MODELS, "llama-3.1-8b")
    assert cli_main(["plan", "--model", model, "--gpu-memory", "80GiB", "--write", str(tmp_path / where)]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "nothing was written" in err and "\n" not in err
    assert (tmp_path / "file").read_text() == "mine\n"
