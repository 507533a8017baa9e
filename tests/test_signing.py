"""Signed bundles (issue 26): `rtk sign`, `--trust` on every consumer, the tamper matrix (each refusal its own
line), no window between the check and the load, key problems, and model-signing 1.1.1's pitfalls guarded."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("model_signing", reason="the signing tests need the sign extra (model-signing)")

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa  # noqa: E402

from tests.conftest import BLOCK_TORCH, copy_bundle, error_line, rtk  # noqa: E402
from toolkit.core.fileio import sha256_file  # noqa: E402
from toolkit.core.manifest import Recommendation  # noqa: E402
from toolkit.errors import CheckFailed, RtkError  # noqa: E402
from toolkit.serving import signing  # noqa: E402
from toolkit.serving.classifier import Classifier  # noqa: E402
from toolkit.serving.signing import SIGNATURE, sign_folder, verify_folder  # noqa: E402

pytestmark = pytest.mark.serving

BUNDLE_FILES = ("labels.txt", "manifest.json", "model.onnx", "selftest.npz")


def _write_key(folder: Path, name: str, key, password: bytes | None = None) -> tuple[Path, Path]:
    """PEM private key NAME.pem (PKCS8, encrypted with `password`) and its public key NAME.pub.pem."""
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    out = {}
    for name, key, password in [("team", ec.generate_private_key(ec.SECP256R1()), None),
                                ("other", ec.generate_private_key(ec.SECP384R1()), None),
                                ("locked", ec.generate_private_key(ec.SECP256R1()), b"s3cret"),
                                ("k1", ec.generate_private_key(ec.SECP256K1()), None),
                                ("rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048), None),
                                ("ed25519", ed25519.Ed25519PrivateKey.generate(), None)]:
        out[name], out[f"{name}.pub"] = _write_key(folder, name, key, password)
    return out


@pytest.fixture(scope="module")
def signed(tiny_bundle, tmp_path_factory, keys) -> Path:
    """A one-model copy of the tiny bundle, signed by `team`; tests copy it before changing anything."""
    bundle = copy_bundle(tiny_bundle, tmp_path_factory.mktemp("signed") / "bundle")
    result = rtk("sign", bundle, "--key", keys["team"])
    assert result.exit_code == 0, result.output
    assert f"signed 4 files of {bundle} into {bundle / SIGNATURE}" in result.output
    return bundle


def _copy(signed: Path, tmp_path: Path, name: str = "bundle") -> Path:
    return Path(shutil.copytree(signed, tmp_path / name, symlinks=True))


def _flip_byte(path: Path, at: int | None = None) -> None:
    """Change one byte in place: the same size, another sha256."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _image(tiny_data) -> Path:
    return sorted((tiny_data / "val").rglob("*.png"))[0]


# ---------------------------------------------------------------- signed: every consumer accepts


def test_classifier_serves_a_private_copy_of_the_signed_files(signed, keys, tiny_data):
    plain = Classifier.load(signed, threads=1)
    clf = Classifier.load(signed, threads=1, self_test=True, trust=[keys["other.pub"], keys["team.pub"]])
    assert clf.trusted.verified.key == keys["team.pub"] and clf.path.parent == clf.trusted.root
    assert sorted(p.name for p in clf.trusted.root.iterdir()) == ["manifest.json", "model.onnx", "selftest.npz"]
    assert oct(clf.trusted.root.stat().st_mode & 0o777) == "0o700"
    for name in ("manifest.json", "model.onnx", "selftest.npz"):
        assert sha256_file(clf.trusted.root / name) == clf.trusted.verified.digests[name]
    image = _image(tiny_data)
    assert clf.predict([image])[0].scores == plain.predict([image])[0].scores
    root = clf.trusted.root
    del clf
    assert not root.exists()  # the private copy goes with the classifier


@pytest.mark.torch_stack  # rtk verify
def test_rtk_predict_and_rtk_verify_accept_a_signed_bundle(signed, keys, tiny_data, tmp_path):
    image = _image(tiny_data)
    result = rtk("predict", signed, image, "--trust", keys["team.pub"], "--self-test")
    assert result.exit_code == 0, result.output
    result = rtk("predict", signed, image, env={"RTK_TRUST": f"{keys['other.pub']}:{keys['team.pub']}"})
    assert result.exit_code == 0, result.output
    bundle = _copy(signed, tmp_path)
    before = (bundle / "manifest.json").read_bytes()
    result = rtk("verify", bundle, "--random", "2", "--runtime", "ort-cpu", "--trust", keys["team.pub"])
    assert result.exit_code == 0, result.output
    assert (bundle / "manifest.json").read_bytes() == before  # the report is not stored: the bundle stays signed
    verify_folder(bundle, [keys["team.pub"]])


