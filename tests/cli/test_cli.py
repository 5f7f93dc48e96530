"""End to end through the command line: train -> eval -> demo on a tiny generated dataset,
the detection-file evaluator, and the user-error paths (one line, exit code 2)."""

import json
import re
from pathlib import Path

import pytest

from detkit.cli import main

TINY = """
data:
  train:
    format: shapes
    root: {root}
    split: train
    shapes: &s {{num_train: 6, num_test: 3, seed: 1, image_size: [96, 112], object_size: [20, 40]}}
  test:
    format: shapes
    root: {root}
    split: test
    shapes: *s
  input: {{min_size_train: [96], max_size: 128, min_size_test: 96}}
  batch_size: 2
model:
  backbone: {{name: tiny, out_channels: 16, tiny_widths: [8, 16, 16, 16]}}
  anchors: {{sizes: [[16], [32], [64], [128], [256]]}}
  roi_head: {{fc_dims: [32, 32], batch_size_per_image: 32}}
  proposals:
    rpn: {{pre_nms_topk_train: 200, post_nms_topk_train: 100, pre_nms_topk_test: 100, post_nms_topk_test: 50}}
train: {{max_iter: 4, warmup_iters: 2, checkpoint_period: 2, log_period: 2, device: cpu, num_threads: 1}}
test: {{metric: voc, extra_metrics: [voc07, coco]}}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(TINY.format(root=tmp / "shapes"))
    out = tmp / "run"
    assert main(["train", str(cfg), "--out", str(out), "--no-progress"]) == 0
    return cfg, out


def test_train_writes_the_run_folder(run):
    cfg, out = run
    for name in ("config.yaml", "metrics.jsonl", "model_final.pt", "model_0000002.pt", "eval.json", "detections.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in records if "loss" in r]
    assert [r["iter"] for r in train] == [2, 4]
    for key in ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "lr", "s_per_iter", "eta_s"):
        assert key in train[0]
    evals = [r for r in records if "eval_mAP" in r]
    assert len(evals) == 1 and "val_loss" in evals[0] and "val_loss_cls" in evals[0]
    result = json.loads((out / "eval.json").read_text())
    assert result["metric"] == "voc" and 0.0 <= result["mAP"] <= 1.0
    assert set(result["per_class"]) == {"circle", "square", "triangle"}
    assert set(result["extra"]) == {"voc07", "coco"}
    # The saved config is the resolved one, with the class list filled in.
    assert "circle" in (out / "config.yaml").read_text()


def test_train_refuses_a_folder_with_a_run(run, capsys):
    cfg, out = run
    assert main(["train", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and "--resume" in err[0]


def test_eval_and_evaluate_agree(run, tmp_path):
    cfg, out = run
    assert (
        main(
            [
                "eval",
                str(cfg),
                "--checkpoint",
                str(out / "model_final.pt"),
                "--out",
                str(tmp_path / "e"),
                "--no-progress",
            ]
        )
        == 0
    )
    ours = json.loads((tmp_path / "e" / "eval.json").read_text())
    # The same detections scored from the file by `detkit evaluate` give the same numbers.
    data = tmp_path / "data.yaml"
    data.write_text(
        f"format: shapes\nroot: {out.parent / 'shapes'}\nsplit: test\n"
        "shapes: {num_train: 6, num_test: 3, seed: 1, image_size: [96, 112], object_size: [20, 40]}\n"
    )
    assert (
        main(
            [
                "evaluate",
                "--dataset",
                str(data),
                "--detections",
                str(tmp_path / "e" / "detections.json"),
                "--metric",
                "voc",
                "--out",
                str(tmp_path / "ev.json"),
            ]
        )
        == 0
    )
    again = json.loads((tmp_path / "ev.json").read_text())
    # Not two empty evaluations agreeing: the model detects something (mAP 0.10 here).
    assert ours["mAP"] > 0 and len(json.loads((tmp_path / "e" / "detections.json").read_text())) > 0
    assert again["mAP"] == pytest.approx(ours["mAP"], abs=1e-12)
    assert again["per_class"] == pytest.approx(ours["per_class"], nan_ok=True)


def test_demo_writes_json_and_png_and_names_bad_inputs(run, tmp_path, capsys):
    cfg, out = run
    images = sorted((out.parent / "shapes" / "JPEGImages").glob("test_*.png"))
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    code = main(
        [
            "demo",
            "--checkpoint",
            str(out / "model_final.pt"),
            "--out",
            str(tmp_path / "demo"),
            str(images[0]),
            str(bad),
            str(images[1]),
        ]
    )
    assert code == 1  # one input failed, the others were processed
    assert "notes.png" in capsys.readouterr().err
    for im in images[:2]:
        record = json.loads((tmp_path / "demo" / f"{im.stem}.json").read_text())
        assert record["width"] > 0 and isinstance(record["detections"], list)
        for d in record["detections"]:
            assert d["class"] in ("circle", "square", "triangle") and len(d["box"]) == 4
        assert (tmp_path / "demo" / f"{im.stem}.png").stat().st_size > 0
    assert not (tmp_path / "demo" / "notes.json").exists()


def test_resume_from_a_finished_run_trains_further(run, tmp_path):
    import shutil

    cfg, out = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert main(["train", str(cfg), "--out", str(copy), "--resume", "--no-progress", "train.max_iter=6"]) == 0
    records = [json.loads(line) for line in open(copy / "metrics.jsonl")]
    assert [r["iter"] for r in records if "loss" in r] == [2, 4, 6]
    # The evaluation stage ran again, on the further-trained model.
    assert [r["iter"] for r in records if "eval_mAP" in r] == [4, 6]
    # Exactly what an uninterrupted 6-iteration run gives: same losses, same weights.
    import torch

    from detkit.engine.checkpoint import load_checkpoint

    straight = tmp_path / "straight"
    assert main(["train", str(cfg), "--out", str(straight), "--no-progress", "train.max_iter=6", "data.test=null"]) == 0
    losses = [json.loads(line)["loss"] for line in open(straight / "metrics.jsonl") if '"loss"' in line]
    assert [r["loss"] for r in records if "loss" in r] == losses
    a = load_checkpoint(copy / "model_final.pt")["model"]
    b = load_checkpoint(straight / "model_final.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "missing.yaml"], "config file not found: missing.yaml"),
        (["evaluate", "--dataset", "nope.yaml", "--detections", "d.json"], "dataset file not found: nope.yaml"),
    ],
)
def test_user_errors_are_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"detkit: error: {message}"]


def test_unknown_config_key_names_file_and_suggestion(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  max_iters: 10\n")
    assert main(["train", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown key 'train.max_iters'" in err and "bad.yaml" in err and "train.max_iter" in err


def test_checkpoint_of_another_architecture(run, tmp_path, capsys):
    cfg, out = run
    assert (
        main(
            [
                "eval",
                str(cfg),
                "--checkpoint",
                str(out / "model_final.pt"),
                "--out",
                str(tmp_path / "x"),
                "model.roi_head.fc_dims=[64,64]",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "roi_head.box_head.fc6.weight" in err


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for cmd in ("train", "eval", "demo", "evaluate", "data", "convert"):
        assert cmd in text


def test_python_dash_m_detkit_is_the_cli():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "detkit", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "train" in out.stdout and "proposals" in out.stdout


def test_same_seed_same_losses(run, tmp_path):
    cfg, _ = run
    losses = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert (
            main(
                [
                    "train",
                    str(cfg),
                    "--out",
                    str(out),
                    "--no-progress",
                    "train.max_iter=2",
                    "train.log_period=1",
                    "train.checkpoint_period=0",
                    "data.test=null",
                ]
            )
            == 0
        )
        losses.append([json.loads(line)["loss"] for line in open(out / "metrics.jsonl") if "loss" in line])
    assert losses[0] == losses[1] and len(losses[0]) == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.loss_weights={loss_rpn_clss: 2.0}", "unknown loss 'loss_rpn_clss' (did you mean 'loss_rpn_cls'?)"),
        ("data.batch_size=0", "batch sizes must be >= 1"),
    ],
)
def test_bad_values_fail_with_the_key(run, tmp_path, capsys, override, message):
    cfg, _ = run
    assert main(["train", str(cfg), "--out", str(tmp_path / "o"), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_checkpoints_load_without_fetching_pretrained_weights(run, tmp_path):
    # The stored config may name ImageNet weights (here a file that does not exist): every
    # weight comes from the checkpoint, so evaluation must neither load nor download them.
    from detkit.engine.checkpoint import load_checkpoint, save_checkpoint
    from detkit.engine.predictor import model_from_checkpoint

    cfg, out = run
    state = load_checkpoint(out / "model_final.pt")
    state["config"]["model"]["backbone"]["pretrained"] = str(tmp_path / "missing_imagenet.pth")
    save_checkpoint(tmp_path / "ckpt.pt", state)
    model, loaded_cfg, names = model_from_checkpoint(tmp_path / "ckpt.pt")
    assert names == ["circle", "square", "triangle"] and not model.training


def test_default_run_folder_never_reuses_and_resume_picks_the_newest(tmp_path, monkeypatch):
    from detkit.cli.common import default_out
    from detkit.engine.trainer import RUN_FILES

    monkeypatch.chdir(tmp_path)
    assert default_out("configs/x.yaml", RUN_FILES) == Path("work_dirs/x")
    for name in ("x", "x_1"):
        (tmp_path / "work_dirs" / name).mkdir(parents=True)
        (tmp_path / "work_dirs" / name / "metrics.jsonl").write_text("{}\n")
    assert default_out("configs/x.yaml", RUN_FILES) == Path("work_dirs/x_2")
    assert default_out("configs/x.yaml", RUN_FILES, resume=True) == Path("work_dirs/x_1")


def test_resume_keeps_the_original_config(run, tmp_path):
    import shutil

    cfg, out = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    original = (copy / "config.yaml").read_bytes()
    assert main(["train", str(cfg), "--out", str(copy), "--resume", "--no-progress", "train.max_iter=5"]) == 0
    assert (copy / "config.yaml").read_bytes() == original
    (changed,) = copy.glob("config_resume_*.yaml")
    assert "max_iter: 5" in changed.read_text()


def test_demo_boxes_are_the_evaluated_detections(run, tmp_path):
    """The demo's boxes (original pixels) are the detections `detkit eval` scores."""
    cfg, out = run
    image = sorted((out.parent / "shapes" / "JPEGImages").glob("test_*.png"))[0]
    assert (
        main(
            [
                "demo",
                "--checkpoint",
                str(out / "model_final.pt"),
                "--out",
                str(tmp_path / "d"),
                "--score-thresh",
                "0.05",
                str(image),
            ]
        )
        == 0
    )
    demo = json.loads((tmp_path / "d" / f"{image.stem}.json").read_text())["detections"]
    evaluated = [d for d in json.loads((out / "detections.json").read_text()) if d["image_id"] == image.stem]
    assert len(demo) == len(evaluated) > 0
    for d, e in zip(sorted(demo, key=lambda d: -d["score"]), sorted(evaluated, key=lambda e: -e["score"])):
        x, y, w, h = e["bbox"]  # VOC file coordinates: xmin = x1 + 1, w = x2 - x1 - 1
        assert d["box"] == pytest.approx([x - 1, y - 1, x + w, y + h], abs=0.01)
        assert d["class"] == e["category"]


