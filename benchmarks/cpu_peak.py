"""This CPU's matrix-multiply peak, the resnet50 floor it implies, and OpenVINO's benchmark_app next to rtk.

    python benchmarks/cpu_peak.py BUNDLE [--threads N] [--seconds S] [--rounds R] [--tag NAME]

- fp32 and int8 (u8 x s8 -> s32) matrix products of 2048 x 2048 through onnxruntime (MatMul, MatMulInteger)
  and through OpenVINO (MatMul; FakeQuantize'd MatMul, which its CPU plugin runs as a u8 x s8 FullyConnected),
  best of several calls: GFLOP/s and GOP/s;
- the instruction ceiling (benchmarks/isa_peak.c: one dot-product instruction back to back on every thread,
  no memory traffic), which no kernel can pass;
- the floor for resnet50 at 224 px (4.1 GMAC = 8.2 GOP per image) at the best matmul peak and at the ceiling;
- `benchmark_app -hint latency` on BUNDLE/model.onnx (f32, and bf16 where the CPU has it) and on NNCF's int8
  IR (when the bundle has one) at batch 1, against rtk's OpenVINO runner on the same files and shape, the
  three timed in alternating rounds (a drifting host would otherwise decide the ratio).
Writes benchmarks/results/cpu_peak-<tag>.md.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.core.bundle import Bundle  # noqa: E402
from toolkit.core.hardware import cpu_info, usable_cpus  # noqa: E402
from toolkit.core.tables import render  # noqa: E402
from toolkit.evaluation.benchmark import time_runner  # noqa: E402
from toolkit.evaluation.runners import Runner, RunOptions, plan  # noqa: E402

RESNET50_GOP = 2 * 4.1  # multiply-adds per 224 px image, as operations


def matmul_peak(n: int, threads: int, int8: bool, calls: int = 20) -> float:
    """Best throughput of an n x n x n product in onnxruntime, in G(FL)OP/s."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if int8:
        node = helper.make_node("MatMulInteger", ["a", "b"], ["c"])
        inputs = [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
                  helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])]
        out = helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])
        feed = {"a": np.random.randint(0, 255, (n, n), dtype=np.uint8), "b": np.random.randint(-127, 127, (n, n), dtype=np.int8)}
    else:
        node = helper.make_node("MatMul", ["a", "b"], ["c"])
        inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"]
        out = helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])
        feed = {x: np.random.rand(n, n).astype(np.float32) for x in "ab"}
    model = helper.make_model(helper.make_graph([node], "mm", inputs, [out]), opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString() if isinstance(model, onnx.ModelProto) else model, so,
                                   providers=["CPUExecutionProvider"])
    return 2 * n**3 / fastest_call(lambda: session.run(None, feed), calls) / 1e9


