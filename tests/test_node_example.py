"""examples/node: a Node.js service classifies JPEGs with model.any-size.onnx (decode only, no resize code)
and gets Python's top-1 on the demo photos."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from toolkit.serving.classifier import Classifier

pytestmark = pytest.mark.serving

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "node"


@pytest.fixture(scope="module")
def node_example() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed on this machine")
    if not (EXAMPLE / "node_modules" / "onnxruntime-node").is_dir():
        # onnxruntime-node ships its CPU binaries; its install script would fetch optional CUDA ones: skipped
        proc = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--onnxruntime-node-install=skip"], cwd=EXAMPLE,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.skip(f"npm ci failed in {EXAMPLE} (offline?): {proc.stderr.strip().splitlines()[-1:]}")
    return EXAMPLE


def test_node_gets_pythons_top1_on_the_demo_photos(node_example, tiny_bundle, photos):
    proc = subprocess.run(["node", "classify.mjs", str(tiny_bundle), *map(str, photos)], cwd=node_example,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    python = Classifier.load(tiny_bundle, any_size=True).predict(photos, top_k=2)
    assert len(answers) == len(python) == len(photos)
    for node, py in zip(answers, python):
        # jpeg-js and libjpeg decode the same JPEG a little differently: compare where Python's answer is clear
        if py.scores[0] - py.scores[1] > 0.01:
            assert node["index"] == py.indices[0], (node, py)
        assert abs(node["score"] - py.scores[0]) < 0.05


def test_node_reports_an_undecodable_file(node_example, tiny_bundle, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    proc = subprocess.run(["node", "classify.mjs", str(tiny_bundle), str(tmp_path / "bad.jpg")], cwd=node_example,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and json.loads(proc.stdout)["error"]
