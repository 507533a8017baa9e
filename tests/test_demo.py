import json

import pytest

from tests.conftest import rtk
from toolkit.evaluation.runners.torch_runner import compile_problem


@pytest.mark.slow
def test_demo_writes_a_report_holding_the_measured_values(tmp_path, no_compile):
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    # without Inductor's compiles (tests/test_aoti.py and tests/test_torch_compile.py export, verify and time
    # packages and compiled modules; the demo's own part of it is checked below): they were half this test's time
    result = rtk("demo", "--output", out, "--epochs", "1", "--image-size", "16", "--min-seconds", "0.05", "--no-native-code")
    assert result.exit_code == 0, result.output
    for name in ("report.md", "report.html", "training.png", "confusion.png", "latency.png", "benchmark.json",
                 "verify-digits.json", "verify-photos.json", "train/checkpoint.pt", "bundle/model.onnx",
                 "bundle/model.int8.onnx", "bundle/model.ts", "bundle/model.pt2", "photos/china.jpg"):
        assert (out / name).is_file(), name
    for png in ("training.png", "confusion.png", "latency.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    metrics = json.loads((out / "train" / "metrics.json").read_text())
    assert f"{100 * metrics['best_val_top1']:.2f}%" in report
    bench = json.loads((out / "benchmark.json").read_text())
    measured = [r for r in bench["results"] if not r["skipped"] and "batch_size" in r]
    assert {r["runtime"] for r in measured} >= {"eager", "torchscript", "torch-export", "ort-cpu"}
    assert "torch-compile (checkpoint): not compiled in this test" in report  # its skip, with the reason
    assert not (out / "bundle" / "model.aoti.pt2").exists() and "Compiled native code" not in report
    for r in measured:
        assert f"| {r['runtime']} | {r['artifact']} | {r['precision']} | {r['batch_size']} | {r['p50_ms']:.2f} |" in report
    digits = json.loads((out / "verify-digits.json").read_text())
    for r in digits["records"]:
        assert f"| {r['artifact']} | {r['runtime']} | {r['precision']} | {r['images']} | {r['max_abs_diff']:.2e} |" in report
    for command in ("rtk data digits", "rtk train", "rtk export", "rtk verify", "rtk benchmark", "rtk predict"):
        assert command in report and command in html
    assert "<img src=\"latency.png\"" in html and "china.jpg" in report


def test_the_demo_compiles_aotinductor_and_says_why_it_may_load_it(monkeypatch):
    from toolkit.core.formats import DEFAULT_FORMATS
    from toolkit.evaluation import demo
    from toolkit.evaluation.runners import torch_runner

    formats, native = demo._formats(True, print)
    if compile_problem("cpu") is None:
        assert formats == [a for name in (*DEFAULT_FORMATS, "aoti") for a in ("--format", name)]
        assert native == ["--allow-native-code"]
    assert demo._formats(False, print) == ([a for name in DEFAULT_FORMATS for a in ("--format", name)], [])
    monkeypatch.setattr(torch_runner, "compile_problem", lambda device: "no C++ compiler (g++) found")
    lines: list[str] = []
    assert demo._formats(True, lines.append)[1] == [] and lines == ["AOTInductor left out: no C++ compiler (g++) found"]


def test_the_report_explains_the_native_code_it_loaded():
    from toolkit.core.manifest import FileEntry
    from toolkit.evaluation.demo import Section, _markdown, _native_code_note

    class Files:  # the manifest's part the note reads
        files = {"model.onnx": FileEntry("onnx", "fp32", "0" * 64, 1), "model.aoti.pt2": FileEntry("aoti", "fp32", "0" * 64, 1),
                 "model.aoti-int8.pt2": FileEntry("aoti", "int8", "0" * 64, 1)}

    [section] = _native_code_note(Files())
    assert isinstance(section, Section) and section.title == "Compiled native code"
    text = "\n".join(_markdown(section))
    assert "model.aoti.pt2, model.aoti-int8.pt2: AOTInductor packages" in text and "--allow-native-code" in text
    assert "--trust" in text and "model.onnx" not in text

    class NoPackages:
        files = {"model.onnx": Files.files["model.onnx"]}

    assert _native_code_note(NoPackages()) == []
