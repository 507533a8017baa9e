import csv
import json
import math
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import TRAIN_ARGS, error_line, rtk
from toolkit.core.fileio import atomic_path
from toolkit.core.hardware import CpuInfo
from toolkit.errors import RtkError
from toolkit.training import models
from toolkit.training.checkpoint import load_checkpoint, model_from_checkpoint
from toolkit.training.models import ARCHS
from toolkit.training.train import (
    BF16_CPU_BAD_GRAD_MAX_SIZE,
    TrainConfig,
    lr_factor,
    resolve_placement,
    train_step,
)


def test_outputs_and_self_describing_checkpoint(tiny_run):
    for name in ("checkpoint.pt", "last.pt", "history.csv", "metrics.json"):
        assert (tiny_run / name).is_file()
    ckpt = torch.load(tiny_run / "checkpoint.pt", weights_only=True)  # no pickled objects
    assert ckpt["arch"] == "resnet18" and ckpt["num_classes"] == 3
    assert ckpt["classes"] == ["circle", "square", "stripes"]
    assert ckpt["preprocess"]["crop_size"] == 32 and ckpt["preprocess"]["resize_size"] == 36
    assert ckpt["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    assert ckpt["train_config"]["epochs"] == 1 and ckpt["versions"]["torch"]
    assert "best_val_top1" in ckpt["metrics"]
    assert torch.load(tiny_run / "last.pt", weights_only=True)["training_state"]["optimizer"]
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for key in ("best_val_top1", "best_val_top5", "best_epoch", "epochs", "train_seconds", "images_per_second"):
        assert key in metrics
    assert 0 <= metrics["best_val_top1"] <= 1 and 0 <= metrics["best_val_top5"] <= 1
    rows = list(csv.DictReader((tiny_run / "history.csv").open()))
    assert len(rows) == 1 and {"train_loss", "val_loss", "val_top1", "val_top5"} <= set(rows[0])


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_gives_the_same_weights(tiny_data, tiny_run, tmp_path):
    result = rtk("train", tiny_data, "--output", tmp_path / "again", *TRAIN_ARGS)
    assert result.exit_code == 0
    assert _same(_weights(tiny_run / "last.pt"), _weights(tmp_path / "again" / "last.pt"))


def test_resume_continues_exactly(tiny_data, tmp_path):
    args = [a if a != "1" else "2" for a in TRAIN_ARGS]  # --epochs 2
    assert rtk("train", tiny_data, "--output", tmp_path / "straight", *args).exit_code == 0
    assert rtk("train", tiny_data, "--output", tmp_path / "split", *TRAIN_ARGS, "--warmup-epochs", "1").exit_code == 0
    # The interrupted run must have the same config as the straight one except its epoch count.
    ckpt = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert ckpt["train_config"]["epochs"] == 1
    result = rtk("train", tiny_data, "--output", tmp_path / "split", "--resume", tmp_path / "split" / "last.pt",
                 "--epochs", "2", "--quiet")
    assert result.exit_code == 0, result.output
    resumed = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert resumed["epoch"] == 2
    assert len(resumed["training_state"]["history"]) == 2
    assert _same(_weights(tmp_path / "straight" / "last.pt"), resumed["state_dict"])


def test_a_step_with_a_non_finite_loss_or_gradients_leaves_the_model_as_it_was(tiny_run):
    model = model_from_checkpoint(load_checkpoint(tiny_run / "checkpoint.pt")).train()
    placement = resolve_placement(TrainConfig(precision="fp32"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images, targets = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])

    def step(batch):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        _, _, applied = train_step(model, batch, targets, optimizer, scaler, nn.CrossEntropyLoss(), placement)
        return applied, _same(before, model.state_dict())

    poisoned = images.clone()
    poisoned[0, 0, 0, 0] = float("inf")
    assert step(poisoned) == (False, True)  # weights and BatchNorm statistics untouched
    assert step(images) == (True, False)


def test_training_that_only_produces_non_finite_steps_stops_with_an_error(tiny_data, tiny_run, tmp_path):
    state = _weights(tiny_run / "checkpoint.pt")
    state["fc.bias"] = torch.full_like(state["fc.bias"], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    args = [a if a != "none" else str(tmp_path / "nan.pt") for a in TRAIN_ARGS]
    result = rtk("train", tiny_data, "--output", tmp_path / "out", *args)
    assert result.exit_code == 2
    assert error_line(result).startswith("Error: training diverged: every step of epoch 1")
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_freeze_backbone_trains_only_the_head(tiny_data, tiny_run, tmp_path):
    result = rtk("train", tiny_data, "--output", tmp_path / "frozen", *TRAIN_ARGS, "--freeze-backbone",
                 "--weights", tiny_run / "checkpoint.pt")
    assert result.exit_code == 0, result.output
    before, after = _weights(tiny_run / "checkpoint.pt"), _weights(tmp_path / "frozen" / "last.pt")
    assert torch.equal(before["layer1.0.conv1.weight"], after["layer1.0.conv1.weight"])
    assert torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])  # frozen BN statistics too
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


