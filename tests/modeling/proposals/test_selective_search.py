"""Selective Search: segmentation wrapper, adjacency, descriptors, similarities, grouping,
ranking and recall on drawn shapes. Expectations are computed by hand in the comments."""

import cv2
import numpy as np
import pytest
from skimage.segmentation import felzenszwalb

from detkit.modeling.proposals.selective_search import (
    Regions,
    SelectiveSearchError,
    Strategy,
    group_regions,
    hierarchical_grouping,
    parse_similarity,
    rank_boxes,
    region_features,
    selective_search,
    strategies_for_mode,
)
from detkit.modeling.proposals.selective_search import search as search_module
from detkit.modeling.proposals.selective_search.features import (
    colour_histograms,
    fill_similarity,
    histogram_intersection,
    size_similarity,
    texture_bin_index,
    texture_histograms,
)
from detkit.modeling.proposals.selective_search.grouping import CTSF, TSF
from detkit.modeling.proposals.selective_search.segmentation import (
    check_label_map,
    convert_colour,
    initial_regions,
    pixel_graph,
    region_adjacency,
    region_boxes,
    relabel,
    segment_graph,
    smooth_for_segmentation,
)

QUADRANT_COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]


def quadrant_image(size=40):
    image = np.zeros((size, size, 3), np.uint8)
    half = size // 2
    for (y, x), colour in zip([(0, 0), (0, half), (half, 0), (half, half)], QUADRANT_COLOURS):
        image[y : y + half, x : x + half] = colour
    return image


def quadrant_labels_match(labels, size=40, margin=0):
    """Each quadrant (shrunk by ``margin``) holds one label and the 4 labels differ."""
    half = size // 2
    seen = []
    for y, x in [(0, 0), (0, half), (half, 0), (half, half)]:
        patch = labels[y + margin : y + half - margin, x + margin : x + half - margin]
        values = np.unique(patch)
        if len(values) != 1:
            return False
        seen.append(int(values[0]))
    return len(set(seen)) == 4


# --- segmentation ----------------------------------------------------------------------


def test_initial_regions_recovers_flat_quadrants_exactly_without_smoothing():
    labels = initial_regions(quadrant_image(), k=100, sigma=0.0)
    assert labels.shape == (40, 40)
    assert labels.max() + 1 == 4
    assert quadrant_labels_match(labels)


@pytest.mark.parametrize("space", ["RGB", "HSV", "Lab"])
def test_initial_regions_quadrant_interiors_with_paper_smoothing(space):
    # sigma = 0.8 blends the two pixels next to a boundary; those may join either side (or,
    # at k=50, stay a thin region), but every quadrant's interior is one region of its own.
    labels = initial_regions(convert_colour(quadrant_image(), space), k=50)
    assert quadrant_labels_match(labels, margin=2)
    assert np.array_equal(np.unique(labels), np.arange(labels.max() + 1))


def test_initial_regions_matches_skimage_felzenszwalb_with_paper_parameters():
    # The wrapper smooths once (so thresholds can share it) and must give skimage's own
    # result for sigma = 0.8, scale = k and min_size = k.
    rng = np.random.default_rng(0)
    image = quadrant_image(48)
    image = np.clip(image + rng.normal(0, 15, image.shape), 0, 255).astype(np.uint8)
    for k in (50, 150):
        expected = felzenszwalb(image, scale=k, sigma=0.8, min_size=k)
        assert np.array_equal(initial_regions(image, k=k), expected)


def test_initial_regions_min_size_defaults_to_k():
    image = quadrant_image()
    image[5:8, 5:8] = (0, 0, 0)  # a 9-pixel blob inside the first quadrant
    # min_size = k = 50 > 9 pixels: the blob is absorbed, 4 regions remain
    assert initial_regions(image, k=50, sigma=0.0).max() + 1 == 4
    # min_size = 1 keeps it: 5 regions, the blob exactly
    labels = initial_regions(image, k=50, sigma=0.0, min_size=1)
    assert labels.max() + 1 == 5
    blob = labels == labels[6, 6]
    assert blob.sum() == 9 and blob[5:8, 5:8].all()


