"""Tests of detkit.modeling.layout: channels-last training with the strided 1x1
convolutions routed around it on the CPU.

The crash the routing avoids (oneDNN #6035: an 8 -> 16 channel stride-2 1x1 convolution's
weight gradient from an NHWC source) is run in a child process, so that a regression fails
this test instead of killing the test run; then a tiny detector's training step in
channels-last against NCHW: the backbone's features and gradients, and a whole training
step (the RPN's losses; the head's depend on near-tied proposals of a random model)."""

import subprocess
import sys
import textwrap

import torch
from torch import nn

from detkit.config import from_dict
from detkit.engine.inference import inference_model
from detkit.modeling.build import build_model
from detkit.modeling.layout import cpu_weights_in_nchw, route_strided_pointwise, to_channels_last
from detkit.schema import Config
from detkit.structures import ImageList, Target


def test_routes_only_strided_pointwise_convolutions():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2),  # strided but 3x3: stays channels-last
        nn.Conv2d(8, 16, 1),  # 1x1, unit stride: stays
        nn.Conv2d(16, 16, 1, stride=2),  # routed
        nn.Conv2d(16, 32, 1, stride=(1, 2)),  # routed
    )
    assert to_channels_last(net, torch.device("cpu")) == 2
    assert route_strided_pointwise(net) == 2  # idempotent: one hook per module
    assert len(net[2]._forward_pre_hooks) == 1
    cl = torch.channels_last
    assert net[0].weight.is_contiguous(memory_format=cl) and not net[0].weight.is_contiguous()
    assert net[2].weight.is_contiguous() and net[3].weight.is_contiguous()
    seen = {}
    net[2].register_forward_hook(lambda m, args, out: seen.update(nchw=args[0].is_contiguous()))
    net(torch.rand(1, 3, 33, 33).contiguous(memory_format=cl))
    assert seen["nchw"]


def test_the_crashing_convolution_trains_when_routed():
    script = textwrap.dedent(
        """
        import torch
        from torch import nn
        from detkit.modeling.layout import to_channels_last
        torch.set_num_threads(1)
        torch.manual_seed(0)
        conv = nn.Conv2d(8, 16, 1, stride=2, bias=False)
        ref = nn.Conv2d(8, 16, 1, stride=2, bias=False)
        ref.load_state_dict(conv.state_dict())
        to_channels_last(conv, torch.device("cpu"))
        x = torch.randn(2, 8, 40, 52)
        conv(x.contiguous(memory_format=torch.channels_last)).square().sum().backward()
        ref(x).square().sum().backward()
        print(float((conv.weight.grad - ref.weight.grad).abs().max()))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-500:]}"
    assert float(done.stdout.strip()) < 1e-3


def test_channels_last_training_matches_nchw(one_thread):
    cfg = from_dict(
        Config,
        {
            "data": {"classes": ["a", "b"]},
            "model": {
                "backbone": {"name": "tiny", "fpn": True, "out_channels": 16, "tiny_widths": [8, 16, 16, 16]},
                "anchors": {"sizes": [[16], [32], [64], [128], [256]]},
                "roi_head": {"name": "fast_rcnn", "fc_dims": [32, 32]},
            },
        },
    )
    torch.manual_seed(0)
    nchw = build_model(cfg.model, 2).train()
    nhwc = build_model(cfg.model, 2).train()
    nhwc.load_state_dict(nchw.state_dict())
    assert to_channels_last(nhwc, torch.device("cpu")) == 4  # one downsample per tiny stage
    image = torch.rand(2, 3, 96, 128)
    # The backbone (the only part the layout changes: convolutions and training BatchNorm):
    # features and every gradient of a fixed loss on them.
    a, b = nchw.backbone(image), nhwc.backbone(image.contiguous(memory_format=torch.channels_last))
    assert b["p2"].is_contiguous(memory_format=torch.channels_last)
    for name in a:  # float32 kernels of two layouts sum in other orders
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4 * float(a[name].detach().abs().max()))
    sum((v * torch.linspace(-1, 1, v.numel()).view(v.shape)).sum() for v in a.values()).backward()
    sum((v * torch.linspace(-1, 1, v.numel()).view(v.shape)).sum() for v in b.values()).backward()
    grads = dict(nhwc.backbone.named_parameters())
    checked = 0
    for name, p in nchw.backbone.named_parameters():
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-3, atol=1e-4 * scale)
        checked += 1
    assert checked == sum(1 for _ in nchw.backbone.parameters())
    # A whole training step runs in channels-last (the routed downsample convs included),
    # with the RPN losses of the NCHW step (its sampling does not hinge on near ties).
    target = [Target(torch.tensor([[10.0, 12.0, 60.0, 70.0]]), torch.tensor([1]))] * 2
    losses = []
    for model, x in ((nchw, image), (nhwc, image.contiguous(memory_format=torch.channels_last))):
        torch.manual_seed(1)
        _, out = model(ImageList(x, [(96, 128)] * 2), target)
        sum(out.values()).backward()
        losses.append(out)
    for key in ("loss_rpn_cls", "loss_rpn_box"):
        torch.testing.assert_close(losses[1][key], losses[0][key], rtol=1e-4, atol=1e-6)
    assert all(torch.isfinite(v) for v in losses[1].values())


def test_inference_runs_nchw_weights_and_no_routing(one_thread):
    # A model trained channels-last evaluates as its checkpoint (NCHW weights, no hooks) does.
    cfg = from_dict(
        Config,
        {
            "model": {
                "backbone": {"name": "tiny", "fpn": False, "tiny_widths": [8, 16, 16, 24], "norm": "gn"},
                "anchors": {"sizes": [[16, 32, 64]]},
                "roi_head": {"name": "fast_rcnn", "fc_dims": [32, 32]},
            }
        },
    )
    torch.manual_seed(0)
    trained = build_model(cfg.model, 2)
    fresh = build_model(cfg.model, 2)
    fresh.load_state_dict(trained.state_dict())
    to_channels_last(trained, torch.device("cpu"))
    assert cpu_weights_in_nchw(trained, dry_run=True) > 0 and cpu_weights_in_nchw(fresh, dry_run=True) == 0
    net = inference_model(trained.eval())
    assert net is not trained and cpu_weights_in_nchw(net, dry_run=True) == 0  # GN: nothing folded, relaid
    assert inference_model(fresh.eval()) is fresh
    seen = []
    conv = net.backbone.body.layer2[0].downsample[0]  # a routed strided 1x1 convolution
    conv.register_forward_hook(lambda m, args, out: seen.append(args[0].stride(1) == 1))
    images = ImageList.from_tensors([torch.rand(3, 96, 128)], net.size_divisibility)
    with torch.no_grad():
        (a,), _ = net(images)
        (b,), _ = fresh(images)
    assert seen == [True]  # no grad: the channels-last input went through as it came
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)
