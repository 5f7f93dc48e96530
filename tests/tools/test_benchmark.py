"""tools/benchmark.py's roofline figures: the dense work it counts and the arithmetic of what
a goal ratio asks of the CPU, against hand-computed values."""

import warnings

import pytest
import torch
from benchmark import dense_gflop, roofline
from torchvision.ops import roi_align


def test_dense_gflop_counts_dense_convolutions_and_matrix_products_only():
    torch.manual_seed(0)
    conv, fc = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.Linear(8 * 10 * 10, 5)
    x = torch.randn(1, 3, 10, 10)

    def run():
        y = conv(x)  # 8 outputs x 3 inputs x 9 taps x 100 positions = 21,600 multiply-adds
        roi_align(y, [torch.tensor([[0.0, 0.0, 5.0, 5.0]])], 2)  # no FLOP formula: counts 0
        # a sparse operand, as detkit's CPU RoIAlign multiplies: 0, not the 4 x 100 x 8 of its
        # shapes (which torch's FlopCounterMode counts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Sparse CSR tensor support is in beta"
            torch.eye(4, 100).to_sparse_csr() @ y.flatten(2)[0].t()
        return fc(y.flatten(1))  # 800 x 5 = 4,000 multiply-adds

    assert dense_gflop(run) == pytest.approx(2 * (21600 + 4000) / 1e9)


def test_roofline_states_the_rate_a_goal_ratio_needs():
    # 10 GFLOP per image; detkit 0.2 s, torchvision 0.25 s, roof 100 GFLOP/s, goal 0.7:
    # the goal means 0.175 s, i.e. 10 / 0.175 = 57.14 GFLOP/s; detkit runs 50 GFLOP/s now.
    r = roofline(10.0, 0.2, 0.25, 100.0, 0.7)
    assert r["detkit_gflops"] == pytest.approx(50.0)
    assert r["goal_gflops"] == pytest.approx(10 / 0.175)
    assert r["detkit_share_of_roof"] == pytest.approx(0.5)
    assert r["goal_share_of_roof"] == pytest.approx(0.5714, abs=1e-4)
