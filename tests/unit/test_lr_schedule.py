"""Learning-rate schedules: the rate of every step equals transformers' schedulers (what an HF Trainer uses), the
simulator applies it, and epochs become steps from the mean client's data."""

import pytest
import torch

from deca_ds.config import ConfigError, load_config
from deca_ds.lr_schedule import lr_at, lr_factor, steps_for_epochs, uses_schedule, warmup_steps


@pytest.mark.parametrize("schedule, maker", [("constant", "get_constant_schedule_with_warmup"),
                                             ("linear", "get_linear_schedule_with_warmup"),
                                             ("cosine", "get_cosine_schedule_with_warmup")])
@pytest.mark.parametrize("warmup, total", [(0, 40), (7, 50), (1, 3)])
def test_every_step_equals_transformers(schedule, maker, warmup, total):
    import transformers

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    fn = getattr(transformers, maker)
    sched = fn(opt, warmup) if schedule == "constant" else fn(opt, warmup, total)
    for step in range(total):
        assert opt.param_groups[0]["lr"] == 3e-3 * lr_factor(step, schedule, warmup, total), step  # exact
        opt.step()
        sched.step()


def test_settings():
    cfg = load_config(None, ["optim.schedule=linear", "optim.warmup_ratio=0.1", "max_steps=95"])
    assert warmup_steps(cfg) == 10 and uses_schedule(cfg)  # ceil(9.5), as HF's get_warmup_steps
    assert lr_at(cfg, 0) == 0.0 and lr_at(cfg, 10) == cfg.optim.lr and lr_at(cfg, 95) == 0.0
    assert not uses_schedule(load_config())
    with pytest.raises(ConfigError, match="optim.schedule"):
        load_config(None, ["optim.schedule=step"])
    with pytest.raises(ConfigError, match="optim.warmup_ratio"):
        load_config(None, ["optim.warmup_ratio=1.5"])
    with pytest.raises(ConfigError, match="epochs"):
        load_config(None, ["epochs=0"])


def test_steps_for_epochs():
    assert steps_for_epochs(1.0, 100, 8) == 13 and steps_for_epochs(2.5, 100, 8) == 32
    assert steps_for_epochs(0.001, 10, 8) == 1


def test_simulator_applies_the_schedule_and_epochs(tmp_path):
    from deca_ds.metrics import read_jsonl
    from deca_ds.simulate import Simulation, run_simulation

    settings = ["num_clients=2", "data.num_examples=240", "data.eval_examples=2", "data.min_partition_size=4",
                "blocks.switch_every=2", "optim.schedule=cosine", "optim.warmup_steps=2", "epochs=0.5"]
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", *settings])
    sim = Simulation(load_config(None, [f"output_dir={tmp_path / 'x'}", *settings]))
    mean_rows = sum(len(d.train) for d in sim.data) / 2
    run_simulation(cfg, save_models=False, quiet=True)
    assert cfg.max_steps == steps_for_epochs(0.5, mean_rows, sim.micro_batch * sim.gas) > 4
    lrs = {r["step"]: r["lr"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "lr" in r}
    assert [lrs[s] for s in range(cfg.max_steps)] == [lr_at(cfg, s) for s in range(cfg.max_steps)]
    assert lrs[0] == 0.0 and lrs[2] == cfg.optim.lr
