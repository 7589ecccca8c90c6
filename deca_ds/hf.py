"""Hugging Face ``Trainer`` and TRL ``SFTTrainer`` as a decentralized DECA run.

An existing Trainer script becomes a DECA run by three changes (``recipes/hf_trainer.py`` is the example):

    from deca_ds.hf import DecaSettings, DecaTrainer, finish_distributed, init_distributed
    init_distributed()                                   # before TrainingArguments (optional, see below)
    deca = DecaSettings(method="deca", blocks={"layers_per_block": 2, "switch_every": 48}, topology="ring")
    trainer = DecaTrainer(model=model, args=args, train_dataset=my_clients_rows, deca=deca, ...)
    trainer.train(); trainer.save_consensus_model()
    finish_distributed()                                 # last: leave the process group on every rank

launched as usual: ``deepspeed --num_gpus N train.py --deepspeed ds.json ...`` or ``torchrun --nproc_per_node N
train.py ...``. Every launched rank joins one client (``clients.ranks_per_client`` contiguous ranks per client) and
trains on the rows its script gives it (``DecaSettings.client_id`` says which client this rank is; see
:meth:`DecaSettings.client_data` for the recipe's partitioned data). TRL: ``deca_trainer_class(SFTTrainer)``.

What the trainer changes, and why (each piece is the launcher's, ``deca_ds.trainer``):
- optimizer: :func:`deca_ds.build.build_optimizer` (BlockAdam for the method, ``auto_switch=False``); its learning
  rate, betas, eps and weight decay come from ``TrainingArguments``, the decay applied only to the parameters
  ``get_decay_parameter_names`` names, as the Trainer's own AdamW groups (:meth:`DecaTrainerMixin.create_optimizer`);
- between steps: :class:`deca_ds.consensus.ConsensusStep` built by :func:`deca_ds.build.build_consensus_step` around
  the Mixer, run from the optimizer's own step hooks (``register_step_pre_hook``/``register_step_post_hook``), so it
  runs right around BlockAdam's step wherever the Trainer calls it (DeepSpeed's ``engine.step()`` or Accelerate's
  ``optimizer.step()``): snapshot -> local step -> gossip -> consensus correction -> block switch;
- data parallelism: gradients are averaged inside a client only. With DeepSpeed, ``deepspeed.initialize`` gets the
  :class:`deca_ds.gossip.ClientGroups` ``mpu`` (and ``train_batch_size`` counts one client's ranks). Without
  DeepSpeed, Accelerate does not wrap the model in DistributedDataParallel over the world (DDP fixes the trainable
  set at construction, which block switching changes every R steps, and would average across clients): the
  trainer all-reduces the active block's gradients over the client's process group itself, then clips them with
  DeepSpeed's stage-0 arithmetic (:func:`deca_ds.step.clip_grad_norm_as_deepspeed_`), so both launch paths compute
  the same numbers as ``recipes/finetune.py``;
- batches: each rank draws its micro-batches with :func:`deca_ds.data.loading.batch_indices` at the launcher's
  position ``(step * accumulation + micro) * ranks_per_client + local_rank``, a pure function of (seed, client, step),
  instead of Accelerate's world-sharded sampler (which would hand each client 1/world of its own rows);
- loss: the model's own mean loss per micro-batch divided by the accumulation steps (``model_accepts_loss_kwargs``
  is off), as DeepSpeed and the launcher compute it;
- outputs: every client writes its own Trainer checkpoints under ``output_dir/client_<c>/checkpoint-<N>`` (the
  Trainer's layout: weights, ``optimizer.pt`` with BlockAdam's ``state_dict`` or DeepSpeed's ``global_step<N>/``,
  ``scheduler.pt``, ``trainer_state.json``, RNG states, plus ``deca_state.pt`` with the Mixer's byte counters);
  ``resume_from_checkpoint=True`` continues every client from its own latest checkpoint. World rank 0 writes
  ``output_dir/metrics.jsonl`` (the launcher's records) and ``output_dir/training.png``;
  :meth:`DecaTrainerMixin.save_consensus_model` writes the average of all clients as a Hugging Face model directory.

Limits (refused with a one-line error naming the fix): DeepSpeed ZeRO stages 1-3 (use ``recipes/finetune.py``,
whose engine re-initializes DeepSpeed at every block switch), DeepSpeed ``bf16``/``fp16`` sections (load the model in
bf16 instead; BlockAdam keeps the fp32 master), a DeepSpeed ``optimizer`` section, ``fp16=True`` (use ``bf16``),
an ``optim`` other than AdamW, ``optim_args``, ``optimizers=``/``optimizer_cls_and_kwargs=`` (BlockAdam is the
optimizer), a ``train_sampling_strategy`` other than ``random`` (or ``group_by_length``), a ``data_seed``
other than ``data.seed`` (the batches are ClientBatchSampler's), and at ``train()`` a new run in an ``output_dir``
that holds one (pass ``resume_from_checkpoint``).
A non-finite loss or gradient skips that client's update (the block schedule still advances), as
``nan_policy=skip``. ``trainer.evaluate()`` reports this client's own model on its whole ``eval_dataset``, with no
collective (the base Trainer, which sees the whole world, would shard and gather over every client); with several
clients the ``metric_for_best_model`` value is the mean over clients, so ``load_best_model_at_end``,
``EarlyStoppingCallback`` and ``save_strategy="best"`` decide the same on every client (the client's own value is
logged as ``<metric>_client``; see :meth:`DecaTrainerMixin._agree_on_best_metric`). Evaluate ``consensus/`` for the
run's result. The Trainer's counts are the client's too: ``train_samples_per_second``, ``total_flos``,
``num_input_tokens_seen`` and the log's "Total train batch size" sum over the client's ranks (the base Trainer sums
over the world), and ``eval_steps_per_second`` counts the steps this rank ran.

Why this module touches DeepSpeed (the only one outside ``deca_ds.engine``): Accelerate calls
``deepspeed.initialize`` itself and has no way to pass an ``mpu``; :func:`_client_mpu_initialize` wraps that one call.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from deca_ds.config import ConfigError, RunConfig, load_config
from deca_ds.gossip import client_distance

__all__ = ["DecaSettings", "DecaTrainerMixin", "DecaTrainer", "deca_trainer_class", "init_distributed",
           "finish_distributed", "ClientBatchSampler", "DataCollator", "schedule_arguments"]

DECA_STATE_NAME = "deca_state.pt"
"""Per-client file next to the Trainer's ``optimizer.pt`` in a checkpoint: the Mixer's cumulative byte counters."""

# Settings that TrainingArguments owns: they are copied from it into the run's settings (see DecaSettings.resolve).
# The learning-rate schedule and epochs are the Trainer's too (its own scheduler steps BlockAdam's rate), but a
# deca_ds value set for them must agree with TrainingArguments (see _resolve_schedule).
_FROM_TRAINING_ARGS = ("optim.lr", "optim.betas", "optim.eps", "optim.weight_decay", "seed", "max_steps",
                       "output_dir", "optim.schedule", "optim.warmup_steps", "optim.warmup_ratio", "epochs")


def _hf_has_warmup_ratio() -> bool:
    """transformers < 5 has ``warmup_ratio``; 5.x dropped it and reads ``warmup_steps < 1`` as the ratio."""
    from transformers import TrainingArguments

    return "warmup_ratio" in TrainingArguments.__dataclass_fields__


def schedule_arguments(cfg: RunConfig) -> dict[str, Any]:
    """``TrainingArguments`` keywords that give the Trainer the learning-rate schedule and length of ``cfg``.

    deca_ds's ``optim.schedule`` names are HF's ``lr_scheduler_type`` names (:mod:`deca_ds.lr_schedule` equals
    transformers' schedulers step for step) with one exception: HF's ``constant`` ignores any warm-up, so a constant
    rate after a warm-up is HF's ``constant_with_warmup``. ``epochs`` becomes ``num_train_epochs`` with ``max_steps
    -1`` (:class:`DecaTrainerMixin` then derives the same step count for every client as the recipe does).

    Args:
        cfg: the run's settings.

    Returns:
        ``lr_scheduler_type``, the warm-up (``warmup_steps``, or ``warmup_ratio`` where this transformers has it) and
        ``max_steps`` (and ``num_train_epochs`` with ``epochs``).
    """
    o = cfg.optim
    warm = o.warmup_steps > 0 or o.warmup_ratio > 0
    kwargs: dict[str, Any] = {"lr_scheduler_type": o.schedule if o.schedule != "constant" else
                              ("constant_with_warmup" if warm else "constant")}
    if o.warmup_steps > 0:
        kwargs["warmup_steps"] = o.warmup_steps
    elif o.warmup_ratio > 0:
        kwargs["warmup_ratio" if _hf_has_warmup_ratio() else "warmup_steps"] = o.warmup_ratio
    if cfg.epochs is not None:
        kwargs.update(num_train_epochs=float(cfg.epochs), max_steps=-1)
    else:
        kwargs["max_steps"] = cfg.max_steps
    return kwargs


def _hf_schedule(args) -> tuple[str, int, float] | None:
    """The Trainer's schedule as deca_ds settings ``(optim.schedule, warmup_steps, warmup_ratio)``, or None when
    deca_ds has no equal (``cosine_with_restarts``, scheduler kwargs, ...)."""
    name = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if getattr(args, "lr_scheduler_kwargs", None):
        return None
    ws = float(args.warmup_steps or 0)
    steps, ratio = (int(ws), 0.0) if ws >= 1 else (0, ws) if ws > 0 else (0, float(getattr(args, "warmup_ratio", 0)
                                                                                    or 0.0))
    if name == "constant":  # HF's constant schedule ignores the warm-up settings
        return "constant", 0, 0.0
    if name == "constant_with_warmup":
        return "constant", steps, ratio
    if name in ("linear", "cosine"):
        return name, steps, ratio
    return None


def _resolve_schedule(cfg: RunConfig, args) -> None:
    """Take the Trainer's schedule and length into ``cfg`` (in place); refuse a deca_ds value that disagrees.

    Under DecaTrainer the Trainer's own scheduler sets BlockAdam's rate every step (``lr_scheduler_type``, warm-up,
    ``num_train_epochs``); deca_ds's per-step ``set_lr`` (the recipe's loop) is not run, so a rate is never applied
    twice. ``optim.schedule``/``optim.warmup_*``/``epochs`` in the deca_ds settings are therefore only accepted when
    they say what TrainingArguments says (e.g. one recipe YAML used for both paths).

    Raises:
        ConfigError: a deca_ds schedule or ``epochs`` that TrainingArguments does not give.
    """
    o = cfg.optim
    ours = (o.schedule, o.warmup_steps, 0.0 if o.warmup_steps > 0 else o.warmup_ratio)
    theirs = _hf_schedule(args)
    name = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if ours != ("constant", 0, 0.0) and ours != theirs:
        flags = " ".join(f"--{k} {v}" for k, v in schedule_arguments(cfg).items() if k != "max_steps"
                         and k != "num_train_epochs")
        raise ConfigError(f"optim.schedule={o.schedule} (warm-up steps {o.warmup_steps}, ratio {o.warmup_ratio:g}) "
                          f"disagrees with TrainingArguments lr_scheduler_type={name} (warmup_steps "
                          f"{args.warmup_steps}): under DecaTrainer the Trainer's scheduler sets the rate; give the "
                          f"Trainer {flags} or drop optim.schedule/optim.warmup_* from the deca_ds settings")
    epoch_based = not (args.max_steps and args.max_steps > 0)
    if cfg.epochs is not None and (not epoch_based or float(args.num_train_epochs) != float(cfg.epochs)):
        raise ConfigError(f"epochs={cfg.epochs:g} disagrees with TrainingArguments (max_steps={args.max_steps}, "
                          f"num_train_epochs={args.num_train_epochs:g}): under DecaTrainer the Trainer counts the "
                          f"steps; give it --num_train_epochs {cfg.epochs:g} --max_steps -1, or drop epochs")
    if theirs is not None:
        cfg.optim = dataclasses.replace(cfg.optim, schedule=theirs[0], warmup_steps=theirs[1], warmup_ratio=theirs[2])
    cfg.epochs = float(args.num_train_epochs) if epoch_based else None


def init_distributed(comm_timeout: float = 300.0) -> None:
    """Start torch.distributed the way deca_ds's launcher does (idempotent).

    Optional: call it before building ``TrainingArguments``. The Trainer would start the process group itself; doing
    it here first also skips DeepSpeed's unused shared-memory op on CPU (about 45 s of JIT compilation per cold
    start, docs/design.md §3). A plain ``python train.py`` becomes a one-rank world.

    Args:
        comm_timeout: seconds a collective may wait (the recipe's ``comm_timeout``).
    """
    from deca_ds.engine import setup_distributed

    setup_distributed(comm_timeout)


def finish_distributed() -> None:
    """Leave the process group at the end of a script, as ``recipes/finetune.py`` does (idempotent).

    Call it on every rank after the last collective (``save_consensus_model``): a barrier, so no rank tears its
    connections down while a neighbour is still exchanging, then ``destroy_process_group``. Hazard: a gloo group left
    to interpreter exit occasionally aborts a rank after a finished run ("terminate called without an active
    exception", exit -6, seen in CI after both clients had trained and written their results). Does nothing when no
    process group is up (a Trainer or Accelerate that already destroyed it).
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()


class DecaSettings:
    """The DECA side of a Trainer run: method, blocks, topology, clients (and any other deca_ds setting).

    Everything is a :class:`deca_ds.config.RunConfig` underneath, checked as strictly as the recipe's settings, so
    the same keys and values work in both (docs/reference.md, "Running a fine-tune"). ``TrainingArguments`` owns the
    optimizer hyperparameters, the seed, ``max_steps`` and ``output_dir``: those are taken from it (:meth:`resolve`).

    Attributes:
        config: the settings (before :meth:`resolve`).
    """

    def __init__(self, method: str | None = None, blocks: dict[str, Any] | None = None,
                 topology: str | dict[str, Any] | None = None, clients: int | dict[str, Any] | None = None, *,
                 config: str | os.PathLike | None = None, overrides: Sequence[str] = ()):
        """Args:
            method: ``deca`` (default), ``badam_gossip``, ``trivial_bma``, ``dadam`` or ``local``.
            blocks: ``blocks`` settings, e.g. ``{"layers_per_block": 2, "switch_every": 48}``.
            topology: a graph name (``ring``, ``erdos_renyi``, ...) or ``topology`` settings.
            clients: ranks per client (default 1), or ``clients`` settings.
            config: a recipe YAML to start from (e.g. ``recipes/configs/default.yaml``).
            overrides: dotted ``key=value`` settings applied last, e.g. ``["deca.signal=raw", "gossip.dtype=bf16"]``.

        Raises:
            ConfigError: an unknown key or a bad value (one line naming it and the fix).
        """
        items: list[str] = []
        if method is not None:
            items.append(f"method={method}")
        for key, value in (blocks or {}).items():
            items.append(f"blocks.{key}={_yaml_value(value)}")
        if isinstance(topology, str):
            items.append(f"topology.name={topology}")
        else:
            items += [f"topology.{k}={_yaml_value(v)}" for k, v in (topology or {}).items()]
        if isinstance(clients, int):
            items.append(f"clients.ranks_per_client={clients}")
        else:
            items += [f"clients.{k}={_yaml_value(v)}" for k, v in (clients or {}).items()]
        self.config = load_config(config, items + list(overrides))
        if self.config.method == "centralized":
            raise ConfigError("method=centralized is the plain Trainer: use transformers.Trainer with DDP/DeepSpeed "
                              "for it, or recipes/finetune.py method=centralized")
        if self.config.backend != "launcher":
            raise ConfigError("backend=simulate runs every client in one process: use recipes/finetune.py for it")
        if self.config.optim.fused_backward:
            raise ConfigError("optim.fused_backward=true is not supported with the Hugging Face Trainer (it clips and "
                              "checks gradients after backward): set optim.fused_backward=false, or use "
                              "recipes/finetune.py")

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> tuple["DecaSettings", list[str]]:
        """Split a command line into deca_ds settings and the rest (for ``HfArgumentParser``).

        ``--deca_config PATH`` names a recipe YAML; every ``key=value`` item without leading dashes is a deca_ds
        setting. Everything else is returned for the Trainer's parser.

        Returns:
            ``(settings, remaining_argv)``.
        """
        config, overrides, rest = None, [], []
        it = iter(argv)
        for item in it:
            if item in ("--deca_config", "--deca-config"):
                config = next(it, None)
                if config is None:
                    raise ConfigError("--deca_config needs a path: write --deca_config recipes/configs/default.yaml")
            elif item.startswith(("--deca_config=", "--deca-config=")):
                config = item.split("=", 1)[1]
            elif not item.startswith("-") and "=" in item:
                overrides.append(item)
            else:
                rest.append(item)
        return cls(config=config, overrides=overrides), rest

    # --- where this rank is ----------------------------------------------------------------------------------------

    def layout(self):
        """This rank's :class:`deca_ds.gossip.ClientLayout`, from the launcher's ``RANK``/``WORLD_SIZE`` (or the
        started process group).

        Raises:
            ConfigError: ``clients.ranks_per_client`` does not divide the launched ranks.
        """
        from deca_ds.gossip import ClientLayout

        if dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
        else:
            world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        rpc = self.config.clients.ranks_per_client
        if world % rpc:
            raise ConfigError(f"clients.ranks_per_client={rpc} does not divide the {world} launched ranks: launch a "
                              "multiple of it or change it")
        return ClientLayout(world, rank, rpc)

    @property
    def client_id(self) -> int:
        """The client this rank trains (use it to pick the client's own rows)."""
        return self.layout().client_id

    @property
    def num_clients(self) -> int:
        """Clients in the launch (launched ranks / ``clients.ranks_per_client``)."""
        return self.layout().num_clients

    def client_data(self, tokenizer):
        """This client's partition of ``data`` (the embedded synthetic task, or ``data.path`` split by
        ``data.partition``), tokenized exactly as the recipe tokenizes it.

        Returns:
            A :class:`deca_ds.data.ClientData`; pass ``.train`` as the Trainer's ``train_dataset``.
        """
        from deca_ds.data import build_client_data

        layout = self.layout()
        return build_client_data(self.config, tokenizer, layout.client_id, layout.num_clients)

    def resolve(self, args) -> RunConfig:
        """The run's settings with what ``TrainingArguments`` owns copied in (lr, betas, eps, weight decay, seed,
        ``max_steps`` when set, ``output_dir``, the learning-rate schedule and ``num_train_epochs``).

        Args:
            args: the Trainer's ``TrainingArguments`` (or TRL's ``SFTConfig``).

        Raises:
            ConfigError: ``optim.schedule``/warm-up or ``epochs`` set in the deca_ds settings to something
                TrainingArguments does not say (the Trainer's scheduler owns the rate; see :func:`schedule_arguments`),
                or a ``data_seed`` other than ``data.seed`` (the batches are drawn with ``data.seed``).
        """
        cfg = dataclasses.replace(self.config)
        cfg.optim = dataclasses.replace(cfg.optim, lr=float(args.learning_rate),
                                        betas=[float(args.adam_beta1), float(args.adam_beta2)],
                                        eps=float(args.adam_epsilon), weight_decay=float(args.weight_decay))
        cfg.seed = int(args.seed)
        data_seed = getattr(args, "data_seed", None)
        if data_seed is not None and int(data_seed) != cfg.data.seed:
            raise ConfigError(f"TrainingArguments data_seed={data_seed} would be ignored (DecaTrainer shuffles each "
                              f"client's batches with data.seed={cfg.data.seed}, which also splits the data): drop "
                              f"--data_seed and set data.seed={data_seed} in the deca_ds settings")
        if args.max_steps and args.max_steps > 0:
            cfg.max_steps = int(args.max_steps)
        cfg.output_dir = str(args.output_dir)
        _resolve_schedule(cfg, args)
        return cfg.validate()


def _yaml_value(value: Any) -> str:
    """A Python value as the YAML text of a dotted override."""
    import json

    return json.dumps(value) if not isinstance(value, str) else value


# -------------------------------------------------------------------------------------------------------------------
# Batches


class ClientBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of one rank of one client, as the launcher draws them.

    Micro-batch ``k`` of the run (``k = step * accumulation_steps + micro``) holds the rows
    ``batch_indices(len(dataset), k * ranks_per_client + local_rank, micro_batch, seed, client)``: a permutation per
    pass over the client's rows from ``numpy.random.default_rng([seed, client, pass])``, so batches are a pure function
    of (seed, client, step), equal to ``recipes/finetune.py``'s and unchanged by a resume.

    One Trainer "epoch" is ``len(self)`` micro-batches (a multiple of the accumulation steps, so optimizer steps never
    straddle epochs); :meth:`set_epoch` (the Trainer calls it) continues the micro-batch count across epochs.
    """

    def __init__(self, num_rows: int, micro_batch: int, accumulation_steps: int, seed: int, layout):
        """Args:
            num_rows: rows of this client's training set.
            micro_batch: rows per micro-batch on this rank.
            accumulation_steps: micro-batches per optimizer step.
            seed: the shuffling seed (``data.seed``).
            layout: this rank's :class:`deca_ds.gossip.ClientLayout`.
        """
        if num_rows < 1:
            raise ConfigError(f"client {layout.client_id} has no training rows: give every client data")
        self.num_rows, self.micro_batch, self.accumulation = num_rows, micro_batch, accumulation_steps
        self.seed, self.layout = seed, layout
        per_pass = math.ceil(num_rows / (micro_batch * layout.ranks_per_client))
        self.length = math.ceil(per_pass / accumulation_steps) * accumulation_steps
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at micro-batch ``epoch * len(self)``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[list[int]]:
        from deca_ds.data.loading import batch_indices

        rpc, local = self.layout.ranks_per_client, self.layout.local_rank
        for i in range(self.length):
            k = self.epoch * self.length + i
            yield batch_indices(self.num_rows, k * rpc + local, self.micro_batch, self.seed,
                                self.layout.client_id).tolist()


class _EpochDataLoader(torch.utils.data.DataLoader):
    """A DataLoader whose ``set_epoch`` reaches its batch sampler (the Trainer calls ``set_epoch`` on the loader)."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


class DataCollator:
    """Right-pad tokenized rows as the recipe does (:func:`deca_ds.data.collate`: labels ``-100`` and mask ``0`` on
    padding); a Trainer ``data_collator`` for rows with ``input_ids``, ``labels`` and ``attention_mask``."""

    def __init__(self, pad_token_id: int):
        """Args:
            pad_token_id: the tokenizer's padding id.
        """
        self.pad_token_id = int(pad_token_id)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from deca_ds.data import collate

        # TRL's SFTTrainer drops columns outside its own signature list, attention_mask among them: an unpadded row's
        # mask is all ones, so it is rebuilt from the row's length (equal to the recipe's rows).
        masks = [r["attention_mask"] if "attention_mask" in r else _ones_like(r["input_ids"]) for r in rows]
        return collate({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows],
                        "attention_mask": masks}, self.pad_token_id)


def _ones_like(ids: Any) -> Any:
    return torch.ones_like(ids) if isinstance(ids, torch.Tensor) else [1] * len(ids)


# -------------------------------------------------------------------------------------------------------------------
# DeepSpeed: the client's mpu through Accelerate's deepspeed.initialize call


@contextmanager
def _client_mpu_initialize(mpu, ranks_per_client: int):
    """While active, ``deepspeed.initialize`` gets ``mpu`` and a ``train_batch_size`` of one client's ranks.

    Accelerate fills ``train_batch_size`` as micro x accumulation x world size; with the client's data-parallel
    group DeepSpeed checks it against micro x accumulation x ranks_per_client, so it is restated here.
    """
    import importlib

    ds_module = importlib.import_module("deepspeed")
    original = ds_module.initialize

    def initialize(*args, **kwargs):
        config = kwargs.get("config_params", kwargs.get("config"))
        if isinstance(config, dict):
            config["train_batch_size"] = (int(config["train_micro_batch_size_per_gpu"])
                                          * int(config["gradient_accumulation_steps"]) * ranks_per_client)
        kwargs.setdefault("mpu", mpu)
        return original(*args, **kwargs)

    ds_module.initialize = initialize
    try:
        yield
    finally:
        ds_module.initialize = original


def _check_trainer_ds_config(ds: dict[str, Any], cfg: RunConfig, world_size: int, micro: int, gas: int) -> None:
    """The launcher's ds_config checks (:func:`deca_ds.ds_config.check_ds_config`) on the Trainer's DeepSpeed config,
    plus the stage the Trainer path supports (0).

    Raises:
        ConfigError: ZeRO 1-3, a bf16/fp16 section, an ``optimizer`` section, parameter offload, ..., or what
            DeepSpeed itself refuses (:func:`deca_ds.engine.ds_check.check_with_deepspeed`).
    """
    from deca_ds.ds_config import check_ds_config, zero_stage

    ds = {k: v for k, v in ds.items() if v != "auto"}
    if zero_stage(ds) != 0:
        raise ConfigError(f"ds_config zero_optimization.stage={zero_stage(ds)}: deca_ds.hf runs DeepSpeed ZeRO stage "
                          "0 (BlockAdam is the client optimizer); for ZeRO 1-3 use recipes/finetune.py, whose engine "
                          "re-initializes DeepSpeed at every block switch")
    for key in ("bf16", "fp16"):
        section = ds.get(key)
        if isinstance(section, dict) and section.get("enabled") is True:
            raise ConfigError(f"ds_config enables {key} (or --{key} set it): with deca_ds load the model in {key} "
                              f"(dtype=torch.{'bfloat16' if key == 'bf16' else 'float16'}) and leave --{key} off; "
                              "BlockAdam keeps the fp32 master of the active block itself")
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=gas)
    ds.pop("train_batch_size", None)
    check_ds_config(ds, cfg, world_size=world_size)
    from deca_ds.engine.ds_check import check_with_deepspeed

    check_with_deepspeed(ds, cfg)  # what deepspeed.initialize inside trainer.train() would refuse


