import json

import numpy as np
import pytest

from tests.conftest import copy_bundle, error_line, rtk
from toolkit.errors import RtkError
from toolkit.evaluation.benchmark import BenchConfig, latency_stats, table, time_runner

FAST = ("--warmup", "1", "--iterations", "3", "--min-seconds", "0")


def test_latency_stats_known_values():
    stats = latency_stats([0.001, 0.002, 0.003, 0.004], batch=2)
    assert stats["mean_ms"] == pytest.approx(2.5) and stats["min_ms"] == pytest.approx(1.0)
    assert stats["max_ms"] == pytest.approx(4.0) and stats["p50_ms"] == pytest.approx(2.5)
    assert stats["images_per_second"] == pytest.approx(800.0)
    assert stats["cv"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2.5)


def test_latency_stats_of_one_sample_and_percentile_order():
    one = latency_stats([0.002], batch=1)
    assert one["std_ms"] == 0.0 and one["cv"] == 0.0 and one["iterations"] == 1 and one["images_per_second"] == 500.0
    many = latency_stats([i / 1000 for i in range(1, 101)], batch=4)
    assert many["p50_ms"] == pytest.approx(50.5) and many["p90_ms"] == pytest.approx(90.1)
    assert many["p95_ms"] == pytest.approx(95.05) and many["p99_ms"] == pytest.approx(99.01)
    assert many["std_ms"] == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    two = latency_stats([0.0001, 0.0003], batch=1)  # two samples, below a millisecond
    assert two["std_ms"] == pytest.approx(np.sqrt(2) * 0.1) and two["cv"] == pytest.approx(np.sqrt(2) * 0.1 / 0.2)


def test_time_runner_samples_are_the_calls_durations():
    import time

    samples = time_runner(lambda _: time.sleep(0.01), None, warmup=0, iterations=3, min_seconds=0)
    assert len(samples) == 3 and all(0.009 < s < 1.0 for s in samples)


def test_speedups_against_eager_at_the_same_batch_size_and_their_spread():
    from toolkit.evaluation.benchmark import add_speedups

    def row(runtime, batch, p50, rounds=None, skipped=False):
        return {"runtime": runtime, "batch_size": batch, "p50_ms": p50, "skipped": skipped,
                **({"round_p50_ms": rounds} if rounds else {})}

    results = [row("eager", 1, 4.0, [4.0, 4.0, 6.0]), row("eager", 8, 20.0), row("ort-cpu", 1, 2.0, [2.0, 1.0, 2.0]),
               row("ort-cpu", 8, 10.0), row("ort-cpu", 4, 1.0), {"runtime": "x", "skipped": True, "reason": "r"},
               {"runtime": "y", "skipped": False, "failed": True, "reason": "r"}, row("torchscript", 1, 8.0)]
    add_speedups(results)
    eager1, eager8, ort1, ort8, ort4, skipped, failed, sequential = results
    assert "speedup_vs_eager" not in failed and sequential["speedup_vs_eager"] == 0.5
    assert "speedup_spread" not in sequential  # timed one after the other: no rounds to compare
    assert eager1["speedup_vs_eager"] == 1.0 and eager8["speedup_vs_eager"] == 1.0
    assert ort1["speedup_vs_eager"] == 2.0 and ort8["speedup_vs_eager"] == 2.0 and ort4["speedup_vs_eager"] is None
    assert ort1["speedup_rounds"] == [2.0, 4.0, 3.0] and ort1["speedup_spread"] == pytest.approx((4.0 - 2.0) / 3.0)
    assert "speedup_spread" not in ort8 and "speedup_vs_eager" not in skipped


def test_time_runner_takes_the_larger_of_iterations_and_min_seconds():
    calls = []
    samples = time_runner(calls.append, None, warmup=2, iterations=5, min_seconds=0)
    assert len(samples) == 5 and len(calls) == 7
    samples = time_runner(lambda _: None, None, warmup=0, iterations=1, min_seconds=0.05)
    assert len(samples) > 1


