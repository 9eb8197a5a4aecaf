"""Write a build directory atomically: into a temporary sibling, then swapped in whole.

An existing build is either replaced completely or left untouched, never mixed; a failure leaves no
temporary directory behind. Scripts are made executable; file order and contents are deterministic.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def write_tree(target: Path, files: dict[str, str]) -> None:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    old = None
    try:
        for rel, text in sorted(files.items()):
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            if rel.endswith(".sh"):
                path.chmod(0o755)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "build")
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not target.exists():
            os.replace(old / "build", target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
