"""Checkpoint files: atomic per-client writes, `latest` moves last, pruning, weights-only loading, damaged-checkpoint
fallback, the output_dir guard, resume compatibility and run.json legs."""

import copy
import json
import os
import threading

import pytest
import torch

from deca_ds import checkpoint as ckpt
from deca_ds.config import ConfigError, load_config


def _save(out, step, clients=(0, 1), keep=2):
    """What save_checkpoint does for several writers: the pointer read before the barrier, writes, then each
    client publishes."""
    previous = ckpt.read_latest_pointer(out)
    for c in clients:
        ckpt.write_client_state(out, step, c, {"w": torch.full((3,), float(step + c))})
    for c in clients:
        ckpt.publish_checkpoint(out, step, c, keep, previous=previous)


def _state(out, step, client):
    return out / "checkpoints" / ckpt.step_dir_name(step) / f"client_{client}" / "state.pt"


def test_latest_points_to_newest_complete_and_old_ones_are_pruned(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in (2, 4, 6):
        _save(tmp_path, step)
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_00000006"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]
    assert torch.equal(ckpt.read_client_state(latest, 1)["w"], torch.full((3,), 7.0))


def test_unpublished_write_does_not_move_latest_and_leftovers_are_cleaned(tmp_path):
    _save(tmp_path, 2)
    # A kill after client 0 wrote step 4 but before `latest` moved: resume still sees step 2.
    ckpt.write_client_state(tmp_path, 4, 0, {"w": torch.zeros(1)})
    (tmp_path / "checkpoints" / "step_00000004" / "client_1.tmp").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000002"
    assert ckpt.find_resume_checkpoint(tmp_path, client_ids=range(2)).name == "step_00000002"
    # The resumed run saves step 3: the dead step-4 leftovers go, step 2 stays.
    _save(tmp_path, 3)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_00000002", "step_00000003"]


def test_a_leftover_between_checkpoints_never_displaces_a_complete_one_for_any_client(tmp_path):
    """Steps 2 and 4 saved (keep 2); a save of step 5 killed after both clients wrote but before ``latest`` moved;
    the resumed run saves step 6. Every client must treat step 5 as a leftover: steps 4 and 6 stay complete. Before,
    ``previous`` defaulted to reading the pointer at publish time: the second client read ``step_6`` (the first had
    just moved it), counted step 5 as a checkpoint and deleted its part of step 4, leaving one complete checkpoint."""
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    for c in (0, 1):
        ckpt.write_client_state(tmp_path, 5, c, {"w": torch.zeros(1)})
    _save(tmp_path, 6)
    dirs = {p.name: sorted(q.name for q in p.iterdir()) for p in (tmp_path / "checkpoints").glob("step_*")}
    assert dirs == {"step_00000004": ["client_0", "client_1"], "step_00000006": ["client_0", "client_1"]}
    with pytest.raises(TypeError, match="previous"):
        ckpt.publish_checkpoint(tmp_path, 6, 0, 2)  # no default to fall into


def test_latest_is_published_only_after_every_client_is_complete(tmp_path):
    """Two writer ranks (clients 0 and 1) in threads, with a barrier that, when both have arrived the first time,
    checks that `latest` still names the previous checkpoint and that both new client directories are complete."""
    _save(tmp_path, 2)
    seen = []

    def check_at_first_barrier():
        if seen:
            return
        seen.append(ckpt.latest_checkpoint(tmp_path).name)
        for c in (0, 1):
            assert ckpt.read_client_state(tmp_path / "checkpoints" / "step_00000004", c)["c"] == c
            assert not (tmp_path / "checkpoints" / "step_00000004" / f"client_{c}.tmp").exists()

    barrier = threading.Barrier(2, action=check_at_first_barrier)
    errors = []

    def rank(c):
        try:
            ckpt.save_checkpoint(tmp_path, 4, c, True, lambda: {"c": c, "w": torch.ones(2)}, keep=2,
                                 barrier=lambda: barrier.wait(timeout=30))
        except BaseException as e:  # a failed check in the barrier action breaks the barrier for both
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(c,)) for c in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert seen == ["step_00000002"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000004"


def test_a_save_that_fails_mid_write_renames_nothing_and_keeps_latest(tmp_path, monkeypatch):
    _save(tmp_path, 2)
    before = _state(tmp_path, 2, 0).read_bytes()
    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # half a file on disk, then the failure (e.g. the disk filled up)
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="No space"):
        ckpt.save_checkpoint(tmp_path, 4, 0, True, lambda: {"w": torch.ones(100)}, keep=2, barrier=lambda: None)
    monkeypatch.undo()
    step4 = tmp_path / "checkpoints" / "step_00000004"
    assert not (step4 / "client_0").exists() and not (step4 / "client_0.tmp").exists()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000002"
    assert _state(tmp_path, 2, 0).read_bytes() == before
    assert ckpt.find_resume_checkpoint(tmp_path, client_ids=range(2)).name == "step_00000002"