def test_segment_graph_hand_computed_merges():
    # One row of three grey pixels 0, 10, 200 without smoothing: edge weights (in 0..1 units)
    # a = 10/255 between pixels 0-1 and b = 190/255 between 1-2; k enters as k/255.
    # MInt of a single pixel is k/255; after 0+1 join, MInt({0,1}) = a + k/255/2.
    graph = pixel_graph(smooth_for_segmentation(np.array([[0, 10, 200]], np.uint8), sigma=0.0))
    assert graph.weights.tolist() == pytest.approx([10 / 255, 190 / 255])
    # k=20: a < 20/255 joins 0+1; b = 190/255 >= min(10/255 + 10/255, 20/255): pixel 2 alone
    assert segment_graph(graph, 20, min_size=1).tolist() == [[0, 0, 1]]
    # k=200: b vs min(10/255 + 100/255, 200/255) = 110/255: still apart
    assert segment_graph(graph, 200, min_size=1).tolist() == [[0, 0, 1]]
    # k=400: b < min(10/255 + 200/255, 400/255) = 210/255: one region
    assert segment_graph(graph, 400, min_size=1).tolist() == [[0, 0, 0]]
    # k=20 with min_size=2: the 1-pixel region joins its neighbour in post-processing
    assert segment_graph(graph, 20, min_size=2).tolist() == [[0, 0, 0]]
    # labels are numbered in raster order of each region's first pixel
    flipped = pixel_graph(smooth_for_segmentation(np.array([[200, 10, 0]], np.uint8), sigma=0.0))
    assert segment_graph(flipped, 20, min_size=1).tolist() == [[0, 1, 1]]


def test_pixel_graph_has_every_8_neighbour_edge_once_sorted():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (3, 4, 3)).astype(np.uint8)
    smoothed = smooth_for_segmentation(image, sigma=0.0)
    graph = pixel_graph(smoothed)
    # 4HW - 3H - 3W + 2 = 48 - 9 - 12 + 2 = 29 edges: 9 right, 8 down, 6 + 6 diagonal
    assert len(graph.weights) == len(graph.first) == len(graph.second) == 29
    assert np.all(np.diff(graph.weights) >= 0)
    expected = set()
    for y in range(3):
        for x in range(4):
            for dy, dx in ((0, 1), (1, 0), (1, 1), (-1, 1)):
                if 0 <= y + dy < 3 and 0 <= x + dx < 4:
                    expected.add(frozenset((y * 4 + x, (y + dy) * 4 + x + dx)))
    edges = [frozenset(pair) for pair in zip(graph.first.tolist(), graph.second.tolist())]
    assert len(set(edges)) == 29 and set(edges) == expected
    # each weight is the Euclidean distance of the two pixels' smoothed colours
    flat = smoothed.reshape(-1, 3)
    np.testing.assert_allclose(graph.weights, np.linalg.norm(flat[graph.first] - flat[graph.second], axis=1))


def textured_test_image(seed, size=(61, 83)):
    """Quadrants plus noise plus a few flat blocks: many equal edge weights (ties) as well
    as distinct ones, which is where a different edge order would show."""
    rng = np.random.default_rng(seed)
    image = cv2.resize(quadrant_image(48), size[::-1], interpolation=cv2.INTER_NEAREST)
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    image[5:25, 10:30] = (90, 90, 90)
    image[30:50, 40:75] = rng.integers(0, 4, (20, 35, 1)) * 60
    return image


@pytest.mark.parametrize("space", ["HSV", "Lab", "H", "I"])
def test_one_pixel_graph_per_image_equals_skimage_per_k(space):
    # The shared graph must give, at every k, scikit-image's felzenszwalb on the same
    # smoothed image (label maps identical, numbering included), with and without smoothing.
    for seed, sigma in ((0, 0.8), (1, 0.0)):
        smoothed = smooth_for_segmentation(convert_colour(textured_test_image(seed), space), sigma)
        graph = pixel_graph(smoothed)
        for k, min_size in ((50, 50), (100, 100), (150, 20), (300, 300), (37.5, 1)):
            expected = felzenszwalb(smoothed, scale=k, sigma=0, min_size=min_size, channel_axis=-1)
            assert np.array_equal(segment_graph(graph, k, min_size=min_size), expected), (seed, k)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (6, 1), (2, 2)])
