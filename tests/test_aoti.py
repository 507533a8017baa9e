"""AOTInductor packages (issue 28): `rtk export --format aoti` writes model.aoti.pt2, the loader checks the
archive before any native code is loaded and every input before the package gets it, and the native-code gate:
a package is loaded only with --allow-native-code or from a bundle a --trust key signed, else Skipped."""

from __future__ import annotations

import json
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import error_line, reseal, rtk
from toolkit.core.bundle import Bundle
from toolkit.errors import ArtifactBroken, RtkError
from toolkit.evaluation.runners import Runner, RunOptions, Skipped, plan
from toolkit.evaluation.runners.registry import native_code_refused
from toolkit.evaluation.verify import file_classes
from toolkit.export import loaders

PACKAGE = "model.aoti.pt2"


@pytest.fixture(scope="module")
def aoti_bundle(tiny_run, tmp_path_factory) -> Path:
    """The tiny run exported as ONNX and an AOTInductor package, compiled once (inductor's cache in tmp)."""
    out = tmp_path_factory.mktemp("aoti") / "bundle"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor-cache")))
        result = rtk("export", tiny_run / "checkpoint.pt", "--output", out, "--format", "onnx", "--format", "aoti",
                     "--no-any-size", "--no-verify")
    assert result.exit_code == 0, result.output
    assert f"wrote {PACKAGE} (" in result.output and "batches (1, 3, 16) ran" in result.output
    return out


@pytest.fixture
def no_native_load(monkeypatch) -> list[str]:
    """Record (and refuse) every attempt to load a package's native code."""
    calls: list[str] = []

    def refuse(path, *args, **kwargs):
        calls.append(str(path))
        raise AssertionError(f"native code loaded from {path}")

    monkeypatch.setattr(torch._inductor, "aoti_load_package", refuse)
    return calls


def _copy(bundle: Path, dst: Path) -> Path:
    return Path(shutil.copytree(bundle, dst))


def _so_member(path: Path) -> zipfile.ZipInfo:
    return next(i for i in zipfile.ZipFile(path).infolist() if i.filename.endswith(".wrapper.so"))


def _fails(result, reason: str) -> None:
    """verify failed the package on the aoti runtime, with `reason` in its one FAIL line."""
    assert result.exit_code == 1, result.output
    fails = [ln for ln in result.output.splitlines() if ln.startswith("FAIL ")]
    assert len(fails) == 1 and fails[0].startswith(f"FAIL {PACKAGE} on aoti: "), result.output
    assert reason in fails[0], fails[0]
    assert "Traceback" not in result.output


def test_export_writes_the_package_with_its_manifest_entry(aoti_bundle, no_native_load):
    from toolkit.core.fileio import sha256_file

    entry = json.loads((aoti_bundle / "manifest.json").read_text())["files"][PACKAGE]
    path = aoti_bundle / PACKAGE
    assert (entry["format"], entry["precision"], entry["device"]) == ("aoti", "fp32", "cpu")
    assert entry["sha256"] == sha256_file(path) and entry["bytes"] == path.stat().st_size
    assert entry["inputs"][0]["shape"] == ["batch", 32, 32, 3] and entry["inputs"][0]["dtype"] == "uint8"
    assert _so_member(path).file_size > 1_000_000  # the weights are frozen into the library
    # its classes come from the package's metadata json: nothing of it is loaded
    assert file_classes(path, "aoti") == ["circle", "square", "stripes"]
    assert no_native_load == []


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_bf16_is_planned_only_on_a_cpu_with_bf16_units(monkeypatch, fast_bf16):
    from types import SimpleNamespace

    from toolkit.core.formats import row
    from toolkit.core.preprocess import PreprocessSpec
    from toolkit.export import exporter

    monkeypatch.setattr(exporter, "cpu_info", lambda: SimpleNamespace(fast_bf16=fast_bf16))
    lines: list[str] = []
    config = exporter.ExportConfig(formats=("aoti",), precisions=("fp32", "bf16"))
    inputs = exporter.ExportInputs(config, SimpleNamespace(preprocess=PreprocessSpec(36, 32)), torch.nn.Flatten(),
                                   None, None, None, lines.append)
    jobs = exporter.WRITERS["aoti"](inputs, row("aoti"))  # planned only: nothing is compiled here
    names = [(j.name, j.precision) for j in jobs if "cuda" not in j.name]
    if fast_bf16:
        assert names == [(PACKAGE, "fp32"), ("model.aoti-bf16.pt2", "bf16")] and lines == []
    else:
        assert names == [(PACKAGE, "fp32")]
        assert lines == ["model.aoti-bf16.pt2 not written: this CPU has neither AMX nor AVX512-BF16 "
                         "(bf16 would be emulated, slower than fp32)"]


