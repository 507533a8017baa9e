"""Verify stage: every artifact of a bundle, on every runtime here, against the eager PyTorch model.

The reference is the checkpoint's model fed by torchvision's own pipeline (Resize, CenterCrop,
ToDtype, Normalize). Every runtime gets the same uint8 crops, so differences measure the runtimes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.core.bundle import Bundle, takes_any_size
from toolkit.core.formats import of_format
from toolkit.core.preprocess import PreprocessSpec, list_images, open_image
from toolkit.errors import ArtifactBroken, CheckFailed, RtkError, first_line
from toolkit.evaluation.runners.torch_runner import keeps_torch_threads

BATCH = 32


@dataclass(frozen=True)
class Gates:
    """Pass criteria by precision. fp32: allclose and identical top-1 on every image. fp16, bf16, int8 and
    any-size files: the same top-1 as the reference on every image where the reference is decisive (its top
    two logits differ by more than `decisive_margin` x the set's largest |logit|, at least 1); the near-ties
    are reported, not gated: rounding flips them either way, and a flip there measures noise, not damage."""

    atol: float = 1e-4
    rtol: float = 1e-3
    fp32_top1: float = 1.0
    half_top1: float = 1.0  # fp16/bf16, on the decisive images
    int8_top1: float = 1.0  # on the decisive images
    int8_max_accuracy_drop: float = 0.01  # on the point estimate of the paired change
    preprocess_atol: float = 1e-5
    # any-size files (resize inside the graph) against torchvision's PIL pipeline: Pillow rounds each resize
    # pass to uint8 with fixed-point weights; the graph matches it except a few 1-level differences (README)
    any_size_atol: float = 0.02  # on the largest logit's scale; measured worst 7e-4 (benchmarks/any_size.py)
    # On the logit scale, relative to the largest |logit|: rounding errors (int8 steps, fp16/bf16 mantissas)
    # are relative to the tensors' ranges, so the gap they can close is a share of the logit range. Softmax
    # would rescale the gap by the model's confidence, which the rounding does not know about.
    decisive_margin: float = 0.05
    confidence: float = 0.95  # of the accuracy change's interval (toolkit.evaluation.stats)

    def __post_init__(self) -> None:
        if not self.decisive_margin >= 0:
            raise RtkError(f"the decisive margin must be >= 0, got {self.decisive_margin}")
        if not 0 < self.confidence < 1:
            raise RtkError(f"the confidence must lie between 0 and 1, got {self.confidence}")


@dataclass(frozen=True)
class Inputs:
    crops: np.ndarray  # uint8 [N, S, S, 3]
    names: list[str]
    originals: list[np.ndarray] = field(default_factory=list)  # the decoded images behind the crops, for any-size files
    labels: np.ndarray | None = None  # class indices in the bundle's order; -1 for an image with no label


@dataclass
class Record:
    artifact: str
    runtime: str
    precision: str
    images: int
    max_abs_diff: float
    max_rel_diff: float
    mean_abs_diff: float
    cosine_min: float
    top1_agreement: float
    top5_agreement: float
    accuracy: float | None
    reference_accuracy: float | None
    accuracy_change: float | None
    tolerance: dict[str, float]
    passed: bool
    failed_metrics: list[str] = field(default_factory=list)
    atol_needed: float | None = None
    top1_changed: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    top1_agreement_where_clear: float | None = None  # on the images where the reference is decisive (Gates)
    near_ties: dict[str, int] | None = None  # the other images: how many, how many flipped, to right / to wrong
    accuracy_interval: list[float] | None = None  # of accuracy_change, exact (toolkit.evaluation.stats), labelled images
    accuracy_pairs: dict[str, Any] | None = None  # gains, losses, images, confidence, resolution of the bound


# ---------------------------------------------------------------- metrics (plain numpy, tested on known arrays)


def max_abs_diff(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - ref))) if a.size else 0.0


def max_rel_diff(a: np.ndarray, ref: np.ndarray, floor: float = 1e-6) -> float:
    """max |a - ref| / |ref|, with |ref| floored so exact zeros do not divide by zero."""
    ref = ref.astype(np.float64)
    return float(np.max(np.abs(a - ref) / np.maximum(np.abs(ref), floor))) if a.size else 0.0


def mean_abs_diff(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.float64) - ref))) if a.size else 0.0


def cosine_min(a: np.ndarray, ref: np.ndarray) -> float:
    """The lowest per-image cosine similarity of the two logit vectors (1.0 for two zero vectors)."""
    a, ref = a.astype(np.float64), ref.astype(np.float64)
    num = np.sum(a * ref, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(ref, axis=1)
    cos = np.where(den > 0, num / np.where(den > 0, den, 1), np.where(np.all(a == ref, axis=1), 1.0, 0.0))
    return float(np.min(cos)) if len(cos) else 1.0


def topk_sets(logits: np.ndarray, k: int) -> np.ndarray:
    k = min(k, logits.shape[1])
    return np.sort(np.argsort(-logits, axis=1, kind="stable")[:, :k], axis=1)


def top1_agreement(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean(a.argmax(1) == ref.argmax(1))) if len(a) else 1.0


def top5_agreement(a: np.ndarray, ref: np.ndarray) -> float:
    """Share of images whose five highest classes (as a set) are the same."""
    return float(np.mean(np.all(topk_sets(a, 5) == topk_sets(ref, 5), axis=1))) if len(a) else 1.0


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.argmax(1) == labels))


def atol_needed(a: np.ndarray, ref: np.ndarray, rtol: float) -> float:
    """The smallest atol for which allclose(a, ref, atol, rtol) holds."""
    return float(max(0.0, np.max(np.abs(a.astype(np.float64) - ref) - rtol * np.abs(ref)))) if a.size else 0.0


def logit_scale(ref: np.ndarray) -> float:
    """The set's largest |logit|, at least 1: the unit of the any-size atol and of the decisive margin."""
    return max(1.0, float(np.abs(ref).max())) if ref.size else 1.0


def decisive(ref: np.ndarray, margin: float) -> np.ndarray:
    """Per image: do the reference's top two logits differ by more than margin x logit_scale(ref)?
    With one class there is nothing to flip: every image is decisive."""
    if ref.shape[1] < 2:
        return np.ones(len(ref), bool)
    top2 = np.sort(ref, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) > margin * logit_scale(ref)


def near_tie_flips(a: np.ndarray, ref: np.ndarray, labels: np.ndarray | None, clear: np.ndarray) -> dict[str, int]:
    """The images that are not decisive: how many, how many changed top-1, and of the labelled ones that
    changed, how many became right (the reference was wrong) or wrong (the reference was right)."""
    got, want = a.argmax(1), ref.argmax(1)
    flipped = ~clear & (got != want)
    out = {"images": int((~clear).sum()), "flipped": int(flipped.sum())}
    if labels is not None:
        known = flipped & (labels >= 0)
        out.update(to_right=int((known & (got == labels)).sum()), to_wrong=int((known & (want == labels)).sum()))
    return out


def accuracy_pairs(a: np.ndarray, ref: np.ndarray, labels: np.ndarray, confidence: float,
                   bound: float | None = None) -> tuple[list[float], dict[str, Any]]:
    """The accuracy change's exact interval from the paired predictions on the labelled images, and the
    pairs behind it; with `bound` (largest drop, a fraction) also whether the set resolves it: an interval no
    wider than the bound, else about how many images would."""
    from toolkit.evaluation.stats import images_to_resolve, paired_change

    known = labels >= 0
    new_ok, ref_ok = a.argmax(1)[known] == labels[known], ref.argmax(1)[known] == labels[known]
    change = paired_change(int((new_ok & ~ref_ok).sum()), int((ref_ok & ~new_ok).sum()), int(known.sum()), confidence)
    pairs: dict[str, Any] = {"images": change.images, "gains": change.gains, "losses": change.losses,
                             "confidence": confidence}
    if bound is not None:
        pairs.update(bound=bound, resolved=change.width <= bound, images_to_resolve=images_to_resolve(change, bound))
    return [change.low, change.high], pairs


def top1_gate(precision: str, gates: Gates) -> float:
    """The least top-1 agreement on the decisive images, by precision (any-size files are fp32)."""
    return {"fp16": gates.half_top1, "bf16": gates.half_top1, "int8": gates.int8_top1}.get(precision, gates.fp32_top1)


def compare(a: np.ndarray, ref: np.ndarray, names: list[str], labels: np.ndarray | None, precision: str,
            gates: Gates, any_size: bool = False) -> dict[str, Any]:
    """All metrics of one output against the reference, and which gates fail. `any_size`: the output of a
    file that resized the original images itself, gated by the any-size tolerance. fp32 (not any-size):
    allclose and top-1 on every image; the others: top-1 where the reference is decisive (Gates)."""
    m: dict[str, Any] = {
        "max_abs_diff": max_abs_diff(a, ref), "max_rel_diff": max_rel_diff(a, ref), "mean_abs_diff": mean_abs_diff(a, ref),
        "cosine_min": cosine_min(a, ref), "top1_agreement": top1_agreement(a, ref), "top5_agreement": top5_agreement(a, ref),
        "accuracy": None, "reference_accuracy": None, "accuracy_change": None,
    }
    clear = decisive(ref, gates.decisive_margin)
    m["top1_agreement_where_clear"] = top1_agreement(a[clear], ref[clear])  # 1.0 where none is decisive
    m["near_ties"] = near_tie_flips(a, ref, labels, clear)
    if labels is not None and (labels >= 0).any():
        known = labels >= 0
        m["accuracy"], m["reference_accuracy"] = accuracy(a[known], labels[known]), accuracy(ref[known], labels[known])
        m["accuracy_change"] = m["accuracy"] - m["reference_accuracy"]
        m["accuracy_interval"], m["accuracy_pairs"] = accuracy_pairs(
            a, ref, labels, gates.confidence, gates.int8_max_accuracy_drop if precision == "int8" else None)
    failed = []
    if not np.isfinite(a).all():
        failed.append("finite")
    where_clear = {"top1_agreement_where_clear": top1_gate(precision, gates), "decisive_margin": gates.decisive_margin,
                   "decisive_gap": gates.decisive_margin * logit_scale(ref)}
    if any_size:
        tolerance = {"atol": gates.any_size_atol * logit_scale(ref), **where_clear}
        if m["max_abs_diff"] > tolerance["atol"]:
            failed.append("max_abs_diff")
    elif precision == "fp32":
        tolerance = {"atol": gates.atol, "rtol": gates.rtol, "top1_agreement": gates.fp32_top1}
        if not np.allclose(a, ref, atol=gates.atol, rtol=gates.rtol):
            failed.append("max_abs_diff")
    elif precision in ("fp16", "bf16"):
        tolerance = where_clear
    else:
        tolerance = {**where_clear, "max_accuracy_drop": gates.int8_max_accuracy_drop}
        if m["accuracy_change"] is not None and m["accuracy_change"] < -gates.int8_max_accuracy_drop - 1e-12:
            failed.append("accuracy_change")
    if "top1_agreement" in tolerance and m["top1_agreement"] < tolerance["top1_agreement"]:
        failed.append("top1_agreement")
    if "top1_agreement_where_clear" in tolerance and m["top1_agreement_where_clear"] < tolerance["top1_agreement_where_clear"]:
        failed.append("top1_agreement")
    # Computed for every record (cheap) so a record that fails a later check (classes, sha256) has them too.
    m.update(tolerance=tolerance, passed=not failed, failed_metrics=failed, atol_needed=atol_needed(a, ref, gates.rtol),
             top1_changed=[names[i] for i in np.flatnonzero(a.argmax(1) != ref.argmax(1))])
    return m


# ---------------------------------------------------------------- inputs and reference


def torchvision_crop(source, spec: PreprocessSpec) -> np.ndarray:
    """The reference decoding: EXIF transpose + RGB, then torchvision's Resize (antialiased) and CenterCrop.
    `source`: a path, or a decoded RGB uint8 array."""
    from torchvision.transforms import v2 as T

    img = open_image(source)
    pipeline = T.Compose([T.Resize(spec.resize_size, interpolation=T.InterpolationMode(spec.interpolation), antialias=True),
                          T.CenterCrop(spec.crop_size), T.PILToTensor()])
    return pipeline(img).permute(1, 2, 0).numpy()


def load_inputs(images: str | Path | None, random_images: int, spec: PreprocessSpec, classes: list[str],
                seed: int = 0) -> Inputs:
    """Crops from image files (an ImageFolder gives labels too) followed by `random_images` uint8 noise images."""
    crops, names, labels, originals = [], [], [], []
    labelled = False
    if images is not None:
        root = Path(images)
        paths = list_images(root)
        if not paths:
            raise RtkError(f"no images in {root}")
        subdirs = {p.relative_to(root).parts[0] for p in paths if root.is_dir() and len(p.relative_to(root).parts) > 1}
        labelled = bool(subdirs) and subdirs <= set(classes) and all(len(p.relative_to(root).parts) == 2 for p in paths)
        for p in paths:
            original = np.asarray(open_image(p))
            originals.append(original)
            crops.append(torchvision_crop(original, spec))
            names.append(str(p.relative_to(root)) if root.is_dir() else p.name)
            if labelled:
                labels.append(classes.index(p.relative_to(root).parts[0]))
    if random_images:
        rng = np.random.default_rng(seed)
        s = spec.crop_size
        crops += list(rng.integers(0, 256, (random_images, s, s, 3), dtype=np.uint8))
        names += [f"random-{i}" for i in range(random_images)]
        # for the any-size files: noise images of random sizes and shapes (the crops above are already cropped)
        for _ in range(random_images):
            h, w = (int(v) for v in rng.integers(max(2, s // 2), 4 * s + 1, 2))
            originals.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if not crops:
        raise RtkError("nothing to verify on: give --images or --random N")
    # Random images have no class: they are labelled -1 and left out of accuracy, so mixing them in keeps
    # the accuracy gates of the labelled images (export's automatic verify does that).
    lab = np.array(labels + [-1] * random_images) if labelled else None
    return Inputs(np.stack(crops), names, labels=lab, originals=originals)


def reference_logits(model, spec: PreprocessSpec, crops: np.ndarray) -> np.ndarray:
    """The eager model on torchvision's ToDtype + Normalize of the crops, fp32 on CPU."""
    import torch
    from torchvision.transforms import v2 as T

    normalize = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(list(spec.mean), list(spec.std))])
    out = []
    with torch.inference_mode():
        for i in range(0, len(crops), BATCH):
            x = normalize(torch.from_numpy(crops[i : i + BATCH]).permute(0, 3, 1, 2))
            out.append(model(x).float().numpy())
    return np.concatenate(out)


def preprocess_difference(spec: PreprocessSpec, crops: np.ndarray) -> float:
    """In-graph preprocessing (the exported Preprocess module) against torchvision's Normalize."""
    import torch
    from torchvision.transforms import v2 as T

    from toolkit.export.graph import Preprocess

    x = torch.from_numpy(crops[:BATCH])
    ours = Preprocess(spec)(x)
    theirs = T.Normalize(list(spec.mean), list(spec.std))(T.ToDtype(torch.float32, scale=True)(x.permute(0, 3, 1, 2)))
    return float((ours - theirs).abs().max())


def run_each(runner, images: list[np.ndarray]) -> np.ndarray:
    """A runner's logits for whole images of different sizes, one call each (one size per batch)."""
    return np.concatenate([runner(image[None]) for image in images])


def run_batched(runner, crops: np.ndarray) -> np.ndarray:
    """A runner's logits for all crops, BATCH at a time."""
    return np.concatenate([runner(crops[i : i + BATCH]) for i in range(0, len(crops), BATCH)])


def _onnx_classes(path: Path) -> str | None:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}.get("classes")


def _ir_classes(path: Path) -> str | None:
    from toolkit.core.openvino_ir import metadata

    return metadata(path).get("classes")


def _archive_classes(path: Path) -> str | None:
    from toolkit.export.loaders import archive_extra

    return archive_extra(path, "classes.txt")


def _aoti_classes(path: Path) -> str | None:
    from toolkit.export.loaders import check_aoti_package

    return check_aoti_package(path, device=None).get("classes")  # its metadata json: the library is not loaded


# core.formats' metadata keys -> how that metadata's stored class names are read (the raw JSON text)
CLASS_READERS: dict[str, Callable[[Path], str | None]] = {
    "onnx": _onnx_classes, "openvino": _ir_classes, "torch-archive": _archive_classes, "aoti": _aoti_classes}


def file_classes(path: Path, fmt: str) -> list[str] | None:
    """The class names stored inside a model file's metadata, read without running anything from it:
    ONNX metadata without its external data, an IR's runtime info, a torch archive's extra/classes.txt
    straight from the zip (no torch.jit.load / torch.export.load a second time), an AOTInductor package's
    metadata json (its library never loaded). Unparsable names, and a format rtk does not know, are
    ArtifactBroken."""
    raw = CLASS_READERS[of_format(fmt, path.name).metadata](path)
    if not raw:
        return None
    try:
        names = json.loads(raw)
    except (ValueError, RecursionError):
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ArtifactBroken(f"{path.name}: its stored classes are not a JSON list of names")
    return names


# ---------------------------------------------------------------- the stage



def failure_record(entry, images: int, gates: Gates) -> Record:
    """A record for an artifact that could not be run: every metric at its worst, the reason kept."""
    return Record(entry.artifact, entry.runtime, entry.precision, images, max_abs_diff=float("inf"),
                  max_rel_diff=float("inf"), mean_abs_diff=float("inf"), cosine_min=0.0, top1_agreement=0.0,
                  top5_agreement=0.0, accuracy=None, reference_accuracy=None, accuracy_change=None,
                  tolerance={}, passed=False, failed_metrics=["load"], details={"error": entry.reason})


@dataclass(frozen=True)
class References:
    """The eager model's logits the artifacts are compared with, and the in-graph preprocessing's error."""

    crops: np.ndarray  # on the torchvision crops
    any_size: np.ndarray | None  # for the files that resize inside the graph; None when the bundle has none
    preprocess_diff: float


def refuse_unknown_formats(bundle: Bundle) -> None:
    """A file of a format rtk does not know is a broken bundle: one clear error, not a file left unverified."""
    for name, entry in bundle.files.items():
        of_format(entry.format, f"{name} in {bundle.root}")


def _open(bundle_path: str | Path, trust: list[str | Path] | None, store: bool) -> tuple[Bundle, bool, Any]:
    """The bundle to verify, whether its report is stored, and (with `trust`) the private copy of its signed
    files, which the caller keeps until verify returns: it runs these copies. Nothing is stored then."""
    trusted = None
    if trust:
        from toolkit.serving.signing import trusted_copy

        trusted = trusted_copy(bundle_path, trust)
        bundle_path, store = trusted.root, False
    bundle = Bundle.open(bundle_path)
    refuse_unknown_formats(bundle)
    if store:
        bundle.check_writable()
    return bundle, store, trusted


def _references(model, spec: PreprocessSpec, inputs: Inputs, random_images: int, bundle: Bundle) -> References:
    ref = reference_logits(model, spec, inputs.crops)
    ref_any = None
    if any(takes_any_size(e) for e in bundle.files.values()):
        # file rows: the same torchvision crops; random rows: torchvision's crops of the random-size noise
        files = len(inputs.crops) - random_images
        noise = [torchvision_crop(o, spec) for o in inputs.originals[files:]]
        ref_any = np.concatenate([ref[:files]] + ([reference_logits(model, spec, np.stack(noise))] if noise else []))
    return References(ref, ref_any, preprocess_difference(spec, inputs.crops))


@contextlib.contextmanager
def _tf32_off():
    """fp32 parity on both sides: no TF32 matmuls or convolutions while comparing; the caller's flags after."""
    import torch

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _stored_classes_check(bundle: Bundle, entry, m: dict[str, Any]) -> None:
    """A bundle file must carry the bundle's classes in its own metadata: otherwise the record fails."""
    if entry.artifact not in bundle.files:
        return
    try:
        stored = file_classes(bundle.path(entry.artifact), bundle.files[entry.artifact].format)
    except RtkError as exc:
        stored, entry.details["error"] = None, first_line(exc)
    if stored != bundle.classes:
        m["failed_metrics"].append("classes")
        m["passed"] = False
        entry.details["classes_in_file"] = stored


def _record(entry, bundle: Bundle, inputs: Inputs, refs: References, gates: Gates,
            echo: Callable[[str], None]) -> Record:
    """Run one loaded runner (or take its load failure) and compare it with the reference."""
    from toolkit.evaluation.runners import Failed

    if isinstance(entry, Failed):
        echo(f"FAIL {entry.artifact} on {entry.runtime}: {entry.reason}")
        return failure_record(entry, len(inputs.crops), gates)
    any_size = bundle.any_size(entry.artifact)
    try:
        out = run_each(entry, inputs.originals) if any_size else run_batched(entry, inputs.crops)
    except Exception as exc:  # a file that loads but cannot run is as broken as one that does not load
        reason = f"{entry.artifact}: {entry.runtime} failed to run it: {first_line(exc)}"
        echo(f"FAIL {reason}")
        return failure_record(Failed(entry.runtime, entry.artifact, entry.precision, reason), len(inputs.crops), gates)
    m = compare(out, refs.any_size if any_size else refs.crops, inputs.names, inputs.labels, entry.precision, gates,
                any_size)
    if any_size:
        entry.details["input"] = "original images at their own sizes, one per call"
    _stored_classes_check(bundle, entry, m)
    return Record(entry.artifact, entry.runtime, entry.precision, len(out), details=entry.details, **m)


def _run_all(entries: list, bundle: Bundle, inputs: Inputs, refs: References, gates: Gates,
             echo: Callable[[str], None]) -> tuple[list[Record], list[dict[str, Any]]]:
    """Every runtime in turn (loaded, compared, released): the records, and the runtimes skipped here."""
    from toolkit.evaluation.runners import Skipped, each_loaded

    records, skipped = [], []
    for entry in each_loaded(entries):
        if isinstance(entry, Skipped):
            skipped.append(asdict(entry))
        else:
            records.append(_record(entry, bundle, inputs, refs, gates, echo))
    return records, skipped


def _require_ran(runtimes: list[str] | None, records: list[Record], skipped: list[dict[str, Any]]) -> None:
    """A runtime the user named that turned out unavailable at load time is an error too."""
    for name in runtimes or []:
        if not any(r.runtime == name for r in records) and any(s["runtime"] == name for s in skipped):
            reason = next(s["reason"] for s in skipped if s["runtime"] == name)
            raise RtkError(f"runtime {name} is not available here: {reason}")


def _report(records: list[Record], skipped: list[dict[str, Any]], refs: References, inputs: Inputs,
            images: str | Path | None, random_images: int, gates: Gates) -> dict[str, Any]:
    preprocess_passed = refs.preprocess_diff <= gates.preprocess_atol
    return {
        # nothing compared is no evidence: a run where every runtime was skipped does not pass
        "passed": bool(records) and all(r.passed for r in records) and preprocess_passed,
        "images": len(inputs.crops), "image_source": str(images) if images else None, "random_images": random_images,
        "labelled": inputs.labels is not None, "tf32": False,
        "preprocess_max_abs_diff": refs.preprocess_diff, "preprocess_passed": preprocess_passed,
        "gates": asdict(gates), "records": [asdict(r) for r in records], "skipped": skipped,
    }


@keeps_torch_threads
def verify_bundle(bundle_path: str | Path, images: str | Path | None = None, random_images: int = 0,
                  checkpoint: str | Path | None = None, runtimes: list[str] | None = None, gates: Gates = Gates(),
                  threads: int | None = None, seed: int = 0, device: str | None = None,
                  echo: Callable[[str], None] = print, store: bool = True,
                  trust: list[str | Path] | None = None, allow_native_code: bool = False) -> dict[str, Any]:
    """Compare every artifact on every runtime here with the reference; store the report in the manifest.

    Runtimes run one at a time (loaded, compared, released). A runtime that cannot exist here is
    skipped; an artifact that is missing, altered or cannot be loaded fails; a file of a format rtk does
    not know is an error. With `trust` (public keys), only a bundle one of them signed, run from private
    copies of its signed files; nothing is stored (the report would change a signed file). Compiled native
    code (AOTInductor packages) is loaded only from such a trusted bundle or with `allow_native_code`."""
    import torch

    from toolkit.evaluation.runners import VERIFY_DEFAULT, RunOptions, plan, require_named, runtimes_on
    from toolkit.training.checkpoint import source_from_manifest

    bundle, store, trusted = _open(bundle_path, trust, store)  # `trusted` kept until verify returns
    spec = bundle.manifest.preprocess
    model, source = source_from_manifest(bundle.manifest, checkpoint)
    if list(source.classes) != bundle.classes and source.kind == "checkpoint":
        raise CheckFailed(f"the bundle's classes {bundle.classes} differ from the checkpoint's {list(source.classes)}")
    inputs = load_inputs(images, random_images, spec, bundle.classes, seed)
    if threads:
        torch.set_num_threads(threads)
    with _tf32_off():
        refs = _references(model, spec, inputs, random_images, bundle)
        wanted = runtimes or runtimes_on(device, VERIFY_DEFAULT) or list(VERIFY_DEFAULT)
        # a signature a trusted key checked (trusted_copy raised otherwise) vouches for the native code too
        options = RunOptions(threads=threads, tf32=False, native_code=allow_native_code or trusted is not None)
        entries = plan(bundle, wanted, lambda: (model, spec), options)
        require_named(entries, runtimes)
        records, skipped = _run_all(entries, bundle, inputs, refs, gates, echo)
    _require_ran(runtimes, records, skipped)
    report = _report(records, skipped, refs, inputs, images, random_images, gates)
    if store:
        bundle.update(verification=report)
    return report


def near_tie_words(ties: dict[str, int]) -> str:
    """How many near-ties, how many flipped, and which way the labelled flips went."""
    text = f"{ties['images']}, {ties['flipped']} flipped"
    if ties["flipped"] and "to_right" in ties:
        text += f" ({ties['to_right']} to right, {ties['to_wrong']} to wrong)"
    return text


def change_words(change_points: float, interval_points: list[float], pairs: dict[str, Any]) -> str:
    """The accuracy change in points with its interval and the pairs behind it."""
    low, high = interval_points
    return (f"{change_points:+.2f} pt, {100 * pairs['confidence']:g}% CI {low:+.2f} to {high:+.2f} pt "
            f"({pairs['gains']} gained, {pairs['losses']} lost of {pairs['images']})")


def resolution_words(pairs: dict[str, Any]) -> str | None:
    """Whether the held-out images resolve the accuracy bound (an interval no wider than it), else how many would."""
    if "bound" not in pairs:
        return None
    bound = f"{100 * pairs['bound']:g} pt"
    if pairs["resolved"]:
        return f"resolves {bound}"
    needed = pairs["images_to_resolve"]
    return (f"too few images to resolve {bound} (interval wider): "
            + (f"~{needed} would" if needed else "no number of images would"))


def format_report(report: dict[str, Any]) -> str:
    """The table printed on stdout."""
    head = f"{'artifact':<20} {'runtime':<18} {'prec':<5} {'max_abs':>9} {'max_rel':>9} {'cos_min':>9} {'top1':>7} {'top5':>7} {'acc':>7} {'d_acc':>7}  result"
    lines = [f"verified on {report['images']} images" + (" (labelled)" if report["labelled"] else "")
             + f"; TF32 off on both sides; in-graph preprocessing vs torchvision Normalize: "
             f"max abs diff {report['preprocess_max_abs_diff']:.2e} ({'ok' if report['preprocess_passed'] else 'FAIL'})", head]

    def pct(v):
        return f"{100 * v:6.2f}%" if v is not None else "      -"

    for r in report["records"]:
        result = "pass" if r["passed"] else f"FAIL ({', '.join(r['failed_metrics'])})"
        lines.append(f"{r['artifact']:<20} {r['runtime']:<18} {r['precision']:<5} {r['max_abs_diff']:9.2e} {r['max_rel_diff']:9.2e} "
                     f"{r['cosine_min']:9.6f} {pct(r['top1_agreement'])} {pct(r['top5_agreement'])} {pct(r['accuracy'])} "
                     f"{pct(r['accuracy_change'])}  {result}")
        if r["details"].get("error"):
            lines.append(f"    {r['details']['error']}")
        elif not r["passed"]:
            lines.append(f"    would pass fp32 allclose at atol >= {r['atol_needed']:.3g} (rtol {report['gates']['rtol']}); "
                         f"top-1 changed on {len(r['top1_changed'])} images: {', '.join(r['top1_changed'][:10])}"
                         + (" ..." if len(r["top1_changed"]) > 10 else ""))
        if r.get("near_ties") and r["tolerance"].get("decisive_gap") is not None:
            lines.append(f"    top-1 {pct(r['top1_agreement_where_clear']).strip()} where decisive (top-two gap > "
                         f"{r['tolerance']['decisive_gap']:.3g}); near-ties {near_tie_words(r['near_ties'])}")
        if r.get("accuracy_pairs") and "bound" in r["accuracy_pairs"]:
            lines.append(f"    accuracy {change_words(100 * r['accuracy_change'], [100 * v for v in r['accuracy_interval']], r['accuracy_pairs'])}; "
                         f"{resolution_words(r['accuracy_pairs'])}")
        if r["details"].get("warning"):
            lines.append(f"    warning: {r['details']['warning']}")
    for s in report["skipped"]:
        lines.append(f"{s['artifact']:<20} {s['runtime']:<18} {s['precision']:<5} skipped: {s['reason']}")
    if not report["records"]:
        lines.append("nothing was compared: every runtime asked for was skipped")
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)
