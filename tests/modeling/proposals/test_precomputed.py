"""Tests of detkit.modeling.proposals.precomputed: npz / json round trips, the classic
Selective Search .mat layout (hand-computed coordinate conversion, both directions), corrupt
and malformed files (one-line ProposalFileError naming the file), and PrecomputedProposals'
mapping from original to network-input pixels (hand-made per-axis scales, clipping, flip,
sorting, top-k, missing ids)."""

import json

import numpy as np
import pytest
import scipy.io
import torch

from detkit.data.proposal_files import (
    ProposalFileError,
    convert_json,
    convert_mat,
    export_mat,
    load_proposals,
    rank_scores,
    read_mat,
    save_proposals,
)
from detkit.modeling.proposals.precomputed import PrecomputedProposals
from detkit.structures import Geometry, ImageList, Proposals


def sample_table():
    return {
        "000005": (
            np.array([[0.5, 1.25, 30.0, 40.0], [2.0, 3.0, 4.0, 5.0]], np.float32),
            np.array([0.9, 0.1], np.float32),
        ),
        "000007": (np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)),  # no proposals at all
        "000009": (np.array([[10.0, 20.0, 110.0, 90.0]], np.float32), np.array([0.3], np.float32)),
    }


def assert_same_table(a, b):
    assert list(a) == list(b)  # image order is kept
    for key in a:
        np.testing.assert_array_equal(a[key][0], b[key][0])
        np.testing.assert_array_equal(a[key][1], b[key][1])
        assert a[key][0].dtype == np.float32 and a[key][1].dtype == np.float32
        assert a[key][0].shape == (len(a[key][1]), 4)


# -- npz / json -----------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_save_load_round_trip_is_exact(tmp_path, suffix):
    path = tmp_path / f"p{suffix}"
    save_proposals(path, sample_table(), {"method": "selective_search", "mode": "fast", "dataset": "voc:test"})
    table, meta = load_proposals(path)
    assert_same_table(table, sample_table())
    assert meta == {"method": "selective_search", "mode": "fast", "dataset": "voc:test", "version": 1}


def test_npz_layout(tmp_path):
    path = save_proposals(tmp_path / "p.npz", sample_table(), {"method": "rpn"})
    with np.load(path, allow_pickle=False) as npz:
        assert npz["image_ids"].tolist() == ["000005", "000007", "000009"]
        assert npz["counts"].tolist() == [2, 0, 1]
        assert npz["boxes"].shape == (3, 4) and npz["boxes"].dtype == np.float32
        np.testing.assert_array_equal(npz["scores"], np.array([0.9, 0.1, 0.3], np.float32))
        assert json.loads(str(npz["meta"][()])) == {"method": "rpn", "version": 1}


