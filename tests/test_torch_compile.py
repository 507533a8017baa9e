"""The torch-compile runtimes: the eager model under torch.compile (Inductor), verified, benchmarked, optimised.

Compiling is the cost here (tens of seconds per graph on a small CPU): the tests reuse the shapes other tests
compile (batches 1, 2 and the 18 held-out images), so within a session Inductor's cache (conftest's
SESSION_INDUCTOR_CACHE) serves them after the first compile.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import cuda_available, error_line, needs_cuda, rtk
from toolkit.core.bundle import Bundle
from toolkit.evaluation import runners
from toolkit.evaluation.runners import RunOptions, Skipped, plan
from toolkit.evaluation.runners.torch_runner import TorchModuleRunner
from toolkit.evaluation.verify import verify_bundle


@pytest.fixture
def fresh_dynamo():
    """Dynamo forgets what this process compiled (an earlier test's graphs would be reused), before and after:
    the test compiles for itself (from Inductor's on-disk cache) and leaves nothing it changed behind."""
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_the_caches_stay_in_the_session_folder():
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir, triton_cache_dir

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] and cache_dir() != default_cache_dir()
    assert not Path(cache_dir()).is_relative_to(Path.home() / ".cache")
    assert Path(triton_cache_dir(0)).is_relative_to(cache_dir()) or os.environ.get("TRITON_CACHE_DIR")


def test_torch_compile_verifies_against_eager(tiny_bundle, tiny_data, tmp_path):
    result = rtk("verify", tiny_bundle, "--images", tiny_data / "val", "--runtime", "eager", "--runtime", "torch-compile",
                 "--threads", "1", "--json", tmp_path / "v.json")
    assert result.exit_code == 0, result.output
    records = {r["runtime"]: r for r in json.loads((tmp_path / "v.json").read_text())["records"]}
    compiled = records["torch-compile"]
    assert compiled["passed"] and compiled["artifact"] == "checkpoint" and compiled["top1_agreement"] == 1.0
    assert compiled["details"]["compile_seconds"] > 0 and "torch.compile" in compiled["details"]["compile"]
    assert list(compiled["details"]["first_call_seconds"]) == ["batch 18"]
    assert "compile_seconds" not in records["eager"]["details"]


def test_benchmark_times_it_with_the_compile_in_its_cold_start(tiny_bundle, tmp_path, fresh_dynamo):
    result = rtk("benchmark", tiny_bundle, "--runtime", "eager", "--runtime", "torch-compile", "--batch-size", "1",
                 "--batch-size", "2", "--warmup", "1", "--iterations", "6", "--min-seconds", "0", "--rounds", "2",
                 "--threads", "1", "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    rows = [r for r in json.loads((tmp_path / "b.json").read_text())["results"] if r["runtime"] == "torch-compile"]
    assert [r["batch_size"] for r in rows] == [1, 2] and all(r["rounds"] == 2 for r in rows)
    for r in rows:
        compile_seconds = r["details"]["compile_seconds"]
        assert r["cold_start_s"] >= compile_seconds > r["p50_ms"] / 1e3  # the first call compiled
        assert r["speedup_vs_eager"] > 0 and len(r["speedup_rounds"]) == 2
    first_calls = rows[0]["details"]["first_call_seconds"]
    assert next(iter(first_calls)) == "batch 1" and first_calls["batch 1"] == rows[0]["details"]["compile_seconds"]


def test_optimize_verifies_and_times_it(optimized):
    _, report = optimized
    rows = [r for r in report["candidates"] if r["runtime"] == "torch-compile"]
    assert len(rows) == 1 and rows[0]["artifact"] == "checkpoint" and rows[0]["status"] == "passed"
    assert rows[0]["b1"]["p50_ms"] > 0 and rows[0]["b2"]["speedup_vs_eager"] > 0
    assert any(r.startswith("torch-compile:checkpoint:") for r in report["ranking"])


def test_a_compiled_module_altered_after_compiling_fails_parity(tiny_bundle, tiny_data, monkeypatch):
    """The gate compares what the compiled module computes: weights zeroed after torch.compile must fail."""
    load = TorchModuleRunner.load

    def altered(self):
        load(self)
        if self.compile:
            self.module._orig_mod.model.fc.weight.data.zero_()

    monkeypatch.setattr(TorchModuleRunner, "load", altered)
    report = verify_bundle(tiny_bundle, images=tiny_data / "val", runtimes=["eager", "torch-compile"], threads=1,
                           echo=lambda s: None, store=False)
    records = {r["runtime"]: r for r in report["records"]}
    assert records["eager"]["passed"] and not records["torch-compile"]["passed"] and not report["passed"]
    assert {"max_abs_diff", "top1_agreement"} <= set(records["torch-compile"]["failed_metrics"])


def test_the_recompile_limit_fails_the_runtime_instead_of_running_eager(tiny_bundle, tiny_data, monkeypatch,
                                                                      fresh_dynamo):
    """Past dynamo's recompile limit torch.compile would run the eager module in silence; verify must say so.
    33 images: batches of 32 and 1, two graphs, with a limit of one."""
    import torch

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    report = verify_bundle(tiny_bundle, images=tiny_data / "val", random_images=15, runtimes=["torch-compile"],
                           threads=1, echo=lambda s: None, store=False)
    (record,) = report["records"]
    assert not record["passed"] and record["failed_metrics"] == ["load"]
    assert "torch-compile failed to run it" in record["details"]["error"]
    assert "recompile limit (1)" in record["details"]["error"]


def test_without_a_cpp_compiler_it_is_skipped(tiny_bundle, monkeypatch):
    from torch._inductor import cpp_builder, exc

    def no_compiler():
        raise exc.InvalidCxxCompiler

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    (entry,) = plan(Bundle.open(tiny_bundle), ["torch-compile"], lambda: None, RunOptions())
    assert isinstance(entry, Skipped) and "C++ compiler" in entry.reason


def test_the_rows(tmp_path):
    for name, device in (("torch-compile", "cpu"), ("torch-compile-cuda", "cuda")):
        row = runners.runtime(name)
        assert (row.device, row.family, row.accepts, row.verify_default) == (device, "torch.compile", None, False)
    assert "torch-compile" not in runners.VERIFY_DEFAULT


@pytest.mark.skipif(cuda_available(), reason="this machine has CUDA: the cuda test below runs it")
def test_torch_compile_cuda_is_skipped_without_cuda(tiny_bundle, tiny_data):
    (entry,) = plan(Bundle.open(tiny_bundle), ["torch-compile-cuda"], lambda: None, RunOptions())
    assert isinstance(entry, Skipped) and entry.reason == "torch.cuda.is_available() is False"
    result = rtk("verify", tiny_bundle, "--images", tiny_data / "val", "--runtime", "torch-compile-cuda")
    assert result.exit_code == 2
    assert "torch-compile-cuda is not available here: torch.cuda.is_available() is False" in error_line(result)


@needs_cuda
def test_torch_compile_cuda_verifies_and_benchmarks(tiny_bundle, tiny_data, tmp_path):
    if shutil.which("nvidia-smi") is None and runners.runtime("torch-compile-cuda").unavailable():
        pytest.skip(runners.runtime("torch-compile-cuda").unavailable())
    result = rtk("verify", tiny_bundle, "--images", tiny_data / "val", "--runtime", "eager-cuda",
                 "--runtime", "torch-compile-cuda", "--json", tmp_path / "v.json")
    assert result.exit_code == 0, result.output
    result = rtk("benchmark", tiny_bundle, "--runtime", "eager-cuda", "--runtime", "torch-compile-cuda",
                 "--batch-size", "2", "--warmup", "2", "--iterations", "5", "--min-seconds", "0", "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    rows = [r for r in json.loads((tmp_path / "b.json").read_text())["results"] if r["runtime"] == "torch-compile-cuda"]
    assert rows and rows[0]["cold_start_s"] >= rows[0]["details"]["compile_seconds"] > rows[0]["p50_ms"] / 1e3
    assert rows[0]["cuda_peak_allocated_mb"] > 0
