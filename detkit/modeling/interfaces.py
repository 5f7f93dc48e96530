"""The three interfaces of the one Detector, as code: ``Backbone``, ``ProposalGenerator`` and
``RoIHead`` (typing Protocols; ``isinstance`` checks them at run time, mypy statically).

Every detector of the R-CNN lineage is backbone -> proposal generator -> RoI head; the papers
differ in which implementation they plug in:

    Backbone            SingleMap (ResNet C4, VGG conv5_3), FPN (P2..P6)
    ProposalGenerator   RPN, SelectiveSearchProposals, PrecomputedProposals
    RoIHead             FastRCNNHead, Res5Head (both on ``heads.base.RoIHeadBase``)

Shapes: N images, R regions of one image, K foreground classes, C channels.
Boxes are xyxy in network-input pixels (``detkit.structures``); the Detector maps detections
back to original pixels, no part below it does.

The two forward signatures share their argument order on purpose::

    ProposalGenerator.forward(images, features, targets=None) -> (proposals, losses)
    RoIHead.forward(images, features, proposals, targets=None) -> (detections, losses)

Losses are a dict of scalar tensors with namespaced keys (``loss_rpn_cls``, ``loss_rpn_box``,
``loss_cls``, ``loss_box``); a part computes its losses whenever targets are given, also in
eval mode (validation loss); only the Detector weights them. Generators without a trained part
(Selective Search, proposal files) return ``{}``.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Protocol, Tuple, runtime_checkable

from torch import Tensor

from detkit.structures import Detections, ImageList, Proposals, Target


@runtime_checkable
class Backbone(Protocol):
    """(N, 3, H, W) -> ordered dict name -> (N, C, H / stride, W / stride).

    out_features: the output names, fine to coarse (e.g. ["p2", ..., "p6"] or ["c4"]).
    out_channels: C, the same for every output (the RPN head is shared across levels).
    out_strides: name -> stride in input pixels.
    size_divisibility: inputs are padded to a multiple of it (FPN: the coarsest body stride,
        so that every top-down sum has matching sizes; a single map: its stride).
    """

    out_features: List[str]
    out_channels: int
    out_strides: Dict[str, int]
    size_divisibility: int

    def forward(self, x: Tensor) -> Dict[str, Tensor]: ...

    def __call__(self, x: Tensor) -> Dict[str, Tensor]: ...


@runtime_checkable
class ProposalGenerator(Protocol):
    """forward(images, features, targets=None) -> (proposals per image, losses).

    proposals[i]: ``Proposals`` of image i, boxes (R, 4) in network-input pixels, scores (R,)
    best first. losses: ``{}`` unless the generator trains (the RPN) and targets are given.
    """

    def forward(
        self, images: ImageList, features: Dict[str, Tensor], targets: Optional[List[Target]] = None
    ) -> Tuple[List[Proposals], Dict[str, Tensor]]: ...

    def __call__(
        self, images: ImageList, features: Dict[str, Tensor], targets: Optional[List[Target]] = None
    ) -> Tuple[List[Proposals], Dict[str, Tensor]]: ...


@runtime_checkable
class RoIHead(Protocol):
    """forward(images, features, proposals, targets=None) -> (detections per image, losses).

    num_classes: K, the FOREGROUND classes (labels 1..K; ``structures.BACKGROUND`` = 0 is
    never counted). detections: ``[]`` in training mode; in eval mode one ``Detections`` per
    image in network-input pixels. losses: computed whenever targets are given.
    """

    num_classes: int

    def forward(
        self,
        images: ImageList,
        features: Dict[str, Tensor],
        proposals: List[Proposals],
        targets: Optional[List[Target]] = None,
    ) -> Tuple[List[Detections], Dict[str, Tensor]]: ...

    def __call__(
        self,
        images: ImageList,
        features: Dict[str, Tensor],
        proposals: List[Proposals],
        targets: Optional[List[Target]] = None,
    ) -> Tuple[List[Detections], Dict[str, Tensor]]: ...


def check_implements(obj: Any, protocol: Any, role: str) -> None:
    """TypeError naming what is missing when ``obj`` does not implement ``protocol``: a
    member, or a ``forward`` that takes the interface's arguments (a programming error: the
    parts of a Detector are put together in code)."""
    where = f"{role} {type(obj).__name__} does not implement detkit.modeling.interfaces.{protocol.__name__}"
    if not isinstance(obj, protocol):
        members = [name for name in _members(protocol) if not hasattr(obj, name)]
        raise TypeError(where + (f": it lacks {', '.join(members)}" if members else ""))
    # isinstance only sees that a forward exists (every nn.Module has one): check it takes
    # the interface's positional arguments.
    wanted = [p for p in inspect.signature(protocol.forward).parameters if p != "self"]
    try:
        inspect.signature(obj.forward).bind(*wanted)
    except TypeError:
        raise TypeError(f"{where}: its forward does not take ({', '.join(wanted)})") from None


def _members(protocol: type) -> List[str]:
    names = list(getattr(protocol, "__annotations__", {}))
    names += [n for n, v in vars(protocol).items() if callable(v) and (n == "forward" or not n.startswith("_"))]
    return names
