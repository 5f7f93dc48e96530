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
    # Treat subnormal floats (< 1.2e-38) as zero on the CPU, in training and evaluation: x86
    # CPUs compute with them many times slower (a CPU run slowed 2.4x after ~20 iterations).
    flush_denormal: bool = True
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
