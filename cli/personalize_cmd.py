"""``zo-edge personalize``: learn a textual-inversion token with forward passes only."""
from __future__ import annotations

import dataclasses

import click

from zo_edge.models import resolve_model
from zo_runtime.errors import UserError
from zo_runtime.personalize import PersonalizeConfig
from zo_runtime.recipe import DEFAULT_RANK, DEFAULT_RECIPE, DIRECTIONS, OPTIMIZERS, RECIPES, SCHEDULES


def _recipe_help(what: str, key: str) -> str:
    values = " / ".join(f"{name}: {r[key]}" for name, r in RECIPES.items())
    return f"{what} [{values}]"


# The run settings' defaults live in PersonalizeConfig; the flags show them from there.
DEFAULTS = {f.name: f.default for f in dataclasses.fields(PersonalizeConfig)}

RESUME_OVERRIDES = ("resume_dir", "out", "steps", "overwrite", "provider", "threads", "low_memory")


@click.command()
@click.option("--model", default="shapes", show_default=True, help="Bundle directory, or 'shapes' / 'shapes-768' for the embedded models.")
@click.option("--images", type=click.Path(), help="Folder of reference images (JPEG/PNG/WebP).")
@click.option("--token", help="Placeholder string for the new concept, e.g. '<my-dog>'.")
@click.option("--init", "init_word", help="A one-token word to start from, e.g. 'dog'.")
@click.option("--out", type=click.Path(), help="Output embedding (.safetensors, diffusers format).")
@click.option("--run-dir", type=click.Path(), help="Run directory for config, log and checkpoints [runs/<token>].")
@click.option("--resume", "resume_dir", type=click.Path(), help="Continue the interrupted run in this run directory.")
@click.option("--steps", type=int, default=DEFAULTS["steps"], show_default=True)
@click.option("--num-vectors", type=int, default=DEFAULTS["num_vectors"], show_default=True)
@click.option("--resolution", type=int, default=None, help="Train at this size (default: the model's).")
@click.option("--recipe", type=click.Choice(list(RECIPES)), default=DEFAULTS["recipe"], show_default=True,
              help="zoodip: the paper's algorithm exactly; zo-edge: the benchmark's choice. Flags below override it.")
@click.option("--n", "n", type=int, default=None, help=_recipe_help("RGE directions per step", "n"))
@click.option("--mu", type=float, default=None, help=_recipe_help("RGE smoothing radius", "mu"))
@click.option("--antithetic/--one-sided", default=None, help=_recipe_help("two-sided differences (2n passes a step)", "antithetic"))
@click.option("--directions", type=click.Choice(list(DIRECTIONS)), default=None, help=_recipe_help("RGE directions", "directions"))
@click.option("--rank", type=int, default=None, help=_recipe_help(f"token-pca / vocab-pca / sensitivity subspace rank / guided history (0: {DEFAULT_RANK['token-pca']} / {DEFAULT_RANK['sensitivity']} / {DEFAULT_RANK['guided']})", "rank"))
@click.option("--guided-alpha", type=float, default=None, help=_recipe_help("guided, momentum, sensitivity: isotropic share", "guided_alpha"))
@click.option("--guided-beta", type=float, default=None, help=_recipe_help("momentum: decay of the estimates' average that guides", "guided_beta"))
@click.option("--sg/--no-sg", default=None, help=_recipe_help("Subspace Gradient", "sg"))
@click.option("--tau", type=int, default=None, help=_recipe_help("SG history length / refresh period", "tau"))
@click.option("--nu", type=float, default=None, help=_recipe_help("SG variance cut 1-nu", "nu"))
@click.option("--puts/--no-puts", default=None, help=_recipe_help("PUTS timestep range (else uniform)", "puts"))
@click.option("--t-low", type=int, default=None, help=_recipe_help("PUTS T_L", "t_low"))
@click.option("--t-high", type=int, default=None, help=_recipe_help("PUTS T_U", "t_high"))
@click.option("--optimizer", type=click.Choice(list(OPTIMIZERS)), default=None, help=_recipe_help("step rule: adam (ZO-Adam), sgd, or sphere (the token turns on the sphere of its starting norm; --lr is then an angle per step)", "optimizer"))
@click.option("--lr", type=float, default=None, help=_recipe_help("learning rate", "lr"))
@click.option("--b1", type=float, default=None, help=_recipe_help("Adam first-moment decay", "b1"))
@click.option("--adam-eps", type=float, default=None, help=_recipe_help("Adam epsilon", "adam_eps"))
@click.option("--schedule", type=click.Choice(list(SCHEDULES)), default=None, help=_recipe_help("learning-rate schedule", "schedule"))
@click.option("--reference-scaling/--no-reference-scaling", default=None,
              help=_recipe_help("the reference code's 1/sqrt((d+n-1)/n) on the estimate", "reference_scaling"))
@click.option("--weight-decay", type=float, default=None,
              help=_recipe_help("pull toward the init token: lambda * (theta - theta_0) per step (0: off)", "weight_decay"))
