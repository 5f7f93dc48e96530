"""``detkit data check``: validate a dataset and summarise it.

Reports images, objects per class (and how many are difficult), box sizes, images without
objects, every problem the loader fixed or skipped (its image check already skipped files
whose header is unreadable and flagged truncated ones), and, when decoding every image in
full, images that cannot be decoded (errors), images that decode only in part and images
whose size differs from the annotation (warnings: training uses them as they are).
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
from tqdm import tqdm

from detkit.data.io import ProblemLog, decode_image
from detkit.errors import ImageReadError


def check_dataset(dataset, decode_images: bool = True, progress: bool = True) -> Dict:
    records = dataset.records
    labels = np.concatenate([r.labels for r in records]) if records else np.zeros(0, np.int64)
    difficult = np.concatenate([r.difficult for r in records]) if records else np.zeros(0, bool)
    boxes = np.concatenate([r.boxes for r in records]) if records else np.zeros((0, 4), np.float32)
    per_class = {}
    for k, name in enumerate(dataset.class_names, start=1):
        m = labels == k
        per_class[name] = {"objects": int(m.sum()), "difficult": int((m & difficult).sum())}
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    sizes = {}
    if len(boxes):
        for name, v in (("width", w), ("height", h), ("sqrt_area", np.sqrt(w * h))):
            sizes[name] = {
                q: float(np.percentile(v, p))
                for q, p in (("min", 0), ("p5", 5), ("median", 50), ("p95", 95), ("max", 100))
            }
    image_sizes = sorted({(r.width, r.height) for r in records})
    errors: List[str] = []
    # What the loader fixed or skipped (load_voc / load_coco attach their ProblemLog).
    problems = getattr(dataset, "problems", None)
    warnings: List[str] = problems.lines(max_files=5) if problems is not None else []
    if decode_images:
        unreadable, mismatched = [], []
        # Partial decodes the loader's check did not flag already (it flags files whose
        # end-of-data marker is missing; the full decode finds any other kind).
        partial = ProblemLog(dataset.name)
        for r in tqdm(records, desc="decoding", disable=None if progress else True, leave=False):
            try:
                image, note = decode_image(r.file_name)
            except ImageReadError as exc:
                unreadable.append(str(exc))
                continue
            kind = f"decoded partially ({note})"
            if note is not None and not (problems is not None and problems.has(kind, r.file_name)):
                partial.add(kind, r.file_name)
            if (image.shape[1], image.shape[0]) != (r.width, r.height):
                mismatched.append(
                    f"{r.file_name}: annotation says {r.width}x{r.height}, image is {image.shape[1]}x{image.shape[0]}"
                )
        errors += unreadable
        warnings += partial.lines(max_files=5) + mismatched
    return {
        "name": dataset.name,
        "images": len(records),
        "images_without_objects": int(sum(1 for r in records if len(r.boxes) == 0)),
        "objects": int(len(labels)),
        "per_class": per_class,
        "box_sizes": sizes,
        "image_sizes": [list(s) for s in image_sizes[:10]],
        "num_image_sizes": len(image_sizes),
        "errors": errors,
        "warnings": warnings,
    }


def format_report(report: Dict) -> str:
    lines = [
        f"dataset {report['name']}: {report['images']} images, {report['objects']} objects, "
        f"{report['images_without_objects']} images without objects"
    ]
    width = max([len(n) for n in report["per_class"]] + [5])
    lines.append(f"  {'class':<{width}}  objects  difficult")
    for name, c in report["per_class"].items():
        lines.append(f"  {name:<{width}}  {c['objects']:>7}  {c['difficult']:>9}")
    for key, s in report["box_sizes"].items():
        lines.append(
            f"  box {key:<9} min {s['min']:.1f}  p5 {s['p5']:.1f}  median {s['median']:.1f}  "
            f"p95 {s['p95']:.1f}  max {s['max']:.1f} px"
        )
    shown = ", ".join(f"{w}x{h}" for w, h in report["image_sizes"])
    more = (
        f" (+{report['num_image_sizes'] - len(report['image_sizes'])} more)" if report["num_image_sizes"] > 10 else ""
    )
    lines.append(f"  image sizes: {shown}{more}")
    if report["warnings"]:
        lines.append(f"problems fixed or skipped ({len(report['warnings'])}):")
        lines += [f"  - {w}" for w in report["warnings"]]
    if report["errors"]:
        lines.append(f"errors ({len(report['errors'])}):")
        lines += [f"  - {e}" for e in report["errors"]]
    if not report["warnings"] and not report["errors"]:
        lines.append("no problems found")
    return "\n".join(lines)
