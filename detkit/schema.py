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

    format: Literal["voc", "coco", "shapes"] = "voc"
    root: Optional[PathStr] = None
    split: Optional[str] = None
    ann_dir: Optional[str] = _rel()
    img_dir: Optional[str] = _rel()
    split_file: Optional[str] = _rel()
    ann_file: Optional[str] = _rel()
    holdout: float = 0.0
    seed: int = 0
    classes: Optional[List[str]] = None
    filter_empty: bool = False
    shapes: ShapesConfig = field(default_factory=ShapesConfig)

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

    min_size_train: List[int] = field(default_factory=lambda: [800])
    max_size: int = 1333
    min_size_test: int = 800
    flip_prob: float = 0.5
    color_jitter: Optional[List[float]] = None  # brightness, contrast, saturation, hue
    pixel_mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    pixel_std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class DataConfig:
    train: Optional[DatasetConfig] = None
    test: Optional[DatasetConfig] = None
    # Class names in label order for both splits; None: from train (inferred when not set there).
    classes: Optional[List[str]] = None
    input: InputConfig = field(default_factory=InputConfig)
    batch_size: int = 2
    test_batch_size: int = 1
    num_workers: int = 0
    aspect_ratio_grouping: bool = True

    def __post_init__(self):
        if self.batch_size < 1 or self.test_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_size} / {self.test_batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclass
class BackboneConfig:
    name: Literal["tiny", "resnet18", "resnet34", "resnet50", "resnet101", "vgg16"] = "resnet50"
    fpn: bool = True
    out_channels: int = 256  # FPN channels
    norm: Literal["bn", "frozen_bn", "gn", "syncbn", "none"] = "bn"
    fpn_norm: Optional[Literal["bn", "gn", "syncbn", "none"]] = None
    frozen_stages: int = 0
    # A local state-dict file or a torchvision weight name (e.g. ResNet50_Weights.IMAGENET1K_V1).
    pretrained: Optional[str] = None
    tiny_widths: List[int] = field(default_factory=lambda: [16, 32, 64, 128])
    tiny_blocks: int = 1


@dataclass
class AnchorConfig:
    sizes: List[List[float]] = field(default_factory=lambda: [[32], [64], [128], [256], [512]])
    aspect_ratios: List[List[float]] = field(default_factory=lambda: [[0.5, 1.0, 2.0]])
    offset: float = 0.0
    strides_from_input: bool = False


@dataclass
class RPNConfig:
    conv_depth: int = 1
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    pre_nms_topk_train: int = 2000
    pre_nms_topk_test: int = 1000
    post_nms_topk_train: int = 2000
    post_nms_topk_test: int = 1000
    nms_thresh: float = 0.7
    min_size: float = 1e-3
    score_thresh: float = 0.0
    smooth_l1_beta: float = 0.1111111111111111
    box_weights: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    allowed_border: float = -1.0


@dataclass
class SelectiveSearchConfig:
    """On-the-fly Selective Search (slow; precomputed files are the usual way, see
    ``detkit proposals``). min_size is in original-image pixels (authors' code: 20)."""

    mode: Literal["single", "fast", "quality"] = "fast"
    max_proposals: int = 2000
    min_size: float = 20.0


@dataclass
class PrecomputedConfig:
    """Proposal files (.npz / .json / classic .mat) in original-image pixels: one path or a
    list (e.g. the train and the test split's files; their images are pooled)."""

    path: Optional[Union[PathStr, List[PathStr]]] = None
    max_proposals: int = 2000


@dataclass
class ProposalConfig:
    method: Literal["rpn", "selective_search", "precomputed"] = "rpn"
    rpn: RPNConfig = field(default_factory=RPNConfig)
    selective_search: SelectiveSearchConfig = field(default_factory=SelectiveSearchConfig)
    precomputed: PrecomputedConfig = field(default_factory=PrecomputedConfig)

    def __post_init__(self):
        if self.method == "precomputed" and not self.precomputed.path:
            raise ValueError("proposals.method precomputed needs proposals.precomputed.path")
        for name in ("selective_search", "precomputed"):
            if getattr(self, name).max_proposals < 1:
                raise ValueError(f"proposals.{name}.max_proposals must be >= 1")


@dataclass
class RoIHeadConfig:
    pooler: Literal["roi_align", "roi_pool"] = "roi_align"
    pooler_resolution: int = 7
    sampling_ratio: int = 2
    aligned: bool = False
    # RoIAlign on the CPU as a sparse matrix product (faster; equal up to float rounding);
    # false: torchvision's kernel, bit for bit (converted torchvision weights).
    cpu_sparse_roi_align: bool = True
    fc_dims: List[int] = field(default_factory=lambda: [1024, 1024])
    dropout: float = 0.0
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    fg_iou_thresh: float = 0.5
    bg_iou_thresh_lo: float = 0.0
    box_weights: List[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    smooth_l1_beta: float = 1.0
    class_agnostic: bool = False
    add_gt_as_proposals: bool = True
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    min_box_size: float = 0.01


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    roi_head: RoIHeadConfig = field(default_factory=RoIHeadConfig)
    # Multiplies each named loss term (loss_rpn_cls, loss_rpn_box, loss_cls, loss_box).
    loss_weights: Dict[str, float] = field(default_factory=dict)
    train_difficult: bool = False
    # Inference on channels-last images: ~25 % faster convolutions on the CPU (oneDNN); equal
    # results up to float rounding. false: torchvision's layout, bit for bit. (Not used in
    # training: torch 2.14's CPU backward of some strided 1x1 convolutions crashes with it.)
    channels_last_inference: bool = True

    def __post_init__(self):
        import difflib

        for name in self.loss_weights:
            if name not in LOSS_NAMES:
                close = difflib.get_close_matches(name, LOSS_NAMES, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"losses: {', '.join(LOSS_NAMES)}"
                raise ValueError(f"loss_weights: unknown loss '{name}' ({hint})")


@dataclass
class TrainConfig:
    max_iter: int = 1000
    base_lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    lr_schedule: Literal["step", "cosine"] = "step"
    steps: List[int] = field(default_factory=list)  # iterations where lr *= gamma (step)
    gamma: float = 0.1
    clip_grad_norm: Optional[float] = None
    checkpoint_period: int = 0  # 0: only at the end
    eval_period: int = 0  # 0: only at the end
    log_period: int = 20
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # mixed precision, used on CUDA only
    num_threads: int = 0  # CPU threads for torch; 0 = torch's default

    def __post_init__(self):
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        # Steps past max_iter are allowed (the trainer warns and ignores them, as detectron2
        # does) so that `train.max_iter=N` alone shortens a recipe.
        if any(s <= 0 for s in self.steps):
            raise ValueError(f"steps must be positive iterations, got {self.steps}")


@dataclass
class TestConfig:
    metric: Literal["voc07", "voc", "coco"] = "voc"
    # Also computed and stored in eval.json (the main metric decides "mAP").
    extra_metrics: List[Literal["voc07", "voc", "coco"]] = field(default_factory=list)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)


def load_run_config(path, overrides=()) -> Config:
    """A run config file (with ``_base_`` inheritance and ``a.b.c=value`` overrides),
    validated against ``Config``."""
    import os

    from detkit.config import load_config
    from detkit.errors import ConfigError

    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    return load_config(path, Config, list(overrides))
