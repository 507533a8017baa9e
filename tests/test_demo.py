import json

import pytest

from tests.conftest import rtk


@pytest.mark.slow
def test_demo_writes_a_report_holding_the_measured_values(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    result = rtk("demo", "--output", out, "--epochs", "1", "--image-size", "16", "--min-seconds", "0.05")
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
    for r in measured:
        assert f"| {r['runtime']} | {r['artifact']} | {r['precision']} | {r['batch_size']} | {r['p50_ms']:.2f} |" in report
    digits = json.loads((out / "verify-digits.json").read_text())
    for r in digits["records"]:
        assert f"| {r['artifact']} | {r['runtime']} | {r['precision']} | {r['images']} | {r['max_abs_diff']:.2e} |" in report
    for command in ("rtk data digits", "rtk train", "rtk export", "rtk verify", "rtk benchmark", "rtk predict"):
        assert command in report and command in html
    assert "<img src=\"latency.png\"" in html and "china.jpg" in report
