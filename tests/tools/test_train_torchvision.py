"""tools/train_torchvision.py and tools/torchvision_baseline.py: torchvision trains on
detkit's own data stream, the tiny backbone builds, the settings torchvision cannot follow
are listed, and run folders are never overwritten."""

from pathlib import Path

import pytest
import torch
from torchvision_baseline import build_torchvision_model, recipe_deviations, set_torchvision_mode
from train_torchvision import build_torchvision_train_loader, prepare_out_dir, torchvision_train_transforms

from detkit.data.build import build_datasets
from detkit.data.io import read_image
from detkit.data.loader import build_train_loader
from detkit.errors import TrainingError
from detkit.schema import load_run_config

ROOT = Path(__file__).resolve().parents[2]


def tiny_shapes(tmp_path, *extra):
    shapes = ["num_train=8", "num_test=2", "image_size=[64,96]", "object_size=[12,32]", "seed=3"]
    sets = [f"data.{s}.root={tmp_path / 'shapes'}" for s in ("train", "test")]
    sets += [f"data.{s}.shapes.{kv}" for s in ("train", "test") for kv in shapes]
    sets += ["data.input.min_size_train=[80]", "data.input.max_size=128", "data.input.min_size_test=80"]
    sets += ["data.batch_size=2", "train.seed=5", *extra]
    return load_run_config(str(ROOT / "configs/parity/shapes_large.yaml"), sets)


def test_torchvision_trains_on_detkits_stream_same_images_and_flips(tmp_path):
    cfg = tiny_shapes(tmp_path, "data.input.vflip_prob=0.5")
    dk_set, _, _ = build_datasets(cfg, need_test=False)
    tv_set, _, _ = build_datasets(cfg, need_test=False)
    tv_set.transforms = torchvision_train_transforms(cfg)
    dk_batches = iter(build_train_loader(dk_set, 2, seed=5, size_divisibility=32))
    tv_batches = iter(build_torchvision_train_loader(cfg, tv_set))
    flips = []
    for _ in range(8):
        _, dk_targets = next(dk_batches)
        tv_images, tv_targets, failed = next(tv_batches)
        assert failed == [] and len(tv_images) == len(dk_targets) == 2
        for image, tv_t, dk_t in zip(tv_images, tv_targets, dk_targets):
            assert tv_t.image_id == dk_t.image_id
            assert tv_t.geometry.flipped == dk_t.geometry.flipped
            assert tv_t.geometry.vflipped == dk_t.geometry.vflipped
            # torchvision gets the original pixels, mirrored when detkit's copy is (it resizes
            # and normalises itself); the boxes agree in original-image pixels.
            raw = read_image(tv_set.records[tv_set.id_to_index[tv_t.image_id]].file_name)
            raw = raw.flip(-1) if dk_t.geometry.flipped else raw
            assert torch.equal(image, raw.flip(-2) if dk_t.geometry.vflipped else raw)
            assert tv_t.geometry.size == dk_t.geometry.orig_size
            torch.testing.assert_close(
                dk_t.geometry.invert(dk_t.boxes), tv_t.geometry.invert(tv_t.boxes), atol=1e-3, rtol=0
            )
            flips.append((dk_t.geometry.flipped, dk_t.geometry.vflipped))
    for axis in (0, 1):  # both cases of both mirrors were compared
        assert any(f[axis] for f in flips) and not all(f[axis] for f in flips)


def test_tiny_backbone_builds_with_torchvisions_fpn_and_heads():
    cfg = load_run_config(str(ROOT / "configs/parity/shapes_one_class.yaml"))
    torch.manual_seed(0)
    model = build_torchvision_model(cfg, 1)
    body = model.backbone.body
    assert [getattr(body, f"layer{i}")[-1].conv2.out_channels for i in range(1, 5)] == [24, 48, 96, 192]
    assert model.backbone.out_channels == 64
    assert model.roi_heads.box_predictor.cls_score.out_features == 2  # background + circle
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 128
    set_torchvision_mode(model, False)
    assert model.transform.min_size == (160,)
    with torch.no_grad():
        out = model([torch.rand(3, 96, 128)])[0]
    assert set(out) == {"boxes", "scores", "labels"}


def test_settings_torchvision_cannot_follow_are_listed():
    bccd = load_run_config(str(ROOT / "configs/parity/bccd_val.yaml"))
    devs = recipe_deviations(bccd)
    assert any(d.startswith("box-head smooth-L1 beta: detkit 1, torchvision 1/9") for d in devs)
    shapes = load_run_config(str(ROOT / "configs/parity/shapes_overlap.yaml"))
    assert [d.split(":")[0] for d in recipe_deviations(shapes)] == ["box predictor init", "P6 anchor stride"]
    changed = load_run_config(
        str(ROOT / "configs/parity/shapes_overlap.yaml"),
        [
            "model.anchors.strides_from_input=true",
            "model.roi_head.predictor_init=pytorch",
            "model.roi_head.aligned=true",
            "model.loss_weights={loss_cls: 2.0}",
            "data.input.test_flips=[h,hv]",
        ],
    )
    devs = recipe_deviations(changed)
    assert [d.split(":")[0] for d in devs] == ["RoIAlign aligned", "test-time mirroring", "loss weights"]
    assert "detkit the image and h, hv merged, torchvision the image alone" in devs[1]


