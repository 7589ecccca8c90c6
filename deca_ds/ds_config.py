"""DeepSpeed JSON configs: loading, defaults and the checks that keep block-wise training correct.

Why this is its own module: the checks run before any process group exists (``trainer.preflight``), in the
single-process simulator and in the planner, none of which should import DeepSpeed (only ``deca_ds.engine`` does).

Why the DeepSpeed config is restricted (measured, docs/design.md §3): at stage 0 DeepSpeed hands our optimizer the
model's own parameters only when its ``bf16``/``fp16`` sections are off (otherwise it wraps it with fp32 copies of
every parameter and block switching breaks), and ZeRO 1-3 freeze the trainable set at ``initialize``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from deca_ds.config import ConfigError, RunConfig

REPO_DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"
DEFAULT_MICRO_BATCH = 8

__all__ = ["REPO_DS_CONFIGS", "DEFAULT_MICRO_BATCH", "shipped_dir", "shipped_path", "default_ds_config_path",
           "load_ds_config", "resolve_auto", "check_ds_config", "check_batch_sizes", "data_parallel_size",
           "zero_stage", "uses_activation_checkpointing"]

SHIPPED = {"ds_configs": ("ds_configs",), "configs": ("recipes", "configs")}
"""Files shipped with deca_ds, by kind -> their folder in the repository (the source of truth). A wheel carries a
copy under ``deca_ds/_shipped/<kind>/`` (setup.py's build step), so a plain ``pip install`` finds them too."""


def shipped_dir(kind: str) -> Path:
    """The folder of shipped ``kind`` files (``ds_configs`` or ``configs``, the recipe YAMLs).

    The repository's own folder when deca_ds runs from a checkout (editable installs included), else the copy
    installed with the package.

    Raises:
        ValueError: an unknown kind.
    """
    if kind not in SHIPPED:
        raise ValueError(f"unknown kind of shipped file {kind!r}: use one of {', '.join(SHIPPED)}")
    repo = Path(__file__).resolve().parents[1].joinpath(*SHIPPED[kind])
    if repo.is_dir():
        return repo
    return Path(__file__).resolve().parent / "_shipped" / kind


def shipped_path(path: str | os.PathLike, kind: str = "ds_configs") -> Path:
    """``path`` as given when it exists; else, when it names a shipped file (``ds_configs/gpu_bf16.json``,
    ``gpu_bf16.json``, ``gpu_bf16``), that file in :func:`shipped_dir`. Lets the shipped recipes' relative
    ``ds_config: ds_configs/X.json`` work from any directory and from a pip install.

    Returns:
        The path to use (``path`` itself when nothing shipped matches; the caller reports it missing).
    """
    given = Path(path)
    if given.is_file():
        return given
    suffix = ".json" if kind == "ds_configs" else ".yaml"
    name = given.name if given.suffix else given.name + suffix
    if len(given.parts) == 1 or given.parts[-2] in (kind, "configs"):
        candidate = shipped_dir(kind) / name
        if candidate.is_file():
            return candidate
    return given


def default_ds_config_path(device_type: str | None = None) -> Path:
    """``ds_configs/cpu_fp32.json`` on the CPU, else ``ds_configs/gpu_bf16.json`` (shipped copies, see
    :func:`shipped_dir`).

    Args:
        device_type: the accelerator type (default: :func:`deca_ds.devices.accelerator_type`).
    """
    if device_type is None:
        from deca_ds.devices import accelerator_type

        device_type = accelerator_type()
    return shipped_dir("ds_configs") / ("cpu_fp32.json" if device_type == "cpu" else "gpu_bf16.json")


class _RepeatedKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _refuse_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.load``'s object hook: a JSON object as a dict, refusing a key given twice (JSON keeps the last)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key)
        out[key] = value
    return out


def load_ds_config(path: str | os.PathLike | None, device_type: str | None = None) -> dict[str, Any]:
    """Read a DeepSpeed JSON (the default one when ``path`` is None) and fill batch keys it leaves out.

    Args:
        path: the JSON file, or None for :func:`default_ds_config_path`.
        device_type: accelerator type that picks the default file (see :func:`default_ds_config_path`).

    Raises:
        ConfigError: missing or malformed file.
    """
    if path is None:
        path = default_ds_config_path(device_type)
        if not Path(path).is_file():  # installed without the shipped files: same settings as cpu_fp32.json
            return {"train_micro_batch_size_per_gpu": DEFAULT_MICRO_BATCH, "gradient_accumulation_steps": 1,
                    "steps_per_print": 1000000, "wall_clock_breakdown": False}
    path = shipped_path(path)
    if not Path(path).is_file():
        raise ConfigError(f"ds_config={str(path)!r} does not exist: give the path of a DeepSpeed JSON "
                          "(see ds_configs/)")
    try:
        with open(path, encoding="utf-8") as f:
            ds = json.load(f, object_pairs_hook=_refuse_repeated_keys)
    except _RepeatedKey as e:
        raise ConfigError(f"ds_config={str(path)!r} gives the key {e.key!r} twice in one object (JSON keeps the last "
                          "silently, so the first is ignored): keep one") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config={str(path)!r} is not valid JSON (line {e.lineno}: {e.msg}): fix the file") \
            from None
    except UnicodeDecodeError as e:  # a bare traceback otherwise
        raise ConfigError(f"ds_config={str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason}): save it as "
                          "UTF-8 JSON") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"ds_config={str(path)!r} must hold a JSON object: write {{...}} at the top level, as in "
                          "ds_configs/cpu_fp32.json")
    if "train_micro_batch_size_per_gpu" not in ds and "train_batch_size" not in ds:
        ds["train_micro_batch_size_per_gpu"] = DEFAULT_MICRO_BATCH
    if "train_batch_size" not in ds:  # with train_batch_size, DeepSpeed derives it (see check_batch_sizes)
        ds.setdefault("gradient_accumulation_steps", 1)
    ds.setdefault("steps_per_print", 1000000)
    return ds


