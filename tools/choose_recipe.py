"""Choose recipe values on validation data: train a config for each candidate value (of one
or more keys) with several seeds, score every run on the config's test split (for
configs/parity/bccd_val.yaml: BCCD ``val``), print a table and the winner, write JSON.

    python tools/choose_recipe.py --dry-run
    python tools/choose_recipe.py                                   # box-head smooth-L1 beta 1 vs 1/9, seeds 0 1
    python tools/choose_recipe.py --grid model.roi_head.smooth_l1_beta=1.0,0.1111111111111111 \\
        --grid schedule=1,1.5                                       # 2 x 2 candidates
    python tools/choose_recipe.py --candidate "data.input.min_size_train=[320] data.input.min_size_test=320" \\
        --candidate "data.input.min_size_train=[384] data.input.min_size_test=384"
    python tools/choose_recipe.py --budget 0.25                     # every schedule at a quarter (a reduced version)

Candidates: the product of the ``--grid KEY=V1,V2,...`` lists (values split at top-level
commas, so ``[320],[384]`` are two lists), or explicit ``--candidate "K=V K2=V2"`` sets of
overrides (several keys that must change together, e.g. train and test size). The pseudo-key
``schedule`` scales the schedule (max_iter, warmup_iters, steps) by its value. Only detkit
trains here (the recipe is detkit's); runs are folders under ``--out`` as in the parity suite
(tools/parity_runs.py): finished ones are reused, interrupted ones resumed.

Winner: the highest mean VOC area mAP over the seeds. When its lead over the runner-up is
not larger than the larger of the two spreads (max - min over seeds), the table says so: the
runs do not settle the choice; add seeds (``--seeds 0 1 2 3``) or keep the value a paper gives.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import re
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from parity_runs import (  # noqa: E402
    ROOT,
    Runner,
    RunResult,
    RunSpec,
    SuiteError,
    cell,
    exclusive,
    failed_runs,
    finish_report,
    launch_subprocess,
    load_recipe,
    machine,
    markdown_table,
    read_jsonl,
    recipe_dict,
    scaled_schedule,
    summarize,
    write_report,
)

from detkit.errors import DetkitError  # noqa: E402

DEFAULT_CONFIG = "configs/parity/bccd_val.yaml"
# Fast R-CNN sec. 2.3 (beta 1, the recipe's value) against torchvision's fixed 1/9.
DEFAULT_GRID = ["model.roi_head.smooth_l1_beta=1.0,0.1111111111111111"]
# Seconds per iteration of the BCCD recipe with detkit (README, 2026-11-26) for --dry-run.
DEFAULT_S_PER_ITER = 1.63


def split_values(text: str) -> List[str]:
    """'1,[2, 3],x' -> ['1', '[2, 3]', 'x']: commas inside brackets do not split."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    if any(not v for v in out):
        raise SuiteError(f"--grid: empty value in {text!r}")
    return out


def parse_grid(grid: Sequence[str]) -> List[List[Tuple[str, str]]]:
    """--grid entries -> the candidates: lists of (key, value), one per grid key."""
    axes = []
    for entry in grid:
        key, sep, values = entry.partition("=")
        if not sep or not key.strip():
            raise SuiteError(f"--grid takes KEY=V1,V2,..., got {entry!r}")
        axes.append([(key.strip(), v) for v in split_values(values)])
    return [list(c) for c in itertools.product(*axes)] if axes else []


def parse_candidate(text: str) -> List[Tuple[str, str]]:
    pairs = []
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SuiteError(f"--candidate takes 'KEY=VALUE KEY2=VALUE2', got {text!r}")
        pairs.append((key, value))
    if not pairs:
        raise SuiteError("--candidate: empty")
    return pairs


def label_of(pairs: Sequence[Tuple[str, str]]) -> str:
    return " ".join(f"{k}={v}" for k, v in pairs)


def folder_of(pairs: Sequence[Tuple[str, str]]) -> str:
    """A folder name for a candidate: the keys' last parts with their values, filesystem-safe;
    long names end in a hash of the full label (so different candidates never share one)."""
    name = "__".join(f"{k.split('.')[-1]}={v}" for k, v in pairs).replace("[", "").replace("]", "")
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "_", name).strip("_") or "default"
    digest = hashlib.sha1(label_of(pairs).encode()).hexdigest()[:8]
    return f"{name[:60]}-{digest}"


