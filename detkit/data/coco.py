"""COCO-json datasets (boxes only), read with pycocotools.

COCO boxes are continuous [x, y, w, h] in pixels, so detkit's xyxy is (x, y, x + w, y + h)
and ``native_offset`` is 0. ``iscrowd`` regions become ``difficult`` (neither training
positives nor counted by the metrics). Category ids may be any integers: labels 1..K follow
the categories sorted by id, and ``label_to_cat_id`` maps back for detection files.
Annotations may leave out ``id``, ``area`` and ``iscrowd`` (as many exported files do): they
are filled in memory (fresh ids, the box's area, 0) so that COCOeval can read them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from detkit.data.dataset import DetectionDataset, sanitize_boxes
from detkit.data.io import ProblemLog, is_within, usable_image
from detkit.errors import DatasetError
from detkit.structures import ImageRecord

logger = logging.getLogger("detkit")


def _load_json(ann_file: Path) -> dict:
    if not ann_file.is_file():
        raise DatasetError(f"COCO annotation file not found: {ann_file}")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{ann_file}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{ann_file}: cannot read ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file}: not a COCO json (top level must be an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{ann_file}: not a COCO json (missing or non-list '{key}')")
    image_ids, cat_ids, ann_ids = set(), set(), set()
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise DatasetError(f"{ann_file}: images[{i}] needs 'id' and 'file_name'")
        if not _is_id(im["id"]):
            raise DatasetError(f"{ann_file}: images[{i}].id must be an integer or a string, got {_short(im['id'])}")
        if im["id"] in image_ids:
            raise DatasetError(f"{ann_file}: images[{i}].id {im['id']!r} is used twice")
        image_ids.add(im["id"])
        for key in ("width", "height"):
            if im.get(key) is not None and not (_is_number(im[key]) and math.isfinite(im[key])):
                raise DatasetError(f"{ann_file}: images[{i}].{key} must be a number, got {_short(im[key])}")
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise DatasetError(f"{ann_file}: categories[{i}] needs 'id' and 'name'")
        if not isinstance(cat["name"], str) or not cat["name"]:
            raise DatasetError(
                f"{ann_file}: categories[{i}].name must be a non-empty string, got {_short(cat['name'])}"
            )
        if not _is_int(cat["id"]):
            raise DatasetError(f"{ann_file}: categories[{i}].id must be an integer, got {_short(cat['id'])}")
        cat["id"] = int(cat["id"])
        if cat["id"] in cat_ids:
            raise DatasetError(f"{ann_file}: categories[{i}].id {cat['id']!r} is used twice")
        cat_ids.add(cat["id"])
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not {"image_id", "category_id", "bbox"} <= set(ann):
            raise DatasetError(f"{ann_file}: annotations[{i}] needs 'image_id', 'category_id' and 'bbox'")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise DatasetError(f"{ann_file}: annotations[{i}].bbox must be 4 numbers [x, y, w, h], got {_short(bbox)}")
        if not _is_id(ann["image_id"]):
            raise DatasetError(
                f"{ann_file}: annotations[{i}].image_id must be an integer or a string, got {_short(ann['image_id'])}"
            )
        if not _is_int(ann["category_id"]):
            raise DatasetError(
                f"{ann_file}: annotations[{i}].category_id must be an integer, got {_short(ann['category_id'])}"
            )
        ann["category_id"] = int(ann["category_id"])
        if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):  # True/False compare equal too
            raise DatasetError(f"{ann_file}: annotations[{i}].iscrowd must be 0 or 1, got {_short(ann['iscrowd'])}")
        if "id" in ann:
            if not _is_id(ann["id"]):
                raise DatasetError(
                    f"{ann_file}: annotations[{i}].id must be an integer or a string, got {_short(ann['id'])}"
                )
            if ann["id"] in ann_ids:
                # pycocotools indexes annotations by id: a repeat would silently hide one.
                raise DatasetError(f"{ann_file}: annotations[{i}].id {ann['id']!r} is used twice")
            ann_ids.add(ann["id"])
    # Fields many hand-made or exported files leave out, which pycocotools' evaluation needs:
    # iscrowd (0), area (the box's: the segment area is unknown) and a unique annotation id.
    next_id = max([a for a in ann_ids if _is_int(a)], default=0) + 1
    for ann in data["annotations"]:
        ann.setdefault("iscrowd", 0)
        if not _is_number(ann.get("area")):
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
        if "id" not in ann:
            ann["id"] = next_id
            next_id += 1
    return data


def _short(value, limit: int = 60) -> str:
    """repr of a (possibly long) json value, cut to fit in a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_number(v) -> bool:
    # json gives bool for true/false, which Python would otherwise accept as 1/0.
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    """An int, or a float with an integral value (3.0, as some exporters write ids)."""
    return _is_number(v) and (isinstance(v, int) or v.is_integer())