def test_unfreeze_at_and_backbone_lr_scale():
    config = TrainConfig(freeze_backbone=True, unfreeze_at=3, backbone_lr_scale=0.1, lr=1.0)
    assert [config.backbone_frozen(e) for e in range(4)] == [True, True, False, False]
    from toolkit.training.models import build
    from toolkit.training.train import make_optimizer

    groups = make_optimizer(build("resnet18", 3), config).param_groups
    assert [g["name"] for g in groups] == ["backbone", "head"] and groups[0]["lr"] == pytest.approx(0.1)


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 10, 100) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:])) and factors[-1] < 0.01


def test_precision_auto_follows_the_cpu(monkeypatch):
    fast = CpuInfo("x", 2, 2, frozenset({"amx_tile", "amx_bf16"}))
    slow = CpuInfo("x", 2, 2, frozenset({"avx2"}))
    monkeypatch.setattr("toolkit.training.train.cpu_info", lambda: fast)
    assert resolve_placement(TrainConfig(device="cpu")).precision == "bf16"
    monkeypatch.setattr("toolkit.training.train.cpu_info", lambda: slow)
    assert resolve_placement(TrainConfig(device="cpu")).precision == "fp32"
    with pytest.raises(RtkError, match="fp16 needs CUDA"):
        resolve_placement(TrainConfig(device="cpu", precision="fp16"))
    monkeypatch.setattr("toolkit.training.train.cpu_info", lambda: fast)
    small = BF16_CPU_BAD_GRAD_MAX_SIZE
    assert resolve_placement(TrainConfig(device="cpu", image_size=small, resize_size=small)).precision == "fp32"
    with pytest.raises(RtkError, match="wrong gradients for images of 16 px"):
        resolve_placement(TrainConfig(device="cpu", precision="bf16", image_size=small, resize_size=small))
    assert resolve_placement(TrainConfig(device="cpu", image_size=small + 1, resize_size=small + 1)).precision == "bf16"
    if not torch.cuda.is_available():
        with pytest.raises(RtkError, match="is_available"):
            resolve_placement(TrainConfig(device="cuda"))