def test_bf16_needs_the_aoti_format(tiny_run, tmp_path):
    result = rtk("export", tiny_run / "checkpoint.pt", "--output", tmp_path / "c", "--precision", "bf16")
    assert result.exit_code == 2
    assert error_line(result) == "Error: --precision bf16 is written with --format aoti: add --format aoti"


def test_verify_runs_the_package_with_allow_native_code(aoti_bundle, tmp_path):
    report_path = tmp_path / "report.json"
    result = rtk("verify", aoti_bundle, "--random", "4", "--runtime", "aoti", "--allow-native-code",
                 "--json", report_path)
    assert result.exit_code == 0, result.output
    records = json.loads(report_path.read_text())["records"]
    assert [(r["runtime"], r["artifact"], r["passed"]) for r in records] == [("aoti", PACKAGE, True)]
    assert records[0]["max_abs_diff"] <= 1e-4


def test_without_the_flag_or_trust_the_package_is_skipped_never_loaded(aoti_bundle, no_native_load):
    bundle = Bundle.open(aoti_bundle)
    entries = [e for e in plan(bundle, None, lambda: None, RunOptions()) if e.artifact == PACKAGE]
    assert [(e.runtime, type(e).__name__) for e in entries if e.runtime == "aoti"] == [("aoti", "Skipped")]
    assert entries[0].reason == native_code_refused(PACKAGE)
    assert "--allow-native-code" in entries[0].reason and "--trust KEY" in entries[0].reason
    # the gate is the option alone: allowed, the same file becomes a runner
    allowed = plan(bundle, ["aoti"], lambda: None, RunOptions(native_code=True))
    assert len(allowed) == 1 and isinstance(allowed[0], Runner) and allowed[0].artifact == PACKAGE

    result = rtk("verify", aoti_bundle, "--random", "2", "--runtime", "aoti")  # named: an error, not a skip
    assert result.exit_code == 2
    assert error_line(result) == f"Error: runtime aoti is not available here: {native_code_refused(PACKAGE)}"
    assert no_native_load == []


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_package_fails_on_its_hash_before_the_gate(aoti_bundle, tmp_path, damage, no_native_load):
    bundle = _copy(aoti_bundle, tmp_path / "b")
    path = bundle / PACKAGE
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2:]
    else:
        data[len(data) // 2] ^= 0xFF  # inside the library: the same size
    path.write_bytes(bytes(data))
    for flag in ([], ["--allow-native-code"]):  # integrity comes first, allowed or not
        _fails(rtk("verify", bundle, "--random", "2", "--runtime", "aoti", "--runtime", "eager", *flag), PACKAGE)
    entry = plan(Bundle.open(bundle), ["aoti"], lambda: None, RunOptions())[0]
    assert type(entry).__name__ == "Failed" and ("sha256" in entry.reason or "bytes" in entry.reason), entry.reason
    assert no_native_load == []


def _flip_in_library(path: Path) -> None:
    info = _so_member(path)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    data = bytearray(path.read_bytes())
    data[start + info.file_size // 2] ^= 0xFF  # the library's bytes, not the zip's records: loads and runs silently
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "reason"), [
    ("truncated", "not a readable AOTInductor package"),
    ("flipped", r"\.wrapper\.so fails its CRC check \(the file was changed\)")])
def test_a_damaged_package_the_manifest_vouches_for_fails_on_the_loaders_checks(aoti_bundle, tmp_path, damage, reason,
                                                                                no_native_load):
    bundle = _copy(aoti_bundle, tmp_path / "b")
    path = bundle / PACKAGE
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        _flip_in_library(path)
    reseal(bundle, PACKAGE)  # the manifest now matches: only the loader can stop it
    _fails(rtk("verify", bundle, "--random", "2", "--runtime", "aoti", "--allow-native-code"), f"{PACKAGE}: ")
    with pytest.raises(ArtifactBroken, match=reason):
        loaders.load_aoti(path)
    assert no_native_load == []


