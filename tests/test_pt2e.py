"""PyTorch-native int8 (PT2E, torchao's x86 Inductor quantizer): the program, its AOTInductor package, errors.

One tiny resnet18 (32 px, 3 classes) whose classifier is fitted for a few steps on three colour-tinted
classes, so that most images have a clear fp32 top-1 (random-init logits are near-ties and would make
agreement a coin toss). Agreement is judged only on images whose fp32 top-1 margin is clear.
"""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
import torch

from toolkit.export import pt2e

pytestmark = pytest.mark.skipif(pt2e.pt2e_problem() is not None, reason=str(pt2e.pt2e_problem()))

SIZE, CLASSES = 32, 3
CLEAR_MARGIN = 1.0  # fp32 top-1 minus runner-up logit: an image int8 should not flip


def tinted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise images with one channel raised: the class is the channel."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    images = rng.integers(0, 160, (n, SIZE, SIZE, 3))
    images[np.arange(n), :, :, labels] += 95
    return images.astype(np.uint8), labels


def fitted_classifier():
    """ImageClassifier(resnet18) whose fc is fitted on tinted images (backbone left at its seeded init)."""
    import torchvision

    from toolkit.core.preprocess import PreprocessSpec
    from toolkit.export.graph import ImageClassifier

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=CLASSES)
    module = ImageClassifier(net, PreprocessSpec(resize_size=SIZE, crop_size=SIZE)).eval()
    images, labels = tinted(96, seed=1)
    fc, net.fc = net.fc, torch.nn.Identity()
    with torch.no_grad():
        features = module(torch.from_numpy(images))
    net.fc = fc
    optimiser = torch.optim.Adam(fc.parameters(), lr=0.05)
    target = torch.from_numpy(labels)
    for _ in range(60):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(fc(features), target).backward()
        optimiser.step()
    return module


@pytest.fixture(scope="module")
def fp32():
    return fitted_classifier()


@pytest.fixture(scope="module")
def example() -> torch.Tensor:
    return torch.from_numpy(tinted(2, seed=2)[0])