@pytest.mark.torch_stack  # rtk verify
def test_rtk_verify_refuses_an_unsigned_bundle_at_its_entry(tiny_bundle, keys, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    result = rtk("verify", bundle, "--random", "2", "--runtime", "ort-cpu", "--trust", keys["team.pub"])
    assert result.exit_code == 1 and "is not signed (no bundle.sig)" in error_line(result)
    assert "random" not in result.output  # refused before any work


def test_rtk_triton_from_a_trusted_bundle_signs_the_repository(signed, keys, tmp_path):
    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc] (dev extra)")
    repo = tmp_path / "repo"
    result = rtk("triton", signed, "-o", repo, "--name", "tiny", "--device", "cpu", "--trust", keys["team.pub"],
                 "--key", keys["locked"], "--password-env", "RTK_TEST_KEY_PASSWORD",
                 env={"RTK_TEST_KEY_PASSWORD": "s3cret"})
    assert result.exit_code == 0, result.output
    folder = repo / "tiny"
    assert sha256_file(folder / "1" / "model.onnx") == sha256_file(signed / "model.onnx")
    verified = verify_folder(folder, [keys["locked.pub"]])
    assert sorted(verified.digests) == ["1/model.onnx", "config.pbtxt", "labels.txt"]
    # the README's check before deployment: model-signing's own command accepts rtk's signature
    own = subprocess.run([sys.executable, "-m", "model_signing", "verify", "key", str(folder), "--signature",
                          str(folder / SIGNATURE), "--public_key", str(keys["locked.pub"]), "--no-ignore-git-paths"],
                         capture_output=True, text=True)
    assert own.returncode == 0 and "Verification succeeded" in own.stdout + own.stderr, own.stdout + own.stderr
    (folder / "config.pbtxt").write_text((folder / "config.pbtxt").read_text().replace("32", "64"))
    with pytest.raises(CheckFailed, match="config.pbtxt changed since it was signed"):
        verify_folder(folder, [keys["locked.pub"]])


def test_rtk_triton_refuses_an_untrusted_bundle_and_writes_nothing(signed, keys, tmp_path):
    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc] (dev extra)")
    result = rtk("triton", signed, "-o", tmp_path / "repo", "--device", "cpu", "--trust", keys["other.pub"])
    assert result.exit_code == 1 and "signed by a key that is not trusted" in error_line(result)
    assert not (tmp_path / "repo" / "bundle").exists()


# ---------------------------------------------------------------- the tamper matrix


def _resign_ignoring(bundle: Path, keys) -> None:
    """A signature by the trusted key whose statement also ignores evil.onnx (made with the library directly,
    as its CLI allows): model-signing adds the statement's ignore list to the verifier's, so evil.onnx would pass."""
    import model_signing as ms

    hashing = (ms.hashing.Config().set_ignored_paths(paths=[SIGNATURE, "evil.onnx"], ignore_git_paths=False)
               .use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False))
    ms.signing.Config().use_elliptic_key_signer(private_key=keys["team"]).set_hashing_config(hashing).sign(
        bundle, bundle.parent / "evil.sig")
    shutil.move(bundle.parent / "evil.sig", bundle / SIGNATURE)
    (bundle / "evil.onnx").write_bytes(b"planted")