def _rewrite(path: Path, add: zipfile.ZipInfo | None = None, data: bytes = b"x", drop: str | None = None) -> None:
    with zipfile.ZipFile(path) as old:
        members = [(i, old.read(i)) for i in old.infolist() if not (drop and i.filename.endswith(drop))]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as new:
        for info, content in members + ([(add, data)] if add else []):
            new.writestr(info, content)


def _symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(("change", "reason"), [
    (lambda top: dict(add=zipfile.ZipInfo(f"{top}/data/aotinductor/model/../../../x")), "not a plain file inside"),
    (lambda top: dict(add=zipfile.ZipInfo("../x")), "not a plain file inside"),
    (lambda top: dict(add=zipfile.ZipInfo("/tmp/x")), "not a plain file inside"),
    (lambda top: dict(add=_symlink(f"{top}/data/aotinductor/model/abc.wrapper.cpp"), data=b"/etc/passwd"),
     "not a plain file inside"),
    (lambda top: dict(add=zipfile.ZipInfo(f"{top}/data/aotinductor/model/run.py")), "not part of an AOTInductor package"),
    (lambda top: dict(add=zipfile.ZipInfo(f"{top}/data/aotinductor/model/abc.wrapper.so"), data=b"\x7fELF"),
     "holds one compiled library and its metadata, this one 2 and 1"),
    (lambda top: dict(drop=".wrapper_metadata.json"), "this one 1 and 0")])
def test_a_package_with_an_unexpected_member_is_refused_before_loading(aoti_bundle, tmp_path, change, reason,
                                                                       no_native_load):
    path = Path(shutil.copy(aoti_bundle / PACKAGE, tmp_path / PACKAGE))
    top = zipfile.ZipFile(path).infolist()[0].filename.split("/")[0]
    _rewrite(path, **change(top))
    with pytest.raises(ArtifactBroken, match=reason) as caught:
        loaders.load_aoti(path)
    assert str(caught.value).startswith(f"{PACKAGE}: ") and "\n" not in str(caught.value)
    with pytest.raises(ArtifactBroken, match=reason):
        file_classes(path, "aoti")  # reading its classes checks the archive too
    assert no_native_load == []


def test_the_loader_refuses_an_input_the_package_was_not_compiled_for(aoti_bundle):
    model = loaders.load_aoti(aoti_bundle / PACKAGE)
    calls = []
    real, model.package = model.package, lambda x: calls.append(x.shape) or real(x)
    good = torch.zeros((2, 32, 32, 3), dtype=torch.uint8)
    assert tuple(model(good).shape) == (2, 3) and calls == [(2, 32, 32, 3)]
    for bad in (torch.zeros((1, 16, 16, 3), dtype=torch.uint8),  # another crop size: read out of bounds
                torch.zeros((1, 32, 32, 3), dtype=torch.float32),  # another dtype: reinterpreted bytes
                torch.zeros((32, 32, 3), dtype=torch.uint8),
                torch.zeros((0, 32, 32, 3), dtype=torch.uint8),
                np.zeros((1, 32, 32, 3), np.uint8)):
        with pytest.raises(RtkError, match=r"^model\.aoti\.pt2 takes uint8 \[N, 32, 32, 3\] \(N 1 to 65536\), got ") as caught:
            model(bad)
        assert "\n" not in str(caught.value)
    assert calls == [(2, 32, 32, 3)]  # none of them reached the package
    with pytest.raises(ArtifactBroken, match="compiled for cpu, not for cuda"):
        model.to("cuda")
    with pytest.raises(ArtifactBroken, match="is compiled for 'cpu', not for cuda"):
        loaders.load_aoti(aoti_bundle / PACKAGE, "cuda")