@click.option("--average", type=float, default=None,
              help=_recipe_help("write the moving average of the iterates with this decay (0: the last iterate)", "average"))
@click.option("--normalize/--no-normalize", default=None,
              help=_recipe_help("scale each gradient estimate to the same length (FZOO)", "normalize"))
@click.option("--clip", type=float, default=None,
              help=_recipe_help("clip each estimate at this multiple of its running typical length (0: off)", "clip"))
@click.option("--pca-alpha", type=float, default=None,
              help=_recipe_help("token-/vocab-pca: share of isotropic directions beside the subspace's (Guided ES with the "
                                "basis as guide; 0: the subspace only)", "pca_alpha"))
@click.option("--subspace-steps/--no-subspace-steps", "subspace_steps", default=None,
              help=_recipe_help("token-/vocab-pca: the optimizer works in the subspace's coordinates, so the token moves only within it", "subspace_steps"))
@click.option("--sketch", type=int, default=None,
              help=_recipe_help("sensitivity: training samples whose full Jacobian (V·d + 1 UNet passes each, counted in the "
                                "run's passes) picks the subspace", "sketch"))
@click.option("--split/--no-split", default=None,
              help=_recipe_help("sensitivity: probes alternate between the leading subspace and its complement", "split"))
@click.option("--whiten-power", "whiten_power", type=float, default=None,
              help=_recipe_help("whitened: probes drawn with covariance (H + λI)^(-power) in the Gauss-Newton eigenbasis "
                                "(1: a Newton step; 0.5: Adam-like)", "whiten_power"))
@click.option("--whiten-floor", "whiten_floor", type=float, default=None,
              help=_recipe_help("whitened: λ, as a share of the Gauss-Newton matrix's mean eigenvalue", "whiten_floor"))
@click.option("--axes/--no-axes", default=None,
              help=_recipe_help("sensitivity: each probe is one of the leading directions itself (n <= rank; n = rank "
                                "probes each once a step)", "axes"))
@click.option("--eigenbasis-steps/--no-eigenbasis-steps", "eigenbasis_steps", default=None,
              help=_recipe_help("sensitivity: the step rule (Adam) runs in the Gauss-Newton eigenbasis", "eigenbasis_steps"))
@click.option("--sphere-scale", type=float, default=None,
              help=_recipe_help("--optimizer sphere: the token's fixed norm, as a multiple of the init word's", "sphere_scale"))
@click.option("--batch-candidates", type=click.Choice(["auto", "on", "off"]), default=DEFAULTS["batch_candidates"], show_default=True)
@click.option("--captions", type=click.Path(), help="Per-image captions: '<file>\\t<caption with {}>' lines.")
@click.option("--no-upscale", is_flag=True, help="Refuse images smaller than the resolution.")
@click.option("--checkpoint-every", type=int, default=DEFAULTS["checkpoint_every"], show_default=True)
@click.option("--preview-every", type=int, default=DEFAULTS["preview_every"], show_default=True, help="Write a preview image every K steps (0: off).")
@click.option("--seed", type=int, default=DEFAULTS["seed"], show_default=True)
@click.option("--provider", default=DEFAULTS["provider"], show_default=True, help="ORT execution provider: cpu, cuda, dml, coreml, openvino, qnn.")
@click.option("--threads", type=int, default=DEFAULTS["threads"], help="ORT intra-op threads (0: ORT's default).")
@click.option("--low-memory", is_flag=True, help="onnxruntime's CPU memory arena off on every session and large "
              "buffers returned to the system when freed: less peak memory, slower, the same arithmetic.")
@click.option("--max-image-pixels", type=int, default=DEFAULTS["max_image_pixels"], show_default=True,
              help="Refuse reference images with more pixels (decompression-bomb guard).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file or run directory.")
