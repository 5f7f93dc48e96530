"""Detections in memory (``Dets``) and on disk (the file ``detkit evaluate`` reads).

In memory every evaluator takes

    Dets = dict[image_id, dict(boxes=(R, 4) float xyxy in the image's original pixels
                                (detkit's continuous convention, see ``detkit.structures``),
                               scores=(R,) float, labels=(R,) int64 in 1..K)]

(a ``detkit.structures.Detections`` works as a value too). Images without an entry have no
detections. R detections of one image, K foreground classes, M detections in total.

On disk a detection file is a COCO-style results list (JSON):

    [{"image_id": ..., "category_id": 3 | "category": "dog", "bbox": [x, y, w, h],
      "score": 0.97}, ...]

in the dataset's *native* coordinates, so that the file means the same to other tools:

- VOC datasets (``native_offset`` 1): ``image_id`` is the image id string (file stem) and
  bbox is ``[xmin, ymin, xmax - xmin, ymax - ymin]`` in the XML's 1-based inclusive pixels.
  Internally x1 = xmin - 1, x2 = xmin + w (= xmax), likewise for y.
- COCO datasets (``native_offset`` 0): the json's own int image ids and category ids
  (mapped to labels by ``dataset.cat_id_to_label``); bbox is plain COCO xywh.
- Other datasets: the records' image ids, category id = label, offset as the dataset says.

In general x1 = x - native_offset, y1 = y - native_offset, x2 = x + w, y2 = y + h.
``save_detections`` writes both ``category_id`` and the readable ``category`` name; a file
may give either (if both, they must agree).
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from detkit.errors import DetectionFileError
from detkit.structures import ImageId

Dets = Dict[ImageId, dict]


def _field(det, key: str) -> np.ndarray:
    """One array of a per-image detection entry (dict or ``Detections``), as numpy on CPU."""
    value = det[key] if isinstance(det, dict) else getattr(det, key)
    if hasattr(value, "detach"):  # torch tensor, possibly on a GPU
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def flatten_dets(dets: Dets, dataset) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Checks ``dets`` against ``dataset`` and concatenates them.

    Returns (image_index (M,) int64, boxes (M, 4) float64, scores (M,) float64, labels (M,)
    int64), ordered by the image's position in ``dataset.records`` and then by the order
    inside the image. This order is what breaks score ties in the VOC metric, so it must not
    depend on the dict's insertion order. Raises ValueError (one line) on bad input.
    """
    num_classes = len(dataset.class_names)
    chunks = []
    for image_id, det in dets.items():
        index = dataset.id_to_index.get(image_id)
        if index is None:
            raise ValueError(
                f"detections for image id {image_id!r}, which is not in dataset {getattr(dataset, 'name', '')!r}"
            )
        try:
            boxes = _field(det, "boxes").astype(np.float64)
            scores = _field(det, "scores").astype(np.float64)
            labels = _field(det, "labels")
        except (KeyError, AttributeError, TypeError, ValueError) as e:
            raise ValueError(f"detections of image {image_id!r}: need boxes, scores and labels ({e})") from None
        if boxes.size == 0 and scores.size == 0 and labels.size == 0:
            continue
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"detections of image {image_id!r}: boxes have shape {boxes.shape}, expected (R, 4)")
        r = boxes.shape[0]
        if scores.shape != (r,) or labels.shape != (r,):
            raise ValueError(
                f"detections of image {image_id!r}: {r} boxes but scores {scores.shape} and labels {labels.shape}"
            )
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise ValueError(f"detections of image {image_id!r}: non-finite box or score")
        if labels.dtype.kind not in "iu" and not np.array_equal(labels, np.round(labels)):
            raise ValueError(f"detections of image {image_id!r}: labels are not integers")
        labels = labels.astype(np.int64)
        bad = (labels < 1) | (labels > num_classes)
        if bad.any():
            raise ValueError(
                f"detections of image {image_id!r}: label {labels[bad][0]} outside 1..{num_classes} (0 is background)"
            )
        chunks.append((index, boxes, scores, labels))
    if not chunks:
        return (np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))
    chunks.sort(key=lambda c: c[0])
    image_index = np.concatenate([np.full(len(c[2]), c[0], np.int64) for c in chunks])
    return (
        image_index,
        np.concatenate([c[1] for c in chunks]),
        np.concatenate([c[2] for c in chunks]),
        np.concatenate([c[3] for c in chunks]),
    )


def _json_id(image_id):
    """numpy scalars are not JSON; ids are str or int everywhere else."""
    return image_id.item() if isinstance(image_id, np.generic) else image_id


def dets_to_json(dets: Dets, dataset) -> List[dict]:
    """The detection-file entries of ``dets`` (see the module docstring), in dataset order."""
    image_index, boxes, scores, labels = flatten_dets(dets, dataset)
    off = dataset.native_offset
    out = []
    for i, (x1, y1, x2, y2), s, k in zip(image_index, boxes, scores, labels):
        x, y = x1 + off, y1 + off
        out.append(
            {
                "image_id": _json_id(dataset.records[i].image_id),
                "category_id": int(dataset.label_to_cat_id[int(k)]),
                "category": dataset.class_names[k - 1],
                # float64 arithmetic on float32 inputs is exact here, so a round trip through
                # the file gives back the same boxes bit for bit.
                "bbox": [float(x), float(y), float(x2 - x), float(y2 - y)],
                "score": float(s),
            }
        )
    return out


