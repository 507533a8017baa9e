"""One `rtk serve` round trip with Triton's client, against `Classifier` in this process (for gpu_check.sh).

    python benchmarks/serve_check.py BUNDLE [--provider cuda]

Starts `rtk serve BUNDLE --provider P` on 127.0.0.1, waits until ready, sends a batch of 4 random images
(binary tensors), compares the logits with `Classifier.load(BUNDLE, providers=[P])`, stops the server with
SIGTERM and checks it exits 0. Exit 0 when all of that holds.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.serving.classifier import Classifier  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--atol", type=float, default=1e-4)
    args = parser.parse_args()
    import tritonclient.http as httpclient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "toolkit", "serve", args.bundle, "--provider", args.provider,
                               "--port", str(port), "--name", "model"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print(f"rtk serve did not become ready: {server.stdout.read()}")
                return 1
            time.sleep(0.1)
        clf = Classifier.load(args.bundle, providers=[args.provider])
        s = clf.spec.crop_size
        images = np.random.default_rng(0).integers(0, 256, (4, s, s, 3), dtype=np.uint8)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = httpclient.InferInput("image", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images, binary_data=True)
        got = client.infer("model", [tensor]).as_numpy("logits")
        diff = float(np.abs(got - clf.logits(images)).max())
        print(f"rtk serve --provider {args.provider}: {clf.providers[0]}, {clf.path.name}; tritonclient logits "
              f"{got.shape}, max abs diff to Classifier {diff:.2e} (allowed {args.atol:g})")
    finally:
        server.terminate()
        code = server.wait(60)
        print(server.stdout.read().strip())
        print(f"exit code after SIGTERM: {code}")
    return 0 if diff <= args.atol and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