# -- failure matrix: one exact line on stderr, exit status 2, nothing of the run lost ----------
def error_of(capsys) -> str:
    """The one error line of a failed command (log lines may precede it; no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("detkit: error:")]
    assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0]), err
    return errors[0]


def corrupt_checkpoint(path: Path) -> Path:
    import numpy as np

    path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8)))
    return path


def not_a_checkpoint(path) -> str:
    return f"detkit: error: {path} is not a readable detkit checkpoint (corrupt, truncated, or not a torch file)"


def test_corrupt_checkpoint_in_eval_and_demo(run, tmp_path, capsys):
    cfg, out = run
    bad = corrupt_checkpoint(tmp_path / "random_bytes.pt")
    assert main(["eval", str(cfg), "--checkpoint", str(bad), "--out", str(tmp_path / "e")]) == 2
    assert error_of(capsys) == not_a_checkpoint(bad)
    image = sorted((out.parent / "shapes" / "JPEGImages").glob("test_*.png"))[0]
    assert main(["demo", "--checkpoint", str(bad), "--out", str(tmp_path / "d"), str(image)]) == 2
    line = error_of(capsys)
    assert line == not_a_checkpoint(bad) and "weights_only" not in line


def test_corrupt_checkpoint_on_resume(run, tmp_path, capsys):
    import shutil

    cfg, out = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    corrupt_checkpoint(copy / "model_final.pt")
    assert main(["train", str(cfg), "--out", str(copy), "--resume", "--no-progress", "train.max_iter=6"]) == 2
    assert error_of(capsys) == not_a_checkpoint(copy / "model_final.pt")
    assert (copy / "model_0000002.pt").read_bytes() == (out / "model_0000002.pt").read_bytes()


def test_nan_loss_through_train(run, tmp_path, capsys):
    import re

    cfg, _ = run
    out = tmp_path / "nan"
    assert main(["train", str(cfg), "--out", str(out), "--no-progress", "model.loss_weights={loss_cls: .nan}"]) == 2
    number = r"[-+0-9.e]+"
    assert re.fullmatch(
        rf"detkit: error: loss became nan at iteration 1 \(loss_rpn_cls={number}, loss_rpn_box={number}, "
        rf"loss_cls=nan, loss_box={number}\); stopped before the update\. Last good checkpoint: none\. "
        r"Try a lower train\.base_lr or train\.clip_grad_norm",
        error_of(capsys),
    )
    assert not (out / "model_final.pt").exists()


def test_config_value_rejected_by_the_schema(run, tmp_path, capsys):
    cfg, _ = run
    assert main(["train", str(cfg), "--out", str(tmp_path / "o"), "data.batch_size=0"]) == 2
    assert error_of(capsys) == f"detkit: error: data: batch sizes must be >= 1, got 0 / 1 (in {cfg})"
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_write_that_fails_halfway(run, tmp_path, capsys, monkeypatch):
    """The disk fills up while model_0000003.pt is written: one line, exit 2; the checkpoints
    before it are intact and a resume continues from iteration 2."""
    import torch

    from detkit.engine.checkpoint import load_checkpoint

    cfg, _ = run
    out = tmp_path / "full"
    real_save = torch.save
    calls = []

    def fill_the_disk(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 3:
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04 half a zip file")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fill_the_disk)
    args = ["train", str(cfg), "--out", str(out), "--no-progress", "train.checkpoint_period=1", "data.test=null"]
    assert main(args) == 2
    assert error_of(capsys) == (
        f"detkit: error: cannot write checkpoint {out / 'model_0000003.pt'}: No space left on device "
        "(nothing was written)"
    )
    assert sorted(p.name for p in out.glob("*.pt")) == ["model_0000001.pt", "model_0000002.pt"]
    assert load_checkpoint(out / "model_0000002.pt")["iteration"] == 2
    assert (out / "last_checkpoint").read_text() == "model_0000002.pt\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    monkeypatch.setattr(torch, "save", real_save)
    assert main(args + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert f"resumed from {out / 'model_0000002.pt'} at iteration 2" in err
    assert load_checkpoint(out / "model_final.pt")["iteration"] == 4


@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_that_breaks_during_training_is_skipped(run, tmp_path, capsys, monkeypatch, workers):
    """An image that became unreadable after the dataset was loaded (and validated) is replaced
    in its batch with a warning naming the file; the run finishes."""
    import shutil

    import detkit.cli.train as train_cli

    cfg, out = run
    data = tmp_path / "shapes"
    shutil.copytree(out.parent / "shapes", data)
    config = tmp_path / "tiny.yaml"
    config.write_text(cfg.read_text().replace(str(out.parent / "shapes"), str(data)))
    broken = data / "JPEGImages" / "train_00002.png"
    real_build = train_cli.build_datasets

    def build_then_break(*args, **kwargs):
        datasets = real_build(*args, **kwargs)
        broken.write_bytes(b"\x89PNG\r\n\x1a\n and then nothing but garbage")
        return datasets

    monkeypatch.setattr(train_cli, "build_datasets", build_then_break)
    run_dir = tmp_path / "run"
    argv = ["train", str(config), "--out", str(run_dir), "--no-progress", "train.max_iter=6", "train.log_period=6"]
    assert main(argv + [f"data.num_workers={workers}"]) == 0
    err = capsys.readouterr().err.splitlines()
    warnings = [line for line in err if line.startswith("warning: train:")]
    assert warnings[0] == (
        f"warning: train: skipped an unreadable image: cannot decode image: {broken} (not an image or corrupt); "
        "another image of the same orientation takes its place"
    )
    assert len(warnings) == 2 and re.fullmatch(
        r"warning: train: 1 unreadable image skipped (\d+) times \(train_00002\.png\)", warnings[1]
    )
    assert (run_dir / "model_final.pt").is_file() and (run_dir / "eval.json").is_file()
    # Every batch kept its size: the broken image was replaced, not dropped.
    assert [json.loads(line)["iter"] for line in open(run_dir / "metrics.jsonl") if '"loss"' in line] == [6]


def test_eval_skips_an_unreadable_test_image_and_says_so(run, tmp_path, capsys, monkeypatch):
    import shutil

    import detkit.cli.eval as eval_cli

    cfg, out = run
    data = tmp_path / "shapes"
    shutil.copytree(out.parent / "shapes", data)
    config = tmp_path / "tiny.yaml"
    config.write_text(cfg.read_text().replace(str(out.parent / "shapes"), str(data)))
    broken = data / "JPEGImages" / "test_00001.png"
    real_build = eval_cli.build_dataset

    def build_then_break(*args, **kwargs):
        dataset = real_build(*args, **kwargs)
        broken.write_bytes(b"not an image")
        return dataset

    monkeypatch.setattr(eval_cli, "build_dataset", build_then_break)
    argv = ["eval", str(config), "--checkpoint", str(out / "model_final.pt"), "--out", str(tmp_path / "e")]
    assert main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: eval:")]
    assert warnings == [
        f"warning: eval: skipped an unreadable image: cannot decode image: {broken} (not an image or corrupt); "
        "it gets no detections: its ground truth counts as missed",
        "warning: eval: 1 of 3 images could not be read and were skipped; their ground truth counts as missed",
    ]
    detections = json.loads((tmp_path / "e" / "detections.json").read_text())
    assert detections and not [d for d in detections if d["image_id"] == "test_00001"]
