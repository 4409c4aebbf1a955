"""Generation speed and memory: seconds per denoising step (guided, batch 2 through the UNet) and
peak RSS of the whole process, bundles side by side (a script, not a test).

Each bundle runs in a fresh process; with ``--rounds R`` the bundles take turns R times (so the
machine's load falls on all alike) and each row reports the median of its rounds. ``--json`` writes
the rows with the machine, threads, load and commit.

    python benchmarks/bench_generate.py --bundles int8w=sd15-int8w,int8=sd15-int8 --size 512 --rounds 3 \
        --json docs/results/bench_generate_sd15.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def child(path: str, size: int, steps: int, low_memory: bool) -> dict:
    from zo_runtime.bundle import Bundle
    from zo_runtime.pipeline import Pipeline

    pipe = Pipeline(Bundle.load(path, verify=False), scheduler="ddim", low_memory=low_memory)
    stamps = []
    orig = pipe._unet

    def timed(*a, **k):
        out = orig(*a, **k)
        stamps.append(time.time())
        return out

    pipe._unet = timed
    t0 = time.time()
    pipe("a photo of a dog on the beach", steps=steps, height=size, width=size, progress=False)
    total = time.time() - t0
    per_call = [b - a for a, b in zip(stamps, stamps[1:])]
    calls_per_step = 2 if low_memory else 1
    per_step = sorted(per_call)[len(per_call) // 2] * calls_per_step if per_call else total / steps
    return {"s_per_step": per_step, "total_s": total}


def table(report: dict) -> str:
    """Seconds per guided denoising step (median of the rounds) and peak RSS per bundle, and each against
    the first row."""
    rows = report["rows"]
    lines = ["| bundle | px | s / step (median) | rounds | peak RSS MB | s / step vs first | first / this |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {report['size']} | {r['s_per_step']:.2f} | {r['rounds']} | "
                     f"{r['peak_rss_mb']:,.0f} | {r['s_per_step'] / rows[0]['s_per_step']:.2f}× | "
                     f"{rows[0]['s_per_step'] / r['s_per_step']:.2f}× |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", required=True, help="name=path,name=path")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--low-memory", action="store_true")
    ap.add_argument("--rounds", type=int, default=1, help="bundles take turns this many times")
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (ZO_EDGE_THREADS; 0: ORT's default)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        r = child(args.child, args.size, args.steps, args.low_memory)
        r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(r))
        return
    import statistics
    bundles = [item.split("=", 1) for item in args.bundles.split(",")]
    env = dict(os.environ, **({"ZO_EDGE_THREADS": str(args.threads)} if args.threads else {}))
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    runs: dict[str, list[dict]] = {name: [] for name, _ in bundles}
    for k in range(args.rounds):
        for name, path in bundles:
            cmd = [sys.executable, __file__, "--bundles", "x=x", "--child", path, "--size", str(args.size),
                   "--steps", str(args.steps)] + (["--low-memory"] if args.low_memory else [])
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs[name].append(r)
            print(f"round {k + 1}/{args.rounds} {name}: {json.dumps(r)}", file=sys.stderr, flush=True)
    rows = [{"name": name, "path": path, "rounds": len(runs[name]),
             "s_per_step": statistics.median(r["s_per_step"] for r in runs[name]),
             "s_per_step_all": [round(r["s_per_step"], 3) for r in runs[name]],
             "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[name])} for name, path in bundles if runs[name]]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.size} px, guided (CFG), DDIM")
    print("| bundle | s/step | peak RSS MB | vs first s/step | vs first RSS |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['s_per_step']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['s_per_step'] / rows[0]['s_per_step']:.2f}x | {r['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f}x |")
    if args.json:
        from zo_runtime.sysinfo import cpu_model, source_commit
        Path(args.json).write_text(json.dumps({
            "size": args.size, "steps": args.steps, "scheduler": "ddim", "guided": True, "low_memory": args.low_memory,
            "threads": args.threads or "ORT default", "rows": rows,
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                        "python": platform.python_version()},
            "loadavg_start": loadavg_start, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "commit": source_commit()}, indent=2))


if __name__ == "__main__":
    main()
