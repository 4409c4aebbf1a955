"""Where the zeroth-order token loses to TI's: the training objective itself, measured with common draws.

A diagnostic for the estimator lab (docs/estimator-lab.md, issue 12). Per subject and seed it trains
backprop TI (1,000 steps, the benchmark's baseline) and the given zo-edge methods on the benchmark's
references, then evaluates every token on the same N training draws (reference, template, noise,
t ~ U[0, 1000)) through the shipped ORT bundle: the expected denoising loss, as a difference from TI's
token with its standard error (paired over the draws, so differences of 1e-4 separate).

For each ZO token it also splits the move from the init word, Δ, into its component along TI's move
(``par``) and the rest (``perp``), and evaluates init + par, init + perp and TI + perp: whether the ZO
token lacks TI's direction or carries it under something else.

    python benchmarks/lab_loss_gap.py --subjects yellow:striped:cross --seeds 0 \
        --methods zo-edge,zo-edge+schedule=cosine*3000 --draws 400 --out docs/results/lab/loss-gap.json

Tokens are cached in --cache (a run is skipped when its token is there), so methods can be added later.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from zo_runtime.sysinfo import cpu_model

ROOT = Path(__file__).resolve().parents[1]
BANDS = ((0, 1000), (0, 250), (250, 500), (500, 750), (750, 1000))


def train_tokens(subject_s: str, seed: int, methods: list[str], cache: Path, threads: int = 1) -> dict:
    """{name: token [V, D]} for "init", "ti" and every method ("METHOD*STEPS" trains STEPS steps, else 1,000;
    "METHOD~K" runs it with seed + K: the same references, other draws and directions)."""
    from zo_edge.models import resolve_model, world
    from zo_edge.models.quality import TOKEN, _write_refs, init_word, parse_method
    from zo_runtime.bundle import Bundle
    from zo_runtime.personalize import PersonalizeConfig, Trainer

    subject = world.Subject.parse(subject_s)
    bundle_dir = resolve_model("shapes")
    work = Path(tempfile.mkdtemp())
    bundle = Bundle.load(bundle_dir, threads=threads)
    refs_dir = work / "refs"
    _write_refs(subject, refs_dir, 5, seed, bundle.resolution)
    init = init_word(subject, "class")
    cache.mkdir(parents=True, exist_ok=True)
    stem = f"{subject_s.replace(':', '_')}-{seed}"
    tokens = {}
    for name in ["ti", *methods]:
        path = cache / f"{stem}-{name}.npy"
        if not path.exists():
            t0 = time.time()
            if name == "ti":
                from zo_edge.eval.textual_inversion import textual_inversion
                from zo_runtime.data import list_images, load_image

                images = np.stack([load_image(f, bundle.resolution) for f in list_images(str(refs_dir))])
                theta = textual_inversion(str(Path(bundle_dir).parent / "source"), images, TOKEN, init, 1000,
                                          lr=5e-3, seed=seed, threads=threads)["theta"]
            else:
                spec, _, offset = name.partition("~")
                spec, _, steps = spec.partition("*")
                fields, steps = parse_method(spec, allow_arm=False), int(steps or 1000)
                cfg = PersonalizeConfig(model=bundle_dir, images=str(refs_dir), token=TOKEN, init=init,
                                        out=str(work / "t.safetensors"), run_dir=str(work / f"run-{len(tokens)}"),
                                        steps=steps, seed=seed + int(offset or 0), threads=threads, checkpoint_every=steps,
                                        overwrite=True, **fields)
                theta = Trainer(cfg).train().theta
            np.save(path, np.asarray(theta, np.float32))
            print(f"{stem} {name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        tokens[name] = np.load(path)
    cfg = PersonalizeConfig(model=bundle_dir, images=str(refs_dir), token=TOKEN, init=init,
                            out=str(work / "t.safetensors"), run_dir=str(work / "eval"), steps=1, seed=seed,
                            threads=threads, overwrite=True)
    trainer = Trainer(cfg)
    tokens["init"] = trainer.init_row().reshape(tokens["ti"].shape)
    return tokens, trainer


def candidates(tokens: dict, methods: list[str], valley: bool = False) -> dict:
    """The tokens to evaluate: init, TI, each method, and each method's move split along / across TI's.
    ``valley``: also points on the line from init through TI's token, and TI's token plus random offsets
    perpendicular to that line of a few sizes (how wide the basin TI's token sits in is)."""
    init, ti = tokens["init"], tokens["ti"]
    u = (ti - init) / np.linalg.norm(ti - init)
    out = {"init": init, "ti": ti}
    if valley:
        rng = np.random.default_rng(7)
        for a in (0.25, 0.5, 0.75, 1.5, 2.0):
            out[f"line@{a}"] = init + a * (ti - init)
        for r in (0.25, 0.5, 1.0, 2.0, 4.0):
            for k in range(2):
                e = rng.standard_normal(ti.shape)
                e -= float(e.ravel() @ u.ravel()) * u
                out[f"ti+perp{r}#{k}"] = ti + r * e / np.linalg.norm(e)
    for m in methods:
        move = tokens[m] - init
        par = float(move.ravel() @ u.ravel()) * u
        out[m] = tokens[m]
        out[f"{m}|par"] = init + par
        out[f"{m}|perp"] = init + move - par
        out[f"{m}|ti+perp"] = ti + move - par
    return out


def evaluate(trainer, cands: dict, draws: int, seed: int = 12345) -> dict:
    """Mean loss per band for every candidate and its paired difference from TI's token (± s.e.)."""
    names = list(cands)
    thetas = np.stack([cands[k] for k in names]).astype(np.float32)
    rng = np.random.default_rng(seed)
    ts, rows = [], []
    for _ in range(draws):
        i, ids, slots, latent, noise, _t = trainer.draw(rng)
        t = int(rng.integers(0, 1000))
        rows.append(trainer.oracle.losses(thetas, ids, slots, latent, noise, t, **trainer.conditioning(i)))
        ts.append(t)
    ts, rows = np.array(ts), np.array(rows)
    ti = names.index("ti")
    bands = {}
    for lo, hi in BANDS:
        m = (ts >= lo) & (ts < hi)
        diff = rows[m] - rows[m][:, [ti]]
        bands[f"{lo}-{hi}"] = {k: {"loss": float(rows[m, a].mean()), "minus_ti": float(diff[:, a].mean()),
                                   "se": float(diff[:, a].std(ddof=1) / np.sqrt(m.sum()))}
                               for a, k in enumerate(names)}
    return bands


def geometry(tokens: dict, methods: list[str]) -> dict:
    init, ti = tokens["init"], tokens["ti"]
    dt = (ti - init).ravel()
    out = {"init_norm": float(np.linalg.norm(init)), "ti_norm": float(np.linalg.norm(ti)),
           "ti_move": float(np.linalg.norm(dt))}
    for m in methods:
        dz = (tokens[m] - init).ravel()
        along = float(dz @ dt / np.linalg.norm(dt))
        out[m] = {"norm": float(np.linalg.norm(tokens[m])), "move": float(np.linalg.norm(dz)),
                  "along_ti_over_ti_move": along / float(np.linalg.norm(dt)),
                  "perp": float(np.sqrt(max(dz @ dz - along ** 2, 0.0))),
                  "cos_with_ti_move": along / float(np.linalg.norm(dz))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", required=True)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--methods", default="zo-edge")
    ap.add_argument("--draws", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ensemble", type=int, default=1,
                    help="run every method with K seeds (seed + 0 .. K - 1: the same references, other draws and "
                         "directions), and evaluate each and the mean of its K tokens")
    ap.add_argument("--valley", action="store_true", help="also the line through TI's token and random offsets from it")
    ap.add_argument("--cache", default="/tmp/zo-edge-loss-gap")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {"runs": []}
    report.update(machine=cpu_model(), python=platform.python_version(),
                  draws=args.draws)
    report.pop("command", None)      # each run records its own
    for subject in args.subjects.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            runs = [f"{m}~{k}" if k else m for m in methods for k in range(args.ensemble)]
            tokens, trainer = train_tokens(subject, seed, runs, Path(args.cache), args.threads)
            if args.ensemble > 1:
                for m in methods:
                    tokens[f"mean of {args.ensemble} x {m}"] = np.mean([tokens[r] for r in runs
                                                                        if r.partition("~")[0] == m], axis=0)
                runs += [f"mean of {args.ensemble} x {m}" for m in methods]
            t0 = time.time()
            bands = evaluate(trainer, candidates(tokens, runs, args.valley), args.draws)
            report["runs"] = [r for r in report["runs"] if (r["subject"], r["seed"]) != (subject, seed)]
            report["runs"].append({"subject": subject, "seed": seed, "command": " ".join(sys.argv), "methods": runs,
                                   "bands": bands,
                                   "geometry": geometry(tokens, runs), "eval_seconds": time.time() - t0})
            out.write_text(json.dumps(report, indent=1))
            whole = bands["0-1000"]
            print(f"{subject} seed {seed}: loss minus TI's (t in [0, 1000), {args.draws} draws)")
            for k, v in whole.items():
                print(f"  {k:40s} {v['minus_ti']:+.5f} ± {v['se']:.5f}")


if __name__ == "__main__":
    main()
