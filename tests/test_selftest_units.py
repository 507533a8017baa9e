"""Classifier.self_test and top_k with a stand-in backend (no model, milliseconds): the self-test refuses
outputs beyond its tolerance and any changed top-1, passes within it, and reads only a well-formed selftest.npz."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from toolkit.core.preprocess import PreprocessSpec
from toolkit.errors import CheckFailed, RtkError
from toolkit.serving.classifier import SELFTEST_TOLERANCE, Classifier, read_selftest, softmax

pytestmark = pytest.mark.serving

EXPECTED = np.array([[4.0, 1.0, -2.0], [0.5, 3.0, 0.4], [-1.0, 0.0, 2.0]], np.float32)  # largest |logit| 4


class Backend:
    """Answers `EXPECTED + offset`, or whatever `logits` is set to."""

    providers = ["CPUExecutionProvider"]

    def __init__(self, logits: np.ndarray) -> None:
        self.logits = logits

    def selftest_key(self, file: str) -> str:
        return file

    def run(self, images: np.ndarray) -> np.ndarray:
        assert images.shape == (3, 2, 2, 3) and images.dtype == np.uint8
        return self.logits


def classifier(tmp_path: Path, logits: np.ndarray, precision: str = "fp32", expected=EXPECTED) -> Classifier:
    np.savez(tmp_path / "selftest.npz", images=np.zeros((3, 2, 2, 3), np.uint8), **{"model.onnx": expected})
    return Classifier(Backend(logits), tmp_path / "model.onnx", ["a", "b", "c"], PreprocessSpec(2, 2), precision)


def test_identical_outputs_pass(tmp_path):
    classifier(tmp_path, EXPECTED.copy()).self_test()


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_the_tolerance_scales_with_the_largest_logit(tmp_path, precision):
    tol = SELFTEST_TOLERANCE[precision] * 4.0
    classifier(tmp_path, EXPECTED + 0.9 * tol, precision).self_test()
    with pytest.raises(CheckFailed, match="max abs diff .* top-1 same"):
        classifier(tmp_path, EXPECTED + 1.1 * tol, precision).self_test()
    with pytest.raises(CheckFailed, match="max abs diff"):
        classifier(tmp_path, EXPECTED - 1.1 * tol, precision).self_test()


def test_small_logits_use_an_absolute_tolerance(tmp_path):
    small = EXPECTED / 40  # largest |logit| 0.1: the tolerance is not scaled below its fp32 value
    classifier(tmp_path, small + 0.9e-3, expected=small).self_test()
    with pytest.raises(CheckFailed):
        classifier(tmp_path, small + 1.1e-3, expected=small).self_test()


def test_an_unknown_precision_gets_the_loosest_tolerance(tmp_path):
    classifier(tmp_path, EXPECTED + 0.04 * 4, "mystery").self_test()
    with pytest.raises(CheckFailed):
        classifier(tmp_path, EXPECTED + 0.06 * 4, "mystery").self_test()


def test_a_changed_top1_fails_even_within_the_tolerance(tmp_path):
    near = EXPECTED.copy()
    near[1] = [0.5, 3.0, 2.999]  # image 1: a near tie, its top-1 still b
    got = near.copy()
    got[1, 2] = 3.001  # c now wins by 0.001, far inside the tolerance of 4e-3
    classifier(tmp_path, near.copy(), expected=near).self_test()
    with pytest.raises(CheckFailed, match=r"max abs diff 0.002 \(allowed 0.004\), top-1 changed"):
        classifier(tmp_path, got, expected=near).self_test()


def test_the_message_names_the_file_and_the_provider(tmp_path):
    with pytest.raises(CheckFailed, match="self-test failed for model.onnx on CPUExecutionProvider"):
        classifier(tmp_path, EXPECTED + 1.0).self_test()


def test_no_selftest_file_is_an_error(tmp_path):
    clf = classifier(tmp_path, EXPECTED)
    (tmp_path / "selftest.npz").unlink()
    with pytest.raises(RtkError, match="no selftest.npz beside model.onnx"):
        clf.self_test()


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((3, 2, 2, 3), np.float32), "k": EXPECTED}, "images are float32"),
    ({"images": np.zeros((3, 2, 2), np.uint8), "k": EXPECTED}, "images are uint8"),
    ({"images": np.zeros((3, 2, 2, 1), np.uint8), "k": EXPECTED}, "images are uint8"),
    ({"images": np.zeros((0, 2, 2, 3), np.uint8), "k": EXPECTED[:0]}, "images are uint8"),
    ({"images": np.zeros((3, 2, 2, 3), np.uint8), "k": EXPECTED.astype(np.int32)}, "k is int32"),
    ({"images": np.zeros((3, 2, 2, 3), np.uint8), "k": EXPECTED[:2]}, r"expected float \[3, 3\]"),
    ({"images": np.zeros((3, 2, 2, 3), np.uint8), "k": EXPECTED[:, :2]}, r"expected float \[3, 3\]"),
    ({"images": np.zeros((3, 2, 2, 3), np.uint8)}, "has no expected outputs for k"),
    ({"k": EXPECTED}, "has no images"),
])
def test_a_malformed_selftest_file_is_refused(tmp_path, arrays, message):
    np.savez(tmp_path / "s.npz", **arrays)
    with pytest.raises(CheckFailed, match=message):
        read_selftest(tmp_path / "s.npz", "k", 2, 3)


def test_a_wellformed_selftest_file_is_read(tmp_path):
    np.savez(tmp_path / "s.npz", images=np.ones((3, 2, 2, 3), np.uint8), k=EXPECTED)
    images, expected = read_selftest(tmp_path / "s.npz", "k", 2, 3)
    assert images.shape == (3, 2, 2, 3) and np.array_equal(expected, EXPECTED)


def test_not_a_zip_and_a_pickle_are_refused(tmp_path):
    (tmp_path / "s.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckFailed, match="is not a readable self-test file"):
        read_selftest(tmp_path / "s.npz", "k", 2, 3)
    np.savez(tmp_path / "p.npz", images=np.zeros((3, 2, 2, 3), np.uint8), k=np.array([object()] * 9).reshape(3, 3))
    with pytest.raises(CheckFailed, match="holds Python objects"):
        read_selftest(tmp_path / "p.npz", "k", 2, 3)


def test_top_k_orders_classes_and_gives_softmax_scores(tmp_path):
    clf = classifier(tmp_path, EXPECTED)
    top = clf.top_k(np.array([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]]), 2)
    assert [idx for idx, _ in top] == [[1, 2], [2, 0]]
    probs = softmax(np.array([[1.0, 3.0, 2.0]]))[0]
    assert top[0][1] == pytest.approx([probs[1], probs[2]])
    assert [len(idx) for idx, _ in clf.top_k(EXPECTED, 10)] == [3, 3, 3]  # k beyond the classes: all of them
    assert clf.top_k(np.array([[2.0, 2.0, 1.0]]), 1)[0][0] == [0]  # a tie: the first class, stably


def test_softmax_rows_sum_to_one_even_for_huge_logits():
    probs = softmax(np.array([[1000.0, 0.0, -1000.0], [1.0, 1.0, 1.0]]))
    np.testing.assert_allclose(probs.sum(1), 1.0)
    np.testing.assert_allclose(probs[1], 1 / 3)
    np.testing.assert_allclose(probs[0], [1.0, 0.0, 0.0], atol=1e-12)


def test_a_difference_of_exactly_the_tolerance_passes(tmp_path):
    zeros = np.zeros((3, 3))
    classifier(tmp_path, zeros + SELFTEST_TOLERANCE["fp32"], expected=zeros).self_test()  # scale 1: tol 1e-3 exactly


def test_a_symlinked_selftest_file_is_refused(tmp_path):
    np.savez(tmp_path / "real.npz", images=np.zeros((3, 2, 2, 3), np.uint8), k=EXPECTED)
    (tmp_path / "s.npz").symlink_to(tmp_path / "real.npz")
    with pytest.raises(CheckFailed, match="is a symlink"):
        read_selftest(tmp_path / "s.npz", "k", 2, 3)


def test_the_size_limit_counts_what_the_members_declare(tmp_path, monkeypatch):
    import zipfile

    np.savez(tmp_path / "s.npz", images=np.zeros((3, 2, 2, 3), np.uint8), k=EXPECTED)
    with zipfile.ZipFile(tmp_path / "s.npz") as archive:
        declared = sum(info.file_size for info in archive.infolist())
    monkeypatch.setattr("toolkit.serving.classifier.SELFTEST_MAX_BYTES", declared)  # at the limit: read
    read_selftest(tmp_path / "s.npz", "k", 2, 3)
    monkeypatch.setattr("toolkit.serving.classifier.SELFTEST_MAX_BYTES", declared - 1)
    with pytest.raises(CheckFailed, match=f"declares {declared} bytes uncompressed"):
        read_selftest(tmp_path / "s.npz", "k", 2, 3)


def test_an_array_header_that_claims_more_than_the_file_holds_is_refused_unread(tmp_path):
    """An npz bomb: a member whose .npy header declares 10^8 float64 values (800 MB) but holds a few bytes."""
    import zipfile

    from numpy.lib import format as npy

    header = io.BytesIO()
    npy.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**8,)})
    with zipfile.ZipFile(tmp_path / "s.npz", "w") as archive:
        archive.writestr("k.npy", header.getvalue() + b"\0" * 64)
        archive.writestr("images.npy", header.getvalue() + b"\0" * 64)
    with pytest.raises(CheckFailed, match="declares 1600000000 bytes uncompressed"):
        read_selftest(tmp_path / "s.npz", "k", 2, 3)