def test_segment_graph_degenerate_shapes_equal_skimage(shape):
    image = np.random.default_rng(2).integers(0, 256, shape + (3,)).astype(np.uint8)
    smoothed = smooth_for_segmentation(image, sigma=0.0)
    expected = felzenszwalb(smoothed, scale=100, sigma=0, min_size=2, channel_axis=-1)
    assert np.array_equal(segment_graph(pixel_graph(smoothed), 100, min_size=2), expected)


def test_pixel_graph_rejects_bad_shapes():
    with pytest.raises(SelectiveSearchError, match=r"needs an \(H, W\[, C\]\) image, got shape \(0, 4, 3\)"):
        pixel_graph(np.zeros((0, 4, 3)))
    with pytest.raises(SelectiveSearchError, match="got shape"):
        pixel_graph(np.zeros(5))


def test_selective_search_boxes_equal_with_skimage_segmentation(monkeypatch):
    # End to end: the fast mode with the shared graphs gives the same ranked boxes and scores
    # as with scikit-image's felzenszwalb run per (colour space, k) on the same smoothed image.
    image, _ = draw_shapes(6, size=96)
    boxes, scores = selective_search(image, mode="fast", min_size=0)
    monkeypatch.setattr(search_module, "pixel_graph", lambda smoothed: smoothed)
    monkeypatch.setattr(
        search_module,
        "segment_graph",
        lambda smoothed, k, min_size: felzenszwalb(smoothed, scale=k, sigma=0, min_size=min_size, channel_axis=-1),
    )
    ref_boxes, ref_scores = selective_search(image, mode="fast", min_size=0)
    assert len(boxes) > 50
    assert np.array_equal(boxes, ref_boxes) and np.array_equal(scores, ref_scores)


def test_convert_colour_hand_values():
    pixel = np.array([[[51, 102, 102]]], np.uint8)
    # rgI: r = 51/255 * 255 = 51, g = 102, I = (51 + 102 + 102) / 3 = 85
    assert convert_colour(pixel, "rgI")[0, 0].tolist() == [51, 102, 85]
    red = np.array([[[255, 0, 0]]], np.uint8)
    assert convert_colour(red, "HSV")[0, 0].tolist() == [0, 255, 255]
    assert convert_colour(red, "H").shape == (1, 1, 1)
    grey = np.full((1, 1, 3), 77, np.uint8)
    assert convert_colour(grey, "I")[0, 0].tolist() == [77]
    # grey has no chroma: a*, b* sit at the 8-bit offset 128
    assert convert_colour(grey, "Lab")[0, 0, 1:].tolist() == [128, 128]
    black = np.zeros((1, 1, 3), np.uint8)
    assert convert_colour(black, "rgI")[0, 0].tolist() == [85, 85, 0]  # 1/3 each, no NaN
    with pytest.raises(SelectiveSearchError, match="unknown colour space 'XYZ'"):
        convert_colour(red, "XYZ")


# --- label-map geometry ----------------------------------------------------------------

LABELS = np.array(
    [
        [0, 0, 1, 1],
        [0, 2, 2, 1],
        [3, 3, 2, 1],
    ]
)


def test_region_adjacency_hand_made_map():
    # 4-neighbours: 0-1 (row 0), 0-2 (row 1 and column 1), 0-3 (column 0),
    # 1-2 (column 2 and row 1), 2-3 (row 2 and column 1); 1 and 3 never touch.
    assert region_adjacency(LABELS).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [2, 3]]