def candidate_overrides(config: str, pairs: Sequence[Tuple[str, str]], sets: Sequence[str]) -> List[str]:
    """The overrides of one candidate (``schedule=F`` becomes the scaled schedule)."""
    out = list(sets)
    for key, value in pairs:
        if key == "schedule":
            try:
                factor = float(value)
            except ValueError:
                raise SuiteError(f"schedule takes a number, got {value!r}") from None
            out += scaled_schedule(load_recipe(config, out).train, factor)
        else:
            out.append(f"{key}={value}")
    return out


def plan(args) -> Tuple[List[Tuple[str, List[Tuple[str, str]]]], List[RunSpec]]:
    """(candidates as (folder, pairs), the runs: per seed, every candidate)."""
    config = str((ROOT / args.config) if not Path(args.config).is_absolute() else Path(args.config))
    if not Path(config).is_file():
        raise SuiteError(f"config file not found: {args.config}")
    candidates = [parse_candidate(c) for c in args.candidate] if args.candidate else parse_grid(args.grid)
    if len(candidates) < 2:
        raise SuiteError("give at least two candidates (--grid KEY=V1,V2 or two --candidate)")
    named = [(folder_of(pairs), pairs) for pairs in candidates]
    if len({n for n, _ in named}) != len(named):
        raise SuiteError("two candidates are the same")
    specs = []
    for seed in args.seeds:
        for name, pairs in named:
            overrides = candidate_overrides(config, pairs, args.sets)
            overrides += scaled_schedule(load_recipe(config, overrides).train, args.budget)
            overrides.append(f"train.seed={seed}")
            max_iter = load_recipe(config, overrides).train.max_iter
            extra = [f"train.checkpoint_period={max(1, -(-max_iter // 4))}"]
            specs.append(RunSpec(name, "detkit", seed, config, overrides, extra))
    return named, specs


def decide(summaries: Dict[str, Dict]) -> Optional[Dict]:
    """The winner by mean VOC mAP, its lead over the runner-up and whether that lead
    exceeds the larger of their spreads."""
    ranked = sorted((name for name, s in summaries.items() if s.get("mAP")), key=lambda n: -summaries[n]["mAP"]["mean"])
    if not ranked:
        return None
    out: Dict = {"winner": ranked[0], "ranking": ranked}
    if len(ranked) > 1:
        a, b = summaries[ranked[0]]["mAP"], summaries[ranked[1]]["mAP"]
        out["lead"] = a["mean"] - b["mean"]
        out["larger_spread"] = max(a["spread"], b["spread"])
        out["settled"] = out["lead"] > out["larger_spread"]
    return out


