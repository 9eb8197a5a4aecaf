"""What builds, runs and checkpoints share: the names of their files and the fixed numbers both sides use.

The compiler renders some of them into node scripts (the preemption marker), the runtime writes them, the
preflight and the converter read them back, the planner models the runtime with its constants. A name changed
here changes everywhere at once.
"""

from __future__ import annotations

# a save directory: the newest complete checkpoint's iteration, and each iteration's folder and file list
TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "dpoc_manifest.json"
PREEMPTED = "dpoc_preempted.txt"  # written after a preemption's checkpoint; the node script reports it
CHECKPOINT_MARKER = "metadata.json"  # megatron-core writes it last: the distributed checkpoint is complete

# a run directory: one JSON line per step
METRICS = "metrics.jsonl"
# the file a node script names to its ranks (a fresh path, outside the run directory, which an input error must
# not create): a rank that stops on an input error (exit 2) records it there. torchrun turns every child's exit
# code into 1, so the node script exits 2 itself when the file exists
INPUT_ERROR_ENV = "DPOC_INPUT_ERROR"

# how dpoc.runtime.torchrun ends a node's failed run; dpoc launch reads the rank from it (dpoc.launch.first_error)
FIRST_FAILURE = "[dpoc] torchrun: rank {rank} failed first, with exit code {code}"


def first_failure_line(rank: int, code: int, others: int) -> str:
    also = f"; {others} other rank{'s' if others != 1 else ''} ended after it" if others else ""
    return FIRST_FAILURE.format(rank=rank, code=code) + also


# micro-batches each rank sends through the pipeline per forward call of the precompute pass (each call pays
# the pipeline's fill once); the planner models the pass with the same number
ROUND_MICRO_BATCHES = 8


def folder_name(iteration: int) -> str:
    """A published checkpoint's folder under the save directory."""
    return f"iter_{iteration:07d}"
