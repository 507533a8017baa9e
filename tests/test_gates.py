"""The gates of fp16, bf16, int8 and any-size files: top-1 where the reference is decisive, the near-ties
reported by direction, and the accuracy change with its exact interval (toolkit/evaluation/stats.py)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.conftest import copy_bundle, error_line, reseal, rtk
from toolkit.errors import RtkError
from toolkit.evaluation import stats
from toolkit.evaluation import verify as v

# ---------------------------------------------------------------- the decisive margin, at its boundary


def test_decisive_is_strictly_more_than_the_margin_times_the_largest_logit():
    # scale 4 (the largest |logit|, here a negative one): gap must exceed 0.25 x 4 = 1.0 exactly
    ref = np.array([[3.0, 2.0, -4.0],  # gap 1.0: at the margin, a near-tie
                    [3.0, 1.9990234375, 0.0],  # gap 1.0009765625 (exact in binary): decisive
                    [0.0, 0.0, 1.0]])  # gap 1.0: near-tie
    assert v.decisive(ref, 0.25).tolist() == [False, True, False]
    # the scale is at least 1: logits within +-0.5 keep the margin 0.25 x 1, not 0.25 x 0.5
    small = np.array([[0.5, 0.25], [0.5, 0.2421875]])
    assert v.decisive(small, 0.25).tolist() == [False, True]
    assert v.decisive(np.array([[1.0], [2.0]]), 0.25).tolist() == [True, True]  # one class: nothing can flip


def test_a_flip_at_the_margin_passes_and_just_above_it_fails():
    gates = v.Gates(decisive_margin=0.25)
    ref = np.array([[3.0, 2.0, -4.0], [3.0, 1.9990234375, 0.0], [0.0, 4.0, 0.0]])
    names = ["tie", "decisive", "clear"]
    tie_flipped = ref.copy()
    tie_flipped[0] = [2.0, 3.0, -4.0]
    ok = v.compare(tie_flipped, ref, names, None, "int8", gates)
    assert ok["passed"] and ok["top1_agreement_where_clear"] == 1.0 and ok["top1_agreement"] == pytest.approx(2 / 3)
    assert ok["near_ties"] == {"images": 1, "flipped": 1} and ok["tolerance"]["decisive_gap"] == 1.0
    decisive_flipped = ref.copy()
    decisive_flipped[1] = [1.9990234375, 3.0, 0.0]
    bad = v.compare(decisive_flipped, ref, names, None, "int8", gates)
    assert bad["failed_metrics"] == ["top1_agreement"] and bad["top1_agreement_where_clear"] == 0.5
    assert bad["near_ties"] == {"images": 1, "flipped": 0}



@pytest.mark.parametrize("precision,field", [("int8", "int8_top1"), ("fp16", "half_top1"), ("bf16", "half_top1")])
def test_a_documented_threshold_below_100_percent(precision, field):
    ref = np.array([[3.0, 2.0, -4.0], [3.0, 1.9990234375, 0.0], [0.0, 4.0, 0.0]])
    out = ref.copy()
    out[1] = [1.9990234375, 3.0, 0.0]  # one flip in the two decisive images: exactly 50%
    names = ["tie", "decisive", "clear"]
    assert v.compare(out, ref, names, None, precision, v.Gates(decisive_margin=0.25, **{field: 0.5}))["passed"]
    assert not v.compare(out, ref, names, None, precision, v.Gates(decisive_margin=0.25, **{field: 0.5000001}))["passed"]


def test_the_margin_and_confidence_are_checked():
    for bad in ({"decisive_margin": -0.01}, {"confidence": 1.0}, {"confidence": 0.0}, {"decisive_margin": float("nan")}):
        with pytest.raises(RtkError):
            v.Gates(**bad)
    assert v.Gates(decisive_margin=0.0).decisive_margin == 0.0  # 0: every image but exact ties is decisive


# ---------------------------------------------------------------- near-ties, by direction


def test_near_tie_flips_are_counted_to_right_and_to_wrong():
    ref = np.array([[1.0, 0.99, 0.0], [1.0, 0.99, 0.0], [1.0, 0.99, 0.0], [1.0, 0.99, 0.0], [9.0, 0.0, 0.0]])
    got = np.array([[0.99, 1.0, 0.0], [0.99, 1.0, 0.0], [0.99, 1.0, 0.0], [1.0, 0.99, 0.0], [9.0, 0.0, 0.0]])
    labels = np.array([1, 0, 2, 0, -1])  # to right; to wrong; wrong both ways; not flipped; unlabelled
    ties = v.near_tie_flips(got, ref, labels, v.decisive(ref, 0.05))
    assert ties == {"images": 4, "flipped": 3, "to_right": 1, "to_wrong": 1}
    assert v.near_tie_words(ties) == "4, 3 flipped (1 to right, 1 to wrong)"
    unlabelled = np.full(5, -1)
    assert v.near_tie_flips(got, ref, unlabelled, v.decisive(ref, 0.05)) == {
        "images": 4, "flipped": 3, "to_right": 0, "to_wrong": 0}


# ---------------------------------------------------------------- acceptance: the near-tie model


def _near_tie_model(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """60 images, 2 classes: 40 decisive (logit gap 3 to 5, 38 right), 20 near-ties (gap 0.01 to 0.05, 10 right).
    Swapping a near-tie's logits moves them less than the any-size atol (0.02 x 5)."""
    decisive = np.stack([rng.uniform(3, 5, 40), np.zeros(40)], 1)
    ties = np.stack([rng.uniform(0.01, 0.05, 20), np.zeros(20)], 1)
    ref = np.concatenate([decisive, ties])
    labels = np.zeros(60, int)
    labels[[38, 39]] = 1  # two decisive images the reference gets wrong
    labels[40:50] = 1  # half the near-ties too
    return ref, labels