def _bf16_weight_grad_error(input_size: int) -> float:
    """Worst relative error of a bf16 3x3 stride-2 conv's weight gradient against float64 on the same operands."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 128, 3, 2, 1, bias=False).to(memory_format=torch.channels_last)
    worst = 0.0
    for _ in range(20):
        x = torch.randn(8, 64, input_size, input_size).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        dy = torch.randn(y.shape).to(torch.bfloat16)
        conv.weight.grad = None
        y.float().backward(dy.float())
        w = conv.weight.detach().to(torch.bfloat16).double().requires_grad_()
        nn.functional.conv2d(x.to(torch.bfloat16).double(), w, None, 2, 1).backward(dy.double())
        error = float((conv.weight.grad.double() - w.grad).abs().max() / w.grad.abs().max())
        worst = max(worst, error if math.isfinite(error) else math.inf)
    return worst


def _smallest_stride2_conv_input(image_size: int) -> int:
    """The side of the smallest feature map a ResNet's stride-2 3x3 conv sees (layer4's first block)."""
    side = image_size
    for _ in range(4):  # the stem conv, its max pool, layer2, layer3: each (side + 2 - 3) // 2 + 1
        side = (side - 1) // 2 + 1
    return side


def test_bf16_on_the_cpu_is_allowed_from_the_size_where_its_gradients_are_right():
    # resolve_placement allows bf16 from BF16_CPU_BAD_GRAD_MAX_SIZE + 1 px: that size must give right gradients
    smallest = _smallest_stride2_conv_input(BF16_CPU_BAD_GRAD_MAX_SIZE + 1)
    assert smallest == 2 and _smallest_stride2_conv_input(BF16_CPU_BAD_GRAD_MAX_SIZE) == 1
    model = models.build("resnet18", 2).eval()
    with torch.no_grad():
        x = torch.zeros(1, 3, BF16_CPU_BAD_GRAD_MAX_SIZE + 1, BF16_CPU_BAD_GRAD_MAX_SIZE + 1)
        x = model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))))
    assert x.shape[-1] == smallest  # what layer4's stride-2 conv gets, checked on the real network
    assert _bf16_weight_grad_error(smallest) < 0.02


@pytest.mark.parametrize("arch", ARCHS)
def test_every_torchvision_resnet_builds(arch):
    with torch.device("meta"):  # the real architecture, without allocating its weights
        model = models.build(arch, 5)
    assert model.fc.out_features == 5 and isinstance(model, nn.Module)
    assert sum(p.numel() for p in model.parameters()) > 10_000_000


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--lr", "-0.1"], "--lr must be a positive number"),
    (["--arch", "resnet9000"], "unknown arch"),
    (["--image-size", "32", "--resize-size", "16"], "--resize-size (16) must be at least the crop size"),
    (["--weights", "IMAGENET1K_V9"], "has no weights"),
    (["--weights", "missing/file.pt"], "weights file not found"),
])
def test_nonsense_options_are_one_line_errors(tiny_data, tmp_path, args, message):
    result = rtk("train", tiny_data, "--output", tmp_path / "out", "--weights", "none", *args)
    assert result.exit_code == 2
    assert message in error_line(result)
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_arch_or_class_count(tiny_data, tiny_run, tmp_path):
    result = rtk("train", tiny_data, "--output", tmp_path / "o", "--arch", "resnet34", "--weights", tiny_run / "checkpoint.pt")
    assert result.exit_code == 2
    line = error_line(result)
    assert "resnet18" in line and "resnet34" in line
    # a 10-class state dict into 3-class data: named, then --reset-head loads all but fc
    from toolkit.training.models import build

    sd = tmp_path / "ten.pth"
    torch.save(build("resnet18", 10).state_dict(), sd)
    result = rtk("train", tiny_data, "--output", tmp_path / "o", "--weights", sd, "--epochs", "1")
    assert result.exit_code == 2 and "10 classes" in error_line(result) and "has 3" in error_line(result)
    result = rtk("train", tiny_data, "--output", tmp_path / "o", *TRAIN_ARGS[2:], "--arch", "resnet18", "--weights", sd,
                 "--reset-head")
    assert result.exit_code == 0, result.output
    assert "fc reset" in result.output


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home"


def test_pretrained_weights_load_offline_from_torch_cache(tiny_data, tmp_path, torch_home):
    import torchvision

    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = torch_home / "hub" / "checkpoints" / Path(weights.url).name
    cached.parent.mkdir(parents=True)
    reference = torchvision.models.resnet18(num_classes=1000).state_dict()
    torch.save(reference, cached)
    result = rtk("train", tiny_data, "--output", tmp_path / "pre", *TRAIN_ARGS[2:], "--arch", "resnet18",
                 "--weights", "IMAGENET1K_V1", "--epochs", "1", "--lr", "1e-9", "--warmup-epochs", "0")
    assert result.exit_code == 0, result.output
    assert "ResNet18_Weights.IMAGENET1K_V1" in result.output
    trained = _weights(tmp_path / "pre" / "last.pt")
    # lr ~0: the backbone is still the cached file's (BatchNorm statistics move in train mode, weights don't)
    assert torch.allclose(trained["conv1.weight"], reference["conv1.weight"], atol=1e-6)
    assert trained["fc.weight"].shape == (3, 512)


def test_pretrained_download_failure_says_how_to_work_offline(tiny_data, tmp_path, torch_home, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    result = rtk("train", tiny_data, "--output", tmp_path / "o", "--arch", "resnet18", "--weights", "DEFAULT")
    assert result.exit_code == 2
    line = error_line(result)
    assert "hub/checkpoints/resnet18-" in line and "--weights PATH" in line
    assert not (tmp_path / "o").exists()


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "toolkit",
           "train", str(tiny_data), "--output", str(out), *TRAIN_ARGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert proc.stdout.count("epoch 1/1") == 1 and proc.stdout.count("best val top-1") == 1  # only rank 0 reports
    assert load_checkpoint(out / "checkpoint.pt")["classes"] == ["circle", "square", "stripes"]


def test_a_step_the_grad_scaler_skips_is_not_applied_and_keeps_batchnorm_statistics(tiny_run):
    """fp16's GradScaler skips a step whose scaled gradients overflow although the loss is finite."""
    model = model_from_checkpoint(load_checkpoint(tiny_run / "checkpoint.pt")).train()
    placement = resolve_placement(TrainConfig(precision="fp32"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    images, targets = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    hook = model.fc.weight.register_hook(lambda g: g * float("inf"))  # an overflow in one gradient only
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, loss, applied = train_step(model, images, targets, optimizer, scaler, nn.CrossEntropyLoss(), placement)
    assert torch.isfinite(loss) and not applied
    assert _same(before, model.state_dict())  # weights and BatchNorm running statistics as they were
    hook.remove()
    _, _, applied = train_step(model, images, targets, optimizer, scaler, nn.CrossEntropyLoss(), placement)
    assert applied and not _same(before, model.state_dict())


def test_resume_after_sigkill_continues_the_planned_epochs(tiny_data, tmp_path):
    """Kill a 3-epoch run mid-way, resume without --epochs: the same final weights as an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    args = [a for a in TRAIN_ARGS]
    args[args.index("--epochs") + 1] = "3"
    straight = rtk("train", tiny_data, "--output", tmp_path / "straight", *args)
    assert straight.exit_code == 0, straight.output
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "toolkit", "train", str(tiny_data), "--output", str(run), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run / "last.pt").exists():  # written at the end of epoch 1
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    assert load_checkpoint(run / "last.pt")["epoch"] < 3  # it really stopped before the end
    resumed = rtk("train", tiny_data, "--output", run, "--resume", run / "last.pt", "--quiet")
    assert resumed.exit_code == 0, resumed.output
    assert "epoch 3/3" in resumed.output
    assert _same(_weights(tmp_path / "straight" / "last.pt"), _weights(run / "last.pt"))
    assert load_checkpoint(run / "last.pt")["epoch"] == 3
    shorter = rtk("train", tiny_data, "--output", run, "--resume", run / "last.pt", "--epochs", "2", "--quiet")
    assert shorter.exit_code == 2 and "already trained 3 epochs" in error_line(shorter)
