"""``detkit proposals`` end to end on a tiny generated shapes dataset: Selective Search files
equal to direct ``selective_search`` calls (1 and 2 workers), resuming an interrupted run
(only the missing images are computed), refusing to overwrite, recall evaluation checked
against an independent ``proposal_recall``, plots with --compare, and the RPN method on a
tiny random checkpoint (top-k raised, boxes mapped back to original pixels per axis)."""

import json

import numpy as np
import pytest
import torch

import detkit.engine.proposals as pcli
from detkit.cli import main
from detkit.config import from_dict, to_dict
from detkit.data.build import dataset_transforms
from detkit.data.io import read_image_array
from detkit.data.proposal_files import load_proposals, save_proposals
from detkit.data.shapes import generate_shapes
from detkit.data.voc import load_voc
from detkit.engine.checkpoint import save_checkpoint
from detkit.evaluation.recall import proposal_recall
from detkit.modeling.build import build_model
from detkit.modeling.proposals.selective_search import selective_search
from detkit.schema import Config
from detkit.structures import Geometry, ImageList, Target

MIN_SIZE = 10  # shapes objects are 16..64 px; the authors' 20 would drop some small ones


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("proposals")
    root = generate_shapes(tmp / "shapes", num_train=2, num_test=5, seed=3)
    data = tmp / "data.yaml"
    data.write_text(f"format: voc\nroot: {root}\nsplit: test\n")
    return data, load_voc(root, "test")


def ss_args(data, out, *extra):
    return ["proposals", str(data), "--out", str(out), "--min-size", str(MIN_SIZE), "--no-progress", *extra]


def direct_ss(records, mode="fast"):
    return {
        r.image_id: selective_search(read_image_array(r.file_name), mode, min_size=MIN_SIZE, max_boxes=2000, seed=0)
        for r in records
    }


def assert_file_matches(path, expected):
    table, meta = load_proposals(path)
    assert list(table) == list(expected)  # dataset order
    for key, (boxes, scores) in expected.items():
        np.testing.assert_array_equal(table[key][0], boxes)
        np.testing.assert_array_equal(table[key][1], scores)
    return meta


@pytest.mark.parametrize("workers", [1, 2])
def test_selective_search_file_equals_direct_calls(shapes, tmp_path, workers):
    data, dataset = shapes
    out = tmp_path / "ss.npz"
    assert main(ss_args(data, out, "--limit", "3", "--workers", str(workers))) == 0
    meta = assert_file_matches(out, direct_ss(dataset.records[:3]))
    assert meta["method"] == "selective_search" and meta["mode"] == "fast" and meta["num_images"] == 3
    assert meta["min_size"] == MIN_SIZE and meta["version"] == 1 and meta["dataset"] == "shapes:test"
    assert not (tmp_path / "ss.npz.partial").exists()  # removed once the final file is written


def test_interrupted_run_resumes_with_the_missing_images_only(shapes, tmp_path, monkeypatch):
    data, dataset = shapes
    out = tmp_path / "ss.json"
    calls = []

    def interrupted_after_two(image, *args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the third image
        calls.append(1)
        return selective_search(image, *args, **kwargs)

    monkeypatch.setattr(pcli, "selective_search", interrupted_after_two)
    assert main(ss_args(data, out, "--limit", "5")) == 130
    assert not out.exists()
    partial = tmp_path / "ss.json.partial"
    chunks = sorted(partial.glob("chunk_*.npz"))
    assert len(chunks) == 1 and list(load_proposals(chunks[0])[0]) == [r.image_id for r in dataset.records[:2]]

    computed = []

    def counting(image, *args, **kwargs):
        computed.append(image.shape)
        return selective_search(image, *args, **kwargs)

    monkeypatch.setattr(pcli, "selective_search", counting)
    assert main(ss_args(data, out, "--limit", "5")) == 0
    assert len(computed) == 3  # images 3..5 only
    assert_file_matches(out, direct_ss(dataset.records[:5]))
    assert not partial.exists()


def test_partial_run_with_other_settings_is_refused_or_discarded(shapes, tmp_path, monkeypatch, capsys):
    data, dataset = shapes
    out = tmp_path / "ss.npz"

    def interrupt(image, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pcli, "selective_search", interrupt)
    assert main(ss_args(data, out, "--limit", "2")) == 130  # leaves settings.json, no chunk
    monkeypatch.undo()
    capsys.readouterr()
    assert main(ss_args(data, out, "--limit", "2", "--mode", "single")) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("detkit: error")]
    assert "ss.npz.partial holds an interrupted run with other settings (mode)" in error
    assert main(ss_args(data, out, "--limit", "2", "--mode", "single", "--overwrite")) == 0
    assert_file_matches(out, direct_ss(dataset.records[:2], "single"))


