"""detkit vs torchvision's Faster R-CNN with the same recipe, over several data regimes and
seeds: a markdown table and a JSON file of mean and spread per regime and framework.

    python tools/parity_suite.py --dry-run                      # the plan and its estimated time
    python tools/parity_suite.py                                # everything: 6 regimes x 2 frameworks x seeds 0 1
    python tools/parity_suite.py --budget 0.1                   # a reduced version: 10 % of every schedule
    python tools/parity_suite.py --regimes shapes_large bccd_val --frameworks detkit --seeds 0 1 2
    python tools/parity_suite.py --report-only                  # the table from the runs recorded so far

Regimes (one config each, the same for both frameworks; ``REGIMES``): the five generated
shapes regimes (configs/parity/shapes_*.yaml: the quick start's tiny ResNet-FPN, a few CPU
minutes per run) and BCCD with the validation protocol (configs/parity/bccd_val.yaml: the
BCCD recipe, R18-FPN, trained on ``train``, evaluated on ``val``). A seed is the training
seed (model initialisation, sampling, flips); the data of a regime is the same for every seed.

Runs go to ``--out`` (default work_dirs/parity, or work_dirs/parity_budget<B> for a reduced
budget), one folder per regime / framework / seed (see tools/parity_runs.py): a finished run
is reused, an interrupted one is resumed (detkit) or started again (torchvision), so the
command can be stopped and started again at any time. Runs execute one at a time,
alternating the frameworks within each seed, so that a slow period of a shared machine falls
on both sides alike. The table is rewritten after every run: ``--report`` PREFIX.md/.json
(default OUT/parity).

Table cells: mean over the seeds (min–max). On par: detkit's mean VOC mAP >= torchvision's
mean minus the larger of the two spreads (spread = max - min over seeds).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from parity_runs import (  # noqa: E402
    FRAMEWORKS,
    ROOT,
    Runner,
    RunResult,
    RunSpec,
    cell,
    exclusive,
    failed_runs,
    finish_report,
    launch_subprocess,
    load_recipe,
    machine,
    markdown_table,
    read_jsonl,
    read_spec_file,
    recipe_dict,
    scaled_schedule,
    summarize,
    write_report,
)

from detkit.errors import DetkitError  # noqa: E402


@dataclass
class Regime:
    """A regime's config and what one run costs on a quiet 2-core CPU (for ``--dry-run``):
    seconds per training iteration per framework and seconds per test image."""

    config: str
    about: str
    s_per_iter: Dict[str, float]
    s_per_img: Dict[str, float]


# Costs measured on this project's 2-vCPU machine on 2026-11-30 (shapes: 40-iteration runs;
# BCCD: the README's recipe runs) with other jobs running now and then: rough guides.
REGIMES: Dict[str, Regime] = {
    "shapes_large": Regime(
        "configs/parity/shapes_large.yaml",
        "objects up to 80 % of the image side, often crossing the border",
        {"detkit": 0.40, "torchvision": 0.50},
        {"detkit": 0.03, "torchvision": 0.03},
    ),
    "shapes_one_class": Regime(
        "configs/parity/shapes_one_class.yaml",
        "one class (circles)",
        {"detkit": 0.34, "torchvision": 0.45},
        {"detkit": 0.03, "torchvision": 0.03},
    ),
    "shapes_few_varied": Regime(
        "configs/parity/shapes_few_varied.yaml",
        "150 training images of varied sizes and aspect ratios",
        {"detkit": 0.36, "torchvision": 0.46},
        {"detkit": 0.03, "torchvision": 0.03},
    ),
    "shapes_small_many": Regime(
        "configs/parity/shapes_small_many.yaml",
        "15-40 small objects per image (like BCCD's cells)",
        {"detkit": 0.77, "torchvision": 0.95},
        {"detkit": 0.06, "torchvision": 0.06},
    ),
    "shapes_overlap": Regime(
        "configs/parity/shapes_overlap.yaml",
        "3-8 objects, clustered, box IoU up to 0.6",
        {"detkit": 0.36, "torchvision": 0.46},
        {"detkit": 0.03, "torchvision": 0.03},
    ),
    "bccd_val": Regime(
        "configs/parity/bccd_val.yaml",
        "BCCD recipe (R18-FPN, width 128, 384 px), train 205 -> val 87",
        {"detkit": 1.37, "torchvision": 1.90},  # the recipe's runs of 2026-12-01
        {"detkit": 0.26, "torchvision": 0.36},
    ),
}
# Process start, imports, dataset loading, checkpoints: seconds per run on top.
RUN_OVERHEAD_S = 15.0
# detkit runs save a checkpoint this many times per schedule, so an interrupted run resumes
# with at most a quarter of its iterations lost (torchvision's script cannot resume).
CHECKPOINTS_PER_RUN = 4


def default_out(budget: float) -> Path:
    return ROOT / "work_dirs" / ("parity" if budget == 1 else f"parity_budget{budget:g}")


def regime_specs(
    name: str, frameworks: Sequence[str], seeds: Sequence[int], budget: float, sets: Sequence[str]
) -> List[RunSpec]:
    """The runs of one regime: per seed, each framework (in the order given)."""
    regime = REGIMES[name]
    config = str(ROOT / regime.config)
    base = load_recipe(config, list(sets))
    schedule = scaled_schedule(base.train, budget)
    specs = []
    for seed in seeds:
        overrides = list(sets) + schedule + [f"train.seed={seed}"]
        max_iter = load_recipe(config, overrides).train.max_iter
        period = max(1, -(-max_iter // CHECKPOINTS_PER_RUN))
        for fw in frameworks:
            extra = [f"train.checkpoint_period={period}"] if fw == "detkit" else []
            specs.append(RunSpec(name, fw, seed, config, overrides, extra))
    return specs


def count_test_images(cfg) -> Optional[int]:
    """How many images the test split has (shapes: num_test; VOC: its split file), None when
    it cannot be told without loading the dataset."""
    d = cfg.data.test
    if d is None:
        return None
    if d.format == "shapes":
        return d.shapes.num_test
    if d.format == "voc" and d.root and d.split and not d.holdout:
        path = Path(d.root) / "ImageSets" / "Main" / f"{d.split}.txt"
        if path.is_file():
            return sum(1 for line in path.read_text().splitlines() if line.strip())
    return None


def measured_s_per_iter(out: Path, regime: str, framework: str) -> Optional[float]:
    """Mean seconds per iteration logged by the runs of this regime and framework in
    ``out`` (finished or not), to estimate the remaining ones; None without any."""
    values = []
    for run_dir in sorted((out / regime).glob(f"{framework}_seed*")):
        values += [r["s_per_iter"] for r in read_jsonl(run_dir / "metrics.jsonl") if "s_per_iter" in r]
    return sum(values) / len(values) if values else None


def estimate_seconds(spec: RunSpec, out: Path) -> float:
    """Seconds one run will take: iterations x seconds per iteration (measured in ``out``
    when runs of the regime exist there, else the table's) plus evaluation."""
    cfg = load_recipe(spec.config, spec.overrides)
    regime = REGIMES[spec.group]
    rate = measured_s_per_iter(out, spec.group, spec.framework) or regime.s_per_iter[spec.framework]
    n_test = count_test_images(cfg) or 100
    evaluation = RUN_OVERHEAD_S + n_test * regime.s_per_img[spec.framework]
    # detkit: training with its evaluation, then the plain-inference pass (parity_runs).
    passes = 2 if spec.framework == "detkit" else 1
    return cfg.train.max_iter * rate + passes * evaluation


# -- the report ------------------------------------------------------------------------------
def verdict(dk: Dict, tv: Dict) -> Optional[Dict]:
    """The parity verdict of one regime from the two frameworks' summaries (None unless
    both have a VOC mAP)."""
    if not dk or not tv or dk.get("mAP") is None or tv.get("mAP") is None:
        return None
    larger = max(dk["mAP"]["spread"], tv["mAP"]["spread"])
    out = {
        "delta_mAP": dk["mAP"]["mean"] - tv["mAP"]["mean"],
        "larger_spread": larger,
        "on_par": dk["mAP"]["mean"] >= tv["mAP"]["mean"] - larger,
        "train_time_ratio": None,
        "s_per_img_ratio": None,
    }
    for key, name in (("train_minutes", "train_time_ratio"), ("s_per_img", "s_per_img_ratio")):
        if dk.get(key) and tv.get(key) and tv[key]["mean"] > 0:
            out[name] = dk[key]["mean"] / tv[key]["mean"]
    if dk.get("voc07") and tv.get("voc07"):
        out["delta_voc07"] = dk["voc07"]["mean"] - tv["voc07"]["mean"]
    return out


def deviations_for(spec: RunSpec) -> List[str]:
    from torchvision_baseline import recipe_deviations

    return recipe_deviations(load_recipe(spec.config, spec.overrides))


def build_report(
    results: Dict[str, Dict[str, List[RunResult]]],
    specs: Dict[str, List[RunSpec]],
    meta: Dict,
    deviations: Optional[Dict[str, List[str]]] = None,
) -> tuple:
    """(markdown, json data) from the recorded runs: ``results[regime][framework]`` lists
    the finished runs; ``specs[regime]`` the runs planned (for iterations and configs)."""
    deviations = deviations or {}
    data: Dict = {**meta, "spread": "max - min over seeds", "regimes": {}}
    rows, verdict_rows = [], []
    for regime, by_fw in results.items():
        entry: Dict = {
            "about": REGIMES[regime].about if regime in REGIMES else None,
            "config": None,
            "overrides": [],
            "deviations": deviations.get(regime, []),
        }
        if specs.get(regime):
            entry["config"] = _display(specs[regime][0].config)
            entry["overrides"] = [o for o in specs[regime][0].overrides if not o.startswith("train.seed=")]
        summaries = {}
        for fw in FRAMEWORKS:
            if fw not in by_fw:
                continue
            runs = sorted(by_fw[fw], key=lambda r: r.seed)
            s = summarize(runs)
            s["runs_detail"] = [r.__dict__ for r in runs]
            summaries[fw] = s
            entry[fw] = s
            iters = sorted({r.iterations for r in runs if r.iterations is not None})
            rows.append(
                [
                    regime,
                    fw,
                    str(s["runs"]),
                    "/".join(str(i) for i in iters) or "n/a",
                    cell(s["mAP"], 4),
                    cell(s["voc07"], 4),
                    cell(s["train_minutes"], 2) + (" †" if s["resumed"] else ""),
                    cell(s["s_per_img"], 3),
                ]
            )
        v = verdict(summaries.get("detkit", {}), summaries.get("torchvision", {}))
        entry["verdict"] = v
        if v is not None:
            ratio = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
            verdict_rows.append(
                [
                    regime,
                    f"{v['delta_mAP']:+.4f}",
                    f"{v['larger_spread']:.4f}",
                    "yes" if v["on_par"] else "**no**",
                    ratio(v["train_time_ratio"]),
                    ratio(v["s_per_img_ratio"]),
                ]
            )
        data["regimes"][regime] = entry
    seeds = ", ".join(str(s) for s in meta.get("seeds", []))
    lines = [
        "# detkit vs torchvision Faster R-CNN, same recipe (tools/parity_suite.py)",
        "",
        f"{meta.get('date', '')}; {meta.get('machine', {}).get('cpus', '?')} CPUs "
        f"({meta.get('machine', {}).get('platform', '')}); torch {meta.get('machine', {}).get('torch', '?')}, "
        f"torchvision {meta.get('machine', {}).get('torchvision', '?')}; budget {meta.get('budget', 1):g} "
        f"(share of each recipe's iterations); seeds {seeds}."
        + (f" Every run with `{' '.join(meta['set'])}` (--set)." if meta.get("set") else ""),
        "",
        "Cells: mean over seeds (min–max). VOC: VOC2010+ area mAP@0.5; VOC07: 11-point mAP@0.5. "
        "Training minutes: wall time of the training loop; test s/img: evaluation with image "
        "reading, batch 1.",
        "",
        markdown_table(
            ["regime", "framework", "runs", "iterations", "VOC mAP", "VOC07 mAP", "training min", "test s/img"], rows
        ),
        "",
        "On par: detkit's mean VOC mAP >= torchvision's mean minus the larger spread (spread = max - min "
        "over seeds). Ratios: detkit / torchvision (below 1: detkit faster).",
        "",
        markdown_table(
            [
                "regime",
                "VOC mAP detkit - torchvision",
                "larger spread",
                "on par",
                "training time ratio",
                "test s/img ratio",
            ],
            verdict_rows,
        ),
    ]
    about = [
        f"`{r}`: {REGIMES[r].about} (`{_display(specs[r][0].config)}`)"
        for r in results
        if r in REGIMES and specs.get(r)
    ]
    if about:
        lines += ["", "Regimes: " + "; ".join(about) + "."]
    notes = []
    common = None
    for regime in results:
        devs = set(deviations.get(regime, []))
        common = devs if common is None else common & devs
    common = common or set()
    if common:
        notes += [f"Every regime: torchvision cannot follow the {d}." for d in sorted(common)]
    for regime in results:
        own = [d for d in deviations.get(regime, []) if d not in common]
        notes += [f"{regime}: torchvision cannot follow the {d}." for d in own]
    if meta.get("failed"):
        notes.append(
            "Failed runs (left out of the table; the next start of the suite trains them again): "
            + "; ".join(meta["failed"])
            + "."
        )
    if any(r[6].endswith("†") for r in rows):
        notes.append("†: a run was resumed; its training minutes are the sum of its logged seconds per iteration.")
    load = meta.get("load_average")
    if load:
        notes.append(
            f"1-minute load average at the runs' starts and ends: {load['min']:.2f}–{load['max']:.2f} "
            "(above the core count: other jobs shared the machine, the time columns are indicative)."
        )
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n", data


def _display(path: str) -> str:
    """A path relative to the repository when it lies inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def load_range(out: Path, specs: Sequence[RunSpec]) -> Optional[Dict[str, float]]:
    values = []
    for spec in specs:
        for launch in read_spec_file(spec.run_dir(out)).get("launches", []):
            for key in ("load_before", "load_after"):
                if launch.get(key):
                    values.append(launch[key][0])
    return {"min": min(values), "max": max(values)} if values else None


# -- main ------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), metavar="NAME", help=", ".join(REGIMES))
    p.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--budget", type=float, default=1.0, help="share of each recipe's iterations (0.25: a quarter)")
    p.add_argument("--out", type=Path, help="run folders (default work_dirs/parity[_budget<B>])")
    p.add_argument("--report", type=Path, help="table files PREFIX.md and PREFIX.json (default OUT/parity)")
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        dest="sets",
        help="recipe overrides for every run of both frameworks (e.g. train.num_threads=1)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time; train nothing")
    p.add_argument("--report-only", action="store_true", help="write the table from the finished runs; train nothing")
    args = p.parse_args(argv)
    unknown = [r for r in args.regimes if r not in REGIMES]
    if unknown:
        p.error(f"unknown regime(s) {', '.join(unknown)} (choose from {', '.join(REGIMES)})")
    if not args.budget > 0:
        p.error(f"--budget must be positive, got {args.budget}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must be distinct, got {args.seeds}")
    return args


def run_suite(args, launcher: Callable = launch_subprocess, echo: Callable[[str], None] = print) -> int:
    out = args.out or default_out(args.budget)
    report = args.report or out / "parity"
    specs = {r: regime_specs(r, args.frameworks, args.seeds, args.budget, args.sets) for r in args.regimes}
    runner = Runner(out, launcher=launcher, echo=echo)
    everything = [s for r in args.regimes for s in specs[r]]
    if args.dry_run:
        total = 0.0
        for spec in everything:
            state = runner.state(spec, recipe_dict(spec.config, spec.overrides))
            est = 0.0 if state == "done" else estimate_seconds(spec, out)
            total += est
            cfg = load_recipe(spec.config, spec.overrides)
            action = {"done": "reuse (finished)", "partial": "resume" if spec.framework == "detkit" else "restart"}
            echo(
                f"{spec.group:18s} {spec.framework:11s} seed {spec.seed}: {action.get(state, 'train'):16s} "
                f"{cfg.train.max_iter:5d} iterations  ~{est / 60:5.1f} min  {spec.run_dir(out)}"
            )
        echo(
            f"{len(everything)} runs; estimated time {total / 60:.0f} min ({total / 3600:.1f} h) on a quiet 2-core CPU"
        )
        return 0
    meta_base = {"budget": args.budget, "seeds": list(args.seeds), "frameworks": list(args.frameworks)}
    meta_base["set"] = list(args.sets)
    deviations = {r: deviations_for(specs[r][0]) for r in args.regimes}

    def write(results) -> None:
        meta = {**meta_base, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine()}
        meta["load_average"] = load_range(out, everything)
        meta["failed"] = failed_runs(out, everything)
        markdown, data = build_report(results, specs, meta, deviations)
        write_report(report, markdown, data)

    results: Dict[str, Dict[str, List[RunResult]]] = {r: {fw: [] for fw in args.frameworks} for r in args.regimes}
    with exclusive(out):
        for i, spec in enumerate(everything):
            res = runner.recorded(spec) if args.report_only else runner.ensure(spec, f"[{i + 1}/{len(everything)}] ")
            if res is not None:
                results[spec.group][spec.framework].append(res)
                if not args.report_only:
                    write(results)
        write(results)
    return finish_report(report, runner.failed, echo)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run_suite(args)
    except DetkitError as exc:  # SuiteError, or a config error from detkit's loader: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