@pytest.mark.parametrize("precision,any_size", [("int8", False), ("fp16", False), ("bf16", False), ("fp32", True)])
def test_near_tie_flips_that_gain_accuracy_pass_and_are_reported(precision, any_size):
    ref, labels = _near_tie_model(np.random.default_rng(0))
    out = ref.copy()
    out[40:45] = out[40:45, ::-1]  # five near-ties flip to right ...
    out[50] = out[50, ::-1]  # ... and one to wrong: +4 of 60, and 54/60 = 90% top-1 (the old 97% gate failed it)
    m = v.compare(out, ref, [str(i) for i in range(60)], labels, precision, v.Gates(), any_size=any_size)
    assert m["passed"], m["failed_metrics"]
    assert m["top1_agreement"] == pytest.approx(0.9) and m["top1_agreement_where_clear"] == 1.0
    assert m["near_ties"] == {"images": 20, "flipped": 6, "to_right": 5, "to_wrong": 1}
    assert m["accuracy_change"] == pytest.approx(4 / 60)
    assert (m["accuracy_pairs"]["gains"], m["accuracy_pairs"]["losses"], m["accuracy_pairs"]["images"]) == (5, 1, 60)
    low, high = m["accuracy_interval"]
    assert low < 0 < 4 / 60 < high  # 60 images cannot tell this gain from noise


@pytest.mark.parametrize("precision,any_size", [("int8", False), ("fp16", False), ("bf16", False), ("fp32", True)])
def test_a_file_that_flips_decisive_images_fails_even_when_accuracy_rises(precision, any_size):
    ref, labels = _near_tie_model(np.random.default_rng(0))
    out = ref.copy()
    out[[38, 39]] = out[[38, 39], ::-1]  # the two decisive images the reference gets wrong: now right
    m = v.compare(out, ref, [str(i) for i in range(60)], labels, precision, v.Gates(), any_size=any_size)
    assert m["accuracy_change"] == pytest.approx(2 / 60) and m["near_ties"]["flipped"] == 0
    assert not m["passed"] and "top1_agreement" in m["failed_metrics"]
    assert m["top1_agreement_where_clear"] == pytest.approx(38 / 40) and m["top1_changed"] == ["38", "39"]


def test_fp32_keeps_top1_on_every_image():
    ref, labels = _near_tie_model(np.random.default_rng(0))
    out = ref.copy()
    out[40] = out[40, ::-1]
    m = v.compare(out, ref, [str(i) for i in range(60)], labels, "fp32", v.Gates(atol=10, rtol=0))
    assert m["failed_metrics"] == ["top1_agreement"]  # allclose holds; a flipped near-tie still fails fp32


# ---------------------------------------------------------------- the exact interval, hand-checked


def _binomial_tail(k: int, n: int, p: float, upper: bool) -> float:
    """P(X >= k) (upper) or P(X <= k) for X ~ Binomial(n, p), summed exactly term by term."""
    terms = range(k, n + 1) if upper else range(0, k + 1)
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in terms)


