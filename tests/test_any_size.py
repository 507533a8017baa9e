"""model.any-size.onnx: resize and center crop inside the graph, against torchvision's PIL pipeline on real
photos of many sizes and shapes, on every runtime that loads it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Real photos of many sizes and shapes, made from scikit-learn's two 640x427 JPEGs (the benchmark uses the same)
from benchmarks.any_size import VARIANTS  # noqa: E402
from tests.conftest import copy_bundle, rtk
from toolkit.core.bundle import ANY_SIZE_FILE
from toolkit.serving.classifier import Classifier


@pytest.fixture(scope="module")
def photo_variants(photos, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("variants")
    for photo in photos:
        image = Image.open(photo).convert("RGB")
        for name, make in VARIANTS.items():
            make(image).save(folder / f"{photo.stem}-{name}.png")
    return folder


def test_the_bundle_has_the_any_size_file(tiny_bundle):
    entry = json.loads((tiny_bundle / "manifest.json").read_text())["files"][ANY_SIZE_FILE]
    assert entry["input"] == "any-size" and entry["precision"] == "fp32"
    assert entry["inputs"] == [{"name": "image", "dtype": "uint8", "shape": ["batch", "height", "width", 3]}]


def test_in_graph_crops_are_pillows_to_the_rounding(tiny_bundle, photo_variants):
    """The resized pixels themselves, against torchvision's PIL pipeline (see README for the residual)."""
    from benchmarks.any_size import crops_against_torchvision

    identical, total, worst = 0, 0, 0.0
    for path, got, want in crops_against_torchvision(tiny_bundle, sorted(photo_variants.iterdir())):
        assert got.shape == want.shape == (32, 32, 3), path.name
        worst = max(worst, float(np.abs(got - want).max()))
        identical += int((got == want).sum())
        total += got.size
    assert worst <= 1.0  # never more than one grey level: Pillow's rounding, not another resize
    # measured 96.73% (torch 2.x, Pillow 11/12); without Pillow's 22-bit weight rounding it is 96.47%
    assert identical / total >= 0.966, identical / total


# (width, height) whose resized long side minus the crop is odd: torchvision's center crop rounds the half
# offset to even, which floor or ceil get wrong by one pixel (36 px resize, 32 px crop: 55-32 = 23, 53-32 = 21, ...)
TIE_SIZES = [(153, 100), (100, 153), (148, 100), (100, 148), (229, 150), (150, 229), (57, 36), (36, 59)]


def _tie_images(photos) -> list[np.ndarray]:
    image = Image.open(photos[0]).convert("RGB")
    return [np.asarray(image.resize(size, Image.LANCZOS)) for size in TIE_SIZES]


def test_the_graph_crops_ties_where_torchvision_does(photos):
    """The in-graph resize and crop (the module itself, in eager torch) against torchvision's pipeline on sizes
    whose crop offset is a tie: one pixel off is a shifted crop, tens of grey levels on real photos."""
    import torch

    from toolkit.core.preprocess import PreprocessSpec
    from toolkit.evaluation.verify import torchvision_crop
    from toolkit.export.graph import ResizeCenterCrop

    for spec in (PreprocessSpec(36, 32), PreprocessSpec(64, 49)):
        module = ResizeCenterCrop(spec)
        for image in _tie_images(photos):
            got = module(torch.from_numpy(image.copy())[None]).numpy()[0]
            want = torchvision_crop(image, spec).astype(np.float32)
            assert got.shape == want.shape == (spec.crop_size, spec.crop_size, 3)
            assert np.abs(got - want).max() <= 1.0 and (got == want).mean() > 0.98, (image.shape, spec)


def test_the_exported_any_size_file_crops_ties_where_torchvision_does(tiny_bundle, photos, tmp_path):
    from benchmarks.any_size import crops_against_torchvision

    paths = []
    for size, image in zip(TIE_SIZES, _tie_images(photos)):
        paths.append(tmp_path / f"{size[0]}x{size[1]}.png")
        Image.fromarray(image).save(paths[-1])
    for path, got, want in crops_against_torchvision(tiny_bundle, paths):
        assert np.abs(got - want).max() <= 1.0 and (got == want).mean() > 0.98, path.name