def test_region_adjacency_corner_contact_needs_8_connectivity():
    labels = np.array(
        [
            [0, 0, 1, 1],
            [0, 0, 1, 1],
            [2, 2, 3, 3],
            [2, 2, 3, 3],
        ]
    )
    assert region_adjacency(labels, 4).tolist() == [[0, 1], [0, 2], [1, 3], [2, 3]]
    # diagonals (1,1)-(2,2) and (1,2)-(2,1) add 0-3 and 1-2
    assert region_adjacency(labels, 8).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    with pytest.raises(SelectiveSearchError, match="connectivity must be 4 or 8"):
        region_adjacency(labels, 6)


def test_region_boxes_and_sizes_hand_made_map():
    # xyxy, exclusive ends: region 1 spans columns 2..3 and rows 0..2 -> (2, 0, 4, 3)
    assert region_boxes(LABELS, 4).tolist() == [[0, 0, 2, 2], [2, 0, 4, 3], [1, 1, 3, 3], [0, 2, 2, 3]]
    assert check_label_map(LABELS).tolist() == [3, 4, 3, 2]


def test_check_label_map_rejects_gaps_and_relabel_fixes_them():
    gappy = np.array([[0, 0, 5], [5, 7, 7]])
    with pytest.raises(SelectiveSearchError, match="label 1 is missing"):
        check_label_map(gappy)
    assert relabel(gappy).tolist() == [[0, 0, 1], [1, 2, 2]]


# --- descriptors and similarities ------------------------------------------------------


def test_colour_histograms_hand_values():
    # one channel, 25 bins of width 256/25: 0 and 10 -> bin 0, 128 -> bin 12, 255 -> bin 24
    image = np.array([[[0], [10], [128], [255]]], np.uint8)
    labels = np.array([[0, 0, 1, 1]])
    hist = colour_histograms(labels, 2, image)
    expected = np.zeros((2, 25))
    expected[0, 0] = 1.0
    expected[1, 12] = expected[1, 24] = 0.5
    np.testing.assert_allclose(hist, expected)


def test_colour_histograms_normalise_over_all_channels():
    image = np.array([[[0, 255], [0, 255]]], np.uint8)  # 1 x 2 pixels, 2 channels
    hist = colour_histograms(np.zeros((1, 2), np.int64), 1, image)
    assert hist.shape == (1, 50)
    # each channel's bin gets half of the unit mass: channel 0 bin 0, channel 1 bin 24
    assert hist[0, 0] == 0.5 and hist[0, 25 + 24] == 0.5 and hist.sum() == 1.0


def test_texture_bins_of_a_vertical_step_edge():
    image = np.zeros((16, 16, 1), np.uint8)
    image[:, 8:] = 255  # dark -> bright going right: Gx > 0 at the edge, Gy = 0 everywhere
    bins = texture_bin_index(image).reshape(8, 16, 16)  # 8 orientations x H x W
    # The steepest response sits between columns 7 and 8; orientations with a positive
    # x component (0, 45 and 315 degrees = maps 0, 1, 7) reach the top bin 9 there.
    for o in (0, 1, 7):
        assert bins[o, 8, 7:9].max() == 9
    # 90/270 degrees see no change (Gy = 0); 135, 180, 225 degrees point against the edge.
    for o in (2, 3, 4, 5, 6):
        assert bins[o].max() == 0
    assert bins[:, :, :3].max() == 0  # flat far from the edge: bin 0 for every orientation
    hist = texture_histograms(np.zeros((16, 16), np.int64), 1, image)
    assert hist.shape == (1, 80) and np.isclose(hist.sum(), 1.0)


