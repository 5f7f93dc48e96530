"""What users see: boxes drawn on images, contact sheets, and the matplotlib figures of
the tools (dataset histograms, training curves, PR curves, confusion matrix, error
breakdown).

Everything here takes plain numpy arrays and dicts, so that it sits at the bottom of the
layers (it imports nothing of detkit) and every tool can use it.

Shape shorthand: R boxes of one image, K foreground classes; boxes are (R, 4) float xyxy in
the pixels of the image they are drawn on, labels 1..K (``class_names[k - 1]`` names k).

Drawing rules, so a picture reads the same everywhere:
- a class has one colour everywhere (``class_color``), from a colour-blind friendly palette;
- detections are solid rectangles with a "name 0.93" label; ground truth is dashed
  (``draw_ground_truth``: difficult boxes dashed, the others solid when drawn alone);
- line width and font grow with the image (``draw_style``), so labels are legible on a
  150 px thumbnail and on a 4000 px photograph, and a label is always placed inside the image.

Figures are drawn with matplotlib's object-oriented API (``matplotlib.figure.Figure`` on
the Agg canvas), which never touches pyplot's global backend or opens a window.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from numpy.typing import ArrayLike

# Distinct, colour-blind friendly colours (Okabe-Ito, then a few more), RGB, cycled per class.
PALETTE = [
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (153, 153, 153),
    (117, 112, 179),
    (166, 118, 29),
]

_FONT = cv2.FONT_HERSHEY_SIMPLEX
Color = Tuple[int, int, int]


def class_color(label: int) -> Color:
    """RGB colour of label k (1..K); the palette repeats after len(PALETTE) classes."""
    return PALETTE[(int(label) - 1) % len(PALETTE)]


def _text_color(bg: Color) -> Color:
    """Black on light label backgrounds, white on dark ones (ITU-R BT.601 luma)."""
    luma = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
    return (0, 0, 0) if luma >= 128 else (255, 255, 255)


@dataclass(frozen=True)
class DrawStyle:
    """Line thickness (px), font scale (cv2 Hershey units) and text stroke for one image."""

    thickness: int
    font_scale: float
    text_thickness: int


def draw_style(height: int, width: int) -> DrawStyle:
    """Scales with the shorter side: 1 px lines and ~10 px text on a 150 px image, 10 px
    lines and ~70 px text on a 3000 px one (a label stays about 2-4 % of the image)."""
    short = max(1, min(height, width))
    thickness = max(1, round(short / 300))
    font_scale = max(0.35, short / 900)
    return DrawStyle(thickness, font_scale, max(1, round(font_scale * 1.2)))


def _dashed_line(img, p, q, color, thickness, dash):
    (x0, y0), (x1, y1) = p, q
    length = math.hypot(x1 - x0, y1 - y0)
    if length == 0:
        return
    n = max(1, int(length // (2 * dash)) + 1)
    for i in range(n):
        a = min(2 * i * dash / length, 1.0)
        b = min((2 * i + 1) * dash / length, 1.0)
        if a >= 1.0:
            break
        pa = (int(round(x0 + (x1 - x0) * a)), int(round(y0 + (y1 - y0) * a)))
        pb = (int(round(x0 + (x1 - x0) * b)), int(round(y0 + (y1 - y0) * b)))
        cv2.line(img, pa, pb, color, thickness)


def box_pixels(box, height: int, width: int) -> Tuple[int, int, int, int]:
    """The pixel rectangle (inclusive) a continuous xyxy box covers: columns round(x1) ..
    round(x2) - 1, rows likewise (a VOC box (xmin - 1, ymin - 1, xmax, ymax) gives back its
    0-based pixels), clipped to the image, so an outline along the border stays visible."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    x1, x2 = min(max(x1, 0), width - 1), min(max(x2 - 1, 0), width - 1)
    y1, y2 = min(max(y1, 0), height - 1), min(max(y2 - 1, 0), height - 1)
    return x1, y1, max(x1, x2), max(y1, y2)


