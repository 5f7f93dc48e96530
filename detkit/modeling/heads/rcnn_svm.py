"""The classic region heads: R-CNN (Girshick et al., CVPR 2014) and SPP-net (He et al., ECCV
2014), on the shared ``RoIHeadBase``. Both turn a region into "pool5" features, run fc6 / fc7
on them, are fine-tuned as (K + 1)-way softmax classifiers, and are then scored by one linear
SVM per class with class-specific ridge box regression on pool5; the two differ only in how a
region becomes pool5:

    RCNNHead   warp the region of the IMAGE (with context) to S x S, run the whole conv
               network on the crop, max-pool conv5 to P x P (R-CNN sec. 2.1, appendix A)
    SPPHead    project the window onto the conv5 map computed once per image and pool it into
               a spatial pyramid {6, 3, 2, 1} (SPP-net sec. 2.3, 4.1)

Shapes: N images, R regions (over the batch, or of one image where said), K foreground
classes, D fc7 width, Dp pool5 width.

num_classes is K, the FOREGROUND classes (background not included): the fine-tuning classifier
``predictor.cls_score`` has K + 1 outputs (index 0 = background); the SVMs and the box
regressors have K (column / block k - 1 is class k; background has neither).

What is learnt without gradients lives in buffers, so that ``model_final.pt`` carries it
and ``detkit eval`` / ``detkit demo`` need nothing else: ``LinearSVMs`` (weights (K, D'), biases
(K,), the feature scale, a ``fitted`` flag) and ``LinearBoxRegressor`` (weights (K, Dp, 4),
biases (K, 4), its feature scale, ``fitted``). The engine fits them from cached features
(``detkit.engine.svm_stages``, ``detkit.engine.svm``) and loads them with ``set``.

Training (fine-tuning, sec. 2.3): the base labels and samples regions (fg IoU >= 0.5; the
configs set the paper's sampling) and the loss is the softmax cross-entropy ``loss_cls``
alone: neither paper fine-tunes a box regressor (that came with Fast R-CNN).

Inference: class outputs are (R, 2K + 1) = the K + 1 fine-tuning logits, then the K scores the
detections use: the SVM scores once the SVMs are fitted, else the softmax probabilities
(``class_scores`` returns those K columns; ``losses`` reads the logits, so a validation loss
works in either state). Box deltas come from the ridge regressors once fitted (decoded with
unit weights: they predict the raw deltas of appendix C), else None (boxes stay proposals).
Before the base's per-class NMS, each image keeps per class only its ``topk_per_class`` best
regions (rcnn_test.m keeps 100 and sets no score threshold).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.modeling.backbones.common import Body
from detkit.modeling.box_ops import BalancedSampler, BoxCoder, Matcher
from detkit.modeling.heads.base import RoIHeadBase
from detkit.modeling.heads.fast_rcnn import MLPBoxHead
from detkit.modeling.poolers import SPPPooler, WarpPooler
from detkit.structures import BACKGROUND, Detections, ImageList

# The layers whose outputs a classic head gives per region.
LAYERS = ("pool5", "fc7")


class _FittedLinear(nn.Module):
    """Weights fitted outside autograd (scikit-learn) kept as buffers, so they travel in the
    state dict / checkpoint: weight, bias, the feature ``scale`` and ``fitted`` (False until
    ``set``). ``what`` names them in the shape error."""

    weight: Tensor
    bias: Tensor
    scale: Tensor
    fitted: Tensor

    def __init__(self, weight_shape: Tuple[int, ...], bias_shape: Tuple[int, ...], what: str):
        super().__init__()
        self.what = what
        self.register_buffer("weight", torch.zeros(weight_shape))
        self.register_buffer("bias", torch.zeros(bias_shape))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def set(self, weight, bias, scale: float) -> None:
        weight, bias = torch.as_tensor(weight), torch.as_tensor(bias)
        if tuple(weight.shape) != tuple(self.weight.shape) or tuple(bias.shape) != tuple(self.bias.shape):
            raise ValueError(
                f"{self.what} weights {tuple(weight.shape)} / biases {tuple(bias.shape)} do not fit "
                f"{tuple(self.weight.shape)} / {tuple(self.bias.shape)}"
            )
        self.weight.copy_(weight)
        self.bias.copy_(bias)
        self.scale.fill_(float(scale))
        self.fitted.fill_(True)


class LinearSVMs(_FittedLinear):
    """K linear SVMs as buffers: scores (R, K) = (x * scale) @ weight.T + bias.

    scale: the factor that brought the training features to a mean L2 norm of 20 (R-CNN's
    rcnn_scale_features.m), applied to test features alike. A class without an SVM (no
    positives in training) has bias -inf: it never fires. ``fitted`` is False until ``set``."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__((num_classes, dim), (num_classes,), "SVM")

    def forward(self, x: Tensor) -> Tensor:
        return (x.float() * self.scale) @ self.weight.t() + self.bias


