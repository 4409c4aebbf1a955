"""``zo-edge generate``: images from a bundle with learned tokens (ONNX Runtime + NumPy scheduler)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from zo_edge.models import SHAPES_MODELS, resolve_model
from zo_runtime.errors import UserError


@click.command()
@click.argument("prompt", required=False)
@click.option("--model", default="shapes", show_default=True, help="Bundle directory, or 'shapes' / 'shapes-768' for the embedded models.")
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
@click.option("--out", type=click.Path(), help="Output image, .png / .jpg / .webp (one prompt).")
@click.option("--out-dir", type=click.Path(), help="Output folder: NNN_K.png per prompt NNN, image K.")
@click.option("--grid", "make_grid", is_flag=True, help="Also write grid.png of all images.")
@click.option("--provider", default="cpu", show_default=True)
@click.option("--threads", type=int, default=0)
@click.option("--low-memory", is_flag=True, help="Run the two guidance branches one after the other, with "
              "onnxruntime's CPU memory arena off and large buffers returned when freed: less peak memory, slower.")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
def generate(prompt, model, embeddings, prompts_file, negative_prompt, images_per_prompt, steps, guidance, scheduler,
             seed, height, width, out, out_dir, make_grid, provider, threads, low_memory, overwrite):
    """Generate images; learned tokens are injected through the text encoder's inputs_embeds."""
    from zo_runtime.bundle import Bundle
    from zo_runtime.outputs import check_output, check_writable_dir
    from zo_runtime.pipeline import IMAGE_FORMATS, check_sampling, grid, save_image
    from zo_runtime.sdxl import load_embeddings_for, make_pipeline

    prompts = read_prompts(prompts_file) if prompts_file else [prompt] if prompt else None
    if not prompts:
        raise UserError("give a PROMPT or --prompts FILE")
    if not 1 <= images_per_prompt <= 64:
        raise UserError(f"--images-per-prompt must be between 1 and 64, got {images_per_prompt}")
    if threads < 0:
        raise UserError(f"--threads must be >= 0, got {threads}")
    if not out and not out_dir:
        raise UserError("give --out FILE.png or --out-dir DIR")
    if out and out_dir:
        raise UserError("give --out or --out-dir, not both")
    if out and (len(prompts) > 1):
        raise UserError("--out takes one prompt; use --out-dir for several")

    suffixes = tuple(IMAGE_FORMATS)
    if out:
        base = Path(out)
        check_output(base, suffixes, overwrite, "--out")
        targets = [[base if images_per_prompt == 1 else base.with_name(f"{base.stem}_{k}{base.suffix}")
                    for k in range(images_per_prompt)]]
        folder = base.parent
    else:
        folder = Path(out_dir)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--out-dir {out_dir!r} exists and is not a folder")
        check_writable_dir(folder, "images")
        targets = [[folder / f"{i:03d}_{k}.png" for k in range(images_per_prompt)] for i in range(len(prompts))]
    grid_path = folder / "grid.png" if make_grid else None
    every = [t for row in targets for t in row] + ([grid_path] if grid_path else [])
    clash = [str(t) for t in every if t.exists() or t.is_symlink()]
    if clash and not overwrite:
        raise UserError(f"{clash[0]} exists; pass --overwrite to replace it")

    bundle = Bundle.load(resolve_model(model), provider=provider, threads=threads, low_memory=low_memory)
    check_sampling(bundle, steps, guidance, seed, height, width)
    loaded = {}
    for path in embeddings:
        for name, vecs in load_embeddings_for(bundle, path).items():
            if name in loaded:
                raise UserError(f"placeholder {name!r} is defined by two embedding files")
            loaded[name] = vecs
    pipe = make_pipeline(bundle, embeddings=loaded, scheduler=scheduler, low_memory=low_memory)
    for text in dict.fromkeys(prompts):
        pipe.check_prompt(text)
        if model in SHAPES_MODELS:
            warn_unknown_background(text)

    all_images = []
    for i, (text, paths) in enumerate(zip(prompts, targets)):
        s = seed + i * 1000
        images = pipe(text, negative_prompt=negative_prompt, num_images=images_per_prompt, steps=steps,
                      guidance=guidance, seed=s, height=height, width=width)
        for k, (img, path) in enumerate(zip(images, paths)):
            save_image(path, img, {"prompt": text, "negative_prompt": negative_prompt, "seed": s, "index": k,
                                   "scheduler": scheduler or pipe.scheduler_config.get("_class_name", ""),
                                   "steps": steps, "guidance": guidance, "model": str(bundle.root),
                                   "embeddings": json.dumps([str(e) for e in embeddings])}, overwrite=overwrite)
            click.echo(str(path))
        all_images.append(images)
    if grid_path:
        import numpy as np
        save_image(grid_path, grid(np.concatenate(all_images), cols=images_per_prompt if len(prompts) > 1 else None),
                   overwrite=overwrite)
        click.echo(str(grid_path))


def warn_unknown_background(prompt: str) -> None:
    """The shapes model knows five backgrounds; any other it draws as grey, so say so."""
    import re

    from zo_edge.models import world

    for word in re.findall(r"\bon an? ([\w-]+) background", prompt):
        if word not in world.BACKGROUNDS:
            click.echo(f"zo-edge: warning: the shapes model never saw a {word!r} background (it knows "
                       f"{', '.join(world.BACKGROUNDS)}); expect grey", err=True)


def read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompts file {path!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"prompts file {path!r} is not UTF-8 text") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompts file {path!r} has no prompts")
    return prompts


COMMANDS = [generate]