def draw_rectangle(img: np.ndarray, box, color: Color, thickness: int, dashed: bool = False) -> None:
    """In place, on the pixels of ``box_pixels``. ``dashed``: dashes and gaps of 4 line
    widths (at least 4 px) each, starting at every corner."""
    x1, y1, x2, y2 = box_pixels(box, *img.shape[:2])
    if not dashed:
        cv2.rectangle(img, (x1, y1), (x2, y2), color, thickness)
        return
    dash = max(4, 4 * thickness)
    for p, q in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
        _dashed_line(img, p, q, color, thickness, dash)


def _overlap(a: Tuple[int, int, int, int], b: Tuple[int, int, int, int]) -> bool:
    return not (a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1])


def label_rect(
    text: str,
    box,
    height: int,
    width: int,
    style: DrawStyle,
    avoid: Sequence[Tuple[int, int, int, int]] = (),
) -> Tuple[Tuple[int, int, int, int], Tuple[int, int], float]:
    """Where the label of ``box`` goes: ((x0, y0, x1, y1) of its filled background, the text
    origin, the font scale used). Always inside the image.

    Above the box's top-left corner when there is room, else under its bottom-left corner
    (the outline stays visible), else just inside its top; shifted left where it would
    leave the image on the right; the font shrinks when the text is wider than the image.
    ``avoid``: labels already placed; the first of the positions above, under, inside top,
    inside bottom (left-aligned, then right-aligned with the box) that overlaps none of
    them is taken (else the first position)."""
    scale = style.font_scale
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, style.text_thickness)
    while tw + 4 > width and scale > 0.2:  # a label wider than the image: smaller font
        scale *= 0.8
        (tw, th), base = cv2.getTextSize(text, _FONT, scale, style.text_thickness)
    pad = max(1, style.thickness)
    lw, lh = tw + 2 * pad, th + base + 2 * pad
    x1b, y1b, x2b, y2b = box_pixels(box, height, width)
    ys = [y for y, fits in ((y1b - lh, y1b - lh >= 0), (y2b + 1, y2b + 1 + lh <= height)) if fits]
    ys += [y1b, max(y1b, y2b - lh + 1)]
    xs = [x1b, x2b - lw + 1]

    def rect_at(x, y):
        x0 = int(np.clip(x, 0, max(0, width - lw)))
        y0 = int(np.clip(y, 0, max(0, height - lh)))
        return (x0, y0, min(width - 1, x0 + lw - 1), min(height - 1, y0 + lh - 1))

    candidates = [rect_at(x, y) for y in ys for x in xs]
    rect = next((r for r in candidates if not any(_overlap(r, a) for a in avoid)), candidates[0])
    return rect, (rect[0] + pad, rect[1] + pad + th), scale


def draw_label(img: np.ndarray, text: str, rect, origin, scale: float, color: Color, style: DrawStyle) -> None:
    """In place: ``text`` on a filled ``color`` background, as ``label_rect`` placed it."""
    x0, y0, x1, y1 = rect
    cv2.rectangle(img, (x0, y0), (x1, y1), color, -1)
    cv2.putText(img, text, origin, _FONT, scale, _text_color(color), style.text_thickness, cv2.LINE_AA)


def _name(label: int, class_names: Sequence[str]) -> str:
    return class_names[int(label) - 1] if 0 < int(label) <= len(class_names) else str(int(label))


