"""The launcher's end of a run (and its periodic evaluations): every client's evaluation, the consensus model,
summary.json. Collective: every rank calls these functions.

The consensus model is the average of all clients' weights; with ZeRO-3 clients it is built from a gathered CPU copy
of each client's weights (``Engine.whole_model``), since the engine itself only holds shards.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from deca_ds.config import RunConfig
from deca_ds.engine import device, peak_memory_bytes
from deca_ds.loop import write_summary
from deca_ds.models import merged_model, save_model_dir
from deca_ds.step import Engine


def average_over_clients_(model: torch.nn.Module) -> None:
    """In place: every parameter and buffer becomes the average over all clients (the consensus model).

    One tensor at a time through the communication device, so a CPU copy (ZeRO-3) works on NCCL too.
    """
    world = dist.get_world_size()
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            acc = t.detach().to(device(), torch.float32, copy=True)
            dist.all_reduce(acc)
            t.copy_(acc.div_(world).to(t.dtype))


def _evaluate(model, tokenizer, data, cfg: RunConfig, console, what: str) -> dict:
    """:func:`deca_ds.data.evaluate` with a progress bar when ``console`` is given (the rank that prints)."""
    from deca_ds.data import evaluate
    from deca_ds.data.evaluation import eval_progress

    if console is None:
        return evaluate(model, tokenizer, data, max_examples=cfg.data.eval_examples)
    with eval_progress(console, f"evaluating {what}") as progress:
        return evaluate(model, tokenizer, data, max_examples=cfg.data.eval_examples, progress=progress)


def evaluate_clients(engine: Engine, tokenizer, data, cfg: RunConfig, layout, console=None) -> list[dict] | None:
    """Every client scores its own model on the shared test split. Collective: every rank calls it.

    Args:
        engine: this rank's engine.
        tokenizer: the run's tokenizer.
        data: this client's :class:`deca_ds.data.ClientData`.
        cfg: the run's settings (``data.eval_examples`` rows are scored).
        layout: the :class:`deca_ds.gossip.ClientLayout`.
        console: rank 0's console for a progress bar (every client evaluates at the same time; rank 0 shows its own).

    Returns:
        On rank 0 each client's evaluation, indexed by client; None elsewhere.
    """
    model = engine.whole_model()
    shown = console if dist.get_rank() == 0 else None
    own = _evaluate(model, tokenizer, data, cfg, shown, f"client {layout.client_id} (all clients in parallel)") \
        if layout.local_rank == 0 else None
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, own)
    if dist.get_rank() != 0:
        return None
    return [per_rank[layout.client_ranks(c)[0]] for c in range(layout.num_clients)]


def fingerprint(model: torch.nn.Module) -> str:
    """SHA-1 of every parameter's bytes: ranks of one client must agree exactly."""
    import hashlib

    h = hashlib.sha1()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def finish(cfg: RunConfig, engine: Engine, data, tokenizer, layout, out: Path, last_loss: dict[int, float], console):
    """Evaluate every client, build/save/evaluate the consensus model, write summary.json (rank 0).

    Collective: every rank calls it, after the final checkpoint (it averages the model in place).

    Args:
        cfg: the run's settings.
        engine: this rank's engine.
        data: this client's :class:`deca_ds.data.ClientData`.
        tokenizer: saved next to the consensus (and client) models.
        layout: the :class:`deca_ds.gossip.ClientLayout`.
        out: the run's output directory.
        last_loss: rank 0's last training loss per client.
        console: rich console for the final table.

    Returns:
        The summary dict on rank 0, None elsewhere.
    """
    rank = dist.get_rank()
    model = engine.whole_model()
    shown = console if rank == 0 else None
    own = _evaluate(model, tokenizer, data, cfg, shown, f"client {layout.client_id} (all clients in parallel)") \
        if layout.local_rank == 0 else {}
    if cfg.model.save_client_models and layout.local_rank == 0:
        save_model_dir(model, out / "clients" / f"client_{layout.client_id}")  # every client's writer rank
        tokenizer.save_pretrained(out / "clients" / f"client_{layout.client_id}")
    bytes_sent = engine.mixer.total_bytes_sent if engine.mixer is not None else 0
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {"client": layout.client_id, "local_rank": layout.local_rank, "eval": own,
                                      "bytes_sent": bytes_sent, "peak_memory_bytes": peak_memory_bytes(),
                                      "fingerprint": fingerprint(model)})
    average_over_clients_(model)
    consensus = None
    if rank == 0:
        consensus = _evaluate(model, tokenizer, data, cfg, console, "the consensus model")
        # dec_lora: the averaged adapters merged into the base (model is not used after this), so consensus/ is a
        # plain Hugging Face model as for every other method and as the simulator writes it; saved as is, it was
        # peft's adapter directory, which needs a base path the embedded model does not have.
        merged_model(model).save_pretrained(out / "consensus", safe_serialization=True)
        tokenizer.save_pretrained(out / "consensus")
    clients = []
    for c in range(layout.num_clients):
        rows = [r for r in per_rank if r["client"] == c]
        first = next(r for r in rows if r["local_rank"] == 0)
        clients.append({"client": c, "final_loss": last_loss.get(c), "test_loss": first["eval"].get("loss"),
                        "test_accuracy": first["eval"].get("accuracy"), "eval": first["eval"],
                        "bytes_sent": sum(r["bytes_sent"] for r in rows),
                        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in rows),
                        "rank_fingerprints": [r["fingerprint"] for r in sorted(rows, key=lambda r: r["local_rank"])]})
        if len(set(clients[-1]["rank_fingerprints"])) > 1 and rank == 0:
            console.print(f"[red]warning: the ranks of client {c} hold different weights[/red]")
    summary = None
    if rank == 0:
        summary = {"method": cfg.method, "steps": engine.global_step, "num_clients": layout.num_clients,
                   "clients": clients, "consensus": consensus}
        write_summary(out, summary, console)
    dist.barrier()
    return summary
