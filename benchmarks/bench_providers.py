"""UNet forward time of bundles on execution providers, side by side (a script, not a test).

    python benchmarks/bench_providers.py --bundles int8w=shapes-portable@cpu,int8w=shapes-portable@openvino \\
        --batch 1,3 --repeats 20 --threads 2 --out docs/results/providers_speed.json
    python benchmarks/bench_providers.py --combine cpu1.json ov1.json cpu2.json ov2.json --out speed.json

Each row: the median and best of ``--repeats`` timed UNet calls (after two warm-up calls) on random
inputs of the bundle's shape (or ``--resolution``), at each batch. Rows merge into ``--out`` by
(bundle, provider, batch, resolution),
so the OpenVINO build (its own venv) and the default onnxruntime can add to one file. Timings on a
shared machine: the file records the load average around each row.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from zo_runtime.bundle import Bundle

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_zo_signal import versions  # noqa: E402
from zo_runtime.sysinfo import source_commit  # noqa: E402


def time_unet(bundle: Bundle, batch: int, repeats: int, resolution: int | None = None) -> list[float]:
    sess = bundle.session("unet")
    h = (resolution or bundle.resolution) // bundle.vae_scale_factor
    rng = np.random.default_rng(0)
    ehs = bundle.input_spec("unet", "encoder_hidden_states")["shape"]
    feed = {"sample": rng.standard_normal((batch, bundle.latent_channels, h, h)).astype(np.float32),
            "timestep": bundle.timestep_feed(500, batch),
            "encoder_hidden_states": rng.standard_normal((batch, int(ehs[1]) if isinstance(ehs[1], int) else 77,
                                                          bundle.embedding_dim)).astype(np.float32)}
    for _ in range(2):
        sess.run(None, feed)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feed)
        out.append(time.perf_counter() - t)
    return out


def table(data: dict) -> str:
    """The README's table: per row the median and best UNet call, and the median against the first row of
    the same round, resolution and batch (the CPU provider's, as the runs are ordered). Rows carry a
    ``round`` when runs of the two onnxruntime builds took turns (``combine``)."""
    lines = ["| round | bundle | target | UNet precision | provider | px | batch | median s | best s | median vs first row | 1-min load before / after |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    first = {}
    for r in data["rows"]:
        base = first.setdefault((r.get("round"), r["resolution"], r["batch"]), r["median_s"])
        lines.append(f"| {r.get('round', 1)} | {r['bundle']} | {r['target']} | {r['precision']} | {r['provider']} | {r['resolution']} | "
                     f"{r['batch']} | {r['median_s']:.3f} | {r['best_s']:.3f} | {r['median_s'] / base:.2f}x | "
                     f"{r['load_avg_1min'][0]:.1f} / {r['load_avg_1min'][1]:.1f} |")
    return "\n".join(lines)


def combine(paths: list[str], out: str) -> dict:
    """Results files of runs that took turns (CPU build, OpenVINO build, CPU build, ...), in the order
    given, as one file: each run's rows tagged with its round (a new round starts at each repeated row key)."""
    data, seen, rnd = {"runs": [], "rows": []}, set(), 1
    for p in paths:
        part = json.loads(Path(p).read_text())
        keys = {(r["bundle"], r["provider"], r["batch"], r.get("resolution")) for r in part["rows"]}
        if keys & seen:
            rnd, seen = rnd + 1, set()
        seen |= keys
        data["rows"] += [dict(r, round=rnd) for r in part["rows"]]
        data["runs"] += part["runs"]
    Path(out).write_text(json.dumps(data, indent=2) + "\n")
    return data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", help="name=path@provider,...")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resolution", type=int, help="image size in px (default: each bundle's own)")
    ap.add_argument("--out")
    ap.add_argument("--combine", nargs="+", metavar="RESULTS", help="write the runs of these results files, "
                    "which took turns, to --out as rounds, and stop")
    args = ap.parse_args(argv)
    if args.combine:
        if not args.out:
            ap.error("--combine needs --out")
        print(table(combine(args.combine, args.out)))
        return
    if not args.bundles:
        ap.error("--bundles is required (or --combine)")
    rows = []
    for item in args.bundles.split(","):
        name, rest = item.split("=", 1)
        path, _, provider = rest.rpartition("@")
        b = Bundle.load(path, provider=provider, threads=args.threads)
        for batch in (int(x) for x in args.batch.split(",")):
            load0 = os.getloadavg()[0]
            ts = time_unet(b, batch, args.repeats, args.resolution)
            row = {"bundle": name, "path": str(path), "provider": provider, "target": b.target,
                   "precision": b.graph("unet").get("precision"), "resolution": args.resolution or b.resolution, "batch": batch,
                   "median_s": round(float(np.median(ts)), 4), "best_s": round(float(np.min(ts)), 4),
                   "repeats": args.repeats, "threads": args.threads,
                   "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}
            rows.append(row)
            print(f"{name:<12} {provider:<10} batch {batch}: median {row['median_s'] * 1000:.1f} ms, best "
                  f"{row['best_s'] * 1000:.1f} ms (load {row['load_avg_1min']})", flush=True)
        del b
    if args.out:
        out = Path(args.out)
        data = json.loads(out.read_text()) if out.exists() else {"runs": [], "rows": []}
        key = lambda r: (r["bundle"], r["provider"], r["batch"], r.get("resolution"))  # noqa: E731
        new = {key(r) for r in rows}
        data["rows"] = [r for r in data["rows"] if key(r) not in new] + rows
        data["runs"].append({"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                             "commit": source_commit(), "versions": versions(), "date": time.strftime("%Y-%m-%d"),
                             "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores (shared)"})
        out.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
