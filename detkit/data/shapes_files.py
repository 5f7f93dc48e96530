"""The shapes dataset's files: VOC XML, COCO json, the manifest, and the rules for writing
into a folder that already exists (see ``detkit.data.shapes`` for the layout).

Every writer here is byte-deterministic: XML is written by hand (never through an XML
library whose output could change with its version), json with sorted keys, images with
fixed encoder settings.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from detkit.data.shapes_render import SPLITS, ShapeObject, ShapesImage, image_id_for
from detkit.schema import SHAPE_CLASSES, ShapesConfig

# Bump when the same parameters would give different files, so old folders are not reused.
SHAPES_VERSION = 1
MANIFEST = "shapes.json"
# Options added after version 1's manifests were written, with the value that reproduces
# version 1's images: an older manifest without the key was made with that value.
_ADDED_OPTIONS: Dict[str, Any] = {
    "aspect_ratio": None,
    "classes": list(SHAPE_CLASSES),
    "cluster": 0.0,
    "max_outside": 0.0,
}
_PNG_OPTIONS = [cv2.IMWRITE_PNG_COMPRESSION, 3]
_JPG_OPTIONS = [cv2.IMWRITE_JPEG_QUALITY, 95]


def params_of(options: ShapesConfig) -> Dict[str, Any]:
    """The options in the manifest's JSON form (what decides whether a folder is reused)."""
    return dataclasses.asdict(options)


def voc_xml(image_id: str, file_name: str, width: int, height: int, objects: Sequence[ShapeObject]) -> str:
    """Standard VOC XML (tab-indented like the devkit's own files)."""
    lines = [
        "<annotation>",
        "\t<folder>shapes</folder>",
        f"\t<filename>{file_name}</filename>",
        "\t<source>",
        "\t\t<database>detkit shapes</database>",
        f"\t\t<annotation>detkit.data.shapes v{SHAPES_VERSION}</annotation>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{width}</width>",
        f"\t\t<height>{height}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>0</segmented>",
    ]
    for obj in objects:
        xmin, ymin, xmax, ymax = obj.voc_box
        lines += [
            "\t<object>",
            f"\t\t<name>{obj.name}</name>",
            "\t\t<pose>Unspecified</pose>",
            f"\t\t<truncated>{int(obj.truncated)}</truncated>",
            "\t\t<difficult>0</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{xmin}</xmin>",
            f"\t\t\t<ymin>{ymin}</ymin>",
            f"\t\t\t<xmax>{xmax}</xmax>",
            f"\t\t\t<ymax>{ymax}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def coco_image_and_annotations(
    coco_id: int, file_name: str, shapes: ShapesImage, first_ann_id: int
) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """The COCO ``images`` entry of one image and its ``annotations`` (ids from first_ann_id)."""
    image = {"id": coco_id, "file_name": file_name, "width": shapes.width, "height": shapes.height}
    anns = []
    for k, obj in enumerate(shapes.objects):
        xmin, ymin, xmax, ymax = obj.voc_box
        # The continuous box the XML maps to: (xmin - 1, ymin - 1) .. (xmax, ymax).
        w, h = float(xmax - xmin + 1), float(ymax - ymin + 1)
        anns.append(
            {
                "id": first_ann_id + k,
                "image_id": coco_id,
                "category_id": obj.label,
                "bbox": [float(xmin - 1), float(ymin - 1), w, h],
                "area": w * h,
                "iscrowd": 0,
            }
        )
    return image, anns


