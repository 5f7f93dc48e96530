"""SPP-net's spatial pyramid pooler and R-CNN's warped crops, against hand computations."""

import pytest
import torch

from detkit.modeling.poolers import SPPPooler, WarpPooler, context_windows, spp_project


def test_spp_projection_follows_the_paper():
    # 1-based: left = floor(x / 16) + 1, right = ceil(x / 16) - 1; detkit's box (x1, x2) covers
    # VOC pixels x1 + 1 .. x2. Whole 224 image: pixels 1..224 -> cells 1..13 (0-based 0..12).
    boxes = torch.tensor(
        [
            [0.0, 0.0, 224.0, 224.0],
            [31.0, 47.0, 95.0, 160.0],  # pixels 32..95 -> cells floor(32/16)+1=3 .. ceil(95/16)-1=5
            [40.0, 40.0, 44.0, 44.0],  # too small to span a cell: one cell kept
            [300.0, -20.0, 400.0, 30.0],  # off the map: clipped
        ]
    )
    cells = spp_project(boxes, 16, height=14, width=14)
    # 1-based cell c is 0-based c - 1: box 2's x cells 3..5 -> 2..4; y pixels 48..160 -> 4..9 -> 3..8
    expected = torch.tensor([[0.0, 0, 12, 12], [2, 3, 4, 8], [2, 2, 2, 2], [13, 0, 13, 0]])
    assert torch.equal(cells, expected)


def test_spp_bins_and_output_size_by_hand():
    # one channel whose cell (y, x) holds 100 y + x: the max of a bin is its bottom-right cell
    h = w = 14
    feature = (100 * torch.arange(h)[:, None] + torch.arange(w)[None, :]).float()[None, None]
    pooler = SPPPooler((3, 2, 1), stride=16)
    box = torch.tensor([[15.0, 15.0, 111.0, 95.0]])  # pixels 16..111 x 16..95
    # cells: x floor(16/16)+1=2 .. ceil(111/16)-1=6 -> 0-based 1..5 (w = 5);
    #        y 2 .. ceil(95/16)-1=5 -> 1..4 (h = 4)
    assert spp_project(box, 16, h, w).tolist() == [[1.0, 1.0, 5.0, 4.0]]
    out = pooler([feature], [box])
    assert out.shape == (1, 1 * (9 + 4 + 1)) and pooler.num_bins == 14
    # 3 bins over w = 5 cells: [floor(i*5/3), ceil((i+1)*5/3)) = [0,2), [1,4), [3,5) -> last cell 1, 3, 4;
    # over h = 4: [0,2), [1,3), [2,4) -> last cell 1, 2, 3; offsets: x0 = 1, y0 = 1
    xs, ys = [1 + 1, 1 + 3, 1 + 4], [1 + 1, 1 + 2, 1 + 3]
    level3 = [100 * y + x for y in ys for x in xs]
    # 2 bins: x [0,3), [2,5) -> 2, 4; y [0,2), [2,4) -> 1, 3
    level2 = [100 * y + x for y in (1 + 1, 1 + 3) for x in (1 + 2, 1 + 4)]
    level1 = [100 * 4 + 5]
    assert out[0].tolist() == [float(v) for v in level3 + level2 + level1]


def test_spp_paper_levels_give_50_bins_per_channel():
    pooler = SPPPooler()  # {6, 3, 2, 1}
    feats = torch.randn(2, 8, 20, 30)
    boxes = [torch.tensor([[0.0, 0, 100, 100], [10, 20, 400, 300]]), torch.zeros(0, 4)]
    assert pooler([feats], boxes).shape == (2, 8 * 50)
    with pytest.raises(ValueError, match="positive bin counts"):
        SPPPooler((6, 0))


def test_context_window_leaves_16_pixels_at_227():
    box = torch.tensor([[100.0, 50.0, 295.0, 245.0]])  # 195 x 195: warps at scale 1
    (window,) = context_windows(box, 227, 16)
    assert window.tolist() == pytest.approx([84.0, 34.0, 311.0, 261.0])  # 16 px each side
    # a non-square box: each axis dilated by 227/195
    (window,) = context_windows(torch.tensor([[0.0, 0.0, 39.0, 78.0]]), 227, 16)
    f = 227 / 195
    assert window.tolist() == pytest.approx([19.5 - 19.5 * f, 39 - 39 * f, 19.5 + 19.5 * f, 39 + 39 * f])


def test_warp_samples_the_window_and_pads_with_the_mean():
    # image value = x coordinate of the pixel centre (x + 0.5) in channel 0, y + 0.5 in channel 1
    h, w = 20, 40
    img = torch.zeros(1, 3, h, w)
    img[0, 0] = torch.arange(w).float()[None, :] + 0.5
    img[0, 1] = torch.arange(h).float()[:, None] + 0.5
    img[0, 2] = 1.0
    pooler = WarpPooler(size=8, context=2)  # windows grow by 8 / 4 = 2x
    box = torch.tensor([[8.0, 4.0, 16.0, 12.0]])  # 8 x 8 -> window [4, 0, 20, 16]
    crop = pooler([img], [box])
    assert crop.shape == (1, 3, 8, 8)
    # output pixel u samples x = 4 + (u + 0.5) * 16 / 8, linear in x: exact under bilinear
    torch.testing.assert_close(crop[0, 0, 0], torch.tensor([5.0 + 2 * u for u in range(8)]))
    torch.testing.assert_close(crop[0, 1, :, 0], torch.tensor([1.0 + 2 * u for u in range(8)]))
    # a box at the image border: the part of the window outside is the mean (0)
    border = torch.tensor([[0.0, 0.0, 8.0, 8.0]])  # window [-4, -4, 12, 12]
    crop = pooler([img], [border])
    # output pixels u = 0, 1 sample x = -3, -1: outside the image (beyond the half-pixel
    # edge) -> 0; u = 2 samples x = 1 (inside)
    assert crop[0, 2, 0, 0] == 0.0 and crop[0, 2, 3, 0] == 0.0 and crop[0, 2, 3, 3] == 1.0
    assert crop[0, 2, 4:, 4:].eq(1.0).all()


def test_warp_batches_images_and_keeps_order():
    imgs = torch.stack([torch.full((3, 10, 10), 1.0), torch.full((3, 10, 10), 2.0)])
    boxes = [torch.tensor([[2.0, 2, 8, 8]]), torch.tensor([[1.0, 1, 9, 9], [3.0, 3, 6, 6]])]
    crops = WarpPooler(size=6, context=0)([imgs], boxes)
    assert crops.shape == (3, 3, 6, 6)
    assert crops[0].eq(1.0).all() and crops[1:].eq(2.0).all()
    assert WarpPooler(6, 0)([imgs], [torch.zeros(0, 4), torch.zeros(0, 4)]).shape == (0, 3, 6, 6)
    with pytest.raises(ValueError, match="need 0 <= 2 \\* context < size"):
        WarpPooler(size=10, context=5)
