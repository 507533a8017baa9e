"""Mutation testing (`make mutate`): small deliberate bugs in the modules where a silent bug would break the
proof, each run against the fast tests of its module; a mutant the tests do not notice is a survivor.

    python benchmarks/mutate.py [--module NAME ...] [--jobs N] [--list] [--out PATH]

Mutants (AST, one at a time, only inside the functions named in TARGETS): comparison flips (< <=, == !=, in /
not in, is / is not), arithmetic and boolean operator swaps, integer constants + 1 (floats doubled), negated
if/while/ternary conditions, `return x` -> `return None`, a removed `raise` (-> pass) and a removed expression
statement (a call or an await whose effect is the point). Each mutant's module is written into a private copy
of the repository and its tests run there (`pytest -x`), with a timeout of 3x the unmutated run + 10 s: a
failure, an error or a timeout kills it. Survivors are listed in the report, each with the reason it cannot be
killed (EQUIVALENT) or as a gap to close. Writes benchmarks/results/mutate-<cpu tag>.md (or --out).

Why our own and not mutmut or cosmic-ray: mutmut 3 rewrites every function of a module into a trampoline and
needs its own layout (mutants/ beside the sources); cosmic-ray needs a session database and a per-module test
command anyway. Both would mutate whole modules, far beyond the 30-minute budget of a 2-CPU machine with
torch-importing tests; this file is the few operators that matter, over chosen functions.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Target:
    path: str  # the module, relative to the repository
    functions: tuple[str, ...]  # qualified names (Class.method) whose bodies are mutated
    tests: tuple[str, ...]  # pytest arguments: the fast tests that guard them


INTEGRITY_TESTS = ("tests/test_integrity.py", "-k", "not verify_refuses")
VERIFY_UNIT = tuple(f"tests/test_verify.py::{t}" for t in (
    "test_difference_metrics", "test_cosine_min", "test_top1_and_top5_agreement", "test_accuracy_and_atol_needed",
    "test_gates_by_precision", "test_metrics_of_nothing_and_of_zero_vectors", "test_atol_needed_with_a_relative_tolerance",
    "test_a_non_finite_output_fails", "test_the_any_size_tolerance_is_inclusive",
    "test_only_int8_is_judged_against_the_accuracy_drop_bound")) + ("tests/test_any_size.py::test_the_any_size_gate",) + (
    ("tests/test_gates.py", "-k", "not rtk_verify and not negative_margin") if (ROOT / "tests/test_gates.py").exists() else ())
TARGETS = {
    "bundle": Target("toolkit/core/bundle.py", (
        "takes_any_size", "Bundle.files", "Bundle.confined", "Bundle.labels", "Bundle.any_size",
        "Bundle.integrity_problem", "Bundle._file_problem", "Bundle.check_file"), INTEGRITY_TESTS),
    "formats": Target("toolkit/core/formats.py", ("row", "of_format", "file_name"),
                      (*INTEGRITY_TESTS, "tests/test_formats.py")),
    "manifest": Target("toolkit/core/manifest.py", (
        "_check", "check_plain_name", "preprocess_spec", "FileEntry.from_dict", "Manifest.from_dict"), INTEGRITY_TESTS),
    "verify gates": Target("toolkit/evaluation/verify.py", (
        "max_abs_diff", "max_rel_diff", "mean_abs_diff", "cosine_min", "topk_sets", "top1_agreement", "top5_agreement",
        "accuracy", "atol_needed", "compare",
        *(f for f in ("logit_scale", "decisive", "near_tie_flips", "accuracy_pairs", "top1_gate")
          if f"def {f}(" in (ROOT / "toolkit/evaluation/verify.py").read_text())), VERIFY_UNIT),
    "any-size graph": Target("toolkit/export/graph.py", (
        "Preprocess.__init__", "Preprocess.forward", "_axis_weights", "_round_half_even_half", "_to_uint8_levels",
        "ResizeCenterCrop.forward"),
        ("tests/test_any_size.py::test_the_graph_crops_ties_where_torchvision_does",
         "tests/test_any_size.py::test_in_graph_weights_are_on_pillows_fixed_point_grid",
         "tests/test_any_size.py::test_black_and_white_survive_the_in_graph_resize",
         "tests/test_preprocess.py::test_the_graph_normalisation_is_torchvisions")),
    "server batcher and codec": Target("toolkit/serving/server.py", (
        "Batcher.stop", "Batcher.submit", "Batcher._next", "Batcher._loop", "Batcher._call", "parse_infer",
        "_split_binary", "uint8_data", "_binary_images", "_parameters", "_outputs", "infer_response"),
        ("tests/test_server_units.py",)),
    "self-test": Target("toolkit/serving/classifier.py", (
        "softmax", "Classifier.self_test", "Classifier.top_k", "read_selftest", "_npy_bytes"),
        ("tests/test_selftest_units.py",)),
    "benchmark statistics": Target("toolkit/evaluation/benchmark.py", (
        "latency_stats", "time_runner", "add_speedups", "round_ratios"),
        ("tests/test_benchmark.py", "-k", "latency_stats or time_runner or speedups_against")),
    "preprocess": Target("toolkit/core/preprocess.py", (  # what makes host crops torchvision's, byte for byte
        "resized_size", "_crop_origin", "resize_crop", "region_resize_crop", "_vertical_first", "_axis_taps",
        "_apply_taps"),
        ("tests/test_preprocess.py", "tests/test_decode_bounds.py", "-k",
         "not sixteen_bit and not long_thin_png_is_refused and not banded and not deep_greyscale")),
}

# Survivors that no test can kill: the mutant computes the same thing. Key: (module, function, description).
EQUIVALENT: dict[tuple[str, str, str], str] = {
    ("bundle", "Bundle.labels", "`LABELS_MAX_BYTES + 1` -> `LABELS_MAX_BYTES + 2`"):
        "equivalent: the size was checked <= LABELS_MAX_BYTES just before, so reading 1 or 2 bytes more reads the same whole file",
    ("verify gates", "cosine_min", "`den > 0` -> `den >= 0`"):
        "equivalent for the inner guard (the outer one is killed): a zero divisor there yields a value the outer "
        "np.where discards",
    ("verify gates", "cosine_min", "`np.where(den > 0, den, 1)` -> `np.where(den > 0, den, 2)`"):
        "equivalent: only a safe divisor where den == 0, and those rows take the outer np.where's value",
    ("verify gates", "compare", "`m['accuracy_change'] < -gates.int8_max_accuracy_drop - 1e-12` -> "
                                "`m['accuracy_change'] <= -gates.int8_max_accuracy_drop - 1e-12`"):
        "equivalent: an accuracy change exactly at the bound minus the 1e-12 slack is not a difference of two ratios",
    ("verify gates", "compare", "`-gates.int8_max_accuracy_drop - 1e-12` -> `-gates.int8_max_accuracy_drop - 2e-12`"):
        "equivalent: the slack absorbs float rounding (~1e-17) of a difference of two ratios; any slack far below "
        "1/images gives the same verdicts",
    ("verify gates", "logit_scale", "`max(1.0, float(np.abs(ref).max())) if ref.size else 1.0` -> "
                                    "`max(1.0, float(np.abs(ref).max())) if ref.size else 2.0`"):
        "equivalent: an empty reference has no image a tolerance could fail",
    ("any-size graph", "_to_uint8_levels", "`torch.clamp(torch.floor(x + 0.5), 0.0, 255.0)` -> "
                                           "`torch.clamp(torch.floor(x + 0.5), 0.0, 510.0)`"):
        "equivalent: bilinear weights are >= 0 and sum to 1 (within 2^-22 per tap), so a pass never exceeds 255.5",
    ("server batcher and codec", "Batcher._loop", "`remaining > 0` -> `remaining >= 0`"):
        "equivalent: with exactly 0 s left, wait_for(get(), 0) times out before get() runs, as the skipped call would",
    ("server batcher and codec", "uint8_data", "`raise BadRequest(f\"input 'image' data is ragged; it must be flat or "
                                               "nested as shape {sh...` -> `pass`"):
        "unreachable with numpy >= 1.24: asarray(dtype=object) makes ragged lists an object array (caught by the next "
        "check) instead of raising; kept for older numpy",
    ("server batcher and codec", "infer_response", "`-1` -> `-2`"):
        "equivalent: numpy's reshape takes any negative size as the one to infer",
    ("self-test", "_npy_bytes", "`10000` -> `10001`"):
        "not killed: a defensive cap on an .npy header's size (np.savez writes 128 bytes); no test crafts a header of "
        "exactly 10,001 bytes",
    ("preprocess", "resized_size", "`w <= h` -> `w < h`"):
        "equivalent: the branches differ only for a square image, where both give (resize_size, resize_size)",
    ("preprocess", "resize_crop", "`full_resize_cost(img.size, new_size) <= FULL_RESIZE_BUDGET` -> "
                                  "`full_resize_cost(img.size, new_size) < FULL_RESIZE_BUDGET`"):
        "equivalent: at exactly the budget the region path is taken instead, and it gives the same bytes",
    ("preprocess", "_axis_taps", "`int(math.ceil(support)) * 2 + 1` -> `int(math.ceil(support)) * 2 + 2`"):
        "equivalent: ksize is the buffer width; columns beyond each pixel's `taps` are masked to weight 0",
    ("preprocess", "_axis_taps", "`int(math.ceil(support)) * 2` -> `int(math.ceil(support)) * 3`"):
        "equivalent: a wider buffer, its extra columns masked to weight 0",
    ("preprocess", "_axis_taps", "`w < 0` -> `w <= 0`"):
        "equivalent: a zero weight truncates to 0 from -0.5 as from +0.5",
    ("preprocess", "_axis_taps", "`total[:, None] != 0.0` -> `total[:, None] != 1.0`"):
        "equivalent: dividing by a total of 1.0, or (for 0.0) by the guard's 1.0, leaves the weights as they are",
    ("preprocess", "_axis_taps", "`np.where(total == 0.0, 1.0, total)` -> `np.where(total == 0.0, 2.0, total)`"):
        "equivalent: the guard's value is used only where total == 0, and the outer np.where discards it there",
    ("preprocess", "_axis_taps", "`center - support + 0.5` -> `center - support - 0.5`"):
        "not killed: starts each window one pixel earlier, on a tap the filter weighs 0 (|x| >= support); it would "
        "show only if the extra tap pushed the last one past ksize, which the tests' sizes do not reach",
    ("preprocess", "_axis_taps", "`total == 0.0` -> `total == 1.0`"):
        "equivalent: a guard divisor of 1.0 for a total of 1.0 is the total itself; a zero total keeps its zero weights",
    ("preprocess", "_axis_taps", "`center + support + 0.5` -> `center + support + 1.0`"):
        "not killed: may end a window one pixel later, on a tap the filter weighs 0; as for the window start above",
    ("preprocess", "resize_crop", "`new_size[0]` -> `new_size[1]`"):
        "not killed: only the width printed in the nearest-interpolation refusal's message",
    ("benchmark statistics", "latency_stats", "`mean > 0` -> `mean >= 0`"):
        "equivalent: with a zero mean images_per_second, computed before cv, already divides by zero",
    ("benchmark statistics", "time_runner", "`time.perf_counter() - start < min_seconds` -> "
                                            "`time.perf_counter() - start <= min_seconds`"):
        "equivalent: a clock reading exactly equal to the budget is one point of a continuous time",
}

COMPARE_FLIPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                 ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
BINOP_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
               ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd,
               ast.LShift: ast.RShift, ast.RShift: ast.LShift}
BOOL_SWAPS = {ast.And: ast.Or, ast.Or: ast.And}


@dataclass
class Mutant:
    module: str
    function: str
    site: int  # the site's index among the function's mutation sites: how it is found again
    line: int
    description: str
    outcome: str = ""  # killed, timeout, survived
    seconds: float = 0.0
    detail: str = field(default="", repr=False)


def _functions(tree: ast.Module, names: tuple[str, ...]) -> Iterator[tuple[str, ast.AST]]:
    """(qualified name, node) of each named function or method, in `names` order."""
    found: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found[f"{node.name}.{item.name}"] = item
    for name in names:
        if name not in found:
            raise SystemExit(f"mutate.py: no function {name} in the module (TARGETS is out of date)")
        yield name, found[name]


def _changed(value: int | float) -> int | float:
    """An integer + 1; a float doubled (1.0 for 0.0)."""
    return value + 1 if type(value) is int else (value * 2 if value else 1.0)


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _sites(function: ast.AST) -> list[tuple[ast.AST, callable]]:
    """Every mutation of one function as (node shown, apply): `apply()` changes the tree in place and returns
    the mutated node to show. Order is ast.walk's, so a fresh parse gives the same list."""
    sites: list = []
    annotations = {id(n) for a in ast.walk(function) for part in _annotations(a) for n in ast.walk(part)}
    parents = {id(child): node for node in ast.walk(function) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(function):
        if id(node) in annotations:  # `str | None` in a signature is never evaluated (postponed annotations)
            continue
        if isinstance(node, ast.Compare):
            for j, op in enumerate(node.ops):
                if type(op) in COMPARE_FLIPS:
                    sites.append((node, lambda n=node, j=j: (n.ops.__setitem__(j, COMPARE_FLIPS[type(n.ops[j])]()), n)[1]))
        elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in BINOP_SWAPS:
            sites.append((node, lambda n=node: (setattr(n, "op", BINOP_SWAPS[type(n.op)]()), n)[1]))
        elif isinstance(node, ast.BoolOp):
            sites.append((node, lambda n=node: (setattr(n, "op", BOOL_SWAPS[type(n.op)]()), n)[1]))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            shown = parents.get(id(node), node)  # `x + 1` -> `x + 2` says more than `1` -> `2`
            shown = shown if isinstance(shown, ast.expr) and not isinstance(shown, ast.JoinedStr) else node
            sites.append((shown, lambda n=node, s=shown: (setattr(n, "value", _changed(n.value)), s)[1]))
        if isinstance(node, (ast.If, ast.While, ast.IfExp)):
            sites.append((node.test, lambda n=node: (setattr(n, "test", ast.UnaryOp(ast.Not(), n.test)), n.test)[1]))
        if isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            sites.append((node, lambda n=node: (setattr(n, "value", ast.Constant(None)), n)[1]))
        for name in ("body", "orelse", "finalbody"):
            body = getattr(node, name, None)
            if not isinstance(body, list):
                continue
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.Raise) or (isinstance(stmt, ast.Expr) and not _is_docstring(stmt)):
                    sites.append((stmt, lambda b=body, i=i: (b.__setitem__(i, ast.Pass()), b[i])[1]))
    return sites