def test_in_graph_weights_are_on_pillows_fixed_point_grid():
    """Pillow resizes 8-bit images with coefficients rounded to 22 fractional bits; the graph's weights carry
    exactly those, each row still summing to one (within the rounding), so a float matmul lands where Pillow does."""
    import torch

    from toolkit.export.graph import PIL_FIXED_POINT, _axis_weights

    assert PIL_FIXED_POINT == 2.0 ** 22
    for n_in, n_out, start, count in [(427, 36, 2, 32), (100, 55, 12, 32), (3000, 53, 10, 32), (9, 36, 2, 32)]:
        w = _axis_weights(torch.tensor(n_in), torch.tensor(n_out), torch.tensor(start), count).double()
        assert w.shape == (count, n_in)
        fixed = w * PIL_FIXED_POINT
        assert torch.equal(fixed, torch.round(fixed)), (n_in, n_out)
        assert torch.allclose(w.sum(1), torch.ones(count, dtype=torch.float64), atol=n_in / PIL_FIXED_POINT)
        assert float(w.min()) >= 0.0 and int((w > 0).sum(1).min()) >= 1
        # each weight is the exact triangle-filter weight rounded to the nearest 2^-22 (Pillow rounds half up)
        scale = n_in / n_out
        support = max(scale, 1.0)
        centre = (np.arange(count) + start + 0.5) * scale
        exact = np.clip(1.0 - np.abs(np.arange(n_in) + 0.5 - centre[:, None]) / support, 0.0, None)
        exact /= exact.sum(1, keepdims=True)
        assert float(np.abs(w.numpy() - exact).max()) <= 0.5 / PIL_FIXED_POINT + 1e-12, (n_in, n_out)


def test_black_and_white_survive_the_in_graph_resize():
    """Pixels at 0 and 255 stay exactly there (Pillow clips each pass to 0..255; nothing shifts the levels)."""
    import torch

    from toolkit.core.preprocess import PreprocessSpec
    from toolkit.evaluation.verify import torchvision_crop
    from toolkit.export.graph import ResizeCenterCrop

    image = np.zeros((90, 153, 3), np.uint8)
    image[:, 80:] = 255
    image[40:50, :30] = 255
    spec = PreprocessSpec(36, 32)
    got = ResizeCenterCrop(spec)(torch.from_numpy(image)[None]).numpy()[0]
    want = torchvision_crop(image, spec).astype(np.float32)
    assert got.min() == 0.0 and got.max() == 255.0 and np.abs(got - want).max() <= 1.0
    assert (got == 0).sum() == (want == 0).sum() and (got == 255).sum() == (want == 255).sum()


@pytest.mark.parametrize("runtime", ["ort-cpu", "openvino"])
def test_parity_on_real_photos_of_many_sizes(tiny_bundle, photo_variants, tmp_path, runtime):
    if runtime == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra is not installed")
    bundle = copy_bundle(tiny_bundle, tmp_path / "b", files=(ANY_SIZE_FILE,))
    result = rtk("verify", bundle, "--images", photo_variants, "--random", "6", "--runtime", runtime,
                 "--json", tmp_path / "v.json")
    assert result.exit_code == 0, result.output
    [record] = [r for r in json.loads((tmp_path / "v.json").read_text())["records"] if r["artifact"] == ANY_SIZE_FILE]
    assert record["images"] == 2 * len(VARIANTS) + 6 and record["top1_agreement_where_clear"] == 1.0
    assert record["max_abs_diff"] <= record["tolerance"]["atol"]