def test_clopper_pearson_on_hand_computed_cases():
    # k=1 of n=2 at 95%: the lower end solves P(X >= 1) = 1 - (1-p)^2 = 0.025 -> p = 1 - sqrt(0.975) = 0.0125791;
    # the upper end solves P(X <= 1) = 1 - p^2 = 0.025 -> p = sqrt(0.975) = 0.9874209
    low, high = stats.clopper_pearson(1, 2)
    assert low == pytest.approx(1 - math.sqrt(0.975), abs=1e-12) and high == pytest.approx(math.sqrt(0.975), abs=1e-12)
    # k=0 of 60: the upper end solves (1-p)^60 = 0.025 -> p = 1 - 0.025^(1/60) = 0.0596295; k=n mirrors it
    assert stats.clopper_pearson(0, 60) == (0.0, pytest.approx(1 - 0.025 ** (1 / 60), abs=1e-12))
    assert stats.clopper_pearson(60, 60) == (pytest.approx(0.025 ** (1 / 60), abs=1e-12), 1.0)
    assert stats.clopper_pearson(0, 0) == (0.0, 1.0)
    # no closed form: each end leaves exactly 2.5% in its tail (the binomial sums, independent of the beta function)
    for k, n in ((3, 60), (5, 359), (180, 359)):
        low, high = stats.clopper_pearson(k, n)
        assert _binomial_tail(k, n, low, upper=True) == pytest.approx(0.025, abs=1e-9)
        assert _binomial_tail(k, n, high, upper=False) == pytest.approx(0.025, abs=1e-9)
    with pytest.raises(ValueError):
        stats.clopper_pearson(3, 2)


def test_the_paired_interval_on_hand_computed_cases():
    # Each part at 97.5% (Bonferroni), tails of 1.25%.
    # No discordant pair of 60: delta in [0, 1 - 0.0125^(1/60)]: ln 0.0125 = -4.382027, /60 = -0.0730338,
    # exp = 0.929570, so 0.070430; pi (0 of 0) in [0, 1]: the change lies in [-0.070430, +0.070430].
    none = stats.paired_change(0, 0, 60)
    assert none.change == 0 and none.low == pytest.approx(-0.070430, abs=1e-6) and none.high == pytest.approx(0.070430, abs=1e-6)
    # Four gains of four: delta and pi both in [0.0125^(1/4), 1] = [0.334370, 1] (sqrt(sqrt(0.0125))); the low end
    # is delta_high * (2 pi_low - 1) = 1 * (0.668740 - 1) = -0.331260, the high end delta_high * (2 * 1 - 1) = 1.
    four = stats.paired_change(4, 0, 4)
    assert four.change == 1 and four.low == pytest.approx(-0.331260, abs=1e-6) and four.high == pytest.approx(1.0)
    # the mirror case is the mirror interval, and a known non-closed-form case brackets its point estimate
    assert stats.paired_change(0, 4, 4).low == pytest.approx(-1.0) and stats.paired_change(0, 4, 4).high == pytest.approx(0.331260, abs=1e-6)
    issue = stats.paired_change(3, 0, 60)  # the issue's case: three near-ties gained of 60
    d_low, d_high = stats.clopper_pearson(3, 60, 0.975)
    assert issue.low == pytest.approx(d_high * (2 * 0.0125 ** (1 / 3) - 1)) and issue.high == pytest.approx(d_high)
    with pytest.raises(ValueError):
        stats.paired_change(3, 3, 5)


def test_images_to_resolve(monkeypatch):
    # no discordant pair: width 2 * (1 - 0.0125^(1/N)) <= 0.01 <=> N >= ln 0.0125 / ln 0.995 = 4.382027 / 0.0050125
    # = 874.2, so 875 images
    none = stats.paired_change(0, 0, 60)
    assert stats.images_to_resolve(none, 0.01) == 875
    assert stats.paired_change(0, 0, 875).width <= 0.01 < stats.paired_change(0, 0, 874).width
    for bound in (0.03, 0.02, 0.007):  # the smallest count, not one near it
        n = stats.images_to_resolve(none, bound)
        assert stats.paired_change(0, 0, n).width <= bound < stats.paired_change(0, 0, n - 1).width
    assert stats.images_to_resolve(none, 0.0) is None
    assert stats.images_to_resolve(none, none.width) == 60  # already resolved: this set
    monkeypatch.setattr(stats, "MAX_IMAGES", 874)
    assert stats.images_to_resolve(none, 0.01) is None  # more than MAX_IMAGES would be needed
    monkeypatch.setattr(stats, "MAX_IMAGES", 875)
    assert stats.images_to_resolve(none, 0.01) == 875


