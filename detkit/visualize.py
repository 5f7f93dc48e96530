"""Drawing detections on images (demo output)."""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

# Distinct, colour-blind friendly colours (Okabe-Ito), cycled per class.
PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0), (204, 121, 167)]


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
) -> np.ndarray:
    """image (H, W, 3) uint8 RGB; boxes (R, 4) xyxy in its pixels; labels in 1..K.
    Returns a new image with a rectangle and "name 0.93" per detection."""
    out = np.ascontiguousarray(image.copy())
    h, w = out.shape[:2]
    thickness = max(1, round(min(h, w) / 300))
    font_scale = max(0.35, min(h, w) / 900)
    for box, score, label in sorted(zip(boxes, scores, labels), key=lambda t: t[1]):
        color = PALETTE[(int(label) - 1) % len(PALETTE)]
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness)
        name = class_names[int(label) - 1] if 0 < int(label) <= len(class_names) else str(int(label))
        text = f"{name} {float(score):.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        ty = y1 - 2 if y1 - th - base - 2 >= 0 else min(y1 + th + base + 2, h - 1)
        cv2.rectangle(out, (x1, ty - th - base), (x1 + tw + 2, ty + 1), color, -1)
        cv2.putText(out, text, (x1 + 1, ty - base + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def save_rgb(path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write image {path}")
