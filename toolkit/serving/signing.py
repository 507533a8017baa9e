"""Signed bundles: `rtk sign` and `--trust`, over OpenSSF model signing (`model-signing`, extra `sign`).

A signature (BUNDLE/bundle.sig, a Sigstore bundle JSON: a DSSE envelope over an in-toto statement listing
every file's sha256) covers every file of the folder but itself. Torch-free; `model_signing` is imported
only when signing or trust is used. Our own rules around model-signing 1.1.1's pitfalls:
- a fresh signing/verifying/hashing config per call (a reused verifying config kept the ignore list of
  the previous bundle: a planted file went through);
- an explicit per-file sha256 hashing config on both sides (sharded hashing crashes on verify), symlinks
  refused, nothing ignored but the signature itself (the library ignores `.git*` unless told not to, on
  each side, and does not exclude the signature file), and the signed statement checked to say so: the
  library adds the statement's own ignore list to the verifier's;
- `set_ignore_unsigned_files` never used (reported to read outside the folder); the signer is always the
  offline EC key method (the default one is online Sigstore; certificate mode checks no identity in 1.1.1),
  with P-256/P-384/P-521 keys only and the password as bytes;
- our one-line messages (the library's InvalidSignature has an empty message).
What a consumer loads is never re-read from the bundle: `TrustedCopy` copies each file it needs into a
private folder while hashing it, and refuses it unless that sha256 is the signed one.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from toolkit.core.fileio import folder_lock, naming, write_text
from toolkit.errors import ArtifactBroken, CheckFailed, RtkError, first_line

SIGNATURE = "bundle.sig"
TRT_CACHE = "trt-cache"  # TensorRT's engine cache: rebuilt per machine, never part of what is signed
SIGNATURE_MAX_BYTES = 16 << 20  # a statement lists a digest per file: far below this for any bundle
KEY_MAX_BYTES = 1 << 20
PREDICATE = "https://model_signing/signature/v1.0"
# What our signatures say about how they were made; a signature that says anything else is refused.
SERIALIZATION = {"method": "files", "hash_type": "sha256", "allow_symlinks": False, "ignore_paths": [SIGNATURE]}
TRUST_HELP = "openssl ec -in key.pem -pubout -out pub.pem"


def _model_signing():
    try:
        import model_signing
        from model_signing import hashing, signing, verifying  # noqa: F401  (submodules the calls use)
    except ImportError as exc:
        raise RtkError(f"signing and --trust need model-signing and pyopenssl ({first_line(exc)}): "
                       "pip install 'rtk[sign]'") from None
    return model_signing


def _hashing_config(ms):
    """A fresh hashing config: one sha256 per file, symlinks refused, only the signature ignored (git
    paths too are signed)."""
    return (ms.hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False)
            .use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False))


# ---------------------------------------------------------------- the folder


def folder_files(root: Path) -> list[str]:
    """Every file under `root` but the signature, as sorted POSIX paths; a symlink, a special file or a
    trt-cache folder anywhere is refused (ArtifactBroken)."""
    if root.is_symlink() or not root.is_dir():
        raise RtkError(f"{root} is not a folder: a signature covers a bundle folder")
    names = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        for entry in sorted(dirs + files):
            path = here / entry
            rel = path.relative_to(root).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise ArtifactBroken(f"{rel} in {root} is a symlink: a signed bundle holds plain files only")
            if stat.S_ISDIR(mode) and entry == TRT_CACHE:
                raise ArtifactBroken(f"{rel} in {root} is TensorRT's engine cache (built per machine): move it "
                                     "out of the bundle; a signed bundle never holds it")
            if not stat.S_ISDIR(mode) and not stat.S_ISREG(mode):
                raise ArtifactBroken(f"{rel} in {root} is not a regular file: a signed bundle holds plain files only")
            if stat.S_ISREG(mode) and rel != SIGNATURE:
                names.append(rel)
    return sorted(names)


# ---------------------------------------------------------------- keys


def _key_text(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(KEY_MAX_BYTES + 1)
    except OSError as exc:
        raise RtkError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > KEY_MAX_BYTES or b"-----BEGIN" not in data:
        raise RtkError(f"{what} {path} is not a PEM key file")
    return data


def _check_ec(key, path: Path, what: str) -> None:
    """model-signing's key method signs with EC keys on P-256, P-384 and P-521 only."""
    from cryptography.hazmat.primitives.asymmetric import ec

    public = key.public_key() if hasattr(key, "public_key") else key
    if not isinstance(public, ec.EllipticCurvePublicKey):
        kind = type(public).__name__.removeprefix("_").replace("PublicKey", "")
        raise RtkError(f"{what} {path} is not an EC key ({kind}): model-signing signs with EC keys on P-256, P-384 or P-521 "
                       "(openssl ecparam -name prime256v1 -genkey -noout -out key.pem)")
    if public.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise RtkError(f"{what} {path} is on curve {public.curve.name}: model-signing takes P-256, P-384 or P-521")


