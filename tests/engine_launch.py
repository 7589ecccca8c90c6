"""One 2-process launch that runs the bodies of several engine-level integration tests in sequence.

Each of ``test_gather_launch``, ``test_lean_step_launch``, ``test_fused_launch``, ``test_one_consensus`` and
``test_failures`` (what leaves a client: ``_record_what_leaves``) keeps its own ``_body`` (what each rank runs) and its own assertions; only the launch is shared: the two spawned processes pay
the imports (torch, DeepSpeed, transformers: ~2.4 CPU s each) and the process-group set-up once instead of four
times. The bodies build their own engines, client groups and patches and undo the patches before they return, so
running one after another in the same processes checks what the separate launches checked.
"""

# Order: the gather check counts all-gather calls, so it runs first, before any other engine ever existed in the
# process (each body closes its engines; running it first removes even the doubt). What-leaves-a-client records
# every tensor sent from its start and seeds torch's global generator: last.
BODIES = ("gather", "lean", "fused", "consensus", "leaves")


def engine_checks(rank: int, world: int, tmp: str) -> dict:
    """Inside a :func:`dist.run_distributed` child: every body's report, keyed by ``BODIES``.

    Args:
        rank: this process's rank.
        world: the number of processes (2: two one-rank clients).
        tmp: a directory for the gather check's output (metrics files).
    """
    import test_failures
    import test_fused_launch
    import test_gather_launch
    import test_lean_step_launch
    import test_one_consensus

    return {
        "gather": test_gather_launch._body(rank, world, tmp),
        "lean": test_lean_step_launch._body(rank, world),
        "fused": test_fused_launch._body(rank, world),
        "consensus": test_one_consensus._body(rank, world),
        "leaves": test_failures._record_what_leaves(rank, world, test_failures.LEAVES_STEPS,
                                                     test_failures.LEAVES_CHUNK_BYTES),
    }
