"""The typed schema of detkit's YAML configs (validated by ``detkit.config``).

Every key a config may hold is a field below, with its default. Paper values are set in
the configs under ``configs/`` with a comment naming paper and section; defaults here follow
torchvision's Faster R-CNN where a choice had to be made.

Top level:  data (datasets, input sizes, batching) / model (backbone, proposals, RoI head) /
            train (optimiser and schedule) / test (evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Union

from detkit.config import PathStr

# The loss terms the detector's parts return (keys of model.loss_weights).
LOSS_NAMES = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box")


def _rel(**kw):
    """A path field resolved relative to the sibling ``root`` when that is set."""
    return field(default=None, metadata={"path": True, "relative_to": "root"}, **kw)


@dataclass
class ShapesConfig:
    """Parameters of ``detkit.data.shapes.generate_shapes`` for ``format: shapes``."""

    num_train: int = 300
    num_test: int = 100
    seed: int = 0
    image_size: List[int] = field(default_factory=lambda: [128, 192])
    object_size: List[int] = field(default_factory=lambda: [16, 64])
    objects_per_image: List[int] = field(default_factory=lambda: [1, 6])


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
_SYNCBN = "syncbn needs distributed training (torchrun), not available yet"


@dataclass
class BackboneConfig:
    """The names are ``detkit.modeling.build.BACKBONES``' (a test keeps them equal).

    fpn: true: FPN P2..P6 over c2..c5 (FPN paper); false: the single stride-16 map c4
    (ResNet conv4_x / VGG conv5_3). norm: bn | frozen_bn | gn (ResNet, tiny), none | bn
    (VGG-16). frozen_stages: 0 trains everything; ResNet / tiny: k freezes the stem and the
    first k - 1 stages (at most 4 for C4, 5 with FPN); VGG-16: conv blocks 1..k (0..5).
    """

    name: Literal["tiny", "resnet18", "resnet34", "resnet50", "resnet101", "vgg16"] = "resnet50"
    fpn: bool = True
    out_channels: int = 256  # FPN channels
    # syncbn is refused (one line) until detkit trains on several processes.
    norm: Literal["bn", "frozen_bn", "gn", "syncbn", "none"] = "bn"
    fpn_norm: Optional[Literal["bn", "gn", "syncbn", "none"]] = None
    frozen_stages: int = 0
    # A local state-dict file or a torchvision weight name (e.g. ResNet50_Weights.IMAGENET1K_V1).
    pretrained: Optional[str] = None
    tiny_widths: List[int] = field(default_factory=lambda: [16, 32, 64, 128])
    tiny_blocks: int = 1

    def __post_init__(self):
        _check(self.norm != "syncbn", f"norm: {_SYNCBN}")
        _check(self.fpn_norm != "syncbn", f"fpn_norm: {_SYNCBN}")
        if self.name in _RESIDUAL_BACKBONES:
            _check(self.norm != "none", f"norm: none: {self.name} needs a normalisation layer (bn, frozen_bn or gn)")
        else:
            _check(self.norm in ("none", "bn"), f"norm: {self.norm} is not available for {self.name} (none or bn)")
        _check(self.out_channels >= 1, f"out_channels: must be >= 1, got {self.out_channels}")
        _check(self.frozen_stages >= 0, f"frozen_stages: must be >= 0, got {self.frozen_stages}")
        _check(
            len(self.tiny_widths) == 4 and all(w >= 1 for w in self.tiny_widths),
            f"tiny_widths: 4 positive channel counts (c2..c5), got {self.tiny_widths}",
        )
        _check(self.tiny_blocks >= 1, f"tiny_blocks: must be >= 1, got {self.tiny_blocks}")
        _check(
            not (self.name == "tiny" and self.pretrained),
            "pretrained: the tiny backbone has no pretrained weights (set it to null)",
        )


@dataclass
class AnchorConfig:
    """sizes / aspect_ratios: one list per feature map the RPN looks at (or one list for all
    of them); every level must have the same number of anchors (sizes x ratios)."""

    sizes: List[List[float]] = field(default_factory=lambda: [[32], [64], [128], [256], [512]])
    aspect_ratios: List[List[float]] = field(default_factory=lambda: [[0.5, 1.0, 2.0]])
    offset: float = 0.0  # anchor centres at (x + offset) * stride; a fraction of the stride
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
    conv_depth: int = 1
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    pre_nms_topk_train: int = 2000  # per level
    pre_nms_topk_test: int = 1000
    post_nms_topk_train: int = 2000  # per image
    post_nms_topk_test: int = 1000
    nms_thresh: float = 0.7
    min_size: float = 1e-3
    score_thresh: float = 0.0
    smooth_l1_beta: float = 0.1111111111111111  # 0: L1
    box_weights: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
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

    mode: Literal["single", "fast", "quality"] = "fast"
    max_proposals: int = 2000
    min_size: float = 20.0

    def __post_init__(self):
        _check(self.min_size >= 0, f"min_size: must be >= 0, got {self.min_size}")


@dataclass
class PrecomputedConfig:
    """Proposal files (.npz / .json / classic .mat) in original-image pixels: one path or a
    list (e.g. the train and the test split's files; their images are pooled)."""

    path: Optional[Union[PathStr, List[PathStr]]] = None
    max_proposals: int = 2000


@dataclass
class ProposalConfig:
    """method: ``detkit.modeling.build.PROPOSAL_GENERATORS``' names (a test keeps them equal)."""

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
    """name: ``detkit.modeling.build.ROI_HEADS``' names (a test keeps them equal):

    fast_rcnn: pooler -> fc layers (fc_dims) -> classifier + box regressor (Fast R-CNN; on
               FPN as in the FPN paper; on a single C4 map the "C4 + 2fc" head).
    res5:      the ResNet paper's C4 head (appendix A): pooler (14 x 14 in Detectron) on C4
               -> the backbone network's own res5 stage per region -> average pooling ->
               classifier + box regressor. Needs a ResNet / tiny backbone with fpn: false;
               fc_dims and dropout do not apply.
    """

    name: Literal["fast_rcnn", "res5"] = "fast_rcnn"
    pooler: Literal["roi_align", "roi_pool"] = "roi_align"
    pooler_resolution: int = 7
    # RoIAlign only: sampling points per bin (0 = adaptive) and the half-pixel offset
    # (aligned: true = detectron2's ROIAlignV2). roi_pool samples every pixel of its quantised
    # bins: sampling_ratio does not apply and aligned: true is refused.
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
    bg_iou_thresh_lo: float = 0.0  # background IoU in [bg_iou_thresh_lo, fg_iou_thresh)
    box_weights: List[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    smooth_l1_beta: float = 1.0  # 0: L1
    class_agnostic: bool = False
    add_gt_as_proposals: bool = True
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    min_box_size: float = 0.01

    def __post_init__(self):
        _check(
            not (self.pooler == "roi_pool" and self.aligned),
            "aligned: true is RoIAlign's half-pixel offset and does not apply to pooler roi_pool "
            "(it quantises boxes): set aligned: false or pooler: roi_align",
        )
        _check(self.pooler_resolution >= 1, f"pooler_resolution: must be >= 1, got {self.pooler_resolution}")
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


@dataclass
class ModelConfig:
    """Values that need the backbone to be judged (anchor levels vs feature maps, frozen
    stages, a Res5 head on FPN) are checked by ``detkit.modeling.build.check_model_config``."""

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
