#!/usr/bin/env python
"""Benchmark ``zo-edge convert`` and the converted UNet on CPU (a script, not a test).

Builds a random-weight Stable Diffusion pipeline from configs (no download), exports it once with
Optimum, converts it to fp32 / int8 / int4 bundles, then prints:

* convert time and peak RSS per stage (export measured in its own process),
* bundle sizes per graph,
* UNet forward time (median) and peak RSS per precision, resolution and batch, each measured in a
  fresh subprocess so RSS is clean,
* the accuracy report of each bundle (vs the FP32 export, held-out inputs).

    python benchmarks/bench_convert.py --tiny                 # tiny configs: seconds, proves it works
    python benchmarks/bench_convert.py --size mid --threads 1 # SD1.5's top UNet levels at 64x64 latents
    python benchmarks/bench_convert.py                        # SD1.5 shapes: ~15+ min CPU, ~12 GB RAM

``--threads 0`` lets ONNX Runtime use every core. ``--json FILE`` also writes all numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_RES = {"tiny": [16, 32], "mid": [256, 512], "sd15": [256, 512]}
GRAPHS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


def peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: kB


def sub(*args: str, threads: int) -> dict:
    """Run this script's hidden sub-command in a fresh process; return its JSON line."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"sub-command {args[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ hidden sub-commands (own process)

def _build(out: str, size: str) -> dict:
    from zo_edge.testing import build_pipeline
    t = time.perf_counter()
    build_pipeline(out, family="sd1", size=size, seed=0)
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb()}


def _export(src: str, out: str) -> dict:
    from zo_edge.convert.export import export_onnx
    t = time.perf_counter()
    export_onnx(src, out)
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb()}


def _convert(src: str, out: str, weights: str, export_dir: str, fuse: str, n_calib: str) -> dict:
    from zo_edge.convert import convert_pipeline
    from zo_edge.models.calibration import SHAPES_WORLD
    t = time.perf_counter()
    m = convert_pipeline(src, out, weights=weights, overwrite=True, export_dir=export_dir,
                         fuse=None if fuse == "auto" else fuse == "on", calibration_samples=int(n_calib),
                         data=SHAPES_WORLD)
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb(), "stages": m["build"]["stages"],
            "accuracy": m["accuracy"], "fuse": m["quantization"]["fuse"]}


def _unet(bundle: str, res: str, batch: str, repeats: str, threads: str) -> dict:
    import numpy as np
    import onnxruntime as ort
    m = json.loads((Path(bundle) / "zo-edge.json").read_text())
    res, batch, repeats, threads = int(res), int(batch), int(repeats), int(threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    t = time.perf_counter()
    s = ort.InferenceSession(str(Path(bundle) / m["graphs"]["unet"]["path"]), so, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t
    load_rss = peak_rss_mb()
    h = res // m["vae_scale_factor"]
    rng = np.random.default_rng(0)
    ts = next(i for i in m["graphs"]["unet"]["inputs"] if i["name"] == "timestep")
    feeds = {"sample": rng.standard_normal((batch, m["latent_channels"], h, h)).astype(np.float32),
             "timestep": np.array(700, ts["dtype"]) if ts["rank"] == 0 else np.full((batch,), 700, ts["dtype"]),
             "encoder_hidden_states": rng.standard_normal((batch, m["max_length"], m["embedding_dim"])).astype(np.float32)}
    s.run(None, feeds)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        s.run(None, feeds)
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "load_s": load_s,
            "load_rss_mb": load_rss, "peak_rss_mb": peak_rss_mb()}


HIDDEN = {"_build": _build, "_export": _export, "_convert": _convert, "_unet": _unet}


# ------------------------------------------------------------------ main

def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="same as --size tiny")
    ap.add_argument("--size", choices=["tiny", "mid", "sd15"], default="sd15")
    ap.add_argument("--work", default="work-tmp/bench_convert", help="scratch folder (kept with --keep)")
    ap.add_argument("--precisions", default="fp32,int8,int4")
    ap.add_argument("--resolutions", default=None, help="comma list of pixel sizes (default per size)")
    ap.add_argument("--batches", default="1,3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads for the forward timings (0: all)")
    ap.add_argument("--fuse", choices=["auto", "on", "off", "both"], default="auto",
                    help="UNet fusion; 'both' converts each precision with and without")
    ap.add_argument("--calibration-samples", type=int, default=8)
    ap.add_argument("--json", default=None, help="also write every number here")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    a = ap.parse_args()
    size = "tiny" if a.tiny else a.size
    res_list = [int(r) for r in (a.resolutions.split(",") if a.resolutions else DEFAULT_RES[size])]
    batches = [int(b) for b in a.batches.split(",")]
    precisions = a.precisions.split(",")
    fuses = ["on", "off"] if a.fuse == "both" else [a.fuse]
    work = Path(a.work) / size
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    report: dict = {"size": size, "threads": a.threads, "cpu_count": os.cpu_count()}
    try:
        src, exp = work / "pipeline", work / "export"
        print(f"== building the {size} pipeline from configs", flush=True)
        report["build"] = sub("_build", str(src), size, threads=a.threads)
        print(f"   {report['build']['seconds']:.1f} s, peak RSS {report['build']['peak_rss_mb']:,.0f} MB", flush=True)
        print("== export (optimum main_export, own process)", flush=True)
        report["export"] = sub("_export", str(src), str(exp), threads=a.threads)
        print(f"   {report['export']['seconds']:.1f} s, peak RSS {report['export']['peak_rss_mb']:,.0f} MB", flush=True)
        bundles = {}
        report["convert"] = {}
        for p in precisions:
            for fz in fuses:
                key = p if len(fuses) == 1 else f"{p}-fuse-{fz}"
                out = work / f"bundle-{key}"
                print(f"== convert {key}", flush=True)
                r = sub("_convert", str(src), str(out), p, str(exp), fz, str(a.calibration_samples), threads=a.threads)
                r["bytes"] = {g: dir_bytes(out / g) for g in GRAPHS}
                r["bytes"]["total"] = dir_bytes(out)
                report["convert"][key] = r
                bundles[key] = out
                for st, v in r["stages"].items():
                    print(f"   {st:<10} {v['seconds']:8.1f} s   peak RSS {v['peak_rss_mb']:>9,.0f} MB")
                print(f"   total      {r['seconds']:8.1f} s   peak RSS {r['peak_rss_mb']:>9,.0f} MB  fuse={r['fuse']}",
                      flush=True)
        print("== UNet forward (fresh process each)", flush=True)
        report["unet"] = {}
        for key, out in bundles.items():
            for res in res_list:
                for b in batches:
                    r = sub("_unet", str(out), str(res), str(b), str(a.repeats), str(a.threads), threads=a.threads)
                    report["unet"][f"{key}/{res}/b{b}"] = r
                    print(f"   {key:<16} {res:>4} px b{b}: {r['median_s']:7.3f} s  (min {r['min_s']:.3f})  "
                          f"peak RSS {r['peak_rss_mb']:>8,.0f} MB  (after load {r['load_rss_mb']:,.0f} MB)", flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    _print_summary(report)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))


