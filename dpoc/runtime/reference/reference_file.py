"""Precomputed reference log-probs (`--dpoc-reference precomputed`): their file, its key, and whether it is current.

`<data-path>_reference-<key>.npz`, next to the dataset, holds for every pair (by its index in the dataset) the
frozen reference's summed log-probabilities of the chosen and of the rejected response (float32 [pairs, 2];
IPO's per-token mean is taken in training, from the same mask) and the identity they were computed for. The
key hashes what the values are a function of: the reference's weights (their content hash,
`weight_identity.reference_identity`), the dataset's files (every index whole, the token files sampled),
`--seq-length` (longer pairs are cut) and the precision; so another reference or dataset never reuses a file,
and builds that share a dataset and a reference share one. It is written once, atomically (a temporary
sibling, fsynced, renamed), and read back only when its recorded identity matches.

Torch-free (numpy inside `read` and `write` only): the node preflight reports on it too.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpoc.common import atomic
from dpoc.contract import losses
from dpoc.contract.errors import DpocError, Problem
from dpoc.data.pairwise import dataset_prefix, fields_of
from dpoc.runtime.weights.weight_identity import reference_identity, sampled_digest

if TYPE_CHECKING:
    import numpy as np

FORMAT = 1
# tests only: a flag file; rank 0 creates it when the file's temporary sibling is complete, before the rename,
# and waits until it is deleted (a test kills the pass there)
PAUSE_ENV = "DPOC_TEST_PAUSE_REFERENCE"


def precision(args: argparse.Namespace) -> str:
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def dataset_sha256(prefix: str, unpaired: bool = False) -> str:
    """The dataset's content: the index files whole (every sequence's length and offset), the token files
    sampled (`sampled_digest`)."""
    digest = hashlib.sha256()
    for field in fields_of(unpaired):
        base = dataset_prefix(prefix, field)
        digest.update(Path(base + ".idx").read_bytes())
        digest.update(sampled_digest(Path(base + ".bin")))
    return digest.hexdigest()


def identity(args: argparse.Namespace) -> dict[str, Any]:
    """What the file's values are a function of."""
    unpaired = losses.unpaired(args.dpo_loss_type)
    out = {"format": FORMAT, "reference": reference_identity(args),
           "dataset_sha256": dataset_sha256(args.data_path, unpaired), "seq_length": args.seq_length,
           "precision": precision(args)}
    # KTO: each example's KL sequence pairs it with a neighbour in its block of --micro-batch-size examples
    return out | {"kl_block": args.micro_batch_size} if unpaired else out


def key(ident: dict[str, Any]) -> str:
    """The file's key: the identity without where the reference lies (moved weights keep their values)."""
    content = {**ident, "reference": ident["reference"]["sha256"]}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def path_of(data_path: str, ident: dict[str, Any]) -> Path:
    return Path(f"{data_path}_reference-{key(ident)}.npz")


@dataclass(frozen=True)
class Status:
    path: Path
    current: bool
    why: str  # what is wrong when not current


def status(args: argparse.Namespace, ident: dict[str, Any] | None = None) -> Status:
    """Whether the file for these args' reference and dataset exists and holds what it should."""
    ident = ident or identity(args)
    path = path_of(args.data_path, ident)
    if not path.is_file():
        others = sorted(p.name for p in path.parent.glob(f"{Path(args.data_path).name}_reference-*.npz"))
        elsewhere = f" (present, for other references or datasets: {', '.join(others)})" if others else ""
        return Status(path, False, f"not computed yet{elsewhere}")
    try:
        _load(path, ident)
    except DpocError as exc:
        return Status(path, False, exc.problems[0].message)
    return Status(path, True, "")


def _load(path: Path, ident: dict[str, Any]) -> np.ndarray:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            recorded = json.loads(str(data["identity"]))
            logps = np.array(data["logps"])
    except (OSError, ValueError, KeyError) as exc:
        raise DpocError([Problem(str(path), "(file)", f"unreadable ({exc})")]) from None
    if recorded != ident:
        raise DpocError([Problem(str(path), "identity", "was computed for another reference or dataset than its "
                                 "name says")])
    if logps.dtype != np.float32 or logps.ndim != 2 or logps.shape[1] != 2:
        raise DpocError([Problem(str(path), "logps", f"holds {logps.dtype} {list(logps.shape)}, not float32 "
                                 "[pairs, 2]")])
    return logps


def read(args: argparse.Namespace, args_file: str, pairs: int) -> tuple[Path, np.ndarray]:
    """The current file's log-probs [pairs, 2]; a problem naming the flag and the remedy otherwise."""
    ident = identity(args)
    found = status(args, ident)
    logps = _load(found.path, ident) if found.current else None
    if logps is None or len(logps) != pairs:
        why = found.why if logps is None else f"holds {len(logps)} pairs, the dataset {pairs}"
        raise DpocError([Problem(args_file, "--dpoc-reference", f"precomputed: {found.path} {why}; run the "
                                 "build's reference.sh first (the node scripts run it before training)")])
    return found.path, logps


def write(path: Path, logps: np.ndarray, ident: dict[str, Any], before_rename=None) -> None:
    """Publish the file whole or not at all."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, logps=logps.astype(np.float32), identity=np.array(json.dumps(ident, sort_keys=True)))
    atomic.write_atomically(path, buffer.getvalue(), before_rename)


def remove_partial(data_path: str) -> list[Path]:
    """Remove what a pass killed before its rename left (its temporary siblings); returns them."""
    prefix = Path(data_path)
    removed = []
    for tmp in prefix.parent.glob(atomic.temporary_name(f"{prefix.name}_reference-*.npz") + "*"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def pause_for_tests() -> None:
    """`PAUSE_ENV`: signal the flag file, wait until the test deletes it."""
    flag = os.environ.get(PAUSE_ENV)
    if flag:
        import time

        Path(flag).touch()
        while Path(flag).exists():
            time.sleep(0.05)