def test_a_full_disk_inside_torch_save_surfaces_as_the_os_error_naming_the_file(tmp_path, monkeypatch):
    """torch.save turns ENOSPC into "RuntimeError: [enforce fail at inline_container.cc] unexpected pos" with the
    OSError as context (seen on a full tmpfs): the checkpoint writer re-raises the OSError, naming the file."""
    import errno

    from deca_ds.errors import describe_fault

    def full_disk(obj, f, *args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 189120 vs 189072")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as info:
        ckpt.save_checkpoint(tmp_path, 4, 0, True, lambda: {"w": torch.ones(4)}, keep=2, barrier=lambda: None)
    assert info.value.errno == errno.ENOSPC and info.value.filename.endswith("client_0/state.pt")
    assert describe_fault(info.value).startswith("disk error writing ")
    assert not (tmp_path / "checkpoints" / "step_00000004" / "client_0.tmp").exists()


def test_missing_client_is_a_clear_error(tmp_path):
    _save(tmp_path, 2, clients=(0,))
    with pytest.raises(ckpt.CheckpointError, match="client_1 is missing .*client 1.*number of clients"):
        ckpt.read_client_state(ckpt.latest_checkpoint(tmp_path), 1)
    os.remove(_state(tmp_path, 2, 0))
    with pytest.raises(ckpt.CheckpointError, match="client_0/state.pt is missing"):
        ckpt.read_client_state(ckpt.latest_checkpoint(tmp_path), 0)


def test_truncated_and_corrupt_states_are_named(tmp_path):
    _save(tmp_path, 2)
    path = _state(tmp_path, 2, 1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.read_client_state(tmp_path / "checkpoints" / "step_00000002", 1)
    assert str(path) in str(e.value) and "truncated or corrupt" in str(e.value) and "\n" not in str(e.value)
    corrupt = bytearray(data)
    start = corrupt.find(b"\x80\x02")  # the pickle stream inside the archive
    corrupt[start + 2:start + 6] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(corrupt))
    with pytest.raises(ckpt.CheckpointError, match=r"truncated or corrupt \(Unsupported operand 255\): delete"):
        ckpt.read_client_state(tmp_path / "checkpoints" / "step_00000002", 1)


class Payload:
    """Stands in for an object a malicious checkpoint would smuggle in (its unpickling could run code)."""


def test_loading_is_weights_only(tmp_path):
    path = _state(tmp_path, 2, 0)
    path.parent.mkdir(parents=True)
    torch.save({"w": torch.ones(1), "x": Payload()}, path)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.read_client_state(path.parent.parent, 0)
    assert "weights-only loading refuses" in str(e.value) and "Payload" in str(e.value) and str(path) in str(e.value)
    torch.save({"model": {}, "evil": os.system}, path)  # unpickling this would hand out os.system
    with pytest.raises(ckpt.CheckpointError, match=r"refuses \((posix|nt)\.system\)"):
        ckpt.read_client_state(path.parent.parent, 0)


def test_real_engine_states_load_weights_only_and_bit_exact():
    """What DecaEngine/ZeroBlockEngine put in state.pt, built from the real parts (BlockAdam with int8 offload, torch
    AdamW, a DeepSpeed LR scheduler, the RNG, the mixer's counters): loads with weights_only=True, no allow-list."""
    import io

    import transformers as T
    from deepspeed.runtime.lr_schedules import WarmupLR

    from deca_ds.blocks import partition_blocks
    from deca_ds.optim import BlockAdam

    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = T.AutoModelForCausalLM.from_config(cfg)
    opt = BlockAdam(model, partition_blocks(model), switch_every=1, state_policy="offload", offload_dtype="int8",
                    order="random", lr=1e-2)
    sched = WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=1e-2, warmup_num_steps=3)
    ids = torch.randint(0, 64, (2, 6))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
    adamw_model = copy.deepcopy(model).requires_grad_(True)
    adamw = torch.optim.AdamW(adamw_model.parameters(), lr=1e-3)
    adamw_model(input_ids=ids, labels=ids).loss.backward()
    adamw.step()
    state = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}, "optimizer": opt.state_dict(),
             "lr_scheduler": sched.state_dict(), "global_step": 3, "engine_counters": (3, 12, 3),
             "mixer": {"sent": 10, "received": 10}, "rng": {"torch": torch.get_rng_state()},
             "adamw": adamw.state_dict(), "shapes": {"x": (2, 3)}}
    assert state["optimizer"]["offloaded"] is not None  # the int8 store is really in there
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    assert same(state, loaded)