# -------------------------------------------------------------------------------------------------------------------
# The trainer

# ``--optim`` values that name plain AdamW: BlockAdam performs that update (one block at a time), with the
# TrainingArguments' learning rate, betas, eps and weight decay. Any other value would be silently replaced.
_ADAMW_OPTIMS = ("adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused")


def _check_trainer_arguments(training_args, trainer_kwargs: dict[str, Any]) -> None:
    """Refuse Trainer inputs that DecaTrainer would otherwise ignore or mis-handle, before any process group exists.

    Args:
        training_args: the ``TrainingArguments`` (or a subclass such as TRL's ``SFTConfig``).
        trainer_kwargs: the base Trainer's constructor arguments by name (positional ones bound to their names).

    Raises:
        ConfigError: one line naming the setting and the fix.
    """
    # DecaTrainer always builds BlockAdam (create_optimizer) and registers DECA's step hooks on it. A user optimizer
    # would run without gossip and crash at the first clipping; an optimizer class would be dropped silently.
    optimizers = trainer_kwargs.get("optimizers") or (None, None)
    if any(o is not None for o in optimizers) or trainer_kwargs.get("optimizer_cls_and_kwargs") is not None:
        raise ConfigError("optimizers=/optimizer_cls_and_kwargs= cannot be used with DecaTrainer (it builds BlockAdam, "
                          "the DECA optimizer, and the Trainer's scheduler on it): drop them and set learning_rate, "
                          "adam_beta1/2, adam_epsilon, weight_decay and lr_scheduler_type in TrainingArguments")
    optim = str(getattr(training_args.optim, "value", training_args.optim))
    if optim not in _ADAMW_OPTIMS:
        raise ConfigError(f"TrainingArguments optim={optim}: DecaTrainer always runs BlockAdam (block-wise AdamW); "
                          f"drop --optim or use --optim adamw_torch (other optimizers: recipes/finetune.py "
                          "method=centralized or a plain Trainer)")
    # ClientBatchSampler draws every rank's batches (the launcher's, a pure function of seed, client and step): the
    # Trainer's own sampler choice would be dropped silently.
    strategy = str(getattr(training_args, "train_sampling_strategy", "random"))
    if getattr(training_args, "group_by_length", False) or strategy != "random":
        name = "group_by_length=True" if getattr(training_args, "group_by_length", False) else \
            f"train_sampling_strategy={strategy}"
        raise ConfigError(f"TrainingArguments {name} would be ignored (DecaTrainer draws each client's batches "
                          "with its own shuffled sampler, as recipes/finetune.py): drop it")
    if getattr(training_args, "optim_args", None):
        raise ConfigError(f"TrainingArguments optim_args={training_args.optim_args!r} would be ignored (DecaTrainer "
                          "runs BlockAdam): drop --optim_args; BlockAdam takes adam_beta1/2, adam_epsilon and "
                          "weight_decay from TrainingArguments and the rest from deca_ds settings (optim.*)")
    # Hazard: fp16 mixed precision without DeepSpeed means Accelerate's GradScaler. DecaTrainer clips the scaled
    # gradients itself (the base class would unscale first), so BlockAdam would receive gradients 1/scale too small,
    # and on an overflow the scaler skips optimizer.step() - and with it this client's gossip exchange - on this
    # client only, desynchronising it from its neighbours. Under DeepSpeed the fp16 section is refused as well.
    if getattr(training_args, "fp16", False):
        raise ConfigError("TrainingArguments fp16=True is not supported by DecaTrainer (its loss scaler skips "
                          "optimizer steps and with them the clients' gossip exchanges): drop --fp16 and use --bf16, "
                          "or load the model in bf16 (dtype=torch.bfloat16)")