def test_histogram_intersection_hand_values():
    a = np.array([0.5, 0.5, 0.0])
    b = np.array([0.25, 0.25, 0.5])
    assert histogram_intersection(a, b) == 0.5
    assert histogram_intersection(a, a) == 1.0
    assert histogram_intersection(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == 0.0
    # one against many (broadcast)
    np.testing.assert_allclose(histogram_intersection(a, np.stack([a, b])), [1.0, 0.5])


def test_size_and_fill_similarity_hand_values():
    assert size_similarity(30, 20, 100) == 0.5
    # LABELS: regions 0 (3 px, box (0,0,2,2)) and 1 (4 px, box (2,0,4,3)); image 12 px.
    # Their joint box (0,0,4,3) has 12 px, 12 - 3 - 4 = 5 px of gap: 1 - 5/12 = 7/12.
    assert np.isclose(fill_similarity([0, 0, 2, 2], [2, 0, 4, 3], 3, 4, 12), 7 / 12)
    # regions 2 (3 px, (1,1,3,3)) and 3 (2 px, (0,2,2,3)): box (0,1,3,3) = 6 px, gap 1
    assert np.isclose(fill_similarity([1, 1, 3, 3], [0, 2, 2, 3], 3, 2, 12), 1 - 1 / 12)


# --- hierarchical grouping -------------------------------------------------------------


def chain_regions():
    """Four regions in a row, 0-1-2-3, with 2-bin colour histograms."""
    return Regions(
        sizes=np.array([10, 30, 20, 20]),
        boxes=np.array([[0, 0, 1, 10], [1, 0, 4, 10], [4, 0, 6, 10], [6, 0, 8, 10]]),
        pairs=np.array([[0, 1], [1, 2], [2, 3]]),
        image_size=80,
        colour=np.array([[1.0, 0.0], [0.9, 0.1], [0.2, 0.8], [0.0, 1.0]]),
    )


def test_grouping_merges_most_similar_neighbours_first_with_size_weighted_histograms():
    h = group_regions(chain_regions(), "C")
    # s(0,1) = 0.9, s(1,2) = 0.2 + 0.1 = 0.3, s(2,3) = 0.8 -> merge 0+1 first (region 4).
    # Region 4's histogram is (10*[1,0] + 30*[.9,.1]) / 40 = [.925, .075]; s(4,2) = .275.
    # Next 2+3 (0.8) -> region 5 = [.1, .9]; last s(4,5) = .1 + .075 = .175 (an unweighted
    # mean [.95, .05] would give .15).
    assert h.merges.tolist() == [[0, 1], [2, 3], [4, 5]]
    np.testing.assert_allclose(h.similarities, [0.9, 0.8, 0.175])
    assert h.num_initial == 4
    assert h.merged_boxes.tolist() == [[0, 0, 4, 10], [4, 0, 8, 10], [0, 0, 8, 10]]


def test_grouping_only_merges_adjacent_regions():
    regions = Regions(
        sizes=np.array([10, 10, 30]),
        boxes=np.array([[0, 0, 1, 10], [1, 0, 2, 10], [2, 0, 5, 10]]),
        pairs=np.array([[0, 1], [1, 2]]),  # 0 and 2 do not touch
        image_size=50,
        colour=np.array([[1.0, 0.0], [0.4, 0.6], [1.0, 0.0]]),  # 0 and 2 identical
    )
    h = group_regions(regions, "C")
    # s(0,1) = s(1,2) = 0.4, the tie pops (0, 1) first; then region 3 = [.7, .3] and
    # s(3,2) = .7. The identical pair 0, 2 is never merged directly.
    assert h.merges.tolist() == [[0, 1], [2, 3]]
    np.testing.assert_allclose(h.similarities, [0.4, 0.7])


SIZE_FILL_LABELS = np.array(
    [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 3, 3, 3],
        [2, 3, 3, 3],
    ]
)


def test_grouping_size_similarity_merges_small_regions_first():
    # sizes 4, 4, 2, 6 of 16 px; pairs 01 .5, 02 .625, 03 .375, 13 .375, 23 .5
    # -> 0+2 (= region 4, 6 px); then 1-3 and 1-4 tie at .375, (1,3) pops first -> 5; 4+5.
    h = hierarchical_grouping(SIZE_FILL_LABELS, None, similarity="S")
    assert h.merges.tolist() == [[0, 2], [1, 3], [4, 5]]
    np.testing.assert_allclose(h.similarities, [0.625, 0.375, 0.0])


