"""Unit tests of the single-process simulator: W=I is independent training, mixing is W @ X, runs are deterministic."""

import copy
import gc
import json
import math

import numpy as np
import pytest
import torch

from deca_ds.config import ConfigError, load_config
from deca_ds.simulate import HEADER_BYTES, Simulation, mix_rows, run_simulation

SMALL = ["num_clients=3", "data.num_examples=240", "data.eval_examples=2", "data.min_partition_size=4",
         "blocks.switch_every=8", "optim.lr=1e-2", "max_steps=3"]


def _cfg(*extra, tmp_path=None):
    out = [f"output_dir={tmp_path / 'run'}"] if tmp_path is not None else []
    return load_config(None, SMALL + out + list(extra))


class _IdentityGraph:
    """W = I (no real Topology accepts it: it is not connected)."""

    def __init__(self, n):
        self.n = n

    def weights_at(self, step):
        return np.eye(self.n)

    def neighbors(self, i, step=0):
        return []


def _identity(sim: Simulation) -> None:
    sim.topology = _IdentityGraph(sim.num_clients)


def test_mix_rows_is_w_at_x_and_bf16_wire_rounds_neighbours_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, generator=g)
    w = np.array([[0.5, 0.25, 0.0, 0.25], [0.25, 0.5, 0.25, 0.0], [0.0, 0.25, 0.5, 0.25], [0.25, 0.0, 0.25, 0.5]])
    ref = (w @ x.double().numpy().reshape(4, -1)).reshape(x.shape)
    got = mix_rows(x, w)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(x, x.clone())  # input not modified
    got16 = mix_rows(x, w, torch.bfloat16)
    rounded = x.to(torch.bfloat16).double().numpy().reshape(4, -1)
    own = x.double().numpy().reshape(4, -1)
    ref16 = (w - np.diag(np.diag(w))) @ rounded + np.diag(w)[:, None] * own
    np.testing.assert_allclose(got16.numpy().reshape(4, -1), ref16, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got16, got, rtol=0, atol=1e-7)


