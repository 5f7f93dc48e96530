"""Subnormal floats are flushed to zero on the CPU (train.flush_denormal), in every thread of
torch's pool. The mode is a per-thread CPU flag that threads inherit when they start, so the
command line must switch it on before any tensor work starts the pool: checked in fresh
processes with two threads, where half of a large elementwise product runs on the second one."""

import subprocess
import sys
import textwrap

import pytest
import torch

from detkit.engine.inference import _denormals_flushed_now, denormals_flushed

# x * x with x = 1e-20 is 1e-40, a subnormal: 0 where the computing thread flushes.
PROBE = """
import torch
def subnormal_results():
    x = torch.full((4_000_000,), 1e-20)
    return int(((x * x) != 0).sum())
"""


def run_python(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, check=True
    )
    return out.stdout.strip().splitlines()[-1]


def test_the_block_flushes_and_restores_this_thread():
    before = _denormals_flushed_now()
    with denormals_flushed(True):
        assert _denormals_flushed_now()
        assert float(torch.tensor([1e-20]) * torch.tensor([1e-20])) == 0.0
    assert _denormals_flushed_now() == before
    with denormals_flushed(False):
        assert _denormals_flushed_now() == before


@pytest.mark.parametrize("flush, expect_zero", [(True, True), (False, False)])
def test_detkit_train_switches_the_mode_on_before_the_thread_pool_starts(tmp_path, flush, expect_zero):
    # The command's work (datasets, model, training) is replaced by the probe: it runs where
    # that work would, with the pool started there for the first time.
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"train: {{flush_denormal: {str(flush).lower()}, num_threads: 2}}\n")
    code = (
        PROBE
        + f"""
import detkit.cli.train as train_cli
from detkit.cli import main
torch.set_num_threads(2)
train_cli._run = lambda args, cfg: print(subnormal_results()) or 0
main(["train", {str(cfg)!r}, "--out", {str(tmp_path / "run")!r}])
"""
    )
    count = int(run_python(code))
    assert (count == 0) == expect_zero, count
