"""BlockOptimizer: BAdam 1.4's ``BlockOptimizer`` as a drop-in, built on deca_ds's blocks, AdamW maths and state store.

A BAdam (or LLaMA-Factory ``use_badam``) user changes one import::

    from deca_ds import BlockOptimizer          # was: from badam import BlockOptimizer

and keeps the constructor call, the training loop or ``transformers.Trainer``, and the results: with the defaults
every step equals ``badam==1.4``'s, bit for bit on CPU (``tests/unit/test_badam.py``, fp32 and bf16). What it adds:
``state_policy="offload"`` parks each inactive block's fp32 master and Adam moments in host memory (``offload_dtype=
"int8"``: 8-bit moments) instead of dropping them at every switch; a checkpoint that holds every block and resumes
exactly; a seeded random order (``seed=``); and clear errors where BAdam silently misbehaves or crashes.

BAdam 1.4 behaviour kept (read from its source, ``badam/block_optim.py``):

* Blocks: ``block_prefix_list`` is a list of blocks, each a list of name *substrings* (``"model.layers.3."``); without
  it the blocks are inferred from the names as BAdam does (:func:`infer_block_prefixes`). A
  :class:`~deca_ds.blocks.BlockPartition` from :func:`deca_ds.partition_blocks` is accepted too (module-structure
  detection: GPT-2, OPT, ... whose layers are not named ``layers``).
* Order: the first block is ``start_block``, else the last (``descending``, BAdam's default), the first
  (``ascending``) or the last element of a ``torch.randperm`` drawn from torch's global generator (``random``: a fresh
  permutation per round, drawn when BAdam draws it); ``fixed`` stays on ``start_block``.
* Switch counting: BAdam switches when ``(global_step + 1) % switch_block_every == 0`` *after* incrementing
  ``global_step``, so the first block is trained for ``switch_block_every - 1`` steps and every later one for
  ``switch_block_every`` (all of them for one step when it is 1).
* Every visit, a "switch" to the same block included, starts with zero moments, bias correction at 1 and an fp32
  master copied from the (bf16) weights: ``state_policy="reset"``.
* The update is AdamW on the fp32 master with the hyperparameters of ``base_optimizer.defaults`` (betas, eps,
  weight decay, decoupled or L2 for ``torch.optim.Adam``) and the learning rate of ``param_groups[0]`` (what LR
  schedulers set): BAdam rebuilds its groups from the defaults, so per-group weight decay is not honoured (a warning
  says so when the groups differ).
* ``active_modules``: name substrings trained in every block as well.

Refused with a clear error (BAdam would be wrong or crash): DeepSpeed ZeRO at any stage or DeepSpeed's bf16/fp16
optimizer wrapping this one (BAdam's ZeRO-3 path loses the update of every switching step; deca_ds's own engine does
ZeRO right), several processes (DDP registers the trainable parameters once, so later blocks would not be averaged),
LoRA mode, base optimizers other than torch Adam/AdamW, ``amsgrad``, ``random`` with ``start_block``.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections import defaultdict
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from deca_ds.blocks import Block, BlockPartition, BlockSchedule, SchedulePosition
from deca_ds.config import ConfigError
from deca_ds.optim.block_adam import STATE_POLICIES, adamw_step_
from deca_ds.optim.state_store import OFFLOAD_DTYPES, BlockStateStore

SWITCH_MODES = ("ascending", "descending", "random", "fixed")
_FORMAT = "deca_ds.BlockOptimizer/1"
_ENGINE_HINT = ("for block-wise Adam on several GPUs or under ZeRO 1-3 use deca_ds's engine, which re-initializes "
                "DeepSpeed at every switch: `deepspeed --num_gpus N recipes/finetune.py --config "
                "recipes/configs/gpu_bf16.yaml method=centralized ds_config=ds_configs/gpu_bf16_zero3.json "
                "model.path=... data.path=...` (README, Methods)")


def infer_block_prefixes(param_names: Iterable[str], include_embedding: bool = False,
                         include_lm_head: bool = False) -> list[list[str]]:
    """BAdam 1.4's block inference from parameter names (``BlockOptimizer.infer_param_groups``), unchanged.

    One block per ``…layers.<i>.`` prefix, in order of first appearance; with ``include_embedding`` one block per
    ``…embed….`` prefix; with ``include_lm_head`` a last block holding every other parameter name (the final norm and
    the head, *and the embeddings when they are not a block of their own*, as BAdam does).

    Args:
        param_names: Names as in ``model.named_parameters()``.
        include_embedding: Make the embeddings a block.
        include_lm_head: Add the block of all remaining parameters.

    Returns:
        A list of blocks, each a list of name substrings.
    """
    blocks: list[list[str]] = []
    rest: list[str] = []
    for name in param_names:
        if any(prefix[0] in name for prefix in blocks):
            continue
        layer = re.findall(r".*layers.[^.]*\.", name)
        embed = re.findall(r".*embed[^.]*\.", name)
        if layer:
            blocks.append(layer)
        elif embed and include_embedding:
            blocks.append(embed)
        else:
            rest.append(name)
    if include_lm_head:
        blocks.append(rest)
    return blocks


def _blocks_from_prefixes(names: list[str], prefix_list) -> tuple[list[Block], list[list[str]]]:
    """Blocks of the parameter names each prefix list selects (BAdam's substring test ``prefix in name``)."""
    prefixes = [[p] if isinstance(p, str) else list(p) for p in prefix_list]
    blocks = []
    for i, pl in enumerate(prefixes):
        label = ", ".join(s.rstrip(".") for s in pl[:3]) + (f", … ({len(pl)} prefixes)" if len(pl) > 3 else "")
        blocks.append(Block(i, label, tuple(n for n in names if any(p in n for p in pl))))
    return blocks, prefixes


def _adam_hyperparameters(base_optimizer: torch.optim.Optimizer) -> dict:
    """The update BAdam's rebuilt groups get: ``base_optimizer.defaults`` (checked to be Adam/AdamW maths)."""
    if not isinstance(base_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise ConfigError(
            f"base_optimizer is {type(base_optimizer).__module__}.{type(base_optimizer).__name__}: deca_ds's "
            "BlockOptimizer runs AdamW's maths itself and needs torch.optim.AdamW or torch.optim.Adam "
            "(use badam for other base optimizers)")
    d = base_optimizer.defaults
    if d.get("amsgrad", False):
        raise ConfigError("base_optimizer has amsgrad=True, which deca_ds's BlockOptimizer does not implement: "
                          "build it with amsgrad=False")
    # torch < 2.6 has no decoupled_weight_decay key: there AdamW is decoupled and Adam is L2.
    decoupled = isinstance(base_optimizer, torch.optim.AdamW) or bool(d.get("decoupled_weight_decay", False))
    beta1, beta2 = (float(b) for b in d["betas"])
    return dict(beta1=beta1, beta2=beta2, eps=float(d["eps"]), weight_decay=float(d["weight_decay"]),
                decoupled=decoupled, maximize=bool(d.get("maximize", False)))


def _refuse_deepspeed_and_multiprocess(ds_zero3_enabled) -> None:
    """Raise before training when ZeRO, DeepSpeed's mixed-precision wrapper or several processes are in play."""
    if ds_zero3_enabled:
        raise ConfigError(f"ds_zero3_enabled=True: deca_ds's BlockOptimizer does not take BAdam's ZeRO-3 path, "
                          f"which loses the update of every switching step; {_ENGINE_HINT}")
    hf_ds = sys.modules.get("transformers.integrations.deepspeed")  # only if the user's code loaded it
    try:
        cfg = hf_ds.deepspeed_config() if hf_ds is not None and hasattr(hf_ds, "deepspeed_config") else None
    except AttributeError:  # a half-built HfDeepSpeedConfig (its constructor failed): no DeepSpeed run
        cfg = None
    if cfg:
        stage = (cfg.get("zero_optimization") or {}).get("stage", 0)
        if stage not in (0, "0"):
            raise ConfigError(f"the DeepSpeed config has zero_optimization.stage={stage}: ZeRO hands the optimizer "
                              f"flat partitions fixed at initialize, so block switching cannot work through "
                              f"deca_ds's BlockOptimizer; {_ENGINE_HINT}")
        for section in ("bf16", "fp16"):
            if (cfg.get(section) or {}).get("enabled") is True:
                raise ConfigError(f"the DeepSpeed config has {section}.enabled=true: DeepSpeed then wraps the "
                                  f"optimizer with fp32 copies of every parameter; turn the section off and load the "
                                  f"model in {section} (BlockOptimizer keeps the fp32 master of the active block)")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            raise ConfigError(f"{world} processes: deca_ds's BlockOptimizer trains in one process (as BAdam without "
                              f"ZeRO-3); DDP registers the trainable parameters once, so later blocks' gradients "
                              f"would not be averaged; {_ENGINE_HINT}")


class BlockOptimizer(torch.optim.Optimizer):
    """BAdam 1.4's ``BlockOptimizer`` (same constructor, same steps) with deca_ds's block state policies.

    ``param_groups`` are ``base_optimizer``'s own groups (every parameter), as in BAdam, so LR schedulers built on
    either optimizer work; ``state[p]`` exists for the active parameters only, with torch's keys ``step``,
    ``exp_avg``, ``exp_avg_sq`` (fp32) and ``master`` (fp32, for bf16/fp16 parameters).

    Args:
        base_optimizer: A ``torch.optim.AdamW`` or ``torch.optim.Adam`` over the model's parameters. Only its groups'
            learning rate (group 0, as BAdam) and its ``defaults`` are used; it never steps and holds no state.
        named_parameters_list: ``list(model.named_parameters())``.
        block_prefix_list: Blocks as lists of name substrings (BAdam), or a
            :class:`~deca_ds.blocks.BlockPartition`; ``None`` infers them as BAdam does.
        switch_block_every: Steps per block visit, counted as BAdam counts (the first visit is one step shorter).
        start_block: Index of the first block (required by ``fixed``; not allowed with ``random``).
        switch_mode: ``descending`` (default, as BAdam), ``ascending``, ``random`` or ``fixed``.
        active_modules: Name substrings trained in every block as well.
        include_embedding: With ``block_prefix_list=None``: make the embeddings a block.
        include_lm_head: With ``block_prefix_list=None``: add the block of every other parameter (norm, head).
        verbose: 0 silent, 1 one line per block switch, 2 also the trained parameter names.
        log_fn: Called with each message instead of printing it (BAdam 1.4 accepts it but never calls it).
        ds_zero3_enabled: ``True`` raises (BAdam's ZeRO-3 path is not taken); ZeRO is also detected from
            ``transformers``' DeepSpeed config.
        state_policy: ``"reset"`` (BAdam: a block's master and moments are dropped when its visit ends) or
            ``"offload"`` (parked in host memory and restored at its next visit; its ``step`` counter continues).
        offload_dtype: ``"fp32"`` or ``"int8"`` storage of parked moments (see :mod:`deca_ds.optim.state_store`).
        seed: ``random`` only: ``None`` draws each round's permutation from torch's global generator, as BAdam;
            an integer uses deca_ds's seeded :class:`~deca_ds.blocks.BlockSchedule` (identical wherever it runs and
            after a resume, whatever else consumed random numbers).

    Raises:
        ConfigError: a setting this optimizer cannot honour (see the module docstring), named with the fix.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        named_parameters_list,
        block_prefix_list=None,
        switch_block_every: int = 50,
        start_block: int | None = None,
        switch_mode: str = "descending",
        active_modules: Sequence[str] | None = None,
        include_embedding: bool = False,
        include_lm_head: bool = False,
        verbose: int = 1,
        log_fn: Callable[[str], None] | None = None,
        ds_zero3_enabled: bool | None = None,
        *,
        state_policy: str = "reset",
        offload_dtype: str = "fp32",
        seed: int | None = None,
    ):
        _refuse_deepspeed_and_multiprocess(ds_zero3_enabled)
        self._hyper = _adam_hyperparameters(base_optimizer)
        if switch_mode not in SWITCH_MODES:
            raise ConfigError(f"switch_mode={switch_mode!r} is not known: use one of {', '.join(SWITCH_MODES)}")
        if int(switch_block_every) < 1:
            raise ConfigError(f"switch_block_every={switch_block_every!r} is out of range: use a value >= 1")
        if state_policy not in STATE_POLICIES:
            raise ConfigError(f"state_policy={state_policy!r} is not known: use one of {', '.join(STATE_POLICIES)}")
        if offload_dtype not in OFFLOAD_DTYPES:
            raise ConfigError(f"offload_dtype={offload_dtype!r} is not known: use one of {', '.join(OFFLOAD_DTYPES)}")
        named_parameters_list = list(named_parameters_list)
        names = [n for n, _ in named_parameters_list]
        lora = [n for n in names if "lora" in n]
        if lora:
            raise ConfigError(f"LoRA parameters found ({lora[0]}, ...): deca_ds's BlockOptimizer trains full "
                              "parameters and does not implement BAdam's LoRA mode; use badam for LoRA")

        if isinstance(block_prefix_list, BlockPartition):
            blocks = [Block(i, b.name, b.param_names) for i, b in enumerate(block_prefix_list.blocks)]
            prefixes = [list(b.param_names) for b in blocks]
        else:
            if block_prefix_list is None:
                block_prefix_list = infer_block_prefixes(names, include_embedding, include_lm_head)
            if not isinstance(block_prefix_list, (list, tuple)) or not block_prefix_list:
                raise ConfigError(
                    "block_prefix_list is empty: no parameter name contains 'layers.' (BAdam's inference); pass "
                    "block_prefix_list=deca_ds.partition_blocks(model), which finds the layer stack of any causal LM")
            blocks, prefixes = _blocks_from_prefixes(names, block_prefix_list)
        try:
            BlockPartition(blocks)  # disjoint, non-empty
        except ValueError as e:
            raise ConfigError(f"block_prefix_list: {e}") from None
        unknown = [n for b in blocks for n in b.param_names if n not in names]
        if unknown:
            raise ConfigError(f"block_prefix_list names parameters not in named_parameters_list: {unknown[:3]}")
        num_blocks = len(blocks)

        if start_block is not None and not 0 <= int(start_block) < num_blocks:
            raise ConfigError(f"start_block={start_block!r} is out of range: use 0..{num_blocks - 1}")
        if switch_mode == "fixed" and start_block is None:
            raise ConfigError("switch_mode='fixed' trains start_block only: pass start_block=<block index>")
        if switch_mode == "random" and start_block is not None:
            raise ConfigError("switch_mode='random' with start_block is not supported (BAdam 1.4 fails at its first "
                              "switch): drop start_block, or use ascending/descending")

        # BAdam-compatible attributes.
        self.base_optimizer = base_optimizer
        self.named_parameters_list = named_parameters_list
        self.block_prefix_list = prefixes
        self.block_num = num_blocks
        self.switch_block_every = int(switch_block_every)
        self.switch_mode = switch_mode
        self.start_block = None if start_block is None else int(start_block)
        self.active_modules = list(active_modules or [])
        self.verbose = int(verbose)
        self.log_fn = log_fn
        self.global_step = 0
        """Optimizer steps taken (BAdam's counter)."""
        self.state_policy = state_policy
        self.offload_dtype = offload_dtype
        self.seed = seed

        self._blocks = blocks
        named = dict(named_parameters_list)
        self._named = named
        self._names: dict[nn.Parameter, str] = {p: n for n, p in named_parameters_list}
        self._block_params = [[named[n] for n in b.param_names] for b in blocks]
        in_block = {n for b in blocks for n in b.param_names}
        # Trained in every visit; with ``offload`` their state stays on the device (they never go inactive).
        self._always = [p for n, p in named_parameters_list
                        if n not in in_block and any(m in n for m in self.active_modules)]
        self._always_in_block = {id(p) for n, p in named_parameters_list
                                 if n in in_block and any(m in n for m in self.active_modules)}
        self._store = BlockStateStore(offload_dtype) if state_policy == "offload" else None

        # The schedule: BlockSchedule's arithmetic, shifted so that step 0 is inner step 1 of the start block's visit
        # (BAdam's first visit is one step short). Torch-random keeps BlockSchedule(ascending) for the arithmetic, its
        # "block index" being the slot within the round, and draws each round's order as BAdam does.
        R = self.switch_block_every
        self._torch_random = switch_mode == "random" and seed is None
        if switch_mode == "fixed":
            self._schedule = BlockSchedule(num_blocks, R, "fixed", [self.start_block])
            start_slot = 0
        elif switch_mode == "random":
            self._schedule = BlockSchedule(num_blocks, R, "ascending" if self._torch_random else "random",
                                           seed=0 if seed is None else int(seed))
            start_slot = 0
        else:
            self._schedule = BlockSchedule(num_blocks, R, switch_mode)
            first = self.start_block if self.start_block is not None else (
                num_blocks - 1 if switch_mode == "descending" else 0)
            start_slot = first if switch_mode == "ascending" else num_blocks - 1 - first
        self._offset = start_slot * R + 1 % R
        self._round_orders: dict[int, list[int]] = {}
        if self._torch_random:
            self._draw_round(0)

        warned = self._differing_group_settings(base_optimizer)
        if warned:
            warnings.warn(
                f"base_optimizer's param groups set {warned}, but BAdam 1.4 (and this drop-in) trains every parameter "
                f"with base_optimizer.defaults (weight_decay={self._hyper['weight_decay']}, betas="
                f"{(self._hyper['beta1'], self._hyper['beta2'])}, eps={self._hyper['eps']}) and the lr of "
                "param_groups[0]; build the base optimizer with the values you want as its defaults",
                UserWarning, stacklevel=2)

        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        self._checked_first_step = False
        self._param_ids = {id(p) for _, p in named_parameters_list}
        self._active = -1
        self._enter_visit()

    # ------------------------------------------------------------------------------------------------ schedule

    @staticmethod
    def _differing_group_settings(base_optimizer) -> str:
        def text(key, value):
            return str(tuple(float(v) for v in value) if key == "betas" else float(value))

        d = base_optimizer.defaults
        diffs = []
        for key in ("weight_decay", "betas", "eps", "lr"):
            values = sorted({text(key, g[key]) for g in base_optimizer.param_groups if key in g})
            # lr: only group 0's is used, so groups must agree among themselves (the default lr is irrelevant).
            expected = values[:1] if key == "lr" else [text(key, d[key])]
            if values and values != expected:
                diffs.append(f"{key} in {values}")
        return ", ".join(diffs)

    def _draw_round(self, round_idx: int) -> None:
        """BAdam's ``torch.randperm`` for one round, visited from its last element to its first."""
        perm = torch.randperm(self.block_num).tolist()
        self._round_orders[round_idx] = perm[::-1]
        for old in [r for r in self._round_orders if r < round_idx - 1]:
            del self._round_orders[old]
        self._log(f"deca_ds.BlockOptimizer: block order of round {round_idx}: {perm[::-1]}")

    def _position(self, step: int) -> SchedulePosition:
        return self._schedule.position(step + self._offset)

    def _block_at(self, pos: SchedulePosition) -> int:
        if self._torch_random:
            return self._round_orders[pos.round][pos.block_idx]
        return pos.block_idx

    @property
    def schedule(self) -> BlockSchedule:
        """The :class:`~deca_ds.blocks.BlockSchedule` doing the step arithmetic (shifted by BAdam's counting)."""
        return self._schedule

    @property
    def blocks(self) -> list[Block]:
        """The blocks, indexed by block index."""
        return list(self._blocks)

    @property
    def active_block_idx(self) -> int:
        """Index of the block being trained."""
        return self._active

    @property
    def active_block(self) -> Block:
        """The block being trained."""
        return self._blocks[self._active]

    @property
    def state_store(self) -> BlockStateStore | None:
        """Host store of inactive blocks' state (``None`` with ``state_policy="reset"``)."""
        return self._store

    def active_params(self) -> list[nn.Parameter]:
        """Parameters trained at this step: the active block's, then the always-active ones."""
        return list(self._block_params[self._active]) + list(self._always)

    def param_name(self, p: nn.Parameter) -> str:
        """The model's name of parameter ``p``."""
        return self._names[p]

    # ------------------------------------------------------------------------------------------------ switching

    def _log(self, msg: str) -> None:
        if self.verbose < 1:
            return
        if self.log_fn is not None:
            self.log_fn(msg)
        elif not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
                torch.distributed.get_rank() == 0:
            print(msg)

    @torch.no_grad()
    def _enter_visit(self) -> None:
        """Start the visit scheduled at ``global_step``: apply the state policy, move ``requires_grad``."""
        pos = self._position(self.global_step)
        new, old = self._block_at(pos), self._active
        leaving = [] if old < 0 else self._block_params[old]
        for p in leaving:
            p.grad = None
        if self.state_policy == "reset":
            # BAdam: every visit, a re-visit of the same block included, starts from fresh state.
            self.state = defaultdict(dict)
        elif old >= 0 and new != old:
            parked = {}
            for p in leaving:
                if id(p) in self._always_in_block:
                    continue
                st = self.state.pop(p, None)
                if st:
                    parked[self._names[p]] = st
            if parked:
                self._store.put(old, parked)
        self._active = new
        for _, p in self.named_parameters_list:
            p.requires_grad_(False)
        for p in self.active_params():
            p.requires_grad_(True)
        if self._store is not None and new != old:
            restored = self._store.take(new, self._block_params[new][0].device) or {}
            for p in self._block_params[new]:
                if self._names[p] in restored:
                    self.state[p] = {k: (v if v.dim() == 0 else v.to(p.device))
                                     for k, v in restored[self._names[p]].items()}
        if self._torch_random and pos.block_idx == self.block_num - 1:
            self._draw_round(pos.round + 1)  # BAdam draws the next round when it pops the last block of this one
        if self._store is not None:
            nxt = self._block_at(self._position(self.global_step + self.switch_block_every - pos.inner_step))
            if nxt != new:
                self._store.prefetch(nxt, self._block_params[nxt][0].device)
        block = self._blocks[new]
        numel = sum(p.numel() for p in self.active_params())
        self._log(f"deca_ds.BlockOptimizer: step {self.global_step}: training block {new} ({block.name}; "
                  f"{len(self.active_params())} tensors, {numel:,} params)")
        if self.verbose >= 2:
            self._log("  " + ", ".join(self._names[p] for p in self.active_params()))

    # ------------------------------------------------------------------------------------------------ step

    def _state_for(self, p: nn.Parameter) -> dict:
        st = self.state[p]
        if not st:
            # Hazard (dtype): moments and master are fp32 whatever the model dtype.
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            if p.dtype != torch.float32:
                st["master"] = p.detach().float()
        return st

    def _check_unwrapped(self) -> None:
        """DeepSpeed (ZeRO 1-3, or its bf16/fp16 optimizer) replaces the group parameters by flat fp32 copies."""
        _refuse_deepspeed_and_multiprocess(None)
        if not any(id(p) in self._param_ids for g in self.param_groups for p in g["params"]):
            raise ConfigError("the optimizer's param_groups no longer hold the model's parameters: DeepSpeed (ZeRO, or "
                              "its bf16/fp16 section) has wrapped deca_ds's BlockOptimizer, which cannot switch "
                              f"blocks inside it; run DeepSpeed at stage 0 with bf16/fp16 off, or {_ENGINE_HINT}")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One AdamW step on the active parameters, then the switch to the next visit when BAdam would switch.

        Gradients of the active parameters are freed afterwards.

        Returns:
            The closure's loss, if a closure was given.

        Raises:
            RuntimeError: no active parameter has a gradient (BAdam asserts the same).
            ConfigError: DeepSpeed or several processes turned out to be in play (checked at the first step).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._checked_first_step:
            self._check_unwrapped()
            self._checked_first_step = True
        h = self._hyper
        lr = float(self.param_groups[0]["lr"])  # BAdam's _update_lr: group 0's lr, what schedulers set
        params = [p for p in self.active_params() if p.grad is not None]
        if not params:
            raise RuntimeError(
                f"no gradient reached the active block {self._active} ({self.active_block.name}): call backward() "
                "before step(); with gradient checkpointing use gradient_checkpointing_kwargs={'use_reentrant': "
                "False} (reentrant checkpointing skips blocks whose input does not require grad)")
        for p in params:
            # Phase 1: state (fp32 master for low-precision weights), gradient in fp32.
            st = self._state_for(p)
            x = st.get("master", p.data)
            grad = p.grad if p.grad.dtype == torch.float32 else p.grad.float()
            if h["maximize"]:
                grad = -grad
            weight_decay = h["weight_decay"]
            if not h["decoupled"] and weight_decay != 0:
                grad = grad.add(x, alpha=weight_decay)  # torch.optim.Adam's L2 term, on the master as BAdam
                weight_decay = 0.0
            # Phase 2: the AdamW maths on the master.
            st["step"] += 1
            adamw_step_(x, grad, st["exp_avg"], st["exp_avg_sq"], int(st["step"].item()), lr, h["beta1"], h["beta2"],
                        h["eps"], weight_decay)
            # Phase 3: write the master back into the model weights (rounded to bf16/fp16).
            if "master" in st:
                p.data.copy_(x)
            p.grad = None  # Memory: not needed after the step (BAdam frees it too).
        self.global_step += 1
        if self._position(self.global_step).inner_step == 0:
            self._enter_visit()
        return loss

    # ------------------------------------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: position, round orders, hyperparameters, every block's state.

        Keyed by parameter name, so a fresh model and optimizer can load it; only plain types and tensors, so
        ``torch.load(..., weights_only=True)`` (Hugging Face Trainer) reads it.
        """
        return {
            "format": _FORMAT,
            "global_step": self.global_step,
            "active_block_idx": self._active,
            "block_names": [list(b.param_names) for b in self._blocks],
            "state_policy": self.state_policy,
            "round_orders": {int(r): list(o) for r, o in self._round_orders.items()},
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "state": {self._names[p]: {k: v.clone() for k, v in st.items()} for p, st in self.state.items() if st},
            "offloaded": self._store.state_dict() if self._store is not None else None,
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state saved by :meth:`state_dict` (the model weights are restored separately).

        Raises:
            ConfigError: not this optimizer's format (e.g. a BAdam checkpoint), or other blocks or state policy.
        """
        if not isinstance(state_dict, dict) or state_dict.get("format") != _FORMAT:
            raise ConfigError("the optimizer checkpoint is not a deca_ds BlockOptimizer state (a BAdam checkpoint "
                              "holds only the active block's moments, keyed by position): start the optimizer fresh, "
                              "e.g. delete optimizer.pt from the checkpoint directory")
        if state_dict["block_names"] != [list(b.param_names) for b in self._blocks]:
            raise ConfigError("the checkpoint's blocks differ from this optimizer's: build it with the same "
                              "block_prefix_list / include_embedding / include_lm_head")
        if state_dict["state_policy"] != self.state_policy:
            raise ConfigError(f"the checkpoint uses state_policy={state_dict['state_policy']!r}: build the optimizer "
                              f"with that state_policy")
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ConfigError(f"the checkpoint has {len(state_dict['param_groups'])} param groups, base_optimizer "
                              f"{len(self.param_groups)}: build the base optimizer with the same groups")
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved)
        self.global_step = int(state_dict["global_step"])
        self._round_orders = {int(r): [int(i) for i in o] for r, o in state_dict["round_orders"].items()}
        for p in self.active_params():
            p.grad = None
        self.state = defaultdict(dict)
        self._active = int(state_dict["active_block_idx"])
        for _, p in self.named_parameters_list:
            p.requires_grad_(False)
        for p in self.active_params():
            p.requires_grad_(True)
        for name, st in state_dict["state"].items():
            p = self._named[name]
            self.state[p] = {k: (v.detach().cpu().clone() if k == "step" else v.detach().to(p.device).clone())
                             for k, v in st.items()}
        if self._store is not None:
            self._store = BlockStateStore(self.offload_dtype)
            if state_dict["offloaded"] is not None:
                self._store.load_state_dict(state_dict["offloaded"])
