"""Tests of detkit.modeling.fold: BatchNorm folded into the convolution before it.

A hand-computed fold; which (conv, BN) pairs are found (and which are not: batch statistics,
a layer between them); a whole detector's detections with and without the fold (inference);
and the training-time fold of frozen BatchNorm (same state-dict layout, same outputs and
gradients in float64, checkpoints of the unfolded model load)."""

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detkit.config import from_dict
from detkit.engine.inference import inference_model
from detkit.modeling.build import build_model
from detkit.modeling.fold import (
    FoldedNorm,
    FrozenNormConv2d,
    conv_norm_pairs,
    fold_batchnorm,
    fold_frozen_batchnorm,
    folded_copy,
)
from detkit.schema import Config
from detkit.structures import ImageList


def test_fold_by_hand():
    # s = gamma / sqrt(var + eps) = 0.5 / sqrt(3 + 1) = 0.25; W' = 2 * 0.25 = 0.5;
    # b' = (b - mean) * s + beta = (1 - 1) * 0.25 + 0.25 = 0.25
    conv = nn.Conv2d(1, 1, 1, bias=True)
    bn = nn.BatchNorm2d(1, eps=1.0)
    with torch.no_grad():
        conv.weight.fill_(2.0)
        conv.bias.fill_(1.0)
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(3.0)
        bn.weight.fill_(0.5)
        bn.bias.fill_(0.25)
    net = nn.Sequential(conv, bn).eval()
    x = torch.tensor([[[[0.0, 1.0], [2.0, -4.0]]]])
    expected = net(x)
    assert fold_batchnorm(net) == 1
    assert isinstance(net[1], nn.Identity)
    assert net[0].weight.item() == pytest.approx(0.5) and net[0].bias.item() == pytest.approx(0.25)
    torch.testing.assert_close(net(x), expected)
    torch.testing.assert_close(net(x), torch.tensor([[[[0.25, 0.75], [1.25, -1.75]]]]))


def test_pairs_only_where_bn_follows_the_conv_with_fixed_statistics():
    training_bn = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))  # batch statistics
    assert conv_norm_pairs(training_bn) == []
    assert len(conv_norm_pairs(training_bn.eval())) == 1
    between = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    assert conv_norm_pairs(between) == []  # BN(relu(conv)) is not affine in the conv's output
    no_stats = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    assert conv_norm_pairs(no_stats) == []
    frozen = nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4))  # fixed also in train mode
    assert len(conv_norm_pairs(frozen.train())) == 1
    gn = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4)).eval()
    assert conv_norm_pairs(gn) == []


def _tiny_fpn(norm: str, frozen_stages: int = 0, fold: bool = True) -> Config:
    return from_dict(
        Config,
        {
            "data": {"classes": ["a", "b"], "input": {"min_size_test": 128, "max_size": 192}},
            "model": {
                "backbone": {
                    "name": "tiny",
                    "fpn": True,
                    "out_channels": 16,
                    "tiny_widths": [8, 16, 16, 16],
                    "norm": norm,
                    "frozen_stages": frozen_stages,
                },
                "anchors": {"sizes": [[16], [32], [64], [128], [256]]},
                "roi_head": {"name": "fast_rcnn", "fc_dims": [32, 32]},
                "fold_batchnorm": fold,
            },
        },
    )


def _randomise_norms(model: nn.Module) -> None:
    """Non-trivial statistics and affine, so that a wrong fold shows."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)


def test_inference_model_gives_the_same_detections(one_thread):
    cfg = _tiny_fpn("bn")
    torch.manual_seed(0)
    model = build_model(cfg.model, 2, cfg.data.input)
    _randomise_norms(model)
    with torch.no_grad():
        model.roi_head.predictor.cls_score.bias[1] += 4.0  # real detections from random weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    net = inference_model(model)
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert net is not model and bns == 13  # the stem's, and per stage the block's two + the downsample's
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    images = ImageList.from_tensors([torch.rand(3, 128, 160)], model.size_divisibility)
    with torch.no_grad():
        (ref,), _ = model(images)
        (got,), _ = net(images)
    assert len(ref.boxes) > 0
    torch.testing.assert_close(got.boxes, ref.boxes, atol=1e-3, rtol=0)
    torch.testing.assert_close(got.scores, ref.scores, atol=1e-4, rtol=0)
    assert torch.equal(got.labels, ref.labels)
    # the model itself is untouched: same modules, same state
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == bns
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # folding off (or nothing to fold): the model itself
    off = build_model(_tiny_fpn("bn", fold=False).model, 2)
    assert inference_model(off) is off
    gn = build_model(_tiny_fpn("gn").model, 2).eval()
    assert folded_copy(gn) is gn


def test_frozen_batchnorm_folds_for_training_with_the_same_state_outputs_and_gradients(one_thread):
    torch.manual_seed(0)
    plain = build_model(_tiny_fpn("frozen_bn", frozen_stages=2, fold=False).model, 2)
    torch.manual_seed(0)
    folded = build_model(_tiny_fpn("frozen_bn", frozen_stages=2).model, 2)
    _randomise_norms(plain)
    state = plain.state_dict()
    assert list(folded.state_dict()) == list(state)  # checkpoints keep their layout
    folded.load_state_dict(state)
    assert sum(isinstance(m, FrozenNormConv2d) for m in folded.modules()) == 13  # every frozen_bn (see above)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules())
    assert [n for n, p in folded.named_parameters() if p.requires_grad] == [
        n for n, p in plain.named_parameters() if p.requires_grad
    ]
    plain.double().train()
    folded.double().train()
    x = torch.rand(1, 3, 96, 128, dtype=torch.float64)
    out_p, out_f = plain.backbone(x), folded.backbone(x)
    for name in out_p:
        torch.testing.assert_close(out_f[name], out_p[name], rtol=1e-10, atol=1e-12)
    sum(v.square().sum() for v in out_p.values()).backward()
    sum(v.square().sum() for v in out_f.values()).backward()
    grads_f = dict(folded.named_parameters())
    checked = 0
    for name, p in plain.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads_f[name].grad, p.grad, rtol=1e-9, atol=1e-12)
            checked += 1
    assert checked > 10
    # and at inference the training-time folds become plain convolutions
    folded.eval()
    net = inference_model(folded)
    assert not any(isinstance(m, (FrozenNormConv2d, FoldedNorm)) for m in net.modules())
    with torch.no_grad():
        out_n = net.backbone(x)
    for name in out_p:
        torch.testing.assert_close(out_n[name], out_p[name].detach(), rtol=1e-10, atol=1e-12)


def test_frozen_norm_checkpoint_with_batch_count_loads():
    # A checkpoint of a frozen nn.BatchNorm2d stage carries num_batches_tracked; one of
    # torchvision's FrozenBatchNorm2d may too (it drops it on load): both load folded.
    conv, bn = nn.Conv2d(2, 3, 1, bias=False), FrozenBatchNorm2d(3)
    net = nn.Sequential(conv, bn)
    assert fold_frozen_batchnorm(net) == 1
    state = {
        "0.weight": torch.ones(3, 2, 1, 1),
        "1.weight": torch.ones(3),
        "1.bias": torch.zeros(3),
        "1.running_mean": torch.zeros(3),
        "1.running_var": torch.ones(3),
        "1.num_batches_tracked": torch.tensor(5),
    }
    net.load_state_dict(state)
    x = torch.rand(1, 2, 4, 4)
    torch.testing.assert_close(net(x), x.sum(1, keepdim=True).expand(1, 3, 4, 4) / (1 + 1e-5) ** 0.5)
