"""Config -> datasets and their transforms, with one explicit name -> loader table
(``DATASET_FORMATS``, the single source of the ``format`` names; the schema's Literal is
tested against it).

Nothing here is filled by import side effects; every dataset can also be built by hand
(``detkit.data.voc.load_voc``, ``detkit.data.coco.load_coco``), the config is only a
convenience.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence, Tuple

from detkit.data.dataset import DetectionDataset
from detkit.data.transforms import build_transforms
from detkit.errors import ConfigError, DatasetError
from detkit.schema import Config, DatasetConfig, InputConfig

logger = logging.getLogger("detkit")


# -- datasets ------------------------------------------------------------------------------
def _load_voc(cfg: DatasetConfig, classes, name):
    from detkit.data.voc import load_voc

    return load_voc(
        cfg.root,
        cfg.split,
        ann_dir=cfg.ann_dir,
        img_dir=cfg.img_dir,
        split_file=cfg.split_file,
        holdout=cfg.holdout,
        seed=cfg.seed,
        classes=classes,
        filter_empty=cfg.filter_empty,
        name=name,
    )


def _load_coco(cfg: DatasetConfig, classes, name):
    from detkit.data.coco import load_coco

    if cfg.ann_file is None:  # DatasetConfig checks this; a hand-made one may not
        raise DatasetError("format coco needs ann_file")
    img_dir = cfg.img_dir or (cfg.root if cfg.root else str(Path(cfg.ann_file).parent))
    return load_coco(cfg.ann_file, img_dir, classes=classes, filter_empty=cfg.filter_empty, name=name)


def _load_shapes(cfg: DatasetConfig, classes, name):
    from detkit.data.shapes import generate_shapes

    if cfg.root is None:
        raise DatasetError("format shapes needs root (the folder to generate the dataset in)")
    try:
        generate_shapes(cfg.root, cfg.shapes)
    except (FileExistsError, ValueError) as exc:
        raise DatasetError(str(exc)) from None
    return _load_voc(cfg, classes or list(cfg.shapes.classes), name)


DATASET_FORMATS = {"voc": _load_voc, "coco": _load_coco, "shapes": _load_shapes}


def build_dataset(
    cfg: DatasetConfig, classes: Optional[Sequence[str]] = None, transforms=None, name: Optional[str] = None
) -> DetectionDataset:
    """Loads the split ``cfg`` describes; ``classes`` (label order) overrides cfg.classes."""
    if cfg is None:
        raise DatasetError("no dataset configured")
    dataset = DATASET_FORMATS[cfg.format](cfg, list(classes) if classes else cfg.classes, name)
    dataset.transforms = transforms
    return dataset


def _color_jitter(values: Optional[Sequence[float]]) -> Optional[Tuple[float, float, float, float]]:
    """data.input.color_jitter as (brightness, contrast, saturation, hue); missing trailing
    values are 0 (no jitter), as torchvision's ColorJitter defaults them."""
    if not values:
        return None
    if len(values) > 4:
        raise ConfigError(
            f"data.input.color_jitter takes up to 4 numbers (brightness, contrast, saturation, hue), got {values}"
        )
    b, c, s, h = (list(values) + [0.0, 0.0, 0.0])[:4]
    return float(b), float(c), float(s), float(h)


def dataset_transforms(cfg: InputConfig, train: bool):
    # Multi-scale testing: the input is the pyramid's largest scale (modeling.pyramid).
    min_size_test = max(cfg.test_scales) if cfg.test_scales else cfg.min_size_test
    return build_transforms(
        train,
        min_size_train=cfg.min_size_train,
        max_size=cfg.max_size,
        min_size_test=min_size_test,
        flip_prob=cfg.flip_prob,
        vflip_prob=cfg.vflip_prob,
        color_jitter=_color_jitter(cfg.color_jitter),
        mean=cfg.pixel_mean,
        std=cfg.pixel_std,
    )


def build_datasets(cfg: Config, need_train: bool = True, need_test: bool = True):
    """(train dataset or None, test dataset or None, class names). The test split uses the
    train split's class list so labels agree."""
    classes = cfg.data.classes
    train = test = None
    if need_train:
        if cfg.data.train is None:
            raise DatasetError("the config has no data.train dataset")
        train = build_dataset(cfg.data.train, classes, dataset_transforms(cfg.data.input, True), name="train")
        classes = train.class_names
    if need_test:
        if cfg.data.test is None:
            raise DatasetError("the config has no data.test dataset")
        test = build_dataset(cfg.data.test, classes, dataset_transforms(cfg.data.input, False), name="test")
        classes = test.class_names
    return train, test, list(classes) if classes else None
