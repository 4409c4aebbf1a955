"""Combine screening runs with a stored baseline, paired by (subject, seed), into one lab report.

The quality benchmark is deterministic (references, noise, directions and sampling follow the seed),
so a baseline method need not be rerun beside every screen: its stored runs are reused, after a
check that every run of the baseline the screens did repeat scored exactly what is stored (listed
under ``reproduced``; a mismatch stops the script). Baseline runs a screen made for pairs the stored
file lacks (more seeds: ``bench quality --first-seed``) join the baseline. A screen trained on another
execution provider (its report's ``provider``) is another arm: its runs are named ``METHOD@PROVIDER``; so is a screen
trained on another bundle (``--train-model``), named by ``--arm`` (e.g. ``--arm int4w``).

    python benchmarks/lab_screen.py --baseline docs/results/quality-seeds.json --method zo-edge \\
        --budget 3000 --screens screen3.json screen5.json --out docs/results/lab/screen-seeds.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zo_edge.models import quality as q  # noqa: E402
from zo_runtime.outputs import write_json  # noqa: E402


def at_budget(run: dict, budget: int) -> dict | None:
    """The run cut to its score at ``budget`` UNet passes, the last snapshot within it where whole steps
    (after any setup passes) do not land on the budget exactly (None if it has none)."""
    setup, per_step = run.get("setup_passes", 0), run["per_step"]
    point = next((c for c in run["curve"] if budget - per_step < c["unet_passes"] <= budget), None)
    if point is None:
        return None
    return dict(run, curve=[point], steps=(point["unet_passes"] - setup) // per_step)


def provider_arm(screen: dict, arm: str | None = None) -> dict:
    """The screen with each run named after the provider it trained on, where that is not the CPU's,
    or after ``arm`` (a screen trained on another bundle)."""
    arm = arm or (screen.get("provider") or "cpu").split(":")[0]
    if arm == "cpu":
        if screen.get("train_bundle"):
            raise SystemExit("a screen trained on another bundle (--train-model) needs --arm NAME")
        return screen
    return dict(screen, methods=[f"{m}{q.ARM}{arm}" for m in screen["methods"]],
                runs=[dict(r, method=f"{r['method']}{q.ARM}{arm}") for r in screen["runs"]])


def combine(baseline: dict, method: str, budget: int, screens: list[dict], arm: str | None = None) -> dict:
    screens = [provider_arm(s, arm) for s in screens]
    subjects = {r["subject"] for s in screens for r in s["runs"]}
    seeds = {r["seed"] for s in screens for r in s["runs"]}
    stored = {}
    for r in baseline["runs"]:
        if r["method"] == method and r["subject"] in subjects and r["seed"] in seeds:
            cut = at_budget(r, budget)
            if cut is not None and (r["subject"], r["seed"], r["init"]) not in stored:
                stored[(r["subject"], r["seed"], r["init"])] = cut
    reproduced, runs, added = [], list(stored.values()), 0
    for s in screens:
        for r in s["runs"]:
            cut = at_budget(r, budget)
            if cut is None:
                continue
            if r["method"] == method:
                old = stored.get((r["subject"], r["seed"], r["init"]))
                if old is None:   # a pair the baseline lacks (e.g. more seeds): the screen's own run joins it
                    stored[(r["subject"], r["seed"], r["init"])] = cut
                    runs.append(cut)
                    added += 1
                    continue
                a, b = old["curve"][0]["subject_fidelity"], cut["curve"][0]["subject_fidelity"]
                if a != b:
                    raise SystemExit(f"{method} {r['subject']} seed {r['seed']}: stored {a}, rerun {b}: "
                                     "the baseline is not reproduced, rerun it beside the screen")
                reproduced.append({"subject": r["subject"], "seed": r["seed"], "subject_fidelity": b})
            else:
                runs.append(cut)
    methods = [method] + list(dict.fromkeys(r["method"] for s in screens for r in s["runs"] if r["method"] != method))
    report = {k: screens[0][k] for k in ("k", "n_refs", "prompts", "gen_steps", "guidance", "ti_steps", "generic_init")}
    bundle = screens[0].get("bundle") or baseline.get("bundle") or "models/shapes/bundle"
    report.update(bundle=bundle, budgets=[budget], seeds=len(seeds), inits=["class"],
                  subjects=sorted(subjects), methods=methods, runs=runs, complete=all(s.get("complete") for s in screens),
                  baseline_from={"method": method, "machine": baseline.get("machine"), "runs": len(stored) - added,
                                 "run_beside_the_screens": added},
                  screens_from=[{"machine": s.get("machine"), "methods": s["methods"], "runs": len(s["runs"]),
                                 "provider": s.get("provider") or "cpu", "train_bundle": s.get("train_bundle"),
                                 "complete": s.get("complete"), "wall_seconds": s.get("wall_seconds")} for s in screens],
                  reproduced=reproduced)
    report["summary"] = q.summarize(report)
    report["paired"] = q.paired(report, method, budget)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--method", default="zo-edge")
    ap.add_argument("--budget", type=int, default=3000)
    ap.add_argument("--screens", nargs="+", required=True)
    ap.add_argument("--arm", help="name the screens' runs METHOD@ARM (screens trained on another bundle)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    load = lambda p: json.loads(Path(p).read_text())  # noqa: E731
    report = combine(load(args.baseline), args.method, args.budget, [load(p) for p in args.screens], args.arm)
    write_json(args.out, report, what="lab report")
    print(q.format_table(report["summary"], "tuning (first 6)"))
    print(q.format_paired(report["paired"]))
    print(f"baseline reproduced on {len(report['reproduced'])} reruns")


if __name__ == "__main__":
    main()
