"""What `--trust` costs at load time: `Classifier.load` with and without trust, and signing/verifying one big file.

    python benchmarks/trust_cost.py BUNDLE [--repeat 5] [--big-mb 100]

BUNDLE is an rtk bundle (copied to a temp folder with model.onnx only, then signed with a fresh P-256 key).
Prints, page cache warm, the median of --repeat runs of: `import model_signing` (a fresh process);
Classifier.load without trust; with trust (signature check + private copy of what is served); the same
with a --big-mb file added to the bundle (signed, hashed by the check, never copied); and sign / verify /
copy-with-hash of that file alone. Torch is never imported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.serving.classifier import Classifier  # noqa: E402
from toolkit.serving.signing import TrustedCopy, sign_folder, verify_folder  # noqa: E402


def median_s(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def keys(folder: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / "key.pem", folder / "pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def one_model_bundle(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("labels.txt", "selftest.npz", "model.onnx"):
        shutil.copy(src / name, dst / name)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["files"] = {"model.onnx": manifest["files"]["model.onnx"]}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--big-mb", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rtk-trust-cost-") as tmp:
        tmp = Path(tmp)
        private, public = keys(tmp)
        bundle = one_model_bundle(args.bundle, tmp / "bundle")
        sign_folder(bundle, private)
        code = "import time; t = time.perf_counter(); import model_signing.signing, model_signing.verifying; " \
               "print(time.perf_counter() - t)"
        imports = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                        check=True).stdout) for _ in range(args.repeat)]
        rows = [("import model_signing (fresh process)", statistics.median(imports))]
        load = lambda **kw: Classifier.load(bundle, threads=1, **kw)  # noqa: E731
        load(), load(trust=[public])  # warm the page cache and the imports
        model_mb = (bundle / "model.onnx").stat().st_size / 1e6
        rows += [(f"Classifier.load, model.onnx {model_mb:.0f} MB", median_s(load, args.repeat)),
                 ("Classifier.load --trust", median_s(lambda: load(trust=[public]), args.repeat))]
        big = bundle / "big.bin"
        big.write_bytes(bytes(range(256)) * (args.big_mb * 4096))
        rows.append((f"rtk sign with a {args.big_mb} MB file added", median_s(lambda: sign_folder(bundle, private),
                                                                               args.repeat)))
        rows.append((f"Classifier.load --trust, {args.big_mb} MB file in the bundle",
                     median_s(lambda: load(trust=[public]), args.repeat)))
        alone = tmp / "alone"
        alone.mkdir()
        shutil.move(big, alone / "big.bin")
        sign_folder(alone, private)
        verified = verify_folder(alone, [public])
        rows += [(f"sign a folder of one {args.big_mb} MB file", median_s(lambda: sign_folder(alone, private), args.repeat)),
                 ("verify it", median_s(lambda: verify_folder(alone, [public]), args.repeat)),
                 ("copy it privately, hashing (TrustedCopy.copy)",
                  median_s(lambda: TrustedCopy(verified).copy("big.bin"), args.repeat))]
    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds * 1000:8.1f} ms")
    print("torch imported:", "torch" in sys.modules)


if __name__ == "__main__":
    main()
