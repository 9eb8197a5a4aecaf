"""The house rules that keep the architecture visible: nothing imports upward, and the compiler stays light.

The layers, lowest first (docs/design.md): contract, common, then planner and data, then compiler and runtime,
then launch, then cli on top. A module may import its own package and the packages listed for it; a lazy
import inside a function counts the same as one at the top.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dpoc"

MAY_IMPORT = {
    "contract": set(),
    "common": {"contract"},
    "planner": {"contract", "common"},
    "data": {"contract", "common"},
    "compiler": {"contract", "common", "planner"},
    "runtime": {"contract", "common", "data"},
    "launch": {"contract", "common", "data", "runtime", "compiler"},
    "cli": {"contract", "common", "data", "runtime", "launch", "compiler", "planner"},
}


def _dpoc_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dpoc":
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "dpoc" else [node.module]
            found += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "dpoc"]
    return found


def test_every_module_belongs_to_a_layer():
    top = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert top == sorted(MAY_IMPORT), "a new package needs its place in MAY_IMPORT and in docs/design.md"
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "__main__.py"]


def test_nothing_imports_upward():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = path.relative_to(PACKAGE).parts[0]
        if layer not in MAY_IMPORT:
            continue
        for line, module in _dpoc_imports(path):
            target = module.split(".")[1] if "." in module else ""
            if target not in ("__version__", layer) and target not in MAY_IMPORT[layer]:
                upward.append(f"{path.relative_to(REPO)}:{line}: {layer} imports {module}")
    assert upward == []


def test_training_and_the_precompute_pass_do_not_import_each_other():
    for program, other in (("train", "precompute"), ("precompute", "train")):
        modules = [m for _, m in _dpoc_imports(PACKAGE / "runtime" / f"{program}.py")]
        assert f"dpoc.runtime.{other}" not in modules


@pytest.mark.parametrize("command", [["build", "recipes/qwen3_30b.yaml"], ["plan", "recipes/qwen3_30b.yaml"],
                                     ["validate", "recipes/tiny_cpu.yaml"]])
def test_the_compiler_imports_no_runtime_torch_or_numpy(tmp_path, command):
    """In a fresh interpreter, as a user's `dpoc build` runs: only the compiler's own libraries load."""
    if command[0] == "build":
        command = [*command, "-o", str(tmp_path / "b")]
    probe = (f"import json, sys\nfrom dpoc.cli import main\ncode = main({command!r})\n"
             "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'megatron', "
             "'transformers', 'ray') or m.startswith(('dpoc.runtime', 'dpoc.data', 'dpoc.launch')))\n"
             "print(json.dumps([code, heavy]))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    code, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert (code, heavy) == (0, [])