class LinearBoxRegressor(_FittedLinear):
    """K class-specific linear box regressors as buffers: deltas (R, 4K) with block k - 1 =
    (x * scale) @ weight[k - 1] + bias[k - 1], the raw (dx, dy, dw, dh) of R-CNN appendix C.
    A class fitted on no regions has zero weights and bias: its boxes are not moved."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__((num_classes, dim, 4), (num_classes, 4), "box regression")

    def forward(self, x: Tensor) -> Tensor:
        k, d, _ = self.weight.shape
        flat = self.weight.permute(1, 0, 2).reshape(d, 4 * k)  # column 4 (k - 1) + j: class k, delta j
        return (x.float() * self.scale) @ flat + self.bias.reshape(-1)


class SoftmaxClassifier(nn.Module):
    """cls_score: D -> K + 1 logits, the fine-tuning classifier (R-CNN sec. 2.3: the
    ImageNet 1000-way layer replaced by a randomly initialised (N + 1)-way one)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.num_classes = int(num_classes)
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.zeros_(self.cls_score.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.cls_score(x)


class ClassicHead(RoIHeadBase):
    """What R-CNN's and SPP-net's heads share (see the module docstring); a subclass defines
    ``pool5(images, features, boxes)``.

    box_head: pool5 (R, Dp) -> fc7 (R, D) (``MLPBoxHead``: "fc6", "fc7", ReLU after each).
    pool5_dim: Dp. svm_features: "fc7" or "pool5", the SVMs' input.
    topk_per_class: per image and class, the best this many regions go to NMS (0: all).
    region_batch: regions per forward pass at test time (R-CNN runs a whole network per
    region: a few hundred crops at a time bound the memory).
    The other arguments are the base's (``heads.base.RoIHeadBase``); the box coder is fixed
    to unit weights (the ridge regressors predict raw deltas).
    """

    def __init__(
        self,
        box_head: MLPBoxHead,
        pool5_dim: int,
        num_classes: int,
        matcher: Matcher,
        sampler: BalancedSampler,
        svm_features: str = "fc7",
        topk_per_class: int = 100,
        region_batch: int = 256,
        add_gt_as_proposals: bool = True,
        score_thresh: float = float("-inf"),
        nms_thresh: float = 0.3,
        detections_per_img: int = 100,
        min_box_size: float = 1e-2,
    ):
        super().__init__(
            num_classes,
            BoxCoder((1.0, 1.0, 1.0, 1.0)),
            matcher,
            sampler,
            add_gt_as_proposals=add_gt_as_proposals,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            min_box_size=min_box_size,
        )
        if svm_features not in LAYERS:
            raise ValueError(f"svm_features must be one of {LAYERS}, got {svm_features!r}")
        fc_dim = box_head.out_features
        self.box_head = box_head
        self.predictor = SoftmaxClassifier(fc_dim, num_classes)
        self.svm_features = svm_features
        self.pool5_dim = int(pool5_dim)
        self.feature_dims = {"pool5": self.pool5_dim, "fc7": fc_dim}
        self.svms = LinearSVMs(num_classes, self.feature_dims[svm_features])
        self.box_regressor = LinearBoxRegressor(num_classes, self.pool5_dim)
        self.topk_per_class = int(topk_per_class)
        self.region_batch = int(region_batch)

    @property
    def class_agnostic(self) -> bool:
        return False

    @abstractmethod
    def pool5(self, images: ImageList, features: Dict[str, Tensor], boxes: List[Tensor]) -> Tensor:
        """boxes: per image (R_i, 4) in network-input pixels -> (R, Dp) for all of them, in order."""

    # -- features --------------------------------------------------------------------------
    def _chunks(self, boxes: List[Tensor]):
        """The boxes in pieces of at most ``region_batch`` regions (per image lists, empty
        where an image has none in a piece); one piece in training (gradients flow anyway)."""
        if self.training:
            yield boxes
            return
        budget = self.region_batch
        counts = [len(b) for b in boxes]
        starts = [0] * len(boxes)
        while any(s < c for s, c in zip(starts, counts)):
            piece, left = [], budget
            for i, b in enumerate(boxes):
                take = min(left, counts[i] - starts[i])
                piece.append(b[starts[i] : starts[i] + take])
                starts[i] += take
                left -= take
            yield piece

    def region_features(
        self, images: ImageList, features: Dict[str, Tensor], boxes: List[Tensor], layers: Sequence[str] = LAYERS
    ) -> Dict[str, Tensor]:
        """-> {layer: (R, width)} for ``layers`` among pool5 / fc7, the regions of all images
        in order (the feature cache and ``predict`` both read them here)."""
        wanted = set(layers)
        out: Dict[str, List[Tensor]] = {name: [] for name in wanted}
        for piece in self._chunks(boxes):
            pool5 = self.pool5(images, features, piece)
            if "pool5" in wanted:
                out["pool5"].append(pool5)
            if "fc7" in wanted:
                out["fc7"].append(self.box_head(pool5))
        empty = images.tensor.new_zeros
        return {
            name: torch.cat(parts, 0) if parts else empty((0, self.feature_dims[name])) for name, parts in out.items()
        }

    # -- RoIHeadBase ------------------------------------------------------------------------
    def predict(
        self, images: ImageList, features: Dict[str, Tensor], boxes: List[Tensor]
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Training: logits (R, K + 1), no deltas. Eval: (R, 2K + 1) = logits and the K
        detection scores (SVM scores once fitted, else softmax), and the regressed deltas
        (R, 4K) once the box regressors are fitted (else None)."""
        if self.training:
            return self.predictor(self.region_features(images, features, boxes, ("fc7",))["fc7"]), None
        regress = bool(self.box_regressor.fitted)
        layers = {"fc7", self.svm_features} | ({"pool5"} if regress else set())
        feats = self.region_features(images, features, boxes, sorted(layers))
        logits = self.predictor(feats["fc7"]).float()
        if bool(self.svms.fitted):
            scores = self.svms(feats[self.svm_features])
        else:
            scores = F.softmax(logits, -1)[:, BACKGROUND + 1 :]
        deltas = self.box_regressor(feats["pool5"]) if regress else None
        return torch.cat([logits, scores], 1), deltas

    def class_scores(self, class_outputs: Tensor) -> Tensor:
        """(R, 2K + 1) -> its last K columns (SVM scores or softmax, see ``predict``);
        (R, K + 1) logits (training) -> softmax without the background column."""
        k = self.num_classes
        if class_outputs.shape[1] == 2 * k + 1:
            return class_outputs[:, k + 1 :]
        return F.softmax(class_outputs, -1)[:, BACKGROUND + 1 :]

    def losses(
        self, class_outputs: Tensor, deltas: Optional[Tensor], labels: Tensor, box_targets: Tensor
    ) -> Dict[str, Tensor]:
        """Softmax cross-entropy over K + 1 classes on the sampled regions (R-CNN sec. 2.3,
        SPP-net sec. 4.2); no box loss: the box regressors are fitted afterwards."""
        logits = class_outputs[:, : self.num_classes + 1].float()
        if labels.numel() == 0:
            return {"loss_cls": logits.sum() * 0}
        return {"loss_cls": F.cross_entropy(logits, labels)}

    def inference(
        self,
        class_outputs: Tensor,
        deltas: Optional[Tensor],
        proposals: List[Tensor],
        image_sizes: List[Tuple[int, int]],
    ) -> List[Detections]:
        """The base's inference after keeping, per image and class, only the
        ``topk_per_class`` best scored regions (rcnn_test.m: 100 per class and image)."""
        k = self.num_classes
        if self.topk_per_class > 0 and class_outputs.shape[1] == 2 * k + 1 and class_outputs.shape[0]:
            scores = class_outputs[:, k + 1 :].clone()
            start = 0
            for n in (len(p) for p in proposals):
                if n > self.topk_per_class:
                    block = scores[start : start + n]
                    keep = torch.zeros_like(block, dtype=torch.bool)
                    keep.scatter_(0, block.topk(self.topk_per_class, dim=0).indices, True)
                    block[~keep] = float("-inf")
                start += n
            class_outputs = torch.cat([class_outputs[:, : k + 1], scores], 1)
        return super().inference(class_outputs, deltas, proposals, image_sizes)


class RCNNHead(ClassicHead):
    """R-CNN's head: ``pooler`` (a ``WarpPooler``) crops and warps each region of the image
    itself (``images.tensor``: the normalised batch, so out-of-image pixels are the mean),
    ``body`` (the conv layers of the network, one output map) runs on the crops, and conv5 is
    max-pooled to ``pool_size`` x ``pool_size`` = pool5 (for AlexNet at 227 px: conv5 is
    13 x 13 and adaptive max pooling to 6 x 6 is exactly its 3 x 3 / 2 max-pool). The
    features of the detector's backbone are not used (it is ``ImageInput`` in R-CNN configs).

    The other arguments are ``ClassicHead``'s."""

    def __init__(
        self, pooler: WarpPooler, body: Body, box_head: MLPBoxHead, num_classes: int, pool_size: int = 6, **kw
    ):
        (name,) = body.out_features
        channels = body.out_channels_per_feature[name]
        super().__init__(box_head, channels * pool_size * pool_size, num_classes, **kw)
        self.pooler = pooler
        self.body = body
        self.body_output = name
        self.pool_size = int(pool_size)

    def pool5(self, images: ImageList, features: Dict[str, Tensor], boxes: List[Tensor]) -> Tensor:
        crops = self.pooler([images.tensor], boxes)  # (R, 3, S, S)
        if crops.shape[0] == 0:
            return crops.new_zeros((0, self.pool5_dim))
        conv5 = self.body(crops)[self.body_output]
        return F.adaptive_max_pool2d(conv5, self.pool_size).flatten(1)


class SPPHead(ClassicHead):
    """SPP-net's head: ``pooler`` (an ``SPPPooler``) pools each window from the backbone map
    ``in_feature`` (conv5, computed once per image by the detector's backbone) into
    channels x sum(n^2) features (pool5's counterpart), then fc6 / fc7.

    Single scale: the image pyramid of sec. 3.1.2 (each window pooled from the scale where
    its area is closest to 224^2) plugs in at ``pool5``: it is the only place that reads the
    feature map, so a multi-scale variant gives it the maps of every scale and picks per
    window. The other arguments are ``ClassicHead``'s."""

    def __init__(self, pooler: SPPPooler, in_feature: str, channels: int, box_head: MLPBoxHead, num_classes: int, **kw):
        super().__init__(box_head, channels * pooler.num_bins, num_classes, **kw)
        self.pooler = pooler
        self.in_feature = in_feature

    def pool5(self, images: ImageList, features: Dict[str, Tensor], boxes: List[Tensor]) -> Tensor:
        return self.pooler([features[self.in_feature]], boxes)
