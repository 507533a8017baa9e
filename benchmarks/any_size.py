"""model.any-size.onnx against torchvision's PIL pipeline, and in-graph resize against host resize.

    python benchmarks/any_size.py BUNDLE [--val DIR] [--tag NAME]

- parity: `rtk verify` of the any-size file on real photos of many sizes (scikit-learn's two JPEGs, resized
  and cropped: down/upscaled, portrait, landscape, panorama, 3 px wide, 3000 px) and on --val (an ImageFolder),
  on onnxruntime and OpenVINO: max abs logit diff, top-1 agreement (all, and where the reference is clear);
- pixels: the in-graph crops against torchvision's, pixel by pixel;
- latency: `Classifier.predict` on china.jpg (640x427) with the any-size file (decode + infer) against the
  fixed-size file (decode + host resize + infer), median of 30;
- the file: size, and the ONNX operators the resize adds.
Writes benchmarks/results/any_size-<tag>.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.core.bundle import ANY_SIZE_FILE  # noqa: E402
from toolkit.core.hardware import cpu_info  # noqa: E402
from toolkit.core.tables import render  # noqa: E402
from toolkit.evaluation.verify import verify_bundle  # noqa: E402
from toolkit.serving.classifier import Classifier  # noqa: E402

# downscale, upscale, portrait, landscape, panorama, a few pixels wide, 3000 px, very tall: made with Pillow's
# LANCZOS and saved as PNG, so every variant is exactly what the reference reads (tests/test_any_size.py uses them)
VARIANTS = {
    "down-160x107": lambda im: im.resize((160, 107), Image.LANCZOS),
    "up-1280x854": lambda im: im.resize((1280, 854), Image.LANCZOS),
    "portrait-200x427": lambda im: im.crop((220, 0, 420, 427)),
    "landscape-640x300": lambda im: im.crop((0, 60, 640, 360)),
    "panorama-640x80": lambda im: im.crop((0, 170, 640, 250)),
    "thin-3x427": lambda im: im.crop((300, 0, 303, 427)),
    "tiny-9x6": lambda im: im.resize((9, 6), Image.LANCZOS),
    "large-3000x2001": lambda im: im.resize((3000, 2001), Image.LANCZOS),
    "tall-40x3000": lambda im: im.crop((300, 0, 340, 427)).resize((40, 3000), Image.LANCZOS),
}


def crops_against_torchvision(bundle: Path, paths: list[Path]):
    """(path, the any-size graph's crop, torchvision's crop) per image: the crop is the graph's intermediate
    tensor that enters the normalisation (the input of its first Mul with the scale), exposed as an output."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from toolkit.core.manifest import Manifest
    from toolkit.evaluation.verify import torchvision_crop

    spec = Manifest.read(bundle / "manifest.json").preprocess
    model = onnx.load(str(bundle / ANY_SIZE_FILE))
    node = next(n for n in model.graph.node if n.op_type == "Mul" and any("scale" in i for i in n.input))
    crop_name = next(i for i in node.input if "scale" not in i)
    model.graph.output.append(helper.make_tensor_value_info(crop_name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString())
    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"))
        yield path, session.run([crop_name], {"image": image[None]})[0][0], torchvision_crop(path, spec).astype(np.float32)


def photos() -> list[Path]:
    from sklearn.datasets import load_sample_images

    return [Path(p) for p in load_sample_images().filenames]


def median_ms(fn, repeat: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--val", default=None, help="an ImageFolder whose classes are the bundle's")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tag", default=None)
    args = parser.parse_args()
    cpu = cpu_info()
    tag = args.tag or cpu.tag
    bundle = Path(args.bundle)
    lines = [f"# model.any-size.onnx: resize and center crop inside the graph ({bundle.name})", "",
             f"CPU: {cpu.name} ({cpu.usable_cpus} usable CPUs). `python benchmarks/any_size.py {args.bundle}"
             + (f" --val {args.val}" if args.val else "") + "`.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for photo in photos():
            image = Image.open(photo).convert("RGB")
            for name, make in VARIANTS.items():
                make(image).save(folder / f"{photo.stem}-{name}.png")
        rows = []
        sets = [("photos (2 x 9 sizes)", folder)] + ([("val set", Path(args.val))] if args.val else [])
        for label, images in sets:
            report = verify_bundle(bundle, images=images, runtimes=["ort-cpu", "openvino"], threads=args.threads,
                                   echo=lambda s: None, store=False)
            for r in report["records"]:
                if r["artifact"] != ANY_SIZE_FILE:
                    continue
                rows.append([label, r["runtime"], str(r["images"]), f"{r['max_abs_diff']:.2e}", f"{r['mean_abs_diff']:.2e}",
                             f"{100 * r['top1_agreement']:.2f}%", f"{100 * r['top1_agreement_where_clear']:.2f}%",
                             f"{r['tolerance']['atol']:.3g}", "pass" if r["passed"] else "FAIL " + ",".join(r["failed_metrics"])])
            for s in report["skipped"]:
                if s["artifact"] == ANY_SIZE_FILE:
                    rows.append([label, s["runtime"], "-", "-", "-", "-", "-", "-", "skipped: " + s["reason"]])
        lines += ["## Parity against the eager model fed by torchvision's PIL pipeline", "",
                  render(["images", "runtime", "n", "max abs diff", "mean abs diff", "top-1", "top-1 where clear", "atol", "result"],
                         rows, "markdown"), "",
                  "`top-1 where clear`: images whose reference top-two logits differ by more than 0.01 (the gate); "
                  "`atol`: the any-size tolerance, 0.02 on the largest reference logit's scale.", ""]

        # the crops themselves
        pixel_rows = []
        for path, got, want in crops_against_torchvision(bundle, sorted(folder.iterdir())):
            image = Image.open(path)
            d = np.abs(got - want)
            pixel_rows.append([path.stem, f"{image.width}x{image.height}", f"{100 * float((d == 0).mean()):.2f}%", f"{d.max():.0f}"])
        lines += ["## The crops, pixel by pixel (graph vs torchvision on PIL)", "",
                  render(["image", "size", "identical pixels", "max diff (grey levels)"], pixel_rows, "markdown"), ""]

    # latency
    china = photos()[0]
    whole = Classifier.load(bundle, any_size=True, threads=args.threads)
    crops = Classifier.load(bundle, threads=args.threads)
    host = median_ms(lambda: crops.predict([china]))
    graph = median_ms(lambda: whole.predict([china]))
    decode = median_ms(lambda: np.asarray(Image.open(china).convert("RGB")))
    both_top1 = whole.predict([china])[0].indices[0] == crops.predict([china])[0].indices[0]
    import onnx

    size_any = (bundle / ANY_SIZE_FILE).stat().st_size
    size_fixed = (bundle / "model.onnx").stat().st_size
    ops_any = Counter(n.op_type for n in onnx.load(str(bundle / ANY_SIZE_FILE)).graph.node)
    ops_fixed = Counter(n.op_type for n in onnx.load(str(bundle / "model.onnx")).graph.node)
    added = ops_any - ops_fixed
    lines += ["## Latency on china.jpg (640x427), `Classifier.predict`, median of 30", "",
              render(["path", "ms"], [["decode + host resize + crop (PIL) + model.onnx", f"{host:.2f}"],
                                      ["decode + model.any-size.onnx (resize in the graph)", f"{graph:.2f}"],
                                      ["decode alone (PIL)", f"{decode:.2f}"]], "markdown"), "",
              f"Same top-1 on this photo: {both_top1}.", "",
              "## The file", "",
              f"- model.any-size.onnx {size_any / 1e6:.1f} MB vs model.onnx {size_fixed / 1e6:.1f} MB "
              f"(+{(size_any - size_fixed) / 1e3:.0f} kB: the resize has no weights, they are computed from the image size)",
              f"- operators the resize adds: {', '.join(f'{k} x{v}' for k, v in sorted(added.items()))}"]
    out = ROOT / "benchmarks" / "results" / f"any_size-{tag}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
