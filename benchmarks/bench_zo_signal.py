"""Does a quantized bundle keep the zeroth-order signal? (a script, not a test)

RGE lives on loss differences L(θ + μz) − L(θ) with μ = 1e-3. Static INT8 quantization rounds
activations to 256 levels; if that rounding swallows the perturbation, the estimate is noise.
For many random (latent, noise, timestep, z), this prints the correlation between the directional
derivatives [L(θ + μz) − L(θ)] / μ measured on each quantized bundle and on the FP32 bundle, and
the share of exactly-zero differences, for several μ.

    python benchmarks/bench_zo_signal.py --fp32 shapes-fp32 --bundles int8=models/shapes/bundle
"""
from __future__ import annotations

import argparse
import platform

import numpy as np

from zo_runtime.bundle import Bundle
from zo_runtime.oracle import LossOracle
from zo_runtime.tokenizer import CLIPTokenizer


def directional(oracle, tok, init_word, mus, trials, seed):
    b = oracle.bundle
    ids, slots = tok.encode_prompt("a photo of a <x>", {"<x>": 1})
    theta = np.asarray(b.token_table[tok.single_token_id(init_word)], np.float32)[None]
    h = b.resolution // b.vae_scale_factor
    rng = np.random.default_rng(seed)
    out = {mu: [] for mu in mus}
    for _ in range(trials):
        latent = rng.standard_normal((b.latent_channels, h, h)).astype(np.float32)
        noise = rng.standard_normal(latent.shape).astype(np.float32)
        t = int(rng.integers(500, 900))
        z = rng.standard_normal(theta.shape).astype(np.float32)
        cands = np.stack([theta] + [theta + mu * z for mu in mus])
        losses = oracle.losses(cands, ids, slots, latent, noise, t)
        for k, mu in enumerate(mus):
            out[mu].append((losses[k + 1] - losses[0]) / mu)
    return {mu: np.array(v) for mu, v in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", required=True)
    ap.add_argument("--bundles", required=True, help="name=path,...")
    ap.add_argument("--init", default="shape")
    ap.add_argument("--mus", default="1e-4,1e-3,1e-2")
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    mus = [float(m) for m in args.mus.split(",")]
    ref_b = Bundle.load(args.fp32)
    tok = CLIPTokenizer.from_pretrained(ref_b.tokenizer_dir)
    ref = directional(LossOracle(ref_b, "on"), tok, args.init, mus, args.trials, args.seed)
    print(f"machine: {platform.machine()}; {args.trials} trials, t ~ U[500, 900), init '{args.init}'")
    print("| bundle | mu | corr. with FP32 | zero differences | std ratio |")
    print("|---|---|---|---|---|")
    for mu in mus:
        print(f"| fp32 | {mu:g} | 1.000 | {np.mean(ref[mu] == 0):.0%} | 1.00 |")
    for item in args.bundles.split(","):
        name, path = item.split("=", 1)
        got = directional(LossOracle(Bundle.load(path), "on"), tok, args.init, mus, args.trials, args.seed)
        for mu in mus:
            a, r = got[mu], ref[mu]
            corr = np.corrcoef(a, r)[0, 1] if a.std() > 0 else 0.0
            print(f"| {name} | {mu:g} | {corr:.3f} | {np.mean(a == 0):.0%} | {a.std() / r.std():.2f} |")


if __name__ == "__main__":
    main()
