"""Fast R-CNN on precomputed Selective Search through the command line: a missing proposal
file is one line naming the exact ``detkit proposals`` commands, those commands (run as
printed) make the files, and the shipped recipe then trains and evaluates end to end."""

import json
import shlex
from pathlib import Path

from detkit.cli import main

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "fast_rcnn" / "quickstart_shapes.yaml"

TINY = """
_base_: {recipe}
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
  backbone: {{tiny_widths: [8, 16, 16, 16], out_channels: 16}}
  roi_head: {{fc_dims: [32, 32]}}
  proposals:
    precomputed:
      path: [{tmp}/proposals/ss_train.npz, {tmp}/proposals/ss_test.npz]
train: {{max_iter: 3, warmup_iters: 1, log_period: 1, device: cpu, num_threads: 1}}
"""


def test_missing_proposal_files_name_the_commands_that_make_them(tmp_path, capsys):
    cfg = tmp_path / "fast.yaml"
    cfg.write_text(TINY.format(recipe=RECIPE, root=tmp_path / "shapes", tmp=tmp_path))
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("detkit: error: model.proposals.precomputed.path: proposal files ")
    assert not out.exists()  # nothing started
    commands = line.split("make them with: ", 1)[1].split(" && ")
    train_file, test_file = tmp_path / "proposals" / "ss_train.npz", tmp_path / "proposals" / "ss_test.npz"
    settings = "--mode fast --min-size 8 --max-proposals 2000 --workers 2"  # model.proposals.selective_search
    assert commands == [
        f"detkit proposals {cfg} --split train {settings} --out {train_file}",
        f"detkit proposals {cfg} --split test {settings} --out {test_file}",
    ]
    # run them as printed (one worker process here), then the recipe trains end to end
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "detkit"
        argv[argv.index("--workers") + 1] = "1"
        assert main(argv[1:] + ["--no-progress"]) == 0
    assert train_file.is_file() and test_file.is_file()
    assert main(["train", str(cfg), "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["metric"] == "voc" and set(result["extra"]) == {"voc07"}
    saved = (out / "config.yaml").read_text()
    assert "method: precomputed" in saved and "bg_iou_thresh_lo: 0.1" in saved
    # detkit eval needs the files too, and names the command when one is gone
    test_file.unlink()
    capsys.readouterr()
    assert main(["eval", str(cfg), "--checkpoint", str(out / "model_final.pt"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "--split test" in err[0] and f"--out {test_file}" in err[0] and "--split train" not in err[0]
    )