@pytest.mark.parametrize("method", ["badam_gossip", "local"])
def test_identity_mixing_equals_independent_adamw_per_client(method):
    """W = I (or no gossip): each client is plain AdamW on the active block with DeepSpeed's clipping."""
    cfg = _cfg(f"method={method}")
    sim = Simulation(cfg)
    if sim.topology is not None:
        _identity(sim)
    # Independent reference: torch.optim.AdamW on block 0 of fresh copies of the initial model.
    block0 = sim.optimizers[0].active_block.param_names
    refs = [copy.deepcopy(m) for m in sim.models]
    opts = [torch.optim.AdamW([dict(r.named_parameters())[n] for n in block0], lr=cfg.optim.lr,
                              betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=0.0) for r in refs]
    losses = []
    for _ in range(cfg.max_steps):
        losses.append(sim.step().losses)
    for c, (r, opt) in enumerate(zip(refs, opts)):
        for p in r.parameters():
            p.requires_grad_(False)
        for n in block0:
            dict(r.named_parameters())[n].requires_grad_(True)
        for step in range(cfg.max_steps):
            (mb,) = sim._batches(c, step)
            loss = r(**mb).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in r.parameters() if p.grad is not None], sim.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            assert loss.item() == pytest.approx(losses[step][c], rel=1e-5)
        for (name, p), q in zip(r.named_parameters(), sim.models[c].parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    # the clients really differ (own data), so the check above is per client
    assert losses[-1][0] != losses[-1][1]


def test_one_gossip_step_is_w_at_x_half_and_bytes_match_the_mixer():
    cfg = _cfg("method=badam_gossip", "topology.name=ring", "max_steps=1")
    mixed, local = Simulation(cfg), Simulation(cfg)
    _identity(local)  # after one step, `local` holds every client's x_half
    mixed.step()
    local.step()
    w = mixed.topology.weights_at(0)
    names = mixed.optimizers[0].active_block.param_names
    for i, name in enumerate(names):
        halves = torch.stack([local.active_tensors(c)[i] for c in range(3)]).double().numpy().reshape(3, -1)
        want = w @ halves
        got = torch.stack([mixed.active_tensors(c)[i] for c in range(3)]).double().numpy().reshape(3, -1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    numel = sum(t.numel() for t in mixed.active_tensors(0))
    assert mixed.bytes_sent == [(numel * 4 + HEADER_BYTES) * 2] * 3  # ring of 3: two neighbours each
    assert local.bytes_sent == [0] * 3


def test_deterministic_under_seed_and_seed_changes_the_run():
    a = Simulation(_cfg("method=deca", "topology.name=ring"))
    b = Simulation(_cfg("method=deca", "topology.name=ring"))
    c = Simulation(_cfg("method=deca", "topology.name=ring", "seed=1", "data.seed=7"))
    la = [a.step().losses for _ in range(2)]
    lb = [b.step().losses for _ in range(2)]
    lc = [c.step().losses for _ in range(2)]
    assert la == lb
    assert la != lc
    for x, y in zip(a.models[2].parameters(), b.models[2].parameters()):
        assert torch.equal(x, y)


def test_run_simulation_writes_trainer_records_and_refuses_an_existing_run(tmp_path):
    cfg = _cfg("method=deca", "max_steps=2", "num_clients=2", tmp_path=tmp_path)
    summary = run_simulation(cfg, save_models=False, quiet=True)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["client"]) for r in recs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {"step", "client", "loss", "block", "lr", "consensus_distance", "bytes_sent"} <= set(recs[0])
    assert summary["num_clients"] == 2 and summary["steps"] == 2
    assert [c["final_loss"] for c in summary["clients"]] == [recs[2]["loss"], recs[3]["loss"]]
    assert summary["clients"][0]["bytes_sent"] == recs[0]["bytes_sent"] + recs[2]["bytes_sent"] > 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
    with pytest.raises(ConfigError, match="already holds a run"):
        run_simulation(cfg, save_models=False, quiet=True)


def test_run_simulation_frees_its_simulation_on_return(tmp_path, monkeypatch):
    """A Simulation sits in reference cycles: once, its replicas stayed allocated after run_simulation returned until
    Python's oldest generation was collected (a sweep runs many in one process; on a GPU their memory piled up).
    With automatic collection off, nothing of the run may be alive when it returns."""
    import weakref

    from deca_ds import simulate

    seen = []
    real = simulate.make_simulation

    def spy(cfg):
        sim = real(cfg)
        seen.append(weakref.ref(sim))
        return sim

    monkeypatch.setattr(simulate, "make_simulation", spy)
    cfg = _cfg("method=deca", "max_steps=2", "num_clients=2", tmp_path=tmp_path)
    gc.collect()
    gc.disable()
    try:
        run_simulation(cfg, save_models=False, quiet=True)
        assert len(seen) == 1 and seen[0]() is None
    finally:
        gc.enable()


def test_centralized_averages_every_clients_gradient():
    """One shared model; its step uses the mean of the clients' gradients (DeepSpeed's data-parallel average)."""
    cfg = _cfg("method=centralized", "max_steps=1", "num_clients=2", "optim.lr=1e-3")
    sim = Simulation(cfg)
    ref = copy.deepcopy(sim.models[0])
    names = sim.optimizers[0].active_block.param_names
    params = [dict(ref.named_parameters())[n] for n in names]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=0.0)
    grads = []
    for c in range(2):
        (mb,) = sim._batches(c, 0)
        grads.append(torch.autograd.grad(ref(**mb).loss, params))
    for p, g0, g1 in zip(params, *grads):
        p.grad = (g0 + g1) / 2
    torch.nn.utils.clip_grad_norm_(params, sim.clip)
    opt.step()
    sim.step()
    assert len(sim.models) == 1
    for n, p in zip(names, params):
        torch.testing.assert_close(dict(sim.models[0].named_parameters())[n], p, rtol=1e-5, atol=1e-6)


def test_simulate_needs_num_clients():
    with pytest.raises(ConfigError, match="num_clients"):
        Simulation(load_config(None, ["max_steps=1"]))