def test_grouping_fill_similarity_merges_regions_that_fill_their_box():
    # boxes 0 (0,0,2,2), 1 (2,0,4,2), 2 (0,2,1,4), 3 (1,2,4,4):
    # fill 01 = 1 (box 8 px = 4 + 4), 02 = 1 - 2/16, 03 = 1 - 6/16, 13 = 1 - 2/16, 23 = 1.
    # 0+1 -> region 4; 2+3 -> region 5 (fill 1 again); 4+5 fills the image.
    h = hierarchical_grouping(SIZE_FILL_LABELS, None, similarity="F")
    assert h.merges.tolist() == [[0, 1], [2, 3], [4, 5]]
    np.testing.assert_allclose(h.similarities, [1.0, 1.0, 1.0])


def test_hierarchical_grouping_on_striped_image():
    # Four vertical stripes in RGB, colour similarity only: red, red, blue (5 px wide) and a
    # greenish blue (15 px wide). Bins are value * 25 // 256, each channel holds 1/3 of the mass:
    # red (200,0,0) -> bins (19, 0, 0); blue (0,0,200) -> (0, 0, 19); (0,40,200) -> (0, 3, 19).
    # s(red, red) = 1; s(blue, greenish) = R + B = 2/3; s(red, blue) = G = 1/3.
    # Last: red vs (0.25 blue + 0.75 greenish): only G bin 0 is shared, min(1/3, 0.25/3) = 1/12.
    widths = [10, 10, 5, 15]
    colours = [(200, 0, 0), (200, 0, 0), (0, 0, 200), (0, 40, 200)]
    labels = np.repeat(np.arange(4), widths)[None, :].repeat(10, axis=0)
    image = np.zeros((10, 40, 3), np.uint8)
    for index, colour in enumerate(colours):
        image[labels == index] = colour
    h = hierarchical_grouping(labels, image, similarity="C")
    assert h.merges.tolist() == [[0, 1], [2, 3], [4, 5]]
    np.testing.assert_allclose(h.similarities, [1.0, 2 / 3, 1 / 12])
    assert h.merged_boxes.tolist() == [[0, 0, 20, 10], [20, 0, 40, 10], [0, 0, 40, 10]]


def test_grouping_stops_when_no_adjacent_pair_is_left():
    regions = Regions(
        sizes=np.array([5, 5]),
        boxes=np.array([[0, 0, 5, 1], [5, 0, 10, 1]]),
        pairs=np.zeros((0, 2), np.int64),
        image_size=10,
    )
    h = group_regions(regions, "S")
    assert h.merges.shape == (0, 2) and h.merged_boxes.shape == (0, 4)
    assert h.boxes.tolist() == [[0, 0, 5, 1], [5, 0, 10, 1]]


def test_group_regions_needs_the_histograms_it_uses():
    regions = region_features(SIZE_FILL_LABELS, None, colour=False, texture=False)
    with pytest.raises(SelectiveSearchError, match="needs histograms"):
        group_regions(regions, "C+T+S+F")


def test_parse_similarity_and_strategy_sets():
    assert parse_similarity("C+T+S+F") == CTSF
    assert parse_similarity("fst") == ("texture", "size", "fill")
    assert parse_similarity(("fill", "colour")) == ("colour", "fill")
    with pytest.raises(SelectiveSearchError, match="unknown similarity"):
        parse_similarity("C+X")
    assert strategies_for_mode("single") == [Strategy("HSV", 100, CTSF)]
    assert Strategy("hsv", 100, "C+T+S+F") == Strategy("HSV", 100, CTSF)
    assert str(Strategy("lab", 50, TSF)) == "Lab/k=50/T+S+F"
    with pytest.raises(SelectiveSearchError, match="unknown colour space"):
        Strategy("CMYK", 50, TSF)
    fast = strategies_for_mode("fast")
    assert len(fast) == 8 and len(set(fast)) == 8
    assert {(s.colour_space, s.k, s.similarity) for s in fast} == {
        (c, k, sim) for c in ("HSV", "Lab") for k in (50, 100) for sim in (CTSF, TSF)
    }
    quality = strategies_for_mode("quality")
    assert len(quality) == 80 and len(set(quality)) == 80
    assert {s.colour_space for s in quality} == {"HSV", "Lab", "rgI", "H", "I"}
    assert {s.k for s in quality} == {50, 100, 150, 300}
    with pytest.raises(SelectiveSearchError, match="unknown selective search mode 'best'"):
        strategies_for_mode("best")


