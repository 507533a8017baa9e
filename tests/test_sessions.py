"""The session layer and the torch-free side: settings, refusal of fallbacks, no torch, no import cycles."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.errors import ArtifactBroken, RtkError
from toolkit.sessions import SessionSettings, open_onnxruntime

TOOLKIT = Path(__file__).resolve().parents[1] / "toolkit"
SERVING_SIDE = ("toolkit.sessions", "toolkit.manifest", "toolkit.bundle", "toolkit.runtime", "toolkit.preprocess",
                "toolkit.hardware", "toolkit.tables", "toolkit.server", "toolkit.triton", "toolkit.openvino_ir",
                "toolkit.batch", "toolkit.batch_ray", "toolkit.signing")


def test_the_serving_side_imports_no_torch():
    code = (f"import sys; import {', '.join(SERVING_SIDE)}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'onnx', 'onnxscript')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.split(".")[0] == "toolkit"}


def test_no_import_cycles_among_the_toolkit_modules():
    modules = {}
    for f in TOOLKIT.rglob("*.py"):
        parts = list(f.relative_to(TOOLKIT.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: {resolve(n) for n in _imports(f)} - {None, m, "toolkit"} for m, f in modules.items()}
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


def test_settings_round_trip_and_refuse_nonsense():
    s = SessionSettings(device="cuda", threads=2, graph_optimization="extended")
    assert SessionSettings.from_dict(s.to_dict()) == s
    for bad in ({"engine": "tvm"}, {"engine": "openvino", "device": "cuda"}, {"graph_optimization": "max"},
                {"threads": 0}, {"precision_hint": "int4"}):
        with pytest.raises(RtkError):
            SessionSettings(**bad)
    with pytest.raises(RtkError, match="unknown session settings"):
        SessionSettings.from_dict({"device": "cpu", "turbo": True})


def test_a_file_onnxruntime_cannot_parse_is_broken_not_unavailable(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x01garbage")
    with pytest.raises(ArtifactBroken, match="model.onnx: onnxruntime cannot load it on CPUExecutionProvider"):
        open_onnxruntime(tmp_path / "model.onnx", SessionSettings())
    with pytest.raises(ArtifactBroken, match="missing"):
        open_onnxruntime(tmp_path / "nothing.onnx", SessionSettings())


def test_the_settings_reach_the_session(tiny_bundle):
    backend = open_onnxruntime(tiny_bundle / "model.onnx", SessionSettings(threads=1, graph_optimization="basic"))
    options = backend.session.get_session_options()
    assert options.intra_op_num_threads == 1 and str(options.graph_optimization_level).endswith("ENABLE_BASIC")
    assert backend.providers == ["CPUExecutionProvider"] and backend.settings.threads == 1
