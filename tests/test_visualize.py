"""Drawing: boxes where they are said to be and nowhere else, dashed ground truth, labels
that stay inside the image and grow with it, contact sheets, and the figures."""

import numpy as np
import pytest

from detkit.visualize import (
    PALETTE,
    box_pixels,
    class_color,
    confusion_matrix_figure,
    contact_sheet,
    curve_panels,
    dataset_figures,
    draw_boxes,
    draw_detections,
    draw_ground_truth,
    draw_style,
    error_breakdown_figure,
    figure_png,
    label_rect,
    training_curves_figure,
)

GREY = (128, 128, 128)


def grey(h, w):
    return np.full((h, w, 3), GREY, np.uint8)


def color_mask(image, color):
    return (image == np.array(color, np.uint8)).all(axis=2)


def outline_mask(h, w, box):
    x1, y1, x2, y2 = box_pixels(box, h, w)
    m = np.zeros((h, w), bool)
    m[y1, x1 : x2 + 1] = m[y2, x1 : x2 + 1] = True
    m[y1 : y2 + 1, x1] = m[y1 : y2 + 1, x2] = True
    return m


def rect_mask(h, w, rect):
    x0, y0, x1, y1 = rect
    m = np.zeros((h, w), bool)
    m[y0 : y1 + 1, x0 : x1 + 1] = True
    return m


def test_box_pixels_are_the_boxes_own_pixels():
    # A VOC box xmin=11..xmax=30 (1-based) is (10, y, 30, y) in detkit: 0-based columns 10..29.
    assert box_pixels([10, 5, 30, 25], 100, 100) == (10, 5, 29, 24)
    # Touching the border: the outline stays on the last pixel, inside the image.
    assert box_pixels([0, 0, 100, 50], 50, 100) == (0, 0, 99, 49)
    assert box_pixels([-5, -5, 200, 200], 50, 100) == (0, 0, 99, 49)


def test_detection_outline_in_class_colour_and_nowhere_else():
    h, w = 120, 160
    box = [30.0, 40.0, 90.0, 100.0]
    out = draw_detections(grey(h, w), np.array([box]), np.array([0.9]), np.array([2]), ["a", "b"])
    colour = color_mask(out, class_color(2))
    outline = outline_mask(h, w, box)
    style = draw_style(h, w)
    assert style.thickness == 1
    label, _, _ = label_rect("b 0.90", box, h, w, style)
    lab = rect_mask(h, w, label)
    # Every outline pixel not under the label is the class colour ...
    assert colour[outline & ~lab].all()
    # ... and the colour appears only on the outline and the label's background.
    assert not (colour & ~outline & ~lab).any()
    # The label sits above the box's top-left corner, touching it.
    assert label[0] == 30 and label[3] == 39
    # Class 1's colour does not appear at all.
    assert not color_mask(out, class_color(1)).any()


def test_dashed_outline_has_gaps_and_solid_has_none():
    h, w = 200, 200
    box = [20.0, 20.0, 180.0, 180.0]
    solid = draw_ground_truth(grey(h, w), np.array([box]), np.array([1]), ["a"], difficult=np.array([False]))
    dashed = draw_ground_truth(grey(h, w), np.array([box]), np.array([1]), ["a"], difficult=np.array([True]))
    c = class_color(1)
    # Bottom edge (row 179), away from the label: solid is all colour, dashed about half.
    assert color_mask(solid, c)[179, 20:180].all()
    frac = color_mask(dashed, c)[179, 20:180].mean()
    assert 0.35 < frac < 0.7


def test_ground_truth_under_detections_dashed():
    h, w = 100, 100
    gt = np.array([[10.0, 10.0, 60.0, 60.0]])
    out = draw_detections(grey(h, w), np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), ["a"], gt, np.array([1]))
    edge = color_mask(out, class_color(1))[59, 10:60]  # bottom edge of the ground truth
    assert 0.3 < edge.mean() < 0.8  # dashed
    # Without ground truth nothing is drawn.
    out = draw_detections(grey(h, w), np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), ["a"])
    assert (out == GREY).all()


@pytest.mark.parametrize("size", [(150, 150), (150, 400), (3000, 4000)])
@pytest.mark.parametrize("corner", ["tl", "tr", "bl", "br", "full"])
def test_labels_stay_inside_the_image(size, corner):
    h, w = size
    s = min(h, w) // 5
    boxes = {
        "tl": [0, 0, s, s],
        "tr": [w - s, 0, w, s],
        "bl": [0, h - s, s, h],
        "br": [w - s, h - s, w, h],
        "full": [0, 0, w, h],
    }
    style = draw_style(h, w)
    (x0, y0, x1, y1), origin, scale = label_rect("a_rather_long_class_name 0.99", boxes[corner], h, w, style)
    assert 0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h
    assert x0 <= origin[0] and origin[1] <= y1


def test_label_size_grows_with_the_image():
    small, large = draw_style(150, 150), draw_style(3000, 4000)
    (_, y0s, _, y1s), _, _ = label_rect("cat 0.9", [10, 50, 60, 100], 150, 150, small)
    (_, y0l, _, y1l), _, _ = label_rect("cat 0.9", [100, 500, 600, 1000], 3000, 4000, large)
    # Legible on a thumbnail (>= 10 px of text box), not lost on a photo (>= 2 % of its height).
    assert y1s - y0s + 1 >= 10
    assert y1l - y0l + 1 >= 0.02 * 3000
    assert large.thickness >= 8 and small.thickness == 1