def load_private_key(path: Path, password: bytes | None) -> None:
    """Check that `path` is an EC private key that `password` opens; one line saying what is wrong if not."""
    from cryptography.hazmat.primitives import serialization

    data = _key_text(path, "--key")
    if b"PRIVATE KEY-----" not in data:
        raise RtkError(f"--key {path} is not a private key (--key signs; --trust takes the public key)")
    encrypted = b"ENCRYPTED" in data
    if encrypted and password is None:
        raise RtkError(f"--key {path} is encrypted: give --password-env VAR, VAR holding its password")
    if not encrypted and password is not None:
        raise RtkError(f"--key {path} is not encrypted, but a password was given (--password-env)")
    try:
        key = serialization.load_pem_private_key(data, password)
    except (ValueError, TypeError) as exc:
        raise RtkError(f"--key {path}: " + ("the password does not decrypt it" if encrypted else
                                            f"not a readable PEM private key ({first_line(exc)})")) from None
    except Exception as exc:  # an unsupported algorithm in the PEM
        raise RtkError(f"--key {path}: not a usable private key ({first_line(exc)})") from None
    _check_ec(key, path, "--key")


def key_hint(public_key) -> str:
    """The hint model-signing stores in a signature: sha256 of the public key's PEM (SubjectPublicKeyInfo)."""
    from cryptography.hazmat.primitives import serialization

    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def trusted_keys(trust: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """{key hint: path} of the --trust public keys, each checked to be an EC public key."""
    from cryptography.hazmat.primitives import serialization

    if not trust:
        raise RtkError("--trust needs at least one public key file")
    keys = {}
    for item in trust:
        path = Path(item)
        data = _key_text(path, "--trust")
        if b"PRIVATE KEY-----" in data:
            raise RtkError(f"--trust {path} is a private key: trust the public key ({TRUST_HELP})")
        try:
            key = serialization.load_pem_public_key(data)
        except Exception as exc:
            raise RtkError(f"--trust {path}: not a readable PEM public key ({first_line(exc)})") from None
        _check_ec(key, path, "--trust")
        keys[key_hint(key)] = path
    return keys


# ---------------------------------------------------------------- signing


def password_from_env(var: str | None) -> bytes | None:
    """The key password held in environment variable `var` (never on the command line), as bytes."""
    if var is None:
        return None
    if var not in os.environ:
        raise RtkError(f"--password-env {var}: the environment variable {var} is not set")
    return os.environ[var].encode()


def sign_folder(root: str | os.PathLike, key: str | os.PathLike, password: bytes | None = None) -> int:
    """Write ROOT/bundle.sig over every file of ROOT but itself (replacing an old signature); returns the
    number of files signed. Under the folder's writer lock, so no rtk writer is half-way through."""
    ms = _model_signing()
    root, key = Path(root), Path(key)
    load_private_key(key, password)
    with folder_lock(root, "rtk sign"), tempfile.TemporaryDirectory(prefix="rtk-sign-") as scratch:
        names = folder_files(root)
        if not names:
            raise RtkError(f"{root} holds no file to sign")
        out = Path(scratch) / SIGNATURE  # outside the folder: a file written inside would be hashed as its own
        config = ms.signing.Config().use_elliptic_key_signer(private_key=key, password=password)
        try:
            config.set_hashing_config(_hashing_config(ms)).sign(root, out)
        except (OSError, ValueError) as exc:  # a file that vanished or became unreadable while it was hashed
            raise RtkError(f"cannot sign {root}: {first_line(exc)}") from None
        text = out.read_text(encoding="utf-8")
        signed = _statement(text.encode(), root)
        if sorted(signed) != names:
            raise RtkError(f"{root} changed while it was signed: sign it again")
        write_text(root / SIGNATURE, text)
    return len(names)


def sign_bundle(root: str | os.PathLike, key: str | os.PathLike, password: bytes | None = None) -> int:
    """`rtk sign`: an rtk bundle, checked first to be what its manifest says (every listed file's sha256,
    labels.txt), or a Triton model folder; then sign_folder."""
    from toolkit.core.bundle import MANIFEST, Bundle

    root = Path(root)
    folder_files(root)  # no symlink is followed by the checks below
    if (root / MANIFEST).is_file():
        bundle = Bundle.open(root)
        for name in bundle.files:
            bundle.check_file(name)  # a signature over a broken bundle would vouch for it
        bundle.labels()
    elif not (root / "config.pbtxt").is_file():
        raise RtkError(f"{root} is neither an rtk bundle (no {MANIFEST}) nor a Triton model folder (no config.pbtxt)")
    return sign_folder(root, key, password)


# ---------------------------------------------------------------- verifying


@dataclass(frozen=True)
class Verified:
    """A folder whose signature a trusted key made and whose files matched it when it was checked."""

    root: Path
    key: Path  # the --trust key that verified it
    digests: dict[str, str]  # the signed sha256 of every file


def _statement(signature: bytes, root: Path) -> dict[str, str]:
    """{file: sha256} of a signature's in-toto statement; refused unless the statement was made the way
    `rtk sign` makes it (per-file sha256, no symlinks, nothing ignored but bundle.sig)."""
    where = f"{root / SIGNATURE}"
    try:
        envelope = json.loads(signature)["dsseEnvelope"]
        statement = json.loads(base64.b64decode(envelope["payload"], validate=True))
        if statement.get("predicateType") != PREDICATE:  # the pre-1.0 "Digests/v0.1" form records no hashing
            raise CheckFailed(f"{where} is a {statement.get('predicateType')!r} statement, not model-signing's "
                              f"{PREDICATE}: re-sign it with rtk sign")
        predicate = statement["predicate"]
        serialization = predicate["serialization"]
        resources = {str(r["name"]): (str(r["algorithm"]), str(r["digest"])) for r in predicate["resources"]}
    except CheckFailed:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error, RecursionError):
        raise CheckFailed(f"{where} is not a model-signing signature (not its JSON statement)") from None
    if not isinstance(serialization, dict) or serialization != SERIALIZATION:
        raise CheckFailed(f"{where} was not made by rtk sign: its statement's hashing is {serialization}, rtk "
                          f"trusts only {SERIALIZATION} (a signature that ignores a file would let it through)")
    if any(algorithm != "sha256" for algorithm, _ in resources.values()):
        raise CheckFailed(f"{where}: a file's digest is not sha256")
    return {name: digest for name, (_, digest) in resources.items()}