def test_int_ids_tensors_and_proposals_objects_are_accepted(tmp_path):
    proposals = {
        42: Proposals(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([0.5])),
        7: {"boxes": torch.tensor([[0.0, 0.0, 9.0, 9.0]]), "scores": torch.tensor([0.25])},
    }
    table, _ = load_proposals(save_proposals(tmp_path / "p.npz", proposals))
    assert list(table) == ["42", "7"]  # ids come back as strings
    np.testing.assert_array_equal(table["42"][0], [[1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_array_equal(table["7"][1], [0.25])


def test_json_layout_and_scores_default_to_rank(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(
        json.dumps(
            {
                "a": {"boxes": [[0, 0, 4, 4], [1, 1, 2, 2], [0, 0, 1, 1]]},
                "b": [[5, 5, 6, 7]],  # a bare list of boxes
                "__meta__": {"method": "edge_boxes"},
            }
        )
    )
    table, meta = load_proposals(path)
    np.testing.assert_allclose(table["a"][1], [1.0, 1 / 2, 1 / 3])  # 1 / (1 + rank)
    np.testing.assert_array_equal(table["b"][0], [[5, 5, 6, 7]])
    assert meta == {"method": "edge_boxes"}
    out = convert_json(path, tmp_path / "p.npz", {"dataset": "x"})
    converted, meta2 = load_proposals(out)
    assert_same_table(converted, table)
    assert meta2 == {"method": "edge_boxes", "dataset": "x", "version": 1}


def test_saving_is_atomic_and_never_pickles(tmp_path):
    path = save_proposals(tmp_path / "p.npz", sample_table())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.npz"]  # no temporary left
    with np.load(path, allow_pickle=False) as npz:  # would raise on object arrays
        assert all(npz[k].dtype != object for k in npz.files)


# -- corrupt / malformed files ---------------------------------------------------------------
def raises_one_line(path, match):
    with pytest.raises(ProposalFileError, match=match) as info:
        load_proposals(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_truncated_npz(tmp_path):
    path = save_proposals(tmp_path / "p.npz", sample_table())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    raises_one_line(path, "truncated or corrupt")


def test_garbage_and_pickle_only_npz(tmp_path):
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"not a zip at all")
    raises_one_line(garbage, "not an .npz")
    pickled = tmp_path / "pk.npz"
    np.savez(
        pickled,
        image_ids=np.array(["a"], dtype=object),
        boxes=np.zeros((0, 4), np.float32),
        scores=np.zeros(0, np.float32),
        counts=np.zeros(1, np.int64),
    )
    raises_one_line(pickled, "pickled")


def write_npz(path, **overrides):
    arrays = {
        "image_ids": np.array(["a", "b"]),
        "boxes": np.zeros((3, 4), np.float32),
        "scores": np.zeros(3, np.float32),
        "counts": np.array([1, 2]),
    }
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"boxes": np.zeros((3, 3), np.float32)}, r"boxes must be an \(M, 4\)"),
        ({"scores": np.zeros(2, np.float32)}, r"scores must be \(3,\)"),
        ({"counts": np.array([1, 1])}, "counts add up to 2 but there are 3 boxes"),
        ({"counts": np.array([3])}, "counts must be 2 integers"),
        ({"counts": None}, "missing arrays"),
        ({"image_ids": np.array(["a", "a"])}, "appears twice"),
        ({"image_ids": np.array([1, 2])}, "image_ids must be a 1-d string array"),
        ({"boxes": np.array([[0, 0, 1, 1], [5, 0, 4, 1], [0, 0, 1, 1]], np.float32)}, "x2 < x1"),
        ({"boxes": np.array([[0, 0, np.nan, 1]] * 3, np.float32)}, "non-finite"),
        ({"meta": np.array("{not json")}, "meta is not a JSON string"),
    ],
)
def test_wrong_npz_contents(tmp_path, overrides, match):
    raises_one_line(write_npz(tmp_path / "w.npz", **overrides), match)


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"a": {"boxes": [[0, 0, 1, 1]]', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"a": {"boxes": [[0, 0, 1]]}}', r"shape \(R, 4\)"),
        ('{"a": {"boxes": [[0, 0, 1, 1]], "scores": [1, 2]}}', "1 boxes but scores"),
        ('{"a": {"scores": [1]}}', "needs a 'boxes' list"),
        ('{"a": {"boxes": [["x", 0, 1, 1]]}}', "must be numbers"),
    ],
)
def test_wrong_json_contents(tmp_path, text, match):
    path = tmp_path / "w.json"
    path.write_text(text)
    raises_one_line(path, match)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(ProposalFileError, match="not found"):
        load_proposals(tmp_path / "none.npz")
    with pytest.raises(ProposalFileError, match="unknown type '.pkl'"):
        save_proposals(tmp_path / "p.pkl", sample_table())


# -- the classic .mat release --------------------------------------------------------------
def classic_mat(path, boxes_per_image, ids, dtype=np.float64):
    """The layout of R-CNN's selective_search_data/*.mat: 1 x N cell arrays."""
    boxes = np.empty((1, len(ids)), dtype=object)
    images = np.empty((1, len(ids)), dtype=object)
    for j, (b, i) in enumerate(zip(boxes_per_image, ids)):
        boxes[0, j] = np.asarray(b, dtype=dtype).reshape(-1, 4)
        images[0, j] = i
    scipy.io.savemat(path, {"boxes": boxes, "images": images})
    return path


