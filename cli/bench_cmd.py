"""``zo-edge bench``: quality benchmarks on the embedded shapes model (and DreamBooth, with real weights)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from zo_edge.models import SHAPES_SOURCE, resolve_model, world
from zo_runtime.errors import UserError
from zo_runtime.outputs import write_json

ALL_SUBJECTS = ",".join(f"{c}:{p}:{s}" for s, c, p in world.HELD_OUT)


@click.group()
def bench():
    """Benchmarks that print figures (never part of the tests)."""


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x.replace("_", "")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag} needs positive integers, got {text!r}")
    return sorted(set(values))


@bench.command("quality")
@click.option("--model", default="shapes", show_default=True, help="Bundle the ZO methods train on (int8w).")
@click.option("--source", type=click.Path(),
              help="Diffusers folder for the 'ti' baseline [the shipped source for --model shapes].")
@click.option("--subjects", default=ALL_SUBJECTS, show_default=True, help="Comma-separated colour:pattern:shape subjects.")
@click.option("--methods", default="zo-edge,zoodip", show_default=True,
              help="Recipes or variants (zoodip, zo-edge, zo-nosg, zo-noputs, zo-naive, zo-tau11, ti), each "
                   "optionally with +key=value overrides of recipe fields, e.g. zo-edge+lr=0.01+n=4.")
@click.option("--passes", default="3000,9000", show_default=True, help="UNet-pass budgets to compare methods at.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Seeds per subject (from --first-seed on): references, noise and directions all follow the seed.")
@click.option("--first-seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="The first seed: more seeds for stored runs without repeating them (--first-seed 3 --seeds 3).")
@click.option("--init", "inits", type=click.Choice(["class", "generic", "both"]), default="both", show_default=True,
              help="Init word: the subject's class noun (the paper's protocol), 'shape' for all, or both.")
@click.option("--ti-steps", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--k", type=click.IntRange(min=1), default=4, show_default=True, help="Images per prompt.")
@click.option("--points", type=click.IntRange(min=1), default=4, show_default=True, help="Curve points per run.")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True, help="Threads per process.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs at once, each in its own process; pair with --threads = cores / workers.")
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="Run on a Ray cluster (auto, HOST:PORT) instead: one node, or TMPDIR on a shared filesystem.")
@click.option("--out", type=click.Path(), default="quality.json", show_default=True)
@click.option("--plot", "plot_path", type=click.Path(), default=None, help="PNG: subject fidelity vs UNet passes.")
@click.option("--train-model", default=None,
              help="Train the ZO methods on this bundle instead (e.g. the model converted with --target qnn); "
                   "tokens are still scored by generating on --model.")
@click.option("--provider", default="cpu", show_default=True, help="Execution provider the ZO methods train on.")
def quality(model, source, subjects, methods, passes, seeds, first_seed, inits, ti_steps, k, points, threads, workers, ray_address,
            out, plot_path, train_model, provider):
    """Personalization quality on held-out shapes subjects at equal UNet-pass budgets, over seeds."""
    from zo_edge.models import quality as q

    try:
        subs = [world.Subject.parse(s.strip()) for s in subjects.split(",") if s.strip()]
    except ValueError as e:
        raise UserError(str(e)) from None
    meths = [m.strip() for m in methods.split(",") if m.strip()]
    for m in meths:
        q.parse_method(m)
    source = source or (str(SHAPES_SOURCE) if model == "shapes" else None)
    if "ti" in meths and not source:
        raise UserError("method 'ti' needs --source, the FP32 diffusers folder of the model" + (
            " (for shapes-768: python -m zo_edge.models.train_shapes768 --out DIR)" if model == "shapes-768" else ""))
    budgets = _int_list(passes, "--passes")
    if provider != "cpu" or train_model:  # a provider or bundle that cannot train: one line now, not per run
        from zo_runtime.bundle import Bundle
        Bundle.load(resolve_model(train_model or model), provider=provider, verify=False)
    report = q.quality_benchmark(resolve_model(model), source, subs, meths, budgets, out, seeds=seeds,
                                 first_seed=first_seed,
                                 inits=q.INIT_PROTOCOLS if inits == "both" else (inits,), ti_steps=ti_steps, k=k,
                                 points=points, threads=threads, workers=workers, ray=ray_address,
                                 log=lambda m: click.echo(m, err=True),
                                 train_bundle=resolve_model(train_model) if train_model else None, provider=provider)
    click.echo(q.format_table(report["summary"]))
    if plot_path:
        q.plot(report, plot_path)
        click.echo(f"plot: {plot_path}")
    if report["failed"]:
        click.echo(f"zo-edge: {len(report['failed'])} of {len(report['failed']) + len(report['runs'])} runs failed; "
                   f"errors in {out}", err=True)
        sys.exit(1)


@bench.command("merge")
@click.argument("reports", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(), required=True)
@click.option("--plot", "plot_path", type=click.Path(), default=None, help="PNG: subject fidelity vs UNet passes.")
@click.option("--methods", default=None, help="Keep only these methods' runs (comma-separated names as in the reports).")
def merge(reports, out, plot_path, methods):
    """Merge `bench quality` reports of one protocol (e.g. methods run separately) into one."""
    from zo_edge.models import quality as q

    try:
        loaded = [json.loads(Path(p).read_text()) for p in reports]
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read a report: {e}") from None
    merged = q.merge_reports(loaded, keep=methods.split(",") if methods else None)
    write_json(out, merged, what="report")
    click.echo(q.format_table(merged["summary"]))
    if plot_path:
        q.plot(merged, plot_path)
        click.echo(f"plot: {plot_path}")


@bench.command("prompts")
@click.option("--model", default="shapes", show_default=True)
@click.option("--n", type=int, default=96, show_default=True, help="Captions per set.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=int, default=25, show_default=True)
@click.option("--guidance", type=float, default=7.5, show_default=True)
@click.option("--out", type=click.Path(), default=None)
def prompts(model, n, seed, steps, guidance, out):
    """Does the base model draw what a caption names? Probe accuracy per attribute."""
    from zo_edge.models.quality import prompt_following

    rows = {}
    for name, held_out in (("held-in combinations", False), ("held-out combinations", True)):
        rows[name] = prompt_following(resolve_model(model), n=n, seed=seed, steps=steps, guidance=guidance,
                                      held_out=held_out)
    click.echo("| captions | shape | colour | pattern | background | all four | images |")
    click.echo("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        click.echo(f"| {name} | " + " | ".join(f"{100 * r[a]:.1f}" for a in
                                               ("shape", "colour", "pattern", "background", "all_four"))
                   + f" | {r['images']} |")
    if out:
        Path(out).write_text(json.dumps(rows, indent=2))


@bench.command("dreambooth")
@click.option("--model", required=True, help="Bundle to personalize and generate with.")
@click.option("--metrics", "metrics_dir", required=True, type=click.Path(), help="Bundle from `zo-edge convert-metrics`.")
@click.option("--dataset", required=True, type=click.Path(), help="DreamBooth dataset folder (one folder per subject).")
@click.option("--subjects", default=None, help="Comma-separated subject folder names (default: all).")
@click.option("--class", "classes", multiple=True, help="name=class[:live|object] for subjects missing from the lists.")
@click.option("--steps", type=int, default=1000, show_default=True)
@click.option("--images-per-prompt", type=int, default=5, show_default=True)
@click.option("--gen-steps", type=int, default=30, show_default=True)
@click.option("--guidance", type=float, default=7.5, show_default=True)
@click.option("--resolution", type=int, default=None, help="Personalize at this size (e.g. 256 on a laptop).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sg/--no-sg", default=True, show_default=True)
@click.option("--puts/--no-puts", default=True, show_default=True)
@click.option("--provider", default="cpu", show_default=True)
@click.option("--out", "out_dir", type=click.Path(), default="dreambooth-run", show_default=True)
@click.option("--keep-going", is_flag=True, help="Log a failing subject and go on.")
def dreambooth(model, metrics_dir, dataset, subjects, classes, steps, images_per_prompt, gen_steps, guidance,
               resolution, seed, sg, puts, provider, out_dir, keep_going):
    """The paper's DreamBooth protocol: personalize -> generate -> evaluate per subject, resumable."""
    import functools

    from zo_edge.eval import dreambooth as db
    from zo_edge.eval import metrics
    from zo_runtime.bundle import Bundle
    from zo_runtime.personalize import PersonalizeConfig, Trainer
    from zo_runtime.pipeline import Pipeline, save_png

    bundle = Bundle.load(resolve_model(model), provider=provider)
    mb = metrics.MetricsBundle.load(metrics_dir, provider=provider)

    def personalize_fn(subject, placeholder, work):
        init = subject.class_word if " " not in subject.class_word else subject.class_word.split()[-1]
        cfg = PersonalizeConfig(model=str(bundle.root), images=str(subject.folder), token=placeholder, init=init,
                                out=str(work / "learned_embeds.safetensors"), run_dir=str(work / "run"), steps=steps,
                                resolution=resolution, seed=seed, sg=sg, puts=puts, provider=provider, overwrite=True)
        return {placeholder: Trainer(cfg).train().theta}

    def generate_fn(subject, learned, prompts, k, gen_dir):
        pipe = Pipeline(bundle, embeddings=learned)
        for i, prompt in enumerate(prompts):
            images = pipe(prompt, num_images=k, steps=gen_steps, guidance=guidance, seed=seed + i, progress=False)
            for j, im in enumerate(images):
                save_png(gen_dir / f"{i:03d}_{j}.png", im, {"prompt": prompt, "seed": seed + i, "index": j})

    summary = db.run_dreambooth([s.strip() for s in subjects.split(",")] if subjects else None, dataset, out_dir,
                                personalize_fn, generate_fn, functools.partial(metrics.evaluate, mb),
                                images_per_prompt=images_per_prompt, method=f"zo-edge{'' if sg else '-nosg'}"
                                f"{'' if puts else '-noputs'}", classes=db.parse_class_mapping(classes) or None,
                                keep_going=keep_going, log=lambda m: click.echo(m, err=True))
    click.echo(db.format_table(summary))


COMMANDS = [bench]