def test_config_validation():
    with pytest.raises(RtkError):
        BenchConfig(batch_sizes=(0,))
    with pytest.raises(RtkError):
        BenchConfig(threads=0)
    with pytest.raises(RtkError, match="one input shape"):
        BenchConfig(cuda_graph=True, batch_sizes=(1, 8))
    assert BenchConfig(cuda_graph=True, batch_sizes=(8,)).cuda_graph


def test_benchmark_structure_percentiles_skips_and_threads(tiny_bundle, tmp_path, no_compile):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b", files=("model.onnx", "model.int8.onnx", "model.ts"))
    result = rtk("benchmark", bundle, *FAST, "--batch-size", "1", "--batch-size", "4", "--threads", "1",
                 "--json", tmp_path / "r.json", "--csv", tmp_path / "r.csv", "--markdown", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["environment"]["cpu"]["model"] and report["environment"]["versions"]["onnxruntime"]
    assert report["environment"]["threads"]["torch"] == 1
    measured = [r for r in report["results"] if not r["skipped"]]
    assert {(r["runtime"], r["artifact"]) for r in measured} >= {
        ("eager", "checkpoint"), ("torchscript", "model.ts"), ("ort-cpu", "model.onnx"), ("ort-cpu", "model.int8.onnx")}
    for r in measured:
        assert r["batch_size"] in (1, 4) and r["iterations"] >= 3
        assert r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"]
        for key in ("runtime", "artifact", "precision", "mean_ms", "images_per_second", "speedup_vs_eager",
                    "cold_start_s", "peak_rss_mb"):
            assert r[key] is not None, key
        assert r["threads"] == 1
    eager = [r for r in measured if r["runtime"] == "eager"]
    assert all(r["speedup_vs_eager"] == pytest.approx(1.0) for r in eager)
    ort = [r for r in measured if r["runtime"] == "ort-cpu"]
    assert all(r["details"]["threads"] == 1 for r in ort)
    skipped = [r for r in report["results"] if r["skipped"]]
    assert skipped and all(r["reason"] for r in skipped)
    assert any(r["runtime"] == "torch-compile" and r["reason"] == "not compiled in this test" for r in skipped)
    if not any(r["runtime"] == "ort-cuda" and not r["skipped"] for r in report["results"]):
        assert any(r["runtime"] == "ort-cuda" and "CUDAExecutionProvider" in r["reason"] for r in skipped)
    assert (tmp_path / "r.csv").read_text().startswith("runtime,artifact,precision,input,batch,")
    assert "| runtime |" in (tmp_path / "r.md").read_text()
    assert "p50" in result.output


def test_threads_default_to_the_process_affinity(monkeypatch):
    monkeypatch.setattr("toolkit.evaluation.benchmark.usable_cpus", lambda: 3)
    assert BenchConfig().thread_count == 3
    assert BenchConfig(threads=1).thread_count == 1


@pytest.mark.parametrize("interleave", [True, False])
def test_unstable_figures_are_flagged(tiny_bundle, tmp_path, monkeypatch, interleave):
    """The benchmark itself marks a figure whose spread is above 10% (and only such a figure): in its JSON
    record, in the table and in the line it prints. Timings are faked so the spread is known."""
    from toolkit.evaluation.benchmark import UNSTABLE_CV, run_benchmark

    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    spreads = {1: [0.001, 0.001, 0.003], 2: [0.001, 0.00105, 0.00095]}  # batch -> samples: cv 0.69, cv 0.05

    def fake_timer(call, prepared, warmup, iterations, min_seconds):
        call(prepared)
        return list(spreads[len(prepared) if not isinstance(prepared, dict) else len(next(iter(prepared.values())))])

    monkeypatch.setattr("toolkit.evaluation.benchmark.time_runner", fake_timer)
    lines: list[str] = []
    config = BenchConfig(runtimes=("ort-cpu",), batch_sizes=(1, 2), warmup=0, iterations=3, min_seconds=0, threads=1,
                         interleave=interleave, rounds=1)
    report = run_benchmark(bundle, config, echo=lines.append)
    rows = {r["batch_size"]: r for r in report["results"] if "batch_size" in r}
    assert rows[1]["cv"] > UNSTABLE_CV and rows[1]["unstable"] is True
    assert rows[2]["cv"] < UNSTABLE_CV and rows[2]["unstable"] is False
    assert sum("UNSTABLE (cv 69%)" in line for line in lines) == 1
    text = table(report)
    assert "69.3% !" in text and "5.0% !" not in text and "coefficient of variation above 10%" in text
    rows[1]["unstable"] = False
    assert "coefficient of variation above" not in table(report)  # no warning without an unstable figure


def test_explicit_unavailable_runtime_exits_2(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    result = rtk("benchmark", bundle, *FAST, "--runtime", "ort-tensorrt")
    assert result.exit_code == 2
    assert "ort-tensorrt is not available here" in error_line(result)


def test_sweep_reports_best_latency_and_throughput(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    result = rtk("benchmark", bundle, "--runtime", "ort-cpu", "--batch-size", "1", *FAST, "--sweep", "--json", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    sweep = [r for r in json.loads((tmp_path / "s.json").read_text())["results"] if r.get("sweep")]
    assert len(sweep) == 1
    best = sweep[0]
    assert best["best_latency"]["p50_ms"] == min(t["p50_ms"] for t in best["trials"])
    assert best["best_throughput"]["images_per_second"] == max(t["images_per_second"] for t in best["trials"])
    assert {t["threads"] for t in best["trials"]} >= {1}


def test_device_filter_lists_unavailable_runtimes_as_skipped(tiny_bundle, tmp_path):
    import torch

    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    result = rtk("benchmark", bundle, *FAST, "--batch-size", "1", "--device", "cuda", "--json", tmp_path / "c.json")
    report = json.loads((tmp_path / "c.json").read_text()) if result.exit_code == 0 else None
    assert result.exit_code == 0, result.output
    assert {r["runtime"] for r in report["results"]} <= {"eager-cuda", "eager-fp16", "torch-compile-cuda", "torchscript-cuda",
                                                         "torch-export-cuda", "ort-cuda", "ort-cuda-iobinding", "ort-tensorrt"}
    if not torch.cuda.is_available():
        assert all(r["skipped"] and r["reason"] for r in report["results"])


def test_stages_leave_torch_threads_as_they_found_them(tiny_bundle, tmp_path):
    import torch

    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    before = torch.get_num_threads()
    result = rtk("benchmark", bundle, *FAST, "--runtime", "eager", "--batch-size", "1", "--threads", str(before + 1))
    assert result.exit_code == 0
    assert torch.get_num_threads() == before


def test_interleaved_rounds_time_every_runtime_in_each_round(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    result = rtk("benchmark", bundle, "--runtime", "eager", "--runtime", "ort-cpu", "--batch-size", "1", "--batch-size", "2",
                 "--warmup", "2", "--iterations", "9", "--min-seconds", "0", "--rounds", "3", "--threads", "1",
                 "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    rows = [r for r in json.loads((tmp_path / "r.json").read_text())["results"] if "batch_size" in r]
    assert len(rows) == 4  # (eager, ort-cpu model.onnx) x (1, 2)
    for r in rows:
        assert r["rounds"] == 3 and len(r["round_p50_ms"]) == 3 and r["iterations"] >= 9
    ort = [r for r in rows if r["runtime"] == "ort-cpu"]
    eager = {r["batch_size"]: r for r in rows if r["runtime"] == "eager"}
    for r in ort:  # the ratio is taken round by round (eager's round p50 / this round's), and its spread kept
        expected = np.asarray(eager[r["batch_size"]]["round_p50_ms"]) / np.asarray(r["round_p50_ms"])
        assert np.allclose(r["speedup_rounds"], expected)
        assert r["speedup_spread"] == pytest.approx((expected.max() - expected.min()) / np.median(expected))
        # (the pooled ratio is the pooled p50s', which need not lie inside the rounds' range)
        assert r["speedup_vs_eager"] == pytest.approx(eager[r["batch_size"]]["p50_ms"] / r["p50_ms"])
    sequential = rtk("benchmark", bundle, "--runtime", "ort-cpu", "--batch-size", "1", "--warmup", "1", "--iterations", "3",
                     "--min-seconds", "0", "--sequential", "--json", tmp_path / "s.json")
    assert sequential.exit_code == 0, sequential.output
    assert all("rounds" not in r for r in json.loads((tmp_path / "s.json").read_text())["results"])


def test_the_rounds_run_in_a_new_order_each_time(monkeypatch):
    from toolkit.evaluation import benchmark

    order: list[tuple[str, int]] = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def load(self):
            pass

        def release(self):
            pass

        def prepare(self, x):
            return x

        def run_prepared(self, x):
            order.append((self.name, len(x)))

    later = [(Fake(n), {1: [0], 2: [0, 0]}, {"runtime": n, "artifact": "model.onnx", "precision": "fp32", "cold_start_s": 0.0})
             for n in ("a", "b", "c")]
    records = benchmark.interleaved(later, BenchConfig(batch_sizes=(1, 2), warmup=0, iterations=3, min_seconds=0, rounds=4),
                                    lambda s: None)
    assert len(records) == 6 and all(len(r["round_p50_ms"]) == 4 for r in records)
    calls_per_pair = len(order) // (4 * 6)  # warm-up and timed calls of one pair in one round
    pairs = order[::calls_per_pair]
    per_round = [pairs[i * 6:(i + 1) * 6] for i in range(4)]
    assert len({tuple(r) for r in per_round}) > 1  # shuffled: not the same order every round
    assert all(sorted(r) == sorted(per_round[0]) for r in per_round)  # every pair in every round


def test_artifact_filter_and_the_recommendation_marked(tiny_bundle, tmp_path):
    from toolkit.core.manifest import Recommendation
    from toolkit.serving.sessions import SessionSettings

    bundle = copy_bundle(tiny_bundle, tmp_path / "b", files=("model.onnx", "model.int8.onnx"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    session = SessionSettings(threads=2).trimmed().to_dict()  # every field, as rtk optimize writes it
    manifest["recommended"] = Recommendation(runtime="ort-cpu", artifact="model.int8.onnx", precision="int8", threads=2,
                                             settings="2 threads, graph all", session=session).to_dict()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = rtk("benchmark", bundle, *FAST, "--runtime", "eager", "--runtime", "ort-cpu", "--artifact", "model.int8.onnx",
                 "--batch-size", "1", "--threads", "1", "--json", tmp_path / "r.json", "--markdown", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert {(r["runtime"], r["artifact"]) for r in rows} == {("eager", "checkpoint"), ("ort-cpu", "model.int8.onnx")}
    assert [r["runtime"] for r in rows if r.get("recommended")] == ["ort-cpu"]
    text = (tmp_path / "r.md").read_text()
    assert "| ort-cpu (recommended) | model.int8.onnx |" in text and "| eager | checkpoint |" in text
    # a recommended session variant (optimize's graph levels, OpenVINO's static batch) is timed beside the default
    manifest["recommended"]["session"]["graph_optimization"] = "basic"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert rtk("benchmark", bundle, *FAST, "--runtime", "ort-cpu", "--artifact", "model.int8.onnx", "--batch-size", "1",
               "--threads", "1", "--json", tmp_path / "s.json").exit_code == 0
    rows = json.loads((tmp_path / "s.json").read_text())["results"]
    assert sorted((r["session"]["graph_optimization"], r["recommended"]) for r in rows) == [("all", False), ("basic", True)]
    assert all(r["threads"] == 1 for r in rows)  # the stage's threads, not the recommendation's
    missing = rtk("benchmark", bundle, *FAST, "--artifact", "model.ts")
    assert missing.exit_code == 2 and "--artifact model.ts: not in the bundle" in error_line(missing)