@pytest.fixture(scope="module")
def held_out(fp32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images unseen by fitting and calibration, and their fp32 logits."""
    images = torch.from_numpy(tinted(48, seed=3)[0])
    with torch.no_grad():
        return images, fp32(images)


@pytest.fixture(scope="module")
def program(fp32, example):
    return pt2e.quantized_program(fp32, example, tinted(32, seed=4)[0])


@pytest.fixture(scope="module")
def package(program, tmp_path_factory):
    """The program compiled once by AOTInductor (freezing on), loaded back."""
    import os

    folder = tmp_path_factory.mktemp("aoti")
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor-cache")
    try:
        path = torch._inductor.aoti_compile_and_package(program, package_path=str(folder / "model.int8.pt2"),
                                                        inductor_configs=pt2e.INDUCTOR_CONFIGS)
        return torch._inductor.aoti_load_package(path)
    finally:
        if previous is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def clear(logits: torch.Tensor) -> torch.Tensor:
    top2 = logits.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1] > CLEAR_MARGIN


def run(program, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return program.module()(images)


# ---------------------------------------------------------------- the program


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_program_runs_any_batch(program, held_out, batch):
    out = run(program, held_out[0][:batch])
    assert out.shape == (batch, CLASSES) and out.dtype == torch.float32


def test_program_agrees_with_fp32_on_clear_images(program, held_out):
    images, reference = held_out
    decisive = clear(reference)
    assert decisive.sum() >= 24, "the fitted fp32 model should be decisive on most tinted images"
    out = run(program, images)
    assert torch.equal(out[decisive].argmax(1), reference[decisive].argmax(1))


def test_program_is_quantised(program):
    counts = pt2e.quant_op_counts(program)
    # resnet18: 20 convolutions and the fc, each with int8 weights per output channel
    assert counts.get("dequantize_per_channel") == 21
    assert counts.get("quantize_per_tensor", 0) >= 21
    assert not any(v.dtype == torch.float32 and v.dim() == 4 for v in program.state_dict.values()), \
        "the fp32 convolution weights should not travel with the int8 ones"


def test_preprocessing_stays_float(program):
    """The quantizer annotates no preprocessing op: uint8 -> float, multiply-add and permute run in fp32
    as in the fp32 graph; the first quantize is conv1's input."""
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    first_q = next(n for n in nodes if n.target.__name__.startswith("quantize_per_tensor"))
    chain, node = [], first_q.args[0]
    while node.op == "call_function":
        chain.append(node.target.__name__.split(".")[0])
        node = node.args[0]
    assert node.name == "image" and chain == ["permute", "add", "mul", "to"]
    users = [u.target.__name__.split(".")[0] for u in first_q.users]
    assert users == ["dequantize_per_tensor"]
    assert [u.target.__name__.split(".")[0] for u in next(iter(first_q.users)).users] == ["conv2d"]


def test_flat_calibration_is_worse(fp32, example, program, held_out):
    """Must-fail: ranges measured on flat grey images clip real activations."""
    images, reference = held_out
    grey = pt2e.quantized_program(fp32, example, np.full((32, SIZE, SIZE, 3), 128, np.uint8))
    varied_error = (run(program, images) - reference).abs().mean()
    grey_error = (run(grey, images) - reference).abs().mean()
    assert grey_error > 2 * varied_error


# ---------------------------------------------------------------- the AOTInductor package


def test_package_matches_program(package, program, held_out):
    images, reference = held_out
    with torch.no_grad():
        compiled = package(images[:16])
        single = package(images[:1])
    uncompiled = run(program, images[:16])
    assert compiled.shape == (16, CLASSES) and single.shape == (1, CLASSES)
    spread = reference.abs().max()
    # Inductor's int8 kernels requantise in their own order: close, not bit-equal
    assert (compiled - uncompiled).abs().max() < 0.05 * spread
    decisive = clear(reference[:16])
    assert torch.equal(compiled[decisive].argmax(1), reference[:16][decisive].argmax(1))


# ---------------------------------------------------------------- bottleneck, errors


def test_split_relus_bottleneck_resnet50():
    """resnet50's Bottleneck calls one ReLU three times: the split copy computes the same and quantises."""
    import torchvision

    from toolkit.core.preprocess import PreprocessSpec
    from toolkit.export.graph import ImageClassifier

    torch.manual_seed(0)
    module = ImageClassifier(torchvision.models.resnet50(num_classes=2),
                             PreprocessSpec(resize_size=SIZE, crop_size=SIZE)).eval()
    images = torch.from_numpy(tinted(4, seed=5)[0])
    split = pt2e.split_relus(module)
    assert split is not module and module.model.layer1[0].forward.__func__ is type(module.model.layer1[0]).forward
    with torch.no_grad():
        assert torch.equal(split(images), module(images))
    counts = pt2e.quant_op_counts(pt2e.quantized_program(module, images[:2], images.numpy()))
    assert counts.get("dequantize_per_channel") == 54  # 53 convolutions and the fc


@pytest.mark.parametrize("crops, message", [
    (np.zeros((0, SIZE, SIZE, 3), np.uint8), "at least one crop"),
    (np.zeros((4, 24, 24, 3), np.uint8), "the model takes [32, 32, 3]"),
    (np.zeros((4, SIZE, SIZE, 3), np.float32), "uint8"),
    (torch.zeros((4, SIZE, SIZE, 3), dtype=torch.uint8), "uint8 numpy array"),
])
def test_bad_crops_refused(fp32, example, crops, message):
    from toolkit.errors import RtkError

    with pytest.raises(RtkError, match=message.replace("[", r"\[").replace("]", r"\]")):
        pt2e.quantized_program(fp32, example, crops)


@pytest.mark.parametrize("version, message", [(None, "not installed"), ("0.9.0", ">= 0.18, this is 0.9.0")])
def test_problem_names_the_fix(monkeypatch, version, message):
    def fake_version(name: str) -> str:
        if version is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(pt2e.importlib.metadata, "version", fake_version)
    problem = pt2e.pt2e_problem()
    assert problem is not None and message in problem and pt2e.INSTALL_HINT in problem
