"""Channels-last (NHWC) training, and the convolutions routed around it on the CPU.

Channels-last tensors let oneDNN (CPU) and cuDNN (tensor cores) run convolutions without
reordering activations: on this project's 2-core CPU a ResNet-50-FPN training step ran 1.07x
faster, the ResNet-18-FPN BCCD recipe's no faster (README, "Speed against torchvision").

One CPU kernel is unsafe with it: oneDNN's 1x1 convolution with stride > 1 computes its
weight gradient from an NHWC source through a "reduce to unit stride" workspace that it
overruns when the input has fewer channels than its register block (oneDNN issue #6035:
segmentation fault, hang or wrong gradients; here torch 2.14 crashed on 4 -> 8, 8 -> 8 and
8 -> 16 channels). So on the CPU every strided 1x1 convolution (a ResNet's downsample
shortcut) keeps NCHW weights and gets its input in NCHW: the rest of the network stays
channels-last. Blocked (NCHW) sources and unit strides do not take that path (same issue).

    to_channels_last(model, device)   # before the optimizer is built: parameters keep their identity
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

_ROUTED = "_detkit_nchw_input"


def _is_strided_pointwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and tuple(module.stride) != (1, 1)


def _nchw_input(module: nn.Module, args: Tuple[Tensor, ...]):
    """Forward pre-hook: the input in NCHW (a copy only when it is channels-last) when a
    backward may follow; without autograd the forward kernel is safe and inference runs
    as on a model that was never routed."""
    x = args[0]
    if torch.is_grad_enabled() and x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 1:  # NHWC
        return (x.clone(memory_format=torch.contiguous_format),) + tuple(args[1:])
    return None


def route_strided_pointwise(model: nn.Module) -> int:
    """Keep every strided 1x1 convolution of ``model`` in NCHW: weights contiguous, input
    made contiguous by a forward pre-hook (registered once per module). -> how many."""
    routed = 0
    for m in model.modules():
        if not _is_strided_pointwise(m):
            continue
        assert isinstance(m, nn.Conv2d)
        # clone, not contiguous(): a (O, I, 1, 1) weight with channels-last strides already
        # counts as contiguous, and the convolution would still pick the NHWC kernel from them
        m.weight.data = m.weight.data.clone(memory_format=torch.contiguous_format)
        if not getattr(m, _ROUTED, False):
            m.register_forward_pre_hook(_nchw_input)
            setattr(m, _ROUTED, True)
        routed += 1
    return routed


def _nchw_strides(shape) -> Tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def cpu_weights_in_nchw(model: nn.Module, dry_run: bool = False) -> int:
    """Give every 4-d CPU parameter plain NCHW strides, in place (``dry_run``: only count
    them). After channels-last training a model's weights keep NHWC strides, and the CPU
    convolution picks its kernel (and so its float rounding) from them: inference runs on
    NCHW weights, whichever way the model was trained, so that evaluating in the trainer
    and from the checkpoint give the same numbers. -> how many were (or would be) changed."""
    changed = 0
    for p in model.parameters():
        if p.dim() == 4 and p.device.type == "cpu" and p.stride() != _nchw_strides(p.shape):
            changed += 1
            if not dry_run:
                # clone, not contiguous(): a (O, I, 1, 1) weight with NHWC strides counts as contiguous
                p.data = p.data.clone(memory_format=torch.contiguous_format)
    return changed


def to_channels_last(model: nn.Module, device: torch.device) -> int:
    """``model``'s weights in channels-last, in place (feed it channels-last images); on the
    CPU the strided 1x1 convolutions routed around it. -> the number routed."""
    model.to(memory_format=torch.channels_last)
    return route_strided_pointwise(model) if device.type == "cpu" else 0