def _read_signature(root: Path) -> bytes:
    path = root / SIGNATURE
    if not path.exists() and not path.is_symlink():
        raise CheckFailed(f"{root} is not signed (no {SIGNATURE}): --trust accepts only a bundle signed by a "
                          "trusted key (rtk sign)")
    try:
        fh = _open_plain(path)
    except OSError as exc:
        raise CheckFailed(f"cannot read {path}: {exc.strerror or exc}") from None
    with fh:
        data = fh.read(SIGNATURE_MAX_BYTES + 1)
    if len(data) > SIGNATURE_MAX_BYTES:
        raise CheckFailed(f"{path} is larger than a signature's {SIGNATURE_MAX_BYTES} bytes")
    return data


def _hint(signature: bytes, root: Path) -> str:
    try:
        parsed = json.loads(signature)
    except (ValueError, RecursionError):
        raise CheckFailed(f"{root / SIGNATURE} is not JSON: not a model-signing signature") from None
    try:
        hint = parsed["verificationMaterial"]["publicKey"]["hint"]
    except (KeyError, TypeError):
        raise CheckFailed(f"{root / SIGNATURE} is not a key-signed model-signing signature (no public key "
                          "hint): re-sign it with rtk sign") from None
    if not isinstance(hint, str) or not hint:
        raise CheckFailed(f"{root / SIGNATURE} names no signing key (an older model-signing format): re-sign it "
                          "with rtk sign")
    return hint