@click.pass_context
def personalize(ctx, model, images, token, init_word, out, run_dir, resume_dir, steps, num_vectors, resolution, recipe,
                batch_candidates, captions, no_upscale, checkpoint_every, preview_every, seed, provider, threads,
                low_memory, overwrite, max_image_pixels, **recipe_fields):
    """Learn a token from a few images with forward passes only (RGE + SG + PUTS + ZO-Adam and variants)."""
    from zo_runtime.personalize import PersonalizeConfig, Trainer, default_run_dir, resume

    if resume_dir:
        given = [p.name for p in ctx.command.params
                 if ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
        fixed = [name for name in given if name not in RESUME_OVERRIDES]
        if fixed:
            flag = next(p.opts[0] for p in ctx.command.params if p.name == fixed[0])
            raise UserError(f"{flag} cannot change on --resume: the run's config.json fixes it "
                            f"(--resume takes {', '.join('--' + o.replace('_', '-') for o in RESUME_OVERRIDES[1:])})")
        resume(resume_dir, steps=steps if "steps" in given else None, out=out, overwrite=overwrite,
               provider=provider if "provider" in given else None, threads=threads if "threads" in given else None,
               low_memory=True if "low_memory" in given else None)
        return
    missing = [flag for flag, v in (("--images", images), ("--token", token), ("--init", init_word),
                                    ("--out", out)) if not v]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (or use --resume RUN_DIR)")
    cfg = PersonalizeConfig(model=resolve_model(model), images=images, token=token, init=init_word, out=out,
                            run_dir=run_dir or default_run_dir(token), steps=steps, num_vectors=num_vectors,
                            resolution=resolution, recipe=recipe, batch_candidates=batch_candidates,
                            captions=captions, allow_upscale=not no_upscale, checkpoint_every=checkpoint_every,
                            preview_every=preview_every, seed=seed, provider=provider, threads=threads, low_memory=low_memory,
                            overwrite=overwrite, max_image_pixels=max_image_pixels, **recipe_fields)
    Trainer(cfg).train()


@click.command()
@click.option("--subject", default="red:striped:star", show_default=True,
              help="colour:pattern:shape; the default is a combination the shapes model never saw in training.")
@click.option("--passes", type=click.IntRange(min=1), default=3000, show_default=True,
              help="UNet forward passes to spend (steps = passes / passes per step of the recipe).")
@click.option("--recipe", type=click.Choice(list(RECIPES)), default=DEFAULT_RECIPE, show_default=True)
@click.option("--out-dir", type=click.Path(), default="zo-demo", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True)
def demo(subject, passes, recipe, out_dir, seed, overwrite):
    """Personalize a shapes subject end to end on the embedded model: references, token, samples
    (the README's results table says how often the samples are exact)."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from zo_edge.models import SHAPES_BUNDLE, world
    from zo_runtime.bundle import Bundle
    from zo_runtime.manifest import read_bundle_manifest
    from zo_runtime.personalize import PersonalizeConfig, Trainer, make_estimator, setup_passes
    from zo_runtime.pipeline import Pipeline, grid, save_png

    try:
        subj = world.Subject.parse(subject)
    except ValueError as e:
        raise UserError(str(e)) from None
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} exists and is not empty; pass --overwrite or choose --out-dir")
    token = "<my-shape>"
    cfg = PersonalizeConfig(model=str(SHAPES_BUNDLE), images=str(out / "references"), token=token, init=subj.shape,
                            out=str(out / "my-shape.safetensors"), run_dir=str(out / "run"), steps=1, seed=seed,
                            overwrite=True, recipe=recipe)
    per_step = make_estimator(cfg.resolved()).passes
    setup = setup_passes(cfg.resolved(), int(read_bundle_manifest(SHAPES_BUNDLE)["embedding_dim"]))
    if passes < setup + per_step:
        raise UserError(f"--passes {passes} is less than one step of the {recipe} recipe ({setup + per_step} passes)")
    cfg.steps = (passes - setup) // per_step
    refs_dir = out / "references"
    refs_dir.mkdir(parents=True, exist_ok=True)
    bundle = Bundle.load(SHAPES_BUNDLE)
    for i, im in enumerate(world.reference_images(subj, n=5, seed=seed, size=bundle.resolution)):
        Image.fromarray(im).save(refs_dir / f"ref_{i}.png")
    click.echo(f"references: {refs_dir} (5 renders of a {subj.words}, a combination the model never saw); "
               f"init word {subj.shape!r}, recipe {recipe}, {cfg.steps} steps = {cfg.steps * per_step} UNet passes",
               err=True)
    result = Trainer(cfg).train()
    pipe = Pipeline(bundle, embeddings={token: result.theta})
    samples = out / "samples"
    samples.mkdir(exist_ok=True)
    rows = []
    click.echo(f"sampling 4 images on each of {len(world.BACKGROUNDS)} backgrounds", err=True)
    for j, bg in enumerate(world.BACKGROUNDS):
        prompt = f"a photo of a {token} on a {bg} background"
        images = pipe(prompt, num_images=4, steps=25, seed=seed + j, progress=False)
        for k, im in enumerate(images):
            save_png(samples / f"{j:03d}_{k}.png", im, {"prompt": prompt, "seed": seed + j, "index": k})
        rows.append(images)
    save_png(out / "grid.png", grid(np.concatenate(rows), cols=4))
    from zo_edge.models.probe import Probe

    p = Probe.load().predict(np.concatenate(rows))
    exact = sum(s == subj.shape and c == subj.colour and q == subj.pattern
                for s, c, q in zip(p["shape"], p["colour"], p["pattern"]))
    import json

    (out / "result.json").write_text(json.dumps({
        "subject": str(subj), "init": subj.shape, "recipe": recipe, "steps": cfg.steps,
        "unet_passes": result.forward_passes, "seed": seed, "train_seconds": round(result.seconds, 1),
        "peak_rss_mb": round(result.peak_rss_mb), "samples": len(p["shape"]), "exact": int(exact)}, indent=2))
    click.echo(f"token: {cfg.out}\nsamples: {samples}\ngrid: {out / 'grid.png'} (one row per background)\n"
               f"probe: {exact} of {len(p['shape'])} samples show a {subj.words}")


COMMANDS = [personalize, demo]