def coco_json_file(split: str, images: List[Dict[str, Any]], annotations: List[Dict[str, Any]], classes) -> bytes:
    """instances_<split>.json: category ids 1..K in the order of ``classes``."""
    categories = [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(classes)]
    return dump_json(
        {
            "info": {"description": f"detkit shapes {split}", "version": str(SHAPES_VERSION)},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
    )


def encode_image(shapes: ShapesImage, image_format: str) -> bytes:
    """The image file's bytes (PNG or JPEG, fixed encoder settings)."""
    bgr = cv2.cvtColor(shapes.image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(f".{image_format}", bgr, _PNG_OPTIONS if image_format == "png" else _JPG_OPTIONS)
    if not ok:
        raise RuntimeError(f"shapes: cv2 could not encode {shapes.image_id}.{image_format}")
    return np.asarray(encoded).tobytes()


def dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def own_files(params: Dict[str, Any], coco_json: bool) -> List[str]:
    """Paths (relative to out_dir, '/'-separated) of every file the generator writes with
    these manifest params, except the manifest itself."""
    files = []
    for split, n in (("train", params["num_train"]), ("test", params["num_test"])):
        for i in range(int(n)):
            stem = image_id_for(split, i)
            files += [f"Annotations/{stem}.xml", f"JPEGImages/{stem}.{params['image_format']}"]
    files += [f"ImageSets/Main/{s}.txt" for s in ("train", "trainval", "test")]
    if coco_json:
        files += [f"annotations/instances_{s}.json" for s in SPLITS]
    return files


def read_manifest(out_dir) -> Optional[Dict[str, Any]]:
    """The shapes.json of ``out_dir`` as a dict, or None when there is none or it is not a
    shapes manifest (unreadable, not JSON, another generator's). Options that an older
    manifest predates are filled in with the value its images were made with."""
    path = Path(out_dir) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("generator") != "detkit.data.shapes":
        return None
    if not isinstance(data.get("params"), dict):
        return None
    data["params"] = {**_ADDED_OPTIONS, **data["params"]}
    return data


def manifest(options: ShapesConfig, coco_json: bool, complete: bool) -> Dict[str, Any]:
    return {
        "generator": "detkit.data.shapes",
        "version": SHAPES_VERSION,
        "class_names": list(options.classes),
        "params": params_of(options),
        "coco_json": bool(coco_json),
        # False while writing: a folder left by an interrupted run is never reused as is.
        "complete": bool(complete),
    }


def prepare_folder(out: Path, options: ShapesConfig, coco_json: bool, overwrite: bool) -> bool:
    """Applies the safety rules to ``out`` before writing; True when it already holds this
    very dataset, complete (reuse it as is, write nothing).

    Same version and parameters, every file present and the manifest marked complete:
    reused. Same parameters but files missing (an interrupted run): completed by writing
    again. Any other non-empty folder: FileExistsError (one line) unless ``overwrite``,
    which writes the generator's own files and removes only the files an earlier manifest
    in that folder lists as its own; files with other names (the user's) are never touched.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"shapes: {out} exists and is not a folder")
    params = params_of(options)
    files = own_files(params, coco_json)
    old = read_manifest(out) if out.is_dir() else None
    same = old is not None and old.get("version") == SHAPES_VERSION and old["params"] == params
    if not overwrite and same and old is not None and old.get("complete") is True:
        if all((out / f).is_file() for f in files):
            return True
    if not same and out.is_dir() and any(out.iterdir()) and not overwrite:
        if old is not None:
            if old.get("version") != SHAPES_VERSION:
                why = f"holds a shapes dataset of generator version {old.get('version')} (now {SHAPES_VERSION})"
            else:
                old_p = old["params"]
                keys = sorted(k for k in set(params) | set(old_p) if params.get(k) != old_p.get(k))
                why = f"holds a shapes dataset made with other parameters ({', '.join(keys)})"
        elif (out / MANIFEST).exists():
            why = f"has a {MANIFEST} that is not a readable shapes manifest"
        else:
            why = f"is not empty and holds no {MANIFEST}"
        raise FileExistsError(f"shapes: {out} {why}; choose another folder or pass overwrite=True")

    # Files an earlier generation listed as its own but this one will not write: remove them,
    # so that loaders globbing Annotations/ see only this dataset. Nothing else is touched.
    if old is not None:
        try:
            stale = set(own_files(old["params"], bool(old.get("coco_json")))) - set(files)
        except (KeyError, TypeError, ValueError):
            stale = set()
        for rel in sorted(stale):
            path = out / rel
            if path.is_file():
                path.unlink()
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    return False