# --- ranking ---------------------------------------------------------------------------


def test_rank_boxes_sorts_by_randomised_priority_and_keeps_best_duplicate():
    boxes = np.array([[0, 0, 30, 30], [0, 0, 30, 30], [5, 5, 40, 40], [1, 1, 50, 50]], float)
    priorities = np.array([5.0, 1.0, 3.0, 2.0])
    ranked, values = rank_boxes(boxes, priorities, seed=3)
    randomised = priorities * np.random.default_rng(3).random(4)
    # three distinct boxes remain, in ascending randomised priority
    assert len(ranked) == 3 and len(np.unique(ranked, axis=0)) == 3
    assert np.all(np.diff(values) >= 0)
    # the duplicate keeps the better (lower) of its two values
    dup = np.flatnonzero((ranked == [0, 0, 30, 30]).all(axis=1))
    assert len(dup) == 1 and values[dup[0]] == min(randomised[0], randomised[1])


def test_rank_boxes_is_deterministic_for_a_seed():
    rng = np.random.default_rng(0)
    xy = rng.integers(0, 100, (200, 2))
    boxes = np.concatenate([xy, xy + rng.integers(20, 60, (200, 2))], axis=1).astype(float)
    priorities = rng.integers(1, 50, 200).astype(float)
    a, va = rank_boxes(boxes, priorities, seed=7)
    b, vb = rank_boxes(boxes, priorities, seed=7)
    c, _ = rank_boxes(boxes, priorities, seed=8)
    assert np.array_equal(a, b) and np.array_equal(va, vb)
    assert not np.array_equal(a, c)  # another seed interleaves differently
    assert np.array_equal(np.unique(a, axis=0), np.unique(c, axis=0))  # ...the same boxes


def test_rank_boxes_min_size_and_max_boxes():
    boxes = np.array([[0, 0, 20, 20], [0, 0, 19, 40], [0, 0, 40, 19], [10, 10, 60, 70]], float)
    kept, _ = rank_boxes(boxes, np.ones(4), seed=0, min_size=20)
    # width 19 and height 19 go; 20 x 20 stays
    assert sorted(map(tuple, kept.tolist())) == [(0, 0, 20, 20), (10, 10, 60, 70)]
    top, _ = rank_boxes(boxes, np.ones(4), seed=0, max_boxes=2)
    assert len(top) == 2


# --- the public function ---------------------------------------------------------------