def openvino_matmul_peak(n: int, threads: int, int8: bool, calls: int = 20) -> float | None:
    """Best throughput of an n x n x n product in OpenVINO's CPU plugin, in G(FL)OP/s; None without openvino.
    int8: both operands pass FakeQuantize (u8 activations, s8 weights), which the plugin turns into an int8
    FullyConnected, as it does for NNCF's IRs."""
    try:
        import openvino as ov
        import openvino.opset13 as ops
    except ImportError:
        return None
    a = ops.parameter([n, n], np.float32, name="a")
    w = ops.constant(np.random.randint(-127, 127, (n, n)).astype(np.float32))
    if int8:
        c = [ops.constant(np.float32(v)) for v in (0, 255, -127, 127)]
        a_in = ops.fake_quantize(a, c[0], c[1], c[0], c[1], 256)
        w = ops.fake_quantize(w, c[2], c[3], c[2], c[3], 255)
    else:
        a_in = a
    compiled = ov.Core().compile_model(ov.Model([ops.matmul(a_in, w, False, False)], [a]), "CPU",
                                       {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    x = np.random.randint(0, 255, (n, n)).astype(np.float32)
    return 2 * n**3 / fastest_call(lambda: request.infer([x]), calls) / 1e9


def isa_ceiling(threads: int) -> dict[str, tuple[str, float]]:
    """{precision: (instruction, ops per second)} from benchmarks/isa_peak.c built for this CPU; empty
    without gcc or when it does not build here (another architecture)."""
    import tempfile

    gcc = shutil.which("gcc")
    if gcc is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "isa_peak"
        built = subprocess.run([gcc, "-O2", "-march=native", "-pthread", str(ROOT / "benchmarks" / "isa_peak.c"), "-o",
                                str(exe)], capture_output=True, text=True)
        if built.returncode != 0:
            print(f"isa_peak.c did not build: {built.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return {}
        out = subprocess.run([str(exe), str(threads)], capture_output=True, text=True, check=True, timeout=300).stdout
    found = {}
    for line in out.splitlines():
        name, value = line.split()
        found[name.split("-")[0]] = (name, float(value))
    return found


def fastest_call(call, calls: int) -> float:
    """Seconds of the fastest of `calls` timed calls, after one untimed call."""
    call()
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return best


def benchmark_app(model: Path, precision: str, seconds: int, dynamic_batch: bool) -> tuple[float | None, str]:
    exe = shutil.which("benchmark_app") or str(Path(sys.executable).parent / "benchmark_app")
    if not Path(exe).exists():
        return None, "benchmark_app not found (pip install openvino)"
    # -hint latency takes every core of this process's affinity (benchmark_app refuses -nthreads with a hint);
    # rtk is run with the same count
    # -infer_precision: OpenVINO's CPU default is bf16 where the CPU has it; each of rtk's runtimes names its own
    # -shape [1,...] compiles a static batch of 1; [?,...] keeps the batch dynamic, as a bundle's files (and rtk) do
    shape = "[?,224,224,3]" if dynamic_batch else "[1,224,224,3]"
    cmd = [exe, "-m", str(model), "-d", "CPU", "-hint", "latency", "-shape", shape, "-data_shape", "[1,224,224,3]",
           "-t", str(seconds), "-infer_precision", precision]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    found = re.search(r"Median:\s+([\d.]+) ms", proc.stdout)
    return (float(found.group(1)) if found else None), " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))


def against_benchmark_app(bundle: Path, runtime: str, artifact: str, precision: str, threads: int, seconds: int,
                          rounds: int, seed: int = 0) -> dict[str, object]:
    """rtk's runner for (runtime, artifact) and benchmark_app at dynamic and static batch 1 on the same file, in
    `rounds` rounds, each in a new shuffled order: each tool's p50 (benchmark_app's median) per round, and the
    benchmark_app commands. rtk's session stays open across rounds, idle while benchmark_app runs."""
    entries = [e for e in plan(Bundle.open(bundle), [runtime], None, RunOptions(threads=threads)) if e.artifact == artifact]
    if len(entries) != 1 or not isinstance(entries[0], Runner):
        raise SystemExit(f"rtk cannot run {artifact} on {runtime} here: {entries}")
    runner = entries[0]
    runner.load()
    prepared = runner.prepare(np.random.default_rng(seed).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8))
    times: dict[str, object] = {"rtk": [], "dynamic": [], "static": []}
    order = np.random.default_rng(seed)
    try:
        for _ in range(rounds):
            for tool in order.permutation(["rtk", "dynamic", "static"]):
                if tool == "rtk":
                    samples = time_runner(runner.run_prepared, prepared, 10, 20, seconds)
                    times["rtk"].append(float(np.median(samples)) * 1e3)
                else:
                    ms, times[f"command_{tool}"] = benchmark_app(bundle / artifact, precision, seconds, tool == "dynamic")
                    if ms is None:
                        raise SystemExit(f"benchmark_app gave no median: {times[f'command_{tool}']}")
                    times[tool].append(ms)
    finally:
        runner.release()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--threads", type=int, default=usable_cpus())
    parser.add_argument("--seconds", type=int, default=5, help="per tool and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tag", default=None)
    args = parser.parse_args()
    cpu = cpu_info()
    tag = args.tag or cpu.tag
    peaks = [("fp32", "onnxruntime MatMul", matmul_peak(2048, args.threads, int8=False)),
             ("fp32", "OpenVINO MatMul", openvino_matmul_peak(2048, args.threads, int8=False)),
             ("int8", "onnxruntime MatMulInteger u8 x s8", matmul_peak(2048, args.threads, int8=True)),
             ("int8", "OpenVINO FakeQuantize'd MatMul (u8 x s8 FullyConnected)", openvino_matmul_peak(2048, args.threads, int8=True))]
    bundle = Path(args.bundle)
    # (precision hint, rtk runtime, file): what benchmark_app and rtk both run
    pairs = [("f32", "openvino", "model.onnx")] + ([("bf16", "openvino-bf16", "model.onnx")] if cpu.fast_bf16 else [])
    for ir in ("model.openvino-int8.xml", "model.openvino-int8-ac.xml"):
        if (bundle / ir).is_file():
            pairs.append(("f32", "openvino", ir))
    rows, verdicts = [], []
    for precision, runtime, artifact in pairs:
        timed = against_benchmark_app(bundle, runtime, artifact, precision, args.threads, args.seconds, args.rounds)
        ratios = np.asarray(timed["rtk"]) / np.asarray(timed["dynamic"])
        mine = float(np.median(timed["rtk"]))
        rows.append([f"`rtk benchmark --runtime {runtime}` timing on {artifact} (dynamic batch, {args.threads} threads)",
                     f"{mine:.2f}", " ".join(f"{x:.2f}" for x in timed["rtk"]), "1.000"])
        for dynamic in (True, False):
            app = timed["dynamic" if dynamic else "static"]
            rows.append([f"`{timed['command_' + ('dynamic' if dynamic else 'static')]}`", f"{np.median(app):.2f}",
                         " ".join(f"{x:.2f}" for x in app), f"{mine / np.median(app):.3f}"])
        ratio = float(np.median(ratios))  # like for like: the bundle's files keep a dynamic batch
        verdicts.append(f"- {artifact}, {precision}: rtk / benchmark_app (dynamic batch), median of the {args.rounds} "
                        f"rounds' ratios = {ratio:.3f} (rounds {' '.join(f'{x:.3f}' for x in ratios)}; "
                        f"{'within' if abs(ratio - 1) <= 0.10 else 'NOT within'} 10%)")
    best = {p: max(v for q, _, v in peaks if q == p and v) for p in ("fp32", "int8")}
    ceiling = isa_ceiling(args.threads)
    lines = [f"# CPU peak and the OpenVINO reference: {cpu.name}, {args.threads} threads", "",
             f"Flags: AVX2 {('avx2' in cpu.flags)}, AVX-512 {cpu.avx512}, VNNI {cpu.vnni}, AVX512-BF16 {cpu.avx512_bf16}, "
             f"AMX {cpu.amx}. `python benchmarks/cpu_peak.py {args.bundle}`.", "",
             render(["what", "measured", "resnet50 floor (8.2 GOP per image)"], [
                 [f"{p} matmul 2048^3 ({how})", f"{v:.0f} G{'FL' if p == 'fp32' else ''}OP/s" if v else "not measured",
                  f"{RESNET50_GOP / v * 1e3:.1f} ms" if v else "-"] for p, how, v in peaks]
                + [[f"{p} instruction ceiling ({name}, {args.threads} threads, isa_peak.c)", f"{v / 1e9:.0f} G{'FL' if p == 'fp32' else ''}OP/s",
                    f"{RESNET50_GOP / v * 1e12:.1f} ms"] for p, (name, v) in sorted(ceiling.items())], "markdown"), "",
             f"Floor at the best measured peak: fp32 {RESNET50_GOP / best['fp32'] * 1e3:.1f} ms, "
             f"int8 {RESNET50_GOP / best['int8'] * 1e3:.1f} ms per resnet50 image (every MAC at peak; real layers fall short)."
             + ("".join(f" At the {p} instruction ceiling: {RESNET50_GOP / v * 1e12:.1f} ms." for p, (_, v) in sorted(ceiling.items()))
                + " No kernel on this CPU can run resnet50 faster than that." if ceiling else ""), "",
             "## OpenVINO on the same files and shape (batch 1), same run", "",
             render(["tool", "median of rounds ms", "each round's p50 / median ms", "rtk / this"], rows, "markdown"), "",
             "benchmark_app with `-shape [1,...]` compiles a static batch of 1; with `[?,...]` it keeps the batch "
             "dynamic, as the bundle's files do and rtk compiles them (one compiled model for every batch size); "
             f"like for like is the dynamic row. The three are timed in {args.rounds} rounds of {args.seconds} s each, "
             "in a new shuffled order each round, so a slowdown of the host hits all three alike.", ""] + verdicts
    out = ROOT / "benchmarks" / "results" / f"cpu_peak-{tag}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
