"""Import hygiene: ``import nvformer`` is light, the library never imports the studies, and the
library's modules import each other without cycles."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("optuna", "matplotlib", "transformers", "datasets", "accelerate", "safetensors", "sacrebleu", "torchmetrics", "nvformer_studies")


def test_import_nvformer_leaves_the_heavy_libraries_out():
    code = "import sys, nvformer; print(','.join(m for m in %r if m in sys.modules))" % (HEAVY,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import nvformer imported {out}"


def _module_imports(path: Path, package: str) -> set[str]:
    """The nvformer modules ``path`` imports at module level (not inside functions)."""
    tree = ast.parse(path.read_text())
    parts = path.relative_to(SRC).with_suffix("").parts
    here = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                mod = ".".join((*base, node.module)) if node.module else ".".join(base)
            else:
                mod = node.module or ""
            names = [f"{mod}.{a.name}" for a in node.names]
            found |= {m for m in (mod, *names) if m.split(".")[0] == package}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == package}
    return found


def _graph(package: str) -> dict[str, set[str]]:
    files = {".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p for p in (SRC / package).rglob("*.py")}
    return {mod: {m for m in _module_imports(path, package) if m in files and m != mod} for mod, path in files.items()}


def test_the_library_never_imports_the_studies():
    for path in (SRC / "nvformer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):  # also imports inside functions
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "nvformer_studies" for n in names), path


def test_no_import_cycles_in_the_library():
    graph = _graph("nvformer")
    graph = {m: {d for d in deps if not (m.startswith(d + ".") or d == "nvformer")} for m, deps in graph.items()}  # a package's own __init__
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, dep]))
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [])
    assert "nvformer.api" in graph and "nvformer.hf.convert" in graph["nvformer.api"]
