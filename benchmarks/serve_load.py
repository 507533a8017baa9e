"""Load test of `rtk serve` on 127.0.0.1 with Triton's HTTP client (bounded loops that stop on their own).

    python benchmarks/serve_load.py BUNDLE [--clients 8] [--seconds 20] [--overload-seconds 60] [--tag NAME]

1. In-process `Classifier.logits` p50 at batch 1 vs the server's round trip p50 (one client, batching off).
2. N concurrent batch-1 clients for T seconds, dynamic batching off (--max-batch-size 1) vs on: img/s,
   p50/p90/p99, errors, and the mean batch size the model saw (from /metrics).
3. Open loop at twice the sustainable rate (the batching-on throughput) for --overload-seconds: every
   request must be answered 200 or refused 503; none lost or hung (each has a 30 s timeout).
4. Seconds from starting `rtk serve` to ready.
Writes benchmarks/results/serve-<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.core.hardware import cpu_info  # noqa: E402
from toolkit.core.tables import render  # noqa: E402
from toolkit.serving.classifier import Classifier  # noqa: E402

MAX_REQUESTS = 200_000  # a hard bound on every loop, whatever the time says


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`rtk serve` in a subprocess on 127.0.0.1."""

    def __init__(self, bundle: str, threads: int, **options) -> None:
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "toolkit", "serve", bundle, "--port", str(self.port), "--threads", str(threads),
                "--name", "model"]
        for key, value in options.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        start = time.perf_counter()
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while not self.ready():
            if self.proc.poll() is not None or time.perf_counter() - start > 120:
                raise RuntimeError(f"rtk serve did not become ready: {self.proc.stdout.read()}")
            time.sleep(0.02)
        self.ready_seconds = time.perf_counter() - start

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def metric_mean(self, name: str, labels: str = "") -> float:
        """sum / count of a histogram on /metrics; `labels` as Prometheus writes them, e.g. endpoint="infer"."""
        text = urllib.request.urlopen(f"http://{self.url}/metrics", timeout=5).read().decode()
        where = re.escape(f"{{{labels}}}") if labels else ""
        total = float(re.search(rf"^{name}_sum{where} ([\d.e+-]+)$", text, re.M).group(1))
        count = float(re.search(rf"^{name}_count{where} ([\d.e+-]+)$", text, re.M).group(1))
        return total / count if count else 0.0

    def mean_batch(self) -> float:
        return self.metric_mean("rtk_batch_size")

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(30)


def client_call(url: str):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url, network_timeout=30.0, connection_timeout=30.0)

    def call(image: np.ndarray) -> int:
        tensor = httpclient.InferInput("image", list(image.shape), "UINT8")
        tensor.set_data_from_numpy(image, binary_data=True)
        try:
            client.infer("model", [tensor], outputs=[httpclient.InferRequestedOutput("logits", binary_data=True)])
            return 200
        except Exception as exc:  # InferenceServerException carries the HTTP status
            status = getattr(exc, "status", lambda: None)()
            return int(status) if status and str(status).isdigit() else -1

    return call


