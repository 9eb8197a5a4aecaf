"""Stage 5: write a build directory atomically, replacing an existing build whole (`common.atomic`).

An existing build is either replaced completely or left untouched, never mixed; a failure leaves no
temporary directory behind. Scripts are made executable; file order and contents are deterministic.
"""

from __future__ import annotations

from pathlib import Path

from dpoc.common.atomic import replaced_dir


def write_tree(target: Path, files: dict[str, str]) -> None:
    with replaced_dir(target) as staging:
        for rel, text in sorted(files.items()):
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            if rel.endswith(".sh"):
                path.chmod(0o755)