def test_existing_output_is_never_silently_replaced(shapes, tmp_path, capsys):
    data, dataset = shapes
    out = tmp_path / "ss.npz"
    save_proposals(out, {"dummy": (np.zeros((1, 4), np.float32), np.ones(1, np.float32))})
    before = out.read_bytes()
    assert main(ss_args(data, out, "--limit", "1")) == 2
    assert "exists; pass --overwrite to recompute it or --reuse" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(ss_args(data, out, "--limit", "1", "--overwrite")) == 0
    assert_file_matches(out, direct_ss(dataset.records[:1]))


def test_eval_recall_json_and_plot_with_compare(shapes, tmp_path, capsys):
    data, dataset = shapes
    out = tmp_path / "ss.npz"
    assert main(ss_args(data, out, "--limit", "3", "--eval")) == 0
    printed = capsys.readouterr().out
    doc = json.loads((tmp_path / "ss.recall.json").read_text())
    records = dataset.records[:3]
    gt = [r.boxes[~r.difficult] for r in records]
    table, _ = load_proposals(out)
    expected = proposal_recall(gt, [table[r.image_id][0] for r in records])
    assert doc["num_images"] == 3 and doc["num_gt"] == sum(len(g) for g in gt) > 0
    for n in (100, 300, 1000, 2000):
        assert doc["recall"][str(n)]["0.5"] == pytest.approx(expected["recall"][n][0.5])
        assert doc["recall"][str(n)]["0.7"] == pytest.approx(expected["recall"][n][0.7])
        assert doc["AR"][str(n)] == pytest.approx(expected["AR"][n])
    # Selective Search finds (nearly) every flat-coloured shape
    assert doc["recall"]["1000"]["0.5"] >= 0.95
    assert doc["recall"]["1000"]["0.7"] <= doc["recall"]["1000"]["0.5"]
    assert f"{doc['recall']['1000']['0.5']:.4f}" in printed and "R@0.7" in printed

    # a second method: the single strategy, overlaid in one plot; --reuse keeps ss.npz as it is
    single = tmp_path / "single.npz"
    assert main(ss_args(data, single, "--limit", "3", "--mode", "single")) == 0
    stamp = out.stat().st_mtime_ns
    png = tmp_path / "recall.png"
    assert (
        main(ss_args(data, out, "--limit", "3", "--reuse", "--eval", "--plot", str(png), "--compare", str(single))) == 0
    )
    assert out.stat().st_mtime_ns == stamp
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((tmp_path / "ss.recall.json").read_text())
    assert [c["label"] for c in doc["compare"]] == ["Selective Search (single)"]
    assert doc["label"] == "Selective Search (fast)"

    # a comparison file must cover the evaluated images
    short = tmp_path / "short.npz"
    save_proposals(short, {k: table[k] for k in list(table)[:2]})
    capsys.readouterr()
    assert main(ss_args(data, out, "--limit", "3", "--reuse", "--plot", str(png), "--compare", str(short))) == 2
    assert "has no proposals for 1 of the 3 images evaluated" in capsys.readouterr().err


