"""Cut a model's parameters into blocks, and say which block is trained at which optimizer step.

Block-wise Adam (and DECA on top of it) trains one block of parameters at a time, so every other module needs the
same two answers: *which parameters form block k* (:func:`partition_blocks`) and *which block is active at global
step t* (:class:`BlockSchedule`). Both are pure functions of the model structure, a few settings and a shared seed,
so every client computes identical answers without communicating.

The decoder-layer stack is found from the module structure (the ``nn.ModuleList`` of same-class modules holding the
most parameters), not from a name regex, so the same code partitions Llama, Mistral, Qwen, Gemma, Phi-3, GPT-2,
GPT-NeoX, OPT, Falcon and most other Hugging Face causal LMs.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import numpy as np
from torch import nn

ORDERS = ("ascending", "descending", "fixed", "random")


@dataclass(frozen=True)
class Block:
    """One trainable unit of block-wise Adam.

    Attributes:
        index: Position of the block in its partition (0-based).
        name: Human-readable name, e.g. ``"layers.0"``, ``"layers.0-1"``, ``"embeddings"``, ``"lm_head"``.
        param_names: Names as in ``model.named_parameters()``, in model order.
    """

    index: int
    name: str
    param_names: tuple[str, ...]


class BlockPartition:
    """Disjoint blocks of a model's parameters, plus the parameters that belong to no block (frozen).

    Args:
        blocks: The blocks, indexed 0..B-1 in order.
        frozen: Names of parameters in no block; they are never trained.
    """

    def __init__(self, blocks: Sequence[Block], frozen: Sequence[str] = ()):
        self.blocks: list[Block] = list(blocks)
        self.frozen: list[str] = list(frozen)
        _check_disjoint_nonempty(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self) -> Iterator[Block]:
        return iter(self.blocks)

    def __getitem__(self, idx: int) -> Block:
        return self.blocks[idx]

    def __repr__(self) -> str:
        names = ", ".join(b.name for b in self.blocks)
        return f"BlockPartition({len(self.blocks)} blocks: {names}; {len(self.frozen)} frozen)"

    def block_sizes(self, model: nn.Module) -> list[int]:
        """Number of scalar parameters in each block of ``model``."""
        params = dict(model.named_parameters())
        return [sum(params[n].numel() for n in b.param_names) for b in self.blocks]

    def num_params(self, model: nn.Module) -> int:
        """Number of trainable (in-block) scalar parameters of ``model``."""
        return sum(self.block_sizes(model))

    def param_names(self) -> list[str]:
        """All in-block parameter names, block by block."""
        return [n for b in self.blocks for n in b.param_names]


def _check_disjoint_nonempty(blocks: Sequence[Block]) -> None:
    owner: dict[str, str] = {}
    dup: list[str] = []
    for b in blocks:
        if not b.param_names:
            raise ValueError(f"block {b.index} ({b.name!r}) holds no parameters; every block must be non-empty")
        for n in b.param_names:
            if n in owner:
                dup.append(f"{n} (in {owner[n]!r} and {b.name!r})")
            owner[n] = b.name
    if dup:
        raise ValueError("parameters in more than one block: " + ", ".join(dup))


def _find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of same-class modules holding the most parameters (the decoder layers)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        size = sum(p.numel() for p in mod.parameters())
        if size > 0 and (best is None or size > best[0]):
            best = (size, name, mod)
    if best is None:
        raise ValueError(
            f"{type(model).__name__}: no nn.ModuleList of identical layers with parameters was found; "
            "pass prefixes=[...] (one name prefix or regex per block) to partition it explicitly"
        )
    return best[1], best[2]


def _names_of(module: nn.Module | None, id_to_name: dict[int, str]) -> list[str]:
    """Names (as in the model's deduplicated ``named_parameters()``) of ``module``'s parameters."""
    if module is None:
        return []
    # ``named_parameters()`` deduplicates tied weights under the first name; map by identity, not by name.
    return [id_to_name[id(p)] for p in module.parameters() if id(p) in id_to_name]


def _prefix_matches(pattern: str, name: str) -> bool:
    """Whether ``pattern`` (a name prefix or regex) selects parameter ``name``, matching whole name components."""
    if pattern.endswith("."):
        pattern = pattern[:-1]
    try:
        m = re.match(pattern, name)
    except re.error:
        m = re.match(re.escape(pattern), name)
    if m is None:
        return False
    end = m.end()
    # "model.layers.1" must select "model.layers.1.mlp.w" but not "model.layers.10.mlp.w".
    return end == len(name) or name[end] == "." or (end > 0 and name[end - 1] == ".")


def _partition_by_prefixes(named: list[str], prefixes: Sequence[str]) -> BlockPartition:
    matched: list[list[str]] = [[n for n in named if _prefix_matches(p, n)] for p in prefixes]
    empty = [p for p, m in zip(prefixes, matched) if not m]
    if empty:
        raise ValueError(f"prefixes match no parameter: {empty!r}")
    owners: dict[str, list[str]] = {}
    for p, m in zip(prefixes, matched):
        for n in m:
            owners.setdefault(n, []).append(p)
    multi = [f"{n} (matched by {ps!r})" for n, ps in owners.items() if len(ps) > 1]
    if multi:
        raise ValueError("parameters matched by more than one prefix: " + ", ".join(multi))
    blocks = [Block(i, p, tuple(m)) for i, (p, m) in enumerate(zip(prefixes, matched))]
    return BlockPartition(blocks, [n for n in named if n not in owners])


def partition_blocks(
    model: nn.Module,
    layers_per_block: int = 1,
    include_embeddings: bool = False,
    include_lm_head: bool = False,
    prefixes: Sequence[str] | None = None,
) -> BlockPartition:
    """Split ``model``'s parameters into blocks of consecutive decoder layers (plus optional embedding/head blocks).

    Blocks are ordered as in the model: embeddings, ``layers.0``, ``layers.1``, ..., ``lm_head``. Parameters in no
    block (the embeddings and head unless included, anything else outside the layer stack) are listed as frozen.

    Args:
        model: A causal LM (or any module with a stack of identical layers in an ``nn.ModuleList``).
        layers_per_block: Consecutive layers per block; the last block may hold fewer.
        include_embeddings: Add a block with the input embeddings (and position embeddings, if any).
        include_lm_head: Add a block with the output projection and every other parameter outside the layer
            stack that is not an embedding (the final norm). A head tied to the input
            embeddings is one parameter: it belongs to the first block that claims it (the embedding block when
            both are included).
        prefixes: Explicit blocks, one parameter-name prefix or regex per entry; overrides layer detection and the
            two flags above. A prefix matches whole name components (``model.layers.1`` does not match
            ``model.layers.10``).

    Returns:
        The partition; every parameter is in at most one block and every block is non-empty.

    Raises:
        ValueError: a prefix matches nothing, a parameter is matched twice, a block would be empty, or no layer
            stack can be found. The message names the parameters or prefixes involved.
    """
    if layers_per_block < 1:
        raise ValueError(f"layers_per_block must be >= 1, got {layers_per_block}")
    named_params = list(model.named_parameters())
    named = [n for n, _ in named_params]
    if prefixes is not None:
        if isinstance(prefixes, str):
            raise ValueError("prefixes must be a list of strings (one per block), not a single string")
        return _partition_by_prefixes(named, list(prefixes))

    id_to_name = {id(p): n for n, p in named_params}
    _, stack = _find_layer_stack(model)
    layer_names = [_names_of(layer, id_to_name) for layer in stack]
    in_stack = {n for names in layer_names for n in names}

    claimed: set[str] = set()
    specs: list[tuple[str, list[str]]] = []

    def claim(block_name: str, names: Sequence[str]) -> None:
        # Tied weights: the first block that claims a parameter keeps it.
        fresh = [n for n in dict.fromkeys(names) if n not in claimed]
        claimed.update(fresh)
        specs.append((block_name, fresh))

    if include_embeddings:
        emb: list[str] = []
        get_in = getattr(model, "get_input_embeddings", None)
        in_emb = get_in() if callable(get_in) else None
        emb += _names_of(in_emb, id_to_name)
        # Position embeddings (GPT-2 ``wpe``, OPT ``embed_positions``) are further nn.Embedding modules.
        for _, mod in model.named_modules():
            if isinstance(mod, nn.Embedding) and mod is not in_emb:
                emb += [n for n in _names_of(mod, id_to_name) if n not in in_stack]
        if not emb:
            raise ValueError(f"{type(model).__name__}: include_embeddings=True but no embedding parameters found")
        claim("embeddings", emb)

    # Layer blocks are named "layers.i" / "layers.i-j" whatever the stack is called (GPT-2's "h", ...).
    for start in range(0, len(stack), layers_per_block):
        stop = min(start + layers_per_block, len(stack))
        label = f"layers.{start}" if stop - start == 1 else f"layers.{start}-{stop - 1}"
        claim(label, [n for names in layer_names[start:stop] for n in names])

    if include_lm_head:
        get_out = getattr(model, "get_output_embeddings", None)
        head = _names_of(get_out() if callable(get_out) else None, id_to_name)
        # The final norm goes with the head: every parameter outside the layer stack that is not an embedding
        # (declaration order varies: OPT declares its final norm before its layers).
        emb_names = {n for _, mod in model.named_modules() if isinstance(mod, nn.Embedding)
                     for n in _names_of(mod, id_to_name)}
        rest = [n for n in named if n not in in_stack and n not in emb_names]
        claim("lm_head", rest + head)

    blocks = [Block(i, label, tuple(names)) for i, (label, names) in enumerate(specs)]
    # Keep model order inside each block.
    order = {n: i for i, n in enumerate(named)}
    blocks = [Block(b.index, b.name, tuple(sorted(b.param_names, key=order.__getitem__))) for b in blocks]
    return BlockPartition(blocks, [n for n in named if n not in claimed])


def print_partition(model: nn.Module, partition: BlockPartition, console=None) -> None:
    """Print the partition as a rich table (block, #params, bytes) followed by the frozen parameters.

    Args:
        model: The model the partition was computed on.
        partition: The blocks.
        console: A ``rich.console.Console``; a new one on stdout by default.
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    params = dict(model.named_parameters())
    table = Table(title=f"{type(model).__name__}: {len(partition)} blocks")
    table.add_column("block", justify="right")
    table.add_column("name")
    table.add_column("tensors", justify="right")
    table.add_column("#params", justify="right")
    table.add_column("bytes", justify="right")
    total_n = total_b = 0
    for b in partition:
        n = sum(params[k].numel() for k in b.param_names)
        nb = sum(params[k].numel() * params[k].element_size() for k in b.param_names)
        total_n += n
        total_b += nb
        table.add_row(str(b.index), b.name, str(len(b.param_names)), f"{n:,}", _fmt_bytes(nb))
    fn = sum(params[k].numel() for k in partition.frozen)
    fb = sum(params[k].numel() * params[k].element_size() for k in partition.frozen)
    table.add_row("", "[dim]frozen[/dim]", str(len(partition.frozen)), f"{fn:,}", _fmt_bytes(fb))
    table.add_row("", "[bold]total[/bold]", "", f"{total_n + fn:,}", _fmt_bytes(total_b + fb))
    console.print(table)
    if partition.frozen:
        console.print("frozen (in no block): " + ", ".join(partition.frozen))


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class SchedulePosition(NamedTuple):
    """Where a global optimizer step falls: round, active block, and steps since that block became active."""

    round: int
    block_idx: int
    inner_step: int


class BlockSchedule:
    """Maps a global optimizer step to (round, active block, inner step); identical on every client.

    A round visits ``blocks_per_round`` blocks, each for ``switch_every`` consecutive steps. The schedule is a pure
    function of its settings, so it carries no mutable position: the optimizer's ``global_step`` is the position.

    Args:
        num_blocks: Number of blocks B.
        switch_every: Optimizer steps a block stays active (R).
        order: ``ascending``, ``descending``, ``fixed`` (visit ``fixed_order`` each round) or ``random`` (a fresh
            permutation per round drawn from ``numpy.random.default_rng([seed, round])``).
        fixed_order: Block indices for ``order="fixed"`` (repeats allowed; missing blocks are never trained).
        seed: Shared seed of ``random``; every client must use the same one.

    Raises:
        ValueError: unknown order, non-positive sizes, or a ``fixed_order`` index out of range.
    """

    def __init__(
        self,
        num_blocks: int,
        switch_every: int,
        order: str = "ascending",
        fixed_order: Sequence[int] | None = None,
        seed: int = 0,
    ):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if switch_every < 1:
            raise ValueError(f"switch_every must be >= 1, got {switch_every}")
        if order not in ORDERS:
            raise ValueError(f"unknown block order {order!r}; choose one of {ORDERS}")
        if order == "fixed":
            if not fixed_order:
                raise ValueError("order='fixed' needs fixed_order, a non-empty list of block indices")
            bad = [i for i in fixed_order if not (0 <= int(i) < num_blocks)]
            if bad:
                raise ValueError(f"fixed_order indices out of range [0, {num_blocks}): {bad}")
        elif fixed_order is not None:
            raise ValueError(f"fixed_order is only used with order='fixed', not {order!r}")
        self.num_blocks = int(num_blocks)
        self.switch_every = int(switch_every)
        self.order = order
        self.fixed_order = [int(i) for i in fixed_order] if fixed_order is not None else None
        self.seed = int(seed)
        self._cache: tuple[int, list[int]] | None = None

    @property
    def blocks_per_round(self) -> int:
        """Block visits per round (B, or ``len(fixed_order)``)."""
        return len(self.fixed_order) if self.order == "fixed" else self.num_blocks

    @property
    def steps_per_round(self) -> int:
        """Optimizer steps per round (``blocks_per_round * switch_every``)."""
        return self.blocks_per_round * self.switch_every

    def round_order(self, round_idx: int) -> list[int]:
        """Block indices visited in round ``round_idx``, in visiting order."""
        if self.order == "ascending":
            return list(range(self.num_blocks))
        if self.order == "descending":
            return list(range(self.num_blocks - 1, -1, -1))
        if self.order == "fixed":
            return list(self.fixed_order)
        if self._cache is None or self._cache[0] != round_idx:
            rng = np.random.default_rng([self.seed, round_idx])
            self._cache = (round_idx, [int(i) for i in rng.permutation(self.num_blocks)])
        return list(self._cache[1])

    def position(self, step: int) -> SchedulePosition:
        """Round, block and inner step of global optimizer step ``step`` (counted from 0)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        round_idx, within = divmod(int(step), self.steps_per_round)
        slot, inner = divmod(within, self.switch_every)
        return SchedulePosition(round_idx, self.round_order(round_idx)[slot], inner)

    def is_last_inner_step(self, step: int) -> bool:
        """Whether ``step`` is the last step of its block visit (the block switches after it)."""
        return self.position(step).inner_step == self.switch_every - 1

    def visits(self, total_steps: int) -> list[int]:
        """Number of (possibly partial) visits each block gets in the first ``total_steps`` steps."""
        counts = [0] * self.num_blocks
        for start in range(0, max(int(total_steps), 0), self.switch_every):
            counts[self.position(start).block_idx] += 1
        return counts

    def warn_if_incomplete(self, total_steps: int) -> list[int]:
        """Warn when a run of ``total_steps`` steps leaves some block never trained.

        Returns:
            The indices of the blocks never visited (empty when every block is visited at least once).
        """
        missing = [i for i, c in enumerate(self.visits(total_steps)) if c == 0]
        if missing:
            warnings.warn(
                f"{total_steps} steps with switch_every={self.switch_every} never train block(s) {missing} of "
                f"{self.num_blocks}: a round needs {self.steps_per_round} steps. Raise max_steps or lower "
                "switch_every.",
                UserWarning,
                stacklevel=2,
            )
        return missing

    def state_dict(self) -> dict:
        """The schedule's settings (its position is the optimizer's global step)."""
        return {
            "num_blocks": self.num_blocks,
            "switch_every": self.switch_every,
            "order": self.order,
            "fixed_order": None if self.fixed_order is None else list(self.fixed_order),
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore settings saved by :meth:`state_dict` (validated as in the constructor)."""
        fresh = BlockSchedule(**state)
        self.__dict__.update(fresh.__dict__)

    def __repr__(self) -> str:
        return (
            f"BlockSchedule(num_blocks={self.num_blocks}, switch_every={self.switch_every}, order={self.order!r}, "
            f"fixed_order={self.fixed_order}, seed={self.seed})"
        )