def _is_id(v) -> bool:
    return _is_int(v) or isinstance(v, str)


def load_coco(
    ann_file,
    img_dir,
    *,
    classes: Optional[Sequence[str]] = None,
    filter_empty: bool = False,
    name: Optional[str] = None,
) -> DetectionDataset:
    """Loads a COCO-json detection dataset.

    classes: keep only these category names, in this label order (others are dropped and
        counted); None keeps all categories, ordered by category id.
    """
    from pycocotools.coco import COCO

    ann_file, img_dir = Path(ann_file), Path(img_dir)
    data = _load_json(ann_file)
    if not img_dir.is_dir():
        raise DatasetError(f"image folder does not exist: {img_dir}")
    label_name = name or ann_file.stem
    problems = ProblemLog(label_name)

    cats = sorted(data["categories"], key=lambda c: c["id"])
    name_to_id = {}
    for cat in cats:
        if cat["name"] in name_to_id:
            raise DatasetError(f"{ann_file}: category name '{cat['name']}' is used twice")
        name_to_id[cat["name"]] = cat["id"]
    if classes is None:
        classes = [c["name"] for c in cats]
    missing = [c for c in classes if c not in name_to_id]
    if missing:
        raise DatasetError(f"{ann_file}: classes not among its categories: {', '.join(missing)}")
    label_to_cat = {i + 1: name_to_id[c] for i, c in enumerate(classes)}
    cat_to_label = {c: k for k, c in label_to_cat.items()}

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()

    known_cat_ids = {c["id"] for c in cats}
    by_image: Dict[Any, List[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    records: List[ImageRecord] = []
    for im in data["images"]:
        file_name = str(im["file_name"])
        path = img_dir / file_name
        if Path(file_name).is_absolute() or not is_within(path, img_dir):
            problems.add("skipped images whose path escapes the image folder", file_name)
            continue
        if not path.is_file():
            problems.add("skipped images that are missing", file_name)
            continue
        # The one image check of the load (header + end-of-data marker, see
        # detkit.data.io.probe_image): an unusable image is skipped here, not mid-training.
        probe = usable_image(path, problems)
        if probe is None:
            continue
        width, height = int(im.get("width") or 0), int(im.get("height") or 0)
        if width <= 0 or height <= 0:
            width, height = probe.size
        box_list: List[List[float]] = []
        labels: List[int] = []
        crowd: List[bool] = []
        for ann in by_image.get(im["id"], []):
            label = cat_to_label.get(ann["category_id"])
            if label is None:
                if ann["category_id"] not in known_cat_ids:
                    problems.add("dropped annotations with an unknown category_id", file_name)
                else:
                    problems.add("dropped annotations of classes not in the class list", file_name)
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            box_list.append([x, y, x + w, y + h])
            labels.append(label)
            crowd.append(bool(ann.get("iscrowd", 0)))
        boxes = np.asarray(box_list, np.float32).reshape(-1, 4)
        keep = sanitize_boxes(boxes, width, height, file_name, problems)
        # Crowd regions are no training positives: an image with only those is empty too.
        if filter_empty and not (keep & ~np.asarray(crowd, bool).reshape(-1)).any():
            problems.add("skipped images without objects", file_name)
            continue
        records.append(
            ImageRecord(
                image_id=im["id"],
                file_name=str(path),
                width=width,
                height=height,
                boxes=boxes[keep],
                labels=np.asarray(labels, np.int64)[keep],
                difficult=np.asarray(crowd, bool)[keep],
            )
        )
    unknown_images = set(by_image) - {im["id"] for im in data["images"]}
    if unknown_images:
        count = sum(len(by_image[i]) for i in unknown_images)
        problems.add("dropped annotations whose image_id is not in images", str(ann_file), count)
    if not records:
        detail = "; ".join(problems.lines(1)) or "no images"
        raise DatasetError(f"{ann_file}: no usable images ({detail})")
    problems.warn()
    return DetectionDataset(
        records,
        classes,
        native_offset=0.0,
        coco=coco,
        label_to_cat_id=label_to_cat,
        name=label_name,
        problems=problems,
    )
