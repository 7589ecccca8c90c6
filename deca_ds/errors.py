"""Faults that can only happen after start-up, as the one line a user sees.

Everything that can be known before a run starts is a :class:`deca_ds.config.ConfigError` raised by the preflight.
What is left can only happen while training: a neighbour that stops answering, a collective whose peer died, a disk
that fills up. :func:`describe_fault` turns those into one line naming the cause and the fix; the entry points
(``recipes/finetune.py``) print it on every rank instead of a traceback and exit with :data:`EXIT_FAULT`. Anything
else (a bug) keeps its traceback.

Nothing is lost when a run stops this way: checkpoints are published atomically (``checkpoints/latest`` moves only
once every client's directory is complete), so the last complete checkpoint survives, and ``resume=auto`` continues
from it.
"""

import errno

EXIT_CONFIG = 2
"""Exit status of a run refused before start-up (a :class:`deca_ds.config.ConfigError`)."""
EXIT_NONFINITE = 3
"""Exit status of a run stopped by ``nan_policy=stop``."""
EXIT_FAULT = 4
"""Exit status of a run stopped by a fault after start-up (:func:`describe_fault`)."""

_RESUME = "the last complete checkpoint is kept; rerun with resume=auto to continue from it"


class RunFault(RuntimeError):
    """A fault after start-up whose message already names the cause and the fix."""


class NeighbourError(RunFault):
    """A gossip neighbour did not answer in time, or is elsewhere in the block schedule."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# Transport failures gloo and NCCL report as a plain RuntimeError (not torch.distributed.DistError) when a peer's
# connection is gone, e.g. while posting a receive: recognised by the backend's own wording, which no bug of ours
# produces.
_BACKEND_MARKERS = ("gloo/transport/", "Connection closed by peer", "Connection reset by peer", "NCCL error",
                    "ProcessGroupNCCL", "Socket Timeout")


def _from_comm_backend(err: BaseException) -> bool:
    text = str(err)
    return any(m in text for m in _BACKEND_MARKERS)


def describe_fault(err: BaseException) -> str | None:
    """One line for a fault that can only happen after start-up, or None for anything else.

    Args:
        err: the exception that ended the run.

    Returns:
        ``RunFault``: its message and how to continue; ``OSError`` (a disk or a connection): the file, the system's
        reason and the fix; a ``torch.distributed`` error (a peer process died or the network dropped): its first
        line and where to look; None otherwise (a bug: keep the traceback).
    """
    if isinstance(err, RunFault):
        return f"{first_line(err)}; {_RESUME}"
    if isinstance(err, OSError) and not isinstance(err, ConnectionError):
        where = f" writing {err.filename}" if err.filename else ""
        reason = err.strerror or first_line(err)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "free disk space or set output_dir to a volume with room"
        elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = "make output_dir writable or choose another output_dir"
        else:
            fix = "check the disk holding output_dir"
        return f"disk error{where}: {reason}: {fix}; {_RESUME}"
    peer_faults: tuple[type[BaseException], ...] = (ConnectionError,)
    try:
        import torch.distributed as dist

        peer_faults += (dist.DistError,)
    except (ImportError, AttributeError):  # a torch built without torch.distributed
        pass
    if isinstance(err, peer_faults) or (isinstance(err, RuntimeError) and _from_comm_backend(err)):
        return (f"a collective with the other ranks failed ({first_line(err)}): a peer process stopped or the network "
                f"dropped; the launcher's output names the rank that failed first; {_RESUME}")
    return None
