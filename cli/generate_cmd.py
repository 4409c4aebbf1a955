"""``zo-edge generate``: images from a bundle with learned tokens (ONNX Runtime + NumPy scheduler)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from zo_edge.models import resolve_model
from zo_runtime.errors import UserError


@click.command()
@click.argument("prompt", required=False)
@click.option("--model", default="shapes", show_default=True, help="Bundle directory, or 'shapes' for the embedded model.")
@click.option("--embedding", "embeddings", multiple=True, type=click.Path(), help="Learned embedding (.safetensors); repeatable.")
@click.option("--prompts", "prompts_file", type=click.Path(), help="Text file, one prompt per line.")
@click.option("--negative-prompt", default="", help="Negative prompt for classifier-free guidance.")
@click.option("--images-per-prompt", type=int, default=1, show_default=True)
@click.option("--steps", type=int, default=30, show_default=True)
@click.option("--guidance", type=float, default=7.5, show_default=True)
@click.option("--scheduler", default=None, help="ddim, pndm, euler, euler_a, dpm++2m (default: the bundle's own).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--height", type=int, default=None)
@click.option("--width", type=int, default=None)
@click.option("--out", type=click.Path(), help="Output PNG (one prompt).")
@click.option("--out-dir", type=click.Path(), help="Output folder: NNN_K.png per prompt NNN, image K.")
@click.option("--grid", "make_grid", is_flag=True, help="Also write grid.png of all images.")
@click.option("--provider", default="cpu", show_default=True)
@click.option("--threads", type=int, default=0)
@click.option("--low-memory", is_flag=True, help="Run the two guidance branches one after the other.")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
def generate(prompt, model, embeddings, prompts_file, negative_prompt, images_per_prompt, steps, guidance, scheduler,
             seed, height, width, out, out_dir, make_grid, provider, threads, low_memory, overwrite):
    """Generate images; learned tokens are injected through the text encoder's inputs_embeds."""
    from zo_runtime.bundle import Bundle
    from zo_runtime.embeddings import load_embeddings
    from zo_runtime.pipeline import Pipeline, grid, save_png

    if prompts_file:
        p = Path(prompts_file)
        if not p.is_file():
            raise UserError(f"prompts file {prompts_file!r} does not exist")
        prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"prompts file {prompts_file!r} has no prompts")
    elif prompt:
        prompts = [prompt]
    else:
        raise UserError("give a PROMPT or --prompts FILE")
    if images_per_prompt < 1:
        raise UserError(f"--images-per-prompt must be >= 1, got {images_per_prompt}")
    if not out and not out_dir:
        raise UserError("give --out FILE.png or --out-dir DIR")
    if out and (len(prompts) > 1):
        raise UserError("--out takes one prompt; use --out-dir for several")

    bundle = Bundle.load(resolve_model(model), provider=provider, threads=threads)
    loaded = {}
    for path in embeddings:
        for name, vecs in load_embeddings(path, expected_dim=bundle.embedding_dim).items():
            if name in loaded:
                raise UserError(f"placeholder {name!r} is defined by two embedding files")
            loaded[name] = vecs
    pipe = Pipeline(bundle, embeddings=loaded, scheduler=scheduler, low_memory=low_memory)

    targets = []
    if out:
        base = Path(out)
        targets = [[base if images_per_prompt == 1 else base.with_name(f"{base.stem}_{k}{base.suffix or '.png'}")
                    for k in range(images_per_prompt)]]
    else:
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        targets = [[d / f"{i:03d}_{k}.png" for k in range(images_per_prompt)] for i in range(len(prompts))]
    clash = [str(t) for row in targets for t in row if t.exists()]
    if clash and not overwrite:
        raise UserError(f"{clash[0]} exists; pass --overwrite to replace it")

    all_images = []
    for i, (text, paths) in enumerate(zip(prompts, targets)):
        s = seed + i * 1000
        images = pipe(text, negative_prompt=negative_prompt, num_images=images_per_prompt, steps=steps,
                      guidance=guidance, seed=s, height=height, width=width)
        for k, (img, path) in enumerate(zip(images, paths)):
            save_png(path, img, {"prompt": text, "negative_prompt": negative_prompt, "seed": s, "index": k,
                                 "scheduler": scheduler or pipe.scheduler_config.get("_class_name", ""),
                                 "steps": steps, "guidance": guidance, "model": str(bundle.root),
                                 "embeddings": json.dumps([str(e) for e in embeddings])})
            click.echo(str(path))
        all_images.append(images)
    if make_grid:
        import numpy as np
        where = (Path(out_dir) if out_dir else Path(out).parent) / "grid.png"
        save_png(where, grid(np.concatenate(all_images), cols=images_per_prompt if len(prompts) > 1 else None))
        click.echo(str(where))


COMMANDS = [generate]