def build_report(
    named: Sequence[Tuple[str, List[Tuple[str, str]]]], results: Dict[str, List[RunResult]], meta: Dict
) -> Tuple[str, Dict]:
    labels = {name: label_of(pairs) for name, pairs in named}
    summaries = {name: summarize(sorted(results.get(name, []), key=lambda r: r.seed)) for name, _ in named}
    choice = decide(summaries)
    rows = []
    for name, _ in named:
        s = summaries[name]
        mark = " **winner**" if choice and choice["winner"] == name else ""
        rows.append(
            [
                f"`{labels[name]}`{mark}",
                str(s["runs"]),
                cell(s["mAP"], 4),
                cell(s["voc07"], 4),
                cell(s["train_minutes"], 2),
            ]
        )
    lines = [
        f"# Recipe choice on validation data (tools/choose_recipe.py), {meta.get('date', '')}",
        "",
        f"Config {meta.get('config')}; budget {meta.get('budget', 1):g}; seeds "
        f"{', '.join(str(s) for s in meta.get('seeds', []))}; common overrides: "
        f"{' '.join(meta.get('set', [])) or 'none'}. Cells: mean over seeds (min–max); scored on the "
        "config's test split.",
        "",
        markdown_table(["candidate", "runs", "VOC mAP", "VOC07 mAP", "training min"], rows),
        "",
    ]
    if choice:
        lines.append(f"Winner: `{labels[choice['winner']]}`.")
        if "lead" in choice:
            verdict = (
                "larger than the larger spread: settled by these runs"
                if choice["settled"]
                else "not larger than the larger spread: these runs do not settle it (add seeds)"
            )
            lines[-1] += (
                f" Lead over `{labels[choice['ranking'][1]]}`: {choice['lead']:+.4f} VOC mAP; larger spread "
                f"{choice['larger_spread']:.4f}: {verdict}."
            )
    if meta.get("failed"):
        lines += ["", "Failed runs (left out; the next start trains them again): " + "; ".join(meta["failed"]) + "."]
    data = {
        **meta,
        "spread": "max - min over seeds",
        "candidates": {
            name: {"label": labels[name], "overrides": [f"{k}={v}" for k, v in pairs], **summaries[name]}
            for name, pairs in named
        },
        "choice": choice and {**choice, "winner_label": labels[choice["winner"]]},
    }
    for name, _ in named:
        data["candidates"][name]["runs_detail"] = [r.__dict__ for r in results.get(name, [])]
    return "\n".join(lines) + "\n", data


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"the recipe, scored on its test split ({DEFAULT_CONFIG})")
    p.add_argument("--grid", nargs="+", default=None, metavar="KEY=V1,V2", help=f"default: {DEFAULT_GRID[0]}")
    p.add_argument("--candidate", action="append", default=[], metavar='"K=V K2=V2"')
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--budget", type=float, default=1.0, help="share of each schedule's iterations")
    p.add_argument("--set", nargs="+", default=[], dest="sets", metavar="KEY=VALUE", help="overrides for every run")
    p.add_argument("--out", type=Path, help="run folders (default work_dirs/choose_recipe[_budget<B>])")
    p.add_argument("--report", type=Path, help="PREFIX.md and PREFIX.json (default OUT/choice)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their estimated time")
    p.add_argument("--report-only", action="store_true", help="the table from the finished runs; train nothing")
    args = p.parse_args(argv)
    if args.grid is None:
        args.grid = [] if args.candidate else list(DEFAULT_GRID)
    if args.grid and args.candidate:
        p.error("give --grid or --candidate, not both")
    if not args.budget > 0:
        p.error(f"--budget must be positive, got {args.budget}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must be distinct, got {args.seeds}")
    return args


def run(args, launcher: Callable = launch_subprocess, echo: Callable[[str], None] = print) -> int:
    out = args.out or ROOT / "work_dirs" / (
        "choose_recipe" if args.budget == 1 else f"choose_recipe_budget{args.budget:g}"
    )
    report = args.report or out / "choice"
    named, specs = plan(args)
    runner = Runner(out, launcher=launcher, echo=echo)
    if args.dry_run:
        total = 0.0
        for spec in specs:
            done = runner.state(spec, recipe_dict(spec.config, spec.overrides)) == "done"
            cfg = load_recipe(spec.config, spec.overrides)
            values = [r["s_per_iter"] for r in read_jsonl(spec.run_dir(out) / "metrics.jsonl") if "s_per_iter" in r]
            rate = sum(values) / len(values) if values else DEFAULT_S_PER_ITER
            est = 0.0 if done else 15 + cfg.train.max_iter * rate + 87 * 0.42
            total += est
            echo(
                f"seed {spec.seed} {spec.group:40s} {'reuse' if done else 'train':5s} {cfg.train.max_iter:5d} "
                f"iterations ~{est / 60:5.1f} min"
            )
        echo(f"{len(specs)} runs; estimated {total / 60:.0f} min on a quiet 2-core CPU (BCCD-sized runs)")
        return 0
    meta = {
        "config": str(args.config),
        "budget": args.budget,
        "seeds": list(args.seeds),
        "set": list(args.sets),
    }
    results: Dict[str, List[RunResult]] = {name: [] for name, _ in named}

    def write() -> None:
        m = {**meta, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "failed": failed_runs(out, specs)}
        write_report(report, *build_report(named, results, m))

    with exclusive(out):
        for i, spec in enumerate(specs):
            res = runner.recorded(spec) if args.report_only else runner.ensure(spec, f"[{i + 1}/{len(specs)}] ")
            if res is not None:
                results[spec.group].append(res)
                if not args.report_only:
                    write()
        write()
    return finish_report(report, runner.failed, echo)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except DetkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
