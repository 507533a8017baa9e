"""Writers (issue 23: 3, 8, 15, 17, 18): no command deletes or changes its own input, triton writes labels it
checked, a full disk is one line naming a path (never an abort, no partial folder left), and two commands
writing one folder take turns."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import TRAIN_ARGS, copy_bundle, error_line, rtk
from toolkit.core.fileio import folder_lock

SUBPROCESS_TIMEOUT_S = 300
MODEL_MB = 45  # the tiny resnet18's model files: ~45 MB each, far over the 2 MiB test disk


def sha256_tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative name -> sha256): the same dict later means nothing was touched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_error_line(output: str, *needles: str) -> str:
    assert "Traceback" not in output, output
    lines = [ln for ln in output.strip().splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def cli(*args, timeout: float = SUBPROCESS_TIMEOUT_S, **kwargs) -> subprocess.CompletedProcess:
    """`rtk ARGS` in its own process: an abort (SIGABRT, exit 134) shows as such instead of killing pytest."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "toolkit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


# ---------------------------------------------------------------- 3 and 15: rtk triton


@pytest.fixture()
def triton_bundle(tiny_bundle, tmp_path) -> Path:
    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc] (dev extra)")
    return copy_bundle(tiny_bundle, tmp_path / "parent" / "bundle")


@pytest.mark.parametrize("where", ["parent", "inside", "name-escapes"])
def test_triton_force_never_deletes_or_writes_into_the_bundle(triton_bundle, where):
    """Issue case 3: `rtk triton BUNDLE --output <its parent> --force` removed the bundle (the model folder
    is named after the bundle folder, so it IS the bundle)."""
    before = sha256_tree(triton_bundle.parent)
    args = {"parent": ("--output", triton_bundle.parent),
            "inside": ("--output", triton_bundle / "repo"),
            "name-escapes": ("--output", triton_bundle.parent / "repo", "--name", "../bundle")}[where]
    result = rtk("triton", triton_bundle, *args, "--force")
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "--force" not in line  # the old "exists; pass --force" led straight into the deletion
    assert ("is the bundle" if where == "parent" else "lies inside the bundle" if where == "inside"
            else "cannot be a Triton model name") in line, line
    assert sha256_tree(triton_bundle.parent) == before  # nothing deleted, nothing added


def test_triton_force_replaces_an_old_repository_only_when_the_new_one_is_complete(triton_bundle, tmp_path):
    repo = tmp_path / "repo"
    assert rtk("triton", triton_bundle, "--output", repo).exit_code == 0
    old = sha256_tree(repo)
    (triton_bundle / "labels.txt").write_text("circle\nsquare\n")  # fails after --force was accepted
    result = rtk("triton", triton_bundle, "--output", repo, "--force")
    assert result.exit_code == 1 and "has 2 labels, the manifest has 3 classes" in error_line(result)
    assert sha256_tree(repo) == old and sorted(p.name for p in repo.iterdir()) == ["bundle"]  # no half folder


@pytest.mark.parametrize("attack", ["symlink-to-secret", "5000-lines"])
def test_triton_writes_only_labels_it_checked(triton_bundle, tmp_path, attack):
    """Issue case 15 (triton half): labels.txt was copied unchecked."""
    secret = tmp_path / "secret.txt"
    secret.write_text("AWS_SECRET=hunter2\n")
    labels = triton_bundle / "labels.txt"
    labels.unlink()
    if attack == "symlink-to-secret":
        labels.symlink_to(secret)
    else:
        labels.write_text("\n".join(f"class{i}" for i in range(5000)) + "\n")
    result = rtk("triton", triton_bundle, "--output", tmp_path / "repo")
    assert result.exit_code == 1, result.output
    assert_one_error_line(result.output, "symlink" if attack == "symlink-to-secret" else "5000 labels")
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").rglob("*"))
    assert secret.read_text() == "AWS_SECRET=hunter2\n"


def test_triton_labels_are_written_from_the_checked_list(triton_bundle, tmp_path):
    # a label file with blank lines and CRLF endings is still the manifest's classes: Triton gets clean lines
    (triton_bundle / "labels.txt").write_bytes(b"circle\r\n\r\nsquare\r\nstripes")
    assert rtk("triton", triton_bundle, "--output", tmp_path / "repo").exit_code == 0
    assert (tmp_path / "repo" / "bundle" / "labels.txt").read_bytes() == b"circle\nsquare\nstripes\n"