def _annotations(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.arg):
        return [node.annotation] if node.annotation else []
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return [node.returns] if node.returns else []
    return [node.annotation] if isinstance(node, ast.AnnAssign) else []


def _show(node: ast.AST) -> str:
    text = " ".join(ast.unparse(node).split())
    return text if len(text) <= 90 else text[:87] + "..."


def enumerate_mutants(key: str, target: Target) -> list[Mutant]:
    source = (ROOT / target.path).read_text()
    mutants = []
    for name, function in _functions(ast.parse(source), target.functions):
        for i, (node, _) in enumerate(_sites(function)):
            mutated_tree = ast.parse(source)
            _, fresh = next(f for f in _functions(mutated_tree, (name,)))
            shown, apply = _sites(fresh)[i]
            before = _show(shown)
            after = _show(apply())
            mutants.append(Mutant(key, name, i, getattr(node, "lineno", 0), f"`{before}` -> `{after}`"))
    return mutants


def mutated_source(target: Target, mutant: Mutant) -> str:
    tree = ast.parse((ROOT / target.path).read_text())
    _, function = next(_functions(tree, (mutant.function,)))
    _sites(function)[mutant.site][1]()
    return ast.unparse(ast.fix_missing_locations(tree))


# ---------------------------------------------------------------- running


