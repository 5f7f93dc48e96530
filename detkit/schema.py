"""The typed schema of detkit's YAML configs (validated by ``detkit.config``).

Every key a config may hold is a field below, with its default. Paper values are set in
the configs under ``configs/`` with a comment naming paper and section; defaults here follow
torchvision's Faster R-CNN where a choice had to be made.

Top level:  data (datasets, input sizes, batching) / model (backbone, proposals, RoI head) /
            train (optimiser and schedule) / test (evaluation).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Union

from detkit.config import PathStr

# The loss terms the detector's parts return (keys of model.loss_weights).
LOSS_NAMES = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box")


def _rel(**kw):
    """A path field resolved relative to the sibling ``root`` when that is set."""
    return field(default=None, metadata={"path": True, "relative_to": "root"}, **kw)


#: The shapes the generated dataset can draw, in label order (``ShapesConfig.classes``).
SHAPE_CLASSES = ("circle", "square", "triangle")


def _opt(default, help: str, **kw):
    """A ShapesConfig field with its help text (shown by ``detkit data shapes --help``)."""
    if isinstance(default, list):
        value = list(default)
        return field(default_factory=lambda: list(value), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ShapesConfig:
    """Options of the generated shapes dataset: ``format: shapes`` in a config, the flags of
    ``detkit data shapes``, and ``detkit.data.shapes.generate_shapes`` all use this one class,
    so they share one set of defaults. A range is [min, max]; from Python a single number
    means a fixed value (``object_size=21``). Checked on construction (one-line ValueError)."""

    num_train: int = _opt(300, "images in the train split")
    num_test: int = _opt(100, "images in the test split")
    seed: int = _opt(0, "image i of split s is drawn from a generator seeded by (seed, s, i)")
    image_size: List[int] = _opt([128, 192], "width and height (px), each drawn from [min, max]")
    aspect_ratio: Optional[List[float]] = _opt(
        None, "[min, max] of height / width (unset: any); sizes outside it are drawn again"
    )
    object_size: List[float] = _opt(
        [16.0, 64.0], "shape size (px: circle diameter, square / triangle side), drawn log-uniformly"
    )
    objects_per_image: List[int] = _opt([1, 6], "objects per image, drawn uniformly (fewer when placements fail)")
    classes: List[str] = _opt(list(SHAPE_CLASSES), f"shapes to draw, in label order (of {', '.join(SHAPE_CLASSES)})")
    max_iou: float = _opt(0.3, "reject a placement whose box IoU with an earlier shape is higher")
    min_visible: float = _opt(0.75, "reject a placement that leaves an earlier shape less of its pixels visible")
    cluster: float = _opt(
        0.0, "probability that a shape is placed near an earlier one (overlaps as far as max_iou allows)"
    )
    max_outside: float = _opt(
        0.0, "fraction of a shape that may lie outside the image (> 0: shapes cross the border, VOC truncated=1)"
    )
    max_rotation: float = _opt(20.0, "squares and triangles are rotated by up to +-this (degrees)")
    min_contrast: float = _opt(80.0, "RGB distance (0..255 scale) of an object colour from what lies under it")
    noise_std: float = _opt(6.0, "Gaussian pixel noise of the background (0..255 scale)")
    image_format: str = _opt("png", "png (lossless, exact edges) or jpg")

    def __post_init__(self):
        for name in ("num_train", "num_test", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
            setattr(self, name, int(value))
        self.image_size = _range("image_size", self.image_size, integer=True)
        self.object_size = _range("object_size", self.object_size, integer=False)
        self.objects_per_image = _range("objects_per_image", self.objects_per_image, integer=True)
        if self.aspect_ratio is not None:
            self.aspect_ratio = _range("aspect_ratio", self.aspect_ratio, integer=False)
        for name in ("max_iou", "min_visible", "cluster", "max_outside", "max_rotation", "min_contrast", "noise_std"):
            setattr(self, name, _finite(name, getattr(self, name)))
        fmt = str(self.image_format).lower().lstrip(".")
        self.image_format = "jpg" if fmt == "jpeg" else fmt
        if self.image_format not in ("png", "jpg"):
            raise ValueError(f"image_format must be 'png' or 'jpg', got {self.image_format!r}")
        side = self.image_size[0]
        if side < 16:
            raise ValueError(f"image_size must be at least 16 px, got {self.image_size!r}")
        lo, hi = self.object_size
        if lo < 4:
            raise ValueError(f"object_size must be at least 4 px, got {self.object_size!r}")
        if self.max_outside == 0.0 and hi * math.sqrt(2) > side - 2:
            # A square rotated by 45 degrees spans sqrt(2) x its side; it must still fit.
            raise ValueError(
                f"object_size max {hi:g} does not fit the smallest image "
                f"({side} px; need max * 1.42 <= image size - 2, or max_outside > 0)"
            )
        if hi > side:
            raise ValueError(f"object_size max {hi:g} is larger than the smallest image ({side} px)")
        if self.objects_per_image[0] < 0:
            raise ValueError(f"objects_per_image must be >= 0, got {self.objects_per_image!r}")
        if self.aspect_ratio is not None:
            a_lo, a_hi = self.aspect_ratio
            s_lo, s_hi = self.image_size
            if a_lo <= 0 or a_lo > s_hi / s_lo or a_hi < s_lo / s_hi:
                raise ValueError(
                    f"aspect_ratio {self.aspect_ratio!r} cannot be met by image_size {self.image_size!r} "
                    f"(height / width lies in [{s_lo / s_hi:.3g}, {s_hi / s_lo:.3g}])"
                )
        if not self.classes or not all(isinstance(c, str) for c in self.classes):
            raise ValueError(f"classes must be a non-empty list of names, got {self.classes!r}")
        unknown = [c for c in self.classes if c not in SHAPE_CLASSES]
        if unknown or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct names out of {', '.join(SHAPE_CLASSES)}, got {self.classes!r}")
        self.classes = list(self.classes)
        for name, ok, interval in (
            ("max_iou", 0.0 <= self.max_iou <= 1.0, "[0, 1]"),
            ("min_visible", 0.0 < self.min_visible <= 1.0, "(0, 1]"),
            ("cluster", 0.0 <= self.cluster <= 1.0, "[0, 1]"),
            ("max_outside", 0.0 <= self.max_outside < 1.0, "[0, 1)"),
            ("max_rotation", 0.0 <= self.max_rotation <= 180.0, "[0, 180] degrees"),
            ("min_contrast", 0.0 <= self.min_contrast <= 400.0, "[0, 400]"),
            ("noise_std", 0.0 <= self.noise_std <= 100.0, "[0, 100]"),
        ):
            if not ok:
                raise ValueError(f"{name} must be in {interval}, got {getattr(self, name)!r}")


def _range(name: str, value, integer: bool) -> list:
    """A number or a (min, max) pair -> [min, max]; one-line ValueError otherwise."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        raw = [value, value]
    else:
        try:
            raw = list(value)
        except TypeError:
            raw = []
        if len(raw) != 2:
            raise ValueError(f"{name} must be a number or a [min, max] pair, got {value!r}")
    for v in raw:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{name} must hold numbers, got {value!r}")
        if integer and not float(v).is_integer():
            raise ValueError(f"{name} must hold whole numbers, got {value!r}")
    pair = [int(float(v)) if integer else float(v) for v in raw]
    if pair[0] > pair[1]:
        raise ValueError(f"{name} must be [min, max] with min <= max, got {value!r}")
    return pair


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass
class DatasetConfig:
    """One dataset split. ``format``:

    voc:    root (devkit layout, or plain folders found as annotations/ + images/), or
            ann_dir + img_dir; split by ImageSets/Main/<split>.txt, split_file, or holdout.
    coco:   ann_file (+ img_dir), relative to root when root is set.
    shapes: a generated VOC devkit folder at root, created on first use from ``shapes``.
    ann_dir, img_dir, split_file, ann_file are relative to ``root`` when it is set, else to
    the YAML file that sets them.
    """

    format: Literal["voc", "coco", "shapes"] = "voc"  # voc, coco or shapes (a generated VOC folder)
    root: Optional[PathStr] = None  # dataset folder (VOC devkit / plain folders, COCO image root, shapes output)
    # VOC: ImageSets/Main/<split>.txt; with holdout: train or test (val); null or all: every image
    split: Optional[str] = None
    ann_dir: Optional[str] = _rel()  # VOC: folder of the XML files (found as annotations/ when unset)
    img_dir: Optional[str] = _rel()  # VOC: folder of the images; COCO: the folder file_name is relative to
    split_file: Optional[str] = _rel()  # a text file of image ids (file stems), one per line
    ann_file: Optional[str] = _rel()  # COCO: the annotation json
    holdout: float = 0.0  # without split files: hold out this fraction of the images (seeded) as test / val
    seed: int = 0  # seed of the holdout draw
    classes: Optional[List[str]] = None  # class names in label order; null: inferred (sorted, reported)
    filter_empty: bool = False  # drop images without objects
    shapes: ShapesConfig = field(default_factory=ShapesConfig)  # format shapes: the generator's parameters

    def __post_init__(self):
        if self.format == "coco" and not self.ann_file:
            raise ValueError("format coco needs ann_file")
        if self.format in ("voc", "shapes") and not self.root and not (self.ann_dir and self.img_dir):
            raise ValueError(f"format {self.format} needs root (or ann_dir and img_dir)")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")