def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path):
    for step in (2, 4):
        _save(tmp_path, step)
    path = _state(tmp_path, 4, 1)
    path.write_bytes(path.read_bytes()[:100])  # a torn write (or a disk that lost the tail)
    warnings = []
    found = ckpt.find_resume_checkpoint(tmp_path, "latest", client_ids=range(2), warn=warnings.append)
    assert found.name == "step_00000002"
    assert len(warnings) == 1 and "step_00000004" in warnings[0] and str(path) in warnings[0]
    assert "step_00000002" in warnings[0]
    # Without client_ids, the clients of the checkpoint `latest` names are required.
    assert ckpt.find_resume_checkpoint(tmp_path, warn=None).name == "step_00000002"
    # `latest` naming a directory that is gone: the older one, saying so.
    import shutil

    gone = tmp_path.parent / f"{tmp_path.name}_gone"
    shutil.copytree(tmp_path, gone)
    shutil.rmtree(gone / "checkpoints" / "step_00000004")
    warnings.clear()
    assert ckpt.find_resume_checkpoint(gone, client_ids=range(2), warn=warnings.append).name == "step_00000002"
    assert len(warnings) == 1 and "which checkpoints/latest names, is missing" in warnings[0]
    # A missing client directory is damage too.
    shutil.rmtree(_state(tmp_path, 4, 1).parent)
    assert ckpt.find_resume_checkpoint(tmp_path, client_ids=range(2), warn=None).name == "step_00000002"
    # An explicit step is taken as is, or refused naming the problem (no silent fallback).
    assert ckpt.find_resume_checkpoint(tmp_path, "step_2", client_ids=range(2)).name == "step_00000002"
    with pytest.raises(ckpt.CheckpointError, match="step_00000004 is incomplete .*client_1 is missing"):
        ckpt.find_resume_checkpoint(tmp_path, "step_4", client_ids=range(2))
    with pytest.raises(ckpt.CheckpointError, match="step_00000009 does not exist: use one of step_00000004, "
                                                   "step_00000002"):
        ckpt.find_resume_checkpoint(tmp_path, "step_9", client_ids=range(2))
    # Nothing complete although `latest` exists: an error naming the damage, not a silent fresh start.
    _state(tmp_path, 2, 0).write_bytes(b"not a zip")
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint .*step_00000004: .*client_1 is missing; "
                                                   "step_00000002: .*truncated or corrupt"):
        ckpt.find_resume_checkpoint(tmp_path, client_ids=range(2), warn=None)


def test_latest_checkpoint_skips_damage_for_the_clients_run_json_records(tmp_path):
    """What the training loop calls: the newest checkpoint complete for every client of the run (run.json's world
    size / ranks_per_client), warning once per checkpoint skipped."""
    for step in (2, 4):
        _save(tmp_path, step)
    (tmp_path / "run.json").write_text(json.dumps({"config": load_config().to_dict(), "world_size": 2}))
    import shutil

    shutil.rmtree(_state(tmp_path, 4, 1).parent)  # `latest` names a checkpoint without client 1
    warnings = []
    assert ckpt.latest_checkpoint(tmp_path, warn=warnings.append).name == "step_00000002"
    assert len(warnings) == 1 and "client_1 is missing" in warnings[0]
    # A run of 3 clients: no checkpoint holds client 2, so nothing is complete; an error, not a silent restart.
    (tmp_path / "run.json").write_text(json.dumps({"config": load_config().to_dict(), "world_size": 3}))
    with pytest.raises(ckpt.CheckpointError, match="client_2 is missing.*number of clients"):
        ckpt.latest_checkpoint(tmp_path, warn=None)


