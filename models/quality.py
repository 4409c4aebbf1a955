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
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from zo_edge.models import world
from zo_runtime.outputs import write_json
from zo_runtime.recipe import sg_tau_for

# A method is a recipe, a registered variant, or either with overrides: "zo-edge+lr=0.01+n=4".
METHODS = {
    "zoodip": dict(recipe="zoodip"),
    "zo-edge": dict(recipe="zo-edge"),
    # the paper's Table 3 ablations
    "zo-nosg": dict(recipe="zoodip", sg=False),
    "zo-noputs": dict(recipe="zoodip", puts=False),
    "zo-naive": dict(recipe="zoodip", sg=False, puts=False),
    # SG with the history scaled to the token width: SD keeps tau = 128 of d = 768; the shapes model has d = 64.
    "zo-tau11": dict(recipe="zoodip", tau=sg_tau_for(64)),
    "ti": None,  # PyTorch backprop textual inversion on the FP32 source (one forward + backward a step)
}
TOKEN = "<subject>"
EVAL_PROMPTS = tuple(f"a photo of a {{}} on a {bg} background" for bg in world.BACKGROUNDS)
GENERIC_INIT = "shape"
INIT_PROTOCOLS = ("class", "generic")  # the subject's class noun (the paper's protocol), or one word for all


ARM = "@"  # 'zo-edge@openvino': the method's runs trained on another provider (benchmarks/lab_screen.py)


def parse_method(spec: str, allow_arm: bool = True) -> dict | None:
    """'zo-edge+lr=0.01+antithetic=true' -> PersonalizeConfig recipe fields; None for 'ti'. In a
    report, 'METHOD@PROVIDER' names METHOD's runs trained on PROVIDER (``allow_arm``)."""
    from zo_runtime.errors import UserError
    from zo_runtime.recipe import ZOODIP

    spec, _, arm = spec.partition(ARM)
    if arm and not allow_arm:
        raise UserError(f"method {spec + ARM + arm!r}: choose the provider with --provider, not in the method name")
    base, *overrides = spec.split("+")
    if base not in METHODS:
        raise UserError(f"unknown method {base!r}; choose from {', '.join(METHODS)} (optionally with +key=value)")
    if METHODS[base] is None:
        if overrides:
            raise UserError(f"method {spec!r}: 'ti' takes no overrides")
        return None
    fields = dict(METHODS[base])
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or key not in ZOODIP:
            raise UserError(f"method {spec!r}: {item!r} is not key=value with key one of {', '.join(ZOODIP)}")
        try:
            fields[key] = override_value(key, text)
        except ValueError:
            raise UserError(f"method {spec!r}: {key} needs a {type(ZOODIP[key]).__name__}, got {text!r}") from None
    return fields


def override_value(key: str, text: str):
    """The value of a method name's ``+key=text`` override, typed as the recipe field (ValueError if not)."""
    from zo_runtime.recipe import ZOODIP

    kind = type(ZOODIP[key])
    if kind is bool:
        if text.lower() not in ("true", "false", "on", "off", "1", "0"):
            raise ValueError(text)
        return text.lower() in ("true", "on", "1")
    return kind(text)


def _resolved(fields: dict):
    from zo_runtime.personalize import PersonalizeConfig

    cfg = PersonalizeConfig(model="", images="", token=TOKEN, init="", out="", **fields)
    cfg.validate()
    return cfg.resolved()


def init_word(subject: world.Subject, protocol: str) -> str:
    return subject.shape if protocol == "class" else GENERIC_INIT


def _write_refs(subject: world.Subject, folder: Path, n: int, seed: int, size: int) -> np.ndarray:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    refs = world.reference_images(subject, n=n, seed=seed, size=size)
    for i, im in enumerate(refs):
        Image.fromarray(im).save(folder / f"ref_{i}.png")
    return np.stack(refs)


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


