"""`rtk verify BUNDLE --endpoint URL`: a live KServe-v2 server answers like the eager model, and like one of
the bundle's own files.

`rtk verify` proves files; a deployment can still serve something else (a wrong file copied into a Triton
repository, a stale version, a storage URI pointing at last month's model). This sends verify's images to
the endpoint (rtk serve, Triton, KServe, anything speaking the v2 protocol over HTTP or gRPC), then:
1. checks the endpoint's model metadata against the bundle's I/O contract (input name, dtype, shape;
   the logits' width);
2. runs every fixed-size bundle file here on each CPU runtime that takes it, and names the (file, runtime)
   whose logits the endpoint's equal (max abs diff within MATCH_ATOL on the logits' scale), or says that
   none does: what is served is then not a file of this bundle;
3. gates the endpoint's logits against the eager model with the matched file's precision, the same gates
   as `rtk verify`.
Exit 0 pass, 1 mismatch (metadata, no file matched, or the gate; the metric and the images named), 2 the
endpoint is unreachable or does not speak v2.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from toolkit.core.bundle import INPUT_NAME, OUTPUT_NAMES, Bundle, takes_any_size
from toolkit.errors import CheckFailed, RtkError, first_line
from toolkit.evaluation.verify import Gates, compare, load_inputs, max_abs_diff, reference_logits, run_batched

LOGITS = OUTPUT_NAMES[0]
# Two runs of the same file by the same engine differ by float reassociation only (thread split, fusions):
# measured 0 to 1e-6 between Triton's onnxruntime backend and onnxruntime in-process. A different file, even
# the same weights at another precision, differs by orders of magnitude more.
MATCH_ATOL = 1e-5
PROTOCOLS = ("http", "grpc")


class Unreachable(RtkError):
    """The endpoint cannot be reached or does not speak the KServe v2 protocol (exit 2)."""


@dataclass(frozen=True)
class Endpoint:
    url: str
    model: str | None = None  # default: the bundle folder's name (rtk serve's and rtk triton's default)
    protocol: str = "http"
    token_env: str | None = None  # an environment variable holding a bearer token
    timeout_s: float = 30.0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise RtkError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.batch_size < 1:
            raise RtkError("the endpoint batch size must be at least 1")
        if self.token_env and not os.environ.get(self.token_env):
            raise RtkError(f"--token-env {self.token_env}: that environment variable is not set")


@dataclass(frozen=True)
class Match:
    """How far the endpoint's logits are from one bundle file run here."""

    artifact: str
    runtime: str
    precision: str
    max_abs_diff: float
    matches: bool