@dataclass
class InputConfig:
    """Resize / flip / normalise (see ``detkit.data.transforms``)."""

    # shorter side in training (one drawn per image when several: multi-scale training)
    min_size_train: List[int] = field(default_factory=lambda: [800])
    max_size: int = 1333  # longer side at most this (train and test)
    min_size_test: int = 800  # shorter side at test time
    flip_prob: float = 0.5  # probability of a horizontal flip in training
    # probability of a vertical flip in training (0: none); for data without an up and a down
    vflip_prob: float = 0.0
    color_jitter: Optional[List[float]] = None  # brightness, contrast, saturation, hue
    # per-channel RGB mean subtracted (0..1 scale); ImageNet's by default
    pixel_mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    # per-channel RGB std divided by (0..1 scale)
    pixel_std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # Multi-scale testing (image pyramid, Fast R-CNN sec. 5.2 / SPP-net sec. 3.1.2): shorter
    # sides of the pyramid; the test image is resized to the largest (replacing
    # min_size_test), the detector rescales it for the others and pools each region from the
    # scale where its area is closest to 224^2. Empty: one scale, min_size_test.
    test_scales: List[int] = field(default_factory=list)
    # Test-time augmentation by mirroring (``modeling.tta``): each test image is also run
    # mirrored - h (left-right), v (upside down), hv (both) - and the views' detections are
    # merged: per-class NMS, box voting, scores averaged over the views. Empty: the image only.
    test_flips: List[Literal["h", "v", "hv"]] = field(default_factory=list)
    test_merge_nms: float = 0.5  # IoU of the per-class NMS over all views' detections
    # IoU at which a kept box averages the views' boxes of its class (0: off, keep the box)
    test_merge_vote_iou: float = 0.7
    # IoU at which a view's box of the class counts for the averaged score (0: off, keep the
    # score of the box NMS kept)
    test_merge_score_iou: float = 0.6

    def __post_init__(self):
        _check(
            all(s >= 1 for s in self.test_scales) and len(set(self.test_scales)) == len(self.test_scales),
            f"test_scales: distinct positive sizes, got {self.test_scales}",
        )
        _check(len(set(self.test_flips)) == len(self.test_flips), f"test_flips: distinct flips, got {self.test_flips}")
        for key in ("test_merge_nms", "test_merge_vote_iou", "test_merge_score_iou"):
            _check(0.0 <= getattr(self, key) <= 1.0, f"{key}: an IoU in [0, 1], got {getattr(self, key)}")
        for key in ("flip_prob", "vflip_prob"):
            _check(0.0 <= getattr(self, key) <= 1.0, f"{key}: a probability in [0, 1], got {getattr(self, key)}")


