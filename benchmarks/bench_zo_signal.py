"""Does a quantized bundle keep the zeroth-order signal, on each backend? (a script, not a test)

RGE lives on loss differences L(θ + μz) − L(θ). Quantization rounds weights and, for static QDQ,
activations; if that rounding swallows the perturbation, the estimate is noise. For many random
(latent, noise, timestep, z) draws (t from the default recipe's band unless --timesteps), this
measures the correlation between the directional derivatives [L(θ + μz) − L(θ)] / μ on each
bundle × execution provider and on the FP32 bundle on the CPU provider (the same draws everywhere),
and the share of exactly-zero differences, per μ.

    python benchmarks/bench_zo_signal.py --fp32 shapes-fp32 \\
        --bundles int8w=models/shapes/bundle@cpu,a16w8=shapes-qnn@qnn,a16w8=shapes-qnn@cpu \\
        --trials 96 --out docs/results/zo_signal.json

Rows are merged into ``--out`` by (precision, target, backend): run it once per environment (the
OpenVINO build of onnxruntime lives in its own venv) with the same --fp32, --trials and --seed.
``zo_runtime.precision`` reads the μ each precision × backend should use from that file (a test
checks they agree); ``benchmarks/readme_tables.py`` renders its README table.
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
from zo_runtime.recipe import DEFAULT_RECIPE, RECIPES
from zo_runtime.sysinfo import source_commit
from zo_runtime.oracle import LossOracle
from zo_runtime.tokenizer import CLIPTokenizer

ROOT = Path(__file__).resolve().parent.parent


def directional(oracle, tok, init_word, mus, trials, seed, band):
    b = oracle.bundle
    ids, slots = tok.encode_prompt("a photo of a <x>", {"<x>": 1})
    theta = np.asarray(b.token_table[tok.single_token_id(init_word)], np.float32)[None]
    h = b.resolution // b.vae_scale_factor
    rng = np.random.default_rng(seed)
    out = {mu: [] for mu in mus}
    for _ in range(trials):
        latent = rng.standard_normal((b.latent_channels, h, h)).astype(np.float32)
        noise = rng.standard_normal(latent.shape).astype(np.float32)
        t = int(rng.integers(*band))
        z = rng.standard_normal(theta.shape).astype(np.float32)
        cands = np.stack([theta] + [theta + mu * z for mu in mus])
        losses = oracle.losses(cands, ids, slots, latent, noise, t)
        for k, mu in enumerate(mus):
            out[mu].append((losses[k + 1] - losses[0]) / mu)
    return {mu: np.array(v) for mu, v in out.items()}


def describe(bundle: Bundle) -> dict:
    m = bundle.manifest
    return {"precision": m["graphs"]["unet"].get("precision", "?"), "target": bundle.target,
            "text_encoder_precision": m["graphs"]["text_encoder"].get("precision", "?")}


def versions() -> dict:
    import onnxruntime as ort
    out = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    try:
        import onnxruntime_qnn
        out["onnxruntime_qnn"] = onnxruntime_qnn.__version__
    except ImportError:
        pass
    return out


def merge(path: Path, run: dict, rows: list[dict]) -> dict:
    """Add ``rows`` (and ``run``) to the results file at ``path``, replacing rows of the same key."""
    data = json.loads(path.read_text()) if path.exists() else {"runs": [], "rows": []}
    key = lambda r: (r["precision"], r["target"], r["backend"], tuple(r["timesteps"]), r["mu"])  # noqa: E731
    new = {key(r) for r in rows}
    data["rows"] = [r for r in data["rows"] if key(r) not in new] + rows
    data["rows"].sort(key=key)
    data["runs"].append(run)
    return data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", required=True, help="the FP32 reference bundle (run on the CPU provider)")
    ap.add_argument("--bundles", required=True, help="name=path@provider,... (provider: cpu, qnn, openvino, ...)")
    ap.add_argument("--init", default="shape")
    ap.add_argument("--mus", default="1e-3,1e-2")
    ap.add_argument("--trials", type=int, default=96)
    ap.add_argument("--timesteps", default="{t_low},{t_high}".format(**RECIPES[DEFAULT_RECIPE]),
                    help="LO,HI: t ~ U[LO, HI) [the default recipe's band]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    ap.add_argument("--out", help="results JSON to merge the rows into (e.g. docs/results/zo_signal.json)")
    args = ap.parse_args(argv)
    mus = [float(m) for m in args.mus.split(",")]
    band = tuple(int(t) for t in args.timesteps.split(","))
    ref_b = Bundle.load(args.fp32, threads=args.threads)
    tok = CLIPTokenizer.from_pretrained(ref_b.tokenizer_dir)
    t0 = time.time()
    ref = directional(LossOracle(ref_b, "on"), tok, args.init, mus, args.trials, args.seed, band)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, threads {args.threads}; {args.trials} draws, "
          f"t ~ U[{band[0]}, {band[1]}), init '{args.init}'; fp32 reference {time.time() - t0:.0f} s", flush=True)
    print("| bundle | precision | backend | mu | corr. with FP32 | zero differences | std ratio | s/draw |")
    print("|---|---|---|---|---|---|---|---|")
    run = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]), "commit": source_commit(),
           "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores (shared)",
           "threads": args.threads, "draws": args.trials, "seed": args.seed, "init": args.init, "timesteps": list(band),
           "reference": "fp32 bundle on the CPU provider", "versions": versions(), "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out) if args.out else None
    if out is not None:
        out.write_text(json.dumps(merge(out, run, []), indent=2) + "\n")
    rows = []
    for item in args.bundles.split(","):
        name, rest = item.split("=", 1)
        path, _, provider = rest.rpartition("@") if "@" in rest else (rest, "", "cpu")
        b = Bundle.load(path, provider=provider, threads=args.threads)
        t0 = time.time()
        got = directional(LossOracle(b, "on"), tok, args.init, mus, args.trials, args.seed, band)
        per_draw = (time.time() - t0) / args.trials
        d = describe(b)
        for mu in mus:
            a, r = got[mu], ref[mu]
            corr = float(np.corrcoef(a, r)[0, 1]) if a.std() > 0 else 0.0
            row = {**d, "backend": provider.split(":")[0], "timesteps": list(band), "mu": mu, "corr": round(corr, 4),
                   "zero_share": round(float(np.mean(a == 0)), 4), "std_ratio": round(float(a.std() / r.std()), 3),
                   "draws": args.trials, "seconds_per_draw": round(per_draw, 3), "bundle": name}
            rows.append(row)
            print(f"| {name} | {d['precision']} | {row['backend']} | {mu:g} | {corr:.3f} | {row['zero_share']:.0%} | "
                  f"{row['std_ratio']:.2f} | {per_draw:.2f} |", flush=True)
        del b
        if out is not None:  # after each bundle: a long run (the HTP simulator) keeps what it measured
            data = merge(out, run, rows)
            data["runs"] = data["runs"][:-1]
            out.write_text(json.dumps(data, indent=2) + "\n")
    if out is not None:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