def test_convert_mat_maps_yxyx_one_based_inclusive_to_xyxy(tmp_path):
    # [y1 x1 y2 x2] 1-based inclusive -> (x1 - 1, y1 - 1, x2, y2):
    #   [1, 2, 10, 20]  -> (1, 0, 20, 10): columns 2..20 are 19 pixels = 20 - 1
    #   [5, 1, 5, 1]    -> (0, 4, 1, 5): a single pixel is 1 x 1
    mat = classic_mat(
        tmp_path / "ss.mat", [[[1, 2, 10, 20], [5, 1, 5, 1]], np.zeros((0, 4))], ["000005", "000007"], dtype=np.uint16
    )  # uint16: the -1 must not wrap
    out = convert_mat(mat, tmp_path / "ss.npz", meta={"dataset": "voc_2007_test"})
    table, meta = load_proposals(out)
    np.testing.assert_array_equal(table["000005"][0], [[1, 0, 20, 10], [0, 4, 1, 5]])
    np.testing.assert_allclose(table["000005"][1], [1.0, 0.5])  # file order = rank
    assert table["000007"][0].shape == (0, 4)
    assert meta["method"] == "selective_search" and meta["dataset"] == "voc_2007_test"
    assert meta["source"] == "ss.mat"
    # load_proposals reads .mat directly too
    assert_same_table(load_proposals(mat)[0], table)


def test_export_mat_then_convert_is_exact_and_classic(tmp_path):
    table = {
        "a": (np.array([[2, 3, 10, 12], [0, 0, 5, 5]], np.float32), np.array([0.2, 0.8], np.float32)),
        "b": (np.array([[1, 1, 2, 2]], np.float32), np.array([1.0], np.float32)),
    }
    mat = export_mat(table, tmp_path / "e.mat")
    raw = scipy.io.loadmat(mat)
    # best first; [y1 + 1, x1 + 1, y2, x2]
    np.testing.assert_array_equal(raw["boxes"][0, 0], [[1, 1, 5, 5], [4, 3, 12, 10]])
    assert [str(x[0]) for x in raw["images"].ravel()] == ["a", "b"]
    back = read_mat(mat)
    np.testing.assert_array_equal(back["a"][0], table["a"][0][[1, 0]])
    np.testing.assert_array_equal(back["b"][0], table["b"][0])
    # from a file too
    npz = save_proposals(tmp_path / "t.npz", table)
    export_mat(npz, tmp_path / "f.mat")
    assert_same_table(read_mat(tmp_path / "f.mat"), back)


def test_mat_ids_argument_and_errors(tmp_path):
    path = tmp_path / "noids.mat"
    cells = np.empty((1, 2), dtype=object)
    cells[0, 0] = np.array([[1.0, 1.0, 4.0, 4.0]])
    cells[0, 1] = np.array([[2.0, 2.0, 3.0, 3.0]])
    scipy.io.savemat(path, {"boxes": cells})
    with pytest.raises(ProposalFileError, match="no 'images' variable; pass image_ids"):
        read_mat(path)
    table = read_mat(path, image_ids=[10, 11])
    assert list(table) == ["10", "11"]
    with pytest.raises(ProposalFileError, match="2 box arrays but 1 image ids"):
        read_mat(path, image_ids=["x"])
    bad = tmp_path / "bad.mat"
    cells[0, 1] = np.array([[2.0, 2.0, 3.0]])
    scipy.io.savemat(bad, {"boxes": cells})
    with pytest.raises(ProposalFileError, match=r"image '11' boxes must have shape \(R, 4\)"):
        read_mat(bad, image_ids=[10, 11])
    junk = tmp_path / "junk.mat"
    junk.write_bytes(b"MATLAB nonsense" * 10)
    with pytest.raises(ProposalFileError, match="junk.mat"):
        read_mat(junk)
    scipy.io.savemat(tmp_path / "other.mat", {"x": np.ones(3)})
    with pytest.raises(ProposalFileError, match=r"no 'boxes' variable \(has \['x'\]\)"):
        read_mat(tmp_path / "other.mat")


def test_rank_scores():
    np.testing.assert_allclose(rank_scores(3), [1.0, 0.5, 1 / 3])
    assert rank_scores(0).shape == (0,)


# -- the ProposalGenerator -------------------------------------------------------------------
def generator_file(tmp_path, table):
    return save_proposals(tmp_path / "g.npz", table)