@dataclass
class DataConfig:
    train: Optional[DatasetConfig] = None  # the training split
    test: Optional[DatasetConfig] = None  # the evaluation split (eval, periodic evaluation, demo --show-gt)
    # Class names in label order for both splits; None: from train (inferred when not set there).
    classes: Optional[List[str]] = None
    input: InputConfig = field(default_factory=InputConfig)  # resizing, flipping, normalisation
    # training images per iteration and process: a distributed run of W processes trains on
    # a global batch of batch_size x W images per iteration (train.base_lr is for that batch)
    batch_size: int = 2
    test_batch_size: int = 1  # images per batch at evaluation
    num_workers: int = 0  # DataLoader worker processes (0: load in the main process)
    aspect_ratio_grouping: bool = True  # batch portrait and landscape images separately (less padding)

    def __post_init__(self):
        if self.batch_size < 1 or self.test_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_size} / {self.test_batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


def _check(ok: bool, message: str) -> None:
    """A ``__post_init__`` check: ValueError, which the config loader reports as a ConfigError
    prefixed with the section's key (e.g. ``model.proposals.rpn: fg_iou_thresh ...``)."""
    if not ok:
        raise ValueError(message)


def _check_box_weights(weights: List[float]) -> None:
    _check(
        len(weights) == 4 and all(w > 0 for w in weights),
        f"box_weights: 4 positive values (wx, wy, ww, wh), got {weights}",
    )


# Backbones whose bodies are residual networks (they need a normalisation layer).
_RESIDUAL_BACKBONES = ("tiny", "resnet18", "resnet34", "resnet50", "resnet101")


@dataclass
class BackboneConfig:
    """norm: bn, frozen_bn, gn or syncbn for the ResNets and tiny; none or bn for vgg16; none,
    bn or gn for alexnet (none: the original network, the only one ImageNet weights fit).
    frozen_stages: 0 trains everything; ResNets and tiny: k freezes the stem and the first
    k - 1 stages (at most 4 with the single C4 map, 5 with FPN); vgg16: conv blocks 1..k (0..5);
    alexnet: conv1..convk (0..5).
    """

    # (the names are detkit.modeling.build.BACKBONES'; tests/test_configs.py keeps them equal)

    # the backbone network (tiny: a small ResNet for tests and the quick start)
    name: Literal["tiny", "resnet18", "resnet34", "resnet50", "resnet101", "vgg16", "alexnet"] = "resnet50"
    fpn: bool = True  # an FPN over the backbone's stages (P2-P6); false: one stride-16 map (ResNet C4 / VGG conv5_3)
    out_channels: int = 256  # FPN channels
    # normalisation in the backbone: bn (trains), frozen_bn, gn, syncbn (bn with statistics
    # over the batch of every process of a distributed run; refused when training on one) or none
    norm: Literal["bn", "frozen_bn", "gn", "syncbn", "none"] = "bn"
    # normalisation in the FPN convs (null/none: none, as the FPN paper; syncbn as in norm)
    fpn_norm: Optional[Literal["bn", "gn", "syncbn", "none"]] = None
    frozen_stages: int = 0  # stages not trained: 0 none, 1 the stem, k the stem and the next k-1 stages
    # A local state-dict file or a torchvision weight name (e.g. ResNet50_Weights.IMAGENET1K_V1).
    pretrained: Optional[str] = None
    tiny_widths: List[int] = field(default_factory=lambda: [16, 32, 64, 128])  # name tiny: channels of its four stages
    tiny_blocks: int = 1  # name tiny: residual blocks per stage

    def __post_init__(self):
        if self.name in _RESIDUAL_BACKBONES:
            _check(self.norm != "none", f"norm: none: {self.name} needs a normalisation layer (bn, frozen_bn or gn)")
        elif self.name == "alexnet":
            _check(
                self.norm in ("none", "bn", "gn"), f"norm: {self.norm} is not available for alexnet (none, bn or gn)"
            )
        else:
            _check(self.norm in ("none", "bn"), f"norm: {self.norm} is not available for {self.name} (none or bn)")
        _check(self.out_channels >= 1, f"out_channels: must be >= 1, got {self.out_channels}")
        _check(self.frozen_stages >= 0, f"frozen_stages: must be >= 0, got {self.frozen_stages}")
        _check(
            len(self.tiny_widths) == 4 and all(w >= 1 for w in self.tiny_widths),
            f"tiny_widths: 4 positive channel counts (c2..c5), got {self.tiny_widths}",
        )
        _check(self.tiny_blocks >= 1, f"tiny_blocks: must be >= 1, got {self.tiny_blocks}")


@dataclass
class AnchorConfig:
    """sizes / aspect_ratios: one list per feature map the RPN looks at (FPN: P2..P6, the
    single map: one), or one list for all of them; every level must have the same number of
    anchors (sizes x ratios), as one RPN head serves all levels."""

    # anchor sizes sqrt(w h) in network-input px, one list per feature level (one list: every level)
    sizes: List[List[float]] = field(default_factory=lambda: [[32], [64], [128], [256], [512]])
    # anchor aspect ratios h / w, one list per level (one list: every level)
    aspect_ratios: List[List[float]] = field(default_factory=lambda: [[0.5, 1.0, 2.0]])
    offset: float = 0.0  # anchor centres at (x + offset) * stride: 0 the cell's corner, 0.5 its centre
    # strides as torchvision computes them (input size // feature size), for converted weights
    strides_from_input: bool = False

    def __post_init__(self):
        _check(0.0 <= self.offset < 1.0, f"offset: must be in [0, 1) (a fraction of the stride), got {self.offset}")
        for key in ("sizes", "aspect_ratios"):
            levels = getattr(self, key)
            _check(
                len(levels) > 0 and all(len(level) > 0 and all(v > 0 for v in level) for level in levels),
                f"{key}: non-empty lists of positive values, one per level, got {levels}",
            )


@dataclass
class RPNConfig:
    conv_depth: int = 1  # 3x3 convs in the RPN head before the objectness / box layers
    fg_iou_thresh: float = 0.7  # an anchor with IoU >= this with a box is a positive
    bg_iou_thresh: float = 0.3  # an anchor with IoU < this with every box is a negative (in between: ignored)
    batch_size_per_image: int = 256  # anchors sampled per image for the RPN loss
    positive_fraction: float = 0.5  # at most this fraction of them positive
    pre_nms_topk_train: int = 2000  # best proposals kept per level before NMS, training
    pre_nms_topk_test: int = 1000  # best proposals kept per level before NMS, testing
    post_nms_topk_train: int = 2000  # proposals kept per image after NMS, training
    post_nms_topk_test: int = 1000  # proposals kept per image after NMS, testing
    nms_thresh: float = 0.7  # NMS IoU threshold among proposals
    min_size: float = 1e-3  # proposals narrower or lower than this (px) are dropped
    score_thresh: float = 0.0  # proposals with a lower objectness probability are dropped
    smooth_l1_beta: float = 0.1111111111111111  # smooth-L1 beta of the RPN box loss (0: plain L1)
    # weights (wx, wy, ww, wh) of the box encoding
    box_weights: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    # training ignores anchors reaching more than this many px outside the image; -1 keeps all
    allowed_border: float = -1.0

    def __post_init__(self):
        _check(
            0.0 <= self.bg_iou_thresh <= self.fg_iou_thresh <= 1.0,
            f"fg_iou_thresh ({self.fg_iou_thresh}) must be >= bg_iou_thresh ({self.bg_iou_thresh}), both in [0, 1]",
        )
        _check(self.conv_depth >= 0, f"conv_depth: must be >= 0, got {self.conv_depth}")
        _check(self.batch_size_per_image >= 1, f"batch_size_per_image: must be >= 1, got {self.batch_size_per_image}")
        _check(
            0.0 <= self.positive_fraction <= 1.0, f"positive_fraction: must be in [0, 1], got {self.positive_fraction}"
        )
        for key in ("pre_nms_topk_train", "pre_nms_topk_test", "post_nms_topk_train", "post_nms_topk_test"):
            _check(getattr(self, key) >= 1, f"{key}: must be >= 1, got {getattr(self, key)}")
        _check(0.0 <= self.nms_thresh <= 1.0, f"nms_thresh: must be in [0, 1], got {self.nms_thresh}")
        _check(self.min_size >= 0, f"min_size: must be >= 0, got {self.min_size}")
        _check(self.smooth_l1_beta >= 0, f"smooth_l1_beta: must be >= 0 (0 = L1), got {self.smooth_l1_beta}")
        _check_box_weights(self.box_weights)


@dataclass
class SelectiveSearchConfig:
    """On-the-fly Selective Search (slow; precomputed files are the usual way, see
    ``detkit proposals``). min_size is in original-image pixels (authors' code: 20)."""

    mode: Literal["single", "fast", "quality"] = "fast"  # single, fast or quality (the paper's strategies, sec. 5.2)
    max_proposals: int = 2000  # proposals kept per image
    min_size: float = 20.0  # smaller proposals (px, original image) are dropped

    def __post_init__(self):
        _check(self.min_size >= 0, f"min_size: must be >= 0, got {self.min_size}")


@dataclass
class PrecomputedConfig:
    """Proposal files (.npz / .json / classic .mat) in original-image pixels: one path or a
    list (e.g. the train and the test split's files; their images are pooled). A missing file
    is one error line naming the ``detkit proposals`` command that makes it, with the
    settings of ``model.proposals.selective_search``; the split is read from a train / test
    word in the file name (else the list order: [train file, test file])."""

    path: Optional[Union[PathStr, List[PathStr]]] = None  # the proposal file(s)
    max_proposals: int = 2000  # proposals used per image (the file's first ones)


@dataclass
class ProposalConfig:
    # (the methods are detkit.modeling.build.PROPOSAL_GENERATORS'; a test keeps them equal)

    # where proposals come from: rpn, selective_search (on the fly) or precomputed (files)
    method: Literal["rpn", "selective_search", "precomputed"] = "rpn"
    rpn: RPNConfig = field(default_factory=RPNConfig)  # method rpn
    selective_search: SelectiveSearchConfig = field(default_factory=SelectiveSearchConfig)  # method selective_search
    precomputed: PrecomputedConfig = field(default_factory=PrecomputedConfig)  # method precomputed

    def __post_init__(self):
        if self.method == "precomputed" and not self.precomputed.path:
            raise ValueError("proposals.method precomputed needs proposals.precomputed.path")
        for name in ("selective_search", "precomputed"):
            if getattr(self, name).max_proposals < 1:
                raise ValueError(f"proposals.{name}.max_proposals must be >= 1")


@dataclass
class SVMHeadConfig:
    """The offline stages of the rcnn and spp heads after fine-tuning (``detkit.engine.
    svm_stages``): the training split's region features are extracted once into a cache in
    the run folder, then one linear SVM per class is fitted with hard-negative mining and a
    class-specific ridge box regressor on pool5 features. Defaults are R-CNN's (rcnn_train.m,
    rcnn_train_bbox_regressor.m, rcnn_test.m; sec. 2.3, appendices B and C); the configs cite
    paper and section for each value they set."""

    # svm: score with one linear SVM per class, fitted after fine-tuning (R-CNN sec. 2.3);
    # softmax: with the fine-tuned (K + 1)-way classifier itself (R-CNN appendix B's comparison)
    classifier: Literal["svm", "softmax"] = "svm"
    # the SVMs' features: fc7 (after the last fc layer and its ReLU) or pool5 (rcnn: the crop
    # network's pooled conv5; spp: the pyramid-pooled conv5 windows)
    features: Literal["fc7", "pool5"] = "fc7"
    box_regression: bool = True  # fit class-specific ridge box regression on pool5 (R-CNN appendix C)
    max_proposals: int = 2000  # proposals per training image in the feature cache (bounds its size on disk)
    fp16: bool = True  # store the cached features as float16 (half the disk; the fits run in float32)
    cache_dir: Optional[PathStr] = None  # the feature cache folder; null: <run folder>/feature_cache
    images_per_chunk: int = 50  # training images per cache file (a killed cache stage redoes at most one)
    C: float = 0.001  # SVM regularisation (liblinear -c; features scaled to mean norm 20 first)
    pos_weight: float = 2.0  # hinge-loss weight of the positives (liblinear -w1)
    bias_mult: float = 10.0  # the bias feature's value (liblinear -B)
    neg_iou: float = 0.3  # negatives: IoU below this with every instance of the class
    hard_thresh: float = -1.0001  # a negative scored above this is hard (it violates the margin)
    evict_thresh: float = -1.2  # cached negatives scored below this after a fit are evicted as easy
    retrain_limit: int = 2000  # refit a class once this many new hard negatives were added
    max_negatives: int = 20000  # per class, at most this many negatives cached (the hardest kept): bounds memory
    max_passes: int = 2  # hard-negative mining passes over the training images (stops early without new ones)
    box_lambda: float = 1000.0  # ridge regularisation of the box regressors
    box_min_overlap: float = 0.6  # regions with IoU above this with a ground-truth box train its class's regressor
    # test: per class and image keep the best this many regions before NMS (rcnn_test.m: 100); 0: all
    topk_per_class: int = 100

    def __post_init__(self):
        _check(self.max_proposals >= 1, f"max_proposals: must be >= 1, got {self.max_proposals}")
        _check(self.images_per_chunk >= 1, f"images_per_chunk: must be >= 1, got {self.images_per_chunk}")
        _check(self.C > 0 and self.pos_weight > 0 and self.bias_mult > 0, "C, pos_weight and bias_mult must be > 0")
        _check(0.0 < self.neg_iou <= 1.0, f"neg_iou: must be in (0, 1], got {self.neg_iou}")
        _check(
            self.evict_thresh <= self.hard_thresh,
            f"evict_thresh ({self.evict_thresh}) must not exceed hard_thresh ({self.hard_thresh})",
        )
        for key in ("retrain_limit", "max_negatives", "max_passes"):
            _check(getattr(self, key) >= 1, f"{key}: must be >= 1, got {getattr(self, key)}")
        _check(self.box_lambda >= 0, f"box_lambda: must be >= 0, got {self.box_lambda}")
        _check(0.0 <= self.box_min_overlap < 1.0, f"box_min_overlap: must be in [0, 1), got {self.box_min_overlap}")
        _check(self.topk_per_class >= 0, f"topk_per_class: must be >= 0 (0 = all), got {self.topk_per_class}")


@dataclass
class RoIHeadConfig:
    """Four heads (``name``). fast_rcnn: pooler, fully connected layers (fc_dims), classifier
    and box regressor (Fast R-CNN; on FPN as in the FPN paper; on the single C4 map it is the
    "C4 + 2fc" head). res5: the ResNet paper's C4 head (appendix A): pooler on C4 (14 x 14
    in Detectron / detectron2), the backbone network's own res5 stage run per region (its
    ImageNet weights when the backbone has them), average pooling, classifier and box
    regressor; it needs a ResNet or tiny backbone with fpn: false, and fc_dims / dropout do
    not apply to it.
    rcnn: R-CNN's head: each region warped to warp_size px (with warp_context px of context)
    and run through the network model.backbone names (its conv layers, conv5 max-pooled to
    pooler_resolution = "pool5", fc_dims = fc6 / fc7); the detector's backbone is then the
    image itself. spp: SPP-net's head: spatial pyramid pooling (spp_levels) of each window on
    the backbone's conv5 map, then fc_dims. Both are fine-tuned as (K + 1)-way softmax
    classifiers and then get the offline stages of ``svm`` (SVMs, box regression); both need
    fpn: false.
    """

    # (the names are detkit.modeling.build.ROI_HEADS'; a test keeps them equal)

    # the region head: fast_rcnn (pooler + fc layers), res5 (the ResNet paper's C4 head),
    # rcnn (warped crops through the whole network) or spp (spatial pyramid pooling)
    name: Literal["fast_rcnn", "res5", "rcnn", "spp"] = "fast_rcnn"
    # how a region becomes a fixed-size feature: roi_align or roi_pool
    pooler: Literal["roi_align", "roi_pool"] = "roi_align"
    pooler_resolution: int = 7  # pooled output size (7: 7x7; rcnn: conv5 max-pooled to this, 6 = AlexNet's pool5)
    warp_size: int = 227  # rcnn: regions are warped to this many px square (R-CNN sec. 2.1)
    warp_context: int = 16  # rcnn: px of context around each region at the warped scale (R-CNN appendix A)
    spp_levels: List[int] = field(default_factory=lambda: [6, 3, 2, 1])  # spp: pyramid levels n (n x n bins each)
    region_batch: int = 256  # rcnn / spp: regions run through the network at once at test time (bounds memory)
    svm: SVMHeadConfig = field(default_factory=SVMHeadConfig)  # rcnn / spp: the SVM and box-regression stages
    # roi_align: sampling points per bin and axis (0: adaptive); roi_pool samples every
    # pixel of its quantised bins, so it does not apply there
    sampling_ratio: int = 2
    # roi_align: half-pixel offset (detectron2's ROIAlignV2: true; torchvision's false); refused with roi_pool
    aligned: bool = False
    # RoIAlign on the CPU as a sparse matrix product (faster; equal up to float rounding);
    # false: torchvision's kernel, bit for bit (converted torchvision weights).
    cpu_sparse_roi_align: bool = True
    # widths of the fully connected layers of the box head
    fc_dims: List[int] = field(default_factory=lambda: [1024, 1024])
    dropout: float = 0.0  # dropout after each fully connected layer (0: none)
    batch_size_per_image: int = 512  # regions sampled per image for the head's loss
    positive_fraction: float = 0.25  # at most this fraction of them foreground
    fg_iou_thresh: float = 0.5  # a region with IoU >= this with a box is foreground (of that box's class)
    bg_iou_thresh_lo: float = 0.0  # background: IoU in [this, fg_iou_thresh); below this ignored (0: all background)
    # weights (wx, wy, ww, wh) of the box encoding
    box_weights: List[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    smooth_l1_beta: float = 1.0  # smooth-L1 beta of the head's box loss (0: plain L1)
    class_agnostic: bool = False  # one box regression for all classes instead of one per class
    # the classifier / regressor's initial weights: gaussian (Fast R-CNN sec. 2.2: N(0, 0.01) /
    # N(0, 0.001), zero biases) or pytorch (nn.Linear's uniform default, as torchvision keeps)
    predictor_init: Literal["gaussian", "pytorch"] = "gaussian"
    add_gt_as_proposals: bool = True  # add the ground-truth boxes to the training regions
    # detections scoring lower are dropped (evaluation; the demo has its own); with SVMs the
    # scores are raw SVM margins (R-CNN's test sets no threshold: -.inf)
    score_thresh: float = 0.05
    nms_thresh: float = 0.5  # per-class NMS IoU threshold of the detections
    detections_per_img: int = 100  # at most this many detections per image
    min_box_size: float = 0.01  # detections narrower or lower than this (px) are dropped
    # Truncated SVD of the box head's fully connected layers, layer name -> rank (Fast R-CNN
    # sec. 3.1; fc6 / fc7 here): each becomes two layers with t (u + v) weights instead of
    # u v. Written by `detkit compress` into the compressed checkpoint's config, so that it
    # loads with no extra flag; set by hand, the factors start from the layer's initial
    # (or VGG-16 ImageNet) weights.
    svd: Dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        _check(
            not (self.pooler == "roi_pool" and self.aligned),
            "aligned: true is RoIAlign's half-pixel offset and does not apply to pooler roi_pool "
            "(it quantises boxes): set aligned: false or pooler: roi_align",
        )
        _check(self.pooler_resolution >= 1, f"pooler_resolution: must be >= 1, got {self.pooler_resolution}")
        _check(
            self.warp_size >= 1 and 0 <= 2 * self.warp_context < self.warp_size,
            f"warp_size / warp_context: need 0 <= 2 * context < size, got {self.warp_size} / {self.warp_context}",
        )
        _check(
            len(self.spp_levels) > 0 and all(n >= 1 for n in self.spp_levels),
            f"spp_levels: positive bin counts, got {self.spp_levels}",
        )
        _check(self.region_batch >= 1, f"region_batch: must be >= 1, got {self.region_batch}")
        _check(self.sampling_ratio >= 0, f"sampling_ratio: must be >= 0 (0 = adaptive), got {self.sampling_ratio}")
        _check(all(d >= 1 for d in self.fc_dims), f"fc_dims: positive widths, got {self.fc_dims}")
        _check(0.0 <= self.dropout < 1.0, f"dropout: must be in [0, 1), got {self.dropout}")
        _check(self.batch_size_per_image >= 1, f"batch_size_per_image: must be >= 1, got {self.batch_size_per_image}")
        _check(
            0.0 <= self.positive_fraction <= 1.0, f"positive_fraction: must be in [0, 1], got {self.positive_fraction}"
        )
        _check(
            0.0 <= self.bg_iou_thresh_lo < self.fg_iou_thresh <= 1.0,
            f"bg_iou_thresh_lo ({self.bg_iou_thresh_lo}) must be below fg_iou_thresh ({self.fg_iou_thresh}), "
            "both in [0, 1]",
        )
        _check_box_weights(self.box_weights)
        _check(self.smooth_l1_beta >= 0, f"smooth_l1_beta: must be >= 0 (0 = L1), got {self.smooth_l1_beta}")
        _check(0.0 <= self.nms_thresh <= 1.0, f"nms_thresh: must be in [0, 1], got {self.nms_thresh}")
        _check(self.detections_per_img >= 1, f"detections_per_img: must be >= 1, got {self.detections_per_img}")
        _check(self.min_box_size >= 0, f"min_box_size: must be >= 0, got {self.min_box_size}")
        _check(all(r >= 1 for r in self.svd.values()), f"svd: ranks must be >= 1, got {self.svd}")


@dataclass
class ModelConfig:
    """Values that can only be judged with the backbone in mind (anchor levels against its
    feature maps, frozen stages against its stages, a res5 head on FPN) are checked when the
    model is built, before any weights are loaded (``modeling.build.check_model_config``)."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # the feature extractor
    anchors: AnchorConfig = field(default_factory=AnchorConfig)  # RPN anchors
    proposals: ProposalConfig = field(default_factory=ProposalConfig)  # the proposal generator
    roi_head: RoIHeadConfig = field(default_factory=RoIHeadConfig)  # the region head (classifier and box regressor)
    # Multiplies each named loss term (loss_rpn_cls, loss_rpn_box, loss_cls, loss_box).
    loss_weights: Dict[str, float] = field(default_factory=dict)
    train_difficult: bool = False  # train on difficult / crowd boxes too (metrics ignore them either way)
    # Inference on channels-last images: ~25 % faster convolutions on the CPU (oneDNN); equal
    # results up to float rounding. false: torchvision's layout, bit for bit. (Training:
    # train.channels_last.)
    channels_last_inference: bool = True
    # BatchNorm with fixed statistics is folded into the convolution before it
    # (``modeling.fold``): at inference every BN in eval mode, in training frozen BN
    # (frozen_bn, frozen stages). One pass less over every normalised activation; equal
    # results up to float rounding. false: conv and BN run apart (torchvision, bit for bit).
    fold_batchnorm: bool = True

    def __post_init__(self):
        import difflib

        for name in self.loss_weights:
            if name not in LOSS_NAMES:
                close = difflib.get_close_matches(name, LOSS_NAMES, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"losses: {', '.join(LOSS_NAMES)}"
                raise ValueError(f"loss_weights: unknown loss '{name}' ({hint})")


@dataclass
class TrainConfig:
    max_iter: int = 1000  # training iterations
    base_lr: float = 0.02  # SGD learning rate after warmup, for the global batch (data.batch_size x processes)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # L2 weight decay (not on biases and normalisation parameters)
    warmup_iters: int = 100  # linear warmup iterations
    warmup_factor: float = 0.001  # the learning rate starts at base_lr times this
    # step (times gamma at each of steps) or cosine (half cosine to 0 at max_iter)
    lr_schedule: Literal["step", "cosine"] = "step"
    steps: List[int] = field(default_factory=list)  # iterations where lr *= gamma (step)
    gamma: float = 0.1  # step schedule: the factor at each step
    clip_grad_norm: Optional[float] = None  # clip the gradient norm to this (null: no clipping)
    checkpoint_period: int = 0  # 0: only at the end
    eval_period: int = 0  # 0: only at the end
    log_period: int = 20  # iterations between records in metrics.jsonl
    seed: int = 0  # seed of every random number (runs are deterministic on a given machine)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto (CUDA when available), cpu or cuda
    amp: bool = True  # mixed precision, used on CUDA (on the CPU only with amp_dtype bf16)
    # auto: bfloat16 where the GPU supports it, else float16 with a gradient scaler; bf16 / fp16
    # force one (bf16 also enables bfloat16 autocast on the CPU)
    amp_dtype: Literal["auto", "bf16", "fp16"] = "auto"
    # channels-last images and weights in training: tensor-core convolutions on CUDA, oneDNN's
    # on the CPU (where strided 1x1 convolutions stay NCHW: detkit.modeling.layout says why)
    channels_last: bool = True
    num_threads: int = 0  # CPU threads for torch; 0 = torch's default
    # Treat subnormal floats (< 1.2e-38) as zero on the CPU, in training and evaluation: many
    # x86 CPUs compute with them far slower (a CPU run slowed 2.4x after ~20 iterations).
    flush_denormal: bool = True
    # Distributed runs (torchrun): the torch.distributed backend (auto: nccl on CUDA, gloo on the CPU)
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    # minutes a collective may wait for the other processes before the run stops with an error
    dist_timeout_min: float = 30.0
    # DDP: find parameters that got no gradient in an iteration (slower; only for models that
    # leave parts unused, e.g. a branch some batches skip)
    find_unused_parameters: bool = False
    # Also write metrics.jsonl's scalars and test images with detections to <run>/tensorboard
    # (needs the tensorboard package: pip install 'detkit[tensorboard]').
    tensorboard: bool = False

    def __post_init__(self):
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        # Steps past max_iter are allowed (the trainer warns and ignores them, as detectron2
        # does) so that `train.max_iter=N` alone shortens a recipe.
        if any(s <= 0 for s in self.steps):
            raise ValueError(f"steps must be positive iterations, got {self.steps}")
        if self.dist_timeout_min <= 0:
            raise ValueError(f"dist_timeout_min must be > 0, got {self.dist_timeout_min}")


@dataclass
class TestConfig:
    # voc07 (11-point AP), voc (area AP, VOC2010+) or coco (AP@[.5:.95], pycocotools)
    metric: Literal["voc07", "voc", "coco"] = "voc"
    # Also computed and stored in eval.json (the main metric decides "mAP").
    extra_metrics: List[Literal["voc07", "voc", "coco"]] = field(default_factory=list)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)  # datasets and input pipeline
    model: ModelConfig = field(default_factory=ModelConfig)  # the detector
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation and schedule
    test: TestConfig = field(default_factory=TestConfig)  # evaluation


def load_run_config(path, overrides=()) -> Config:
    """A run config file (with ``_base_`` inheritance and ``a.b.c=value`` overrides),
    validated against ``Config``."""
    import os

    from detkit.config import load_config
    from detkit.errors import ConfigError

    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    return load_config(path, Config, list(overrides))