def _copy_repo(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", ".venv", "artifacts", "build", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".ruff_cache", "results")
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def _env(repo: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(repo), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


PRELOAD = ("numpy", "PIL.Image", "pytest", "click", "torch", "torchvision", "onnx", "onnxruntime", "fastapi",
           "starlette", "uvicorn", "prometheus_client", "hypothesis", "sklearn.datasets")


def worker(repo: str) -> None:
    """A test process for one repository copy: imports the heavy libraries once, then per request (a JSON
    line on stdin) forks a child that runs pytest on the copy's (possibly mutated) code; answers one JSON
    line. toolkit itself is imported by each child only, so every mutant is read fresh."""
    import importlib
    import json
    import signal

    sys.path[:] = [repo] + [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    os.chdir(repo)
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    out = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        log = Path(repo) / ".mutate.log"
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: pytest's output to the log, its exit status to the parent
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            import pytest

            code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", *request["tests"]])
            sys.stdout.flush()
            os._exit(int(code))
        result = "timeout"
        while time.perf_counter() - start < request["timeout"]:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                result = {0: "passed", 5: "no tests"}.get(code, "failed")
                break
            time.sleep(0.02)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-5:]) if log.exists() else ""
        out.write(json.dumps({"result": result, "seconds": time.perf_counter() - start, "tail": tail}) + "\n")
        out.flush()


class Worker:
    """A running `worker` process for one repository copy."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", str(repo)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=_env(repo))

    def run_tests(self, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
        """('passed' | 'failed' | 'timeout', seconds, the output's tail)."""
        import json

        self.proc.stdin.write(json.dumps({"tests": list(tests), "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        if answer["result"] == "no tests":
            raise SystemExit(f"mutate.py: no tests collected for {tests}: TARGETS is out of date\n{answer['tail']}")
        return answer["result"], answer["seconds"], answer["tail"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Workers:
    """One private copy of the repository per job; a mutant is written into its copy, tested, then undone."""

    def __init__(self, jobs: int, scratch: Path) -> None:
        self.free = [Worker(_copy_repo(scratch / f"repo{i}")) for i in range(jobs)]
        check = subprocess.run([sys.executable, "-c", "import toolkit; print(toolkit.__file__)"], cwd=self.free[0].repo,
                               env=_env(self.free[0].repo), capture_output=True, text=True, check=True).stdout.strip()
        if not check.startswith(str(self.free[0].repo)):
            raise SystemExit(f"mutate.py: the copy imports {check}, not its own toolkit: mutants would not be tested")

    def run(self, target: Target, mutant: Mutant, timeout: float) -> Mutant:
        worker = self.free.pop()
        path = worker.repo / target.path
        original = path.read_text()
        try:
            path.write_text(mutated_source(target, mutant))
            result, mutant.seconds, mutant.detail = worker.run_tests(target.tests, timeout)
            mutant.outcome = {"passed": "survived", "failed": "killed", "timeout": "timeout"}[result]
        finally:
            path.write_text(original)
            self.free.append(worker)
        return mutant

    def close(self) -> None:
        for worker in self.free:
            worker.close()


def run_module(workers: Workers, key: str, mutants: list[Mutant], jobs: int) -> None:
    """The module's unmutated tests (they must pass; their time sets the timeout), then each of its mutants."""
    result, seconds, tail = workers.free[0].run_tests(TARGETS[key].tests, 600)
    if result != "passed":  # nothing to learn from mutants of code whose tests fail already
        print(f"{key}: SKIPPED, its unmutated tests fail:\n{tail}", flush=True)
        for m in mutants:
            m.outcome = "not run"
        return
    timeout = 3 * seconds + 10
    print(f"{key}: {len(mutants)} mutants ({sum(not m.outcome for m in mutants)} to run), unmutated tests "
          f"{seconds:.1f} s", flush=True)
    todo = [m for m in mutants if not m.outcome]
    with ThreadPoolExecutor(jobs) as pool:
        for done, m in enumerate(pool.map(lambda m: workers.run(TARGETS[key], m, timeout), todo), 1):
            if m.outcome == "survived":
                print(f"[{done}/{len(todo)}] SURVIVED {key} {m.function} line {m.line}: {m.description}", flush=True)
            elif done % 50 == 0:
                print(f"[{done}/{len(todo)}]", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", choices=sorted(TARGETS), help="only these (repeatable)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument("--out", default=None)
    parser.add_argument("--survivors", action="store_true",
                        help="rerun only the stored survivors of each module (after adding tests); the others keep "
                             "their stored outcome")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    keys = args.module or list(TARGETS)
    mutants = {key: enumerate_mutants(key, TARGETS[key]) for key in keys}
    if args.list:
        for key in keys:
            for m in mutants[key]:
                print(f"{key}\t{m.function}\tline {m.line}\t{m.description}")
        print(f"{sum(map(len, mutants.values()))} mutants", file=sys.stderr)
        return
    from toolkit.core.hardware import cpu_info

    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"mutate-{cpu_info().tag}.md"
    if args.survivors:
        mutants = _stored_survivors(out.with_suffix(".json"), mutants)
    with tempfile.TemporaryDirectory(prefix="rtk-mutate-") as scratch:
        workers = Workers(args.jobs, Path(scratch))
        try:
            for key in keys:  # each module's results are stored as soon as it is done
                start = time.perf_counter()
                run_module(workers, key, mutants[key], args.jobs)
                state = _merge(out.with_suffix(".json"), [key], mutants, time.perf_counter() - start, args.jobs,
                               args.survivors)
                out.write_text(render(state))
        finally:
            workers.close()
    print(out.read_text())
    print(f"wrote {out} and {out.with_suffix('.json').name}")
    total = [m for module in state["modules"].values() for m in module["mutants"]]
    killed = sum(m["outcome"] in ("killed", "timeout") for m in total)
    sys.exit(0 if killed >= 0.9 * len(total) else 1)


def _stored_survivors(path: Path, mutants: dict[str, list[Mutant]]) -> dict[str, list[Mutant]]:
    """Each module's mutants with the stored outcome set, the stored survivors (and mutants not stored yet)
    left to run. Tests were only added since: a mutant they killed stays killed."""
    import json

    stored = json.loads(path.read_text())["modules"] if path.exists() else {}
    for key, ms in mutants.items():
        known = {(m["function"], m["description"]): m["outcome"] for m in stored.get(key, {}).get("mutants", [])}
        for m in ms:
            if known.get((m.function, m.description), "survived") != "survived":
                m.outcome = known[(m.function, m.description)]
    return mutants


def _merge(path: Path, keys: list[str], mutants: dict[str, list[Mutant]], wall: float, jobs: int,
           survivors_only: bool = False) -> dict:
    """The stored results with this run's modules replaced: a module rerun alone updates its own rows."""
    import json

    state = json.loads(path.read_text()) if path.exists() else {"modules": {}}
    run = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": round(wall, 1), "jobs": jobs,
           "modules": keys, "load_average": round(os.getloadavg()[0], 1), "survivors_only": survivors_only}
    state.setdefault("runs", []).append(run)
    for key in keys:
        state["modules"][key] = {"path": TARGETS[key].path, "run": run["date"], "mutants": [
            {"function": m.function, "line": m.line, "description": m.description, "outcome": m.outcome,
             "seconds": round(m.seconds, 2)} for m in mutants[key]]}
    state["modules"] = {k: state["modules"][k] for k in TARGETS if k in state["modules"]}
    path.write_text(json.dumps(state, indent=1) + "\n")
    return state


def render(state: dict) -> str:
    from toolkit.core.hardware import cpu_info

    cpu = cpu_info()
    rows, survivors = [], []
    for key, module in state["modules"].items():
        ms = module["mutants"]
        killed = sum(m["outcome"] == "killed" for m in ms)
        timed_out = sum(m["outcome"] == "timeout" for m in ms)
        alive = [m for m in ms if m["outcome"] == "survived"]
        equivalent = [m for m in alive if (key, m["function"], m["description"]) in EQUIVALENT]
        rate = (killed + timed_out) / len(ms) if ms else 1.0
        rows.append(f"| {key} | `{module['path']}` | {len(ms)} | {killed} | {timed_out} | {len(alive)} "
                    f"({len(equivalent)} explained) | {100 * rate:.1f}% | {module['run']} |")
        survivors += [(key, m) for m in alive]
        if any(m["outcome"] == "not run" for m in ms):
            rows[-1] = f"| {key} | `{module['path']}` | {len(ms)} | not run: its unmutated tests fail | | | 0% | {module['run']} |"
    every = [m for module in state["modules"].values() for m in module["mutants"]]
    dead = sum(m["outcome"] in ("killed", "timeout") for m in every)
    runs = [f"- {r['date']}: {', '.join(r['modules'])}{' (--survivors: the stored survivors only)' if r.get('survivors_only') else ''}: "
            f"{r['wall_s'] / 60:.1f} min wall with --jobs {r['jobs']} "
            f"(load average {r['load_average']} on {cpu.usable_cpus} CPUs at the end)" for r in state.get("runs", [])]
    lines = [f"# Mutation testing: {dead}/{len(every)} mutants killed ({100 * dead / max(1, len(every)):.1f}%)", "",
             f"CPU: {cpu.name} ({cpu.usable_cpus} usable CPUs). `make mutate` runs `python benchmarks/mutate.py`; "
             "`--module NAME` reruns one module and updates its rows (the .json beside this file keeps every mutant).",
             "A timeout (the mutant made the tests hang, e.g. a request never answered) counts as killed.", "",
             "| module | file | mutants | killed | timed out | survived | kill rate | run |",
             "|---|---|---|---|---|---|---|---|", *rows, "", "Runs:", "", *runs, ""]
    if survivors:
        lines += ["## Survivors", ""]
        for key, m in survivors:
            why = EQUIVALENT.get((key, m["function"], m["description"]), "NOT EXPLAINED: a gap in the tests")
            lines.append(f"- {key}, `{m['function']}` line {m['line']}: {m['description']} -- {why}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
