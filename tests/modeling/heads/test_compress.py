"""SVD compression of fc layers (Fast R-CNN sec. 3.1): the two new layers multiply to the
rank-t truncation of W (W itself at full rank), the network output is unchanged at full rank,
and misuse is a one-line error."""

import pytest
import torch
from torch import nn

from detkit.errors import ExportError
from detkit.modeling.heads.compress import SVDLinear, compress_layers, compress_linear


def layer(out_f=12, in_f=20, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f)


def test_product_is_the_truncated_svd():
    fc = layer()
    for rank in (1, 3, 7):
        svd = compress_linear(fc, rank)
        u, s, vh = torch.linalg.svd(fc.weight.detach().double(), full_matrices=False)
        expected = (u[:, :rank] * s[:rank]) @ vh[:rank]  # independent: the definition
        torch.testing.assert_close(svd.weight_product().double(), expected, rtol=1e-5, atol=1e-6)
        # Eckart-Young: the spectral-norm error is the first dropped singular value
        err = torch.linalg.matrix_norm(fc.weight.detach().double() - svd.weight_product().detach().double(), ord=2)
        assert float(err) == pytest.approx(float(s[rank]), rel=1e-4)
        assert torch.equal(svd.expand.bias, fc.bias) and svd.reduce.bias is None


def test_full_rank_gives_the_same_layer_and_output():
    fc = layer()
    svd = compress_linear(fc, 12)
    torch.testing.assert_close(svd.weight_product(), fc.weight.detach(), rtol=1e-5, atol=1e-6)
    x = torch.randn(5, 20)
    torch.testing.assert_close(svd(x), fc(x), rtol=1e-5, atol=1e-5)


def test_compress_layers_in_a_box_head_and_rebuild_for_loading():
    head = nn.Sequential()
    head.add_module("fc6", layer(16, 30, seed=1))
    head.add_module("fc7", layer(8, 16, seed=2))
    x = torch.randn(4, 30)
    before = head(x)
    report = compress_layers(head, {"fc6": 16, "fc7": 8})
    assert isinstance(head.fc6, SVDLinear) and head.fc6.rank == 16
    assert report["fc6"] == "16 x 30 -> rank 16: 496 -> 752 parameters"  # 16*30+16 vs 16*(30+16)+16
    torch.testing.assert_close(head(x), before, rtol=1e-5, atol=1e-5)
    # a model built from the compressed config has the same structure: the state loads
    fresh = nn.Sequential()
    fresh.add_module("fc6", nn.Linear(30, 16))
    fresh.add_module("fc7", nn.Linear(16, 8))
    compress_layers(fresh, {"fc6": 16, "fc7": 8}, from_weights=False)
    fresh.load_state_dict(head.state_dict())
    torch.testing.assert_close(fresh(x), before, rtol=1e-5, atol=1e-5)


def test_bad_requests_are_one_line_errors():
    head = nn.Sequential()
    head.add_module("fc6", layer(6, 10))
    head.add_module("conv", nn.Conv2d(3, 3, 1))
    with pytest.raises(ExportError, match=r"SVD rank 7 must be in 1\.\.6 for a 6 x 10 layer"):
        compress_layers(head, {"fc6": 7})
    with pytest.raises(ExportError, match=r"no fully connected layer 'fc8' .*its fc layers: fc6"):
        compress_layers(head, {"fc8": 2})
    with pytest.raises(ExportError, match="'conv' is a Conv2d"):
        compress_layers(head, {"conv": 2})
    compress_layers(head, {"fc6": 3})
    with pytest.raises(ExportError, match="compressed already"):
        compress_layers(head, {"fc6": 2})