# Sections DeepSpeed reads as JSON objects: a bare value there ("fp16": true) must be refused here, with the fix, not
# crash a check with AttributeError or reach DeepSpeed. ("bfloat16" is DeepSpeed's old name of "bf16".)
OBJECT_SECTIONS = (
    "bf16", "bfloat16", "fp16", "amp", "zero_optimization", "optimizer", "scheduler", "activation_checkpointing",
    "torch_autocast", "tensorboard", "csv_monitor", "wandb", "comet", "flops_profiler", "comms_logger", "checkpoint",
    "data_types", "aio", "autotuning", "compression_training", "data_efficiency", "curriculum_learning",
    "sparse_attention", "pipeline", "nebula", "monitor_config",
)
ZERO_OBJECT_SECTIONS = ("offload_optimizer", "offload_param")
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def _section(ds: dict[str, Any], key: str, where: str = "") -> dict[str, Any]:
    """The object ``ds[key]`` ({} when absent); ConfigError when it is a bare value."""
    value = ds.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        example = '{"enabled": true}' if key in ("bf16", "bfloat16", "fp16", "amp", "torch_autocast") else (
            '{"stage": 2}' if key == "zero_optimization" else '{"device": "cpu"}' if key in ZERO_OBJECT_SECTIONS
            else "{...}")
        raise ConfigError(f"ds_config {where}{key}={json.dumps(value)} must be a JSON object: write "
                          f'"{key}": {example}')
    return value


def _enabled(section: dict[str, Any], name: str) -> bool:
    flag = section.get("enabled", False)
    if not isinstance(flag, bool):
        raise ConfigError(f"ds_config {name}.enabled={json.dumps(flag)} must be true or false: write "
                          f'"{name}": {{"enabled": true}}')
    return flag


