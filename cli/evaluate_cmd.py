"""``zo-edge convert-metrics`` (workstation: CLIP + DINOv2 to ONNX) and ``zo-edge evaluate``
(the paper's CLIP-I, CLIP-T, DINO and DINO-inter on ONNX Runtime)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from zo_runtime.errors import UserError


@click.command("convert-metrics")
@click.option("--clip", "clip_dir", metavar="DIR", default=None,
              help="Local Hugging Face CLIP folder (e.g. openai/clip-vit-base-patch32): CLIP-I and CLIP-T.")
@click.option("--dino", "dino_dir", metavar="DIR", default=None,
              help="Local Hugging Face DINOv2 folder (e.g. facebook/dinov2-base): DINO and DINO-inter.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.argument("out", metavar="OUT")
def convert_metrics(clip_dir, dino_dir, overwrite, out):
    """Export the evaluation models to ONNX (needs torch + transformers; reads local folders only)."""
    try:
        from zo_edge.convert.metrics_export import export_metrics
    except ImportError as e:
        raise UserError(f"convert-metrics needs the workstation extras (pip install 'zo-edge[convert]'): {e}") from None
    path = export_metrics(out, clip_dir=clip_dir, dino_dir=dino_dir, overwrite=overwrite,
                          log=lambda m: click.echo(m, err=True))
    click.echo(f"wrote {path}")


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def format_scores(res: dict) -> str:
    rows = [("CLIP-I", res.get("clip_i")), ("CLIP-T", res.get("clip_t")),
            ("DINO", res.get("dino")), ("DINO-inter", res.get("dino_inter"))]
    lines = [f"{'metric':<11} {'score':>7}", f"{'-' * 11} {'-' * 7}"]
    lines += [f"{name:<11} {_fmt(v):>7}" for name, v in rows]
    lines.append(f"({res['n_references']} references, {res['n_generated']} generated images, "
                 f"{res['n_prompts']} prompts)")
    return "\n".join(lines)


@click.command("evaluate")
@click.option("--metrics", "metrics_dir", required=True, metavar="DIR", help="Bundle from zo-edge convert-metrics.")
@click.option("--references", required=True, metavar="DIR", help="Folder of the subject's reference images.")
@click.option("--generated", required=True, metavar="DIR",
              help="Folder of generated images: PNG 'prompt' metadata, or names {prompt_index}_{k}.png.")
@click.option("--prompts", "prompts_file", required=True, metavar="FILE",
              help="Prompts, one a line (or a JSON list), as given to zo-edge generate.")
@click.option("--placeholder", default=None, metavar="TOK", help="Learned token, e.g. '<my-dog>'.")
@click.option("--class-word", default=None, metavar="WORD", help="Replaces the placeholder for CLIP-T, e.g. dog.")
@click.option("--out", "out_file", default=None, metavar="FILE", help="Write all scores (per prompt too) as JSON.")
@click.option("--provider", default="cpu", show_default=True, help="ONNX Runtime execution provider.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 1024))
def evaluate(metrics_dir, references, generated, prompts_file, placeholder, class_word, out_file, provider,
             batch_size):
    """Score generated images: CLIP-I, CLIP-T, DINO, DINO-inter (torch-free)."""
    from zo_edge.eval.metrics import evaluate as run_evaluate

    res = run_evaluate(metrics_dir, references, generated, prompts_file, placeholder=placeholder,
                       class_word=class_word, provider=provider, batch_size=batch_size)
    for w in res.get("warnings", []):
        click.echo(f"zo-edge: warning: {w}", err=True)
    click.echo(format_scores(res))
    if out_file:
        p = Path(out_file)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot write {out_file}: {e.strerror or e}") from None
        click.echo(f"wrote {p}")


COMMANDS = [convert_metrics, evaluate]
