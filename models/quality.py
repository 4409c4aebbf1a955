"""Personalization quality on the shapes world, measured with the probe (CLIP/DINO's role).

``prompt_following``: does the base model draw what a caption names? (held-in and held-out
combinations asked for in words).

``quality_benchmark``: for each held-out subject, five reference renders on varied backgrounds;
each method learns a token; the token generates K images per prompt placing the subject on a
named background; the probe scores
  - subject fidelity: share of images whose shape, colour and pattern all match (CLIP-I's role),
  - feature similarity: mean cosine of probe features, generated vs references (DINO's role),
  - prompt fidelity: share of images whose background matches the prompt (CLIP-T's role),
  - cost: UNet forward passes, wall time, peak RSS (each run in its own process).
Methods: zo (SG + PUTS), zo-nosg, zo-noputs, zo-naive (the paper's Table 3 ablations) on the INT8
bundle, zo-tau11 (SG with its history scaled to this model's width; not in the paper), and ti:
backprop textual inversion in PyTorch on the FP32 source model.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from zo_edge.models import world
from zo_runtime.personalize import sg_tau_for

METHODS = {
    "zo": dict(sg=True, puts=True),
    "zo-nosg": dict(sg=False, puts=True),
    "zo-noputs": dict(sg=True, puts=False),
    "zo-naive": dict(sg=False, puts=False),
    # SG with the history scaled to the token width: SD keeps tau = 128 of d = 768; the shapes model has d = 64.
    "zo-tau11": dict(sg=True, puts=True, tau=sg_tau_for(64)),
    "ti": None,
}
TOKEN = "<subject>"
EVAL_PROMPTS = tuple(f"a photo of a {{}} on a {bg} background" for bg in world.BACKGROUNDS)


def _write_refs(subject: world.Subject, folder: Path, n: int, seed: int, size: int) -> np.ndarray:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    refs = world.reference_images(subject, n=n, seed=seed, size=size)
    for i, im in enumerate(refs):
        Image.fromarray(im).save(folder / f"ref_{i}.png")
    return np.stack(refs)


def _train_one(args: dict) -> dict:
    """Runs in a fresh process: one method on one subject. Returns snapshots of θ and costs."""
    method, snap_every = args["method"], args["snapshot_every"]
    snaps: dict[int, list] = {}
    t0 = time.time()
    if method == "ti":
        from zo_edge.convert.textual_inversion import textual_inversion
        from zo_runtime.data import list_images, load_image

        images = np.stack([load_image(f, args["resolution"]) for f in list_images(args["refs"])])
        res = textual_inversion(args["source"], images, TOKEN, args["init"], args["steps"], lr=args["lr"],
                                seed=args["seed"], threads=args["threads"],
                                snapshot=lambda s, th: snaps.__setitem__(s, th.tolist()) if s % snap_every == 0 else None)
        passes_per_step = 1
        forward = res["forward_backward_passes"]
    else:
        from zo_runtime.personalize import PersonalizeConfig, Trainer

        cfg = PersonalizeConfig(model=args["bundle"], images=args["refs"], token=TOKEN, init=args["init"],
                                out=str(Path(args["work"]) / f"{method}.safetensors"), run_dir=str(Path(args["work"]) / method),
                                steps=args["steps"], lr=args["lr"], seed=args["seed"], threads=args["threads"],
                                checkpoint_every=max(args["steps"], 1), overwrite=True, **METHODS[method])
        trainer = Trainer(cfg)
        result = trainer.train(callback=lambda s, th: snaps.__setitem__(s, th.tolist()) if s % snap_every == 0 else None)
        forward = result.forward_passes
        passes_per_step = cfg.n + 1
    return {"method": method, "snapshots": snaps, "seconds": time.time() - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "unet_passes": forward, "passes_per_step": passes_per_step}


def _in_subprocess(fn, arg):
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, (arg,))


def score(probe, images: np.ndarray, subject: world.Subject | None, backgrounds: list[str],
          ref_features: np.ndarray | None) -> dict:
    p = probe.predict(images)
    out = {"prompt_fidelity": float(np.mean([b == g for b, g in zip(p["background"], backgrounds)]))}
    if subject is not None:
        hit = [(s == subject.shape) and (c == subject.colour) and (q == subject.pattern)
               for s, c, q in zip(p["shape"], p["colour"], p["pattern"])]
        out["subject_fidelity"] = float(np.mean(hit))
        out["shape_acc"] = float(np.mean([s == subject.shape for s in p["shape"]]))
        out["colour_acc"] = float(np.mean([c == subject.colour for c in p["colour"]]))
        out["pattern_acc"] = float(np.mean([q == subject.pattern for q in p["pattern"]]))
    if ref_features is not None:
        out["feature_similarity"] = float(np.mean(p["features"] @ ref_features.T))
    return out


def generate_for_token(pipe, theta: np.ndarray, k: int, steps: int, guidance: float, seed: int):
    pipe.embeddings = {TOKEN: np.asarray(theta, np.float32).reshape(-1, pipe.bundle.embedding_dim)}
    images, bgs = [], []
    for j, template in enumerate(EVAL_PROMPTS):
        images.append(pipe(template.format(TOKEN), num_images=k, steps=steps, guidance=guidance,
                           seed=seed + j, progress=False))
        bgs += [world.BACKGROUNDS[j]] * k
    return np.concatenate(images), bgs


def _subject_report(args: dict, log=print) -> dict:
    """One subject: write its references, run every method (each in a fresh process), score the
    snapshots. Returns {method: {"final": {...}, "curve": [...]}}."""
    from zo_edge.models.probe import Probe
    from zo_runtime.bundle import Bundle
    from zo_runtime.pipeline import Pipeline

    subject, steps, seed = args["subject"], args["steps"], args["seed"]
    b = Bundle.load(args["bundle"], threads=args["threads"])
    probe, pipe = Probe.load(), Pipeline(b)
    refs_dir = Path(args["work"]) / str(subject).replace(":", "-")
    refs = _write_refs(subject, refs_dir, args["n_refs"], seed, b.resolution)
    ref_feat = probe.predict(refs)["features"]
    per = {}
    for method in args["methods"]:
        log(f"[{subject}] {method}: {steps} steps")
        r = _in_subprocess(_train_one, dict(method=method, bundle=args["bundle"], source=args["source"],
                                            refs=str(refs_dir), init=args["init"], steps=steps, lr=args["lr"],
                                            seed=seed, threads=args["threads"], work=str(refs_dir / "runs"),
                                            snapshot_every=args["snapshot_every"], resolution=b.resolution))
        curve = []
        for step in sorted(int(s) for s in r["snapshots"]):
            imgs, bgs = generate_for_token(pipe, np.array(r["snapshots"][step]), args["k"], args["gen_steps"],
                                           args["guidance"], seed)
            sc = score(probe, imgs, subject, bgs, ref_feat)
            sc.update(step=step, unet_passes=step * r["passes_per_step"])
            curve.append(sc)
        final = dict(curve[-1])
        final.update(seconds=r["seconds"], peak_rss_mb=r["peak_rss_mb"], unet_passes=r["unet_passes"])
        per[method] = {"final": final, "curve": curve}
        log(f"[{subject}] {method}: subject fidelity {final['subject_fidelity']:.2f}, feature sim "
            f"{final['feature_similarity']:.3f}, prompt fidelity {final['prompt_fidelity']:.2f}, "
            f"{r['seconds']:.0f} s, peak {r['peak_rss_mb']:.0f} MB")
    return per


def _subject_report_logged(args: dict) -> dict:  # worker processes log to stderr
    import sys
    return _subject_report(args, log=lambda m: print(m, file=sys.stderr, flush=True))


def quality_benchmark(bundle: str, source: str, subjects: list[world.Subject], methods: list[str], steps: int,
                      out: str, k: int = 4, n_refs: int = 5, seed: int = 0, init: str = "shape",
                      lr: float = 5e-3, snapshots: int = 4, gen_steps: int = 25, guidance: float = 7.5,
                      threads: int = 0, workers: int = 1, log=print) -> dict:
    """Runs every method on every subject; ``workers`` > 1 takes that many subjects at once, each
    in its own process (give each ``threads`` = cores / workers)."""
    from concurrent.futures import ProcessPoolExecutor

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        from zo_runtime.errors import UserError
        raise UserError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    work = tempfile.mkdtemp(prefix="zo-quality-")
    jobs = [dict(subject=subject, bundle=bundle, source=source, methods=methods, steps=steps, k=k, n_refs=n_refs,
                 seed=seed, init=init, lr=lr, snapshot_every=max(steps // snapshots, 1), gen_steps=gen_steps,
                 guidance=guidance, threads=threads, work=work) for subject in subjects]
    try:
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
                results = list(pool.map(_subject_report_logged, jobs))
        else:
            results = [_subject_report(job, log=log) for job in jobs]
    finally:
        shutil.rmtree(work, ignore_errors=True)  # references and runs, also when a method fails
    report = {"bundle": bundle, "source": source, "steps": steps, "k": k, "seed": seed, "init": init, "lr": lr,
              "prompts": list(EVAL_PROMPTS), "gen_steps": gen_steps, "guidance": guidance, "workers": workers,
              "threads": threads, "subjects": {str(s): per for s, per in zip(subjects, results)}}
    report["summary"] = summarize(report, methods)
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)
    return report


def summarize(report: dict, methods: list[str]) -> dict:
    keys = ("subject_fidelity", "shape_acc", "colour_acc", "pattern_acc", "feature_similarity", "prompt_fidelity",
            "seconds", "peak_rss_mb", "unet_passes")
    out = {}
    for m in methods:
        rows = [s[m]["final"] for s in report["subjects"].values() if m in s]
        out[m] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    return out


def format_table(summary: dict) -> str:
    lines = ["| method | subject fidelity | shape | colour | pattern | feature sim. | prompt fidelity | UNet passes "
             "| wall s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in summary.items():
        lines.append(f"| {m} | {100 * r['subject_fidelity']:.1f} | {100 * r['shape_acc']:.1f} | "
                     f"{100 * r['colour_acc']:.1f} | {100 * r['pattern_acc']:.1f} | {r['feature_similarity']:.3f} | "
                     f"{100 * r['prompt_fidelity']:.1f} | {r['unet_passes']:.0f} | {r['seconds']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    methods = next(iter(report["subjects"].values())).keys()
    for m in methods:
        curves = [s[m]["curve"] for s in report["subjects"].values()]
        xs = [c["unet_passes"] for c in curves[0]]
        ys = [np.mean([c[i]["subject_fidelity"] for c in curves]) for i in range(len(xs))]
        ax.plot(xs, ys, marker="o", label=m)
    ax.set_xlabel("UNet passes (ZO: forward; TI: forward+backward)")
    ax.set_ylabel("subject fidelity")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def prompt_following(bundle: str, n: int = 96, k: int = 1, seed: int = 0, steps: int = 25, guidance: float = 7.5,
                     held_out: bool = False, threads: int = 0) -> dict:
    """Share of generated images in which the probe recovers each attribute the caption names."""
    from zo_edge.models.probe import Probe
    from zo_runtime.bundle import Bundle
    from zo_runtime.pipeline import Pipeline

    pipe = Pipeline(Bundle.load(bundle, threads=threads))
    probe = Probe.load()
    rng = np.random.default_rng(seed)
    hits = {"shape": [], "colour": [], "pattern": [], "background": []}
    for i in range(n):
        if held_out:
            shape, colour, pattern = world.HELD_OUT[i % len(world.HELD_OUT)]
            subject, bg = world.Subject(shape, colour, pattern), world.BACKGROUNDS[int(rng.integers(5))]
        else:
            subject, bg = world.sample(rng)
        images = pipe(world.caption(subject, bg), num_images=k, steps=steps, guidance=guidance,
                      seed=seed * 100000 + i, progress=False)
        p = probe.predict(images)
        for j in range(k):
            hits["shape"].append(p["shape"][j] == subject.shape)
            hits["colour"].append(p["colour"][j] == subject.colour)
            hits["pattern"].append(p["pattern"][j] == subject.pattern)
            hits["background"].append(p["background"][j] == bg)
    out = {a: float(np.mean(v)) for a, v in hits.items()}
    out["all_four"] = float(np.mean([all(x) for x in zip(*hits.values())]))
    out["images"] = n * k
    return out