def test_restart_replaces_only_an_interrupted_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("x: 1\n")
    (out / "metrics.jsonl").write_text('{"iter": 2}\n')
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match="already holds a run"):
        prepare_out_dir(out, restart=False)
    prepare_out_dir(out, restart=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (out / "eval.json").write_text("{}")
    with pytest.raises(TrainingError, match="finished run"):
        prepare_out_dir(out, restart=True)
    assert (out / "eval.json").read_text() == "{}"


# Loss names: detkit's -> torchvision's.
LOSS_NAMES = {
    "loss_rpn_cls": "loss_objectness",
    "loss_rpn_box": "loss_rpn_box_reg",
    "loss_cls": "loss_classifier",
    "loss_box": "loss_box_reg",
}


def test_one_training_step_equals_torchvisions_when_sampling_takes_everything(tmp_path):
    """The same weights, batch and recipe give the same four losses and the same gradients in
    both frameworks. Sampling is the one random part of a step (which anchors and regions
    enter the losses); with every anchor and region taken (batch sizes far above their
    counts, positive fraction 1) nothing is left to chance, so what remains is the detection
    logic itself: anchors, matching (low-quality matches, border boxes), encoding, proposal
    selection, GT as proposals, RoIAlign level assignment, both losses and their
    normalisation. P6 anchor strides follow torchvision's input-derived ones."""
    from detkit.engine.convert import map_torchvision_state
    from detkit.modeling.build import build_model

    exhaustive = [
        "model.proposals.rpn.batch_size_per_image=1000000",
        "model.proposals.rpn.positive_fraction=1.0",
        "model.roi_head.batch_size_per_image=1000000",
        "model.roi_head.positive_fraction=1.0",
        "model.anchors.strides_from_input=true",
    ]
    cfg = tiny_shapes(tmp_path, *exhaustive)
    dk_set, _, classes = build_datasets(cfg, need_test=False)
    tv_set, _, _ = build_datasets(cfg, need_test=False)
    tv_set.transforms = torchvision_train_transforms(cfg)
    images, targets = next(iter(build_train_loader(dk_set, 2, seed=5, size_divisibility=32)))
    tv_images, tv_targets, _ = next(iter(build_torchvision_train_loader(cfg, tv_set)))
    assert sum(len(t.boxes) for t in targets) >= 2

    torch.manual_seed(0)
    tv = build_torchvision_model(cfg, len(classes))
    dk = build_model(cfg.model, len(classes))
    dk.load_state_dict(map_torchvision_state(tv.state_dict()))
    set_torchvision_mode(tv, True)
    dk.train()
    _, dk_losses = dk(images, targets)
    tv_losses = tv(tv_images, [{"boxes": t.boxes, "labels": t.labels} for t in tv_targets])
    assert set(LOSS_NAMES) == set(dk_losses)
    for ours, theirs in LOSS_NAMES.items():
        torch.testing.assert_close(dk_losses[ours], tv_losses[theirs], rtol=1e-4, atol=1e-6, msg=ours)
    assert all(v > 0 for v in dk_losses.values())  # every term took part

    sum(dk_losses.values()).backward()
    sum(tv_losses.values()).backward()
    tv_grads = map_torchvision_state({k: p.grad for k, p in tv.named_parameters() if p.grad is not None})
    dk_grads = {k: p.grad for k, p in dk.named_parameters() if p.grad is not None}
    assert set(dk_grads) == set(tv_grads) and len(dk_grads) > 20
    for name, grad in dk_grads.items():
        scale = tv_grads[name].abs().max().item()
        torch.testing.assert_close(grad, tv_grads[name], rtol=1e-3, atol=1e-4 * max(scale, 1e-8), msg=name)


@pytest.mark.parametrize("amp_dtype, want", [("bf16", torch.bfloat16), ("auto", None)])
def test_cpu_bf16_autocast_follows_the_config_in_training_and_testing(tmp_path, monkeypatch, amp_dtype, want):
    """train.amp_dtype bf16 on the CPU: torchvision's forwards run under bf16 autocast in
    training and at test time, as detkit's; "auto" on the CPU: none (float32)."""
    import torchvision_baseline
    from train_torchvision import train

    seen = []
    build = torchvision_baseline.build_torchvision_model

    def spying_build(cfg, num_classes):
        model = build(cfg, num_classes)
        model.register_forward_pre_hook(
            lambda m, args: seen.append(
                (m.training, torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            )
        )
        return model

    monkeypatch.setattr(torchvision_baseline, "build_torchvision_model", spying_build)
    cfg = tiny_shapes(
        tmp_path, "train.max_iter=2", "train.warmup_iters=1", "train.steps=[]", f"train.amp_dtype={amp_dtype}"
    )
    assert train(cfg, tmp_path / "run", progress=False) == 0
    assert [mode for mode, _ in seen] == [True, True, False, False]  # 2 steps, 2 test images
    assert {dtype for _, dtype in seen} == {want}
    assert (tmp_path / "run" / "eval.json").is_file()