def _flip_signature(bundle: Path, keys) -> None:
    data = json.loads((bundle / SIGNATURE).read_text())
    sig = bytearray(base64.b64decode(data["dsseEnvelope"]["signatures"][0]["sig"]))
    sig[len(sig) // 2] ^= 0x01
    data["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    (bundle / SIGNATURE).write_text(json.dumps(data))


def _symlink_swap(bundle: Path, keys) -> None:
    outside = bundle.parent / "model.onnx"
    shutil.copy(bundle / "model.onnx", outside)  # the same bytes, but the bundle now points out of itself
    (bundle / "model.onnx").unlink()
    (bundle / "model.onnx").symlink_to(outside)


TAMPER = {
    **{f"byte changed in {name}": (lambda b, k, n=name: _flip_byte(b / n), f"{name} changed since it was signed")
       for name in BUNDLE_FILES},
    "file added": (lambda b, k: (b / "notes.txt").write_text("hi"), "notes.txt added since it was signed"),
    "git file added": (lambda b, k: (b / ".gitattributes").write_text("* -text"), ".gitattributes added since"),
    "file deleted": (lambda b, k: (b / "selftest.npz").unlink(), "selftest.npz removed since it was signed"),
    "file renamed": (lambda b, k: (b / "labels.txt").rename(b / "labels.old"),
                     "labels.txt removed; labels.old added since it was signed"),
    "symlink added": (lambda b, k: (b / "link.onnx").symlink_to("model.onnx"), "link.onnx in"),
    "file replaced by a symlink": (_symlink_swap, "model.onnx in"),
    "trt-cache folder": (lambda b, k: (b / "trt-cache").mkdir(), "is TensorRT's engine cache"),
    "FIFO added": (lambda b, k: os.mkfifo(b / "pipe"), "pipe in"),
    "signature byte flipped": (_flip_signature, "does not verify with"),
    "signature deleted": (lambda b, k: (b / SIGNATURE).unlink(), "is not signed (no bundle.sig)"),
    "signature not JSON": (lambda b, k: _flip_byte(b / SIGNATURE, 0), "is not JSON"),
    "signed with another key": (lambda b, k: sign_folder(b, k["other"]), "is signed by a key that is not trusted"),
    "statement ignores a planted file": (_resign_ignoring, "was not made by rtk sign"),
}


def test_every_refusal_has_its_own_message():
    messages = [message for _, message in TAMPER.values()]
    assert len(set(messages)) == len(messages)


@pytest.mark.parametrize("attack", TAMPER)
def test_a_tampered_bundle_is_refused_in_one_line(signed, keys, tmp_path, tiny_data, attack):
    change, message = TAMPER[attack]
    bundle = _copy(signed, tmp_path)
    change(bundle, keys)
    result = rtk("predict", bundle, _image(tiny_data), "--trust", keys["team.pub"])
    assert result.exit_code == 1, result.output
    line = error_line(result)
    assert message in line and "Traceback" not in result.output
    if "symlink" in attack:
        assert "is a symlink" in line
    if "FIFO" in attack:
        assert "is not a regular file" in line


def test_two_bundles_verified_one_after_the_other_the_second_tampered(signed, keys, tmp_path):
    """model-signing's pitfall: one verifying config reused across bundles let a planted file through."""
    first, second = _copy(signed, tmp_path, "first"), _copy(signed, tmp_path, "second")
    (second / "planted.onnx").write_bytes((second / "model.onnx").read_bytes())
    assert Classifier.load(first, trust=[keys["team.pub"]]).trusted is not None
    with pytest.raises(CheckFailed, match="planted.onnx added since it was signed"):
        Classifier.load(second, trust=[keys["team.pub"]])
    assert verify_folder(first, [keys["team.pub"]]).digests  # and the first still passes afterwards


# ---------------------------------------------------------------- no window between the check and the load


def test_a_file_swapped_after_the_check_is_never_loaded(signed, keys, tmp_path, monkeypatch):
    bundle = _copy(signed, tmp_path)
    real = signing.verify_folder

    def verify_then_swap(root, trust):
        verified = real(root, trust)
        _flip_byte(Path(root) / "model.onnx")  # the attacker's move, once the signature has been checked
        return verified

    monkeypatch.setattr(signing, "verify_folder", verify_then_swap)
    with pytest.raises(CheckFailed, match="model.onnx in .* changed after its signature was verified"):
        Classifier.load(bundle, trust=[keys["team.pub"]])


def test_a_trusted_openvino_ir_is_served_from_private_copies_of_both_its_files(signed, keys, tmp_path, tiny_data):
    pytest.importorskip("openvino", reason="needs the openvino extra")
    import onnxruntime as ort

    from toolkit.export.openvino import write_fp32
    from toolkit.serving.sessions import SessionSettings

    bundle = _copy(signed, tmp_path)
    meta = dict(ort.InferenceSession(str(bundle / "model.onnx")).get_modelmeta().custom_metadata_map)
    xml, weights = bundle / "model.openvino.xml", bundle / "model.openvino.bin"
    write_fp32(bundle / "model.onnx", xml, meta)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["model.openvino.xml"] = {
        **manifest["files"]["model.onnx"], "format": "openvino", "sha256": sha256_file(xml), "bytes": xml.stat().st_size,
        "weights": {"file": weights.name, "sha256": sha256_file(weights), "bytes": weights.stat().st_size}}
    manifest["recommended"] = Recommendation(runtime="openvino", artifact=xml.name, precision="fp32",
                                             session=SessionSettings(engine="openvino", threads=1).to_dict()).to_dict()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    sign_folder(bundle, keys["team"])
    clf = Classifier.load(bundle, trust=[keys["team.pub"]], runtime="openvino")
    assert clf.settings.engine == "openvino" and clf.path == clf.trusted.root / xml.name
    assert sorted(p.name for p in clf.trusted.root.iterdir()) == [
        "manifest.json", "model.openvino.bin", "model.openvino.xml", "selftest.npz"]
    assert clf.predict([_image(tiny_data)])[0].ok
    _flip_byte(weights)  # the weights, too, are a signed file
    with pytest.raises(CheckFailed, match="model.openvino.bin changed since it was signed"):
        Classifier.load(bundle, trust=[keys["team.pub"]], runtime="openvino")


def test_the_loaded_bytes_stay_the_signed_ones_when_the_bundle_changes_later(signed, keys, tmp_path):
    bundle = _copy(signed, tmp_path)
    clf = Classifier.load(bundle, trust=[keys["team.pub"]], self_test=True)
    with np.load(bundle / "selftest.npz") as data:
        arrays = dict(data)
    arrays["model.onnx"] = arrays["model.onnx"] + 5.0
    np.savez(bundle / "selftest.npz", **arrays)  # a later self-test would fail on these
    clf.self_test()  # it reads the private copy, which is the signed file


# ---------------------------------------------------------------- rtk serve --trust


def test_rtk_serve_with_trust_serves_a_signed_bundle(signed, keys, tmp_path, tiny_data):
    hostile = pytest.importorskip("tests.test_server_hostile")
    with hostile.rtk_serve(signed, tmp_path, "--trust", str(keys["team.pub"])) as served:
        image = _image(tiny_data).read_bytes()
        body, content_type = hostile.multipart([image])
        status, _, answer = hostile.http(f"{served.url}/v2/models/bundle/classify", "POST", body,
                                         {"Content-Type": content_type})
        assert status == 200, answer
        assert "signature verified: 4 files" in served.stderr()


@pytest.mark.parametrize("problem", ["unsigned", "tampered"])
def test_rtk_serve_with_trust_never_becomes_ready_on_a_refused_bundle(signed, tiny_bundle, keys, tmp_path, problem):
    pytest.importorskip("fastapi", reason="needs the serve extra")
    from tests.ports import free_port
    from tests.test_server import http_ready

    if problem == "unsigned":
        bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    else:
        bundle = _copy(signed, tmp_path)
        _flip_byte(bundle / "labels.txt")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from toolkit.cli import main; main()", "serve", str(bundle),
                             "--port", str(port), "--threads", "1", "--trust", str(keys["team.pub"])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        ever_ready = False
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            ever_ready |= http_ready(f"127.0.0.1:{port}")
            time.sleep(0.05)
        assert proc.poll() == 1 and not ever_ready
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 9)
            proc.wait(5)
    out = proc.stdout.read()
    assert "Traceback" not in out and "ready" not in out
    expected = "is not signed (no bundle.sig)" if problem == "unsigned" else "labels.txt changed since it was signed"
    assert expected in out


# ---------------------------------------------------------------- rtk sign


def _snapshot(bundle: Path) -> dict[str, tuple[int, int, str]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, sha256_file(p)) for p in bundle.iterdir()}


