import io
import json
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from PIL import Image

from tests.conftest import BLOCK_TORCH, copy_bundle, error_line, rtk
from toolkit.errors import CheckFailed, RtkError
from toolkit.serving.classifier import Classifier

pytestmark = pytest.mark.serving


def test_importing_the_runtime_does_not_import_torch():
    code = "import sys, toolkit.serving.classifier; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'onnx')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_runtime_works_where_torch_cannot_be_imported(tiny_bundle, tiny_data):
    image = next((tiny_data / "val" / "circle").iterdir())
    code = BLOCK_TORCH + textwrap.dedent(f"""
        from toolkit.serving.classifier import Classifier
        clf = Classifier.load({str(tiny_bundle)!r}, self_test=True)
        p = clf.predict([{str(image)!r}], top_k=2)[0]
        import json
        print(json.dumps(dict(labels=p.labels, scores=p.scores, classes=clf.classes)))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    [expected] = Classifier.load(tiny_bundle).predict([image], top_k=2)  # the same answer as with torch importable
    assert got["labels"] == expected.labels and len(got["labels"]) == 2 and set(got["labels"]) <= set(got["classes"])
    assert got["scores"] == pytest.approx(expected.scores, abs=1e-6)
    assert got["scores"][0] >= got["scores"][1] > 0 and sum(got["scores"]) <= 1.0 + 1e-9


def test_predict_matches_eager_top1(tiny_bundle, tiny_run, tiny_data):
    from tests.test_export import eager_logits
    from toolkit.core.preprocess import crop_array

    clf = Classifier.load(tiny_bundle)
    paths = sorted((tiny_data / "val").rglob("*.png"))
    preds = clf.predict(paths, top_k=3, batch_size=5)
    crops = np.stack([crop_array(p, clf.spec) for p in paths])
    expected = eager_logits(tiny_run / "checkpoint.pt", crops).argmax(1)
    assert [p.indices[0] for p in preds] == list(expected)
    for p in preds:
        assert p.labels[0] == clf.classes[p.indices[0]] and len(p.labels) == 3
        assert p.scores == sorted(p.scores, reverse=True) and 0 < sum(p.scores) <= 1 + 1e-9


def test_every_input_kind_gives_the_same_answer(tiny_bundle, tiny_data):
    clf = Classifier.load(tiny_bundle)
    path = next((tiny_data / "val" / "square").iterdir())
    pil = Image.open(path)
    inputs = [path, str(path), path.read_bytes(), pil, np.asarray(pil.convert("RGB"))]
    preds = clf.predict(inputs)
    assert len({tuple(p.indices) for p in preds}) == 1
    assert len({round(p.scores[0], 6) for p in preds}) == 1


def test_threads_share_one_session(tiny_bundle, tiny_data):
    clf = Classifier.load(tiny_bundle, threads=1)
    paths = sorted((tiny_data / "val").rglob("*.png"))
    serial = [p.scores for p in clf.predict(paths)]
    results: dict[int, list] = {}

    def work(i: int) -> None:
        results[i] = [p.scores for p in clf.predict(paths[i % 3:] + paths[: i % 3], batch_size=4)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, scores in results.items():
        rotated = serial[i % 3:] + serial[: i % 3]
        np.testing.assert_allclose(np.array(scores), np.array(rotated), rtol=1e-5, atol=1e-7)


def test_bad_images_fail_alone(tiny_bundle, tiny_data):
    clf = Classifier.load(tiny_bundle, max_pixels=40 * 40)
    good = next((tiny_data / "val" / "circle").iterdir())
    big = io.BytesIO()
    Image.new("RGB", (100, 100)).save(big, format="PNG")
    preds = clf.predict([good, b"garbage", big.getvalue(), good])
    assert [p.ok for p in preds] == [True, False, False, True]
    assert "cannot decode" in preds[1].error and "above the limit" in preds[2].error
    assert preds[0].indices == preds[3].indices


def test_self_test_refuses_a_model_that_differs(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    Classifier.load(bundle, self_test=True)
    with np.load(bundle / "selftest.npz") as data:
        arrays = dict(data)
    arrays["model.onnx"] = arrays["model.onnx"] + 1.0
    np.savez(bundle / "selftest.npz", **arrays)
    with pytest.raises(CheckFailed, match="self-test failed"):
        Classifier.load(bundle, self_test=True)


def _selftest_with(bundle, change) -> None:
    with np.load(bundle / "selftest.npz") as data:
        arrays = dict(data)
    arrays["model.onnx"] = change(arrays["model.onnx"].astype(np.float64)).astype(arrays["model.onnx"].dtype)
    np.savez(bundle / "selftest.npz", **arrays)


def test_self_test_refuses_a_changed_top1_within_the_tolerance(tiny_bundle, tmp_path):
    """One image whose two best classes trade places by less than the tolerance: the logits are close, but this
    hardware would answer another class, which the self-test must refuse."""
    from toolkit.serving.classifier import SELFTEST_TOLERANCE

    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    with np.load(bundle / "selftest.npz") as data:
        logits = data["model.onnx"].astype(np.float64)
    tol = SELFTEST_TOLERANCE["fp32"] * max(1.0, float(np.abs(logits).max()))
    gaps = np.sort(logits, 1)[:, -1] - np.sort(logits, 1)[:, -2]
    row = int(gaps.argmin())
    if gaps[row] >= tol / 2:  # make the closest image a near tie, within the tolerance, still the same top-1
        def near_tie(a):
            a = a.copy()
            first, second = np.argsort(-a[row])[:2]
            a[row, second] = a[row, first] - tol / 8
            return a
        _selftest_with(bundle, near_tie)
        Classifier.load(bundle, self_test=True)  # within the tolerance, same top-1: passes
        with np.load(bundle / "selftest.npz") as data:
            logits = data["model.onnx"].astype(np.float64)

    def swapped(a):
        a = a.copy()
        first, second = np.argsort(-a[row])[:2]
        a[row, second] = a[row, first] + tol / 8  # the runner-up now wins, by a hair
        return a

    _selftest_with(bundle, swapped)
    with pytest.raises(CheckFailed, match="top-1 changed"):
        Classifier.load(bundle, self_test=True)


def test_self_test_allows_differences_within_the_tolerance(tiny_bundle, tmp_path):
    from toolkit.serving.classifier import SELFTEST_TOLERANCE

    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    with np.load(bundle / "selftest.npz") as data:
        scale = max(1.0, float(np.abs(data["model.onnx"]).max()))
    _selftest_with(bundle, lambda a: a + 0.5 * SELFTEST_TOLERANCE["fp32"] * scale)
    Classifier.load(bundle, self_test=True)
    _selftest_with(bundle, lambda a: a + 1.5 * SELFTEST_TOLERANCE["fp32"] * scale)  # now 1.0 tolerance over
    with pytest.raises(CheckFailed, match="max abs diff .* top-1 same"):
        Classifier.load(bundle, self_test=True)


@pytest.mark.torch_stack
def test_model_without_metadata_is_refused(tiny_bundle, tmp_path):
    import onnx

    model = onnx.load(str(tiny_bundle / "model.onnx"))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(RtkError, match="no rtk metadata"):
        Classifier.load(tmp_path / "bare.onnx")


def test_unavailable_provider_is_an_error_not_a_fallback(tiny_bundle):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(RtkError, match="CUDAExecutionProvider not in onnxruntime's providers"):
        Classifier.load(tiny_bundle, providers=["cuda"])


def test_rtk_predict_lines_json_and_exit_code(tiny_bundle, tiny_data, tmp_path):
    result = rtk("predict", tiny_bundle, tiny_data / "val" / "circle", "--top-k", "2")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 6 and all(len(ln.split("\t")) == 3 for ln in lines)
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    good = next((tiny_data / "val" / "square").iterdir())
    result = rtk("predict", tiny_bundle, good, tmp_path / "bad.jpg", "--json")
    assert result.exit_code == 1
    payload = json.loads(result.output[: result.output.rindex("}") + 1])
    ok, bad = payload["predictions"]
    assert ok["error"] is None and len(ok["labels"]) == 3 and "bad.jpg" in bad["source"] and bad["error"]
    assert payload["providers"][0] == "CPUExecutionProvider"


def test_rtk_predict_provider_error(tiny_bundle, tiny_data):
    result = rtk("predict", tiny_bundle, tiny_data / "val", "--provider", "tensorrt")
    assert result.exit_code == 2 and "TensorrtExecutionProvider not in onnxruntime's providers" in error_line(result)
