"""What every backbone shares: normalisation choices, freezing, loading pretrained weights.

A backbone (``detkit.modeling.interfaces.Backbone``) maps (N, 3, H, W) to an ordered dict of
feature maps, with ``out_features`` (names, fine to coarse), ``out_channels`` (int, the same
for every output), ``out_strides`` (name -> stride in input pixels) and
``size_divisibility`` (inputs are padded to a multiple of it). A *body* (``Body``: ResNet,
VGG, tiny) gives stage outputs c2..c5 with per-output channels; ``SingleMap`` or ``FPN``
turn a body into a backbone.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detkit.errors import BackboneError


class SyncableBatchNorm2d(nn.BatchNorm2d):
    """``norm: syncbn``: a BatchNorm2d (same parameters, buffers and state dict) that the
    trainer of a distributed run replaces by a synchronised one, which normalises over the
    batch of every process (``detkit.engine.distributed.convert_sync_batchnorm``). On one
    process (evaluation, demo) it is plain BatchNorm; training it on one process is refused
    there, since it would silently be plain BatchNorm."""


def norm_layer(kind: str) -> Optional[Callable[[int], nn.Module]]:
    """bn: BatchNorm that trains (needed to train from scratch); frozen_bn: fixed statistics
    and affine (only sensible with pretrained weights, as in the papers); gn: GroupNorm with
    32 groups (or fewer for narrow layers), batch-size independent; syncbn: BatchNorm whose
    statistics a distributed run synchronises across processes (``SyncableBatchNorm2d``)."""
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "frozen_bn":
        return FrozenBatchNorm2d
    if kind == "gn":
        # 32 groups (Wu & He) where possible, but at least 4 channels per group in narrow
        # layers; always a group count that divides c.
        return lambda c: nn.GroupNorm(max(g for g in range(1, max(1, min(32, c // 4)) + 1) if c % g == 0), c)
    if kind == "syncbn":
        return SyncableBatchNorm2d
    if kind == "none":
        return None
    raise BackboneError(f"unknown norm '{kind}' (use bn, frozen_bn, gn, syncbn or none)")


_FROZEN = "_detkit_frozen"


def freeze(modules: Iterable[nn.Module]) -> None:
    """Stop gradients and keep BatchNorm statistics fixed for these modules."""
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)
        for sub in m.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.eval()
                sub.track_running_stats = True
                # A marker read by keep_frozen_bn_in_eval (setattr: not a parameter or buffer).
                setattr(sub, _FROZEN, True)


def is_frozen_norm(module: nn.Module) -> bool:
    """Whether ``freeze`` fixed this normalisation layer (its statistics never change)."""
    return bool(getattr(module, _FROZEN, False))


def keep_frozen_bn_in_eval(module: nn.Module) -> None:
    """``model.train()`` would put frozen BatchNorm layers back into training mode; call
    this after it (Detector.train does)."""
    for sub in module.modules():
        if getattr(sub, _FROZEN, False):
            sub.eval()


class Body(nn.Module):
    """Base of the backbone bodies: ``train()`` keeps frozen BatchNorm layers in eval mode,
    so a body used on its own (without the Detector) keeps its frozen statistics too.

    out_features: the stage outputs it returns (among c2..c5, fine to coarse);
    out_channels_per_feature / out_strides: name -> channels / stride in input pixels."""

    out_features: List[str]
    out_channels_per_feature: Dict[str, int]
    out_strides: Dict[str, int]

    def train(self, mode: bool = True):
        super().train(mode)
        keep_frozen_bn_in_eval(self)
        return self


def load_pretrained(model: nn.Module, pretrained: str, weights_enum=None) -> None:
    """Load ``pretrained`` into a torchvision classification model: a local file (state dict,
    loaded with weights_only=True) or a torchvision weight name such as
    "ResNet50_Weights.IMAGENET1K_V1" / "IMAGENET1K_V1" (downloads: needs the internet or
    torch's cache)."""
    if os.path.isfile(pretrained):
        state = torch.load(pretrained, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
    else:
        if weights_enum is None:
            raise BackboneError(f"pretrained weights not found: {pretrained}")
        name = pretrained.split(".")[-1]
        try:
            weights = weights_enum[name]
        except KeyError:
            valid = ", ".join(w.name for w in weights_enum)
            raise BackboneError(
                f"pretrained '{pretrained}' is neither a file nor a {weights_enum.__name__} name ({valid})"
            ) from None
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as exc:  # offline: URLError and friends
            reason = (str(exc).strip().splitlines() or [""])[0][:120]
            raise BackboneError(
                f"cannot download {weights_enum.__name__}.{name} ({exc.__class__.__name__}: {reason}); "
                "download it elsewhere and pass the local file path"
            ) from None
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise BackboneError(
            f"pretrained weights {pretrained} do not fit {type(model).__name__}: {len(wrong)} tensors differ in "
            f"shape, e.g. {k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Classification heads (fc, classifier) are allowed to be absent or unused.
    missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
    if missing:
        raise BackboneError(f"pretrained weights {pretrained} lack {len(missing)} keys, e.g. {missing[:3]}")