@contextmanager
def _shadowed(obj: Any, name: str, value: Any) -> Iterator[None]:
    """While active, ``obj.<name>`` is ``value`` (an instance attribute over the class's method); afterwards exactly
    what it was (an instance attribute already there is put back, not deleted)."""
    missing = object()
    before = vars(obj).get(name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if before is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, before)


def _existing_run(run_dir: Path) -> str | None:
    """What in ``run_dir`` a new DecaTrainer run would overwrite or mix with (None: nothing).

    A DecaTrainer run writes ``metrics.jsonl``, ``client_<c>/checkpoint-<N>`` and ``consensus/`` there.
    """
    found = [p.name for p in (run_dir / "metrics.jsonl", run_dir / "consensus") if p.exists()]
    found += sorted(str(p.relative_to(run_dir)) for p in run_dir.glob("client_*/checkpoint-*"))[:2]
    return ", ".join(found) or None


def _complete_checkpoint_steps(client_dir: Path) -> list[int]:
    """Steps N of the complete ``checkpoint-<N>`` directories in ``client_dir`` (see ``_common_checkpoint``)."""
    steps = []
    for p in client_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        n = p.name[len(PREFIX_CHECKPOINT_DIR) + 1:]
        if n.isdigit() and (p / TRAINER_STATE_NAME).is_file() and (p / DECA_STATE_NAME).is_file():
            steps.append(int(n))
    return steps