def zero_stage(ds: dict[str, Any]) -> int:
    """The ZeRO stage of a DeepSpeed config dict (0 when absent).

    Raises:
        ConfigError: ``zero_optimization`` is not an object or its ``stage`` is not 0, 1, 2 or 3.
    """
    stage = _section(ds, "zero_optimization").get("stage", 0)
    if stage is None:
        stage = 0
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"ds_config zero_optimization.stage={json.dumps(stage)} is not a ZeRO stage: use 0, 1, 2 "
                          "or 3")
    return stage


def check_batch_sizes(ds: dict[str, Any], data_parallel_size: int,
                      group: str = "rank(s) of a client (clients.ranks_per_client)") -> dict[str, int]:
    """Fill and check the three batch keys exactly as DeepSpeed 0.19.8 does, before anything starts.

    DeepSpeed (``runtime/config.py``: ``_set_batch_related_parameters`` then ``_batch_assertion``) derives the missing
    keys with floor division by its data-parallel world size and then asserts ``train_batch_size ==
    train_micro_batch_size_per_gpu * gradient_accumulation_steps * world size``. deca_ds hands DeepSpeed an ``mpu``
    whose data-parallel group is one client, so that world size is ``clients.ranks_per_client`` (all launched ranks
    for ``method: centralized``, which passes no ``mpu``). The filled values are written into ``ds`` so that what
    DeepSpeed, the simulator and the planner read is the same.

    Args:
        ds: DeepSpeed config dict (changed in place: missing batch keys are filled).
        data_parallel_size: ranks of DeepSpeed's data-parallel group.
        group: what those ranks are, for the message.

    Returns:
        ``{"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"}`` as ints.

    Raises:
        ConfigError: a batch key that is not a positive integer, none of ``train_batch_size`` and
            ``train_micro_batch_size_per_gpu`` given, or values whose product DeepSpeed would reject.
    """
    if isinstance(data_parallel_size, bool) or not isinstance(data_parallel_size, int) or data_parallel_size < 1:
        raise ValueError(f"data_parallel_size={data_parallel_size!r} must be a positive integer")
    given = {}
    for key in BATCH_KEYS:
        value = ds.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            hint = " (\"auto\" is a Hugging Face Trainer value, not DeepSpeed's)" if value == "auto" else ""
            raise ConfigError(f"ds_config {key}={json.dumps(value)} must be a positive integer{hint}: write e.g. "
                              f'"{key}": {8 if key != "gradient_accumulation_steps" else 1}')
        given[key] = value
    train, micro, gas = (given.get(k) for k in BATCH_KEYS)
    world = data_parallel_size
    # DeepSpeed's own order of cases (floor divisions included), so that a value filled here is the one it fills.
    if train is not None and micro is not None and gas is not None:
        pass
    elif train is not None and micro is not None:
        gas = train // micro // world
    elif train is not None and gas is not None:
        micro = train // world // gas
    elif micro is not None and gas is not None:
        train = micro * gas * world
    elif train is not None:
        gas, micro = 1, train // world
    elif micro is not None:
        train, gas = micro * world, 1
    else:
        raise ConfigError("ds_config sets neither train_micro_batch_size_per_gpu nor train_batch_size: set "
                          "train_micro_batch_size_per_gpu (rows per rank per micro-step)")
    derived = [k for k in BATCH_KEYS if k not in given]
    if micro < 1 or gas < 1 or train != micro * gas * world:
        via = f" ({', '.join(derived)} derived by DeepSpeed's floor division)" if derived else ""
        raise ConfigError(
            f"ds_config batch sizes do not add up: train_batch_size={train} must equal train_micro_batch_size_per_gpu="
            f"{micro} x gradient_accumulation_steps={gas} x {world} data-parallel {group}{via}: set "
            "train_micro_batch_size_per_gpu and gradient_accumulation_steps and drop train_batch_size")
    ds.update({"train_batch_size": train, "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas})
    return {"train_batch_size": train, "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas}


def data_parallel_size(cfg: RunConfig, world_size: int | None) -> int | None:
    """Ranks of DeepSpeed's data-parallel group: one client's ranks, or every rank for ``method: centralized``.

    Args:
        cfg: the run's settings.
        world_size: ranks launched; None when unknown (then ``num_clients x ranks_per_client`` when ``num_clients``
            is set, as in the simulator).

    Returns:
        The size, or None when ``method: centralized`` and the world size is unknown.
    """
    if cfg.method != "centralized":
        return cfg.clients.ranks_per_client
    if world_size is None and cfg.num_clients:
        world_size = cfg.num_clients * cfg.clients.ranks_per_client
    return world_size


AUTO = "auto"
"""Hugging Face's placeholder in a DeepSpeed JSON: "fill this from the training settings"."""


def _hidden_size(cfg: RunConfig) -> int:
    """The model's hidden size, from its config.json alone (the embedded model's without files)."""
    from deca_ds.models import embedded_model_config

    if cfg.model.path is None:
        return int(embedded_model_config().hidden_size)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(cfg.model.path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path={cfg.model.path!r}: its config.json cannot be read to fill the ds_config's "
                          f"\"auto\" bucket sizes ({str(e).splitlines()[0][:120]}): give numbers instead") from None
    config = getattr(config, "text_config", None) or config
    if getattr(config, "hidden_size", None):
        return int(config.hidden_size)
    if getattr(config, "hidden_sizes", None):
        return int(max(config.hidden_sizes))
    raise ConfigError(f"model.path={cfg.model.path!r} has neither hidden_size nor hidden_sizes: replace the "
                      "ds_config's \"auto\" bucket sizes by numbers")


def resolve_auto(ds: dict[str, Any], cfg: RunConfig, data_parallel: int | None) -> dict[str, Any]:
    """Replace Hugging Face's ``"auto"`` values in a DeepSpeed config, in place, the way the HF Trainer resolves them.

    The Trainer fills ``"auto"`` from its ``TrainingArguments`` (``transformers.integrations.deepspeed.
    HfTrainerDeepSpeedConfig.trainer_config_process``/``trainer_config_finalize``, then Accelerate's
    ``_prepare_deepspeed``); a recipe has no ``TrainingArguments``, so each key takes the recipe's equivalent of the
    argument HF reads, or the argument's default where the recipe has none:

    Key -> what HF fills it from -> what it becomes here:

    - ``train_micro_batch_size_per_gpu``: ``per_device_train_batch_size`` -> 8, the recipe's micro-batch;
    - ``gradient_accumulation_steps``: ``gradient_accumulation_steps`` -> 1;
    - ``train_batch_size``: world size x micro x accumulation -> DeepSpeed's data-parallel ranks (one client's, see
      :func:`data_parallel_size`) x micro x accumulation;
    - ``gradient_clipping``: ``max_grad_norm`` (default 1.0) -> 1.0;
    - ``optimizer.params.lr/betas/eps/weight_decay``: the Adam arguments -> ``optim.*`` (the section itself is then
      refused: BlockAdam is the optimizer);
    - ``scheduler.params.warmup_min_lr`` -> 0; ``warmup_max_lr``: ``learning_rate`` -> ``optim.lr``;
      ``total_num_steps``: the run's steps -> ``max_steps``; ``warmup_num_steps``: max(1, warmup steps) -> 1 (the
      recipe has no warmup setting);
    - ``fp16.enabled``: ``fp16`` -> false; ``bf16.enabled``: ``bf16`` -> ``model.dtype == bf16`` under ZeRO 1-3, false
      at stage 0 (BlockAdam keeps the fp32 master of bf16 weights itself);
    - ``zero_optimization.reduce_bucket_size`` -> hidden², ``stage3_prefetch_bucket_size`` -> int(0.9 hidden²),
      ``stage3_param_persistence_threshold`` -> 10 hidden (hidden size from the model's config.json, as HF and
      Accelerate do), ``stage3_gather_16bit_weights_on_model_save`` -> false (Accelerate's value).

    Args:
        ds: the DeepSpeed config dict (changed in place).
        cfg: the run's settings.
        data_parallel: DeepSpeed's data-parallel ranks (:func:`data_parallel_size`); None when unknown (then an
            ``"auto"`` ``train_batch_size`` is dropped: DeepSpeed derives it from the other two keys).

    Returns:
        ``{dotted key: resolved value}`` of every value that was ``"auto"`` (empty when none was).

    Raises:
        ConfigError: ``"auto"`` at a key HF does not fill either.
    """
    resolved: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> list[str]:
        if isinstance(node, dict):
            return [k for key, v in node.items() for k in walk(v, f"{prefix}{key}.")]
        return [prefix[:-1]] if node == AUTO else []

    keys = walk(ds, "")
    if not keys:
        return resolved
    o = cfg.optim
    micro = ds.get("train_micro_batch_size_per_gpu")
    micro = DEFAULT_MICRO_BATCH if micro in (None, AUTO) else micro
    gas = ds.get("gradient_accumulation_steps")
    gas = 1 if gas in (None, AUTO) else gas
    stage = _section(ds, "zero_optimization").get("stage", 0)
    hidden: list[int] = []

    def h() -> int:
        if not hidden:
            hidden.append(_hidden_size(cfg))
        return hidden[0]

    values = {
        "train_micro_batch_size_per_gpu": lambda: micro,
        "gradient_accumulation_steps": lambda: gas,
        "train_batch_size": lambda: None if data_parallel is None or not isinstance(micro, int)
        or not isinstance(gas, int) else micro * gas * data_parallel,
        "gradient_clipping": lambda: 1.0,
        "optimizer.params.lr": lambda: o.lr,
        "optimizer.params.betas": lambda: list(o.betas),
        "optimizer.params.eps": lambda: o.eps,
        "optimizer.params.weight_decay": lambda: o.weight_decay,
        "scheduler.params.warmup_min_lr": lambda: 0,
        "scheduler.params.warmup_max_lr": lambda: o.lr,
        "scheduler.params.total_num_steps": lambda: cfg.max_steps,
        "scheduler.params.warmup_num_steps": lambda: 1,
        "fp16.enabled": lambda: False,
        "bf16.enabled": lambda: cfg.model.dtype == "bf16" and stage in (1, 2, 3),
        "bfloat16.enabled": lambda: cfg.model.dtype == "bf16" and stage in (1, 2, 3),
        "zero_optimization.reduce_bucket_size": lambda: h() * h(),
        "zero_optimization.stage3_prefetch_bucket_size": lambda: int(0.9 * h() * h()),
        "zero_optimization.stage3_param_persistence_threshold": lambda: 10 * h(),
        "zero_optimization.stage3_gather_16bit_weights_on_model_save": lambda: False,
    }
    unknown = [k for k in keys if k not in values]
    if unknown:
        raise ConfigError(f"ds_config {unknown[0]}=\"auto\": neither the Hugging Face Trainer nor deca_ds fills this "
                          "key: give a value")
    for key in keys:
        value = values[key]()
        *parents, last = key.split(".")
        node = ds
        for part in parents:
            node = node[part]
        if value is None:
            del node[last]
        else:
            node[last] = value
        resolved[key] = value
    return resolved


def check_ds_config(ds: dict[str, Any], cfg: RunConfig, world_size: int | None = None) -> None:
    """Refuse DeepSpeed settings that silently break block-wise training, with the fix in one line.

    Every section is type-checked first (a bare value where DeepSpeed expects an object is refused) and Hugging Face
    ``"auto"`` values are resolved as the HF Trainer resolves them (:func:`resolve_auto`). Stage 0
    (``deca_ds.engine.DecaEngine``): no bf16/fp16 section (BlockAdam keeps the fp32 master itself) and no offload.
    Stages 1-3 (``deca_ds.engine.ZeroBlockEngine``): a ``bf16`` section only with ``model.dtype=bf16``, no fp16,
    optimizer offload to the CPU allowed, parameter offload refused. Batch keys are filled and checked as DeepSpeed
    does (:func:`check_batch_sizes`).

    Args:
        ds: DeepSpeed config dict (missing batch keys are filled in place).
        cfg: the run's settings.
        world_size: ranks launched. Needed only for ``method: centralized`` (every rank is one data-parallel group);
            when it is unknown there, only the batch keys' types are checked.

    Raises:
        ConfigError: the first setting deca_ds cannot honour.
    """
    if not isinstance(ds, dict):
        raise ConfigError(f"ds_config must be a JSON object, got {type(ds).__name__}: write {{...}} at the top level")
    for key in OBJECT_SECTIONS:
        _section(ds, key)
    resolve_auto(ds, cfg, data_parallel_size(cfg, world_size))
    for key in OBJECT_SECTIONS:
        _section(ds, key)
    zero = _section(ds, "zero_optimization")
    for key in ZERO_OBJECT_SECTIONS:
        _section(zero, key, "zero_optimization.")
    stage = zero_stage(ds)
    clip = ds.get("gradient_clipping", 0.0)
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip)
                             or clip < 0):
        raise ConfigError(f"ds_config gradient_clipping={json.dumps(clip)} must be a finite number >= 0 (0: off): "
                          'write e.g. "gradient_clipping": 1.0')
    adamw_baseline = cfg.method == "centralized" and cfg.centralized_optimizer == "adamw"
    for key in ("bf16", "bfloat16", "fp16"):
        if not _enabled(_section(ds, key), key):
            continue
        name = "bf16" if key == "bfloat16" else key
        if stage == 0 and not adamw_baseline:
            raise ConfigError(f"ds_config enables {key}: deca_ds keeps {name} weights with an fp32 master of the "
                              f"active block itself; remove the {key} section and set model.dtype="
                              f"{name} in the recipe")
        if stage >= 1 and name == "fp16":
            raise ConfigError("ds_config enables fp16 with ZeRO: fp16 loss scaling skips steps behind deca_ds's "
                              "back and is not supported; use a bf16 section with model.dtype=bf16")
        if stage >= 1 and cfg.model.dtype != "bf16":
            raise ConfigError(f"ds_config enables {key} with ZeRO stage {stage} but model.dtype={cfg.model.dtype}: "
                              "set model.dtype=bf16 (or remove the bf16 section)")
    devices = {}
    for key in ZERO_OBJECT_SECTIONS:
        device = _section(zero, key).get("device", "none")
        if device is None:
            device = "none"
        if device not in OFFLOAD_DEVICES:
            raise ConfigError(f"ds_config zero_optimization.{key}.device={json.dumps(device)} is not known: use "
                              f"{', '.join(OFFLOAD_DEVICES)}")
        devices[key] = device
    if stage == 0 and devices["offload_optimizer"] != "none":
        raise ConfigError("ds_config offload_optimizer needs ZeRO: set zero_optimization.stage to 1, 2 or 3, or use "
                          "optim.state_policy=offload to park inactive blocks' state in host memory")
    if devices["offload_optimizer"] == "nvme":
        if stage < 3:  # DeepSpeed's stage 1/2 optimizer treats any offload device as CPU memory
            raise ConfigError(f"ds_config zero_optimization.offload_optimizer.device=\"nvme\" with ZeRO stage {stage}: "
                              "stages 1-2 offload to CPU memory only (DeepSpeed would silently use it); set the "
                              "device to \"cpu\", or use stage 3 with an nvme_path")
        if not _section(zero, "offload_optimizer").get("nvme_path"):
            raise ConfigError("ds_config zero_optimization.offload_optimizer.device=\"nvme\" needs nvme_path: add "
                              "\"nvme_path\": \"/local_nvme\" (a directory on the NVMe drive), or set the device to "
                              "\"cpu\"")
    if devices["offload_param"] != "none":
        raise ConfigError("ds_config offload_param is not supported with block switching: remove it (use "
                          "offload_optimizer and optim.state_policy=offload)")
    if "optimizer" in ds:
        raise ConfigError("ds_config has an 'optimizer' section: deca_ds supplies BlockAdam; remove the section "
                          "and set optim.lr/optim.betas/optim.weight_decay in the recipe")
    if adamw_baseline and cfg.model.dtype != "fp32" and stage == 0:
        raise ConfigError("centralized_optimizer=adamw needs model.dtype=fp32: torch AdamW has no fp32 master of "
                          "low-precision weights")
    dp = data_parallel_size(cfg, world_size)
    if dp is not None:
        check_batch_sizes(ds, dp, "rank(s) of a client (clients.ranks_per_client)" if cfg.method != "centralized"
                          else "rank(s) (method=centralized: every rank is one data-parallel group)")
    else:
        check_batch_sizes(dict(ds), 1)  # types only; the arithmetic needs the world size
    if cfg.optim.fused_backward:
        _check_fused_backward(ds, stage, clip)
    if cfg.optim.moment_dtype != "fp32" and stage >= 1:
        raise ConfigError(f"optim.moment_dtype={cfg.optim.moment_dtype} needs BlockAdam, and under ZeRO stage {stage} "
                          "DeepSpeed's AdamW holds the moments: set optim.moment_dtype=fp32 or "
                          "zero_optimization.stage=0")
    if not cfg.optim.decay_norms_and_biases and stage >= 1:
        raise ConfigError(f"optim.decay_norms_and_biases=false needs BlockAdam's per-parameter weight decay, and under "
                          f"ZeRO stage {stage} DeepSpeed's AdamW decays the whole block: set "
                          "optim.decay_norms_and_biases=true or zero_optimization.stage=0")


FUSED_FIX = "or set optim.fused_backward=false"


def _check_fused_backward(ds: dict[str, Any], stage: int, clip: float | None) -> None:
    """Refuse DeepSpeed settings that need every gradient of the step before the update, with
    ``optim.fused_backward`` (which steps each parameter inside backward and frees its gradient).

    ``ds`` has its batch keys filled (:func:`check_batch_sizes`): a ``train_batch_size`` that implies several
    micro-batches per step is caught through the derived ``gradient_accumulation_steps``.
    """
    if stage >= 1:
        raise ConfigError(f"ds_config zero_optimization.stage={stage} with optim.fused_backward=true: the fused step "
                          f"is BlockAdam's own (ZeRO partitions DeepSpeed's optimizer): use stage 0, {FUSED_FIX}")
    if clip:
        raise ConfigError(f"ds_config gradient_clipping={json.dumps(clip)} with optim.fused_backward=true: clipping "
                          "needs the whole gradient's norm before any update, and the fused step updates each "
                          f'parameter as its gradient completes: set "gradient_clipping": 0, {FUSED_FIX}')
    gas = ds.get("gradient_accumulation_steps", 1)
    if gas != 1:
        raise ConfigError(f"ds_config gradient_accumulation_steps={gas} with optim.fused_backward=true: the fused step "
                          "updates the weights during the first micro-batch's backward: set "
                          f"\"gradient_accumulation_steps\": 1 (and raise train_micro_batch_size_per_gpu), {FUSED_FIX}")
    if _enabled(_section(ds, "amp"), "amp"):
        raise ConfigError(f"ds_config enables amp with optim.fused_backward=true: amp scales the loss and unscales "
                          f"gradients after backward, when the fused step has already used them: remove amp, "
                          f"{FUSED_FIX}")
    autocast = _section(ds, "torch_autocast")
    if _enabled(autocast, "torch_autocast") and str(autocast.get("dtype", "")).replace("torch.", "") in (
            "fp16", "float16", "half"):
        raise ConfigError("ds_config torch_autocast with dtype fp16 scales the loss (a GradScaler) and unscales "
                          "gradients in engine.step(), after optim.fused_backward=true has already applied them: use "
                          f"bf16 (or no) autocast, {FUSED_FIX}")


def uses_activation_checkpointing(ds: dict[str, Any]) -> bool:
    """A ds_config ``activation_checkpointing`` section turns on the model's (non-reentrant) checkpointing."""
    return "activation_checkpointing" in ds
