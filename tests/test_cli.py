import json
import subprocess
import sys

import pytest

from tests.conftest import rtk
from toolkit import __version__
from toolkit.core import versions
from toolkit.core.hardware import CpuInfo
from toolkit.evaluation import env


def test_help_lists_every_command():
    result = rtk("--help")
    assert result.exit_code == 0
    for command in ("doctor", "data", "train", "export", "verify", "benchmark", "predict", "demo"):
        assert command in result.output


def test_version():
    result = rtk("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from toolkit.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'torchvision', 'onnx', 'onnxruntime') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "toolkit", "--version"], capture_output=True, text=True, check=True)
    assert __version__ in out.stdout


def test_doctor_json_reports_versions_cpu_and_cuda():
    result = rtk("doctor", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    for lib in ("python", "torch", "torchvision", "onnx", "onnxscript", "onnxruntime"):
        assert report["versions"][lib]
    assert "CPUExecutionProvider" in report["onnxruntime"]["providers"]
    assert set(report["cpu"]) >= {"model", "avx512", "avx512_bf16", "amx", "usable_cpus"}
    assert "available" in report["cuda"]
    if not report["cuda"]["available"]:
        assert report["cuda"]["reason"]


def test_doctor_text():
    result = rtk("doctor")
    assert result.exit_code == 0
    assert "onnxruntime providers" in result.output and "AMX" in result.output


def test_doctor_warns_on_two_onnxruntime_packages(monkeypatch):
    monkeypatch.setattr(env, "ort_packages", lambda: ["onnxruntime", "onnxruntime-gpu"])
    result = rtk("doctor")
    assert result.exit_code == 0
    assert "several onnxruntime packages" in result.output


def test_doctor_warns_without_onnxscript_and_fails_when_required_is_broken(monkeypatch):
    real = env.importlib.import_module

    def fake(name, *a):
        if name in ("onnxscript", "onnx"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a)

    monkeypatch.setattr(env.importlib, "import_module", fake)
    result = rtk("doctor")
    assert "onnxscript is missing" in result.output
    assert "problem: onnx cannot be imported" in result.output
    assert result.exit_code == 1


def test_cpu_features_parsed_from_flags():
    cpu = CpuInfo("x", 4, 2, frozenset({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}))
    assert cpu.avx512 and cpu.avx512_bf16 and cpu.amx and cpu.fast_bf16
    assert not CpuInfo("x", 4, 2, frozenset({"avx2"})).fast_bf16


@pytest.mark.parametrize("args", [["train"], ["verify"], ["export"], ["nosuchcommand"], ["train", "--epochs", "x"]])
def test_usage_errors_exit_2(args):
    result = rtk(*args)
    assert result.exit_code == 2 and ("Usage:" in result.output or "Error:" in result.output), result.output


@pytest.mark.parametrize("command", ["export", "train", "verify", "serve"])
def test_command_help_exits_0(command):
    result = rtk(command, "--help")
    assert result.exit_code == 0 and result.output.startswith(f"Usage: main {command}"), result.output


def test_doctor_names_the_library_the_cuda_provider_misses(monkeypatch, tmp_path):
    import ctypes
    import types

    capi = tmp_path / "onnxruntime" / "capi"
    capi.mkdir(parents=True)
    (capi / "libonnxruntime_providers_cuda.so").write_bytes(b"")
    fake_ort = types.SimpleNamespace(__file__=str(tmp_path / "onnxruntime" / "__init__.py"),
                                     get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
                                     preload_dlls=lambda: None)
    monkeypatch.setitem(sys.modules, "onnxruntime", fake_ort)

    def missing(path, *a, **k):
        raise OSError("libcudnn.so.9: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert "libcudnn.so.9" in env.cuda_provider_problem()


def test_tensorrt_without_its_libraries_is_unavailable(monkeypatch):
    import ctypes.util
    import types

    from toolkit.serving import sessions

    fake_ort = types.SimpleNamespace(get_available_providers=lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setitem(sys.modules, "onnxruntime", fake_ort)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(sessions, "_loadable", lambda lib: False)
    assert "libnvinfer" in sessions.provider_problem("TensorrtExecutionProvider")


BLOCK_TRAINING_STACK = """
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision', 'onnx', 'onnxscript'):
            raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}", name=name.split('.')[0])
sys.meta_path.insert(0, _Blocked())
from toolkit.cli import main
"""


def test_the_serving_install_needs_no_training_stack():
    """`pip install ".[serve,cpu]"` brings no torch, torchvision, onnx or onnxscript."""
    tomllib = pytest.importorskip("tomllib")
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    heavy = ("torch", "torchvision", "onnx", "onnxscript")
    for requirement in project["dependencies"] + project["optional-dependencies"]["serve"] + project["optional-dependencies"]["cpu"]:
        assert requirement.split(">")[0].split("[")[0].split("=")[0] not in heavy, requirement


def test_without_the_training_stack_predict_works_and_train_says_what_to_install(tiny_bundle, tiny_data, tmp_path):
    image = next((tiny_data / "val" / "circle").iterdir())
    run = [sys.executable, "-c", BLOCK_TRAINING_STACK + f"main(['predict', {str(tiny_bundle)!r}, {str(image)!r}])"]
    proc = subprocess.run(run, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.count("\t") == 2, proc.stderr
    run = [sys.executable, "-c", BLOCK_TRAINING_STACK + f"main(['train', {str(tiny_data)!r}, '-o', {str(tmp_path / 'o')!r}])"]
    proc = subprocess.run(run, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "Error: rtk train needs torch, which is not installed here: pip install 'rtk[train,cpu]'"


def test_versions_name_both_onnxruntime_packages_when_both_are_installed(monkeypatch):
    """The GPU machine had onnxruntime 1.30.0 and onnxruntime-gpu 1.31.1: reports named only the first."""
    installed = {"onnxruntime": "1.30.0", "onnxruntime-gpu": "1.31.1"}
    monkeypatch.setattr(versions, "version_of", lambda name: installed.get(name, None if name.startswith("onnxruntime") else "1.0"))
    assert versions.library_versions()["onnxruntime"] == "onnxruntime-gpu 1.31.1, onnxruntime 1.30.0"
    installed = {"onnxruntime-gpu": "1.31.1"}
    monkeypatch.setattr(versions, "version_of", lambda name: installed.get(name, None if name.startswith("onnxruntime") else "1.0"))
    assert versions.library_versions()["onnxruntime"] == "onnxruntime-gpu 1.31.1"
