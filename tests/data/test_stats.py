"""Box statistics in network-input pixels and the anchor-fit measure of `detkit data check --plots`."""

import numpy as np
import pytest

from detkit.data.stats import anchor_shapes, best_anchor_iou, box_stats
from detkit.structures import ImageRecord


def records():
    return [
        # 400 x 200 image: to shorter side 400 (max 1333) the scale is 2.
        ImageRecord("a", "a.png", 400, 200, [[0, 0, 50, 25], [10, 10, 20, 50]], [1, 2], [False, True]),
        # 3000 x 1000: shorter side 400 would make the longer 1200 <= 1333: scale 0.4.
        ImageRecord("b", "b.png", 3000, 1000, [[0, 0, 100, 100]], [1], [False]),
        ImageRecord("c", "c.png", 64, 64),  # no objects
    ]


def test_box_stats_in_network_input_pixels():
    s = box_stats(records(), min_size=400, max_size=1333)
    assert s.units == "network-input pixels"
    np.testing.assert_allclose(s.width, [100, 20, 40])
    np.testing.assert_allclose(s.height, [50, 80, 40])
    np.testing.assert_allclose(s.sizes, [np.sqrt(5000), 40, 40])
    np.testing.assert_allclose(s.ratios, [0.5, 4.0, 1.0])
    assert s.labels.tolist() == [1, 2, 1] and s.boxes_per_image.tolist() == [2, 1, 0]
    # The longer side caps the scale: 3000 x 1000 at max_size 600 -> 0.2.
    assert box_stats(records()[1:2], 400, 600).width.tolist() == pytest.approx([20.0])
    # Without a config: original pixels.
    o = box_stats(records())
    assert o.units == "original pixels" and o.width.tolist() == [50, 10, 100]


def test_anchor_shapes_and_fit():
    # One size per level, ratios shared: w = s / sqrt(r), h = s sqrt(r).
    shapes = anchor_shapes([[32], [64]], [[0.5, 1.0, 2.0]])
    assert len(shapes) == 6
    assert any(np.allclose(sh, [32 / np.sqrt(0.5), 32 * np.sqrt(0.5)]) for sh in shapes)
    w = np.array([64 / np.sqrt(2) * 2, 32.0, 10.0, 32.0])
    h = np.array([32 / np.sqrt(2) * 2, 32.0, 10.0, 128.0])
    best = best_anchor_iou(w, h, shapes)
    # A box equal to an anchor: 1; a 10x10 box against the 32x32 anchor: 100 / 1024;
    # a 32x128 box's best is the 45x90 (64, ratio 2) anchor: (32*90.5) / (32*128 + 45.25*90.5 - 32*90.5).
    assert best[0] == pytest.approx(1.0) and best[1] == pytest.approx(1.0)
    assert best[2] == pytest.approx(100 / 1024)
    aw, ah = 64 / np.sqrt(2), 64 * np.sqrt(2)
    expected = (32 * ah) / (32 * 128 + aw * ah - 32 * ah)
    assert best[3] == pytest.approx(expected)
