"""The package's layers, read from every import statement (lazy ones inside functions included):

- `core` and `serving` are the torch-free side: they never import torch, torchvision, onnx, onnxscript or
  NNCF, nor `training`, `export` or `evaluation`; `core` does not import `serving` either.
- `training` imports no `export` or `evaluation`; `export` no `evaluation`; only `__main__` imports the CLI.
- No import cycles among the modules.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.serving

TOOLKIT = Path(__file__).resolve().parents[1] / "toolkit"
TORCH_STACK = ("torch", "torchvision", "onnx", "onnxscript", "nncf")
# what each layer may not import: a toolkit subpackage, or a third-party top-level package
FORBIDDEN = {
    "core": ("toolkit.serving", "toolkit.training", "toolkit.export", "toolkit.evaluation", "toolkit.cli", *TORCH_STACK),
    "serving": ("toolkit.training", "toolkit.export", "toolkit.evaluation", "toolkit.cli", *TORCH_STACK),
    "training": ("toolkit.export", "toolkit.evaluation", "toolkit.serving", "toolkit.cli"),
    "export": ("toolkit.evaluation", "toolkit.cli"),
    "evaluation": ("toolkit.cli",),
}


def _modules() -> dict[str, Path]:
    modules = {}
    for f in TOOLKIT.rglob("*.py"):
        parts = list(f.relative_to(TOOLKIT.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return modules


def _imports(path: Path) -> set[str]:
    """Every module name an import statement in `path` names, at any depth."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level:
            pytest.fail(f"{path}: relative import (the layers are read from absolute ones)")
    return names


def _names(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_violations() -> list[str]:
    found = []
    for module, path in _modules().items():
        layer = module.split(".")[1] if module.count(".") else None
        for name in _imports(path):
            for banned in FORBIDDEN.get(layer, ()):
                if _names(name, banned) and not (banned == "toolkit.cli" and module == "toolkit.__main__"):
                    found.append(f"{module} imports {name}")
    return sorted(set(found))


def test_each_layer_imports_only_what_it_may():
    assert layer_violations() == []


def test_the_layer_check_sees_a_lazy_import_inside_a_function(tmp_path, monkeypatch):
    """The check itself: a torch import hidden in a serving function is found (a check that cannot fail
    proves nothing)."""
    fake = tmp_path / "toolkit"
    (fake / "serving").mkdir(parents=True)
    (fake / "serving" / "leak.py").write_text("def f():\n    from toolkit.export.graph import ImageClassifier\n"
                                               "    import torch.nn\n")
    monkeypatch.setattr(sys.modules[__name__], "TOOLKIT", fake)
    assert layer_violations() == ["toolkit.serving.leak imports toolkit.export.graph",
                                  "toolkit.serving.leak imports toolkit.export.graph.ImageClassifier",
                                  "toolkit.serving.leak imports torch.nn"]


def test_the_torch_free_side_imports_no_torch_when_run():
    """Importing every core and serving module (and the public `toolkit.runtime`) loads none of the torch
    stack: the static check above, confirmed by what Python actually imported."""
    torch_free = sorted(m for m in _modules() if m.split(".")[1:2] in (["core"], ["serving"])) + ["toolkit.runtime"]
    code = (f"import sys; import {', '.join(torch_free)}; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {TORCH_STACK!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_import_cycles_among_the_toolkit_modules():
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: {resolve(n) for n in _imports(f) if _names(n, "toolkit")} - {None, m, "toolkit"}
             for m, f in modules.items()}
    # a submodule importing its own package's __init__ is not a cycle of modules
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d):] + [m, d]))
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