def _snapshot_steps(budgets: list[int], per_step: int, points: int, setup: int = 0) -> tuple[int, list[int]]:
    """Steps to train and the steps to score: every budget, plus ``points`` even points on the curve.
    ``setup``: passes a method spends before its first step (counted in every budget)."""
    steps = (max(budgets) - setup) // per_step
    marks = {(b - setup) // per_step for b in budgets} | {max(1, round(steps * j / points)) for j in range(1, points + 1)}
    return steps, sorted(m for m in marks if m >= 1)


def run_job(job: dict) -> dict:
    """One method on one subject, seed and init word, in a fresh process: references (following the
    seed), training with snapshots, then each snapshot's token scored by the probe."""
    from zo_edge.models.probe import Probe
    from zo_runtime.bundle import Bundle
    from zo_runtime.pipeline import Pipeline

    from zo_runtime.sysinfo import peak_rss_mb

    subject, seed, work = world.Subject.parse(job["subject"]), job["seed"], Path(job["work"])
    init = init_word(subject, job["init"])
    bundle = Bundle.load(job["bundle"], threads=job["threads"])
    refs_dir = work / "refs"
    refs = _write_refs(subject, refs_dir, job["n_refs"], seed, bundle.resolution)
    snaps: dict[int, np.ndarray] = {}
    marks = set(job["marks"])

    def keep(step, theta):
        if step in marks:
            snaps[step] = np.array(theta, np.float32)

    t0 = time.time()
    if job["fields"] is None:
        from zo_edge.eval.textual_inversion import textual_inversion
        from zo_runtime.data import list_images, load_image

        images = np.stack([load_image(f, bundle.resolution) for f in list_images(str(refs_dir))])
        res = textual_inversion(job["source"], images, TOKEN, init, job["steps"], lr=job["ti_lr"], seed=seed,
                                threads=job["threads"], snapshot=keep)
        passes = res["forward_backward_passes"]
    else:
        from zo_runtime.personalize import PersonalizeConfig, Trainer

        # training may run on another bundle and provider (e.g. a --target qnn bundle on the HTP); the token
        # is scored on ``bundle`` (the same model's CPU bundle) either way
        cfg = PersonalizeConfig(model=job.get("train_bundle") or job["bundle"], images=str(refs_dir), token=TOKEN,
                                init=init, provider=job.get("provider", "cpu"),
                                out=str(work / "token.safetensors"), run_dir=str(work / "run"), steps=job["steps"],
                                seed=seed, threads=job["threads"], checkpoint_every=job["steps"], overwrite=True,
                                **job["fields"])
        passes = Trainer(cfg).train(callback=keep).forward_passes
    seconds = time.time() - t0
    peak = peak_rss_mb()
    probe, pipe = Probe.load(), Pipeline(bundle)
    ref_feat = probe.predict(refs)["features"]
    curve = []
    for step in sorted(snaps):
        imgs, bgs = generate_for_token(pipe, snaps[step], job["k"], job["gen_steps"], job["guidance"], seed)
        sc = score(probe, imgs, subject, bgs, ref_feat)
        sc.update(step=step, unet_passes=job.get("setup_passes", 0) + step * job["per_step"])
        curve.append(sc)
    return {key: job[key] for key in ("method", "subject", "seed", "init", "per_step", "setup_passes")} | {
        "init_word": init, "steps": job["steps"], "unet_passes": passes, "seconds": seconds, "peak_rss_mb": peak,
        "curve": curve}


def spent(run: dict) -> int:
    """UNet passes a run spent (its setup, e.g. a Jacobian sketch, and its steps); TI: its steps."""
    return run.get("setup_passes", 0) + run["steps"] * run["per_step"]


def reached(run: dict, budget: int) -> bool:
    """Whether a run went as far as a budget of passes allows: no further whole step fits in it (a
    method with setup passes ends up to a step short of a round budget)."""
    return spent(run) > budget - run["per_step"]


def ends_at(run: dict, budget: int) -> bool:
    """Whether the run was planned for this budget (its last step is the last that fits)."""
    return budget - run["per_step"] < spent(run) <= budget


def plan_jobs(methods: list[str], subjects: list[world.Subject], seeds: list[int], inits: list[str],
              budgets: list[int], ti_steps: int, points: int, size: int = 768) -> list[dict]:
    """Every (method, subject, seed, init) run, with its steps and the steps to score. Methods whose
    learning rate follows a schedule of the run's length get one run per budget (a shorter budget is a
    different run); constant-rate methods score every budget on one run. ``size``: the token's width
    (the model's), for methods that spend passes on it before their first step (a Jacobian sketch)."""
    plans = []
    for spec in methods:
        fields = parse_method(spec, allow_arm=False)
        setup = 0
        if fields is None:
            per_step, runs = 1, [(ti_steps, [max(1, round(ti_steps * j / points)) for j in range(1, points + 1)])]
        else:
            from zo_runtime.personalize import make_estimator, setup_passes

            cfg = _resolved(fields)
            per_step, setup = make_estimator(cfg).passes, setup_passes(cfg, size)
            if min(budgets) < setup + per_step:
                from zo_runtime.errors import UserError
                raise UserError(f"a budget of {min(budgets)} UNet passes is less than one step of {spec} "
                                f"({setup} passes first and {per_step} a step)" if setup else
                                f"a budget of {min(budgets)} UNet passes is less than one step of {spec} ({per_step})")
            if cfg.schedule == "constant":
                runs = [_snapshot_steps(budgets, per_step, points, setup)]
            else:
                runs = [_snapshot_steps([b], per_step, points if b == max(budgets) else 1, setup) for b in budgets]
        plans.append((spec, fields, per_step, setup, runs))
    jobs = []
    # seed-major, then subject, then method: a benchmark stopped early still compares every method
    # on the same subjects and seeds
    for seed in seeds:
        for subject in subjects:
            for spec, fields, per_step, setup, runs in plans:
                for init in inits:
                    for steps, marks in runs:
                        jobs.append(dict(method=spec, fields=fields, subject=str(subject), seed=seed, init=init,
                                         steps=steps, marks=marks, per_step=per_step, setup_passes=setup))
    return jobs


def quality_benchmark(bundle: str, source: str | None, subjects: list[world.Subject], methods: list[str],
                      budgets: list[int], out: str, seeds: int = 3, inits: tuple[str, ...] = INIT_PROTOCOLS,
                      ti_steps: int = 1000, ti_lr: float = 5e-3, k: int = 4, n_refs: int = 5, points: int = 4,
                      gen_steps: int = 25, guidance: float = 7.5, threads: int = 1, workers: int = 1,
                      ray: str | None = None, log=print, train_bundle: str | None = None,
                      provider: str = "cpu", first_seed: int = 0) -> dict:
    """Every method × subject × seed (``first_seed`` .. ``first_seed + seeds - 1``) × init word, each run
    in its own process on personalize-many's runner (``workers`` at once, give each ``threads`` = cores /
    workers; or Ray tasks on the cluster at ``ray``). A run that fails is listed under ``failed`` and the
    others go on. Writes the report to ``out`` atomically after every run."""
    from zo_edge.runner import LocalBackend, RayBackend, run_tasks

    from zo_runtime.manifest import read_bundle_manifest

    size = int(read_bundle_manifest(train_bundle or bundle)["embedding_dim"])   # the token's size (one vector)
    jobs = plan_jobs(methods, subjects, list(range(first_seed, first_seed + seeds)), list(inits), budgets, ti_steps,
                     points, size)
    work = Path(tempfile.mkdtemp(prefix="zo-quality-"))
    common = dict(bundle=bundle, source=source, ti_lr=ti_lr, k=k, n_refs=n_refs, gen_steps=gen_steps,
                  guidance=guidance, threads=threads, train_bundle=train_bundle, provider=provider)
    for i, job in enumerate(jobs):
        job.update(common, work=str(work / f"job{i:04d}"))
    runs: list[dict | None] = [None] * len(jobs)
    settings = {"bundle": bundle, "source": source, "budgets": budgets, "seeds": seeds, "first_seed": first_seed,
                "inits": list(inits),
                "generic_init": GENERIC_INIT, "ti_steps": ti_steps, "k": k, "n_refs": n_refs,
                "prompts": list(EVAL_PROMPTS), "gen_steps": gen_steps, "guidance": guidance, "workers": workers,
                "threads": threads, "subjects": [str(s) for s in subjects], "methods": methods,
                "train_bundle": train_bundle, "provider": provider,
                "recipes": recipe_definitions(), "machine": machine_info()}
    t0 = time.time()

    failed: list[dict] = []

    def write(final: bool) -> dict:
        done = [r for r in runs if r is not None]
        report = dict(settings, runs=done, failed=failed, complete=final, wall_seconds=time.time() - t0)
        report["summary"] = summarize(report)
        write_json(out, report, what="report")
        return report

    def on_done(i: int, r: dict, queued: int) -> bool:
        ended = sum(x is not None for x in runs) + len(failed) + 1
        eta = (time.time() - t0) / ended * (len(jobs) - ended)
        job = jobs[i]
        head = f"[{ended}/{len(jobs)}] {job['method']} {job['subject']} seed {job['seed']} init {job['init']}"
        if r.get("status") == "failed":  # it raised, or its process died
            failed.append({key: jobs[i][key] for key in ("method", "subject", "seed", "init")} | {"error": r["error"]})
            log(f"{head}: FAILED: {r['error']} (ETA {eta / 60:.0f} min)")
        else:
            runs[i] = r
            log(f"{head}: subject fidelity {r['curve'][-1]['subject_fidelity']:.2f} at {r['curve'][-1]['unet_passes']} "
                f"passes, {r['seconds']:.0f} s, peak {r['peak_rss_mb']:.0f} MB (ETA {eta / 60:.0f} min)")
        write(final=False)  # an interrupted benchmark keeps what it measured
        return False

    backend = RayBackend(ray, fn=run_job) if ray else LocalBackend(workers=workers, fn=run_job)
    try:
        run_tasks(backend, range(len(jobs)), lambda i: (jobs[i], max(threads, 1), 0.0, f"quality-{i}"), on_done)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # references and runs, also when a run fails
    return write(final=True)


def _protocol(report: dict, key: str):
    """One protocol setting of a report. ``model``: the bundle, with a shipped model named by its
    folder (``.../models/shapes/bundle`` -> ``shapes``) so runs of one shipped model made from two
    checkouts merge."""
    if key != "model":
        return report.get(key)
    parts = Path(report["bundle"]).parts
    return parts[-2] if parts[-3:-2] == ("models",) and parts[-1] == "bundle" else report["bundle"]


def merge_reports(reports: list[dict], keep: list[str] | None = None) -> dict:
    """Several ``quality_benchmark`` reports of the same protocol (bundle, budgets, k, prompts) as one:
    runs concatenated, methods in order (only those in ``keep``, if given); refuses reports whose
    protocols differ."""
    if keep is not None:
        missing = [m for m in keep if not any(m in r["methods"] for r in reports)]
        if missing:
            from zo_runtime.errors import UserError
            raise UserError(f"no report has the method(s) {', '.join(missing)}")
        reports = [dict(r, methods=[m for m in r["methods"] if m in keep],
                        runs=[run for run in r["runs"] if run["method"] in keep]) for r in reports]
    keys = ("model", "k", "n_refs", "prompts", "gen_steps", "guidance")
    first = reports[0]
    for r in reports[1:]:
        diff = [k for k in keys if _protocol(r, k) != _protocol(first, k)]
        if diff:
            from zo_runtime.errors import UserError
            raise UserError(f"reports differ in {', '.join(diff)}; only runs of one protocol can be merged")
    recorded = [complete_definitions(r["recipes"]) for r in reports if "recipes" in r]
    if any(x != recorded[0] for x in recorded):
        from zo_runtime.errors import UserError
        raise UserError("reports were made with different recipe definitions; rename their runs to today's "
                        "first (benchmarks/relabel_recipe.py)")
    merged = dict(first)
    if recorded:
        merged["recipes"] = recorded[0]
    merged["methods"] = list(dict.fromkeys(m for r in reports for m in r["methods"]))
    merged["budgets"] = sorted(set(b for r in reports for b in r["budgets"]))
    merged["inits"] = list(dict.fromkeys(i for r in reports for i in r["inits"]))
    merged["runs"] = [run for r in reports for run in r["runs"]]
    seeds = sorted({run["seed"] for run in merged["runs"]}) or [0]
    merged["seeds"] = max(max(r["seeds"] for r in reports), len(seeds))
    merged["first_seed"] = seeds[0]
    merged["complete"] = all(r.get("complete", True) for r in reports)
    merged["merged_from"] = [{"machine": r.get("machine"), "methods": r["methods"], "workers": r.get("workers"),
                              "wall_seconds": r.get("wall_seconds"), "complete": r.get("complete", True)}
                             for r in reports]
    relabelled = list({json.dumps(r, sort_keys=True): r for report in reports
                       for r in report.get("relabelled", [])}.values())
    if relabelled:
        merged["relabelled"] = relabelled
    merged["summary"] = summarize(merged)
    return merged


def machine_info() -> dict:
    import platform

    from zo_runtime.sysinfo import source_commit

    commit = source_commit()
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "commit": commit}


