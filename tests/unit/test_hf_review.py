"""deca_ds.hf: TrainingArguments data settings that DecaTrainer's own batch sampler would otherwise drop silently."""

import pytest
import torch

from deca_ds.config import ConfigError
from deca_ds.gossip import ClientLayout
from deca_ds.hf import DecaSettings


def training_args(**kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=kw.pop("output_dir", "unused"), report_to="none", use_cpu=True, **kw)


def test_a_data_seed_the_sampler_would_not_use_is_refused():
    """Before: --data_seed was silently ignored (the batches are drawn with data.seed)."""
    with pytest.raises(ConfigError, match=r"data_seed=7 would be ignored.*set data.seed=7"):
        DecaSettings().resolve(training_args(max_steps=4, data_seed=7))
    cfg = DecaSettings(overrides=["data.seed=7"]).resolve(training_args(max_steps=4, data_seed=7))
    assert cfg.data.seed == 7
    assert DecaSettings().resolve(training_args(max_steps=4)).data.seed == DecaSettings().config.data.seed


def test_a_sampling_strategy_the_sampler_would_not_use_is_refused(monkeypatch):
    """Before: train_sampling_strategy (sequential, group_by_length, ...) was silently replaced by
    ClientBatchSampler's shuffled batches."""
    from transformers import TrainingArguments

    import deca_ds.hf as hf

    if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__:
        kw = {"train_sampling_strategy": "group_by_length"}
        match = "train_sampling_strategy=group_by_length would be ignored.*drop it"
    else:
        kw, match = {"group_by_length": True}, "group_by_length=True would be ignored"

    def no_process_group(*a, **k):
        raise AssertionError("the refusal must come before the process group is started")

    monkeypatch.setattr(hf, "init_distributed", no_process_group)
    with pytest.raises(ConfigError, match=match):
        hf.DecaTrainer(model=torch.nn.Linear(2, 2), args=training_args(max_steps=4, **kw))
    hf._check_trainer_arguments(training_args(max_steps=4), {})


def test_the_trainers_dataloader_worker_settings_reach_the_dataloader():
    """Before: dataloader_persistent_workers / prefetch_factor were dropped (only num_workers and pin_memory)."""
    import deca_ds.hf as hf

    trainer = object.__new__(hf.DecaTrainer)
    trainer.args = training_args(max_steps=4, dataloader_num_workers=2, dataloader_persistent_workers=True,
                                 dataloader_prefetch_factor=3, remove_unused_columns=False)
    trainer.train_dataset = [{"input_ids": [1, 2], "labels": [1, 2]} for _ in range(10)]
    trainer.data_collator = hf.DataCollator(0)
    trainer.deca_config, trainer.layout = DecaSettings().config, ClientLayout(1, 0, 1)
    loader = trainer.get_train_dataloader()
    assert (loader.num_workers, loader.persistent_workers, loader.prefetch_factor) == (2, True, 3)
    assert isinstance(loader.batch_sampler, hf.ClientBatchSampler)
