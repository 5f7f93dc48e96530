"""``detkit compare`` on a tiny budget: a table with every stage row (pending rows for configs
that do not exist yet, failed rows with their one-line reason), the JSON and the PNG; a rerun
loads the finished runs instead of training again; a missing proposal file and a stage that
crashes fail their own rows only; composing a stage's config (data replaced, classes reset,
budget scaled) by hand."""

import json
import shlex

import pytest

from detkit.cli import compare as compare_cli
from detkit.cli import main
from detkit.config import load_config
from detkit.engine.compare import CONFIG_ROOT, RECIPES, STAGES, compose_stage_config
from detkit.schema import Config

DATA = """
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
train: {{num_threads: 1, device: cpu, log_period: 1}}
"""
# The recipe's networks made smaller for the test (every stage gets the same overrides).
SMALL = ["model.backbone.tiny_widths=[8,16,16,16]", "model.backbone.out_channels=16", "model.roi_head.fc_dims=[32,32]"]


def _compare(data, out, *extra):
    args = ["compare", str(data), "--out", str(out), "--iters", "2", "--workers", "1", "--time-images", "2"]
    return main(args + ["--no-progress", *extra, *SMALL])


def _rows(out):
    return {r["key"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}


def _expected_pending(recipe="shapes"):
    return {s.key for s in STAGES if s.family and not (CONFIG_ROOT / RECIPES[recipe].configs[s.family]).is_file()}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    data = tmp / "data.yaml"
    data.write_text(DATA.format(root=tmp / "shapes"))
    out = tmp / "out"
    assert _compare(data, out) == 0
    return data, out


def test_every_stage_has_a_row_and_the_files_are_written(compared):
    data, out = compared
    rows = _rows(out)
    assert list(rows) == [s.key for s in STAGES]
    pending = _expected_pending()
    for key, row in rows.items():
        if key in pending:  # configs/rcnn/shapes.yaml etc. (issue 9) not written yet
            assert row["status"] == "pending" and "does not exist yet" in row["reason"], row
            assert row["mAP_voc"] is None
        else:
            assert row["status"] == "trained", row
            assert 0.0 <= row["mAP_voc"] <= 1.0 and 0.0 <= row["mAP_voc07"] <= 1.0
            assert row["s_features"] > 0 and row["s_head"] > 0 and row["params"] > 0 and row["size_mb"] > 0
            assert row["s_total"] == pytest.approx(row["s_proposals"] + row["s_features"] + row["s_head"])
    # the same Selective Search files for every SS stage, its time from the file's meta
    meta = json.loads((out / "compare.json").read_text())["meta"]
    assert meta["selective_search"]["seconds_per_image"] > 0
    fast = load_config(out / "configs" / "fast_rcnn.yaml", Config)
    assert fast.model.proposals.precomputed.path == meta["proposal_files"]
    assert rows["fast_rcnn"]["s_proposals"] >= meta["selective_search"]["seconds_per_image"]
    # the same backbone and budget everywhere; the SVD variants are the paper's fractions
    faster = load_config(out / "configs" / "faster_rcnn.yaml", Config)
    for cfg in (fast, faster):
        assert cfg.model.backbone.name == "tiny" and cfg.model.backbone.tiny_widths == [8, 16, 16, 16]
        assert cfg.train.max_iter == 2 and cfg.test.metric == "voc" and cfg.test.extra_metrics == ["voc07"]
    assert rows["fast_rcnn_svd"]["svd"] == {"fc6": 8, "fc7": 2}  # 32 / 4, 32 / 16
    assert rows["fast_rcnn_svd"]["params"] < rows["fast_rcnn"]["params"]
    # SPP-net keeps its recipe's upscaled input (Recipe.family_settings), the others take the data's
    spp = load_config(out / "configs" / "spp.yaml", Config)
    assert spp.data.input.min_size_test == 256 and fast.data.input.min_size_test == 96
    # the row's mAP is the run's own evaluation
    run_eval = json.loads((out / "faster_rcnn" / "eval.json").read_text())
    assert rows["faster_rcnn"]["mAP_voc"] == run_eval["mAP"]
    table = (out / "compare.md").read_text()
    for spec in STAGES:
        assert f"| {spec.label} |" in table
    assert "## The papers' relationships on this data" in table
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_rerun_loads_the_finished_runs(compared, capsys):
    data, out = compared
    stamp = (out / "fast_rcnn" / "metrics.jsonl").stat().st_mtime_ns
    before = _rows(out)
    assert _compare(data, out) == 0
    after = _rows(out)
    assert (out / "fast_rcnn" / "metrics.jsonl").stat().st_mtime_ns == stamp  # not trained again
    for key, row in after.items():
        assert row["status"] == ("loaded" if before[key]["status"] == "trained" else before[key]["status"])
        assert row["mAP_voc"] == before[key]["mAP_voc"] and row["s_head"] == before[key]["s_head"]  # timings cached


def test_missing_proposal_files_and_other_configs_fail_their_rows_only(compared, tmp_path):
    data, out = compared
    missing = [str(tmp_path / "nope_train.npz"), str(tmp_path / "nope_test.npz")]
    assert _compare(data, out, "--proposals", *missing) == 0
    rows = _rows(out)
    reason = rows["fast_rcnn"]["reason"]
    assert rows["fast_rcnn"]["status"] == "failed" and "detkit proposals" in reason and "--split train" in reason
    command = reason.split("make them with: ", 1)[1].split(" && ")[0]
    assert shlex.split(command)[-1] == missing[0]
    assert (
        rows["fast_rcnn_svd"]["status"] == "failed"
        and "Fast R-CNN model, which is failed" in rows["fast_rcnn_svd"]["reason"]
    )
    assert rows["faster_rcnn"]["status"] == "loaded" and rows["faster_rcnn_svd"]["status"] == "loaded"
    # another budget in the same folder: refused per row, nothing overwritten
    stamp = (out / "faster_rcnn" / "model_final.pt").stat().st_mtime_ns
    assert _compare(data, out, "--stages", "faster_rcnn", "train.max_iter=3") == 0
    row = _rows(out)["faster_rcnn"]
    assert row["status"] == "failed" and "holds a run of another config (differs in train.max_iter" in row["reason"]
    assert (out / "faster_rcnn" / "model_final.pt").stat().st_mtime_ns == stamp
    assert _rows(out)["fast_rcnn"]["status"] == "skipped"


def test_a_stage_that_crashes_is_marked_and_the_others_go_on(compared, tmp_path, monkeypatch):
    data, _ = compared

    def crash(config, out, resume, progress=True):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(compare_cli, "train_run", crash)
    out = tmp_path / "crash"
    assert _compare(data, out, "--stages", "faster_rcnn,faster_rcnn_svd,rcnn") == 0
    rows = _rows(out)
    assert rows["faster_rcnn"]["status"] == "failed" and rows["faster_rcnn"]["reason"] == "RuntimeError: boom"
    assert "Traceback" in (out / "faster_rcnn" / "compare_error.txt").read_text()
    assert rows["faster_rcnn_svd"]["status"] == "failed"
    assert rows["rcnn"]["status"] == ("pending" if "rcnn" in _expected_pending() else "failed")
    assert {rows[k]["status"] for k in ("spp", "fast_rcnn", "fast_rcnn_svd")} == {"skipped"}
    assert (out / "compare.png").is_file()


def test_composing_a_stage_config(tmp_path):
    data = tmp_path / "data.yaml"
    data.write_text(DATA.format(root=tmp_path / "shapes") + "test: {metric: voc07}\n")
    base = CONFIG_ROOT / "faster_rcnn" / "bccd_r18_fpn.yaml"  # BCCD, 450 iterations, steps [360], warmup 150
    cfg = compose_stage_config(
        base, data, {"train.max_iter": 60, "model.backbone.name": "resnet34"}, ["data.batch_size=4"]
    )
    assert cfg.data.train.format == "shapes" and cfg.data.train.split == "train"  # the dataset replaced whole
    assert cfg.data.train.ann_dir is None and cfg.data.classes is None  # not BCCD's class list
    assert cfg.data.input.min_size_test == 96 and cfg.data.input.flip_prob == 0.5  # data keys set / kept
    assert (cfg.train.max_iter, cfg.train.steps, cfg.train.warmup_iters) == (60, [48], 20)  # x 60 / 450
    assert cfg.train.num_threads == 1 and cfg.test.metric == "voc07"
    assert cfg.model.backbone.name == "resnet34" and cfg.model.backbone.fpn  # the layout stays the recipe's
    assert cfg.data.batch_size == 4  # command-line overrides last
    with pytest.raises(Exception, match="needs a config with a data section"):
        bare = tmp_path / "bare.yaml"
        bare.write_text("format: voc\nroot: x\n")
        compose_stage_config(base, bare, {})