def test_triton_reads_no_model_file_outside_the_bundle(triton_bundle, tmp_path):
    """A manifest recommending `../evil.onnx` (hash recomputed to match) does not get it into the repository."""
    evil = triton_bundle.parent / "evil.onnx"
    evil.write_bytes((triton_bundle / "model.onnx").read_bytes())
    manifest = json.loads((triton_bundle / "manifest.json").read_text())
    manifest["files"]["../evil.onnx"] = manifest["files"]["model.onnx"]
    manifest["recommended"] = {"runtime": "ort-cpu", "artifact": "../evil.onnx", "device": "cpu", "threads": 1}
    (triton_bundle / "manifest.json").write_text(json.dumps(manifest))
    result = rtk("triton", triton_bundle, "--output", tmp_path / "repo", "--device", "cpu")
    assert result.exit_code != 0, result.output
    assert_one_error_line(result.output, "../evil.onnx")
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").rglob("*.onnx"))


# ---------------------------------------------------------------- 8: rtk export --force


@pytest.fixture()
def run_copy(tiny_run, tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint.pt", "last.pt", "history.csv", "metrics.json"):
        (run / name).write_bytes((tiny_run / name).read_bytes())
    return run


@pytest.mark.parametrize("case", ["run-folder", "checkpoint-file", "above-the-run", "inside-the-run",
                                  "calibration-folder", "inside-calibration", "symlink-to-run"])
def test_export_force_never_deletes_or_writes_into_its_input(run_copy, tiny_data, tmp_path, case):
    """Issue case 8: `rtk export run/checkpoint.pt --output run --force` deleted the checkpoint, last.pt,
    history.csv and metrics.json it was asked to export."""
    calib = tmp_path / "calib"
    calib.mkdir()
    for p in sorted((tiny_data / "train").rglob("*.png"))[:8]:
        (calib / p.name).write_bytes(p.read_bytes())
    (tmp_path / "link").symlink_to(run_copy)
    output, relation = {
        "run-folder": (run_copy, "contains the checkpoint"), "checkpoint-file": (run_copy / "checkpoint.pt", "is the checkpoint"),
        "above-the-run": (tmp_path, "contains the checkpoint"), "inside-the-run": (run_copy / "bundle", "lies inside its training run"),
        "calibration-folder": (calib, "is the calibration images"), "inside-calibration": (calib / "b", "lies inside the calibration"),
        "symlink-to-run": (tmp_path / "link", "contains the checkpoint"),
    }[case]
    before = sha256_tree(tmp_path)
    result = rtk("export", run_copy / "checkpoint.pt", "--output", output, "--force", "--format", "onnx", "--precision",
                 "fp32", "--precision", "int8", "--calibration-data", calib, "--no-verify")
    assert result.exit_code == 2, result.output
    line = assert_one_error_line(result.output, relation)
    assert "--force" not in line
    assert sha256_tree(tmp_path) == before


# ---------------------------------------------------------------- 17: a full disk


@pytest.fixture()
def small_disk(tmp_path) -> Path:
    """A real 2 MiB filesystem (tmpfs), so writes fail with ENOSPC as on a full disk; skipped where mounting
    is not permitted (not root, no CAP_SYS_ADMIN)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs to fill (needs root): {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def used_bytes(mount: Path) -> int:
    stat = os.statvfs(mount)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def assert_failed_cleanly(done: subprocess.CompletedProcess, disk: Path, path_in_message: Path) -> None:
    """Exit 2 (not 134: SIGABRT), one line naming a path on the full disk, nothing left behind on it."""
    output = done.stdout + done.stderr
    assert done.returncode == 2, (done.returncode, output[-3000:])
    assert_one_error_line(output, "No space left on device", str(path_in_message))
    assert sorted(p.name for p in disk.rglob("*")) == [], list(disk.rglob("*"))  # no .partial-*, no .tmp
    assert used_bytes(disk) < 64 * 1024  # the disk does not stay full


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "pt2"])
def test_export_onto_a_full_disk_is_one_line(tiny_run, small_disk, fmt):
    done = cli("export", tiny_run / "checkpoint.pt", "--output", small_disk / "bundle", "--format", fmt,
               "--no-any-size", "--no-verify")
    name = {"torchscript": "model.ts", "onnx": "model.onnx", "pt2": "model.pt2"}[fmt]
    assert_failed_cleanly(done, small_disk, small_disk / "bundle" / name)


def test_train_onto_a_full_disk_is_one_line(tiny_data, small_disk):
    done = cli("train", tiny_data, "--output", small_disk / "run", *TRAIN_ARGS)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert_one_error_line(output, "No space left on device", str(small_disk / "run" / "checkpoint.pt"))
    assert [p.name for p in small_disk.rglob("*") if p.is_file()] == []  # no .checkpoint.pt.*.tmp left


def test_verify_write_back_onto_a_full_disk_names_the_manifest(tiny_bundle, tmp_path):
    """The bundle on a disk that is full: verify's report cannot be stored; the line says where."""
    disk = tmp_path / "disk"
    disk.mkdir()
    size = sum(p.stat().st_size for p in (tiny_bundle / n for n in ("model.onnx", "labels.txt", "selftest.npz",
                                                                      "manifest.json"))) + (1 << 20)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs to fill (needs root)")
    try:
        bundle = copy_bundle(tiny_bundle, disk / "b")
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as fh:  # fill the rest of the disk
            while True:
                fh.write(b"\0" * (1 << 16))
        before = sha256_tree(bundle)
        done = cli("verify", bundle, "--runtime", "ort-cpu", "--random", "2")
        output = done.stdout + done.stderr
        assert done.returncode == 2, output[-3000:]
        assert_one_error_line(output, "No space left on device", str(bundle / "manifest.json"))
        assert sha256_tree(bundle) == before  # the old manifest stays whole, no temporary file left
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_triton_onto_a_full_disk_keeps_the_old_repository(triton_bundle, small_disk):
    old = small_disk / "bundle"
    (old / "1").mkdir(parents=True)
    (old / "config.pbtxt").write_text('name: "bundle"\n')
    before = sha256_tree(small_disk)
    result = rtk("triton", triton_bundle, "--output", small_disk, "--force")
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.output, "No space left on device", str(old / "1" / "model.onnx"))
    assert sha256_tree(small_disk) == before and [p.name for p in small_disk.iterdir()] == ["bundle"]