def draw_boxes(
    image: np.ndarray,
    boxes: ArrayLike,
    labels: ArrayLike,
    class_names: Sequence[str],
    scores: Optional[ArrayLike] = None,
    dashed: Union[bool, np.ndarray] = False,
    show_labels: bool = True,
    style: Optional[DrawStyle] = None,
) -> np.ndarray:
    """A new (H, W, 3) uint8 RGB image with one rectangle per box in its class colour
    (``dashed``: one flag for all or an (R,) mask) and, with ``show_labels``, a label
    "name" or "name 0.93". Boxes are drawn lowest score first, so the best ones stay on top
    and their labels readable."""
    out = np.ascontiguousarray(np.array(image, dtype=np.uint8, copy=True))
    h, w = out.shape[:2]
    style = style or draw_style(h, w)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    dash = np.broadcast_to(np.asarray(dashed, dtype=bool), (len(boxes),))
    score_arr = np.asarray(scores, dtype=np.float64).reshape(-1) if scores is not None else None
    order = np.argsort(score_arr, kind="stable") if score_arr is not None else np.arange(len(boxes))
    for i in order:
        color = class_color(labels[i])
        draw_rectangle(out, boxes[i], color, style.thickness, bool(dash[i]))
    if show_labels:
        # Placed best first (so the best detections get the preferred spots, and later
        # labels dodge them), drawn best last (on top where they still overlap).
        placed: Dict[int, Tuple[str, Tuple[int, int, int, int], Tuple[int, int], float]] = {}
        for i in order[::-1]:
            name = _name(labels[i], class_names)
            text = f"{name} {score_arr[i]:.2f}" if score_arr is not None else name
            rect, origin, scale = label_rect(text, boxes[i], h, w, style, avoid=[p[1] for p in placed.values()])
            placed[i] = (text, rect, origin, scale)
        for i in order:
            text, rect, origin, scale = placed[i]
            draw_label(out, text, rect, origin, scale, class_color(labels[i]), style)
    return out


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    gt_boxes: Optional[np.ndarray] = None,
    gt_labels: Optional[np.ndarray] = None,
) -> np.ndarray:
    """image (H, W, 3) uint8 RGB; boxes (R, 4) xyxy in its pixels; labels in 1..K.
    Detections solid with "name 0.93" labels; ground truth, when given, dashed in its class
    colour without labels (under the detections)."""
    out = image
    if gt_boxes is not None and gt_labels is not None and len(gt_boxes):
        out = draw_boxes(image, gt_boxes, gt_labels, class_names, dashed=True, show_labels=False)
    return draw_boxes(out, boxes, labels, class_names, scores=scores)