def save_detections(path, dets: Dets, dataset) -> None:
    """Writes ``dets`` as a detection file (JSON, one detection per line)."""
    entries = dets_to_json(dets, dataset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        body = ",\n".join(json.dumps(e) for e in entries)
        f.write(f"[\n{body}\n]\n" if entries else "[]\n")


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def load_detections(path, dataset) -> Dets:
    """Reads a detection file into ``Dets`` (boxes float64, exactly as written; only images
    that have detections get an entry, in dataset order).

    Raises ``DetectionFileError`` naming the file and the entry index for: unreadable or
    non-JSON files, a top level that is not a list, missing keys, a bbox that is not four
    finite numbers or has a negative width/height (in detkit's xyxy, i.e. w < -native_offset),
    a non-numeric score, an unknown category id or class name, and a file none of whose
    image ids is in the dataset (almost surely the wrong split or dataset). If only some
    image ids are unknown, those detections are skipped with one summary warning.
    """
    path = Path(path)
    try:
        with open(path) as f:
            entries = json.load(f)
    except OSError as e:
        raise DetectionFileError(f"{path}: cannot read detection file ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DetectionFileError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(entries, list):
        raise DetectionFileError(f"{path}: expected a JSON list of detections, got {type(entries).__name__}")

    off = dataset.native_offset
    # Keyed by str so that "000005" and 42 / "42" find VOC and COCO ids alike.
    index_of = {str(r.image_id): i for i, r in enumerate(dataset.records)}
    label_of_name = {name: k for k, name in enumerate(dataset.class_names, start=1)}
    per_image: Dict[int, list] = {}
    unknown_ids: Dict[str, int] = {}

    for n, entry in enumerate(entries):
        where = f"{path}: entry {n}"
        if not isinstance(entry, dict):
            raise DetectionFileError(f"{where}: expected an object, got {type(entry).__name__}")
        missing = [k for k in ("image_id", "bbox", "score") if k not in entry]
        if "category_id" not in entry and "category" not in entry:
            missing.append("category_id (or category)")
        if missing:
            raise DetectionFileError(f"{where}: missing key(s) {', '.join(missing)}")

        bbox = entry["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
            raise DetectionFileError(f"{where}: bbox must be four finite numbers [x, y, w, h], got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        if w + off < 0 or h + off < 0:
            raise DetectionFileError(f"{where}: bbox {bbox!r} has a negative width or height")
        if not _is_number(entry["score"]):
            raise DetectionFileError(f"{where}: score must be a finite number, got {entry['score']!r}")

        label = None
        if "category_id" in entry:
            cat = entry["category_id"]
            if isinstance(cat, float) and cat.is_integer():  # 3.0 written by some tools
                cat = int(cat)
            ok = isinstance(cat, int) and not isinstance(cat, bool)
            label = dataset.cat_id_to_label.get(cat) if ok else None
            if label is None:
                raise DetectionFileError(
                    f"{where}: unknown category_id {entry['category_id']!r} (known: {sorted(dataset.cat_id_to_label)})"
                )
        if "category" in entry:
            cname = entry["category"]
            by_name = label_of_name.get(cname) if isinstance(cname, str) else None
            if by_name is None:
                raise DetectionFileError(
                    f"{where}: unknown category {entry['category']!r} (known: {', '.join(dataset.class_names)})"
                )
            if label is not None and by_name != label:
                raise DetectionFileError(
                    f"{where}: category {entry['category']!r} disagrees with category_id {entry['category_id']!r}"
                )
            label = by_name

        index = index_of.get(str(entry["image_id"]))
        if index is None:
            key = str(entry["image_id"])
            unknown_ids[key] = unknown_ids.get(key, 0) + 1
            continue
        row = (x - off, y - off, x + w, y + h, float(entry["score"]), label)
        per_image.setdefault(index, []).append(row)

    skipped = sum(unknown_ids.values())
    if skipped:
        example = next(iter(unknown_ids))
        name = getattr(dataset, "name", "")
        if skipped == len(entries):
            raise DetectionFileError(
                f"{path}: none of the {len(entries)} detections' image ids is in dataset "
                f"{name!r} (e.g. {example!r}); wrong dataset or split?"
            )
        warnings.warn(
            f"{path}: skipped {skipped} of {len(entries)} detections on {len(unknown_ids)} "
            f"image id(s) not in dataset {name!r} (e.g. {example!r})",
            stacklevel=2,
        )

    dets: Dets = {}
    for index in sorted(per_image):
        rows = np.array(per_image[index], dtype=np.float64)
        dets[dataset.records[index].image_id] = {
            "boxes": rows[:, :4].copy(),
            "scores": rows[:, 4].copy(),
            "labels": rows[:, 5].astype(np.int64),
        }
    return dets