@pytest.mark.parametrize("stacked", ["true", "false"])
@pytest.mark.parametrize("extra, words", [
    (["blocks.order=fixed", "blocks.fixed_order=[0, 9]"], "blocks.fixed_order=[0, 9] names block(s) [9]"),
    (["blocks.prefixes=[nothing.here]"], "blocks.prefixes"),
    (["data.max_length=100000"], "data.max_length=100000 exceeds"),
])
def test_block_and_length_settings_are_refused_before_anything_is_written(tmp_path, stacked, extra, words):
    """The simulator checks blocks against the model as the launcher's preflight does (once a traceback)."""
    cfg = _cfg(f"simulate.stacked={stacked}", *extra, tmp_path=tmp_path)
    with pytest.raises(ConfigError) as e:
        run_simulation(cfg, save_models=False, quiet=True)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def _sweep_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "recipes" / "sweep.py"
    spec = importlib.util.spec_from_file_location("deca_sweep", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, path.parent / "configs" / "sweeps"


def test_every_sweep_grid_expands_to_valid_run_configs_and_starts_with_its_command():
    import yaml

    sweep, folder = _sweep_module()
    grids = sorted(folder.glob("sweep_*.yaml"))
    assert grids
    for path in grids:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# python recipes/sweep.py run ") and path.name in first
        runs = sweep.expand_grid(yaml.safe_load(path.read_text()))
        assert len({r["run_id"] for r in runs}) == len(runs) > 0
        for r in runs:
            cfg = load_config(None, sweep._overrides({**r["settings"], "backend": "simulate"}))
            assert cfg.num_clients and cfg.seed == cfg.data.seed == int(r["labels"].get("seed", cfg.seed))
            if cfg.method in ("local", "centralized"):
                assert all(not k.startswith("topology.") for k in r["settings"])


@pytest.mark.parametrize("text, words", [
    # Once every run of such a grid started and appended an error record (and the sweep exited 0), or a traceback.
    ("base: {max_steps: 2, optim.lrr: 0.01}\ngrid:\n  seed: [0, 1]\n",
     "run seed=0: unknown setting 'optim.lrr'; did you mean optim.lr?; nothing was run"),
    ("base: {max_steps: 2}\ngrid:\n  optim.lr: [0.01, -1]\n", "run optim.lr=-1: optim.lr=-1.0 is out of range"),
    ("base: [unclosed\n", "is not valid YAML"),
    ("grid:\n  seed: 3\n", "grid axis 'seed' must be a list of values or a mapping"),
    ("- 1\n- 2\n", "must hold a mapping (base: settings, grid: axes)"),
    ("base: 3\n", "base must be a mapping"),
    (None, "does not exist"),
])
def test_sweep_run_refuses_a_bad_grid_before_any_run(tmp_path, capsys, text, words):
    sweep, _ = _sweep_module()
    grid = tmp_path / "grid.yaml"
    if text is not None:
        grid.write_text(text)
    results = tmp_path / "results.jsonl"
    assert sweep.main(["run", str(grid), "--results", str(results), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sweep: error: ") and words in err and "\n" not in err
    assert not results.exists() or not results.read_text()
    assert not (tmp_path / "runs").exists()


def test_sweep_all_covers_every_published_grid_with_three_seeds():
    # `sweep.py all` is the one documented command that regenerates docs/results.md: every grid file except the
    # smoke grid must be in it, and the issue asks for at least 3 seeds per reported figure.
    import yaml

    sweep, folder = _sweep_module()
    published = {p.stem.removeprefix("sweep_") for p in folder.glob("sweep_*.yaml")} - {"smoke"}
    assert published == set(sweep.ALL_GRIDS)
    for g in sweep.ALL_GRIDS:
        runs = sweep.expand_grid(yaml.safe_load((folder / f"sweep_{g}.yaml").read_text()))
        cells: dict[str, set[str]] = {}
        for r in runs:
            key = "__".join(f"{a}={v}" for a, v in r["labels"].items() if a != "seed")
            cells.setdefault(key, set()).add(r["labels"]["seed"])
        assert all(len(seeds) >= 3 for seeds in cells.values()), (g, cells)


def test_sweep_summary_is_mean_and_sample_std_over_seeds(tmp_path):
    sweep, _ = _sweep_module()
    lines = []
    for seed, acc in ((0, 0.5), (1, 0.7)):
        lines.append(json.dumps({"run_id": f"m=a__seed={seed}", "labels": {"method": "a", "seed": str(seed)},
                                 "consensus_accuracy": acc, "loss_curve": [2.0, 1.0],
                                 "consensus_distance_curve": [0.1, 0.05], "bytes_sent_per_client": 2**20}))
    res = tmp_path / "r.jsonl"
    res.write_text("\n".join(lines) + "\n")
    md = sweep.summarize(str(res), str(tmp_path / "out")).read_text()
    assert "| a | 2 | - | - | - | 0.600 ± 0.141 |" in md  # mean 0.6, sample std 0.1414
    assert list((tmp_path / "out").glob("*.png"))


def test_consensus_distance_is_of_the_block_trained_this_step():
    """At a switching step the distance is measured on the block just trained (as the launcher does), not on the
    next, still untrained block that every client holds identically."""
    sim = Simulation(_cfg("method=local", "blocks.switch_every=1"))
    out = sim.step()
    assert out.block == 0 and sim.active_block() == 1  # the step switched blocks
    assert min(out.consensus_distance) > 0  # local clients trained block 0 on different data
    assert max(sim.consensus_distances(1)) < 1e-8  # block 1: still the shared initial weights (float mean only)


def test_simulate_device_setting_errors_name_the_setting():
    with pytest.raises(ConfigError, match=r"simulate.device='gpu0' is not a device"):
        Simulation(_cfg("method=local", "simulate.device=gpu0"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"simulate.device='cuda:0': this machine has no cuda device"):
            Simulation(_cfg("method=local", "simulate.device=cuda:0"))
    with pytest.raises(ConfigError, match="simulate.device='' is empty"):
        _cfg('simulate.device=""')
    with pytest.raises(ConfigError, match="simulate.device=None has the wrong type"):
        _cfg("simulate.device=")
    sim = Simulation(_cfg("method=local", "simulate.device=cpu"))
    assert sim.device == torch.device("cpu") and not sim.park


@pytest.mark.parametrize("method,extra", [("deca", ["optim.state_policy=offload"]), ("dadam", [])])
def test_parked_replicas_move_one_client_at_a_time_and_train_the_same(method, extra):
    """The swap-in/out protocol: each client's replica (and its optimizer state and snapshot) is on the device only
    for its own forward/backward/step, and the run is the resident run. On this CPU-only machine the device *is*
    the host, so this checks the protocol and the results; the actual copies are checked by the gpu test below."""
    common = ["topology.name=ring", f"method={method}", "blocks.switch_every=1", *extra]
    resident = Simulation(_cfg(*common))
    parked = Simulation(_cfg(*common, "simulate.park_replicas=true"))
    assert parked.park and not resident.park
    calls = []
    place = parked.place

    def spy(client, device):
        calls.append((client, str(device)))
        place(client, device)

    parked.place = spy
    for _ in range(3):
        assert parked.step().losses == resident.step().losses
    n = parked.num_clients
    # In, step, out, client after client: never two replicas on the device.
    assert calls == [(c, d) for _ in range(3) for c in range(n) for d in (str(parked.device), "cpu")]
    for a, b in zip(parked.models, resident.models):
        for x, y in zip(a.parameters(), b.parameters()):
            assert torch.equal(x, y)


@pytest.fixture
def deterministic_cuda(monkeypatch):
    """CUDA kernels that give the same bits on every call: torch's deterministic algorithms (an op without one
    raises instead of varying) and cuBLAS's fixed workspace, which torch requires for them."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.gpu
def test_parked_replicas_on_gpu_hold_one_replica(deterministic_cuda):
    """DECA with parked replicas on the GPU: weights and optimizer state live in CPU memory, the device peak is at
    least two replicas below the resident run's, and the first step's losses equal the resident run's bit for bit
    (the same weights and batches through the same deterministic kernels). Later steps are not compared here: the
    consensus hook's elementwise fold runs on the host when parked and on the GPU when resident, and the two
    devices' kernels may contract a multiply-add differently; the parked protocol with that hook is compared bit for
    bit on the CPU (test_parked_replicas_move_one_client_at_a_time_and_train_the_same), and on the GPU below with a
    method whose step has no host arithmetic."""
    common = ["topology.name=ring", "method=deca", "num_clients=4", "simulate.device=cuda", "max_steps=2"]
    torch.cuda.reset_peak_memory_stats()
    resident = Simulation(_cfg(*common))
    resident_losses = [resident.step().losses for _ in range(2)]
    resident_peak = torch.cuda.max_memory_allocated()
    assert all(p.is_cuda for m in resident.models for p in m.parameters())
    # A Simulation is part of reference cycles (its hooks and bound methods): del alone left all four resident
    # replicas allocated until the next garbage collection, inside the parked run's peak (seen on an H200).
    del resident
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    parked = Simulation(_cfg(*common, "simulate.park_replicas=true"))
    parked_losses = [parked.step().losses for _ in range(2)]
    parked_peak = torch.cuda.max_memory_allocated()
    assert all(not p.is_cuda for m in parked.models for p in m.parameters())
    assert all(not v.is_cuda for o in parked.optimizers for st in o.state.values() for v in st.values())
    replica = sum(p.numel() * p.element_size() for p in parked.models[0].parameters())
    assert parked_peak < resident_peak - 2 * replica, (parked_peak, resident_peak, replica)
    assert parked_losses[0] == resident_losses[0]
    assert all(math.isfinite(x) for x in parked_losses[1])


@pytest.mark.gpu
def test_parked_replicas_on_gpu_train_as_resident_ones_bit_for_bit(deterministic_cuda):
    """badam_gossip with parked replicas on the GPU: every forward, backward, clip, Adam step and mix runs on the
    device as in the resident run, the host only holds copies (exact), so with deterministic kernels every loss and
    every final weight equals the resident run's, over steps that switch blocks and return to one."""
    common = ["topology.name=ring", "method=badam_gossip", "num_clients=3", "simulate.device=cuda",
              "blocks.switch_every=1", "optim.state_policy=offload", "max_steps=5"]
    resident = Simulation(_cfg(*common))
    parked = Simulation(_cfg(*common, "simulate.park_replicas=true"))
    for _ in range(5):
        assert parked.step().losses == resident.step().losses
    for a, b in zip(parked.models, resident.models):
        for x, y in zip(a.parameters(), b.parameters()):
            assert not x.is_cuda and y.is_cuda and torch.equal(x, y.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("stacked", [True, False])
def test_bf16_clients_step_on_gpu(stacked):
    """Both simulators run DECA with bf16 replicas on the GPU: every step's finite check, Adam step, mix and fold on
    CUDA bf16 (the finite check once raised NotImplementedError there), every client's weights move, losses stay
    finite. The launcher's stage-0 step shares that check and BlockAdam (deca_ds.step)."""
    from deca_ds.simulate import make_simulation

    sim = make_simulation(_cfg("method=deca", "num_clients=4", "simulate.device=cuda", "model.dtype=bf16",
                               f"simulate.stacked={str(stacked).lower()}", "max_steps=3"))
    before = [[p.detach().clone() for p in sim.model_of(c).parameters()] for c in range(4)]
    losses = [sim.step().losses for _ in range(3)]
    assert all(math.isfinite(x) for step in losses for x in step)
    held = list(sim.params.values()) if stacked else [p for m in sim.models for p in m.parameters()]
    assert held and all(t.is_cuda and t.dtype == torch.bfloat16 for t in held)
    for c in range(4):
        params = list(sim.model_of(c).parameters())
        assert any(not torch.equal(p.cpu(), q.cpu()) for p, q in zip(params, before[c])), f"client {c} did not move"


def _record_x_half(sim: Simulation) -> list:
    """Every step's active-block tensors of every client just before mixing (their x_half), float64 copies."""
    seen = []
    original = sim._precompute_mixture

    def spy(step, block):
        seen.append([[t.detach().double().clone() for t in sim.active_tensors(c)] for c in range(sim.num_clients)])
        original(step, block)

    sim._precompute_mixture = spy
    return seen


@pytest.mark.parametrize("compression", ["int8", "int4"])
def test_compressed_gossip_is_the_choco_closed_form_and_counts_its_bytes(compression):
    """Three clients on a ring, gossip.compression: each step's mixture equals the closed form
    x_i + Σ_j W_ij (x̂_j - x̂_i), x̂ rebuilt in float64 from the codec applied per tensor (first exchange of the visit
    in bf16, then the codec), and the bytes are the packets' plus the header, per neighbour."""
    from deca_ds.compression import FIRST_EXCHANGE_CODEC, GROUP_SIZE, make_codec

    sim = Simulation(_cfg("method=badam_gossip", "topology.name=ring", f"gossip.compression={compression}",
                          "max_steps=3"))
    halves = _record_x_half(sim)
    w = sim.topology.weights_at(0)
    n = 3
    public = None
    for step in range(3):
        sim.step()
        x = halves[step]
        if public is None:
            public = [[torch.zeros_like(t) for t in x[c]] for c in range(n)]
        codec = FIRST_EXCHANGE_CODEC if step == 0 else make_codec(compression)
        for c in range(n):
            for k, t in enumerate(x[c]):
                change = (t - public[c][k]).float().reshape(-1)
                public[c][k] += codec.decode(codec.encode(change), change.numel()).double().view(t.shape)
        for k in range(len(x[0])):
            for c in range(n):
                want = x[c][k] + sum(w[c, j] * (public[j][k] - public[c][k]) for j in sim.topology.neighbors(c))
                got = sim._mixed[1][k][c].double()
                # fp32 arithmetic of x + (s - (1 - W_ii) x̂): a few roundings, each <= 2^-24 of a term's magnitude
                scale = x[c][k].abs() + sum(p[k].abs() for p in public)
                assert bool(((got - want).abs() <= 8 * 2.0**-24 * scale).all()), (step, c, k)
        sizes = [t.numel() for t in x[0]]
        payload = sum(codec.packet_bytes(s) for s in sizes)
        groups = sum(math.ceil(s / GROUP_SIZE) for s in sizes)
        if step == 0:  # bf16: 2 bytes a value
            expected = 2 * sum(sizes)
        else:  # a 2-byte scale per group, then 1 byte (int8) or half a byte, rounded up per tensor (int4) a value
            expected = 2 * groups + (sum(sizes) if compression == "int8" else sum((s + 1) // 2 for s in sizes))
        assert payload == expected
        assert sim._step_bytes == [(expected + HEADER_BYTES) * 2] * n  # ring of 3: two neighbours


def test_compressed_bytes_per_step_are_a_quarter_and_an_eighth_of_fp32_plus_scales():
    """From the byte counters of three runs of the same settings: after the first (bf16) exchange of a block visit,
    int8 sends N + 2G + H bytes to a neighbour and int4 Σ ceil(n_t / 2) + 2G + H, against 4N + H uncompressed
    (N values in tensors of n_t, G = Σ ceil(n_t / 256) bf16 scales, H the header): ÷ 4 and ÷ 8 up to the scales."""
    from deca_ds.compression import GROUP_SIZE

    per_step = {}
    for compression in ("none", "int8", "int4"):
        sim = Simulation(_cfg("method=badam_gossip", "topology.name=ring", f"gossip.compression={compression}",
                              "max_steps=2"))
        records = [sim.step() for _ in range(2)]
        per_step[compression] = [r.bytes_sent[0] // 2 for r in records]  # per neighbour
        sizes = [t.numel() for t in sim.active_tensors(0)]
    numel, groups = sum(sizes), sum(math.ceil(s / GROUP_SIZE) for s in sizes)
    assert per_step["none"] == [4 * numel + HEADER_BYTES] * 2
    assert per_step["int8"] == [2 * numel + HEADER_BYTES, numel + 2 * groups + HEADER_BYTES]
    assert per_step["int4"] == [2 * numel + HEADER_BYTES, sum((s + 1) // 2 for s in sizes) + 2 * groups + HEADER_BYTES]


@pytest.mark.parametrize("stacked", [True, False])
def test_simulation_writes_the_partition_summary_and_warns_of_untrained_blocks(tmp_path, stacked):
    """The simulator (the first command's backend) wrote neither ``partition.json`` nor ``partition.png``, which the
    reference promises "at the start of a run" and the launcher writes, and did not warn that ``max_steps`` leaves
    blocks untrained (the launcher does)."""
    cfg = _cfg(f"simulate.stacked={str(stacked).lower()}", tmp_path=tmp_path)
    with pytest.warns(UserWarning, match=r"3 steps with switch_every=8 never train block"):
        run_simulation(cfg, save_models=False, quiet=True)
    doc = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert (tmp_path / "run" / "partition.png").is_file()
    assert len(doc["counts"]) == 3 and doc["label_names"] and sum(doc["client_totals"]) > 0
    assert all(t > 0 for t in doc["client_totals"])


def test_simulated_per_client_files_summary_has_every_clients_row_under_its_labels(tmp_path):
    """With per-client files each client's data knows only its own row and labels: the summary merges them."""
    labels = {0: ("sports", "music"), 1: ("food", "weather")}
    for c, names in labels.items():
        rows = [{"instruction": "Topic?", "input": f"text {i}", "output": names[i % 2], "label": names[i % 2]}
                for i in range(30)]
        (tmp_path / f"client_{c}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, ["num_clients=2", "backend=simulate", "max_steps=1", "data.eval_examples=2",
                             "data.test_size=0.2", f"data.path={tmp_path}/client_{{client}}.jsonl",
                             f"output_dir={tmp_path / 'run'}"])
    run_simulation(cfg, save_models=False, quiet=True)
    doc = json.loads((tmp_path / "run" / "partition.json").read_text())
    by_name = [dict(zip(doc["label_names"], row)) for row in doc["counts"]]
    assert sorted(doc["label_names"]) == ["food", "music", "sports", "weather"]
    assert doc["client_totals"] == [24, 24]
    assert by_name[0]["food"] == by_name[0]["weather"] == 0 and by_name[1]["sports"] == by_name[1]["music"] == 0