def verify_folder(root: str | os.PathLike, trust: Sequence[str | os.PathLike]) -> Verified:
    """Check that ROOT's signature was made by one of the `trust` public keys over exactly ROOT's files as
    they are now; CheckFailed naming the problem (unsigned, other key, altered signature, a file added,
    removed or changed) otherwise."""
    ms = _model_signing()
    from cryptography.exceptions import InvalidSignature

    root = Path(root)
    keys = trusted_keys(trust)
    names = folder_files(root)
    data = _read_signature(root)
    hint = _hint(data, root)
    if hint not in keys:
        raise CheckFailed(f"{root} is signed by a key that is not trusted (key sha256 {hint[:16]}...; trusted: "
                          f"{', '.join(str(p) for p in keys.values())})")
    key = keys[hint]
    with tempfile.TemporaryDirectory(prefix="rtk-trust-") as scratch:
        private = Path(scratch) / SIGNATURE  # the library reads exactly the bytes checked here
        private.write_bytes(data)
        config = ms.verifying.Config().use_elliptic_key_verifier(public_key=key)
        try:
            config.set_hashing_config(_hashing_config(ms)).verify(root, private)
        except InvalidSignature:
            raise CheckFailed(f"{root / SIGNATURE} does not verify with {key}: the signature or the statement it "
                              "signs was altered") from None
        except ValueError as exc:
            if not str(exc).startswith("Signature mismatch"):
                raise CheckFailed(f"{root / SIGNATURE} is not a valid model-signing signature: "
                                  f"{first_line(exc)}") from None
            raise CheckFailed(_difference(root, _statement(data, root), names)) from None
        except (KeyError, TypeError, AttributeError, IndexError) as exc:  # a malformed envelope
            raise CheckFailed(f"{root / SIGNATURE} is not a valid model-signing signature: "
                              f"{type(exc).__name__} {first_line(exc)}") from None
        except OSError as exc:  # a file removed or made unreadable while it was hashed
            raise CheckFailed(f"cannot verify {root}: {exc.strerror or exc}: {exc.filename}") from None
    return Verified(root, key, _statement(data, root))


def _difference(root: Path, signed: dict[str, str], names: list[str]) -> str:
    """One line naming what changed since signing: files added, removed (a rename is both), or altered."""
    added = sorted(set(names) - set(signed))
    removed = sorted(set(signed) - set(names))
    parts = ([f"{', '.join(removed)} removed"] if removed else []) + ([f"{', '.join(added)} added"] if added else [])
    if not parts:
        changed = [n for n in names if _sha256(root / n) != signed[n]]
        parts = [f"{', '.join(changed) or 'a file'} changed"]
    return f"{root} differs from what was signed: {'; '.join(parts)} since it was signed"


def _sha256(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            return copy_hashed(fh, None)
    except OSError:
        return None


def _open_plain(path: Path) -> BinaryIO:
    """`path` opened for reading if it is a regular file: never through a symlink (O_NOFOLLOW), never
    blocking on a FIFO swapped in (O_NONBLOCK); anything else is an OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return os.fdopen(fd, "rb")


def copy_hashed(src: BinaryIO, dest: BinaryIO | None) -> str:
    """sha256 of what is read from `src`, written to `dest` as it is read: the bytes kept are the bytes hashed."""
    digest = hashlib.sha256()
    for block in iter(lambda: src.read(1 << 20), b""):
        digest.update(block)
        if dest is not None:
            dest.write(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- what a consumer loads


class TrustedCopy:
    """A private folder (0700) with copies of a verified folder's files, each hashed as it was copied and
    equal to its signed sha256. A consumer loads these copies: a file replaced in the bundle after the
    check is never read. Removed when the object is garbage-collected (or at exit)."""

    def __init__(self, verified: Verified) -> None:
        self.verified = verified
        self.root = Path(tempfile.mkdtemp(prefix="rtk-trusted-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.root), True)

    def copy(self, name: str) -> Path:
        """Copy file `name` (a signed file) of the bundle here, refused unless its bytes are the signed ones."""
        source, dest = self.verified.root / name, self.root / name
        if name not in self.verified.digests:
            raise CheckFailed(f"{name} is not one of the files signed in {self.verified.root / SIGNATURE}")
        if dest.exists():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            src = _open_plain(source)
        except OSError as exc:
            raise CheckFailed(f"{name} in {self.verified.root} cannot be read since its signature was verified: "
                              f"{exc.strerror or exc}") from None
        with src, naming(dest), open(dest, "wb") as out:
            digest = copy_hashed(src, out)
        if digest != self.verified.digests[name]:
            dest.unlink()
            raise CheckFailed(f"{name} in {self.verified.root} changed after its signature was verified: refused")
        return dest

    def copy_files(self, names: Iterable[str]) -> None:
        for name in names:
            self.copy(name)

    def close(self) -> None:
        self._cleanup()


def trusted_copy(root: str | os.PathLike, trust: Sequence[str | os.PathLike],
                 pick: Callable[[Path], Iterable[str]] | None = None, first: Iterable[str] = ()) -> TrustedCopy:
    """Verify ROOT's signature against `trust`, copy the signed files `first` (those of them signed), then
    those `pick(copy_folder)` names (it may read the files copied first, e.g. the manifest) into a
    private folder; without `pick`, every signed file. Files not copied are never read again."""
    verified = verify_folder(root, trust)
    copy = TrustedCopy(verified)
    try:
        copy.copy_files(name for name in first if name in verified.digests)
        copy.copy_files(pick(copy.root) if pick is not None else sorted(verified.digests))
    except BaseException:
        copy.close()
        raise
    return copy