def test_resigning_replaces_the_signature_and_touches_nothing_else(signed, keys, tmp_path):
    bundle = _copy(signed, tmp_path)
    before = _snapshot(bundle)
    result = rtk("sign", bundle, "--key", keys["other"])
    assert result.exit_code == 0, result.output
    after = _snapshot(bundle)
    assert set(after) == set(before)  # no temporary file left, nothing added
    assert {k: v for k, v in after.items() if k != SIGNATURE} == {k: v for k, v in before.items() if k != SIGNATURE}
    assert after[SIGNATURE][2] != before[SIGNATURE][2]
    assert verify_folder(bundle, [keys["other.pub"]]).key == keys["other.pub"]
    with pytest.raises(CheckFailed, match="signed by a key that is not trusted"):
        verify_folder(bundle, [keys["team.pub"]])


def test_an_encrypted_key_signs_with_its_password(signed, keys, tmp_path):
    bundle = _copy(signed, tmp_path)
    result = rtk("sign", bundle, "--key", keys["locked"], "--password-env", "PW", env={"PW": "s3cret"})
    assert result.exit_code == 0, result.output
    verify_folder(bundle, [keys["locked.pub"]])


@pytest.mark.parametrize("key,env,message", [
    ("team.pub", {}, "is not a private key (--key signs; --trust takes the public key)"),
    ("rsa", {}, "is not an EC key (RSA): model-signing signs with EC keys"),
    ("ed25519", {}, "is not an EC key (Ed25519)"),
    ("k1", {}, "is on curve secp256k1"),
    ("locked", {}, "is encrypted: give --password-env VAR"),
    ("locked", {"PW": "wrong"}, "the password does not decrypt it"),
    ("team", {"PW": "s3cret"}, "is not encrypted, but a password was given"),
    ("missing", {}, "cannot read it"),
])
def test_a_bad_signing_key_is_one_line(signed, keys, tmp_path, key, env, message):
    bundle = _copy(signed, tmp_path)
    before = (bundle / SIGNATURE).read_bytes()
    args = ["--password-env", "PW"] if env else []
    result = rtk("sign", bundle, "--key", keys.get(key, tmp_path / "missing.pem"), *args, env=env)
    assert result.exit_code == 2 and message in error_line(result)
    assert (bundle / SIGNATURE).read_bytes() == before


