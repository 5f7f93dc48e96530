"""Mixed precision and the GPU path on a machine without a GPU: which autocast dtype a run
gets (bf16 where the GPU has it, else fp16 with a GradScaler; the CPU only on request), a
bfloat16 autocast forward of a tiny detector against float32, a short bfloat16 training run
on the CPU against a float32 one, channels-last batches, and tools/gpu_check.sh refusing to
run without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detkit.config import from_dict
from detkit.data.build import build_datasets
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.inference import amp_dtype, autocast_context, images_to, needs_grad_scaler
from detkit.engine.stages import RunContext
from detkit.engine.trainer import Trainer
from detkit.errors import ConfigError
from detkit.modeling.build import build_model
from detkit.schema import Config
from detkit.structures import ImageList

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("bf16_supported", [True, False])
def test_amp_dtype_on_cuda(monkeypatch, bf16_supported):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    auto = amp_dtype(CUDA, True, "auto")
    assert auto == (torch.bfloat16 if bf16_supported else torch.float16)
    assert needs_grad_scaler(auto) == (not bf16_supported)  # only float16 needs loss scaling
    assert amp_dtype(CUDA, True, "fp16") == torch.float16
    assert amp_dtype(CUDA, False, "bf16") is None
    if bf16_supported:
        assert amp_dtype(CUDA, True, "bf16") == torch.bfloat16
    else:
        with pytest.raises(ConfigError, match="train.amp_dtype: this GPU has no bfloat16; use auto or fp16"):
            amp_dtype(CUDA, True, "bf16")


def test_amp_dtype_on_the_cpu():
    assert amp_dtype(CPU, True, "auto") is None  # float32 unless bf16 is asked for
    assert amp_dtype(CPU, True, "bf16") == torch.bfloat16 and not needs_grad_scaler(torch.bfloat16)
    with pytest.raises(ConfigError, match="fp16 autocast is for CUDA"):
        amp_dtype(CPU, True, "fp16")
    x = torch.randn(2, 8)
    layer = torch.nn.Linear(8, 4)
    with autocast_context(CPU, torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    with autocast_context(CPU, True):  # the device's default: off on the CPU
        assert layer(x).dtype == torch.float32
    with autocast_context(CPU, None):
        assert layer(x).dtype == torch.float32


@pytest.mark.parametrize("avx512_bf16, amx, warned", [(False, False, True), (True, False, False), (False, True, False)])
def test_cpu_bf16_warns_once_without_native_bf16(monkeypatch, caplog, avx512_bf16, amx, warned):
    from detkit.engine.inference import cpu_has_native_bf16

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu_has_native_bf16.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="detkit"):
            assert amp_dtype(CPU, True, "bf16") == torch.bfloat16  # still honoured
            amp_dtype(CPU, True, "bf16")
            amp_dtype(CPU, True, "auto")  # float32: nothing to warn about
        messages = [r.getMessage() for r in caplog.records if "AVX512-BF16" in r.getMessage()]
        assert len(messages) == (1 if warned else 0)
    finally:
        cpu_has_native_bf16.cache_clear()


def tiny_config(root, **train) -> Config:
    shapes = {"num_train": 4, "num_test": 1, "seed": 5, "image_size": [48, 56], "object_size": [14, 24]}
    return from_dict(
        Config,
        {
            "data": {
                "train": {"format": "shapes", "root": str(root), "split": "train", "shapes": shapes},
                "input": {"min_size_train": [48], "max_size": 64, "min_size_test": 48, "flip_prob": 0.0},
                "batch_size": 2,
            },
            "model": {
                "backbone": {"name": "tiny", "out_channels": 16, "tiny_widths": [8, 16, 16, 16]},
                "anchors": {"sizes": [[16], [32], [64], [128], [256]]},
                "roi_head": {"fc_dims": [32, 32], "batch_size_per_image": 32},
                "proposals": {"rpn": {"pre_nms_topk_train": 100, "post_nms_topk_train": 50}},
            },
            "train": {
                "max_iter": 2,
                "base_lr": 0.01,
                "warmup_iters": 0,
                "log_period": 1,
                "device": "cpu",
                # one thread: the trainer's flush-to-zero mode then covers every thread
                # (pool threads an earlier test started would compute subnormals slowly)
                "num_threads": 1,
                **train,
            },
        },
    )


def test_a_bf16_autocast_forward_matches_float32(tmp_path):
    cfg = tiny_config(tmp_path / "shapes")
    train_set, _, classes = build_datasets(cfg, need_train=True, need_test=False)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(classes), cfg.data.input).eval()
    image, target = train_set[0]
    images = ImageList.from_tensors([image], model.size_divisibility, geometries=[target.geometry])
    with torch.no_grad():
        full = model.backbone(images.tensor)
        with autocast_context(CPU, torch.bfloat16):
            half = model.backbone(images.tensor)
            detections, _ = model(images)
    for name in full:
        assert half[name].dtype == torch.bfloat16  # the convolutions did run in bfloat16
        scale = float(full[name].abs().max())
        # bfloat16 keeps 8 bits of mantissa (relative step 2^-8 = 0.004) and errors add up
        # over a few layers; an unrelated map would be off by the order of the scale itself.
        assert float((half[name].float() - full[name]).abs().max()) < 0.03 * scale, name
    det = detections[0]
    assert det.boxes.dtype == torch.float32 and torch.isfinite(det.boxes).all() and torch.isfinite(det.scores).all()


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_bf16_training_run_on_the_cpu_follows_float32(tmp_path, restore_threads):
    """train.amp_dtype: bf16 trains with bfloat16 autocast on the CPU: no GradScaler (its
    state stays empty), and the losses follow a float32 run of the same seed closely."""
    runs = {}
    for name, train in (("fp32", {"amp": False}), ("bf16", {"amp": True, "amp_dtype": "bf16"})):
        cfg = tiny_config(tmp_path / "shapes", **train)
        train_set, _, classes = build_datasets(cfg, need_train=True, need_test=False)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, len(classes), cfg.data.input)
        run = RunContext(cfg, model, train_set, None, tmp_path / name, classes, progress=False)
        trainer = Trainer(run)
        assert trainer.amp_dtype == (torch.bfloat16 if name == "bf16" else None)
        assert not trainer.scaler.is_enabled()
        trainer.train()
        records = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl") if '"loss"' in line]
        runs[name] = [r["loss"] for r in records]
        assert load_checkpoint(tmp_path / name / "model_final.pt")["scaler"] == {}
    assert len(runs["bf16"]) == 2
    for a, b in zip(runs["fp32"], runs["bf16"]):
        assert b == pytest.approx(a, rel=0.05)
    assert runs["fp32"] != runs["bf16"]  # bf16 did compute differently


def test_channels_last_batches():
    images = ImageList.from_tensors([torch.rand(3, 8, 12), torch.rand(3, 10, 6)], 4)
    moved = images_to(images, CPU, channels_last=True)
    assert moved.tensor.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(moved.tensor, images.tensor) and moved.image_sizes == images.image_sizes
    assert images_to(images, CPU).tensor.is_contiguous()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_the_gpu_check_stops_at_once_without_a_gpu():
    """tools/gpu_check.sh is for a person with a GPU: here it must say so in one line and
    exit 1 before doing anything (no output folder)."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(root / "tools" / "gpu_check.sh"), "--out", "/nonexistent/gpu_check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "gpu_check: needs a CUDA GPU, and torch.cuda.is_available() is False"
    )
    assert not Path("/nonexistent/gpu_check").exists()
