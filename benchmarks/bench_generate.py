"""Generation speed and memory: seconds per denoising step (guided, batch 2 through the UNet) and
peak RSS of the whole process, FP32 vs INT8 vs INT4 bundles side by side (a script, not a test).

    python benchmarks/bench_generate.py --bundles fp32=sd15-fp32,int8=sd15-int8,int4=sd15-int4 --size 512
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", required=True, help="name=path,name=path")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--low-memory", action="store_true")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        r = child(args.child, args.size, args.steps, args.low_memory)
        r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(r))
        return
    rows = []
    for item in args.bundles.split(","):
        name, path = item.split("=", 1)
        cmd = [sys.executable, __file__, "--bundles", "x=x", "--child", path, "--size", str(args.size),
               "--steps", str(args.steps)] + (["--low-memory"] if args.low_memory else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["name"] = name
        rows.append(r)
        print(json.dumps(r), file=sys.stderr)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.size} px, guided (CFG), DDIM")
    print("| bundle | s/step | peak RSS MB | vs first s/step | vs first RSS |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['s_per_step']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['s_per_step'] / rows[0]['s_per_step']:.2f}x | {r['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f}x |")


if __name__ == "__main__":
    main()