def recipe_definitions() -> dict:
    """The recipes' fields as this code defines them: what a method name in this report means
    (benchmarks/relabel_recipe.py renames runs when a definition changes later)."""
    from zo_runtime.recipe import RECIPES

    return {name: dict(fields) for name, fields in RECIPES.items()}


def complete_definitions(recipes: dict) -> dict:
    """Recorded recipe definitions with the fields added since filled in at the values that reproduce
    runs made before them (zo_runtime.recipe.ADDED_FIELDS): a field added later changes no name."""
    from zo_runtime.recipe import ADDED_FIELDS

    return {name: {**ADDED_FIELDS, **fields} for name, fields in recipes.items()}


def bootstrap_ci(values, n_boot: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the mean (runs resampled with replacement)."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return float(v.mean()), float(v.mean())
    means = v[np.random.default_rng(seed).integers(0, len(v), (n_boot, len(v)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _at(run: dict, passes: int) -> dict | None:
    """The run's score at a budget of ``passes`` UNet passes (the last snapshot within it)."""
    within = [c for c in run["curve"] if c["unet_passes"] <= passes]
    return within[-1] if within else None


def summarize(report: dict) -> list[dict]:
    """One row per (method, init protocol, subject set, budget): mean and 95 % interval over runs."""
    rows = []
    held = {str(world.Subject(s, c, p)) for s, c, p in world.HELD_OUT[:6]}
    runs = report["runs"]
    sets = {"all": lambda s: True, "tuning (first 6)": lambda s: s in held, "untuned (last 2)": lambda s: s not in held}
    for method in report["methods"]:
        is_ti = parse_method(method) is None
        budgets = [report["ti_steps"]] if is_ti else report["budgets"]
        for init in report["inits"]:
            for set_name, member in sets.items():
                for budget in budgets:
                    picked = [r for r in runs if r["method"] == method and r["init"] == init and member(r["subject"])
                              and (is_ti or reached(r, budget))]  # a run that reached the budget
                    # one score per (subject, seed): a budget's own run if it has one, else the snapshot
                    scores = {}
                    for r in picked:
                        sc = r["curve"][-1] if is_ti else _at(r, budget)
                        key = (r["subject"], r["seed"])
                        if sc is not None and (key not in scores or ends_at(r, budget)):
                            scores[key] = (sc, r)
                    if not scores:
                        continue
                    vals = [sc["subject_fidelity"] for sc, _ in scores.values()]
                    lo, hi = bootstrap_ci(vals)
                    rows.append({"method": method, "init": init, "subjects": set_name, "unet_passes": budget,
                                 "runs": len(vals), "subject_fidelity": float(np.mean(vals)), "ci95": [lo, hi],
                                 **{key: float(np.mean([sc[key] for sc, _ in scores.values()]))
                                    for key in ("shape_acc", "colour_acc", "pattern_acc", "feature_similarity",
                                                "prompt_fidelity")},
                                 "seconds": float(np.mean([r["seconds"] for _, r in scores.values()])),
                                 "peak_rss_mb": float(np.mean([r["peak_rss_mb"] for _, r in scores.values()]))})
    return rows


def paired(report: dict, reference: str, budget: int | None = None, init: str = "class") -> list[dict]:
    """Each method minus ``reference`` on the same (subject, seed) runs at one budget: the mean paired
    difference in subject fidelity and its 95 % bootstrap interval. Subjects differ far more than
    methods do (tens of points), so pairing is what separates methods that differ by less."""
    budget = budget or min(report["budgets"])
    ti_steps = report.get("ti_steps")

    def scores(method):
        out = {}
        for r in report["runs"]:
            if r["method"] == method and r["init"] == init:
                if parse_method(method) is not None and not reached(r, budget):
                    continue  # this run stopped short of the budget
                sc = r["curve"][-1] if parse_method(method) is None else _at(r, budget)
                if sc is not None:
                    out[(r["subject"], r["seed"])] = sc["subject_fidelity"]
        return out

    ref = scores(reference)
    rows = []
    for method in report["methods"]:
        if method == reference:
            continue
        mine = scores(method)
        keys = sorted(set(ref) & set(mine))
        if not keys:
            continue
        diffs = [mine[k] - ref[k] for k in keys]
        lo, hi = bootstrap_ci(diffs)
        rows.append({"method": method, "reference": reference, "init": init,
                     "unet_passes": ti_steps if parse_method(method) is None else budget, "pairs": len(keys),
                     "difference": float(np.mean(diffs)), "ci95": [lo, hi],
                     "wins": int(sum(d > 0 for d in diffs)), "losses": int(sum(d < 0 for d in diffs))})
    return rows


def format_paired(rows: list[dict]) -> str:
    lines = ["| method | minus | pairs (subject, seed) | difference in subject fidelity (95 % CI) | better / worse |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['reference']} | {r['pairs']} | {100 * r['difference']:+.1f} "
                     f"[{100 * r['ci95'][0]:+.1f}, {100 * r['ci95'][1]:+.1f}] | {r['wins']} / {r['losses']} |")
    return "\n".join(lines)


def format_table(summary: list[dict], subjects: str = "all") -> str:
    lines = ["| method | init | UNet passes | subject fidelity (95 % CI) | shape | colour | pattern | feature sim. "
             "| prompt fidelity | runs | wall s | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        if r["subjects"] != subjects:
            continue
        passes = f"{r['unet_passes']:,} fwd+bwd" if parse_method(r["method"]) is None else f"{r['unet_passes']:,}"
        lines.append(f"| {r['method']} | {r['init']} | {passes} | {100 * r['subject_fidelity']:.1f} "
                     f"[{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}] | {100 * r['shape_acc']:.1f} | "
                     f"{100 * r['colour_acc']:.1f} | {100 * r['pattern_acc']:.1f} | {r['feature_similarity']:.3f} | "
                     f"{100 * r['prompt_fidelity']:.1f} | {r['runs']} | {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Mean subject fidelity against UNet passes, per method and init protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in report["methods"]:
        for init, style in zip(report["inits"], ("-", "--")):
            runs = [r for r in report["runs"] if r["method"] == method and r["init"] == init]
            longest = max((spent(r) for r in runs), default=0)
            runs = [r for r in runs if spent(r) == longest]
            if not runs:
                continue
            xs = [c["unet_passes"] for c in runs[0]["curve"]]
            ys = [np.mean([r["curve"][i]["subject_fidelity"] for r in runs]) for i in range(len(xs))]
            ax.plot(xs, ys, style, marker="o", label=f"{method} ({init} init)")
    ax.set_xlabel("UNet passes (ZO: forward; TI: forward+backward)")
    ax.set_ylabel("subject fidelity")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
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