def draw_shapes(seed, size=256):
    """Noisy grey background with 6 filled circles / squares / triangles in a 3x3 grid of
    cells (no overlaps); returns the RGB image and tight GT boxes (xyxy, exclusive)."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(120, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    cell = size // 3
    boxes = []
    for n, c in enumerate(rng.permutation(9)[:6]):
        cy, cx = divmod(int(c), 3)
        s = int(rng.integers(int(cell * 0.35), int(cell * 0.7)))  # 29..58 px at size 256
        x0 = cx * cell + int(rng.integers(2, cell - s - 1))
        y0 = cy * cell + int(rng.integers(2, cell - s - 1))
        mask = np.zeros((size, size), np.uint8)
        kind = n % 3
        if kind == 0:
            cv2.circle(mask, (x0 + s // 2, y0 + s // 2), s // 2, 1, -1)
        elif kind == 1:
            cv2.rectangle(mask, (x0, y0), (x0 + s - 1, y0 + s - 1), 1, -1)
        else:
            tri = np.array([(x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1), (x0 + s // 2, y0)], np.int32)
            cv2.fillPoly(mask, [tri], 1)
        image[mask > 0] = rng.integers(0, 256, 3)
        ys, xs = np.nonzero(mask)
        boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    return image, np.array(boxes, np.float64)


def box_iou(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def test_selective_search_recall_on_drawn_shapes():
    hit = total = 0
    for seed in (0, 1):
        image, gt = draw_shapes(seed)
        boxes, _ = selective_search(image, mode="fast")
        hit += int((box_iou(gt, boxes[:1000].astype(np.float64)).max(axis=1) >= 0.5).sum())
        total += len(gt)
    assert hit / total >= 0.95


def test_selective_search_output_contract_and_determinism():
    image, _ = draw_shapes(2, size=128)
    boxes, scores = selective_search(image, mode="single", seed=5)
    assert boxes.dtype == np.float32 and scores.dtype == np.float32
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and scores.shape == (len(boxes),)
    assert np.all(np.diff(scores) <= 0)  # best first
    assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2] <= 128) and np.all(boxes[:, 3] <= 128)
    assert np.all(boxes[:, 2:] - boxes[:, :2] >= 20)  # default min_size = 20
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    assert [0, 0, 128, 128] in boxes.tolist()  # the whole image is the last merge
    again, again_scores = selective_search(image, mode="single", seed=5)
    assert np.array_equal(boxes, again) and np.array_equal(scores, again_scores)
    other, _ = selective_search(image, mode="single", seed=6)
    assert not np.array_equal(boxes, other)
    assert np.array_equal(np.unique(boxes, axis=0), np.unique(other, axis=0))
    top, _ = selective_search(image, mode="single", seed=5, max_boxes=10)
    assert np.array_equal(top, boxes[:10])


def test_selective_search_scale_maps_boxes_back_to_input_pixels():
    image, _ = draw_shapes(3, size=128)
    boxes, _ = selective_search(image, mode="single", scale=0.5, min_size=0)
    assert [0, 0, 128, 128] in boxes.tolist()
    assert boxes.max() <= 128 and boxes.min() >= 0


def test_selective_search_custom_strategies_and_grey_input():
    image, _ = draw_shapes(4, size=96)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    boxes, _ = selective_search(grey, mode=[Strategy("I", 50, "S"), Strategy("I", 50, "F")], min_size=0)
    # Every hierarchy ends in the region covering the whole (connected) image, and grey input
    # must be accepted as a 1-channel image of the same size.
    assert [0, 0, 96, 96] in boxes.tolist()
    assert boxes.min() >= 0 and boxes.max() <= 96 and len(boxes) > 4


def test_selective_search_quality_mode_runs_every_colour_space_and_similarity():
    image, _ = draw_shapes(5, size=64)
    boxes, scores = selective_search(image, mode="quality", min_size=0)
    assert [0, 0, 64, 64] in boxes.tolist()
    # 20 segmentations x 4 groupings pool many more distinct boxes than one strategy does
    single, _ = selective_search(image, mode="single", min_size=0)
    assert len(boxes) > 2 * len(single)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((10, 10, 3), np.float32), "must be uint8"),
        (np.zeros((10, 10, 4), np.uint8), r"must be \(H, W, 3\) RGB"),
        ([[1, 2], [3, 4]], "must be a numpy array"),
    ],
)
def test_selective_search_rejects_bad_images(bad, message):
    with pytest.raises(SelectiveSearchError, match=message):
        selective_search(bad)


def test_selective_search_rejects_bad_mode_and_scale():
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(SelectiveSearchError, match="unknown selective search mode"):
        selective_search(image, mode="turbo")
    with pytest.raises(SelectiveSearchError, match="scale must be > 0"):
        selective_search(image, scale=-1.0)
    with pytest.raises(SelectiveSearchError, match="max_boxes must be None or >= 0"):
        selective_search(image, max_boxes=-5)
    with pytest.raises(SelectiveSearchError, match="list of Strategy"):
        selective_search(image, mode=["fast"])


def test_segment_graph_without_numba_is_a_one_line_error(monkeypatch):
    import sys

    graph = pixel_graph(np.zeros((2, 2, 1)))
    # A None entry in sys.modules makes the import fail as if numba were not installed.
    monkeypatch.setitem(sys.modules, "numba", None)
    monkeypatch.delitem(sys.modules, "detkit.modeling.proposals.selective_search.fh_kernel", raising=False)
    with pytest.raises(SelectiveSearchError, match="needs numba: pip install numba"):
        segment_graph(graph, 50)