def test_precomputed_maps_original_to_input_pixels_per_axis(tmp_path):
    # original (h, w) = (100, 200), network input (50, 300): sx = 300 / 200 = 1.5, sy = 0.5
    boxes = np.array(
        [
            [10, 20, 110, 90],  # -> (15, 10, 165, 45)
            [190, 90, 230, 120],  # sticks out -> (285, 45, 345, 60) -> clipped (285, 45, 300, 50)
            [210, 0, 230, 10],  # entirely right of the image -> empty after clipping, dropped
            [0, 0, 4, 2],  # -> (0, 0, 6, 1)
        ],
        np.float32,
    )
    scores = np.array([0.9, 0.5, 0.99, 0.7], np.float32)  # unsorted on purpose
    gen = PrecomputedProposals(generator_file(tmp_path, {"img": (boxes, scores)}))
    images = ImageList(torch.zeros(1, 3, 64, 320), [(50, 300)], [Geometry((100, 200), (50, 300))], ["img"])
    (p,), losses = gen(images, {})
    assert losses == {}
    torch.testing.assert_close(
        p.boxes, torch.tensor([[15.0, 10.0, 165.0, 45.0], [0.0, 0.0, 6.0, 1.0], [285.0, 45.0, 300.0, 50.0]])
    )
    torch.testing.assert_close(p.scores, torch.tensor([0.9, 0.7, 0.5]))  # high first
    assert p.boxes.dtype == torch.float32 and not p.boxes.requires_grad


def test_precomputed_batch_topk_flip_and_int_ids(tmp_path):
    table = {
        "1": (np.array([[0, 0, 10, 10], [2, 2, 4, 8], [5, 5, 6, 6]], np.float32), np.array([3, 2, 1], np.float32)),
        "2": (np.array([[4, 0, 8, 4]], np.float32), np.array([1], np.float32)),
    }
    gen = PrecomputedProposals(generator_file(tmp_path, table), max_proposals=2)
    geometries = [Geometry((10, 10), (20, 20)), Geometry((16, 16), (16, 16))]
    images = ImageList(torch.zeros(2, 3, 32, 32), [(20, 20), (16, 16)], geometries, [1, 2])  # int ids: as strings
    a, b = gen(images, None)[0]
    torch.testing.assert_close(a.boxes, torch.tensor([[0.0, 0.0, 20.0, 20.0], [4.0, 4.0, 8.0, 16.0]]))  # top 2, x2
    torch.testing.assert_close(b.boxes, torch.tensor([[4.0, 0.0, 8.0, 4.0]]))  # not resized
    # a horizontally flipped input (width 16): x -> 16 - x
    images.geometries = [geometries[0], geometries[1].mirrored()]
    _, b = gen(images, None)[0]
    torch.testing.assert_close(b.boxes, torch.tensor([[8.0, 0.0, 12.0, 4.0]]))


def test_precomputed_missing_id_lazy_load_and_no_state(tmp_path):
    missing_file = PrecomputedProposals(tmp_path / "later.npz")  # building does not read the file
    assert missing_file.state_dict() == {}  # nothing in checkpoints
    images = ImageList(torch.zeros(1, 3, 8, 8), [(8, 8)], [Geometry((8, 8), (8, 8))], ["x"])
    with pytest.raises(ProposalFileError, match="not found"):
        missing_file(images, {})
    gen = PrecomputedProposals(generator_file(tmp_path, sample_table()))
    with pytest.raises(ProposalFileError, match=r"g.npz has no proposals for image 'x' \(3 images in the file"):
        gen(images, {})
    with pytest.raises(ProposalFileError, match="needs images.image_ids"):
        gen(ImageList(torch.zeros(1, 3, 8, 8), [(8, 8)]), {})
    with pytest.raises(ValueError, match="max_proposals must be >= 1"):
        PrecomputedProposals(tmp_path / "g.npz", max_proposals=0)


def test_precomputed_pools_several_files(tmp_path):
    one = np.array([[0, 0, 4, 4]], np.float32), np.array([1.0], np.float32)
    train = save_proposals(tmp_path / "train.npz", {"train_1": one})
    test = save_proposals(tmp_path / "test.json", {"test_1": (one[0] + 1, one[1])})
    gen = PrecomputedProposals([train, test])
    images = ImageList(torch.zeros(2, 3, 8, 8), [(8, 8)] * 2, [Geometry((8, 8), (8, 8))] * 2, ["train_1", "test_1"])
    a, b = gen(images, None)[0]
    torch.testing.assert_close(a.boxes, torch.tensor([[0.0, 0.0, 4.0, 4.0]]))
    torch.testing.assert_close(b.boxes, torch.tensor([[1.0, 1.0, 5.0, 5.0]]))
    clash = PrecomputedProposals([train, save_proposals(tmp_path / "again.npz", {"train_1": one})])
    with pytest.raises(ProposalFileError, match=r"train.npz and .*again.npz both hold image 'train_1'"):
        clash(images, None)
    with pytest.raises(ValueError, match="at least one proposal file"):
        PrecomputedProposals([])
