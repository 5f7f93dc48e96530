"""Reading run folders back: metrics.jsonl (robust to a crash's cut-off line, one-line
errors otherwise) and the training-curves figure drawn from it."""

import json
import logging

import pytest

from detkit.cli import main
from detkit.engine.report import RunFolderError, check_run_dir, curves_figure, read_metrics, run_names

# What the trainer writes (detkit/engine/trainer.py): training records every log_period,
# evaluation records with validation losses, one train_minutes record per session.
RECORDS = [
    {"iter": 10, "lr": 0.004, "loss_rpn_cls": 0.6, "loss_rpn_box": 0.1, "loss_cls": 1.0, "loss_box": 0.3,
     "loss": 2.0, "s_per_iter": 0.2, "data_s_per_iter": 0.01, "eta_s": 6.0},
    {"iter": 20, "lr": 0.01, "loss_rpn_cls": 0.4, "loss_rpn_box": 0.08, "loss_cls": 0.7, "loss_box": 0.3,
     "loss": 1.48, "s_per_iter": 0.2, "data_s_per_iter": 0.01, "eta_s": 4.0},
    {"iter": 20, "eval_metric": "voc", "eval_mAP": 0.25, "eval_s_per_img": 0.05, "val_loss_rpn_cls": 0.45,
     "val_loss_rpn_box": 0.09, "val_loss_cls": 0.8, "val_loss_box": 0.31, "val_loss": 1.65},
    {"iter": 40, "lr": 0.01, "loss_rpn_cls": 0.3, "loss_rpn_box": 0.07, "loss_cls": 0.5, "loss_box": 0.25,
     "loss": 1.12, "s_per_iter": 0.2, "data_s_per_iter": 0.01, "eta_s": 0.0},
    {"iter": 40, "train_minutes": 0.2},
    {"iter": 40, "eval_metric": "voc", "eval_mAP": 0.5, "eval_s_per_img": 0.05, "val_loss": 1.2},
]  # fmt: skip


def write_run(path, records=RECORDS, tail=""):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text("data: {}\n")
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def test_read_metrics_keeps_every_record(tmp_path):
    run = write_run(tmp_path / "run")
    records = read_metrics(run)
    assert len(records) == 6
    assert [r["iter"] for r in records] == [10, 20, 20, 40, 40, 40]
    evals = [r for r in records if "eval_mAP" in r]
    assert [r["eval_mAP"] for r in evals] == [0.25, 0.5] and evals[0]["val_loss_cls"] == 0.8


def test_cut_off_last_line_is_skipped_with_a_warning(tmp_path, caplog):
    run = write_run(tmp_path / "run", tail='{"iter": 60, "lr": 0.01, "loss_rpn_cls": 0.')
    with caplog.at_level(logging.WARNING, logger="detkit"):
        records = read_metrics(run)
    assert len(records) == 6 and max(r["iter"] for r in records) == 40
    assert "cut-off last line 7" in caplog.text


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "metrics.jsonl not found"),
        ("empty", "no complete record"),
        ("only_cut", "no complete record"),
        ("damaged_middle", "line 2 is not JSON"),
        ("not_object", "line 1 is not a JSON object"),
        ("not_a_run", "is not a detkit run folder"),
        ("a_file", "is not a folder"),
        ("nowhere", "run folder not found"),
    ],
)
def test_bad_runs_are_one_line_errors(tmp_path, case, message):
    run = tmp_path / "run"
    if case == "missing":
        run.mkdir()
        (run / "config.yaml").write_text("{}\n")
    elif case == "empty":
        write_run(run, records=[])
    elif case == "only_cut":
        write_run(run, records=[], tail='{"iter": 20, "lo')
    elif case == "damaged_middle":
        lines = [json.dumps(r) for r in RECORDS]
        lines[1] = lines[1][:30]
        write_run(run, records=[])
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    elif case == "not_object":
        write_run(run, records=[], tail="[1, 2]\n")
    elif case == "not_a_run":
        run.mkdir()
        (run / "notes.txt").write_text("hello")
    elif case == "a_file":
        run.write_text("hello")
    with pytest.raises(RunFolderError, match=message) as info:
        read_metrics(run)
    assert "\n" not in str(info.value)


def test_plot_command_writes_a_png_of_several_runs(tmp_path):
    a = write_run(tmp_path / "a" / "run")
    b = write_run(tmp_path / "b" / "run", records=RECORDS[:2])
    out = tmp_path / "curves.png"
    assert main(["plot", str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 10_000
    # Same folder names: the parent tells them apart.
    assert run_names([a, b]) == ["a/run", "b/run"]
    fig = curves_figure([a, b], names=["first", "second"])
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == [
        "loss (train vs validation)",
        "loss_box",
        "loss_cls",
        "loss_rpn_box",
        "loss_rpn_cls",
        "learning rate",
        "eval mAP",
    ]
    # Run "first" has train and validation loss; "second" only train.
    loss_ax = fig.axes[0]
    labels = [line.get_label() for line in loss_ax.get_lines()]
    assert labels == ["first", "first (val)", "second"]
    train_line = loss_ax.get_lines()[0]
    assert list(train_line.get_xdata()) == [10, 20, 40] and list(train_line.get_ydata()) == [2.0, 1.48, 1.12]
    map_ax = fig.axes[6]
    assert list(map_ax.get_lines()[0].get_ydata()) == [0.25, 0.5]


def test_plot_command_bad_run_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a detkit run folder" in err[0]
    assert not (tmp_path / "x.png").exists()


def test_check_run_dir(tmp_path):
    run = write_run(tmp_path / "run")
    assert check_run_dir(run) == run
