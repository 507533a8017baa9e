"""`rtk predict --output`: the streamed, resumable Parquet batch job, in-process and on Ray."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import CLASSES, copy_bundle, draw, error_line, rtk

pytestmark = pytest.mark.serving

pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tiny_bundle, tmp_path_factory) -> Path:
    return copy_bundle(tiny_bundle, tmp_path_factory.mktemp("batch") / "bundle")


def huge_png(path: Path, side: int = 9000) -> Path:
    """A 1-bit PNG of side x side pixels (81 MP: above the runtime's 64 MP limit, 10 MB to build)."""
    Image.new("1", (side, side)).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Nine good images in nested folders, one undecodable and one too large."""
    root = tmp_path_factory.mktemp("batch-images") / "images"
    rng = np.random.default_rng(1)
    for i in range(9):
        folder = root / CLASSES[i % 3] / ("deep" if i > 5 else "")
        folder.mkdir(parents=True, exist_ok=True)
        draw(CLASSES[i % 3], rng).save(folder / f"img_{i}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    huge_png(root / "huge.png")
    return root


def read_rows(out: Path) -> list[dict]:
    """Every row of an output folder, by input number."""
    parts = sorted(out.glob("part-*.parquet"))
    rows = [r for p in parts for r in pq.read_table(p).to_pylist()]
    return sorted(rows, key=lambda r: r["index"])


def good(rows: list[dict]) -> dict[str, dict]:
    return {r["source"]: r for r in rows if r["error"] is None}


def test_bad_files_among_good_are_rows_with_errors(bundle, images, tmp_path):
    from toolkit.serving.classifier import Classifier

    out = tmp_path / "out"
    result = rtk("predict", bundle, images, tmp_path / "missing.png", "--output", out, "--part-rows", "4",
                 "--top-k", "2", "--logits")
    assert result.exit_code == 1, result.output
    assert "12 images, 3 failed" in result.output and str(out) in result.output
    rows = read_rows(out)
    assert [r["index"] for r in rows] == list(range(12))
    errors = {Path(r["source"]).name: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"broken.jpg", "huge.png", "missing.png"}
    assert "cannot decode" in errors["broken.jpg"] and "above the limit" in errors["huge.png"]
    assert "no such file" in errors["missing.png"]
    clf = Classifier.load(bundle)
    expected = {p.source: p for p in clf.predict(sorted(images.rglob("img_*.png")), top_k=2)}
    got = good(rows)
    assert set(got) == set(expected)
    for source, p in expected.items():
        assert got[source]["indices"] == p.indices and got[source]["labels"] == p.labels
        np.testing.assert_allclose(got[source]["scores"], p.scores, rtol=1e-5, atol=1e-6)
        assert len(got[source]["logits"]) == len(CLASSES)
    assert len(list(out.glob("part-*.parquet"))) == 3  # 12 rows, 4 per part, each written whole


def test_rerun_of_a_finished_job_skips_everything(bundle, images, tmp_path):
    out = tmp_path / "out"
    rtk("predict", bundle, images, "--output", out, "--part-rows", "4")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    again = rtk("predict", bundle, images, "--output", out, "--part-rows", "4")
    assert again.exit_code == 1  # the two bad files of the first run still count
    assert "0 images (11 already done, 2 of them failed)" in again.output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")} == before


def _manifest_txt(tmp_path: Path, images: Path, repeat: int) -> Path:
    names = [str(p) for p in sorted(images.rglob("img_*.png"))]
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join((names * (repeat // len(names) + 1))[:repeat]) + "\n")
    return manifest


def test_sigkill_then_resume_equals_an_uninterrupted_run(bundle, images, tmp_path):
    manifest = _manifest_txt(tmp_path, images, 1200)
    args = [str(bundle), str(manifest), "--part-rows", "30", "--batch-size", "4", "--workers", "1", "--threads", "1"]
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "toolkit", "predict", *args, "--output", str(killed)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(list(killed.glob("part-*.parquet"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list(killed.glob("part-*.parquet")))
    assert 2 <= written < 40, f"the kill came after {written} of 40 parts: not mid-run"
    resumed = rtk("predict", *args, "--output", killed)
    assert resumed.exit_code == 0, resumed.output
    assert f"{(40 - written) * 30} images ({written * 30} already done" in resumed.output
    whole = tmp_path / "whole"
    assert rtk("predict", *args, "--output", whole).exit_code == 0
    a, b = read_rows(killed), read_rows(whole)
    assert [r["index"] for r in a] == list(range(1200))  # each input exactly once
    assert [(r["source"], r["indices"]) for r in a] == [(r["source"], r["indices"]) for r in b]
    np.testing.assert_allclose([r["scores"] for r in a], [r["scores"] for r in b], rtol=1e-6)
    assert not [p for p in killed.iterdir() if p.name.endswith(".tmp")]


def test_manifests_txt_csv_and_parquet_with_bytes(bundle, images, tmp_path):
    paths = sorted(images.rglob("img_*.png"))
    reference = tmp_path / "reference"
    assert rtk("predict", bundle, *paths, "--output", reference).exit_code == 0
    expected = [(r["labels"], r["indices"]) for r in read_rows(reference)]

    txt = tmp_path / "lists" / "list.txt"
    txt.parent.mkdir()
    txt.write_text("# comment\n\n" + "\n".join(os.path.relpath(p, txt.parent) for p in paths) + "\n")
    with open(tmp_path / "lists" / "list.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "path"])
        writer.writerows([i, str(p)] for i, p in enumerate(paths))
    pq.write_table(pa.table({"path": [p.name for p in paths] + ["gone.png"],
                             "bytes": pa.array([p.read_bytes() for p in paths] + [None], pa.binary())}),
                   tmp_path / "lists" / "blobs.parquet")
    for name in ("list.txt", "list.csv", "blobs.parquet"):
        out = tmp_path / f"out-{name}"
        result = rtk("predict", bundle, tmp_path / "lists" / name, "--output", out)
        rows = read_rows(out)
        assert [(r["labels"], r["indices"]) for r in rows[: len(paths)]] == expected, name
        if name == "blobs.parquet":  # the bytes are decoded, not the (missing) paths; a null is one failed row
            assert result.exit_code == 1 and "no image bytes" in rows[-1]["error"]
        else:
            assert result.exit_code == 0, result.output
            assert [Path(r["source"]).resolve() for r in rows] == [p.resolve() for p in paths]


def test_unreadable_manifests_are_one_line(bundle, tmp_path):
    (tmp_path / "bad.csv").write_text("name,label\na.png,1\n")
    (tmp_path / "huge.csv").write_text("path\n" + "x" * 200_000 + "\n")  # above csv's field limit
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not parquet PAR1")
    pq.write_table(pa.table({"label": [1]}), tmp_path / "nocolumn.parquet")
    expected = {"bad.csv": "has no path column: name one of its columns path",
                "huge.csv": "is not a readable CSV manifest", "bad.parquet": "is not a readable Parquet manifest",
                "nocolumn.parquet": "has neither a path column"}
    for name, message in expected.items():
        result = rtk("predict", bundle, tmp_path / name, "--output", tmp_path / f"out-{name}")
        assert result.exit_code == 2 and message in error_line(result), name


def test_output_folders_that_are_refused(bundle, images, tmp_path):
    cases = {
        "inside the input": (images / "out", "lies inside the input"),
        "the input itself": (images, "is the input"),
    }
    for what, (out, message) in cases.items():
        result = rtk("predict", bundle, images, "--output", out)
        assert result.exit_code == 2 and message in error_line(result), what
    assert not (images / "out").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "has no job.json" in error_line(rtk("predict", bundle, images, "--output", foreign))
    out = tmp_path / "out"
    rtk("predict", bundle, images, "--output", out, "--part-rows", "4")
    other = rtk("predict", bundle, images, "--output", out, "--part-rows", "4", "--top-k", "1")
    assert other.exit_code == 2 and "different job (top_k differ)" in error_line(other)
    changed = rtk("predict", bundle, images, "--output", out, "--part-rows", "4")
    assert changed.exit_code == 1  # the same job again: nothing to do
    part = sorted(out.glob("part-*.parquet"))[0]
    part.rename(part.with_name(part.name[:14] + "0" * 16 + ".parquet"))
    moved = rtk("predict", bundle, images, "--output", out, "--part-rows", "4")
    assert moved.exit_code == 2 and "inputs of part 0 changed" in error_line(moved)


def test_batch_options_need_output_and_each_other(bundle, images, tmp_path):
    result = rtk("predict", bundle, images, "--logits")
    assert result.exit_code == 2 and "--logits needs --output" in error_line(result)
    result = rtk("predict", bundle, images, "--output", tmp_path / "a", "--address", "auto")
    assert result.exit_code == 2 and "--address needs --engine ray" in error_line(result)
    result = rtk("predict", bundle, images, "--output", tmp_path / "b", "--json")
    assert result.exit_code == 2 and "--json prints predictions" in error_line(result)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cpu_budget_is_checked_before_any_actor_starts():
    from toolkit.errors import RtkError
    from toolkit.serving.batch_ray import cpus_per_actor

    assert cpus_per_actor(8, 2, None) == 3  # all but one CPU, shared
    assert cpus_per_actor(4, 1, 2) == 2
    for total, workers, threads in ((2, 2, None), (4, 2, 2), (1, 1, None)):
        with pytest.raises(RtkError, match="need fewer than the cluster's"):
            cpus_per_actor(total, workers, threads)


def test_ray_on_two_nodes_gives_the_in_process_rows(bundle, images, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # nodes and driver on 127.0.0.1: before import
    pytest.importorskip("ray.data")
    from ray.cluster_utils import Cluster

    from toolkit.serving.batch import BatchOptions, run_local
    from toolkit.serving.batch_ray import run_ray
    from toolkit.serving.classifier import Classifier

    manifest = _manifest_txt(tmp_path, images, 200)
    inputs = [manifest, images]  # a manifest and a folder (with its two bad files)
    options = BatchOptions(top_k=3, logits=True, part_rows=25, batch_size=8)
    clf = Classifier.load(bundle, threads=1)
    local = run_local(clf, inputs, tmp_path / "local", options, decoders=1)
    # 3 (logical) CPUs a node and actors of 2: a node holds one actor, so the two actors are on both nodes
    # (SPREAD alone is a preference: CI once placed both on the head, and one node did all the work)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=3, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        remote = run_ray(clf, bundle, inputs, tmp_path / "ray", options, address=cluster.address, workers=2,
                         threads=2)
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
    assert (remote.rows, remote.failed) == (local.rows, local.failed) == (211, 2)
    assert len(remote.nodes) == 2 and all(n >= options.batch_size for n in remote.nodes.values()), remote.nodes
    assert pq.read_schema(next((tmp_path / "ray").glob("part-*"))).names == \
        pq.read_schema(next((tmp_path / "local").glob("part-*"))).names
    a, b = read_rows(tmp_path / "ray"), read_rows(tmp_path / "local")
    assert [(r["index"], r["source"], r["indices"], r["error"]) for r in a] == \
        [(r["index"], r["source"], r["indices"], r["error"]) for r in b]
    np.testing.assert_allclose([r["scores"] for r in a if not r["error"]],
                               [r["scores"] for r in b if not r["error"]], rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == sorted(p.name for p in (tmp_path / "local").iterdir())