def _public_key(folder: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / "team.pem", folder / "team.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def test_a_bundle_signed_by_a_trusted_key_runs_the_package_without_the_flag(aoti_bundle, tmp_path):
    pytest.importorskip("model_signing", reason="signing needs the sign extra (model-signing)")
    bundle = _copy(aoti_bundle, tmp_path / "b")
    private, public = _public_key(tmp_path)
    assert rtk("sign", bundle, "--key", private).exit_code == 0
    report_path = tmp_path / "report.json"
    result = rtk("verify", bundle, "--random", "2", "--runtime", "aoti", "--trust", public, "--json", report_path)
    assert result.exit_code == 0, result.output
    assert [(r["runtime"], r["passed"]) for r in json.loads(report_path.read_text())["records"]] == [("aoti", True)]
    # another key's trust is no trust: the signature check refuses the bundle before anything runs
    (tmp_path / "stranger").mkdir()
    _, stranger = _public_key(tmp_path / "stranger")
    result = rtk("verify", bundle, "--random", "2", "--runtime", "aoti", "--trust", stranger)
    assert result.exit_code != 0 and "is signed by a key that is not trusted" in error_line(result)


def test_an_aoti_skip_is_what_benchmark_lists_too(aoti_bundle, no_native_load):
    result = rtk("benchmark", aoti_bundle, "--runtime", "aoti", "--batch-size", "1", "--warmup", "0",
                 "--iterations", "1", "--min-seconds", "0", "--rounds", "1")
    assert result.exit_code == 2 and "--allow-native-code" in error_line(result)
    assert no_native_load == []
    assert isinstance(plan(Bundle.open(aoti_bundle), ["aoti"], lambda: None, RunOptions())[0], Skipped)


def test_export_writes_pytorch_native_int8_that_verify_gates(tiny_run, tiny_data, tmp_path):
    """--precision int8 adds model.aoti-int8.pt2 (PT2E, calibrated on the calibration images) beside the fp32
    package; verify gates it against eager on labelled images like every int8 file."""
    from toolkit.export.pt2e import pt2e_problem

    if pt2e_problem():
        pytest.skip(pt2e_problem())
    out, report_path = tmp_path / "bundle", tmp_path / "report.json"
    result = rtk("export", tiny_run / "checkpoint.pt", "--output", out, "--format", "aoti", "--precision", "fp32",
                 "--precision", "int8", "--calibration-data", tiny_data / "train", "--no-verify")
    assert result.exit_code == 0, result.output
    entry = json.loads((out / "manifest.json").read_text())["files"]["model.aoti-int8.pt2"]
    assert (entry["precision"], entry["device"], entry["quantization"]["quantizer"]) == ("int8", "cpu", "x86_inductor")
    result = rtk("verify", out, "--images", tiny_data / "val", "--runtime", "aoti", "--allow-native-code",
                 "--json", report_path)
    records = {r["artifact"]: r for r in json.loads(report_path.read_text())["records"]}
    assert set(records) == {PACKAGE, "model.aoti-int8.pt2"}, result.output
    assert records["model.aoti-int8.pt2"]["precision"] == "int8"
    assert records["model.aoti-int8.pt2"]["max_abs_diff"] > records[PACKAGE]["max_abs_diff"]  # it is int8 arithmetic
    assert result.exit_code == 0 and all(r["passed"] for r in records.values()), result.output


def test_optimize_builds_the_packages_the_bundle_lacks(aoti_bundle, tmp_path, monkeypatch):
    """`rtk optimize --allow-native-code` adds the packages a bundle lacks with export's writer and checks (the
    batch check loads each); the compile is the fixture's, copied, so this test adds no compile time."""
    from toolkit.evaluation import optimize
    from toolkit.export import aoti
    from toolkit.training.checkpoint import source_from_manifest

    bundle_dir = _copy(aoti_bundle, tmp_path / "b")
    (bundle_dir / PACKAGE).unlink()
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    del manifest["files"][PACKAGE]
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    compiled = []
    monkeypatch.setattr(aoti, "write_aoti", lambda module, example, path, meta, device="cpu":
                        compiled.append(device) or shutil.copyfile(aoti_bundle / PACKAGE, path))
    bundle = Bundle.open(bundle_dir)
    model, spec = source_from_manifest(bundle.manifest)
    lines: list[str] = []
    assert optimize.build_native(bundle, model, None, tmp_path, lines.append, precisions=("fp32",)) == [PACKAGE]
    assert compiled == ["cpu"] and any(line.startswith(f"built {PACKAGE} (torch.export + AOTInductor") for line in lines)
    entry = json.loads((bundle_dir / "manifest.json").read_text())["files"][PACKAGE]
    assert (entry["format"], entry["precision"], entry["device"]) == ("aoti", "fp32", "cpu")
    assert Bundle.open(bundle_dir).integrity_problem(PACKAGE) is None
    assert not list(bundle_dir.glob(".rtk-add-*"))  # the staging folder is gone
    runners = [e for e in optimize.candidates(bundle, lambda: (model, spec), 1, native_code=True) if e.runtime == "aoti"]
    assert [(e.artifact, isinstance(e, Runner)) for e in runners] == [(PACKAGE, True)]
    assert optimize.build_native(bundle, model, None, tmp_path, lines.append, precisions=("fp32",)) == []  # nothing lacking
