"""Many jobs at once: 8 shapes jobs through ``zo-edge personalize-many`` vs one after another, side by
side in one run (a script, not a test).

    python benchmarks/bench_runner.py --steps 300 --out docs/results/bench_runner.json
    python benchmarks/bench_runner.py --table docs/results/bench_runner.json    # the README's table

Writes five references of each of the 8 held-out subjects and a jobs file (one thread per job, no SG,
the demo's recipe), then times, each as its own command, in turn, for ``--rounds`` rounds:
  - ``sequential``: ``zo-edge personalize`` once per job, one after another, one thread each;
  - ``sequential, all cores``: the same with ORT's default threads (one run alone uses every core);
  - ``runner``: ``zo-edge personalize-many`` on local processes (as many at once as fit);
  - ``runner, Ray`` with ``--ray ADDRESS``: the same jobs as Ray tasks.
The goal (issue 18): the runner's wall time is ⌈8 / jobs-that-fit⌉ single jobs (±15 %). Every mode's
tokens are checked bit for bit against the sequential ones. Load averages and the CPU seconds of the
child processes are recorded around each mode: on a shared machine the seconds move with the load of
everything else running, which is why the modes take turns.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zo_runtime.sysinfo import cpu_model, source_commit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def machine() -> dict:
    import onnxruntime

    mem = next((int(l.split()[1]) / 2**20 for l in Path("/proc/meminfo").read_text().splitlines()
                if l.startswith("MemTotal:")), None) if Path("/proc/meminfo").exists() else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": round(mem, 1) if mem else None,
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "os": platform.platform()}


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
    """Wall time, CPU time of the child processes (not Ray's workers) and the load around ``fn``."""
    load0, t0, c0 = os.getloadavg()[0], time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    extra = fn()
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": round(time.time() - t0, 2),
            "cpu_s": round(c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime, 2),
            "loadavg_1min_before": load0, "loadavg_1min_after": os.getloadavg()[0], **extra}


