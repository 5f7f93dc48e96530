"""What users see, end to end through the command line on a tiny generated dataset and a
model trained for 4 iterations: demo images (boxes where the JSON says, in the class
colour), --show-gt, videos, the dataset browser and histograms, eval --analyze, the report."""

import base64
import json
import re

import cv2
import numpy as np
import pytest

from detkit.cli import main
from detkit.visualize import box_pixels, class_color, draw_style, label_rect

TINY = """
data:
  train:
    format: shapes
    root: {root}
    split: train
    shapes: &s {{num_train: 6, num_test: 4, seed: 3, image_size: [96, 128], object_size: [20, 40]}}
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
train: {{max_iter: 4, warmup_iters: 2, log_period: 2, eval_period: 2, device: cpu, num_threads: 1}}
test: {{metric: voc}}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("visual")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(TINY.format(root=tmp / "shapes"))
    out = tmp / "run"
    assert main(["train", str(cfg), "--out", str(out), "--no-progress"]) == 0
    return cfg, out


def colour_mask(image_rgb, colour):
    return (image_rgb == np.array(colour, np.uint8)).all(axis=2)


def read_rgb(path):
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def outline(h, w, box):
    x1, y1, x2, y2 = box_pixels(box, h, w)
    m = np.zeros((h, w), bool)
    m[y1, x1 : x2 + 1] = m[y2, x1 : x2 + 1] = True
    m[y1 : y2 + 1, x1] = m[y1 : y2 + 1, x2] = True
    return m


def test_demo_draws_the_json_boxes_in_the_class_colour(run, tmp_path):
    cfg, out = run
    image = tmp_path / "grey.png"
    cv2.imwrite(str(image), np.full((120, 160, 3), 128, np.uint8))  # synthetic: no colour anywhere
    demo = tmp_path / "demo"
    # A random-ish model: score threshold 0 and --max-dets 1 leave exactly its best box.
    argv = ["demo", "--checkpoint", str(out / "model_final.pt"), "--out", str(demo), "--score-thresh", "0"]
    assert main(argv + ["--max-dets", "1", str(image)]) == 0
    record = json.loads((demo / "grey.json").read_text())
    assert len(record["detections"]) == 1 and record["ms"] > 0
    det = record["detections"][0]
    png = read_rgb(demo / "grey.png")
    colour = colour_mask(png, class_color(det["label"]))
    h, w = png.shape[:2]
    box_outline = outline(h, w, det["box"])
    text = f"{det['class']} {det['score']:.2f}"
    (x0, y0, x1, y1), _, _ = label_rect(text, det["box"], h, w, draw_style(h, w))
    label = np.zeros((h, w), bool)
    label[y0 : y1 + 1, x0 : x1 + 1] = True
    # (The label never hides most of the outline: above or under the box when there is room.)
    assert (box_outline & ~label).sum() >= 0.5 * box_outline.sum()
    assert colour[box_outline & ~label].all()  # the outline is where the JSON says ...
    assert not (colour & ~box_outline & ~label).any()  # ... and the colour is nowhere else
    others = [class_color(k) for k in (1, 2, 3) if k != det["label"]]
    assert not any(colour_mask(png, c).any() for c in others)

    # --classes keeps only the named classes (another class than the best box's: its box goes).
    other = next(n for n in ("circle", "square", "triangle") if n != det["class"])
    assert main(argv + ["--classes", other, "--out", str(tmp_path / "c"), str(image)]) == 0
    kept = json.loads((tmp_path / "c" / "grey.json").read_text())["detections"]
    assert kept and {d["class"] for d in kept} == {other}
    assert main(argv + ["--classes", "dog", str(image)]) == 2


def test_demo_show_gt_draws_ground_truth_and_detections(run, tmp_path):
    cfg, out = run
    image = sorted((out.parent / "shapes" / "JPEGImages").glob("test_*.png"))[0]
    common = ["demo", "--checkpoint", str(out / "model_final.pt"), "--score-thresh", "0", "--max-dets", "1", str(image)]
    assert main(common + ["--out", str(tmp_path / "plain")]) == 0
    assert main(common + ["--out", str(tmp_path / "gt"), "--show-gt"]) == 0
    record = json.loads((tmp_path / "gt" / f"{image.stem}.json").read_text())
    assert len(record["detections"]) == 1 and len(record["ground_truth"]) >= 1
    plain, with_gt = read_rgb(tmp_path / "plain" / f"{image.stem}.png"), read_rgb(tmp_path / "gt" / f"{image.stem}.png")
    h, w = plain.shape[:2]
    # Both draw the detection; --show-gt changes pixels only on the ground-truth outlines
    # (dashed: some of each outline, not all of it).
    changed = (plain != with_gt).any(axis=2)
    gt_lines = np.zeros((h, w), bool)
    for g in record["ground_truth"]:
        o = outline(h, w, g["box"])
        gt_lines |= o
        on = colour_mask(with_gt, class_color(g["label"])) & o
        assert 0.2 < on.sum() / o.sum() < 0.9, g
    assert changed.any() and not (changed & ~gt_lines).any()
    det = record["detections"][0]
    assert colour_mask(with_gt, class_color(det["label"]))[outline(h, w, det["box"])].mean() > 0.5
    # The same image outside the dataset (a copy elsewhere under another name): no ground truth.
    copy = tmp_path / "elsewhere.png"
    copy.write_bytes(image.read_bytes())
    assert main(common[:-1] + [str(copy), "--out", str(tmp_path / "copy"), "--show-gt"]) == 0
    assert "ground_truth" not in json.loads((tmp_path / "copy" / "elsewhere.json").read_text())


def count_frames(path):
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def test_demo_video_from_frames_and_from_a_video(run, tmp_path, capsys):
    cfg, out = run
    frames = sorted((out.parent / "shapes" / "JPEGImages").glob("test_*.png"))  # 4 frames, sizes differ
    folder = tmp_path / "frames"
    folder.mkdir()
    for f in frames:
        (folder / f.name).write_bytes(f.read_bytes())
    ckpt = ["demo", "--checkpoint", str(out / "model_final.pt"), "--score-thresh", "0.3"]
    video = tmp_path / "annotated.mp4"
    assert main(ckpt + ["--out", str(tmp_path / "o"), "--video", str(video), str(folder)]) == 0
    assert count_frames(video) == len(frames)
    per_frame = json.loads(video.with_suffix(".json").read_text())["frames"]
    assert [f["frame"] for f in per_frame] == list(range(len(frames)))

    # A video file in: every frame annotated, out as DIR/<stem>.mp4; MJPG .avi works too.
    src = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (128, 96))
    assert writer.isOpened()
    for i in range(6):
        writer.write(np.full((96, 128, 3), 40 * i, np.uint8))
    writer.release()
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video")
    code = main(ckpt + ["--out", str(tmp_path / "v"), str(broken), str(src)])
    assert code == 1  # the broken one is reported, the good one still written
    err = [line for line in capsys.readouterr().err.splitlines() if "broken.mp4" in line]
    assert len(err) == 1 and "cannot open video" in err[0]
    assert count_frames(tmp_path / "v" / "clip.mp4") == 6
    assert len(json.loads((tmp_path / "v" / "clip.json").read_text())["frames"]) == 6
    # A name the codecs do not cover is a one-line usage error.
    assert main(ckpt + ["--out", str(tmp_path / "o"), "--video", str(tmp_path / "x.gif"), str(folder)]) == 2


def test_demo_never_overwrites_its_inputs(run, tmp_path):
    cfg, out = run
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.full((64, 64, 3), 128, np.uint8))
    before = image.read_bytes()
    assert main(["demo", "--checkpoint", str(out / "model_final.pt"), "--out", str(tmp_path), str(image)]) == 2
    assert image.read_bytes() == before


def test_data_browse(run, tmp_path, capsys):
    cfg, out = run
    dest = tmp_path / "browse"
    assert main(["data", "browse", str(cfg), "--out", str(dest), "--num", "3", "--split", "train"]) == 0
    drawn = sorted(dest.glob("*_gt.png"))
    assert len(drawn) == 3 and (dest / "contact_sheet.png").is_file()
    # The ground truth is drawn in class colours at the annotated boxes.
    from detkit.data.voc import load_voc

    ds = load_voc(out.parent / "shapes", "train")
    rec = {r.image_id: r for r in ds.records}[drawn[0].name.removesuffix("_gt.png")]
    img = read_rgb(drawn[0])
    for box, label in zip(rec.boxes, rec.labels):
        o = outline(*img.shape[:2], box)
        assert colour_mask(img, class_color(label))[o].mean() > 0.5
    sheet = read_rgb(dest / "contact_sheet.png")
    assert sheet.shape[0] > 100 and sheet.shape[1] > 200


def test_data_check_plots_against_anchors(run, tmp_path, capsys):
    cfg, out = run
    plots = tmp_path / "plots"
    assert main(["data", "check", str(cfg), "--plots", str(plots), "--no-decode"]) == 0
    text = capsys.readouterr().out
    # A run config: both splits, each against the anchors.
    assert text.count("anchor fit (network-input pixels") == 2
    for split in ("train", "test"):
        for name in ("objects_per_class", "boxes_per_image", "box_sizes", "aspect_ratios"):
            assert (plots / split / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    # A bare dataset YAML: original pixels, no anchors to compare with.
    data = tmp_path / "data.yaml"
    data.write_text(
        f"format: shapes\nroot: {out.parent / 'shapes'}\nsplit: test\n"
        "shapes: {num_train: 6, num_test: 4, seed: 3, image_size: [96, 128], object_size: [20, 40]}\n"
    )
    assert main(["data", "check", str(data), "--plots", str(tmp_path / "p2"), "--no-decode"]) == 0
    assert "anchor fit" not in capsys.readouterr().out
    assert len(list((tmp_path / "p2").glob("*.png"))) == 4


def test_eval_analyze(run, tmp_path, capsys):
    cfg, out = run
    dest = tmp_path / "e"
    argv = ["eval", str(cfg), "--checkpoint", str(out / "model_final.pt"), "--out", str(dest), "--no-progress"]
    assert main(argv + ["--analyze", "--analyze-score", "0.0"]) == 0
    printed = capsys.readouterr().out
    assert "errors (Hoiem et al. 2012 / TIDE" in printed
    a = dest / "analysis"
    for name in ("analysis.json", "pr_curves.png", "confusion_matrix.png", "errors.png"):
        assert (a / name).is_file(), name
    analysis = json.loads((a / "analysis.json").read_text())
    result = json.loads((dest / "eval.json").read_text())
    assert analysis["mAP"] == pytest.approx(result["mAP"], abs=1e-12)
    dets = json.loads((dest / "detections.json").read_text())
    fp = sum(v for k, v in analysis["errors"].items() if k != "missed")
    assert analysis["true_positives"] + analysis["ignored"] + fp == len(dets)
    # At score >= 0 every detection is in the confusion matrix, every ground-truth box too.
    cm = np.array(analysis["confusion"])
    assert cm.sum() - cm[-1].sum() == sum(result["num_gt"].values())
    assert cm[:, :-1].sum() == len(dets) - analysis["ignored"]
    if analysis["false_positives"]:
        assert (a / "worst_false_positives.png").is_file()


def test_report(run, tmp_path, capsys):
    cfg, out = run
    html_path = tmp_path / "report.html"
    assert main(["report", str(out), "--out", str(html_path), "--gallery", "3"]) == 0
    page = html_path.read_text()
    result = json.loads((out / "eval.json").read_text())
    assert f"<b>{result['mAP']:.4f}</b>" in page
    assert page.count('class="gallery-image"') == 3
    # Self-contained: every image is embedded, nothing is fetched.
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        assert base64.b64decode(s.split(",", 1)[1]).startswith(b"\x89PNG")
    for section in ("Training curves", "Per-class AP", "Error breakdown", "Gallery", "Config"):
        assert section in page
    assert "circle" in page and "max_iter: 4" in page


def test_report_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main(["report", str(tmp_path / "x"), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a detkit run folder" in err[0]
    assert not (tmp_path / "r.html").exists()


def test_report_without_the_test_dataset_says_so(run, tmp_path):
    """A run copied to a machine without its data: the page still comes, with a note where
    the dataset was needed."""
    import shutil

    cfg, out = run
    copy = tmp_path / "copied_run"
    shutil.copytree(out, copy)
    text = (copy / "config.yaml").read_text()
    (copy / "config.yaml").write_text(
        text.replace("format: shapes", "format: voc").replace(str(out.parent), "/nowhere")
    )
    html_path = tmp_path / "r.html"
    assert main(["report", str(copy), "--out", str(html_path)]) == 0
    page = html_path.read_text()
    assert "test dataset not available" in page and "/nowhere" in page
    assert 'class="gallery-image"' not in page
    assert "Training curves" in page and page.count("data:image/png;base64,") == 1  # the curves