def test_no_checkpoint_ever_published(tmp_path):
    assert ckpt.find_resume_checkpoint(tmp_path) is None
    # A run killed during its first save: a partial step directory, no `latest`.
    ckpt.write_client_state(tmp_path, 2, 0, {"w": torch.ones(1)})
    assert ckpt.find_resume_checkpoint(tmp_path) is None
    assert ckpt.find_resume_checkpoint(tmp_path, client_ids=range(2)) is None
    # Every client wrote but `latest` was not moved yet: complete, and found when the clients are known.
    ckpt.write_client_state(tmp_path, 2, 1, {"w": torch.ones(1)})
    assert ckpt.find_resume_checkpoint(tmp_path, client_ids=range(2)).name == "step_00000002"


def test_output_dir_guard_never_overwrites(tmp_path):
    assert ckpt.prepare_output_dir(tmp_path / "new", resume=False) is None  # fresh: fine
    assert ckpt.prepare_output_dir(tmp_path / "new", resume="auto") is None  # nothing to resume: a new run
    with pytest.raises(ConfigError, match="resume=true but .* holds no run to resume: drop resume=true"):
        ckpt.prepare_output_dir(tmp_path / "new", resume=True)
    assert not (tmp_path / "new").exists()  # checks only
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="resume=true"):
        ckpt.prepare_output_dir(run, resume=False)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        ckpt.prepare_output_dir(run, resume=True)
    assert ckpt.prepare_output_dir(run, resume="auto") is None  # crashed before its first checkpoint: from step 0
    assert (run / "metrics.jsonl").read_text() == before
    _save(run, 1)
    assert ckpt.prepare_output_dir(run, resume=True).name == "step_00000001"
    assert ckpt.prepare_output_dir(run, resume="auto", num_clients=2).name == "step_00000001"
    assert ckpt.prepare_output_dir(run, resume="step_1").name == "step_00000001"
    with pytest.raises(ckpt.CheckpointError, match="client_2 is missing"):
        ckpt.prepare_output_dir(run, resume="step_1", num_clients=3)


def test_a_simulator_run_is_never_offered_for_resume(tmp_path):
    """A finished ``backend=simulate`` run has no checkpoint: the refusal must not send the user to resume=true (which
    then failed, claiming the run had stopped before its first checkpoint); nothing there changes."""
    run = tmp_path / "run"
    ckpt.append_run_leg(run, ckpt.run_record(load_config(), None, None, 4, backend="simulate"))
    (run / "summary.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    for resume, words in [(False, r"already holds a run \(backend=simulate, which writes no checkpoint to resume\)"),
                          (True, "resume=true but .* holds a backend=simulate run, which writes no checkpoints"),
                          ("step_4", "resume=step_4: .* does not exist and output_dir holds no checkpoint")]:
        with pytest.raises(ConfigError, match=words) as e:
            ckpt.prepare_output_dir(run, resume=resume)
        assert "resume=true" not in str(e.value).replace("resume=true but", "") and "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_output_dir_must_be_a_writable_directory(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        ckpt.prepare_output_dir(afile, resume=False)
    with pytest.raises(ConfigError, match="cannot be created: .*afile' is a file"):
        ckpt.prepare_output_dir(afile / "sub" / "run", resume=False)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # Simulated, because the tests may run as root, whom a mode of 0o500 does not stop.
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    with pytest.raises(ConfigError, match="cannot be created: .*locked' is not writable"):
        ckpt.prepare_output_dir(locked / "run", resume=False)
    with pytest.raises(ConfigError, match="locked' is not writable"):
        ckpt.prepare_output_dir(locked, resume=False)


