"""How heavy-tailed are RGE's directional derivatives during a real run?

A diagnostic for the estimator lab (docs/estimator-lab.md). For each subject a zo-edge run of the
quality benchmark's setup (references of seed 0, class-noun init, the shipped int8w shapes bundle,
the recipe as given) records every directional derivative δᵢ = [L(θ + μzᵢ) − L(θ)]/μ it measures,
with its timestep. Reported: the kurtosis of δ (3 for a Gaussian), the share of Σδ² carried by the
largest 1 %, 5 % and 10 % of them, the RMS of δ per 100-step timestep bin and over the first and
last 100 steps. A few samples carrying most of the energy is what ``--clip`` and ``--normalize``
(zo_runtime.optim) are for.

    python benchmarks/lab_tails.py --subjects orange:solid:triangle,green:solid:ring --steps 1000 \\
        --out docs/results/lab/tails.json
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zo_edge.models import quality as q, world  # noqa: E402
from zo_runtime.bundle import Bundle  # noqa: E402
from zo_runtime.outputs import write_json  # noqa: E402
from zo_runtime.personalize import PersonalizeConfig, Trainer  # noqa: E402
from zo_runtime.sysinfo import source_commit  # noqa: E402


def record(subject: str, steps: int, seed: int, model: str, fields: dict) -> np.ndarray:
    """[steps, 2 + n]: timestep, L(θ), then the step's n directional derivatives."""
    s = world.Subject.parse(subject)
    work = Path(tempfile.mkdtemp(prefix="zo-tails-"))
    q._write_refs(s, work / "refs", 5, seed, Bundle.load(model).resolution)
    cfg = PersonalizeConfig(model=model, images=str(work / "refs"), token="<x>", init=q.init_word(s, "class"),
                            out=str(work / "token.safetensors"), run_dir=str(work / "run"), steps=steps, seed=seed,
                            threads=1, checkpoint_every=steps, overwrite=True, **fields)
    trainer = Trainer(cfg)
    rows, losses = [], trainer.oracle.losses

    def spy(thetas, ids, slots, latent, noise, t, **kw):
        out = losses(thetas, ids, slots, latent, noise, t, **kw)
        if trainer.rge.antithetic:
            raise SystemExit("lab_tails records one-sided RGE only")
        rows.append([t, out[0], *((out[1:] - out[0]) / trainer.rge.mu)])
        return out

    trainer.oracle.losses = spy
    trainer.train()
    return np.array(rows)


def summarize(a: np.ndarray) -> dict:
    d = a[:, 2:].ravel()
    e = np.sort(d ** 2)[::-1]
    share = lambda frac: float(e[: max(1, int(len(e) * frac))].sum() / e.sum())  # noqa: E731
    t = a[:, 0]
    bins = {f"[{lo}, {lo + 100})": float(np.sqrt(np.mean(a[(t >= lo) & (t < lo + 100), 2:] ** 2)))
            for lo in range(0, 1000, 100) if np.any((t >= lo) & (t < lo + 100))}
    return {"derivatives": int(d.size), "kurtosis": float(np.mean((d - d.mean()) ** 4) / np.var(d) ** 2),
            "top_1pct": share(0.01), "top_5pct": share(0.05), "top_10pct": share(0.10), "rms_by_timestep": bins,
            "rms_first_100_steps": float(np.sqrt(np.mean(a[:100, 2:] ** 2))),
            "rms_last_100_steps": float(np.sqrt(np.mean(a[-100:, 2:] ** 2)))}


def _shown(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def table(report: dict) -> str:
    lines = ["| subject | derivatives | kurtosis (Gaussian: 3) | energy in the largest 1 % / 5 % / 10 % | "
             "RMS by timestep bin | RMS first / last 100 steps |", "|---|---|---|---|---|---|"]
    for r in report["results"]:
        bins = ", ".join(f"{k} {v:.4f}" for k, v in r["rms_by_timestep"].items())
        lines.append(f"| {r['subject']} | {r['derivatives']} | {r['kurtosis']:.1f} | {100 * r['top_1pct']:.0f} / "
                     f"{100 * r['top_5pct']:.0f} / {100 * r['top_10pct']:.0f} % | {bins} | "
                     f"{r['rms_first_100_steps']:.4f} / {r['rms_last_100_steps']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", default="orange:solid:triangle,green:solid:ring")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=str(ROOT / "models" / "shapes" / "bundle"))
    ap.add_argument("--method", default="zo-edge", help="a bench quality method: recipe with +key=value overrides")
    ap.add_argument("--out", default="tails.json")
    args = ap.parse_args(argv)
    fields = q.parse_method(args.method, allow_arm=False)
    if fields is None:
        raise SystemExit("lab_tails needs a zeroth-order method, not 'ti'")
    results, t0 = [], time.time()
    for subject in args.subjects.split(","):
        r = summarize(record(subject, args.steps, args.seed, args.model, fields))
        results.append({"subject": subject, **r})
        print(table({"results": results[-1:]}).splitlines()[-1], flush=True)
    report = {"benchmark": "lab_tails", "commit": source_commit(), "method": args.method, "steps": args.steps,
              "seed": args.seed, "model": _shown(args.model),
              "machine": q.machine_info(), "wall_seconds": round(time.time() - t0, 1), "results": results}
    write_json(args.out, report, what="lab report")
    print(table(report))


if __name__ == "__main__":
    main()
