"""Distributed runs with torchrun: 2 processes, the gloo backend, on the CPU.

The equality tests need a run whose 2-process result is, by construction, the 1-process
result with the same global batch (4 = 2 x 2) up to float rounding; three things would
differ otherwise, and the config removes them:
- BatchNorm statistics per rank: the 2-process run uses ``norm: syncbn`` (detkit's CPU
  SyncBatchNorm), the 1-process run plain ``bn``; all images have one size, so the padded
  batches hold the same pixels.
- Random sampling (RPN anchors, RoI regions): every rank draws its own stream. The samplers
  take every candidate (batch sizes above the candidate counts, positive fraction 1, no
  ignore band, NMS threshold 1), so no draw decides anything.
- Loss normalisation: DDP averages the ranks' gradients of per-rank mean losses, which
  equals the global mean only when every rank normalises by the same count: fixed image
  size (same anchors), exactly one object per image and a fixed number of proposals.
The images of each step and their flips are the same by design (the ranks split one
global stream; ``detkit.data.loader.NumberedBatches``).

Processes: one torchrun training (module fixture) serves the equality, rank-0-writes,
sharded-evaluation and 2 -> 1 resume tests; a second resumes a 1-process run on 2; a third
has rank 1 fail; a fourth dumps Selective Search proposals sharded, resuming a partial run;
the collective helpers and the CPU SyncBatchNorm are checked in 2 processes started with
torch.multiprocessing.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import detkit.engine.proposals as proposals_engine
from detkit.cli import main
from detkit.config import from_dict
from detkit.data.io import read_image_array
from detkit.data.proposal_files import load_proposals
from detkit.data.shapes import generate_shapes
from detkit.data.voc import load_voc
from detkit.engine import distributed
from detkit.engine.checkpoint import load_checkpoint
from detkit.modeling.build import build_model
from detkit.modeling.proposals.selective_search import selective_search
from detkit.schema import Config

from .dist_worker import helpers_worker

REPO = Path(__file__).resolve().parents[2]
HOOKS = Path(__file__).resolve().parent / "torchrun_hooks"  # sitecustomize: write guard, failure
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
SHAPES = {
    "num_train": 8,
    "num_test": 5,
    "seed": 1,
    "image_size": [64, 64],
    "object_size": [20, 30],
    "objects_per_image": [1, 1],
}
RUN_FOLDER = {
    "config.yaml",
    "metrics.jsonl",
    "model_0000002.pt",
    "model_final.pt",
    "last_checkpoint",
    "run_state.json",
    "eval.json",
    "detections.json",
}


def write_config(tmp: Path) -> Path:
    shapes = {"format": "shapes", "root": str(tmp / "shapes"), "shapes": SHAPES}
    cfg = {
        "data": {
            "train": {**shapes, "split": "train"},
            "test": {**shapes, "split": "test"},
            "input": {"min_size_train": [64], "max_size": 64, "min_size_test": 64, "flip_prob": 0.5},
            "batch_size": 2,
            "test_batch_size": 2,  # 5 test images: batches [0 1] [2 3] [4]; rank 0 gets two, rank 1 one
        },
        "model": {
            "backbone": {"name": "tiny", "out_channels": 8, "tiny_widths": [8, 8, 8, 8], "norm": "syncbn"},
            "anchors": {"sizes": [[16], [32], [64], [128], [256]]},  # 1023 anchors on 64 x 64
            "proposals": {
                "rpn": {
                    "fg_iou_thresh": 0.5,
                    "bg_iou_thresh": 0.5,
                    "batch_size_per_image": 4096,
                    "positive_fraction": 1.0,
                    "post_nms_topk_train": 32,
                    "nms_thresh": 1.0,
                    "pre_nms_topk_test": 100,
                    "post_nms_topk_test": 50,
                }
            },
            "roi_head": {
                "fc_dims": [16, 16],
                "batch_size_per_image": 64,  # > 32 proposals + 1 ground-truth box
                "positive_fraction": 1.0,
                "bg_iou_thresh_lo": 0.0,
                "score_thresh": 0.0,
            },
        },
        "train": {
            "max_iter": 4,
            "base_lr": 0.01,
            "warmup_iters": 0,
            "log_period": 1,
            "checkpoint_period": 2,
            "device": "cpu",
            "num_threads": 1,  # torchrun's processes run 1 thread; float rounding depends on it
            "dist_timeout_min": 5.0,
        },
    }
    from_dict(Config, cfg)  # valid before any process starts
    path = tmp / "cfg.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def torchrun(args, cwd, guard=None, fail=None, timeout=240):
    env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCH_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(HOOKS), str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["OMP_NUM_THREADS"] = "1"
    env.pop("DETKIT_TEST_GUARD", None)
    env.pop("DETKIT_TEST_FAIL", None)
    if guard:
        env["DETKIT_TEST_GUARD"] = str(guard)
    if fail:
        env["DETKIT_TEST_FAIL"] = fail
    start = time.perf_counter()
    proc = subprocess.run(
        TORCHRUN + ["-m", "detkit", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    proc.seconds = time.perf_counter() - start
    return proc


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    """2 processes, 4 iterations (a checkpoint at 2), evaluation; ranks 1+ may not write
    into the run folder (the sitecustomize guard)."""
    tmp = tmp_path_factory.mktemp("dist")
    cfg = write_config(tmp)
    out = tmp / "dist"
    proc = torchrun(["train", cfg, "--out", out, "--no-progress"], tmp, guard=out)
    return tmp, cfg, out, proc


def single_run(cfg, out, *overrides):
    """The same run in this process, on one process with the global batch and plain BN."""
    args = ["train", str(cfg), "--out", str(out), "--no-progress", "data.batch_size=4", "model.backbone.norm=bn"]
    assert main(args + list(overrides)) == 0


def single_reference(tmp, cfg, iterations):
    """The 1-process run trained straight to ``iterations`` (made once per module)."""
    out = tmp / f"single{iterations}"
    if not (out / "model_final.pt").is_file():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            single_run(cfg, out, f"train.max_iter={iterations}")
        finally:
            torch.set_num_threads(threads)
    return out


def losses(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]


def assert_close_states(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k].double().numpy(), b[k].double().numpy(), atol=atol, rtol=0, err_msg=k)


def test_two_processes_train_like_one_process_with_the_global_batch(dist_run, one_thread):
    tmp, cfg, out, proc = dist_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global batch 4 = data.batch_size 2 x 2 processes" in proc.stderr
    single = single_reference(tmp, cfg, 4)
    dist_state, single_state = load_checkpoint(out / "model_final.pt"), load_checkpoint(single / "model_final.pt")
    assert_close_states(dist_state["model"], single_state["model"], atol=1e-5)
    # ... and training moved the weights far more than that (the comparison means something)
    torch.manual_seed(0)
    initial = build_model(from_dict(Config, single_state["config"]).model, 3).state_dict()
    moved = max(float((initial[k] - single_state["model"][k]).abs().max()) for k in initial if k.endswith("weight"))
    assert moved > 1e-2
    # the logged loss is the global batch's (the mean over the ranks), iteration by iteration
    dist_losses, single_losses = losses(out), losses(single)
    assert [r["iter"] for r in dist_losses] == [1, 2, 3, 4] == [r["iter"] for r in single_losses]
    for d, s in zip(dist_losses, single_losses):
        assert d.keys() == s.keys()
        for k in d:
            if k.startswith("loss"):
                assert d[k] == pytest.approx(s[k], abs=1e-5), k
    # the checkpoint knows its world: every rank's random state (different streams), the global batch
    assert dist_state["world_size"] == 2 and dist_state["global_batch"] == 4
    rng = dist_state["rng"]
    assert len(rng["ranks"]) == 2 and not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])
    assert torch.equal(rng["torch"], rng["ranks"][0]["torch"])


def test_only_rank_0_writes_the_run_folder(dist_run):
    tmp, cfg, out, proc = dist_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GUARD VIOLATION" not in proc.stderr  # rank 1 never opened, made or renamed a file there
    assert {p.name for p in out.iterdir()} == RUN_FOLDER
    assert [json.loads(line)["iter"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4, 4, 4]
    assert proc.stdout.count("mAP") == 1  # the result table is printed once (rank 0)


def test_sharded_evaluation_equals_one_process(dist_run, one_thread):
    tmp, cfg, out, proc = dist_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = tmp / "eval_one"
    checkpoint = out / "model_final.pt"
    assert main(["eval", str(cfg), "--checkpoint", str(checkpoint), "--out", str(one), "--no-progress"]) == 0
    dets = json.loads((out / "detections.json").read_text())
    assert len({d["image_id"] for d in dets}) == 5 and len(dets) > 50
    assert dets == json.loads((one / "detections.json").read_text())  # identical detections, same order
    assert json.loads((out / "eval.json").read_text())["mAP"] == json.loads((one / "eval.json").read_text())["mAP"]


def test_resume_on_another_world_size(dist_run, one_thread, capsys):
    """The 2-process run resumed on 1 process with the same global batch continues as the
    1-process run trained straight: the same images from iteration 5 on, the same weights."""
    tmp, cfg, out, proc = dist_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = tmp / "resumed"
    shutil.copytree(out, resumed)
    (resumed / "eval.json").unlink()
    single_run(cfg, resumed, "--resume", "train.max_iter=6")
    assert "resume: 1 processes now, 2 before" in capsys.readouterr().err
    straight = single_reference(tmp, cfg, 6)
    a, b = load_checkpoint(resumed / "model_final.pt"), load_checkpoint(straight / "model_final.pt")
    assert a["iteration"] == 6 and a["world_size"] == 1
    assert_close_states(a["model"], b["model"], atol=1e-5)
    assert [r["iter"] for r in losses(resumed)] == [1, 2, 3, 4, 5, 6]


def test_a_one_process_run_resumed_on_two(dist_run, one_thread, capsys):
    """The other direction: 2 iterations on 1 process (global batch 4), resumed by 2
    processes of batch 2 to iteration 4, equal the 1-process run trained straight to 4."""
    tmp, cfg, _, _ = dist_run
    out = tmp / "one_then_two"
    single_run(cfg, out, "train.max_iter=2")
    proc = torchrun(["train", cfg, "--out", out, "--resume", "--no-progress"], tmp, guard=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resume: 2 processes now, 1 before" in proc.stderr and "GUARD VIOLATION" not in proc.stderr
    state = load_checkpoint(out / "model_final.pt")
    assert state["iteration"] == 4 and state["world_size"] == 2
    assert_close_states(
        state["model"], load_checkpoint(single_reference(tmp, cfg, 4) / "model_final.pt")["model"], 1e-5
    )
    assert [r["iter"] for r in losses(out)] == [1, 2, 3, 4]


def test_a_failing_rank_stops_every_rank_with_its_message(tmp_path):
    """Rank 1 raises at iteration 2 while rank 0 goes into the iteration's collectives: both
    stop within seconds (not at a timeout), rank 1's line names it, torchrun's summary gives
    rank 1 and its message as the root cause, and rank 0 says why it stopped."""
    cfg = write_config(tmp_path)
    out = tmp_path / "run"
    proc = torchrun(["train", cfg, "--out", out, "--no-progress"], tmp_path, fail="1:2")
    err = proc.stderr
    assert proc.returncode != 0
    assert proc.seconds < 150  # dist_timeout_min is 5 minutes: nobody waited for it
    assert "detkit: error: [rank 1 of 2] injected failure at iteration 2" in err
    root = err[err.index("Root Cause") :]
    assert "rank      : 1" in root and "[rank 1 of 2] injected failure at iteration 2" in root
    assert "detkit: error: [rank 0 of 2] stopped during iteration 2: another rank failed or was lost" in err
    assert "]: Traceback" not in err  # no rank printed a traceback ([rankN]: ...): one line each
    assert not (out / "model_final.pt").exists() and not (out / "model_0000002.pt").exists()


def test_sharded_selective_search_resumes_a_partial_run(tmp_path, monkeypatch):
    """A 1-process dump interrupted after 2 of 5 images is finished by 2 processes (rank 0
    writes every chunk, rank 1 nothing): the file equals direct selective_search calls."""
    root = generate_shapes(tmp_path / "shapes", num_train=1, num_test=5, seed=3)
    data = tmp_path / "data.yaml"
    data.write_text(f"format: voc\nroot: {root}\nsplit: test\n")
    records = load_voc(root, "test").records
    out = tmp_path / "out" / "ss.npz"
    args = ["proposals", str(data), "--out", str(out), "--min-size", "10", "--no-progress", "--flush-every", "1"]
    calls = []

    def interrupted_after_two(image, *a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return selective_search(image, *a, **k)

    monkeypatch.setattr(proposals_engine, "selective_search", interrupted_after_two)
    assert main(args) == 130
    partial = out.with_name("ss.npz.partial")
    assert len(list(partial.glob("chunk_*.npz"))) == 2

    proc = torchrun(args, tmp_path, guard=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stderr and "2 of 5 images done, 3 to go" in proc.stderr
    assert "GUARD VIOLATION" not in proc.stderr
    table, meta = load_proposals(out)
    assert list(table) == [r.image_id for r in records] and meta["num_images"] == 5
    for r in records:
        boxes, scores = selective_search(read_image_array(r.file_name), "fast", min_size=10, max_boxes=2000, seed=0)
        np.testing.assert_array_equal(table[r.image_id][0], boxes)
        np.testing.assert_array_equal(table[r.image_id][1], scores)
    assert not partial.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["ss.npz"]


# -- the collective helpers and the CPU SyncBatchNorm, in 2 processes ---------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_collective_helpers_and_cpu_syncbn_in_two_processes(tmp_path):
    torch.multiprocessing.spawn(helpers_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["shard"] == [0, 2, 4, 6] and r1["shard"] == [1, 3, 5]
    assert r0["broadcast"] == r1["broadcast"] == {"from": 0}
    assert r0["gather"] == [0, 10] and r1["gather"] is None
    assert r0["all_gather"] == r1["all_gather"] == [0, 10]
    assert r0["sum"] == r1["sum"] == [1.0, 3.0]
    assert r0["any"] == r1["any"] == (True, False)
    assert r0["failure"] == r1["failure"] == (1, "loss is nan here")  # every rank learns who and why
    assert r0["no_failure"] is None and r1["no_failure"] is None
    assert r0["on_main"] == ("UsageError", "output folder is in the way", False)  # rank 0: its own error
    assert r1["on_main"] == ("DistributedError", "stopped: rank 0 failed: output folder is in the way", True)
    # rank 0 writes every round: round 1 = rank 0's [0, 2] + rank 1's [1, 3], round 2 = [4] + []
    assert r0["rounds"] == [[0, 2, 1, 3], [4]] and r1["rounds"] == []
    assert r0["synced"] == r1["synced"] == [0.0, 0.0, 0.0]
    for r in (r0, r1):
        s = r["syncbn"]
        assert s["grad_scale"] > 0.1  # the gradients compared are not all zero
        assert max(s["out"], s["input_grad"], s["weight_grad"], s["running_mean"], s["running_var"]) < 1e-5, s
        assert s["eval"] < 1e-6


def test_syncbn_on_one_process_is_refused_in_one_line(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"detkit: error: {distributed.SYNCBN_NEEDS_PROCESSES}"
    assert not (tmp_path / "run").exists()


def test_commands_without_sharding_refuse_torchrun(monkeypatch, capsys):
    for key, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="x", MASTER_PORT="1").items():
        monkeypatch.setenv(key, value)
    assert main(["data", "check", "nonexistent.yaml"]) == 2
    assert "detkit data runs in one process: start it without torchrun" in capsys.readouterr().err


def test_a_partial_launch_environment_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert main(["eval", str(write_config(tmp_path)), "--checkpoint", "x.pt"]) == 2
    err = capsys.readouterr().err
    assert "WORLD_SIZE=2 is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not: start detkit with torchrun" in err


def test_ddp_unused_parameter_errors_name_the_setting():
    from detkit.engine.trainer import _unused_parameters_named
    from detkit.errors import TrainingError

    ddp_text = (
        "Expected to have finished reduction in the prior iteration before starting a new one. This error "
        "indicates that your module has parameters that were not used in producing loss. You can enable unused "
        "parameter detection by passing the keyword argument `find_unused_parameters=True`"
    )
    with pytest.raises(TrainingError, match="^iteration 3: some trainable parameters received no gradient.*"):
        with _unused_parameters_named(2):
            raise RuntimeError(ddp_text)
    with pytest.raises(RuntimeError, match="something else"):  # other errors pass unchanged
        with _unused_parameters_named(2):
            raise RuntimeError("something else")