def _client_args(args, writer: bool, output_dir: str):
    """``args`` with ``output_dir`` set to the client's directory and ``should_save`` true on the client's first rank.

    The Trainer saves only on world rank 0 (``should_save``); every client must save its own checkpoints. The class is
    swapped for a subclass whose ``should_save`` is per client; it pickles as the original class
    (``training_args.bin`` loads without deca_ds).
    """
    cls = type(args)
    if not getattr(cls, "_deca_client_args", False):
        base = cls

        def reduce_ex(self, protocol):
            state = {k: v for k, v in self.__dict__.items() if k != "_deca_writer"}
            return object.__new__, (base,), state

        cls = type(f"Deca{base.__name__}", (base,), {
            "should_save": property(lambda self: self._deca_writer),
            "_deca_client_args": True,
            "__reduce_ex__": reduce_ex,
        })
    args.__class__ = cls
    args._deca_writer = writer
    args.output_dir = output_dir
    # A compute_loss_func normalises by num_items_in_batch. With average_tokens_across_devices the Trainer gathers
    # the count over every process it sees (every rank of every client: args.world_size is the launched world, see
    # the evaluation hazard in DecaTrainerMixin), which would divide a client's loss by other clients' tokens. A
    # client's loss is its own: DecaTrainerMixin._get_num_items_in_batch (transformers 4.x: get_batch_samples) counts
    # over the client's ranks.
    if hasattr(args, "average_tokens_across_devices"):
        args.average_tokens_across_devices = False
    return args