def test_a_label_wider_than_the_image_shrinks():
    style = draw_style(150, 150)
    (x0, _, x1, _), _, scale = label_rect("x" * 60, [0, 50, 20, 70], 150, 150, style)
    assert scale < style.font_scale and 0 <= x0 <= x1 < 150


def test_lowest_score_drawn_first():
    # Two overlapping boxes: where their outlines cross, the higher-scoring one is on top.
    out = draw_boxes(
        grey(100, 100),
        np.array([[10, 10, 60, 60], [30, 30, 80, 80]], float),
        np.array([1, 2]),
        ["a", "b"],
        scores=np.array([0.9, 0.3]),
        show_labels=False,
    )
    # (row 30, col 59): box 1's right edge crosses box 2's top edge.
    assert tuple(out[30, 59]) == class_color(1)


def test_contact_sheet_layout():
    imgs = [grey(50, 80), grey(80, 50), grey(30, 30)]
    sheet = contact_sheet(imgs, ["a", "b", "c"], cell=(100, 80), cols=2, gap=4, legend=[("x", PALETTE[0])])
    assert sheet.dtype == np.uint8 and sheet.shape[2] == 3
    assert sheet.shape[1] == 2 * 100 + 3 * 4
    # Two rows of cells: the sheet is taller than two cells and the captions.
    assert sheet.shape[0] > 2 * 80
    assert color_mask(sheet, PALETTE[0]).any()  # the legend swatch


def test_curve_panels():
    keys = ["iter", "lr", "loss", "loss_cls", "loss_box", "val_loss", "val_loss_cls", "eval_mAP", "s_per_iter"]
    panels = dict(curve_panels(keys))
    assert list(panels) == ["loss (train vs validation)", "loss_box", "loss_cls", "learning rate", "eval mAP"]
    assert panels["loss_cls"] == ["loss_cls", "val_loss_cls"]


def test_figures_render_to_png():
    records = [
        {"iter": 20, "lr": 0.01, "loss": 1.0, "loss_cls": 0.6},
        {"iter": 40, "lr": 0.02, "loss": 0.8, "loss_cls": 0.5},
        {"iter": 40, "eval_mAP": 0.3, "val_loss": 0.9, "val_loss_cls": 0.55},
    ]
    figs = [
        training_curves_figure({"a": records, "b": records[:2]}),
        confusion_matrix_figure(np.array([[3, 1, 1], [0, 2, 0], [4, 1, 0]]), ["x", "y"]),
        error_breakdown_figure({"localization": 2, "missed": 1}, {"localization": 0.1, "missed": 0.05}),
    ]
    figs += list(
        dataset_figures(
            ["x", "y"],
            np.array([1, 1, 2]),
            np.array([2, 1, 0]),
            np.array([10.0, 20.0, 40.0]),
            np.array([0.5, 1.0, 2.0]),
            anchor_sizes=[16, 32],
            anchor_ratios=[0.5, 1, 2],
        ).values()
    )
    for fig in figs:
        assert figure_png(fig).startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="nothing|no loss"):
        training_curves_figure({"a": [{"iter": 1, "s_per_iter": 0.1}]})


def test_label_under_a_box_at_the_top_edge():
    # No room above: the label goes under the box, so the outline stays visible.
    style = draw_style(150, 150)
    (x0, y0, x1, y1), _, _ = label_rect("a 0.50", [10, 0, 60, 30], 150, 150, style)
    assert (x0, y0) == (10, 30)
    # No room above or below (the box fills the image): inside its top.
    (x0, y0, x1, y1), _, _ = label_rect("a 0.50", [0, 0, 150, 150], 150, 150, style)
    assert (x0, y0) == (0, 0)


def test_labels_of_neighbouring_boxes_do_not_overlap():
    # Two boxes side by side with long labels: the second label moves (under its box).
    h, w = 150, 150
    boxes = np.array([[10, 40, 60, 90], [40, 45, 100, 95]], float)
    scores = np.array([0.9, 0.8])
    out = draw_boxes(grey(h, w), boxes, np.array([1, 2]), ["circle", "triangle"], scores=scores)
    style = draw_style(h, w)
    first, _, _ = label_rect("circle 0.90", boxes[0], h, w, style)
    second, _, _ = label_rect("triangle 0.80", boxes[1], h, w, style, avoid=[first])
    assert second[1] > boxes[1][3] - 1  # under the box
    x0, y0, x1, y1 = first
    u0, v0, u1, v1 = second
    assert x1 < u0 or u1 < x0 or y1 < v0 or v1 < y0
    # Both labels are drawn where placed: their backgrounds carry the class colours.
    assert color_mask(out, class_color(1))[y0 : y1 + 1, x0 : x1 + 1].mean() > 0.5
    assert color_mask(out, class_color(2))[v0 : v1 + 1, u0 : u1 + 1].mean() > 0.5
