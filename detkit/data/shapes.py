"""The generated "shapes" dataset: detkit's embedded default, made on the spot (no downloads).

``generate_shapes(out_dir, options)`` writes a Pascal VOC devkit folder that
``detkit.data.voc`` reads like any other:

    out_dir/
      Annotations/<id>.xml            VOC XML; bndbox in 1-based inclusive pixels
      JPEGImages/<id>.png             PNG by default (lossless: the small shapes keep exact
                                      edges); the folder keeps the devkit's name anyway
      ImageSets/Main/train.txt        one id per line; trainval.txt == train.txt
      ImageSets/Main/test.txt
      annotations/instances_{train,test}.json   COCO json, only with coco_json=True
      shapes.json                     manifest: generator version, options, class names

Ids are ``train_00000``, ``test_00000``, ...; the two splits are disjoint by construction.
Classes, in label order (labels 1..K): ``options.classes``, by default circle, square,
triangle (K = 3).

The options are one dataclass, ``detkit.schema.ShapesConfig`` (the same for configs, the
command line and Python; its fields list every option with its default). Image i of split s
is drawn from a numpy Generator seeded by (seed, s, i): the same options give byte-identical
files, and asking for more images never changes the first ones. ``render_shapes_image``
renders one image in memory exactly as it is written.

Three parts: ``detkit.data.shapes_render`` draws (options + generator -> image + objects,
no files), ``detkit.data.shapes_files`` writes (VOC XML, COCO json, manifest, the rules for
existing folders), and this module ties them together.

Regimes (each a small dataset config under configs/_base_/datasets/shapes_*.yaml):
large objects crossing the border (``max_outside``; VOC ``truncated`` = 1, boxes clipped to
the image), one class (``classes``), few images of varied sizes and aspect ratios
(``image_size``, ``aspect_ratio``), many small objects (``objects_per_image``,
``object_size``), overlapping objects (``max_iou``, ``min_visible``).

COCO json: image ids 1..N per split, ``file_name`` "<id>.png" relative to JPEGImages/,
category ids 1..K in the order of the classes, bbox [x, y, w, h] = (xmin - 1, ymin - 1,
xmax - xmin + 1, ymax - ymin + 1) of the XML box, area = w * h, iscrowd = 0.

Safety: an ``out_dir`` whose shapes.json records the same version and options and whose
files are all present is reused as is (nothing rewritten); one with the same options but
missing files (an interrupted run) is completed by regenerating. Any other non-empty folder
raises ``FileExistsError`` unless ``overwrite=True``, which always (re)writes the generator's
own files and removes only files that an earlier shapes.json in that folder lists as its
own; files with other names (the user's) are never touched.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional

from detkit.data.shapes_files import (
    MANIFEST,
    SHAPES_VERSION,
    coco_image_and_annotations,
    coco_json_file,
    dump_json,
    encode_image,
    manifest,
    prepare_folder,
    read_manifest,
    voc_xml,
)
from detkit.data.shapes_render import (
    CLASS_NAMES,
    SPLITS,
    ShapeObject,
    ShapesImage,
    image_id_for,
    image_rng,
    render_image,
)
from detkit.schema import ShapesConfig

__all__ = [
    "CLASS_NAMES",
    "MANIFEST",
    "SHAPES_VERSION",
    "SPLITS",
    "ShapeObject",
    "ShapesConfig",
    "ShapesImage",
    "generate_shapes",
    "image_id_for",
    "read_manifest",
    "render_shapes_image",
    "shapes_options",
]


def shapes_options(options: Optional[ShapesConfig] = None, **overrides: Any) -> ShapesConfig:
    """``options`` (default: ``ShapesConfig()``) with some fields replaced, checked again.
    Unknown names raise TypeError naming the known ones; bad values a one-line ValueError."""
    base = options if options is not None else ShapesConfig()
    known = [f.name for f in dataclasses.fields(ShapesConfig)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise TypeError(f"shapes: unknown option {unknown[0]!r} (known: {', '.join(known)})")
    return dataclasses.replace(base, **overrides) if overrides else base


def render_shapes_image(
    split: str = "train", index: int = 0, options: Optional[ShapesConfig] = None, **overrides: Any
) -> ShapesImage:
    """Renders image ``index`` of ``split`` exactly as ``generate_shapes`` writes it, in memory.

    options / overrides: as for ``generate_shapes`` (``seed=3``, ``object_size=21``, ...).
    """
    opts = shapes_options(options, **overrides)
    return render_image(opts, image_rng(opts.seed, split, index), image_id_for(split, index))


def generate_shapes(
    out_dir,
    options: Optional[ShapesConfig] = None,
    coco_json: bool = False,
    overwrite: bool = False,
    **overrides: Any,
) -> Path:
    """Writes the shapes dataset as a VOC devkit folder at ``out_dir`` and returns its path.

    options: a ``ShapesConfig`` (default: its defaults); keyword overrides replace single
    fields of it (``generate_shapes(out, num_train=6, seed=7)``). See the module docstring
    for the layout and the rules for reusing or refusing an existing folder. Raises
    ValueError (one line) for bad options and FileExistsError (one line) for a non-empty
    folder it will not write into.
    """
    opts = shapes_options(options, **overrides)
    out = Path(out_dir)
    if prepare_folder(out, opts, coco_json, overwrite):
        return out
    (out / MANIFEST).write_bytes(dump_json(manifest(opts, coco_json, complete=False)))
    ext = opts.image_format
    for split, n in (("train", opts.num_train), ("test", opts.num_test)):
        ids: List[str] = []
        coco_images: List[Dict[str, Any]] = []
        coco_anns: List[Dict[str, Any]] = []
        for i in range(n):
            image_id = image_id_for(split, i)
            shapes = render_image(opts, image_rng(opts.seed, split, i), image_id)
            file_name = f"{image_id}.{ext}"
            (out / "JPEGImages" / file_name).write_bytes(encode_image(shapes, ext))
            xml = voc_xml(image_id, file_name, shapes.width, shapes.height, shapes.objects)
            (out / "Annotations" / f"{image_id}.xml").write_bytes(xml.encode("utf-8"))
            ids.append(image_id)
            if coco_json:
                image, anns = coco_image_and_annotations(i + 1, file_name, shapes, len(coco_anns) + 1)
                coco_images.append(image)
                coco_anns += anns
        listing = "".join(f"{s}\n" for s in ids).encode("utf-8")
        (out / "ImageSets" / "Main" / f"{split}.txt").write_bytes(listing)
        if split == "train":
            (out / "ImageSets" / "Main" / "trainval.txt").write_bytes(listing)
        if coco_json:
            (out / "annotations").mkdir(exist_ok=True)
            data = coco_json_file(split, coco_images, coco_anns, opts.classes)
            (out / "annotations" / f"instances_{split}.json").write_bytes(data)
    (out / MANIFEST).write_bytes(dump_json(manifest(opts, coco_json, complete=True)))
    return out