def stats(latencies: list[float], seconds: float, statuses: list[int]) -> dict:
    ms = np.asarray(latencies) * 1e3 if latencies else np.zeros(1)
    ok = sum(1 for s in statuses if s == 200)
    return {"requests": len(statuses), "ok": ok, "errors": len(statuses) - ok, "img_per_s": ok / seconds,
            "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99))}


def closed_loop(url: str, clients: int, seconds: float, image: np.ndarray) -> dict:
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker() -> None:
        call = client_call(url)
        for _ in range(MAX_REQUESTS // clients):
            if time.perf_counter() >= stop_at:
                return
            t0 = time.perf_counter()
            status = call(image)
            with lock:
                latencies.append(time.perf_counter() - t0)
                statuses.append(status)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    return stats(latencies, time.perf_counter() - start, statuses)


def open_loop(url: str, rate: float, seconds: float, image: np.ndarray, workers: int = 256) -> dict:
    """Requests sent on a fixed schedule whatever the answers: overload, not politeness."""
    calls = threading.local()

    def one(_: int) -> tuple[int, float]:
        if not hasattr(calls, "call"):
            calls.call = client_call(url)
        t0 = time.perf_counter()
        return calls.call(image), time.perf_counter() - t0

    total = min(int(rate * seconds), MAX_REQUESTS)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = []
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(one, i))
        results = [f.result(timeout=90) for f in futures]  # a hung request would raise here
    statuses = [s for s, _ in results]
    counts = {str(s): statuses.count(s) for s in sorted(set(statuses))}
    return {"sent": total, "answered": len(results), "rate": rate, "seconds": seconds, "statuses": counts,
            "lost_or_hung": total - len(results), "p50_ms_200": float(np.percentile([t * 1e3 for s, t in results if s == 200] or [0], 50))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--overload-seconds", type=float, default=60)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queue-delay-ms", type=float, default=5)
    parser.add_argument("--tag", default=None)
    args = parser.parse_args()
    cpu = cpu_info()
    tag = args.tag or cpu.tag

    clf = Classifier.load(args.bundle, threads=args.threads)
    s = clf.spec.crop_size
    image = np.random.default_rng(0).integers(0, 256, (1, s, s, 3), dtype=np.uint8)
    for _ in range(10):
        clf.logits(image)
    in_process = []
    for _ in range(100):
        t0 = time.perf_counter()
        clf.logits(image)
        in_process.append(time.perf_counter() - t0)
    in_process_p50 = float(np.percentile(in_process, 50) * 1e3)
    del clf

    report: dict = {"cpu": cpu.to_dict(), "bundle": args.bundle, "crop_size": s, "threads": args.threads,
                    "clients": args.clients, "seconds": args.seconds, "in_process_p50_ms": in_process_p50}
    off = Server(args.bundle, args.threads, max_batch_size=1, max_queue=256)
    report["ready_seconds"] = off.ready_seconds
    single = closed_loop(off.url, 1, min(args.seconds, 10), image)
    report["round_trip_p50_ms"] = single["p50_ms"]
    # inside the server: time from request to response minus the model call (HTTP parsing, JSON, the queue,
    # the hop to the inference thread and back), from the server's own metrics
    report["server_overhead_ms"] = 1e3 * (off.metric_mean("rtk_request_seconds", 'endpoint="infer"')
                                          - off.metric_mean("rtk_inference_seconds"))
    report["batching_off"] = closed_loop(off.url, args.clients, args.seconds, image)
    report["batching_off"]["mean_batch"] = off.mean_batch()
    report["batching_off"]["exit_code"] = off.stop()
    # a queue of 16 waiting requests bounds the wait at about 16 batch times; the overload phase has up to
    # 256 requests in flight, so the queue fills and the server must refuse with 503 rather than grow
    on = Server(args.bundle, args.threads, max_batch_size=args.max_batch_size, max_queue_delay_ms=args.max_queue_delay_ms,
                max_queue=16)
    report["batching_on"] = closed_loop(on.url, args.clients, args.seconds, image)
    report["batching_on"]["mean_batch"] = on.mean_batch()
    rate = 2 * report["batching_on"]["img_per_s"]
    report["overload"] = open_loop(on.url, rate, args.overload_seconds, image)
    report["overload"]["exit_code"] = on.stop()

    out = ROOT / "benchmarks" / "results"
    (out / f"serve-{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    on_, off_ = report["batching_on"], report["batching_off"]
    rows = [[name, str(r["requests"]), str(r["errors"]), f"{r['img_per_s']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p90_ms']:.1f}",
             f"{r['p99_ms']:.1f}", f"{r['mean_batch']:.2f}"] for name, r in (("batching off", off_), ("batching on", on_))]
    o = report["overload"]
    md = [f"# rtk serve under load: {Path(args.bundle).name}, {s} px",
          "", f"CPU: {cpu.name} ({cpu.usable_cpus} usable CPUs, AVX-512 {cpu.avx512}, AMX {cpu.amx}); "
          f"{args.threads} inference threads; {args.clients} concurrent batch-1 clients for {args.seconds:g} s each; "
          f"server and clients on the same machine (127.0.0.1). `python benchmarks/serve_load.py {args.bundle}`.", "",
          render(["server", "requests", "errors", "img/s", "p50 ms", "p90 ms", "p99 ms", "mean batch"], rows, "markdown"), "",
          f"- batching on / off: **{on_['img_per_s'] / off_['img_per_s']:.2f}x** img/s",
          f"- round trip p50 at batch 1 (one client): {report['round_trip_p50_ms']:.2f} ms vs in-process "
          f"`Classifier.logits` p50 {in_process_p50:.2f} ms: overhead **{report['round_trip_p50_ms'] - in_process_p50:.2f} ms** "
          f"(client and server together; the server's own part, request time minus model time from its metrics: "
          f"{report['server_overhead_ms']:.2f} ms)",
          f"- overload, open loop at {rate:.1f} req/s (2x the batching-on throughput, up to 256 in flight, server queue 16) "
          f"for {o['seconds']:g} s: sent {o['sent']}, "
          f"answered {o['answered']} ({o['statuses']}), lost or hung {o['lost_or_hung']}; p50 of the 200s {o['p50_ms_200']:.1f} ms",
          f"- `rtk serve` to ready: {report['ready_seconds']:.2f} s; exit codes after SIGTERM: "
          f"{off_['exit_code']} (off), {o['exit_code']} (on)"]
    (out / f"serve-{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
