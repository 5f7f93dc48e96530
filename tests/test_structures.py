"""Geometry (the one record of what the data pipeline did) and Target, with hand-computed
boxes."""

import pytest
import torch

from detkit.structures import Geometry, ImageList, Target


def test_geometry_apply_scales_each_axis_then_mirrors():
    # original 100x200 (h x w) -> input 50x300: sy = 0.5, sx = 1.5; then mirrored in width 300
    g = Geometry((100, 200), (50, 300))
    assert g.scale == (0.5, 1.5)
    box = torch.tensor([[10.0, 20.0, 110.0, 60.0]])
    torch.testing.assert_close(g.apply(box), torch.tensor([[15.0, 10.0, 165.0, 30.0]]))
    torch.testing.assert_close(g.mirrored().apply(box), torch.tensor([[135.0, 10.0, 285.0, 30.0]]))


def test_geometry_vertical_mirror_after_scaling():
    # the same 100x200 -> 50x300 record, mirrored in height 50: y1' = 50 - y2, y2' = 50 - y1
    g = Geometry((100, 200), (50, 300))
    box = torch.tensor([[10.0, 20.0, 110.0, 60.0]])
    torch.testing.assert_close(g.mirrored_vertically().apply(box), torch.tensor([[15.0, 20.0, 165.0, 40.0]]))
    both = g.mirrored().mirrored_vertically()
    torch.testing.assert_close(both.apply(box), torch.tensor([[135.0, 20.0, 285.0, 40.0]]))


@pytest.mark.parametrize("flipped, vflipped", [(False, False), (True, False), (False, True), (True, True)])
def test_geometry_invert_undoes_apply(flipped, vflipped):
    g = Geometry((371, 500), (799, 1078), flipped, vflipped)
    box = torch.tensor([[3.5, 7.25, 100.0, 200.5], [0.0, 0.0, 500.0, 371.0]])
    torch.testing.assert_close(g.invert(g.apply(box)), box, rtol=1e-6, atol=1e-4)


def test_geometry_invert_uses_float32_ratios_like_torchvision():
    # torchvision's resize_boxes: ratio = tensor(orig, float32) / tensor(resized, float32)
    g = Geometry((371, 500), (799, 1078))
    box = torch.tensor([[123.4567, 89.0123, 456.789, 700.001]])
    rw = torch.tensor(500, dtype=torch.float32) / torch.tensor(1078, dtype=torch.float32)
    rh = torch.tensor(371, dtype=torch.float32) / torch.tensor(799, dtype=torch.float32)
    assert torch.equal(g.invert(box), box * torch.stack([rw, rh, rw, rh]))


def test_geometry_composes_resizes_and_refuses_resizing_after_a_flip():
    g = Geometry.identity(40, 60).resized(80, 120).resized(20, 30)
    assert g == Geometry((40, 60), (20, 30), False) and g.scale == (0.5, 0.5)
    assert g.mirrored().mirrored() == g
    assert g.mirrored_vertically().mirrored_vertically() == g
    with pytest.raises(ValueError, match="after a flip"):
        g.mirrored().resized(10, 10)
    with pytest.raises(ValueError, match="after a flip"):
        g.mirrored_vertically().resized(10, 10)


def test_imagelist_without_geometries_means_originals():
    images = ImageList(torch.zeros(2, 3, 8, 8), [(8, 8), (6, 4)])
    assert images.geometry(1) == Geometry((6, 4), (6, 4))


def test_target_defaults_and_device_move():
    t = Target(torch.zeros(2, 4), torch.tensor([1, 2]))
    assert t.difficult.tolist() == [False, False] and len(t) == 2 and t.geometry is None
    moved = t.to("cpu")
    assert moved.labels.tolist() == [1, 2] and moved.difficult.dtype == torch.bool