def run_sequential(jobs: list[dict], out: Path, threads: int | None) -> dict:
    out.mkdir()
    singles = []
    for job in jobs:
        t0 = time.time()
        r = zo_edge("personalize", "--images", job["images"], "--token", job["token"], "--init", job["init"],
                    "--steps", job["steps"], "--no-sg", "--seed", job["seed"],
                    "--threads", job["threads"] if threads is None else threads,
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


def run_on_ray(jobs: list[dict], out: Path, address: str) -> dict:
    if address != "local":
        return run_many(jobs, out, address)
    import ray

    t0 = time.time()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:  # the command joins the instance started here, as it would join a cluster
        return {"ray_start_s": round(time.time() - t0, 2), **run_many(jobs, out, "auto")}
    finally:
        ray.shutdown()


def same_tokens(a: Path, b: Path, jobs: list[dict]) -> bool:
    from zo_edge.runner import token_sha256

    return all(token_sha256(a / f"{j['name']}.safetensors") == token_sha256(b / f"{j['name']}.safetensors")
               for j in jobs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ray", help="also run the jobs on this Ray cluster (auto, HOST:PORT), or 'local': on a "
                                  "Ray instance this script starts with every core")
    ap.add_argument("--no-all-cores", action="store_true", help="skip the sequential run at ORT's default threads")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of every mode in turn")
    ap.add_argument("--out", default="bench_runner.json")
    ap.add_argument("--table", metavar="RESULTS", help="print the markdown table of a results file and stop")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    work = Path(tempfile.mkdtemp(prefix="zo-bench-runner-"))
    try:
        result = bench(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(table(result))


MODES = {  # name -> (folder, run(jobs, folder, args))
    "runner": ("runner", lambda jobs, out, args: run_many(jobs, out, None)),
    "sequential": ("sequential", lambda jobs, out, args: run_sequential(jobs, out, None)),
    "sequential, all cores": ("all-cores", lambda jobs, out, args: run_sequential(jobs, out, 0)),
    "runner, Ray": ("ray", lambda jobs, out, args: run_on_ray(jobs, out, args.ray)),
}


def bench(work: Path, args) -> dict:
    """``args.rounds`` rounds, each running every mode once in turn (runner, sequential, ...), so that
    a change in the machine's load falls on every mode alike."""
    jobs = make_jobs(work, args.steps)
    names = [n for n in MODES if (n != "sequential, all cores" or not args.no_all_cores)
             and (n != "runner, Ray" or args.ray)]
    rounds = []
    for r in range(args.rounds):
        modes = {}
        for name in names:
            folder, run = MODES[name]
            modes[name] = m = timed(lambda: run(jobs, work / f"{folder}-{r}", args))
            m["jobs_wall_s"] = round(m["wall_s"] - m.get("ray_start_s", 0), 2)  # not counting starting Ray here
        for name, m in modes.items():
            if name.startswith("runner"):
                m["tokens_equal_sequential"] = same_tokens(work / f"{MODES[name][0]}-{r}", work / f"sequential-{r}",
                                                           jobs)
        single = sum(modes["sequential"]["single_job_s"]) / len(jobs)
        fit = modes["runner"]["jobs_at_once"]
        goal = math.ceil(len(jobs) / fit) * single
        rounds.append({"single_job_s": round(single, 2), "jobs_that_fit": fit, "goal_wall_s": round(goal, 2),
                       "runner_vs_goal": round(modes["runner"]["jobs_wall_s"] / goal, 3), "modes": modes})
        for name in names:
            shutil.rmtree(work / f"{MODES[name][0]}-{r}", ignore_errors=True)
    cores = os.cpu_count()
    summary = {}
    for name in names:
        wall = statistics.median(rd["modes"][name]["jobs_wall_s"] for rd in rounds)
        cpu = statistics.median(rd["modes"][name]["cpu_s"] for rd in rounds)
        summary[name] = {"jobs_wall_s": round(wall, 2),
                         "jobs_per_hour_per_core": round(len(jobs) / wall * 3600 / cores, 1),
                         "cpu_s_per_job": round(cpu / len(jobs), 2),
                         "tokens_equal_sequential": rounds[0]["modes"][name].get("tokens_equal_sequential")}
    return {"benchmark": "bench_runner", "machine": machine(), "commit": source_commit(), "threads_per_job": 1,
            "jobs": len(jobs), "steps": args.steps, "rounds": rounds, "summary": summary,
            "runner_vs_goal": [rd["runner_vs_goal"] for rd in rounds],
            "note": "shared machine: other sessions' work ran beside it; see the load averages around each mode"}


def table(r: dict) -> str:
    m = r["machine"]
    lines = [f"{r['jobs']} shapes jobs × {r['steps']} steps, 1 thread each; {m['cores']} cores ({m['cpu']}), "
             f"commit {r['commit']}; {len(r['rounds'])} round(s), modes in turn, medians.", "",
             "| mode | wall s (8 jobs) | jobs / hour / core | CPU s / job | tokens = sequential |",
             "|---|---|---|---|---|"]
    for name, s in r["summary"].items():
        same = {True: "bit for bit", False: "**differ**"}.get(s["tokens_equal_sequential"], "–")
        cpu = f"{s['cpu_s_per_job']:.1f}" if not name.endswith("Ray") else "–"
        lines.append(f"| {name} | {s['jobs_wall_s']:.1f} | {s['jobs_per_hour_per_core']:.0f} | {cpu} | {same} |")
    lines += ["", "| round | one job alone (s) | jobs that fit | goal ⌈8 / fit⌉ × one job (s) | runner (s) "
              "| runner / goal | 1-min load avg after the runner / after sequential |", "|---|---|---|---|---|---|---|"]
    for k, rd in enumerate(r["rounds"]):
        run, seq = rd["modes"]["runner"], rd["modes"]["sequential"]
        lines.append(f"| {k + 1} | {rd['single_job_s']:.1f} | {rd['jobs_that_fit']} | {rd['goal_wall_s']:.1f} | "
                     f"{run['jobs_wall_s']:.1f} | {rd['runner_vs_goal']:.2f} | "
                     f"{run['loadavg_1min_after']:.1f} / {seq['loadavg_1min_after']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