def _record(*overrides, world_size=4, ds=None):
    cfg = load_config(None, list(overrides))
    ds = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "steps_per_print": 1000000} \
        if ds is None else ds
    return ckpt.run_record(cfg, ds, world_size, world_size // cfg.clients.ranks_per_client)


def test_resume_compatibility_rules():
    stored = _record()
    assert ckpt.compare_run_settings(stored, _record()) == ([], [])
    # Settings that may change between legs are reported as changes, never refused.
    refused, changed = ckpt.compare_run_settings(stored, _record(
        "max_steps=400", "checkpoint_every=10", "keep_checkpoints=3", "comm_timeout=60", "log_every=5",
        "eval_every=20", "output_dir=elsewhere", "resume=true", "optim.lr=1e-4", "data.eval_examples=8",
        "model.gradient_checkpointing=true", "gossip.chunk_mb=1"))
    assert refused == []
    assert "max_steps: 192 -> 400" in changed and "optim.lr: 0.01 -> 0.0001" in changed and len(changed) == 12
    # Settings that define the run are refused, each named with both values.
    refused, _ = ckpt.compare_run_settings(stored, _record(
        "clients.ranks_per_client=2", "blocks.switch_every=8", "method=dadam", "deca.signal=qgm",
        "topology.name=complete", "data.alpha=1.0", "data.seed=1", "data.test_size=0.2", "model.dtype=bf16",
        "seed=3", "optim.betas=[0.8,0.99]", "gossip.dtype=bf16"))
    for line in ["num_clients: 4 -> 2", "clients.ranks_per_client: 1 -> 2", "blocks.switch_every: 4 -> 8",
                 "method: 'deca' -> 'dadam'", "deca.signal: 'qgm_grad' -> 'qgm'", "topology.name: 'ring' -> 'complete'",
                 "data.alpha: 0.25 -> 1.0", "data.seed: 42 -> 1", "data.test_size: 0.1 -> 0.2",
                 "model.dtype: 'fp32' -> 'bf16'", "seed: 0 -> 3", "optim.betas: [0.9, 0.999] -> [0.8, 0.99]",
                 "gossip.dtype: 'fp32' -> 'bf16'"]:
        assert line in refused, (line, refused)
    refused, _ = ckpt.compare_run_settings(stored, _record(world_size=8))
    assert refused == ["num_clients: 4 -> 8", "world_size: 4 -> 8"]
    # The count is the run's, not the setting's: num_clients=4 given in one leg and left out in the next is the same
    # run (it was refused as "num_clients: 4 -> None"), and a real change is named once, not twice.
    assert ckpt.compare_run_settings(_record("num_clients=4"), stored) == ([], [])
    refused, _ = ckpt.compare_run_settings(_record("num_clients=4"), _record(world_size=8))
    assert refused == ["num_clients: 4 -> 8", "world_size: 4 -> 8"]
    refused, _ = ckpt.compare_run_settings(stored, _record("model.path=/models/other"))
    assert refused == ["model.path: None -> '/models/other'"]


def test_resume_of_a_run_recorded_with_the_old_topology_p_default():
    """Before topology.p could be unset every run recorded 0.5, ring runs too; for a graph other than Erdos-Renyi
    that value was never used, so resuming such a run with today's code (which records None) is no difference -
    while a real change of the Erdos-Renyi probability is still refused."""
    ring = _record()
    assert ring["config"]["topology"]["name"] == "ring" and ring["config"]["topology"]["p"] is None
    old_ring = json.loads(json.dumps(ring))
    old_ring["config"]["topology"]["p"] = 0.5
    assert ckpt.compare_run_settings(old_ring, ring) == ([], [])
    er = _record("topology.name=erdos_renyi")
    assert er["config"]["topology"]["p"] == 0.5
    refused, _ = ckpt.compare_run_settings(er, _record("topology.name=erdos_renyi", "topology.p=0.3"))
    assert refused == ["topology.p: 0.5 -> 0.3"]
    refused, _ = ckpt.compare_run_settings(old_ring, er)
    assert refused == ["topology.name: 'ring' -> 'erdos_renyi'", "topology.p: None -> 0.5"]


def test_resume_compatibility_of_ds_config_and_learning_rate():
    base = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1}
    stored = _record(ds=dict(base))
    refused, changed = ckpt.compare_run_settings(stored, _record(ds={**base, "gradient_accumulation_steps": 2,
                                                                      "steps_per_print": 10}))
    assert refused == ["ds_config.gradient_accumulation_steps: 1 -> 2", "ds_config.train_batch_size: 8 -> 16"]
    assert changed == ["ds_config.steps_per_print: null -> 10"]
    # An older run.json without the derived train_batch_size compares equal to the filled one.
    assert ckpt.compare_run_settings(stored, _record(ds={**base, "train_batch_size": 8})) == ([], [])
    # With a DeepSpeed scheduler the learning rate is the scheduler's: changing optim.lr would be ignored.
    sched = {**base, "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-3}}}
    refused, _ = ckpt.compare_run_settings(_record(ds=sched), _record("optim.lr=1e-4", ds=sched))
    assert refused == ["optim.lr: 0.01 -> 0.0001 (the ds_config scheduler sets the learning rate)"]


def test_check_run_settings_names_every_difference_in_one_line():
    with pytest.raises(ConfigError) as e:
        ckpt.check_run_settings(_record(), _record("topology.name=complete", world_size=8))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("resume refused")
    assert "num_clients: 4 -> 8" in msg and "topology.name: 'ring' -> 'complete'" in msg and "run.json" in msg
    assert ckpt.check_run_settings(_record(), _record("max_steps=10")) == ["max_steps: 192 -> 10"]


def test_old_run_json_and_settings_it_does_not_record(tmp_path):
    """A single-object run.json of older versions is leg 0; settings added since count as their default."""
    cfg = load_config()
    old = {"config": cfg.to_dict(), "ds_config": {"train_micro_batch_size_per_gpu": 8}, "world_size": 2}
    del old["config"]["gossip"]["chunk_mb"]
    del old["config"]["simulate"]
    (tmp_path / "run.json").write_text(json.dumps(old, indent=2))
    legs = ckpt.read_run_legs(tmp_path)
    assert legs == [old]
    new = ckpt.run_record(cfg, {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
                                "train_batch_size": 8}, 2, 2)
    assert ckpt.compare_run_settings(legs[-1], new) == ([], [])
    refused, _ = ckpt.compare_run_settings(legs[-1], ckpt.run_record(load_config(None, ["simulate.device=cpu",
                                                                                       "blocks.switch_every=2"]),
                                                                     old["ds_config"], 2, 2))
    assert refused == ["blocks.switch_every: 4 -> 2"]


def test_run_json_legs_are_appended_never_overwritten(tmp_path):
    cfg = load_config()
    old = {"config": cfg.to_dict(), "ds_config": {}, "world_size": 2}
    (tmp_path / "run.json").write_text(json.dumps(old))
    assert ckpt.append_run_leg(tmp_path, ckpt.run_record(cfg, {}, 2, 2, resumed_from="step_00000004")) == 1
    assert ckpt.append_run_leg(tmp_path, ckpt.run_record(load_config(None, ["max_steps=9"]), {}, 2, 2)) == 2
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["format"] == ckpt.RUN_FORMAT and [leg.get("leg") for leg in data["legs"]] == [None, 1, 2]
    legs = ckpt.read_run_legs(tmp_path)
    assert legs[0] == old  # the old record kept exactly
    assert legs[1]["leg"] == 1 and legs[1]["resumed_from"] == "step_00000004" and "started" in legs[1]
    assert legs[2]["config"]["max_steps"] == 9
    assert ckpt.append_run_leg(tmp_path / "fresh", ckpt.run_record(cfg, {}, 2, 2)) == 0
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.json").write_text('{"config": ')
    with pytest.raises(ckpt.CheckpointError, match="run.json is not valid JSON"):
        ckpt.append_run_leg(tmp_path / "bad", ckpt.run_record(cfg, {}, 2, 2))
    assert (tmp_path / "bad" / "run.json").read_text() == '{"config": '


def test_all_finite():
    assert ckpt.all_finite([torch.ones(2), torch.arange(3)])
    assert not ckpt.all_finite([torch.tensor([1.0, float("nan")])])
    assert not ckpt.all_finite([torch.tensor([float("inf")])])