class DecaTrainerMixin:
    """Turns a ``transformers.Trainer`` (or a subclass such as TRL's ``SFTTrainer``) into one client of a DECA run.

    Use :class:`DecaTrainer`, or ``deca_trainer_class(SFTTrainer)`` for another base class. Every launched rank
    builds one; construction is collective (process groups). See the module docstring for what changes.

    Attributes:
        deca_config: the run's settings (:meth:`DecaSettings.resolve` of the ``deca`` argument).
        layout: this rank's :class:`deca_ds.gossip.ClientLayout`.
        groups: the :class:`deca_ds.gossip.ClientGroups`.
        mixer: the :class:`deca_ds.gossip.Mixer` (None for ``method=local``).
        consensus: the :class:`deca_ds.consensus.ConsensusStep` (after the optimizer exists).
        run_dir: the ``output_dir`` given (``metrics.jsonl``, the PNG and the consensus model go here).
    """

    def __init__(self, *args, deca: DecaSettings | None = None, **kwargs):
        """Args:
            *args: the base Trainer's positional arguments.
            deca: the DECA settings (default: ``DecaSettings()``, the recipe's defaults).
            **kwargs: the base Trainer's keyword arguments (``model``, ``args``, ``train_dataset``, ...).

        Raises:
            ConfigError: settings the Trainer path cannot honour (one line naming the fix), before training.
        """
        from deca_ds.build import build_topology, check_blocks
        from deca_ds.consensus import method_spec
        from deca_ds.gossip import ClientGroups, Mixer

        training_args = kwargs.get("args") if "args" in kwargs else (args[1] if len(args) > 1 else None)
        if training_args is None:
            raise ConfigError("DecaTrainer needs args=TrainingArguments(output_dir=...): the run's directory, "
                              "learning rate and steps come from it")
        try:
            named = inspect.signature(super().__init__).bind_partial(*args, **kwargs).arguments
        except TypeError:  # a base class signature the arguments do not bind to: its own error follows
            named = kwargs
        _check_trainer_arguments(training_args, named)
        deca = deca if deca is not None else DecaSettings()
        cfg = deca.resolve(training_args)
        init_distributed(cfg.comm_timeout)
        layout = deca.layout()
        spec = method_spec(cfg.method)
        if cfg.model.path is not None:
            check_blocks(cfg)
        topology = build_topology(cfg, layout.num_clients) if spec.gossip else None
        if topology is not None:
            layout.check_topology(topology)
        if getattr(training_args, "deepspeed", None):
            ds = training_args.hf_deepspeed_config.config
            _check_trainer_ds_config(ds, cfg, layout.world_size, training_args.per_device_train_batch_size,
                                     training_args.gradient_accumulation_steps)
            from deca_ds.lr_schedule import uses_schedule

            if "scheduler" in ds and uses_schedule(deca.config):
                raise ConfigError(f"optim.schedule={deca.config.optim.schedule} (with warm-up) and the ds_config "
                                  "'scheduler' section both set the learning rate (the Trainer then runs "
                                  "DeepSpeed's): remove one of them")
        self.deca_config, self.layout = cfg, layout
        self.run_dir = Path(training_args.output_dir)
        self.groups = ClientGroups.create(layout)  # collective, same order everywhere, before DeepSpeed
        self.mixer = None
        if topology is not None:
            self.mixer = Mixer(layout, topology, chunk_bytes=int(cfg.gossip.chunk_mb * 2**20),
                               comm_dtype=torch.bfloat16 if cfg.gossip.dtype == "bf16" else torch.float32,
                               timeout=cfg.comm_timeout, dp_group=self.groups.client_group)
        self.consensus = None
        self._micro_losses: list[torch.Tensor] = []
        self._nonfinite_since_log = False  # a non-finite step between log steps, reported at the next one
        self._step_figures = {"bytes_sent": 0, "nonfinite": False, "block": 0}
        self._grads_reduced = False
        self._stop_agreed_at, self._stop_agreed, self._stop_pending = None, False, False  # _agree_on_stop
        self._writer = None
        self._t0 = time.perf_counter()
        _client_args(training_args, layout.local_rank == 0,
                     str(self.run_dir / f"client_{layout.client_id}"))
        super().__init__(*args, **kwargs)
        # A base class may have rebuilt its arguments (TRL's SFTTrainer turns TrainingArguments into an SFTConfig).
        _client_args(self.args, layout.local_rank == 0, str(self.run_dir / f"client_{layout.client_id}"))
        # The model's own mean loss per micro-batch (not HF's token-count normalisation across micro-batches and
        # devices): what the launcher and DeepSpeed compute.
        self.model_accepts_loss_kwargs = False
        if not self.is_deepspeed_enabled:
            self._no_world_ddp()
        self.add_callback(_DecaCallback(self))

    # --- the run's length ------------------------------------------------------------------------------------------

    def train(self, *args, **kwargs):
        """The base class's ``train``, after fixing the run's length for every client (collective).

        With ``max_steps`` unset (``num_train_epochs``), the Trainer would count each client's own rows, and
        non-IID clients hold different amounts: the clients would stop at different steps while their neighbours
        wait for a gossip exchange. Every client instead takes the recipe's step count for ``epochs``
        (:func:`deca_ds.lr_schedule.steps_for_epochs` of the mean client's rows), so the Trainer's schedule,
        the block schedule and the stop are the same everywhere and equal to ``recipes/finetune.py epochs=N``.

        A new run (no ``resume_from_checkpoint``) in an ``output_dir`` that already holds a DecaTrainer run is
        refused, as ``recipes/finetune.py`` refuses it: it would rewrite ``metrics.jsonl`` and same-numbered
        checkpoints, and leave the old run's later checkpoints for a resume to pick up.

        ``resume_from_checkpoint=True`` resumes every client from the latest step that every client has a
        complete checkpoint of (the Trainer alone would take each rank's own latest directory: after a kill during
        a save the clients would resume at different steps, and a client with none raised while its neighbours
        waited in the first gossip exchange until the timeout).

        Raises:
            ConfigError: ``output_dir`` holds a run and ``resume_from_checkpoint`` is not given, or
                ``resume_from_checkpoint=True`` finds no step every client has a complete checkpoint of (nothing
                changed; raised on every rank), or ``resume_from_checkpoint`` names a path that is not a directory.
        """
        resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        if not resume:
            self._refuse_existing_run()
        elif resume is True:
            kwargs["resume_from_checkpoint"] = self._common_checkpoint()
            args = args[1:]
        elif isinstance(resume, (str, os.PathLike)) and not os.path.isdir(resume):  # the Trainer's bare ValueError
            raise ConfigError(f"resume_from_checkpoint={str(resume)!r} is not a checkpoint directory: give "
                              f"{str(self.run_dir)!r}/client_<c>/checkpoint-<N> of this client, or True for the latest "
                              "step every client has")
        if not (self.args.max_steps and self.args.max_steps > 0):
            self._steps_from_epochs()
        self._agree_on_evaluation()
        # The Trainer's only accelerator.gather calls in training count tokens over the data-parallel processes
        # (num_input_tokens_seen; and num_items_in_batch, off by _client_args): a client's are its own ranks.
        with _shadowed(self.accelerator, "gather", self._gather_client):
            return super().train(*args, **kwargs)

    def get_total_train_batch_size(self, args) -> int:
        """Rows per optimizer step of this client: micro-batch x accumulation steps x the client's ranks.

        The base class multiplies by the world it sees (every rank of every client), which made a client's
        ``train_samples_per_second`` and its log's "Total train batch size" count every client's rows."""
        return self._train_batch_size * args.gradient_accumulation_steps * self.layout.ranks_per_client

    def store_flos(self) -> None:
        """Add the FLOPs since the last call to ``state.total_flos``, summed over this client's ranks.

        The base class sums over the world (an all-gather over every rank of every client): every client's
        ``total_flos`` held the whole run's. Summed in float64 within the client's group; ``current_flos`` is reset."""
        from deca_ds.engine import device

        flos = float(self.current_flos)
        if self.layout.ranks_per_client > 1:
            t = torch.tensor([flos], dtype=torch.float64, device=device())
            dist.all_reduce(t, group=self.groups.client_group)
            flos = float(t.item())
        self.state.total_flos += flos
        self.current_flos = 0

    def _refuse_existing_run(self) -> None:
        """Raise on every rank when any rank sees a previous run in ``output_dir`` (collective).

        Hazard: without a shared filesystem only world rank 0 sees ``metrics.jsonl``; a refusal on some ranks only
        would leave the others waiting in the first gossip exchange, so the finding is all-reduced.
        """
        from deca_ds.engine import device

        found = _existing_run(self.run_dir)
        flag = torch.tensor([1.0 if found else 0.0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if float(flag) > 0:
            raise ConfigError(f"output_dir={str(self.run_dir)!r} already holds a DecaTrainer run "
                              f"({found or 'seen by another rank'}): pass resume_from_checkpoint=True to continue it, "
                              "or choose another output_dir (nothing there was changed)")

    def _common_checkpoint(self) -> str:
        """This client's ``checkpoint-<N>`` for the latest N every rank has a complete checkpoint of (collective).

        Complete: ``trainer_state.json`` (the Trainer writes it last) and ``deca_state.pt`` are both there, so a
        directory left by a kill during a save is passed over, on every client alike.
        """
        out = Path(self.args.output_dir)
        steps = sorted(_complete_checkpoint_steps(out))
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, steps)
        common = set.intersection(*(set(g) for g in gathered))
        if not common:
            rpc = self.layout.ranks_per_client
            none = sorted({r // rpc for r, g in enumerate(gathered) if not g})
            latest = {r // rpc: g[-1] for r, g in enumerate(gathered) if g}
            why = (f"client(s) {none} have no complete checkpoint" if none
                   else f"the clients share no checkpoint step (latest per client: {latest})")
            raise ConfigError(f"resume_from_checkpoint=True: {why} under {str(self.run_dir)!r}/client_<c>/: resume "
                              "needs one step every client saved; start a new run in another output_dir "
                              "(nothing was changed)")
        return str(out / f"{PREFIX_CHECKPOINT_DIR}-{max(common)}")

    def _steps_from_epochs(self) -> None:
        from deca_ds.engine import device
        from deca_ds.lr_schedule import steps_for_epochs

        if self.train_dataset is None:
            raise ConfigError("DecaTrainer needs a train_dataset: this client's rows")
        if not hasattr(self.train_dataset, "__len__"):
            raise ConfigError("num_train_epochs needs a train_dataset with a length (an iterable dataset has none): "
                              "give TrainingArguments max_steps instead")
        rows = torch.tensor([float(len(self.train_dataset))], dtype=torch.float64, device=device())
        dist.all_reduce(rows)  # every client has the same number of ranks, each holding the client's rows
        mean_rows = float(rows) / self.layout.world_size
        per_step = (self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
                    * self.layout.ranks_per_client)
        steps = steps_for_epochs(float(self.args.num_train_epochs), mean_rows, per_step)
        self.args.max_steps = steps
        self.deca_config.max_steps = steps
        if dist.get_rank() == 0:
            print(f"deca_ds: num_train_epochs={self.args.num_train_epochs:g}: {steps} steps for every client (mean "
                  f"client {mean_rows:.0f} training rows, {per_step} rows per step)")

    # --- model preparation -------------------------------------------------------------------------------------

    def _no_world_ddp(self) -> None:
        """Accelerate prepares the model without DistributedDataParallel (see the module docstring), and the
        Trainer's clipping is :meth:`_clip_grad_norm` whichever transformers calls it.

        transformers 5.x clips through the method ``self._clip_grad_norm(model)``, overridden here. transformers 4.x
        (4.56, 4.57) has no such method: its loop calls ``self.accelerator.clip_grad_norm_(model.parameters(),
        max_grad_norm)`` itself, which clipped each rank's own gradients before the client's average (the
        optimizer's pre-hook), so with ``ranks_per_client`` > 1 the run left ``recipes/finetune.py`` from the second
        step. Where the base class has no ``_clip_grad_norm`` that accelerator call is routed to it; on 5.x nothing
        calls ``accelerator.clip_grad_norm_`` without DeepSpeed and it is left alone.
        """
        accelerator = self.accelerator
        original = accelerator.prepare_model

        def prepare_model(model, device_placement=None, evaluation_mode=False):
            # evaluation_mode skips only the DDP wrapping (transformers does the same for models it shards itself).
            return original(model, device_placement=device_placement, evaluation_mode=True)

        accelerator.prepare_model = prepare_model
        if not hasattr(super(), "_clip_grad_norm"):
            def clip_grad_norm_(parameters, max_norm, norm_type=2):
                # The Trainer's only call: every parameter of the model, args.max_grad_norm, the 2-norm.
                return self._clip_grad_norm(None)

            accelerator.clip_grad_norm_ = clip_grad_norm_

    def create_accelerator_and_postprocess(self) -> None:
        """The base Trainer's accelerator; with DeepSpeed, its ``deepspeed.initialize`` call gets the client's
        ``mpu``."""
        super().create_accelerator_and_postprocess()
        if self.is_deepspeed_enabled:
            accelerator, mpu, rpc = self.accelerator, self.groups.mpu, self.layout.ranks_per_client
            original = accelerator._prepare_deepspeed

            def prepare_deepspeed(*objs):
                with _client_mpu_initialize(mpu, rpc):
                    return original(*objs)

            accelerator._prepare_deepspeed = prepare_deepspeed

    def create_optimizer(self, model=None):
        """BlockAdam for the method (:func:`deca_ds.build.build_optimizer`) and DECA's between-steps hook around it.

        Weight decay follows the Trainer's rule: ``args.weight_decay`` applies to the parameters named by
        ``self.get_decay_parameter_names(model)`` (a subclass's override included) and not to the others (biases and
        LayerNorm/RMSNorm weights by transformers' default), as ``Trainer.create_optimizer``'s two AdamW groups do:
        the others are BlockAdam's ``no_decay`` (the deca_ds setting ``optim.decay_norms_and_biases`` is not read).
        """
        if self.optimizer is None:
            from deca_ds.build import build_consensus_step, build_optimizer

            # The model BlockAdam trains and names its parameters after (the Trainer's own rule reads the same one).
            decay_names = set(self.get_decay_parameter_names(self.model))
            no_decay = [n for n, _ in self.model.named_parameters() if n not in decay_names]
            opt = build_optimizer(self.deca_config, self.model, no_decay=no_decay)
            self.consensus = build_consensus_step(self.deca_config, opt,
                                                  self.mixer.mix_ if self.mixer is not None else None)
            opt.register_step_pre_hook(self._before_optimizer_step)
            opt.register_step_post_hook(self._after_optimizer_step)
            if dist.get_rank() == 0 and self.args.max_steps and self.args.max_steps > 0:
                opt.schedule.warn_if_incomplete(int(self.args.max_steps))  # as the recipe: blocks never trained
            self.optimizer = opt
            self.block_optimizer = opt
        return self.optimizer

    # --- one step --------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The base class's loss; training losses are kept for the step's metrics record.

        In training, ``accelerator.gather_for_metrics`` called by the base class's loss (TRL's ``SFTTrainer`` gathers
        its entropy, token accuracy and token count there) gathers over this client's ranks only
        (:meth:`_gather_client`), as under DDP over the client's ranks; in evaluation it is the one-process gather
        (:meth:`evaluation_loop`)."""
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        with _shadowed(self.accelerator, "gather_for_metrics", self._gather_client):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
        loss = out[0] if return_outputs else out
        self._micro_losses.append(loss.detach().float())
        return out

    def _gather_client(self, data, use_gather_object: bool = False):
        """``accelerator.gather_for_metrics`` over this client's ranks (a rank's tensors concatenated in local-rank
        order, a 0-d tensor as one row; other objects gathered into one list), not over the world. Used in training,
        where the batches are :class:`ClientBatchSampler`'s (no end-of-data remainder to cut)."""
        from accelerate.utils import recursively_apply

        rpc, group = self.layout.ranks_per_client, self.groups.client_group
        if rpc == 1:
            return data
        if use_gather_object or not _all_tensors(data):
            rows: list = [None] * rpc
            dist.all_gather_object(rows, data, group=group)
            return [x for row in rows for x in (row if isinstance(row, list) else [row])]

        def gather(t):
            t = t.reshape(1) if t.ndim == 0 else t.contiguous()
            out = [torch.empty_like(t) for _ in range(rpc)]
            dist.all_gather(out, t, group=group)
            return torch.cat(out)

        return recursively_apply(gather, data)

    def _get_num_items_in_batch(self, batch_samples: list, device):
        """The item count a ``compute_loss_func`` divides by: over this client's ranks, not the world.

        With ``average_tokens_across_devices`` off (set by ``_client_args``) the Trainer counts this rank's items
        and leaves the loss unscaled. Summed over the client's ranks and divided by their number, the count makes
        the client's gradient average (over its ranks) the client's own token mean over its whole step, as one
        process would compute it; nothing crosses to other clients (no per-step world collective).
        """
        return self._client_item_count(super()._get_num_items_in_batch(batch_samples, device), device)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """The base class's batches and item count; on transformers 4.x (4.56, 4.57), which counts the items here
        and has no ``_get_num_items_in_batch``, the count is made the client's as :meth:`_get_num_items_in_batch`
        makes it (5.x's ``get_batch_samples`` calls that method, so nothing changes there)."""
        batch_samples, n = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not hasattr(super(), "_get_num_items_in_batch"):
            n = self._client_item_count(n, device)
        return batch_samples, n

    def _client_item_count(self, n, device):
        """This rank's item count ``n`` summed over the client's ranks and divided by their number."""
        rpc = self.layout.ranks_per_client
        if n is None or rpc == 1 or not torch.is_tensor(n):
            return n
        n = n.to(device=device, dtype=torch.float32)  # exact: counts are far below 2**24
        dist.all_reduce(n, group=self.groups.client_group)
        return n / rpc

    def _maybe_log_save_evaluate(self, tr_loss, *args, **kwargs):
        """The base class's logging, evaluation and saving, with the logged training ``loss`` this client's own.

        The Trainer logs the mean of ``tr_loss`` over every process it sees (``nested_gather``, an all-gather over the
        world): inside a DecaTrainer that is every client's model averaged into each client's log. Here ``tr_loss``
        is gathered over the client's ranks only, so ``loss`` (and ``train_loss``) is what the Trainer would log under
        DDP over this client's ranks, as ``evaluate()`` and ``metrics.jsonl`` report the client's own.
        """
        import sys

        module = sys.modules[Trainer.__module__]  # the Trainer's own nested_gather, which its logging calls
        # transformers 5.x logs through that module function, 4.x through the method self._nested_gather(tr_loss).
        owner, name = (module, "nested_gather") if hasattr(module, "nested_gather") else (self, "_nested_gather")
        world_gather = getattr(owner, name)

        def nested_gather(tensors, *args, **kwargs):
            if tensors is not tr_loss:
                return world_gather(tensors, *args, **kwargs)
            return self._gather_client(tensors.detach()).reshape(-1)

        with _shadowed(owner, name, nested_gather):
            out = super()._maybe_log_save_evaluate(tr_loss, *args, **kwargs)
        self._agree_on_stop()
        return out

    def _agree_on_stop(self) -> None:
        """Make every rank stop training at the same step when a callback stops some of them (collective).

        Any callback may set ``control.should_training_stop`` on its own rank: a user's callback on the client's
        own loss, a time budget, a signal handler. One client stopping alone would leave its neighbours waiting
        in the next gossip exchange until ``comm_timeout`` (``NeighbourError``), and ranks of one client in
        their gradient average. So after each optimizer step (after ``on_step_end`` and the logging, evaluation
        and saving it triggers, i.e. after every callback had its say) the ranks gather their flags: if any rank
        stops, every rank stops at this step, and rank 0 says which clients asked. Called from
        :meth:`_maybe_log_save_evaluate`, which the Trainer calls once per optimizer step on every rank, and once
        more at each epoch end; epochs end at different steps on clients of different sizes, so that second call
        takes part in no collective: a stop requested there (``on_epoch_end``) is carried to the next step's
        agreement, and the client trains that one step more.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        control, step = self.control, self.state.global_step
        if step == self._stop_agreed_at:  # the epoch-end call, at a step of this client's own
            if control.should_training_stop and not self._stop_agreed and step < self.state.max_steps:
                self._stop_pending = True
                control.should_training_stop = False
            return
        from deca_ds.engine import device

        asked = bool(control.should_training_stop or self._stop_pending)
        flag = torch.tensor([float(asked)], device=device())
        flags = [torch.empty_like(flag) for _ in range(dist.get_world_size())]
        dist.all_gather(flags, flag)
        asked_by = torch.cat(flags).tolist()  # one device-to-host copy, not one per rank
        askers = sorted({r // self.layout.ranks_per_client for r, f in enumerate(asked_by) if f > 0})
        self._stop_agreed_at, self._stop_pending, self._stop_agreed = step, False, bool(askers)
        if askers:
            control.should_training_stop = True
            if not all(f > 0 for f in asked_by) and dist.get_rank() == 0:
                print(f"deca_ds: client(s) {askers} stopped training at step {step} (a callback set "
                      "control.should_training_stop): every client stops at this step, since the clients exchange "
                      "weights at every step", flush=True)

    def _active_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.block_optimizer.active_params() if p.grad is not None]

    def _reduce_client_grads(self) -> None:
        """Average the active block's gradients over the client's ranks (no DeepSpeed, ranks_per_client > 1)."""
        if self._grads_reduced or self.is_deepspeed_enabled:
            return
        self._grads_reduced = True
        rpc = self.layout.ranks_per_client
        if rpc == 1:
            return
        for p in self._active_params():
            dist.all_reduce(p.grad, group=self.groups.client_group)
            p.grad.div_(rpc)

    def _clip_grad_norm(self, model):
        """Without DeepSpeed: the client's gradient average, then DeepSpeed's stage-0 clipping arithmetic."""
        if self.is_deepspeed_enabled:
            return super()._clip_grad_norm(model)
        from deca_ds.step import clip_grad_norm_as_deepspeed_

        self._reduce_client_grads()
        return clip_grad_norm_as_deepspeed_(self._active_params(), self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        """The norm :meth:`_clip_grad_norm` measured (no second norm over the frozen parameters)."""
        if grad_norm is None:
            return None
        return grad_norm.item() if hasattr(grad_norm, "item") else grad_norm

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        """Before BlockAdam's step: client gradient average, finite check, snapshot for the consensus signal."""
        from deca_ds.step import all_finite, grads_finite

        self._reduce_client_grads()
        nonfinite = not all_finite(self._micro_losses) or not grads_finite(optimizer.active_params())
        if nonfinite:  # never applied; the schedule still advances (nan_policy=skip)
            optimizer.skip_next_step = True
        # The rate this step uses: the Trainer's scheduler moves it to the next step's before on_step_end.
        self._step_figures = {"nonfinite": nonfinite, "block": optimizer.active_block_idx, "bytes_sent": 0,
                              "lr": float(optimizer.param_groups[0]["lr"])}
        self.consensus.before_step()

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        """After BlockAdam's step: gossip -> consensus signal -> moment correction -> block switch."""
        self.consensus.after_step(optimizer.global_step - 1)
        stats = self.consensus.last_mix_stats
        self._step_figures["bytes_sent"] = stats.bytes_sent if stats is not None else 0
        self._grads_reduced = False

    # --- evaluation ------------------------------------------------------------------------------------------
    #
    # Hazard: inside a DecaTrainer the Trainer and Accelerate see the whole world (args.world_size and
    # accelerator.num_processes are the launched ranks, measured with transformers 5.24 / accelerate 1.16), so the
    # base evaluation would shard each client's eval_dataset over every rank of every client and gather losses and
    # predictions over the world: a mixture of all clients' models on parts of their rows, and, when the clients'
    # eval sets differ in size, different numbers of gathers on different ranks (the run aborted at the first
    # evaluation). Each rank instead evaluates its client's whole eval_dataset as a one-process Trainer would, with no
    # collective; only the metric_for_best_model value is agreed across clients (_agree_on_best_metric).

    def get_eval_dataloader(self, eval_dataset=None):
        """The base class's eval DataLoader over this client's whole ``eval_dataset``, not sharded over the world."""
        with self._one_process_dataloaders():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        """The base class's test DataLoader over the whole ``test_dataset``, not sharded over the world."""
        with self._one_process_dataloaders():
            return super().get_test_dataloader(test_dataset)

    @contextmanager
    def _one_process_dataloaders(self) -> Iterator[None]:
        """While active, ``accelerator.prepare(dataloader)`` wraps a DataLoader for one process (Accelerate's own
        ``prepare_data_loader`` with ``num_processes=1``: device placement and the end-of-data bookkeeping that
        ``batch_eval_metrics`` and the last batch's remainder rely on, without the world sharding)."""
        from accelerate.data_loader import prepare_data_loader

        acc = self.accelerator
        original = acc.prepare

        def prepare(*objs, **kwargs):
            if len(objs) == 1 and not kwargs and isinstance(objs[0], torch.utils.data.DataLoader):
                return prepare_data_loader(objs[0], acc.device, num_processes=1, process_index=0,
                                           put_on_device=acc.device_placement, dispatch_batches=False)
            return original(*objs, **kwargs)

        with _shadowed(acc, "prepare", prepare):
            yield

    def evaluate(self, *args, **kwargs):
        """The base class's ``evaluate``, its speed figures those of this rank's one-process evaluation
        (:meth:`_one_process_speed`)."""
        with self._one_process_speed():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        """The base class's ``predict``, its speed figures those of this rank's one-process prediction."""
        with self._one_process_speed():
            return super().predict(*args, **kwargs)

    @contextmanager
    def _one_process_speed(self) -> Iterator[None]:
        """While active, the Trainer's ``speed_metrics`` counts the steps of one process over the rows it reports.

        The base class divides the rows by ``eval_batch_size x world_size`` to count steps, as if the world had
        shared them; here each rank ran every row of its client (:meth:`get_eval_dataloader`), so
        ``*_steps_per_second`` was a world-size fraction of the truth. Rows, runtime and samples per second are
        unchanged (they were already this rank's)."""
        import sys

        module = sys.modules[Trainer.__module__]  # the Trainer's own speed_metrics, which evaluate/predict call
        world_speed = module.speed_metrics
        batch = self.args.eval_batch_size

        def speed_metrics(split, start_time, num_samples=None, num_steps=None, num_tokens=None):
            if num_samples is not None and num_steps is not None:
                num_steps = math.ceil(num_samples / batch)
            return world_speed(split, start_time, num_samples=num_samples, num_steps=num_steps, num_tokens=num_tokens)

        with _shadowed(module, "speed_metrics", speed_metrics):
            yield

    def evaluation_loop(self, dataloader, description, *args, **kwargs):
        """The base class's loop without world collectives (this client's rows, gathered by no one), then, for
        ``evaluate()``, the ``metric_for_best_model`` value agreed across clients (:meth:`_agree_on_best_metric`)."""
        acc = self.accelerator
        # One process's gather_for_metrics and pad_across_processes (the base loop resets gather_function itself).
        # accelerator.gather_for_metrics too: a base class's compute_loss may call it (TRL's SFTTrainer does, three
        # times per batch), which would gather over the world: other clients' metrics mixed in, and a different number
        # of gathers on clients whose eval sets differ in length.
        self.gather_function = self._gather_one_process
        try:
            with _shadowed(acc, "pad_across_processes", lambda tensor, *a, **k: tensor), \
                    _shadowed(acc, "gather_for_metrics", self._gather_one_process):
                output = super().evaluation_loop(dataloader, description, *args, **kwargs)
        finally:
            self.gather_function = acc.gather_for_metrics
        if description == "Evaluation":  # evaluate(); predict() passes "Prediction" and stays this client's own
            self._agree_on_best_metric(output.metrics)
        return output

    def _gather_one_process(self, data, use_gather_object: bool = False):
        """``accelerator.gather_for_metrics`` as in a one-process run: nothing gathered; at the end of the data the
        last batch cut to the rows it really holds (the loader's remainder); what cannot be cut (a 0-d tensor) is
        returned as it is, as Accelerate does."""
        from accelerate.utils import recursively_apply

        gs = self.accelerator.gradient_state
        if not (gs.end_of_dataloader and gs.remainder > 0):
            return data
        try:
            if use_gather_object or not _all_tensors(data):  # Accelerate slices the object itself
                return data[:gs.remainder]
            return recursively_apply(lambda t: t[:gs.remainder], data)
        except Exception:  # noqa: BLE001 - Accelerate's own fallback: returned uncut
            return data

    def _agree_on_best_metric(self, metrics: dict[str, Any]) -> None:
        """With several clients, replace ``metrics[metric_for_best_model]`` by its mean over clients (collective).

        Every client then sees the same value, so ``load_best_model_at_end`` picks the same step on every client,
        ``EarlyStoppingCallback`` stops them at the same step (one client stopping alone would leave its neighbours
        waiting in the next gossip exchange), ``save_strategy="best"`` saves at the same steps and
        ``ReduceLROnPlateau`` sets one rate. The mean weighs clients equally (not by their eval rows); one rank per
        client contributes. This client's own value is kept as ``<metric>_client``. Every rank takes part in every
        ``evaluate()`` call while ``metric_for_best_model`` is set, as under DDP.

        Raises:
            ConfigError: the metric is missing from (or not a number in) some clients' evaluation and not others'
                (raised on every rank).
            RunFault: some ranks did not call ``evaluate()`` (the gather failed or waited ``comm_timeout``); the
                message says to call it on every rank.
        """
        from deca_ds.engine import device

        name = self.args.metric_for_best_model
        if name is None or self.layout.num_clients == 1:
            return
        key = name if name.startswith("eval_") else f"eval_{name}"
        value, state = 0.0, 0.0  # state: 0 missing, 1 a number, 2 not a number
        if key in metrics:
            try:
                value, state = float(metrics[key]), 1.0
            except (TypeError, ValueError):
                state = 2.0
        t = torch.tensor([state, value], dtype=torch.float64, device=device())
        rows = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        try:
            dist.all_gather(rows, t)
        except RuntimeError as err:
            # A rank that calls evaluate() alone (e.g. under `if trainer.is_world_process_zero():`) waits here for
            # ranks that never come: without this, the user sees the backend's timeout, not the cause.
            from deca_ds.errors import RunFault, first_line

            raise RunFault(f"evaluate() with metric_for_best_model={name} and {self.layout.num_clients} clients is "
                           "a collective (the clients agree on the metric's mean): call it on every rank at the same "
                           f"point, as under DDP; the other ranks did not join within comm_timeout="
                           f"{self.deca_config.comm_timeout:g} s (rank {self.layout.rank}): {first_line(err)}") from err
        firsts = [self.layout.client_ranks(c)[0] for c in range(self.layout.num_clients)]
        states = [int(rows[r][0]) for r in firsts]
        if all(st == 0 for st in states):
            return  # e.g. one of several eval datasets that does not carry this metric: on every client alike
        if any(st != 1 for st in states):
            bad = [c for c, st in enumerate(states) if st != 1]
            raise ConfigError(f"metric_for_best_model={name}: {key} is missing or not a number in the evaluation of "
                              f"client(s) {bad} but not of the others: every client's compute_metrics must return it "
                              "(the clients agree on its mean)")
        # Summed in client order from the same gathered numbers: the same float64 value on every rank.
        mean = sum(float(rows[r][1]) for r in firsts) / len(firsts)
        metrics[f"{key}_client"] = metrics[key]
        metrics[key] = mean

    def _agree_on_evaluation(self) -> None:
        """Refuse, on every rank, evaluation settings that would make the clients evaluate at different steps or
        decide differently on the agreed metric (collective; several clients only).

        ``metric_for_best_model`` makes ``evaluate()`` a collective, so every client must evaluate at the same steps:
        with ``eval_strategy="epoch"`` an evaluation falls at each client's own epoch end, a step that depends on
        its row count. The metric, its direction, the evaluation schedule and any ``EarlyStoppingCallback`` must also
        be the same on every rank.

        Raises:
            ConfigError: the settings differ between ranks, or epochs of different lengths with an agreed metric.
        """
        if self.layout.num_clients == 1:
            return
        from transformers import EarlyStoppingCallback

        args = self.args
        strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
        per_epoch = None
        if args.metric_for_best_model is not None and strategy == "epoch":
            gas = args.gradient_accumulation_steps
            per_epoch = ClientBatchSampler(len(self.train_dataset), args.per_device_train_batch_size, gas,
                                           self.deca_config.data.seed, self.layout).length // gas
        early = [(cb.early_stopping_patience, cb.early_stopping_threshold) for cb in self.callback_handler.callbacks
                 if isinstance(cb, EarlyStoppingCallback)]
        mine = {"metric_for_best_model": args.metric_for_best_model, "greater_is_better": args.greater_is_better,
                "eval_strategy": strategy, "eval_steps": args.eval_steps,
                "eval_on_start": getattr(args, "eval_on_start", False), "EarlyStoppingCallback": early,
                "steps_per_epoch": per_epoch}
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        if gathered[1:] == gathered[:-1]:
            return
        rpc = self.layout.ranks_per_client
        if all(g["eval_strategy"] == "epoch" for g in gathered) and len({g["steps_per_epoch"] for g in gathered}) > 1:
            steps = {r // rpc: g["steps_per_epoch"] for r, g in enumerate(gathered)}
            raise ConfigError(f"eval_strategy=epoch with metric_for_best_model={args.metric_for_best_model}: the "
                              f"clients' epochs end at different steps (steps per epoch by client: {steps}), so they "
                              "cannot agree on the metric: use eval_strategy=steps with eval_steps=N (and "
                              "save_strategy=steps with save_steps a multiple of it)")
        key = next(k for k in mine if any(g[k] != gathered[0][k] for g in gathered))
        values = {r // rpc: g[key] for r, g in enumerate(gathered)}
        raise ConfigError(f"{key} differs between clients ({values}): every client evaluates at the same steps and "
                          "agrees on the best-model metric, so give every rank the same evaluation settings")

    # --- data ------------------------------------------------------------------------------------------------

    def get_train_dataloader(self):
        """This rank's micro-batches of its client's rows (:class:`ClientBatchSampler`), not world-sharded."""
        if self.train_dataset is None:
            raise ConfigError("DecaTrainer needs a train_dataset: this client's rows")
        import datasets

        dataset, collator = self.train_dataset, self.data_collator
        if isinstance(dataset, datasets.Dataset):  # the Trainer's own column handling
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        sampler = ClientBatchSampler(len(dataset), self.args.per_device_train_batch_size,
                                     self.args.gradient_accumulation_steps, self.deca_config.data.seed, self.layout)
        # The Trainer's worker settings, as its own _get_dataloader passes them (those this transformers has).
        workers = {k: getattr(self.args, f"dataloader_{k}") for k in ("persistent_workers", "prefetch_factor",
                                                                      "multiprocessing_context", "in_order")
                   if hasattr(self.args, f"dataloader_{k}")}
        return _EpochDataLoader(dataset, batch_sampler=sampler, collate_fn=collator,
                                num_workers=self.args.dataloader_num_workers,
                                pin_memory=self.args.dataloader_pin_memory, **workers)

    # --- checkpoints ---------------------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """The client's model from the client's first rank (``save_pretrained`` would write on world rank 0 only)."""
        from deca_ds.models import save_model_dir

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save_model_dir(model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The Trainer's optimizer/scheduler files, plus ``deca_state.pt`` (Mixer counters) for this client."""
        super()._save_optimizer_and_scheduler(output_dir)
        if not self.args.should_save:
            return
        out = Path(output_dir)
        if self.is_deepspeed_enabled and not (out / "latest").is_file():
            # DeepSpeed writes `latest` on world rank 0 only; every client resumes from its own directory.
            tags = sorted(p.name for p in out.glob("global_step*"))
            if tags:
                (out / "latest").write_text(tags[-1])
        state = {"mixer": self.mixer.state_dict() if self.mixer is not None else None,
                 "client": self.layout.client_id, "num_clients": self.layout.num_clients}
        torch.save(state, out / DECA_STATE_NAME)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The Trainer's optimizer/scheduler state, plus this client's ``deca_state.pt``."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = Path(checkpoint) / DECA_STATE_NAME
        if not path.is_file():
            raise ConfigError(f"resume_from_checkpoint={checkpoint}: {DECA_STATE_NAME} is missing: resume from a "
                              "checkpoint a DecaTrainer wrote (output_dir/client_<c>/checkpoint-<N>)")
        state = torch.load(path, weights_only=True)
        if state["client"] != self.layout.client_id or state["num_clients"] != self.layout.num_clients:
            raise ConfigError(f"resume_from_checkpoint={checkpoint} belongs to client {state['client']} of "
                              f"{state['num_clients']}, this rank is client {self.layout.client_id} of "
                              f"{self.layout.num_clients}: use resume_from_checkpoint=True (each client finds its "
                              "own latest checkpoint)")
        if self.mixer is not None and state["mixer"] is not None:
            self.mixer.load_state_dict(state["mixer"])

    # --- the consensus model -------------------------------------------------------------------------------------

    def save_consensus_model(self, output_dir: str | os.PathLike | None = None) -> Path:
        """Average every client's weights (collective) and write them as a Hugging Face model directory.

        Args:
            output_dir: where (default ``<output_dir>/consensus``).

        Returns:
            The directory (written by world rank 0).
        """
        import copy

        from deca_ds.models import save_model_dir

        out = Path(output_dir) if output_dir is not None else self.run_dir / "consensus"
        model = copy.deepcopy(self.accelerator.unwrap_model(self.model, keep_torch_compile=False))
        world = dist.get_world_size()
        with torch.no_grad():
            for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
                acc = t.detach().to(torch.float32, copy=True)
                dist.all_reduce(acc)
                t.copy_(acc.div_(world).to(t.dtype))
        if dist.get_rank() == 0:
            save_model_dir(model, out)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(out)
        dist.barrier()
        return out

    # --- monitoring ----------------------------------------------------------------------------------------------

    def _record_step(self, step: int, lr: float) -> None:
        """At log steps, one all-gather of every rank's figures; world rank 0 appends the launcher's metrics.jsonl
        records. Between log steps nothing is communicated (every rank decides from the step alone, so they agree);
        a non-finite step is remembered and reported at the next log step, as the launcher's ``nonfinite`` field."""
        from deca_ds.metrics import JsonlWriter, truncate_jsonl_after

        fig = self._step_figures
        losses = self._micro_losses or [torch.tensor(float("nan"))]
        loss = float(torch.stack(losses).mean())
        self._micro_losses = []
        nonfinite = bool(fig["nonfinite"]) or self._nonfinite_since_log
        log_now = (step + 1) % self.deca_config.log_every == 0
        if not log_now:
            self._nonfinite_since_log = nonfinite
            return
        self._nonfinite_since_log = False
        cdist = 0.0
        if self.layout.num_clients > 1:
            names = self.block_optimizer.blocks[fig["block"]].param_names
            params = dict(self.accelerator.unwrap_model(self.model).named_parameters())
            cdist = client_distance([params[n].data for n in names])
        t = torch.tensor([loss, float(nonfinite), float(fig["bytes_sent"]), cdist], dtype=torch.float64)
        rows = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, t)
        if dist.get_rank() != 0:
            return
        if self._writer is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            truncate_jsonl_after(self.run_dir / "metrics.jsonl", step)
            self._writer = JsonlWriter(self.run_dir / "metrics.jsonl")
        rows = torch.stack(rows)
        for c in range(self.layout.num_clients):
            r = self.layout.client_ranks(c)
            self._writer.write({"step": step, "client": c, "loss": float(rows[r, 0].mean()), "block": fig["block"],
                                "lr": lr, "consensus_distance": float(rows[r[0], 3]),
                                "bytes_sent": int(rows[r, 2].sum()), "nonfinite": bool(rows[r, 1].any()),
                                "time": time.perf_counter() - self._t0})

    def _finish_run(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            from deca_ds.metrics import plot_run

            plot_run(self.run_dir)


def _all_tensors(data: Any) -> bool:
    """Whether ``data`` (nested lists/tuples/dicts) holds tensors only: what Accelerate's gathers split by."""
    from accelerate.utils import recursively_apply

    try:
        recursively_apply(lambda x: x, data, error_on_other_type=True)
    except TypeError:
        return False
    return True


class _DecaCallback(TrainerCallback):
    """Per-step monitoring record and the end-of-run figure (the DECA sequence itself runs in the optimizer hooks)."""

    def __init__(self, trainer: DecaTrainerMixin):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        lr = trainer._step_figures.get("lr", float(trainer.block_optimizer.param_groups[0]["lr"]))
        trainer._record_step(state.global_step - 1, lr)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._finish_run()
        return control


def deca_trainer_class(base: type) -> type:
    """A DECA trainer class on top of ``base`` (``transformers.Trainer`` or a subclass, e.g. TRL's ``SFTTrainer``).

    Returns:
        ``class Deca<base>(DecaTrainerMixin, base)``; construct it with the base's arguments plus ``deca=``.
    """
    return type(f"Deca{base.__name__}", (DecaTrainerMixin, base), {"__module__": __name__,
                                                                  "__doc__": DecaTrainerMixin.__doc__})


class DecaTrainer(DecaTrainerMixin, Trainer):
    """``transformers.Trainer`` as one client of a DECA run (see :class:`DecaTrainerMixin` and the module
    docstring)."""
