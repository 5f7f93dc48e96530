"""Selective Search and precomputed proposal files as the Detector's ProposalGenerator, built
from a config (tiny backbone): the un-normalised image Selective Search sees is the exact
uint8 input (padding left out), the RoI head receives the file's boxes scaled to the
network input, and detections come back in original pixels."""

import numpy as np
import pytest
import torch

from detkit.config import from_dict
from detkit.data.proposal_files import save_proposals
from detkit.data.shapes import render_shapes_image
from detkit.data.transforms import Normalize
from detkit.errors import ConfigError
from detkit.modeling.build import build_model
from detkit.modeling.proposals.precomputed import PrecomputedProposals
from detkit.modeling.proposals.selective_search import SelectiveSearchProposals, selective_search
from detkit.schema import ModelConfig
from detkit.structures import Geometry, ImageList


def model_cfg(**proposals):
    return from_dict(
        ModelConfig,
        {
            "backbone": {"name": "tiny", "out_channels": 16, "tiny_widths": [8, 16, 16, 16]},
            "roi_head": {"fc_dims": [32, 32], "score_thresh": 0.0},
            "proposals": proposals,
        },
    )


@pytest.fixture(scope="module")
def image():
    return render_shapes_image("test", 0, seed=0).image  # (H, W, 3) uint8, H and W not multiples of 32


def batch_of(image, orig_scale=1.0):
    t = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    t, _ = Normalize()(t, None)
    h, w = image.shape[:2]
    geometry = Geometry((int(h * orig_scale), int(w * orig_scale)), (h, w))
    return ImageList.from_tensors([t], 32, geometries=[geometry], image_ids=["test_00000"])


def test_selective_search_generator_sees_the_exact_image(image):
    images = batch_of(image)
    assert images.tensor.shape[-2:] != image.shape[:2]  # padded
    gen = SelectiveSearchProposals("fast", max_proposals=50, min_size=10)
    h, w = images.image_sizes[0]
    np.testing.assert_array_equal(gen.image_array(images.tensor[0, :, :h, :w]), image)
    (p,), losses = gen(images, {})
    boxes, scores = selective_search(image, "fast", min_size=10, max_boxes=50, seed=0)
    assert losses == {} and len(p) == len(boxes) <= 50
    np.testing.assert_array_equal(p.boxes.numpy(), boxes)
    np.testing.assert_array_equal(p.scores.numpy(), scores)
    assert p.boxes.dtype == torch.float32 and (p.scores[:-1] >= p.scores[1:]).all()


def test_detector_with_selective_search_proposals(image):
    torch.manual_seed(0)
    model = build_model(model_cfg(method="selective_search", selective_search={"mode": "single", "min_size": 10}), 3)
    assert isinstance(model.proposal_generator, SelectiveSearchProposals)
    assert model.proposal_generator.mode == "single" and model.proposal_generator.max_proposals == 2000
    model.eval()
    images = batch_of(image, orig_scale=2.0)  # the original was twice the network input
    with torch.no_grad():
        (det,), losses = model(images)
    oh, ow = images.geometries[0].orig_size
    assert losses == {} and len(det) > 0
    assert (det.boxes[:, 0::2] <= ow).all() and (det.boxes[:, 1::2] <= oh).all()
    # at least one box lies beyond the network input: mapped to original pixels
    assert (det.boxes[:, 2] > images.image_sizes[0][1]).any() or (det.boxes[:, 3] > images.image_sizes[0][0]).any()


def test_detector_with_precomputed_proposals(image, tmp_path, monkeypatch):
    h, w = image.shape[:2]
    file_boxes = np.array([[0, 0, 2 * w, 2 * h], [20, 30, 80, 90], [100, 10, 140, 70]], np.float32)  # original px
    path = save_proposals(tmp_path / "p.npz", {"test_00000": (file_boxes, np.array([0.9, 0.8, 0.7], np.float32))})
    torch.manual_seed(0)
    model = build_model(model_cfg(method="precomputed", precomputed={"path": str(path), "max_proposals": 2}), 3)
    assert isinstance(model.proposal_generator, PrecomputedProposals)
    model.eval()
    seen = []
    head_forward = model.roi_head.forward

    def spy(images, features, proposals, targets=None):
        seen.append(proposals)
        return head_forward(images, features, proposals, targets)

    monkeypatch.setattr(model.roi_head, "forward", spy)
    with torch.no_grad():
        (det,), _ = model(batch_of(image, orig_scale=2.0))
    # the best two, halved into network-input pixels
    torch.testing.assert_close(seen[0][0].boxes, torch.tensor([[0.0, 0.0, w, h], [10.0, 15.0, 40.0, 45.0]]))
    assert len(det) > 0 and (det.boxes[:, 2] <= 2 * w).all() and (det.boxes[:, 3] <= 2 * h).all()


def test_precomputed_config_takes_one_path_or_a_list(tmp_path):
    one = build_model(model_cfg(method="precomputed", precomputed={"path": str(tmp_path / "a.npz")}), 3)
    assert one.proposal_generator.paths == [tmp_path / "a.npz"] and one.proposal_generator.max_proposals == 2000
    files = [str(tmp_path / "train.npz"), str(tmp_path / "test.npz")]
    two = build_model(model_cfg(method="precomputed", precomputed={"path": files, "max_proposals": 7}), 3)
    assert [str(p) for p in two.proposal_generator.paths] == files and two.proposal_generator.max_proposals == 7


def test_proposal_config_validation():
    with pytest.raises(ConfigError, match="needs proposals.precomputed.path"):
        model_cfg(method="precomputed")
    with pytest.raises(ConfigError, match="selective_search.max_proposals must be >= 1"):
        model_cfg(method="selective_search", selective_search={"max_proposals": 0})
    with pytest.raises(
        ConfigError,
        match="proposals.method: expected one of 'rpn', 'selective_search', 'precomputed', got str 'edge_boxes'",
    ):
        model_cfg(method="edge_boxes")


def test_selective_search_undoes_the_configured_normalisation(image, monkeypatch):
    # With a non-default mean / std in the data pipeline, the uint8 image the generator hands
    # to selective_search is the original pixels, padding left out.
    from detkit.modeling.proposals.selective_search import search
    from detkit.schema import InputConfig

    mean, std = [0.3, 0.6, 0.45], [0.2, 0.35, 0.3]
    model = build_model(
        model_cfg(method="selective_search", selective_search={"mode": "single"}),
        3,
        InputConfig(pixel_mean=mean, pixel_std=std),
    )
    seen = []
    monkeypatch.setattr(
        search,
        "selective_search",
        lambda array, *a, **k: seen.append(array) or (np.zeros((0, 4), np.float32), np.zeros(0, np.float32)),
    )
    t = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    t, _ = Normalize(mean, std)(t, None)
    images = ImageList.from_tensors([t], 32)
    assert images.tensor.shape[-2:] != image.shape[:2]  # padded
    model.proposal_generator(images, {})
    (array,) = seen
    assert array.dtype == np.uint8 and array.shape == image.shape
    np.testing.assert_array_equal(array, image)
    # the ImageNet defaults would give other pixels: the configured values are what is used
    default = SelectiveSearchProposals("single").image_array(images.tensor[0, :, : image.shape[0], : image.shape[1]])
    assert np.abs(default.astype(int) - image.astype(int)).max() > 10