def draw_ground_truth(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    difficult: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Ground truth with class-name labels; ``difficult`` boxes dashed, the others solid."""
    dashed = np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult, bool)
    return draw_boxes(image, boxes, labels, class_names, dashed=dashed)


def fit_image(image: np.ndarray, size: Tuple[int, int], background: Color = (40, 40, 40)) -> np.ndarray:
    """``image`` scaled to fit inside ``size`` = (width, height), keeping its aspect ratio,
    centred on a ``background`` canvas."""
    tw, th = size
    h, w = image.shape[:2]
    scale = min(tw / max(w, 1), th / max(h, 1))
    nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(image, (nw, nh), interpolation=interp)
    canvas = np.empty((th, tw, 3), np.uint8)
    canvas[:] = background
    y0, x0 = (th - nh) // 2, (tw - nw) // 2
    canvas[y0 : y0 + nh, x0 : x0 + nw] = small
    return canvas


def contact_sheet(
    images: Sequence[np.ndarray],
    titles: Optional[Sequence[str]] = None,
    cell: Tuple[int, int] = (256, 192),
    cols: Optional[int] = None,
    gap: int = 4,
    legend: Optional[Sequence[Tuple[str, Color]]] = None,
) -> np.ndarray:
    """A grid of ``images`` (each fitted into a ``cell`` = (width, height)), a caption under
    each (``titles``), and optionally a legend row of coloured class names on top.
    -> (H, W, 3) uint8 RGB."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    n = len(images)
    cols = cols or min(n, max(1, int(math.ceil(math.sqrt(n * cell[1] / cell[0])))))
    rows = int(math.ceil(n / cols))
    cw, ch = cell
    style = draw_style(160, 160)  # captions at thumbnail size
    (_, th), base = cv2.getTextSize("Ag", _FONT, style.font_scale, 1)
    cap_h = th + base + 6 if titles else 0
    leg_h = th + base + 10 if legend else 0
    sheet_w = cols * cw + (cols + 1) * gap
    sheet_h = leg_h + rows * (ch + cap_h) + (rows + 1) * gap
    sheet = np.full((sheet_h, sheet_w, 3), 255, np.uint8)
    if legend:
        x = gap
        for name, color in legend:
            (tw, _), _ = cv2.getTextSize(name, _FONT, style.font_scale, 1)
            cv2.rectangle(sheet, (x, gap), (x + th, gap + th), color, -1)
            cv2.putText(sheet, name, (x + th + 4, gap + th), _FONT, style.font_scale, (0, 0, 0), 1, cv2.LINE_AA)
            x += th + tw + 16
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        x0 = gap + c * (cw + gap)
        y0 = leg_h + gap + r * (ch + cap_h + gap)
        sheet[y0 : y0 + ch, x0 : x0 + cw] = fit_image(img, cell)
        if titles:
            text = str(titles[i])
            scale = style.font_scale
            while cv2.getTextSize(text, _FONT, scale, 1)[0][0] > cw and len(text) > 4:
                text = text[:-4] + "..."
            cv2.putText(sheet, text, (x0, y0 + ch + th + 3), _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return sheet


def crop_with_context(image: np.ndarray, box, context: float = 0.5, min_size: int = 48) -> Tuple[np.ndarray, int, int]:
    """The region of ``box`` grown by ``context`` times its size on each side (at least
    ``min_size`` px in all), clipped to the image. -> (crop, x offset, y offset)."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box)
    bw, bh = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    mx = max(context * bw, (min_size - bw) / 2, 0)
    my = max(context * bh, (min_size - bh) / 2, 0)
    cx1, cy1 = int(max(0, math.floor(x1 - mx))), int(max(0, math.floor(y1 - my)))
    cx2, cy2 = int(min(w, math.ceil(x2 + mx))), int(min(h, math.ceil(y2 + my)))
    if cx2 <= cx1 or cy2 <= cy1:  # a box outside the image: show the whole image
        return image, 0, 0
    return image[cy1:cy2, cx1:cx2], cx1, cy1


def save_rgb(path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write image {path}")


def png_bytes(image: np.ndarray) -> bytes:
    """An RGB image encoded as PNG."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("cannot encode image as PNG")
    return buf.tobytes()


# -- figures -------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def figure_png(fig, dpi: int = 100) -> bytes:
    """A matplotlib figure rendered to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_figure(fig, path, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(figure_png(fig, dpi))
    return path


def _mpl_color(color: Color) -> Tuple[float, float, float]:
    return (color[0] / 255, color[1] / 255, color[2] / 255)


def dataset_figures(
    class_names: Sequence[str],
    labels: np.ndarray,
    boxes_per_image: np.ndarray,
    sizes: np.ndarray,
    ratios: np.ndarray,
    size_units: str = "original pixels",
    anchor_sizes: Optional[Sequence[float]] = None,
    anchor_ratios: Optional[Sequence[float]] = None,
    title: str = "",
) -> Dict[str, object]:
    """Histograms of a dataset: objects per class, boxes per image, box sizes sqrt(w h) and
    aspect ratios h / w; the anchor sizes and ratios (when given) as vertical lines on the
    last two, so a user sees whether the anchors cover the boxes.

    labels (B,) in 1..K; boxes_per_image (N,); sizes, ratios (B,).
    -> {"objects_per_class", "boxes_per_image", "box_sizes", "aspect_ratios": Figure}."""
    figs: Dict[str, object] = {}
    prefix = f"{title}: " if title else ""

    fig = _figure(max(4.0, 1.0 + 0.6 * len(class_names)), 3.2)
    ax = fig.add_subplot()
    counts = np.bincount(np.asarray(labels, np.int64), minlength=len(class_names) + 1)[1 : len(class_names) + 1]
    x = np.arange(len(class_names))
    ax.bar(x, counts, color=[_mpl_color(class_color(int(k) + 1)) for k in x])
    ax.set_xticks(
        x, list(class_names), rotation=30 if len(class_names) > 6 else 0, ha="right" if len(x) > 6 else "center"
    )
    for xi, c in zip(x, counts):
        ax.annotate(str(int(c)), (xi, c), ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="objects", title=f"{prefix}objects per class")
    figs["objects_per_class"] = fig

    fig = _figure(4.5, 3.2)
    ax = fig.add_subplot()
    bpi = np.asarray(boxes_per_image, np.int64)
    top = int(bpi.max()) if len(bpi) else 0
    ax.hist(bpi, bins=np.arange(-0.5, top + 1.5, 1.0), color="0.45", rwidth=0.9)
    ax.set(xlabel="boxes in the image", ylabel="images", title=f"{prefix}boxes per image")
    figs["boxes_per_image"] = fig

    fig = _figure(5.5, 3.4)
    ax = fig.add_subplot()
    sizes = np.asarray(sizes, np.float64)
    sizes = sizes[sizes > 0]
    lo = min([sizes.min() if len(sizes) else 1.0] + list(anchor_sizes or []))
    hi = max([sizes.max() if len(sizes) else 2.0] + list(anchor_sizes or []))
    bins = np.geomspace(max(lo / 1.2, 0.5), hi * 1.2, 40)
    ax.hist(sizes, bins=bins, color="0.45", label="boxes")
    ax.set_xscale("log")
    for i, s in enumerate(anchor_sizes or []):
        ax.axvline(s, color="tab:red", linestyle="--", linewidth=1.2, label="anchor sizes" if i == 0 else None)
    ax.set(xlabel=f"box size sqrt(w h), {size_units}", ylabel="boxes", title=f"{prefix}box sizes")
    if anchor_sizes:
        ax.legend(fontsize=8)
    figs["box_sizes"] = fig

    fig = _figure(5.5, 3.4)
    ax = fig.add_subplot()
    ratios = np.asarray(ratios, np.float64)
    ratios = ratios[(ratios > 0) & np.isfinite(ratios)]
    lo = min([ratios.min() if len(ratios) else 0.5] + list(anchor_ratios or []))
    hi = max([ratios.max() if len(ratios) else 2.0] + list(anchor_ratios or []))
    ax.hist(ratios, bins=np.geomspace(lo / 1.2, hi * 1.2, 40), color="0.45", label="boxes")
    ax.set_xscale("log")
    for i, r in enumerate(anchor_ratios or []):
        ax.axvline(r, color="tab:red", linestyle="--", linewidth=1.2, label="anchor ratios" if i == 0 else None)
    ax.set(xlabel="aspect ratio h / w", ylabel="boxes", title=f"{prefix}aspect ratios")
    if anchor_ratios:
        ax.legend(fontsize=8)
    figs["aspect_ratios"] = fig
    return figs


# Which panels the training-curve figure has, in order, and which record keys go in each.
def curve_panels(keys: Iterable[str]) -> List[Tuple[str, List[str]]]:
    """From the metric keys present in the runs: [(panel title, [train key, val key...])].
    Panels: total loss (train ``loss`` and validation ``val_loss``), one per loss term
    (``loss_*`` with its ``val_loss_*``), learning rate, eval mAP."""
    present = set(keys)
    panels: List[Tuple[str, List[str]]] = []
    if "loss" in present or "val_loss" in present:
        panels.append(("loss (train vs validation)", ["loss", "val_loss"]))
    terms = sorted(
        {k for k in present if k.startswith("loss_")} | {k[4:] for k in present if k.startswith("val_loss_")}
    )
    for term in terms:
        panels.append((term, [term, f"val_{term}"]))
    if "lr" in present:
        panels.append(("learning rate", ["lr"]))
    if "eval_mAP" in present:
        panels.append(("eval mAP", ["eval_mAP"]))
    return panels


def training_curves_figure(runs: Mapping[str, Sequence[Mapping]], title: str = ""):
    """One figure of the training curves of several runs, overlaid (one colour per run).

    runs: run name -> its metrics records (dicts with "iter" and numeric keys, as in
    metrics.jsonl). Training values are solid lines, validation values (``val_*``) dashed
    with markers, eval mAP solid with markers."""
    keys = {k for records in runs.values() for r in records for k in r}
    panels = curve_panels(keys)
    if not panels:
        raise ValueError("no loss, learning rate or mAP values to plot")
    ncols = min(3, len(panels))
    nrows = int(math.ceil(len(panels) / ncols))
    fig = _figure(4.2 * ncols, 3.0 * nrows + (0.4 if title else 0))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (panel, panel_keys) in zip(axes, panels):
        for (name, records), color in zip(runs.items(), colors):
            for key in panel_keys:
                pts = [(r["iter"], r[key]) for r in records if key in r and "iter" in r]
                if not pts:
                    continue
                it, val = zip(*pts)
                val_key = key.startswith("val_") or key == "eval_mAP"
                label = name if len(runs) > 1 or not val_key else None
                if key.startswith("val_"):
                    label = f"{name} (val)" if len(runs) > 1 else "validation"
                elif len(runs) == 1 and panel_keys[0] == "loss":
                    label = "train"
                ax.plot(
                    it,
                    val,
                    color=color,
                    linestyle="--" if key.startswith("val_") else "-",
                    marker="o" if val_key else None,
                    markersize=3,
                    linewidth=1.2,
                    label=label,
                )
        ax.set(title=panel, xlabel="iteration")
        if panel == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if panel == "eval mAP":
            ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0] and (ax is axes[0] or len(runs) > 1 and panel == "eval mAP"):
            ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


def pr_curves_figure(pr: Mapping[str, Tuple[np.ndarray, np.ndarray]], aps: Mapping[str, float], title: str = ""):
    """Precision-recall curves of every class in one plot (class colours, AP in the legend).
    ``pr``: class name -> (recall (D,), precision (D,)) in descending-score order."""
    fig = _figure(5.0, 4.0)
    ax = fig.add_subplot()
    for k, (name, (recall, precision)) in enumerate(pr.items(), start=1):
        if len(recall) == 0:
            continue
        ap = aps.get(name, float("nan"))
        ap_text = "n/a" if ap is None or math.isnan(ap) else f"{ap:.3f}"
        ax.plot(recall, precision, drawstyle="steps-post", color=_mpl_color(class_color(k)), label=f"{name} {ap_text}")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=title or "precision / recall")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower left")
    return fig


def confusion_matrix_figure(matrix: np.ndarray, class_names: Sequence[str], title: str = ""):
    """(K+1, K+1) counts: rows ground truth (classes, then "background" = spurious
    detections), columns predictions (classes, then "missed")."""
    matrix = np.asarray(matrix)
    k = len(class_names)
    n = k + 1
    fig = _figure(1.6 + 0.7 * n, 1.2 + 0.6 * n)
    ax = fig.add_subplot()
    ax.imshow(np.log1p(matrix), cmap="Blues")
    rows = list(class_names) + ["background"]
    cols = list(class_names) + ["missed"]
    ax.set_xticks(range(n), cols, rotation=30, ha="right")
    ax.set_yticks(range(n), rows)
    vmax = np.log1p(matrix).max() if matrix.size else 0
    for i in range(n):
        for j in range(n):
            v = int(matrix[i, j])
            dark = vmax > 0 and np.log1p(v) > 0.6 * vmax
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set(xlabel="detected as", ylabel="ground truth", title=title or "confusion matrix")
    return fig


ERROR_LABELS = {
    "localization": "localisation",
    "classification": "similar class",
    "duplicate": "duplicate",
    "background": "background",
    "missed": "missed",
}


def error_breakdown_figure(counts: Mapping[str, int], dap: Optional[Mapping[str, float]] = None, title: str = ""):
    """Bars of the error counts per type and, when given, the mAP gained by fixing each type."""
    types = list(counts)
    labels = [ERROR_LABELS.get(t, t) for t in types]
    ncols = 2 if dap else 1
    fig = _figure(4.2 * ncols, 3.2)
    axes = fig.subplots(1, ncols, squeeze=False).ravel()
    colors = [f"C{i}" for i in range(len(types))]
    ax = axes[0]
    ax.barh(labels, [counts[t] for t in types], color=colors)
    ax.invert_yaxis()
    ax.set(xlabel="count", title="errors")
    ax.margins(x=0.18)
    for i, t in enumerate(types):
        ax.annotate(f" {counts[t]}", (counts[t], i), va="center", fontsize=8)
    if dap:
        ax = axes[1]
        vals = [100 * float(dap.get(t, 0.0)) for t in types]
        ax.barh(labels, vals, color=colors)
        ax.invert_yaxis()
        ax.set(xlabel="mAP points gained by fixing", title="dAP")
        ax.margins(x=0.18)
        for i, v in enumerate(vals):
            ax.annotate(f" {v:.2f}", (v, i), va="center", fontsize=8)
    if title:
        fig.suptitle(title)
    return fig
