"""A wheel built from the repository carries the recipe configs and ds_configs, and ``deca-ds run --config default``
trains from it outside the repository checkout (what a plain ``pip install`` gives a user)."""

import json
import os
import subprocess
import sys
import zipfile

import pytest
from launch import ROOT

pytestmark = pytest.mark.integration


def test_wheel_ships_the_configs_and_deca_ds_run_finds_them(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    # Build from a copy of the tracked files (what a clean clone holds), without network or build isolation.
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    dist = tmp_path / "dist"
    offline = dict(os.environ, PIP_NO_INDEX="1")  # pip must not reach an index: tests run without network
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, capture_output=True, text=True, timeout=300, env=offline)
    (wheel,) = dist.glob("deca_ds-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = {n: z.read(n) for n in z.namelist() if n.startswith("deca_ds/_shipped/")}
    expected = {f"deca_ds/_shipped/configs/{p.name}": p.read_bytes() for p in (ROOT / "recipes/configs").glob("*.yaml")}
    expected.update({f"deca_ds/_shipped/ds_configs/{p.name}": p.read_bytes()
                     for p in (ROOT / "ds_configs").glob("*.json")})
    assert shipped == expected  # the repository's files, byte for byte: they stay the source of truth

    # Installed (no dependencies: the test environment has them) and run from a directory with no repository.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300, env=offline)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    probe = subprocess.run([sys.executable, "-c", "import deca_ds; print(deca_ds.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip().startswith(str(site))  # the installed copy, not the checkout
    shown = subprocess.run([sys.executable, "-m", "deca_ds", "run", "--config", "gpu_bf16", "--print-config"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in shown.stdout.splitlines() if line.strip()}
    assert rows["deepspeed:file"][1] == str(site / "deca_ds/_shipped/ds_configs/gpu_bf16.json")
    assert rows["max_steps"][1:] == ["1728", "yaml"]

    out = work / "run"
    res = subprocess.run([sys.executable, "-m", "deca_ds", "run", "--config", "default", f"output_dir={out}",
                          "max_steps=4", "data.num_examples=300", "data.eval_examples=4", "blocks.switch_every=2"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_clients"] == 4 and summary["backend"] == "simulate"  # the first run: 4 clients in-process
    assert json.loads((out / "ds_config.json").read_text())["train_micro_batch_size_per_gpu"] == 8
    assert (out / "training.png").stat().st_size > 0 and (out / "consensus" / "model.safetensors").is_file()
    assert "running 4 clients in this process" in res.stderr
