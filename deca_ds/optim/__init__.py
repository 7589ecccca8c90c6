"""DECA's optimizer: block-wise AdamW with per-block state and the consensus correction of the moments.

``BlockAdam`` does the maths and the bookkeeping of the active block; ``state_store`` parks inactive blocks' state in
host memory (fp32 or 8-bit) for ``state_policy="offload"``; ``memory_report`` counts the bytes each part holds.
``BlockOptimizer`` is BAdam 1.4's optimizer as a drop-in, built on the same pieces.
"""

from deca_ds.optim.badam import BlockOptimizer, infer_block_prefixes
from deca_ds.optim.block_adam import STATE_POLICIES, BlockAdam, adamw_foreach_step_, adamw_step_, memory_report
from deca_ds.optim.state_store import OFFLOAD_DTYPES, BlockStateStore, quantization_bound

__all__ = [
    "BlockAdam",
    "BlockOptimizer",
    "BlockStateStore",
    "OFFLOAD_DTYPES",
    "STATE_POLICIES",
    "adamw_foreach_step_",
    "adamw_step_",
    "infer_block_prefixes",
    "memory_report",
    "quantization_bound",
]
