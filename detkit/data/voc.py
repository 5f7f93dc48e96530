"""Pascal VOC XML datasets, in the devkit layout or as plain folders.

Layouts (``root`` is the dataset folder):

    devkit:  root/Annotations/*.xml  root/JPEGImages/*  root/ImageSets/Main/<split>.txt
    plain:   an annotations folder + an images folder (``ann_dir``/``img_dir``, relative to
             ``root``; found automatically when named annotations/ and images/), split by a
             list file (``split_file``: one image id = file stem per line) or by a seeded
             hold-out fraction (``holdout``: split "train" is the rest, "test"/"val" the held
             out part; the same seed always holds out the same images).

Coordinates: VOC's 1-based inclusive pixels become detkit's continuous xyxy
(xmin - 1, ymin - 1, xmax, ymax), so ``native_offset`` is 1. Problems in the files are
counted and reported in one warning line per kind (see ``detkit.data.io.ProblemLog``);
a dataset that cannot be used at all raises ``DatasetError`` with a one-line message.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from detkit.data.dataset import DetectionDataset, sanitize_boxes
from detkit.data.io import ProblemLog, find_image, is_within, usable_image
from detkit.errors import DatasetError
from detkit.structures import ImageRecord

logger = logging.getLogger("detkit")

# The devkit's coordinates are 1-based and inclusive; detkit's are 0-based continuous.
VOC_NATIVE_OFFSET = 1.0


def _resolve_layout(root: Optional[Path], ann_dir, img_dir) -> Tuple[Path, Path, bool]:
    """(annotations folder, images folder, is_devkit)."""
    if root is not None and not root.is_dir():
        raise DatasetError(f"dataset root does not exist or is not a folder: {root}")
    if ann_dir is not None or img_dir is not None:
        if ann_dir is None or img_dir is None:
            raise DatasetError("a plain VOC layout needs both ann_dir and img_dir")
        ann = Path(root, ann_dir) if root is not None else Path(ann_dir)
        img = Path(root, img_dir) if root is not None else Path(img_dir)
        devkit = False
    elif root is None:
        raise DatasetError("a VOC dataset needs root (or ann_dir and img_dir)")
    elif (root / "Annotations").is_dir() and (root / "JPEGImages").is_dir():
        ann, img, devkit = root / "Annotations", root / "JPEGImages", True
    else:
        pairs = [("annotations", "images"), ("Annotations", "images"), ("annotations", "JPEGImages")]
        for a, i in pairs:
            if (root / a).is_dir() and (root / i).is_dir():
                ann, img, devkit = root / a, root / i, False
                break
        else:
            raise DatasetError(
                f"{root}: not a VOC dataset (expected Annotations/ + JPEGImages/, or "
                "annotations/ + images/, or set ann_dir and img_dir)"
            )
    for d, what in ((ann, "annotations"), (img, "images")):
        if not d.is_dir():
            raise DatasetError(f"{what} folder does not exist: {d}")
    return ann, img, devkit


def _read_id_list(path: Path) -> List[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read split file {path}: {exc.__class__.__name__}") from None
    # ImageSets files may carry a second column (class-specific lists: "000005  1").
    ids = [line.split()[0] for line in text.splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"split file lists no image ids: {path}")
    return ids


def _missing_split_file(path: Path, hint_if_none: str, devkit: bool) -> DatasetError:
    """'split file not found: PATH (available: a, b)', listing the split lists beside it
    (in a devkit's ImageSets/Main without the per-class lists such as aeroplane_train.txt)."""
    have = sorted(p.stem for p in path.parent.glob("*.txt")) if path.parent.is_dir() else []
    if devkit:
        have = [name for name in have if "_" not in name]
    hint = f"available: {', '.join(have)}" if have else hint_if_none
    return DatasetError(f"split file not found: {path} ({hint})")


def _select_ids(
    ann: Path, root: Optional[Path], devkit: bool, split, split_file, holdout: float, seed: int
) -> List[str]:
    if split_file is not None:
        path = Path(root, split_file) if root is not None else Path(split_file)
        if not path.is_file():
            raise _missing_split_file(path, f"no .txt split lists in {path.parent}", devkit=False)
        return _read_id_list(path)
    all_ids = sorted(p.stem for p in ann.glob("*.xml"))
    if not all_ids:
        raise DatasetError(f"no .xml annotation files in {ann}")
    if split in (None, "all"):
        return all_ids
    if devkit and root is not None and holdout <= 0:  # a devkit layout always has a root
        path = root / "ImageSets" / "Main" / f"{split}.txt"
        if not path.is_file():
            raise _missing_split_file(path, "set holdout: 0.2 to split by a seeded fraction", devkit=True)
        return _read_id_list(path)
    if not 0.0 < holdout < 1.0:
        raise DatasetError(
            f"{ann.parent}: split '{split}' needs split_file, ImageSets/Main/{split}.txt, or "
            f"holdout in (0, 1) (got {holdout})"
        )
    order = np.random.default_rng(seed).permutation(len(all_ids))
    n_hold = max(1, int(round(holdout * len(all_ids))))
    held = set(order[:n_hold].tolist())
    if split in ("test", "val"):
        return [all_ids[i] for i in sorted(held)]
    if split in ("train", "trainval"):
        return [all_ids[i] for i in range(len(all_ids)) if i not in held]
    raise DatasetError(f"unknown split '{split}' for a hold-out split (use train, val, test or all)")


# One <object>: (name, [xmin, ymin, xmax, ymax] as written, difficult).
VocObject = Tuple[str, List[float], bool]
# A parsed file: (filename hint, (width, height) or None, objects).
VocAnnotation = Tuple[str, Optional[Tuple[int, int]], List[VocObject]]


def _number(text: Optional[str]) -> float:
    """float() of an element's text; ValueError when the element is missing."""
    if text is None:
        raise ValueError("missing element")
    return float(text)


def parse_voc_xml(path: Path) -> Tuple[Optional[VocAnnotation], List[str]]:
    """((filename hint, (width, height) or None, [(name, [xmin, ymin, xmax, ymax], difficult)])
    or None for a file that is not VOC XML, [problem kinds found in the file])."""
    issues: List[str] = []
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError, UnicodeDecodeError):
        return None, ["skipped malformed annotation files"]
    if root.tag != "annotation":
        return None, ["skipped malformed annotation files"]
    size = None
    try:
        w = int(_number(root.findtext("size/width")))
        h = int(_number(root.findtext("size/height")))
        if w > 0 and h > 0:
            size = (w, h)
    except (OverflowError, ValueError):  # missing, not a number, or inf
        pass
    objects: List[VocObject] = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        try:
            box = [_number(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError:
            issues.append("dropped objects without a numeric bndbox")
            continue
        if not name:
            issues.append("dropped objects without a class name")
            continue
        try:
            difficult = int(float(obj.findtext("difficult") or 0)) != 0
        except (OverflowError, ValueError):
            difficult = False
        objects.append((name, box, difficult))
    return ((root.findtext("filename") or "").strip(), size, objects), issues


def case_variants(names: Sequence[str]) -> List[List[str]]:
    """Groups of names that are equal ignoring letter case (``Dog`` / ``dog``): usually one
    class typed two ways, which would train as two classes that compete for the same boxes."""
    groups: Dict[str, List[str]] = {}
    for n in names:
        groups.setdefault(n.casefold(), []).append(n)
    return [g for g in groups.values() if len(g) > 1]


def load_voc(
    root=None,
    split: Optional[str] = None,
    *,
    ann_dir=None,
    img_dir=None,
    split_file=None,
    holdout: float = 0.0,
    seed: int = 0,
    classes: Optional[Sequence[str]] = None,
    filter_empty: bool = False,
    name: Optional[str] = None,
) -> DetectionDataset:
    """Loads a VOC dataset (see the module docstring for layouts and splits).

    classes: class names in label order (label k = classes[k-1]); objects of other classes
        are dropped and counted. None infers the sorted set of names over ALL annotation
        files of the folder, so that every split of one folder gets the same class list.
    filter_empty: drop images without any (kept) object.
    """
    root = Path(root) if root is not None else None
    ann, img, devkit = _resolve_layout(root, ann_dir, img_dir)
    ids = _select_ids(ann, root, devkit, split, split_file, holdout, seed)
    label_name = name or f"{(root or ann.parent).name}:{split or 'all'}"
    problems = ProblemLog(label_name)

    parsed: Dict[str, Tuple[Optional[VocAnnotation], List[str]]] = {}
    if classes is None:
        # Infer over all files (parsed once, reused below for the split's files).
        names: Set[str] = set()
        for path in sorted(ann.glob("*.xml")):
            parsed[path.stem] = parse_voc_xml(path)
            annotation = parsed[path.stem][0]
            if annotation is not None:
                names.update(o[0] for o in annotation[2])
        if not names:
            raise DatasetError(f"{ann}: no objects found, cannot infer classes (set classes)")
        classes = sorted(names)
        logger.info("%s: inferred %d classes: %s", label_name, len(classes), ", ".join(classes))
        for group in case_variants(classes):
            logger.warning(
                "%s: class names that differ only in letter case: %s (kept as separate classes; "
                "if they are one, fix the annotations)",
                label_name,
                ", ".join(group),
            )
    classes = list(classes)
    if len(set(classes)) != len(classes):
        raise DatasetError(f"{label_name}: duplicate class names in {classes}")
    class_to_label = {c: i + 1 for i, c in enumerate(classes)}

    records: List[ImageRecord] = []
    seen = set()
    unknown = set()  # object names outside the class list
    for image_id in ids:
        if image_id in seen:
            problems.add("skipped ids listed twice in the split", image_id)
            continue
        seen.add(image_id)
        xml_path = ann / f"{image_id}.xml"
        if not is_within(xml_path, ann):
            # An id such as "../../secret" in a split list must not reach outside the folder.
            problems.add("skipped ids whose annotation path escapes the annotations folder", image_id)
            continue
        if not xml_path.is_file():
            problems.add("skipped ids without an annotation file", str(xml_path))
            continue
        result, issues = parsed[image_id] if image_id in parsed else parse_voc_xml(xml_path)
        for kind in issues:
            problems.add(kind, str(xml_path))
        if result is None:
            continue
        hint, size, objects = result
        if hint and (Path(hint).is_absolute() or not is_within(img / hint, img)):
            problems.add("skipped annotations whose image path escapes the dataset root", str(xml_path))
            continue
        image_path = find_image(img, image_id, Path(hint).name if hint else None)
        if image_path is None:
            problems.add("skipped annotations whose image is missing", str(xml_path))
            continue
        if not is_within(image_path, img):
            problems.add("skipped annotations whose image path escapes the dataset root", str(xml_path))
            continue
        # The one image check of the load (header + end-of-data marker, see
        # detkit.data.io.probe_image): an unusable image is skipped here, not mid-training.
        probe = usable_image(image_path, problems)
        if probe is None:
            continue
        width, height = size if size is not None else probe.size
        box_list: List[List[float]] = []
        labels: List[int] = []
        difficult: List[bool] = []
        for obj_name, box, diff in objects:
            label = class_to_label.get(obj_name)
            if label is None:
                problems.add("dropped objects of classes not in the class list", str(xml_path))
                unknown.add(obj_name)
                continue
            box_list.append(box)
            labels.append(label)
            difficult.append(diff)
        boxes = np.asarray(box_list, dtype=np.float32).reshape(-1, 4)
        # 1-based inclusive -> 0-based continuous (see detkit.structures).
        boxes[:, :2] -= VOC_NATIVE_OFFSET
        keep = sanitize_boxes(boxes, width, height, str(xml_path), problems, VOC_NATIVE_OFFSET)
        record = ImageRecord(
            image_id=image_id,
            file_name=str(image_path),
            width=width,
            height=height,
            boxes=boxes[keep],
            labels=np.asarray(labels, np.int64)[keep],
            difficult=np.asarray(difficult, bool)[keep],
        )
        # Difficult boxes are no training positives: an image with only those is empty too.
        if filter_empty and not (~record.difficult).any():
            problems.add("skipped images without objects", str(xml_path))
            continue
        records.append(record)
    if not records:
        detail = "; ".join(problems.lines(1)) or "no images"
        raise DatasetError(f"{label_name}: no usable images in {ann} ({detail})")
    if unknown and not any(len(r.labels) for r in records):
        # Typically a class list inherited from another dataset's recipe.
        raise DatasetError(
            f"{label_name}: no object in {ann} is of the classes {classes}; found "
            f"{sorted(unknown)} (set classes to these, or to null to infer them)"
        )
    problems.warn()
    return DetectionDataset(records, classes, native_offset=VOC_NATIVE_OFFSET, name=label_name, problems=problems)