class V2Client:
    """The KServe v2 calls verify needs, over tritonclient's HTTP or gRPC client. Every failure of the
    transport or the protocol becomes one Unreachable line naming the URL."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        parts = urlsplit(endpoint.url if "://" in endpoint.url else f"{endpoint.protocol}://{endpoint.url}")
        if not parts.hostname or parts.port is None:
            raise RtkError(f"--endpoint {endpoint.url!r}: give host:port (e.g. 127.0.0.1:8000)")
        self.address, ssl = f"{parts.hostname}:{parts.port}", parts.scheme in ("https", "grpcs")
        self.headers = {"Authorization": f"Bearer {os.environ[endpoint.token_env]}"} if endpoint.token_env else None
        if endpoint.protocol == "http":
            import tritonclient.http as client

            self.client = client.InferenceServerClient(self.address, ssl=ssl, connection_timeout=endpoint.timeout_s,
                                                       network_timeout=endpoint.timeout_s)
        else:
            import tritonclient.grpc as client

            self.client = client.InferenceServerClient(self.address, ssl=ssl)
        self.lib = client

    def __enter__(self) -> V2Client:
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # connection refused, timeouts, HTTP/gRPC errors: all one line
            raise Unreachable(f"cannot use {self.endpoint.protocol}://{self.address} ({what}): {first_line(exc)}") from None

    def _timeout(self) -> dict[str, Any]:
        return {"client_timeout": self.endpoint.timeout_s} if self.endpoint.protocol == "grpc" else {}

    def metadata(self, model: str) -> dict[str, Any]:
        """The model's v2 metadata as a dict (the gRPC answer converted to the HTTP JSON shape)."""
        raw = self._call(f"model {model!r} metadata",
                         lambda: self.client.get_model_metadata(model, headers=self.headers, **self._timeout()))
        if isinstance(raw, dict):
            return raw
        return {"name": raw.name, "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                                             for t in raw.inputs],
                "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in raw.outputs]}

    def logits(self, model: str, images: np.ndarray) -> np.ndarray:
        """The endpoint's logits for uint8 NHWC images, `batch_size` images per request."""
        out = []
        for i in range(0, len(images), self.endpoint.batch_size):
            chunk = np.ascontiguousarray(images[i : i + self.endpoint.batch_size])
            tensor = self.lib.InferInput(INPUT_NAME, list(chunk.shape), "UINT8")
            if self.endpoint.protocol == "http":
                tensor.set_data_from_numpy(chunk, binary_data=True)
                wanted = [self.lib.InferRequestedOutput(LOGITS, binary_data=True)]
            else:
                tensor.set_data_from_numpy(chunk)
                wanted = [self.lib.InferRequestedOutput(LOGITS)]
            result = self._call("inference", lambda t=tensor, w=wanted: self.client.infer(
                model, [t], outputs=w, headers=self.headers, **self._timeout()))
            array = result.as_numpy(LOGITS)
            if array is None or array.shape[0] != len(chunk):
                raise Unreachable(f"{self.address} answered without {LOGITS!r} for {len(chunk)} images")
            out.append(np.asarray(array, dtype=np.float32).reshape(len(chunk), -1))
        return np.concatenate(out)


def contract_problems(meta: dict[str, Any], crop: int, classes: int) -> list[str]:
    """How the endpoint's metadata differs from the bundle's I/O contract (empty: it agrees)."""
    problems = []
    inputs = {t.get("name"): t for t in meta.get("inputs", [])}
    outputs = {t.get("name"): t for t in meta.get("outputs", [])}
    if list(inputs) != [INPUT_NAME]:
        problems.append(f"inputs {list(inputs)}, the bundle's is [{INPUT_NAME!r}]")
    else:
        image = inputs[INPUT_NAME]
        if image.get("datatype") != "UINT8":
            problems.append(f"input {INPUT_NAME!r} is {image.get('datatype')}, the bundle's is UINT8")
        if [int(d) for d in image.get("shape", [])][-3:] != [crop, crop, 3]:
            problems.append(f"input shape {image.get('shape')}, the bundle's is [-1, {crop}, {crop}, 3]")
    if LOGITS not in outputs:
        problems.append(f"no {LOGITS!r} output (outputs {list(outputs)})")
    else:
        logits = outputs[LOGITS]
        if logits.get("datatype") != "FP32" or [int(d) for d in logits.get("shape", [])][-1:] != [classes]:
            problems.append(f"output {LOGITS!r} is {logits.get('datatype')} {logits.get('shape')}, "
                            f"the bundle's is FP32 [-1, {classes}]")
    return problems


def local_matches(bundle: Bundle, crops: np.ndarray, served: np.ndarray, threads: int | None,
                  runtimes: list[str] | None = None) -> list[Match]:
    """Every fixed-size bundle file on every CPU runtime here that takes it (or on `runtimes`), against the
    endpoint's logits. A broken file raises: the bundle itself must be sound before it proves anything."""
    from toolkit.evaluation.runners import (
        VERIFY_DEFAULT,
        Failed,
        RunOptions,
        Skipped,
        each_loaded,
        plan,
        runtimes_on,
    )

    wanted = [r for r in runtimes or runtimes_on("cpu", VERIFY_DEFAULT) if r != "eager"]
    entries = [e for e in plan(bundle, wanted, lambda: (None, None), RunOptions(threads=threads, tf32=False))
               if not (e.artifact in bundle.files and takes_any_size(bundle.files[e.artifact]))]
    scale = max(1.0, float(np.abs(served).max())) if served.size else 1.0
    matches = []
    for entry in each_loaded(entries):
        if isinstance(entry, Skipped):
            continue
        if isinstance(entry, Failed):
            raise CheckFailed(f"{entry.artifact} on {entry.runtime}: {entry.reason}")
        diff = max_abs_diff(run_batched(entry, crops), served)
        matches.append(Match(entry.artifact, entry.runtime, entry.precision, diff, diff <= MATCH_ATOL * scale))
    return matches


def verify_endpoint(bundle_path: str | Path, endpoint: Endpoint, images: str | Path | None = None,
                    random_images: int = 0, checkpoint: str | Path | None = None, gates: Gates = Gates(),
                    threads: int | None = None, seed: int = 0, runtimes: list[str] | None = None) -> dict[str, Any]:
    """Metadata, then which bundle file the endpoint serves, then that file's gate against the eager model."""
    from toolkit.training.checkpoint import source_from_manifest

    bundle = Bundle.open(bundle_path)
    spec, classes = bundle.manifest.preprocess, bundle.classes
    model_name = endpoint.model or bundle.root.resolve().name
    inputs = load_inputs(images, random_images, spec, classes, seed)
    with V2Client(endpoint) as client:  # closed at once: a server's shutdown waits for open connections
        problems = contract_problems(client.metadata(model_name), spec.crop_size, len(classes))
        served = None if problems else client.logits(model_name, inputs.crops)
    report: dict[str, Any] = {"endpoint": endpoint.url, "protocol": endpoint.protocol, "model": model_name,
                              "metadata_problems": problems, "passed": False, "matched": None, "matches": []}
    if problems:
        return report
    model, _ = source_from_manifest(bundle.manifest, checkpoint)
    ref = reference_logits(model, spec, inputs.crops)
    matches = local_matches(bundle, inputs.crops, served, threads, runtimes)
    matched = min((m for m in matches if m.matches), key=lambda m: m.max_abs_diff, default=None)
    # unmatched, the closest file's gate still says how far the answers are from the trained model
    judged = matched or min(matches, key=lambda m: m.max_abs_diff, default=None)
    report.update(images=len(inputs.crops), labelled=inputs.labels is not None, matches=[asdict(m) for m in matches],
                  matched=asdict(matched) if matched else None, judged_as=asdict(judged) if judged else None)
    if judged is not None:
        gate = compare(served, ref, inputs.names, inputs.labels, judged.precision, gates)
        report.update(gate=gate, passed=matched is not None and gate["passed"])
    return report


def format_endpoint_report(report: dict[str, Any]) -> str:
    """The lines printed on stdout."""
    head = f"endpoint {report['protocol']}://{report['endpoint'].split('://')[-1]} model {report['model']!r}"
    if report["metadata_problems"]:
        return "\n".join([head, *(f"metadata: {p}" for p in report["metadata_problems"])])
    lines = [head + f": {report['images']} images" + (" (labelled)" if report["labelled"] else "")]
    lines += [f"  {m['artifact']:<20} on {m['runtime']:<14} max abs diff {m['max_abs_diff']:.2e}"
              + ("  <- served" if report["matched"] and m == report["matched"] else "") for m in report["matches"]]
    judged = report["judged_as"]
    if judged is None:
        return "\n".join([*lines, "served: unknown (no file of the bundle could run here)"])
    gate = report["gate"]
    verdict = "PASS" if report["passed"] else "FAIL" + (f" ({', '.join(gate['failed_metrics'])})" if gate["failed_metrics"] else "")
    acc = "" if gate["accuracy_change"] is None else f", accuracy change {100 * gate['accuracy_change']:+.1f} pt"
    served = judged["artifact"] if report["matched"] else f"no file of the bundle (closest: {judged['artifact']})"
    lines.append(f"served: {served}; {judged['precision']} gate against the eager model: max abs diff "
                 f"{gate['max_abs_diff']:.2e}, top-1 agreement {100 * gate['top1_agreement']:.1f}%{acc}: {verdict}")
    return "\n".join(lines)


def failure_line(report: dict[str, Any]) -> str:
    """The one line a failed endpoint verification exits with."""
    where = f"{report['protocol']}://{report['endpoint'].split('://')[-1]} model {report['model']!r}"
    if report["metadata_problems"]:
        return f"endpoint {where} disagrees with the bundle's I/O contract: {report['metadata_problems'][0]}"
    judged, gate = report["judged_as"], report.get("gate")
    if judged is None:
        return f"endpoint {where}: no file of this bundle could run here to compare with"
    failed = ", ".join(gate["failed_metrics"]) or "none"
    changed = gate["top1_changed"][:5]
    named = f"; top-1 changed on {', '.join(changed)}" if changed else ""
    if report["matched"] is None:
        return (f"endpoint {where} serves no file of this bundle (closest {judged['artifact']} on {judged['runtime']}: "
                f"max abs diff {judged['max_abs_diff']:.2e}); against the eager model at {judged['precision']} it fails: "
                f"{failed}{named}")
    return f"endpoint {where} serves {judged['artifact']} but fails its {judged['precision']} gate: {failed}{named}"
