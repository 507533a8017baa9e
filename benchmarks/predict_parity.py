"""Does the torch-free runtime (`rtk predict` / `Classifier.predict`) give the eager model's top-1?

    python benchmarks/predict_parity.py BUNDLE PATH [PATH ...]

For every image under the PATHs: top-1 of the eager checkpoint fed by torchvision's pipeline
(the reference `rtk verify` uses) against top-1 of `Classifier.predict` on the file itself
(its own decoding, resize and crop, then onnxruntime). Prints the agreement and every mismatch.
"""

from __future__ import annotations

import sys

import numpy as np

from toolkit.core.bundle import Bundle
from toolkit.core.preprocess import list_images
from toolkit.evaluation.verify import reference_logits, torchvision_crop
from toolkit.serving.classifier import Classifier
from toolkit.training.checkpoint import source_from_manifest


def main(bundle_path: str, paths: list[str]) -> int:
    bundle = Bundle.open(bundle_path)
    spec = bundle.manifest.preprocess
    model, _ = source_from_manifest(bundle.manifest)
    files = [f for p in paths for f in list_images(p)]
    eager = reference_logits(model, spec, np.stack([torchvision_crop(f, spec) for f in files])).argmax(1)
    clf = Classifier.load(bundle_path, runtime="onnxruntime")
    predicted = [p.indices[0] for p in clf.predict(files)]
    mismatches = [(str(f), bundle.classes[e], bundle.classes[p]) for f, e, p in zip(files, eager, predicted) if e != p]
    print(f"{clf.path.name} on {clf.providers[0]}: top-1 equal to eager on {len(files) - len(mismatches)} of {len(files)} images")
    for name, e, p in mismatches:
        print(f"  {name}: eager {e}, runtime {p}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