def test_the_resolution_is_inclusive_at_the_bound():
    ref, labels = _near_tie_model(np.random.default_rng(0))
    out = ref.copy()
    out[40:43] = out[40:43, ::-1]  # three gains
    width = stats.paired_change(3, 0, 60).width
    _, at = v.accuracy_pairs(out, ref, labels, 0.95, width)
    _, under = v.accuracy_pairs(out, ref, labels, 0.95, np.nextafter(width, 0))
    assert at["resolved"] and at["images_to_resolve"] == 60
    assert not under["resolved"] and under["images_to_resolve"] > 60
    assert v.resolution_words(under).startswith(f"too few images to resolve {100 * np.nextafter(width, 0):g} pt")


def test_the_drop_gate_is_on_the_point_estimate():
    """An int8 file 1 point down of 100 images passes the 1-point bound though its interval reaches much lower."""
    ref = np.tile([[4.0, 0.0]], (100, 1))
    labels = np.zeros(100, int)
    out = ref.copy()
    out[0] = [0.0, 4.0]  # one loss: -1 pt exactly
    gates = v.Gates(int8_top1=0.0)
    m = v.compare(out, ref, [str(i) for i in range(100)], labels, "int8", gates)
    assert m["passed"] and m["accuracy_change"] == pytest.approx(-0.01) and m["accuracy_interval"][0] < -0.04
    out[1] = [0.0, 4.0]
    assert v.compare(out, ref, [str(i) for i in range(100)], labels, "int8", gates)["failed_metrics"] == ["accuracy_change"]


def test_the_optimize_table_says_when_the_held_out_set_is_too_small():
    from toolkit.evaluation.optimize import fidelity_cells

    ref, labels = _near_tie_model(np.random.default_rng(0))
    out = ref.copy()
    out[40:45] = out[40:45, ::-1]
    m = v.compare(out, ref, [str(i) for i in range(60)], labels, "int8", v.Gates())
    interval, pairs = v.accuracy_pairs(out, ref, labels, 0.95, 0.005)
    row = {"accuracy_interval_points": [100 * x for x in interval], "accuracy_pairs": pairs,
           "top1_agreement_where_clear": m["top1_agreement_where_clear"], "near_ties": m["near_ties"]}
    cells = fidelity_cells(row)
    assert cells[1] == f"too small: ~{stats.images_to_resolve(stats.paired_change(5, 0, 60), 0.005)} images"
    assert cells[2] == "100.00%" and cells[3] == "20, 5 flipped (5 to right, 0 to wrong)"
    assert fidelity_cells({}) == ["-"] * 4


# ---------------------------------------------------------------- end to end, on the tiny bundle


def _one_class_int8(tiny_bundle, bundle) -> None:
    """An 'int8' file that sends every image to class 0 (its fc bias raised by 100): a hidden regression."""
    model = onnx.load(str(tiny_bundle / "model.onnx"))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    bias = next(t for t in model.graph.initializer if t.name == gemm.input[2])
    values = numpy_helper.to_array(bias).copy()
    values[0] += 100.0
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(model, str(bundle / "model.int8.onnx"))
    reseal(bundle, "model.int8.onnx")


def test_rtk_verify_fails_an_int8_file_that_flips_decisive_images_while_accuracy_rises(tiny_bundle, tiny_data, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b", files=("model.int8.onnx",))
    _one_class_int8(tiny_bundle, bundle)
    classes = (bundle / "labels.txt").read_text().split()
    holdout = tmp_path / "holdout" / classes[0]  # labelled as the broken file answers: its accuracy is 100%
    holdout.mkdir(parents=True)
    for path in sorted((tiny_data / "val").rglob("*.png")):
        shutil.copy(path, holdout / f"{path.parent.name}-{path.name}")
    result = rtk("verify", bundle, "--images", holdout.parent, "--runtime", "ort-cpu", "--json", tmp_path / "v.json")
    assert result.exit_code == 1, result.output
    assert "model.int8.onnx on ort-cpu (top1_agreement)" in error_line(result)
    [record] = json.loads((tmp_path / "v.json").read_text())["records"]
    assert record["accuracy"] == 1.0 and record["accuracy_change"] > 0 and record["accuracy_pairs"]["losses"] == 0
    assert record["top1_agreement_where_clear"] < 1.0 and record["tolerance"]["top1_agreement_where_clear"] == 1.0
    assert "where decisive (top-two gap >" in result.output and "gained, 0 lost of 18" in result.output


def test_a_negative_margin_is_one_line(tiny_bundle):
    result = rtk("verify", tiny_bundle, "--random", "2", "--decisive-margin", "-1")
    assert result.exit_code == 2 and "decisive margin must be >= 0" in error_line(result)
