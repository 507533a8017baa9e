import logging
import shutil

import pytest
from PIL import Image

from tests.conftest import error_line, make_imagefolder, rtk
from toolkit.errors import RtkError
from toolkit.training.data import discover


def test_digits_imagefolder(tmp_path):
    result = rtk("data", "digits", tmp_path / "d", "--size", "16", "--val-fraction", "0.25")
    assert result.exit_code == 0, result.output
    train = list((tmp_path / "d" / "train").rglob("*.png"))
    val = list((tmp_path / "d" / "val").rglob("*.png"))
    assert len(train) + len(val) == 1797
    assert sorted(p.name for p in (tmp_path / "d" / "train").iterdir()) == [str(i) for i in range(10)]
    assert 0.24 < len(val) / 1797 < 0.26
    for cls in range(10):  # stratified: every class in val
        assert list((tmp_path / "d" / "val" / str(cls)).glob("*.png"))
    img = Image.open(train[0])
    assert img.mode == "RGB" and img.size == (16, 16)


def test_digits_needs_scikit_learn(monkeypatch, tmp_path):
    import builtins

    real = builtins.__import__

    def no_sklearn(name, *a, **k):
        if name.startswith("sklearn"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    result = rtk("data", "digits", tmp_path / "d")
    assert result.exit_code == 2 and "pip install -e '.[demo]'" in error_line(result)


def test_train_val_layout(tiny_data):
    split = discover(tiny_data)
    assert split.classes == ("circle", "square", "stripes")
    assert len(split.train) == 48 and len(split.val) == 18


def test_single_folder_split_is_seeded_and_stratified(tmp_path):
    root = make_imagefolder(tmp_path, {"all": 10}) / "all"
    a, b, c = discover(root, 0.3, seed=1), discover(root, 0.3, seed=1), discover(root, 0.3, seed=2)
    assert a.val == b.val and a.val != c.val
    assert [sum(s.label == k for s in a.val) for k in range(3)] == [3, 3, 3]


def test_undecodable_files_are_skipped_with_a_warning_or_fail_under_strict(tmp_path, caplog):
    root = make_imagefolder(tmp_path, {"all": 4}) / "all"
    (root / "circle" / "empty.png").write_bytes(b"")
    (root / "square" / "text.jpg").write_text("not an image")
    good = (root / "stripes" / "stripes_00.png").read_bytes()
    (root / "stripes" / "truncated.png").write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING):
        split = discover(root, 0.25)
    assert len(split.skipped) == 3
    assert "empty.png" in caplog.text and "text.jpg" in caplog.text and "truncated.png" in caplog.text
    with pytest.raises(RtkError, match="--strict"):
        discover(root, 0.25, strict=True)


@pytest.mark.parametrize("case, message", [
    ("missing", "data folder not found"),
    ("no_classes", "no class folders"),
    ("empty_class", "holds no images"),
    ("single_class", "single class"),
])
def test_bad_data_is_a_one_line_error_and_writes_nothing(tmp_path, case, message):
    data = tmp_path / "data"
    if case != "missing":
        make_imagefolder(data, {"train": 2, "val": 1})
    if case == "no_classes":
        shutil.rmtree(data / "train")
        shutil.rmtree(data / "val")
        (data / "readme.txt").write_text("x")
    elif case == "empty_class":
        for p in (data / "train" / "square").iterdir():
            p.unlink()
    elif case == "single_class":
        for split in ("train", "val"):
            for cls in ("square", "stripes"):
                shutil.rmtree(data / split / cls)
    out = tmp_path / "out"
    result = rtk("train", data, "--output", out, "--weights", "none", "--epochs", "1")
    assert result.exit_code == 2
    assert message in error_line(result)
    assert "Traceback" not in result.output
    assert not out.exists()
