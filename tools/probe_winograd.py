"""Would Winograd convolution beat oneDNN's 3x3 convolutions on this CPU? (issue 11, item 5)

A lossless speed lever keeps the arithmetic; a fast convolution algorithm changes it and
stays float32-accurate: Winograd's F(m x m, 3 x 3) (Lavin & Gray 2016, "Fast Algorithms for
Convolutional Neural Networks", sec. 4) computes an m x m output tile from an (m+2)^2 input
tile with (m+2)^2 products per channel pair instead of 9 m^2: 2.25x fewer for m = 2, 4x for
m = 4. torch's CPU convolution (oneDNN) runs the direct algorithm, so this probe writes the
algorithm in torch operations and times it against ``F.conv2d`` on the 3x3 layers of the two
benchmark networks, side by side in one process:

    d = input tiles, (a*a, T*C)      a = m + 2, T tiles, C input channels (a strided copy)
    V = (B^T (x) B^T) d              the input transform as one matrix product, (a*a, T*C)
    M[k] = V[k] @ U[k]               a*a products (T, C) @ (C, C_out); U = G g G^T, per weight
    Y = (A^T (x) A^T) M              the output transform, (m*m, T*C_out) -> output tiles

processed in chunks of tile rows so that the transforms stay in cache. Output: per layer
shape, the direct convolution's time, the Winograd time as a ratio, and the largest
difference relative to the output's largest magnitude. Not used by detkit (README, "Not
taken": it pays only for the 256-channel maps at R50-FPN's two finest levels).

    python tools/probe_winograd.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def winograd_matrices(m: int):
    """(B^T, G, A^T) of F(m x m, 3 x 3), Lavin & Gray 2016 (sec. 4.1 for m = 2; m = 4 from
    the interpolation points 0, +-1, +-2 and infinity, as in their sec. 4.2)."""
    if m == 2:
        bt = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
        g = [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]
        at = [[1, 1, 1, 0], [0, 1, -1, -1]]
    elif m == 4:
        bt = [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ]
        g = [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ]
        at = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
    else:
        raise ValueError(f"m: 2 or 4, got {m}")
    return (torch.tensor(x, dtype=torch.float64) for x in (bt, g, at))


class WinogradConv3x3:
    """A 3x3, stride-1, padding-1 convolution by F(m x m, 3 x 3) on channels-last input."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, m: int = 4, chunk_tiles: int = 512):
        bt, g, at = winograd_matrices(m)
        self.m, self.a, self.chunk_tiles, self.bias = m, m + 2, chunk_tiles, bias
        u = torch.einsum("xk,ockl,yl->xyco", g, weight.double(), g)  # G g G^T per channel pair
        self.u = u.reshape(self.a * self.a, weight.shape[1], weight.shape[0]).float().contiguous()
        self.kb = torch.kron(bt, bt).float()  # (a*a, a*a)
        self.ka = torch.kron(at, at).float()  # (m*m, a*a)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        m, a = self.m, self.a
        th, tw = -(-h // m), -(-w // m)
        xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, tw * m + 1 - w, 1, th * m + 1 - h))  # (N, Hp, Wp, C)
        s_n, s_h, s_w, s_c = xp.stride()
        c_out = self.u.shape[-1]
        out = torch.empty(n, th * m, tw * m, c_out)
        rows = max(1, self.chunk_tiles // tw)
        for i in range(n):
            for r0 in range(0, th, rows):
                r = min(rows, th - r0)
                tiles = xp.as_strided(
                    (a, a, r, tw, c), (s_h, s_w, m * s_h, m * s_w, s_c), xp.storage_offset() + i * s_n + r0 * m * s_h
                )
                v = self.kb @ tiles.reshape(a * a, -1)  # (a*a, r*tw*C)
                prod = torch.bmm(v.view(a * a, r * tw, c), self.u)  # (a*a, r*tw, C_out)
                y = (self.ka @ prod.view(a * a, -1)).view(m, m, r, tw, c_out)
                out[i, r0 * m : (r0 + r) * m].view(r, m, tw, m, c_out).copy_(y.permute(2, 0, 3, 1, 4))
        return (out[:, :h, :w] + self.bias).permute(0, 3, 1, 2)


def median_seconds(fn, x, repeats: int) -> float:
    fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


#: (network, layer, channels, H, W): the 3x3 stride-1 convolutions of the benchmark's two cases
LAYERS = [
    ("R50-FPN 800x1088", "FPN output / RPN conv, P2", 256, 200, 272),
    ("R50-FPN 800x1088", "FPN output / RPN conv, P3", 256, 100, 136),
    ("R50-FPN 800x1088", "FPN output / RPN conv, P4; res4 3x3", 256, 50, 68),
    ("R50-FPN 800x1088", "res5 3x3", 512, 25, 34),
    ("R18-FPN 384x512, width 128", "FPN output / RPN conv, P2", 128, 96, 128),
    ("R18-FPN 384x512, width 128", "res2 3x3", 64, 96, 128),
    ("R18-FPN 384x512, width 128", "res3 3x3; FPN / RPN P3", 128, 48, 64),
    ("R18-FPN 384x512, width 128", "res4 3x3", 256, 24, 32),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        "| network | layer | C | H x W | oneDNN ms | F(2x2,3x3) / oneDNN | F(4x4,3x3) / oneDNN | max rel. diff (F4) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for net, layer, c, h, w in LAYERS:
            conv = torch.nn.Conv2d(c, c, 3, padding=1).to(memory_format=torch.channels_last)
            x = torch.randn(1, c, h, w).contiguous(memory_format=torch.channels_last)
            ref = conv(x)
            direct = median_seconds(conv, x, args.repeats)
            ratios, diff = [], 0.0
            for m in (2, 4):
                wino = WinogradConv3x3(conv.weight, conv.bias, m)
                diff = ((wino(x) - ref).abs().max() / ref.abs().max()).item()
                ratios.append(median_seconds(wino, x, args.repeats) / direct)
            cells = [net, layer, c, f"{h} x {w}", f"{direct * 1e3:.1f}", f"{ratios[0]:.2f}", f"{ratios[1]:.2f}"]
            print("| " + " | ".join(str(cell) for cell in cells) + f" | {diff:.1e} |")


if __name__ == "__main__":
    main()