def test_an_unset_password_variable_is_one_line(signed, keys, tmp_path):
    result = rtk("sign", _copy(signed, tmp_path), "--key", keys["locked"], "--password-env", "RTK_NO_SUCH_VAR")
    assert result.exit_code == 2 and "the environment variable RTK_NO_SUCH_VAR is not set" in error_line(result)


@pytest.mark.parametrize("key,message", [
    ("team", "is a private key: trust the public key (openssl ec -in key.pem -pubout"),
    ("rsa.pub", "is not an EC key (RSA)"),
    ("missing", "cannot read it"),
])
def test_a_bad_trusted_key_is_one_line(signed, keys, tiny_data, tmp_path, key, message):
    result = rtk("predict", signed, _image(tiny_data), "--trust", keys.get(key, tmp_path / "missing.pem"))
    assert result.exit_code == 2 and message in error_line(result)


def test_without_the_sign_extra_trust_is_one_line_naming_it(signed, keys, tiny_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "model_signing", None)  # what an install without rtk[sign] sees
    result = rtk("predict", signed, _image(tiny_data), "--trust", keys["team.pub"])
    assert result.exit_code == 2 and "pip install 'rtk[sign]'" in error_line(result)


def test_an_empty_trust_list_is_refused_not_ignored(signed):
    with pytest.raises(RtkError, match="--trust needs at least one public key file"):
        Classifier.load(signed, trust=[])
    with pytest.raises(RtkError, match="--trust needs a bundle folder"):
        Classifier.load(signed / "model.onnx", trust=[signed / "labels.txt"])


@pytest.mark.parametrize("change,message", [
    (lambda b: (b / "trt-cache").mkdir(), "is TensorRT's engine cache"),
    (lambda b: (b / "extra.onnx").symlink_to("model.onnx"), "extra.onnx in"),
    (lambda b: _flip_byte(b / "model.onnx"), "model.onnx's sha256 differs from the manifest's"),
    (lambda b: (b / "manifest.json").unlink(), "is neither an rtk bundle (no manifest.json) nor a Triton model folder"),
])
def test_rtk_sign_refuses_what_it_must_not_vouch_for(signed, keys, tmp_path, change, message):
    bundle = _copy(signed, tmp_path)
    before = (bundle / SIGNATURE).read_bytes()
    change(bundle)
    result = rtk("sign", bundle, "--key", keys["team"])
    assert result.exit_code in (1, 2) and message in error_line(result)
    assert (bundle / SIGNATURE).read_bytes() == before


# ---------------------------------------------------------------- torch-free, and the README's key commands


def test_signing_and_trusted_loading_import_no_torch(signed, keys, tmp_path):
    bundle = _copy(signed, tmp_path)
    code = BLOCK_TORCH + textwrap.dedent(f"""
        import sys
        from toolkit.serving.classifier import Classifier
        from toolkit.serving.signing import sign_folder
        sign_folder({str(bundle)!r}, {str(keys['team'])!r})
        Classifier.load({str(bundle)!r}, threads=1, self_test=True, trust=[{str(keys['team.pub'])!r}])
        print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'onnx')))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ,
                         "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_the_readme_openssl_commands_make_keys_rtk_accepts(signed, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Signing and trust", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in section.splitlines() if line.startswith("openssl ")]
    assert len(commands) >= 2
    for command in commands:
        subprocess.run(command, shell=True, check=True, cwd=tmp_path, capture_output=True)
    bundle = _copy(signed, tmp_path)
    sign_folder(bundle, tmp_path / "key.pem")
    assert verify_folder(bundle, [tmp_path / "pub.pem"]).key == tmp_path / "pub.pem"