STAGES = ("rewrite", "optimize", "calibrate", "quantize", "verify", "finalize")


def convert_table(r: dict) -> str:
    """Per bundle: each conversion stage's seconds / peak RSS, the whole conversion's, and the export's
    (its own process; the same export feeds every bundle)."""
    lines = [f"| bundle | export | {' | '.join(STAGES)} | convert s | convert peak RSS MB |",
             "|---" * (len(STAGES) + 4) + "|"]
    exp = f"{r['export']['seconds']:.0f} s / {r['export']['peak_rss_mb']:,.0f} MB"
    for k, c in r["convert"].items():
        cells = [f"{c['stages'][s]['seconds']:.0f} s / {c['stages'][s]['peak_rss_mb']:,.0f} MB" if s in c["stages"]
                 else "–" for s in STAGES]
        lines.append(f"| {k} | {exp} | " + " | ".join(cells) + f" | {c['seconds']:.0f} | {c['peak_rss_mb']:,.0f} |")
    return "\n".join(lines)


def unet_table(r: dict) -> str:
    """UNet forward per bundle, resolution and batch: median seconds and peak RSS (fresh process each)."""
    lines = ["| bundle | px | batch | s / forward (median) | peak RSS MB | bundle MB |", "|---|---|---|---|---|---|"]
    for k, u in r["unet"].items():
        name, px, b = k.rsplit("/", 2)
        lines.append(f"| {name} | {px} | {b[1:]} | {u['median_s']:.2f} | {u['peak_rss_mb']:,.0f} | "
                     f"{r['convert'][name]['bytes']['total'] / 2**20:,.0f} |")
    return "\n".join(lines)


def _print_summary(r: dict) -> None:
    from zo_edge.convert.accuracy import format_accuracy
    print(f"\n## Convert ({r['size']}, {r['cpu_count']} CPUs)")
    print(convert_table(r))
    print("\n## Bundle sizes (MB; text_encoder includes the token table .npy)")
    print("| bundle | " + " | ".join(GRAPHS) + " | total |")
    print("|---" * (len(GRAPHS) + 2) + "|")
    for k, c in r["convert"].items():
        print(f"| {k} | " + " | ".join(f"{c['bytes'][g] / 1e6:,.2f}" for g in GRAPHS)
              + f" | {c['bytes']['total'] / 1e6:,.2f} |")
    print(f"\n## UNet forward (threads={r['threads'] or 'all'})")
    print(unet_table(r))
    print("\n## Accuracy vs FP32 export (held-out)")
    for k, c in r["convert"].items():
        print(f"{k}:")
        print("\n".join(format_accuracy(c["accuracy"])))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in HIDDEN:
        print(json.dumps(HIDDEN[sys.argv[1]](*sys.argv[2:])))
    else:
        main()
