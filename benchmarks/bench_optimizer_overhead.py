"""What the optimizer itself costs per step, beside the UNet passes it drives.

Times the NumPy side of one step (directions, candidates, estimate, the transformation chain,
apply) for each recipe and lab piece at a token width d (768: SD 1.x; 64: the shapes model), with
the losses given (no model). Compare with one UNet pass: seconds on a CPU at SD1.5 size
(``bench_personalize.py``), so any difference here is what the recipe adds to the cost per pass.

    python benchmarks/bench_optimizer_overhead.py --dims 64,768 --steps 2000 --out docs/results/optimizer_overhead.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from zo_runtime import optim
from zo_runtime.sysinfo import cpu_model, source_commit
from zo_runtime.personalize import PersonalizeConfig, make_estimator, make_optimizer, pca_basis

VARIANTS = {
    "zoodip": dict(recipe="zoodip"),
    "zo-edge": dict(recipe="zo-edge"),
    "zo-edge, no clip": dict(recipe="zo-edge", clip=0.0),
    "normalize": dict(recipe="zo-edge", clip=0.0, normalize=True),
    "antithetic n=1": dict(recipe="zo-edge", antithetic=True, n=1),
    "orthogonal": dict(recipe="zo-edge", directions="orthogonal"),
    "guided k=4": dict(recipe="zo-edge", directions="guided"),
    "token-pca r=32": dict(recipe="zo-edge", directions="token-pca", rank=32),
    "cosine schedule": dict(recipe="zo-edge", schedule="cosine"),
}


def time_variant(fields: dict, d: int, steps: int, seed: int = 0) -> float:
    cfg = PersonalizeConfig(model="", images="", token="<t>", init="", out="", steps=steps, **fields).resolved()
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((8192, d)).astype(np.float32)
    basis = pca_basis(cfg, table)
    rge, opt = make_estimator(cfg, basis), make_optimizer(cfg, dim=d, basis=basis)
    theta = table[0:1].copy()
    s_state, o_state = rge.sampler.init(theta), opt.init(theta)
    t0 = time.perf_counter()
    for _ in range(steps):
        z = rge.directions(rng, theta.shape, s_state)
        cands = rge.candidates(theta, z)
        losses = 0.01 + 1e-4 * np.sum(cands.reshape(len(cands), -1) ** 2, axis=1)  # stands in for the model
        g = rge.estimate(losses, z)
        s_state = rge.sampler.update(s_state, g)
        updates, o_state = opt.update(g, o_state, theta)
        theta = optim.apply_updates(theta, updates)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="64,768")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", default="optimizer_overhead.json")
    args = ap.parse_args()
    dims = [int(x) for x in args.dims.split(",")]
    rows = []
    for name, fields in VARIANTS.items():
        for d in dims:
            sec = time_variant(fields, d, args.steps)
            rows.append({"variant": name, "d": d, "us_per_step": sec * 1e6})
            print(f"{name:18s} d={d:4d}: {sec * 1e6:8.1f} us/step", flush=True)
    commit = source_commit()
    report = {"rows": rows, "steps": args.steps, "machine": {"cpu": cpu_model(),
              "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
              "commit": commit, "load_average": os.getloadavg()}}
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
