"""``zo-edge convert SRC OUT`` and ``zo-edge info BUNDLE``."""
from __future__ import annotations

import click

from zo_runtime.errors import UserError


@click.command("convert")
@click.argument("src", type=click.Path(file_okay=True, dir_okay=True, path_type=str))
@click.argument("out", type=click.Path(file_okay=True, dir_okay=True, path_type=str))
@click.option("--target", type=click.Choice(["cpu", "portable", "qnn"]), default="cpu", show_default=True,
              help="cpu: onnxruntime CPU fusions, dynamic shapes; portable: standard ONNX ops only, finite masks "
                   "(OpenVINO, DirectML, other providers); qnn: portable with fixed shapes and A16W8 QDQ for "
                   "Qualcomm's HTP (--provider qnn).")
@click.option("--weights", type=click.Choice(["int8", "int8w", "int4w", "int4", "fp32", "a16w8", "a8w8", "fp16"]),
              default=None,
              help="cpu: int8 (default; static QDQ, fastest, for generation), int8w (weight-only INT8, float "
                   "activations: keeps the zeroth-order signal), int4w (int8w with the UNet's weights 4-bit: less memory), "
                   "int4 (UNet MatMuls 4-bit, rest static INT8), fp32. portable: int8w "
                   "(default), fp32, int8. qnn: a16w8 (default; 16-bit activations, keeps the signal at a larger "
                   "mu), a8w8, fp16 (float graphs the HTP runs in half precision).")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Fix the shapes: text encoder and UNet batch (1, or n+1 to run personalize's candidates in one "
                   "call); VAE batch 1. qnn: 1 unless given; portable: dynamic unless given.")
@click.option("--text-encoder-fp32", is_flag=True, help="Keep the text encoder in FP32.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at OUT (only once the new one is complete).")
@click.option("--calibration-samples", type=click.IntRange(min=1), default=8, show_default=True,
              help="Calibration inputs per graph.")
@click.option("--provider", type=click.Choice(["cpu"]), default="cpu", show_default=True,
              help="Execution provider the bundle is optimized for.")
@click.option("--fuse/--no-fuse", default=None,
              help="CPU-safe UNet fusions (default: on; it lowers peak memory at 512 px about 2x).")
@click.option("--per-channel", is_flag=True, help="Per-channel INT8 weight scales (default per-tensor).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for calibration and held-out inputs.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the final summary.")
def convert(src, out, target, weights, batch, text_encoder_fp32, overwrite, calibration_samples, provider, fuse,
            per_channel, seed, quiet):
    """Convert a diffusers Stable Diffusion folder SRC (SD1.x, SD2.x or SDXL base) into a zo-edge bundle OUT."""
    from zo_edge.convert.accuracy import format_accuracy
    from zo_edge.convert.pipeline import convert_pipeline
    from zo_edge.models.calibration import SHAPES_WORLD

    def progress(line: str) -> None:
        if not quiet:
            click.echo(line, err=True)

    m = convert_pipeline(src, out, weights=weights, text_encoder_fp32=text_encoder_fp32, overwrite=overwrite,
                         calibration_samples=calibration_samples, provider=provider, fuse=fuse,
                         per_channel=per_channel, seed=seed, progress=progress, target=target, batch=batch,
                         data=SHAPES_WORLD)
    total = sum(e["bytes"] for e in m["files"].values())
    click.echo(f"wrote {out}: {m['family']} {m['resolution']} px, target {target}, weights {m['quantization']['weights']}, "
               f"{len(m['files'])} files, {total / 1e6:,.1f} MB, {m['build']['seconds']:.1f} s")
    click.echo("accuracy vs FP32 export (held-out inputs):")
    for line in format_accuracy(m["accuracy"]):
        click.echo(line)


@click.command("info")
@click.argument("bundle", type=click.Path(path_type=str), default="shapes")
@click.option("--verify", is_flag=True, help="Also check every file's size and sha256 against the manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def info(bundle, verify, as_json):
    """Describe the zo-edge bundle BUNDLE ('shapes' or 'shapes-768': the embedded models): family, graphs,
    precision, sizes, accuracy report; for the shapes models also the words of their world."""
    import json

    from zo_edge.convert.manifest import format_info, verify_files
    from zo_edge.models import SHAPES_MODELS, resolve_model
    from zo_runtime.manifest import read_bundle_manifest

    shapes = bundle in SHAPES_MODELS
    bundle = resolve_model(bundle)
    m = read_bundle_manifest(bundle)
    if as_json:
        click.echo(json.dumps(m, indent=2))
    else:
        for line in format_info(m, bundle):
            click.echo(line)
        if shapes:
            for line in world_vocabulary():
                click.echo(line)
    if verify:
        bad = verify_files(bundle, m)
        if bad:
            raise UserError(f"bundle {bundle} failed verification: {'; '.join(bad[:3])}"
                            f"{f' (+{len(bad) - 3} more)' if len(bad) > 3 else ''}")
        click.echo(f"verified {len(m['files'])} files (sha256)")


def world_vocabulary() -> list[str]:
    """The words the shapes model was trained on (other words it draws as it happens to)."""
    from zo_edge.models import world
    return ["prompt words (the shapes world; e.g. 'a red striped star on a sky background'):",
            f"  shapes      {', '.join(world.SHAPES)}",
            f"  colours     {', '.join(world.COLOURS)}",
            f"  patterns    {', '.join(world.PATTERNS)}",
            f"  backgrounds {', '.join(world.BACKGROUNDS)}"]


@click.command()
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--overwrite", is_flag=True)
@click.option("--weights", type=click.Choice(["int8w", "int4w"]), default="int8w", show_default=True,
              help="int8w: weight-only INT8; int4w: the same with the UNet's weights 4-bit (blocks of 32).")
def requantize(src, out, overwrite, weights):
    """Derive a weight-only bundle (int8w or int4w) from an fp32 bundle, with no export or fusion."""
    from zo_edge.convert.requantize import requantize_bundle
    requantize_bundle(src, out, overwrite=overwrite, progress=lambda m: click.echo(m, err=True), weights=weights)


COMMANDS = [requantize, convert, info]