def test_a_wrong_resize_fails_verification(tiny_bundle, tiny_run, photo_variants, tmp_path):
    """An any-size file that resizes to 40 px instead of the checkpoint's 36 must fail parity."""
    import dataclasses

    from tests.conftest import reseal
    from toolkit.export.exporter import ExportConfig, write_any_size
    from toolkit.export.graph import AnySizeClassifier
    from toolkit.training.checkpoint import load_source

    bundle = copy_bundle(tiny_bundle, tmp_path / "b", files=(ANY_SIZE_FILE,))
    model, source = load_source(tiny_run / "checkpoint.pt")
    wrong = AnySizeClassifier(model, dataclasses.replace(source.preprocess, resize_size=40)).eval()
    meta = {"classes": json.dumps(list(source.classes)), "preprocess": json.dumps(source.preprocess.to_dict())}
    write_any_size(wrong, bundle / ANY_SIZE_FILE, ExportConfig(), meta)
    reseal(bundle, ANY_SIZE_FILE)
    result = rtk("verify", bundle, "--images", photo_variants, "--runtime", "ort-cpu")
    assert result.exit_code == 1 and "model.any-size.onnx on ort-cpu (max_abs_diff" in result.output


def test_the_any_size_gate():
    from toolkit.evaluation.verify import Gates, compare

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(8, 3)) * 3
    names = [str(i) for i in range(8)]
    assert compare(ref + 1e-3, ref, names, None, "fp32", Gates(), any_size=True)["passed"]
    shifted = compare(ref + rng.normal(size=(8, 3)), ref, names, None, "fp32", Gates(), any_size=True)
    assert not shifted["passed"] and "max_abs_diff" in shifted["failed_metrics"]


def test_the_classifier_decodes_only_and_agrees_with_host_resizing(tiny_bundle, photo_variants):
    whole = Classifier.load(tiny_bundle, any_size=True)
    crops = Classifier.load(tiny_bundle)
    assert whole.any_size and whole.path.name == ANY_SIZE_FILE and not crops.any_size
    paths = sorted(photo_variants.iterdir())
    a, b = whole.predict(paths, top_k=3), crops.predict(paths, top_k=3)
    assert [p.indices[0] for p in a] == [p.indices[0] for p in b]
    assert max(abs(x.scores[0] - y.scores[0]) for x, y in zip(a, b)) < 0.02
    assert whole.model_input(paths[0]).shape == np.asarray(Image.open(paths[0]).convert("RGB")).shape


def test_bad_input_is_one_clear_error(tiny_bundle):
    from toolkit.errors import RtkError
    from toolkit.evaluation.runners import check_batch

    clf = Classifier.load(tiny_bundle, any_size=True)
    for bad in (np.zeros((4, 5), np.float32), np.zeros((5, 5, 2), np.uint8), np.zeros((0, 5, 3), np.uint8)):
        [p] = clf.predict([bad])
        assert not p.ok and p.error
    for bad in (np.zeros((5, 5, 3), np.uint8), np.zeros((1, 5, 5, 4), np.uint8), np.zeros((1, 5, 5, 3), np.float32)):
        with pytest.raises(RtkError):
            check_batch(bad)


def test_benchmark_times_it_on_whole_images(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b", files=("model.onnx", ANY_SIZE_FILE))
    result = rtk("benchmark", bundle, "--runtime", "ort-cpu", "--batch-size", "1", "--warmup", "1", "--iterations", "3",
                 "--min-seconds", "0", "--any-size-input", "320x240", "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    rows = {r["artifact"]: r for r in json.loads((tmp_path / "b.json").read_text())["results"]}
    assert rows[ANY_SIZE_FILE]["input"].startswith("320x240 image") and rows["model.onnx"]["input"] == "32x32 crop"


def test_the_legacy_exporter_writes_no_any_size_file(tiny_run, tmp_path):
    result = rtk("export", tiny_run / "checkpoint.pt", "--output", tmp_path / "b", "--format", "onnx", "--exporter", "legacy",
                 "--opset", "17", "--no-verify")
    assert result.exit_code == 0, result.output
    assert f"{ANY_SIZE_FILE} not written: the legacy exporter" in result.output
    assert not (tmp_path / "b" / ANY_SIZE_FILE).exists()