def test_full_config_and_split(shapes, tmp_path):
    data, _ = shapes
    root = data.parent / "shapes"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"data:\n  train: {{format: voc, root: {root}, split: train}}\n"
        f"  test: {{format: voc, root: {root}, split: test}}\n"
    )
    out = tmp_path / "train.npz"
    assert main(ss_args(cfg, out, "--split", "train", "--mode", "single")) == 0
    assert list(load_proposals(out)[0]) == ["train_00000", "train_00001"]
    # key=value overrides apply to a full config's data, as in detkit train
    other = tmp_path / "test.npz"
    assert main(ss_args(cfg, other, "--split", "train", "--mode", "single", "data.train.split=test")) == 0
    ids = list(load_proposals(other)[0])
    assert ids and all(i.startswith("test_") for i in ids)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "rpn"], "--method rpn needs --checkpoint"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["--compare", "x.npz"], "--compare needs --eval or --plot"),
        (["--reuse"], "--reuse: "),
        (["--method", "rpn", "--checkpoint", "nowhere.pt"], "checkpoint not found: nowhere.pt"),
        (["--out", "x.txt"], "use a .npz or .json file name"),
        (["data.test.split=train"], "is a dataset YAML: key=value overrides need a full config"),
    ],
)
def test_bad_arguments(shapes, tmp_path, capsys, extra, message):
    data, _ = shapes
    assert main(ss_args(data, tmp_path / "o.npz", *extra)) == 2
    assert message in capsys.readouterr().err


def test_rpn_method_raises_topk_and_maps_to_original_pixels(shapes, tmp_path):
    data, dataset = shapes
    cfg = from_dict(
        Config,
        {
            "data": {"input": {"min_size_test": 96, "max_size": 160}},
            "model": {
                "backbone": {"name": "tiny", "out_channels": 16, "tiny_widths": [8, 16, 16, 16]},
                "anchors": {"sizes": [[16], [32], [64], [128], [256]]},
                "roi_head": {"fc_dims": [32, 32]},
                "proposals": {"rpn": {"pre_nms_topk_test": 30, "post_nms_topk_test": 20}},
            },
            "train": {"device": "cpu"},
        },
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, 3).eval()
    ckpt = save_checkpoint(
        tmp_path / "model_final.pt",
        {"model": model.state_dict(), "config": to_dict(cfg), "class_names": ["circle", "square", "triangle"]},
    )
    out = tmp_path / "rpn.npz"
    assert (
        main(
            [
                "proposals",
                str(data),
                "--method",
                "rpn",
                "--checkpoint",
                str(ckpt),
                "--out",
                str(out),
                "--limit",
                "2",
                "--max-proposals",
                "60",
                "--device",
                "cpu",
                "--eval",
                "--no-progress",
            ]
        )
        == 0
    )
    table, meta = load_proposals(out)
    assert meta["method"] == "rpn" and meta["checkpoint"] == "model_final.pt" and meta["max_proposals"] == 60

    # the same network by hand, in network-input pixels
    gen = model.proposal_generator
    gen.post_nms_topk, gen.pre_nms_topk = (2000, 60), (2000, 60)
    transforms = dataset_transforms(cfg.data.input, train=False)
    for record in dataset.records[:2]:
        image, target = transforms(
            torch.from_numpy(read_image_array(record.file_name)).permute(2, 0, 1) / 255.0,
            Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)),
        )
        h, w = image.shape[-2:]
        oh, ow = record.height, record.width
        assert min(h, w) == 96 and (h, w) != (oh, ow)  # really resized
        assert target.geometry == Geometry((oh, ow), (h, w))
        images = ImageList.from_tensors([image], model.size_divisibility, geometries=[target.geometry])
        with torch.no_grad():
            (props,), _ = gen(images, model.backbone(images.tensor))
        boxes, scores = table[record.image_id]
        assert 20 < len(boxes) <= 60  # the config's post-NMS 20 was raised for this run
        # original pixels: x * ow / w, y * oh / h; within the original image
        scale = np.array([ow / w, oh / h, ow / w, oh / h], np.float32)
        np.testing.assert_allclose(boxes, props.boxes.numpy() * scale, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(scores, props.scores.numpy(), rtol=1e-6)
        assert (boxes[:, 0::2] <= ow).all() and (boxes[:, 1::2] <= oh).all() and (boxes >= 0).all()
    doc = json.loads((tmp_path / "rpn.recall.json").read_text())
    assert doc["label"] == "RPN (model_final.pt)" and doc["num_images"] == 2
