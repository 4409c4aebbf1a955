"""Many jobs at once: 8 shapes jobs through ``zo-edge personalize-many`` vs one after another, side by
side in one run (a script, not a test).

    python benchmarks/bench_runner.py --steps 300 --out docs/results/bench_runner.json
    python benchmarks/bench_runner.py --table docs/results/bench_runner.json    # the README's table

Writes five references of each of the 8 held-out subjects and a jobs file (one thread per job, no SG,
the demo's recipe), then times, each as its own command:
  - ``sequential``: ``zo-edge personalize`` once per job, one after another, one thread each;
  - ``sequential, all cores``: the same with ORT's default threads (one run alone uses every core);
  - ``runner``: ``zo-edge personalize-many`` on local processes (as many at once as fit);
  - ``runner, Ray`` with ``--ray ADDRESS``: the same jobs as Ray tasks.
The goal (issue 18): the runner's wall time is ⌈8 / jobs-that-fit⌉ single jobs (±15 %). Every mode's
tokens are checked bit for bit against the sequential ones. Load averages are recorded around each
mode: on a shared machine the absolute seconds move, the side-by-side ratio is the figure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    import onnxruntime

    mem = next((int(l.split()[1]) / 2**20 for l in Path("/proc/meminfo").read_text().splitlines()
                if l.startswith("MemTotal:")), None) if Path("/proc/meminfo").exists() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1) if mem else None,
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "os": platform.platform()}


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def make_jobs(work: Path, steps: int) -> list[dict]:
    from PIL import Image

    from zo_edge.models import world

    jobs = []
    for k, (shape, colour, pattern) in enumerate(world.HELD_OUT):
        folder = work / "refs" / f"{colour}-{pattern}-{shape}"
        folder.mkdir(parents=True)
        for i, im in enumerate(world.reference_images(world.Subject(shape, colour, pattern), n=5, seed=k)):
            Image.fromarray(im).save(folder / f"ref_{i}.png")
        jobs.append({"name": folder.name, "images": str(folder), "token": f"<s{k}>", "init": "shape",
                     "steps": steps, "sg": False, "seed": k, "threads": 1})
    return jobs


def zo_edge(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zo_edge.cli.main", *map(str, args)], capture_output=True, text=True)


def timed(fn) -> dict:
    load0, t0 = os.getloadavg()[0], time.time()
    extra = fn()
    return {"wall_s": round(time.time() - t0, 2), "loadavg_1min_before": load0,
            "loadavg_1min_after": os.getloadavg()[0], **extra}


def run_sequential(jobs: list[dict], out: Path, threads: int | None) -> dict:
    out.mkdir()
    singles = []
    for job in jobs:
        t0 = time.time()
        r = zo_edge("personalize", "--images", job["images"], "--token", job["token"], "--init", job["init"],
                    "--steps", job["steps"], "--no-sg", "--seed", job["seed"], "--threads", job["threads"] if threads is None else threads,
                    "--out", out / f"{job['name']}.safetensors", "--run-dir", out / f"{job['name']}.run")
        if r.returncode:
            raise SystemExit(f"personalize failed: {r.stderr[-2000:]}")
        singles.append(round(time.time() - t0, 2))
    return {"single_job_s": singles}


def run_many(jobs: list[dict], out: Path, ray: str | None) -> dict:
    out.mkdir()
    jobs_file = out / "jobs.jsonl"
    jobs_file.write_text("".join(json.dumps({**j, "out": f"{j['name']}.safetensors"}) + "\n" for j in jobs))
    r = zo_edge("personalize-many", jobs_file, *(["--ray", ray] if ray else []))
    if r.returncode:
        raise SystemExit(f"personalize-many failed: {r.stderr[-2000:]}")
    m = re.search(r"up to (\d+) at once|cluster with (\d+) CPUs", r.stderr)
    manifest = json.loads((out / "jobs.results.json").read_text())["jobs"]
    return {"jobs_at_once": int(m.group(1) or m.group(2)) if m else None,
            "job_s": [r["seconds"] for r in manifest], "peak_rss_mb": [r["peak_rss_mb"] for r in manifest],
            "first_line": r.stderr.splitlines()[0]}


def same_tokens(a: Path, b: Path, jobs: list[dict]) -> bool:
    from zo_edge.runner import token_sha256

    return all(token_sha256(a / f"{j['name']}.safetensors") == token_sha256(b / f"{j['name']}.safetensors")
               for j in jobs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ray", help="also run the jobs on this Ray cluster (auto, HOST:PORT)")
    ap.add_argument("--no-all-cores", action="store_true", help="skip the sequential run at ORT's default threads")
    ap.add_argument("--out", default="bench_runner.json")
    ap.add_argument("--table", metavar="RESULTS", help="print the markdown table of a results file and stop")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    work = Path(tempfile.mkdtemp(prefix="zo-bench-runner-"))
    jobs = make_jobs(work, args.steps)
    modes = {"runner": timed(lambda: run_many(jobs, work / "runner", None)),
             "sequential": timed(lambda: run_sequential(jobs, work / "sequential", None))}
    if not args.no_all_cores:
        modes["sequential, all cores"] = timed(lambda: run_sequential(jobs, work / "all-cores", 0))
    if args.ray:
        modes["runner, Ray"] = timed(lambda: run_many(jobs, work / "ray", args.ray))
    for name, folder in (("runner", "runner"), ("runner, Ray", "ray")):
        if name in modes:
            modes[name]["tokens_equal_sequential"] = same_tokens(work / folder, work / "sequential", jobs)
    seq = modes["sequential"]
    single = sum(seq["single_job_s"]) / len(jobs)
    fit = modes["runner"]["jobs_at_once"]
    goal = math.ceil(len(jobs) / fit) * single
    cores = os.cpu_count()
    for m in modes.values():
        m["jobs_per_hour_per_core"] = round(len(jobs) / m["wall_s"] * 3600 / cores, 1)
    result = {"benchmark": "bench_runner", "machine": machine(), "commit": commit(), "threads_per_job": 1,
              "jobs": len(jobs), "steps": args.steps, "single_job_s": round(single, 2), "jobs_that_fit": fit,
              "goal_wall_s": round(goal, 2), "runner_vs_goal": round(modes["runner"]["wall_s"] / goal, 3),
              "modes": modes, "note": "shared machine: see the load averages around each mode"}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(table(result))


def table(r: dict) -> str:
    lines = [f"{r['jobs']} shapes jobs × {r['steps']} steps, {r['machine']['cores']} cores ({r['machine']['cpu']}), "
             f"commit {r['commit']}; one job alone (1 thread): {r['single_job_s']:.1f} s; jobs that fit: "
             f"{r['jobs_that_fit']}; goal ⌈{r['jobs']}/{r['jobs_that_fit']}⌉ × {r['single_job_s']:.1f} s = "
             f"{r['goal_wall_s']:.1f} s; runner / goal = {r['runner_vs_goal']:.2f}", "",
             "| mode | wall s | jobs / hour / core | load avg before → after | tokens = sequential |",
             "|---|---|---|---|---|"]
    for name, m in r["modes"].items():
        same = {True: "bit for bit", False: "**differ**"}.get(m.get("tokens_equal_sequential"), "–")
        lines.append(f"| {name} | {m['wall_s']:.1f} | {m['jobs_per_hour_per_core']:.0f} | "
                     f"{m['loadavg_1min_before']:.1f} → {m['loadavg_1min_after']:.1f} | {same} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