def test_openvino_save_onto_a_full_disk_is_an_oserror_naming_the_file(tiny_bundle, small_disk):
    """OpenVINO's save_model writes in C++ and takes no file object: its bare RuntimeError becomes ENOSPC."""
    pytest.importorskip("openvino")
    from toolkit.core.fileio import library_writes
    from toolkit.export.openvino import write_fp32

    xml = small_disk / "model.openvino.xml"
    with pytest.raises(OSError) as caught, library_writes(xml):
        write_fp32(tiny_bundle / "model.onnx", xml, {"classes": "[]"})
    assert caught.value.errno == 28 and caught.value.filename == str(xml)


# ---------------------------------------------------------------- 18: two writers on one folder


def test_two_exports_into_one_new_folder_take_turns(tiny_run, tmp_path):
    """Issue case 18: both exited 0 and the later silently replaced the first. Now the one that finishes
    second finds the folder filled and refuses; what is there is the first one's bundle, whole."""
    out = tmp_path / "bundle"
    base = ("export", tiny_run / "checkpoint.pt", "--output", out, "--format", "torchscript", "--no-verify")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {softmax: subprocess.Popen([sys.executable, "-m", "toolkit", *map(str, base), *(["--softmax"] if softmax else [])],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for softmax in (False, True)}
    outputs = {k: p.communicate(timeout=SUBPROCESS_TIMEOUT_S)[0] for k, p in procs.items()}
    codes = {k: p.returncode for k, p in procs.items()}
    assert sorted(codes.values()) == [0, 2], (codes, outputs)
    [winner] = [k for k, c in codes.items() if c == 0]
    assert_one_error_line(outputs[not winner], "is not empty; pass --force")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["softmax"] is winner  # the first bundle was not replaced
    assert hashlib.sha256((out / "model.ts").read_bytes()).hexdigest() == manifest["files"]["model.ts"]["sha256"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_export_install_waits_for_the_folders_lock(tiny_run, tmp_path):
    """While another writer holds the output's parent, the export does not install; once it is free it does."""
    out = tmp_path / "bundle"
    result: dict = {}

    def export() -> None:
        result["r"] = rtk("export", tiny_run / "checkpoint.pt", "--output", out, "--format", "onnx", "--no-any-size",
                          "--no-verify")

    with folder_lock(tmp_path, "the test"):
        worker = threading.Thread(target=export)
        worker.start()
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while not any(p.name.startswith(".bundle.partial-") and (p / "manifest.json").exists() for p in tmp_path.iterdir()):
            assert worker.is_alive() and time.monotonic() < deadline, result
            time.sleep(0.05)
        time.sleep(0.3)
        assert not out.exists()  # staged and waiting for the lock
    worker.join(SUBPROCESS_TIMEOUT_S)
    assert result["r"].exit_code == 0, result["r"].output
    assert (out / "manifest.json").is_file()


def test_optimize_rewrites_the_selftest_under_the_bundle_lock(tiny_bundle, tmp_path):
    from toolkit.core.bundle import Bundle
    from toolkit.evaluation.optimize import update_selftest

    bundle = Bundle.open(copy_bundle(tiny_bundle, tmp_path / "b"))
    before = (bundle.root / "selftest.npz").read_bytes()
    worker = threading.Thread(target=update_selftest, args=(bundle, {"extra": lambda images: images[:, 0, 0, 0]}))
    with folder_lock(bundle.root, "the test"):
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive() and (bundle.root / "selftest.npz").read_bytes() == before  # waiting
    worker.join(30)
    import numpy as np

    with np.load(bundle.root / "selftest.npz") as data:
        assert "extra" in data.files and "images" in data.files
