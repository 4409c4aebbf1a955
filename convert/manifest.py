"""The bundle manifest ``zo-edge.json`` (docs/bundle.md): writing and printing. Its name, format and
version, and reading and checking it, are ``zo_runtime.manifest`` (one place for every manifest's
rules); nothing here needs onnx until a graph is described, so ``zo-edge info`` runs in a
runtime-only install."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from zo_runtime.errors import UserError
from zo_runtime.manifest import BUNDLE_MANIFEST, file_problems, sha256_file

GRAPH_ORDER = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")


def check_bundle_out(out: Path, overwrite: bool) -> None:
    """May a bundle be written to ``out``? Only a new path, or with ``overwrite`` an earlier bundle
    or an empty folder: never a user's other folder."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise UserError(f"{out} already exists; pass --overwrite to replace it")
        if not out.is_dir():
            raise UserError(f"{out} exists and is not a folder; refusing to replace it")
        if (out / BUNDLE_MANIFEST).is_file() or not any(out.iterdir()):
            return
        raise UserError(f"{out} exists and is not a zo-edge bundle; refusing to replace it")


def replace_dir(new: Path, out: Path, overwrite: bool) -> None:
    """Move the finished folder ``new`` to ``out`` (same filesystem). Without ``overwrite`` a path
    that appeared at ``out`` while ``new`` was being built is refused, not replaced. A folder
    already at ``out`` is moved aside first, put back if the move fails, and deleted only once
    ``new`` is in place."""
    old = None
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise UserError(f"{out} appeared while this command ran; refusing to replace it (pass --overwrite)")
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_table(root: Path, manifest_name: str = BUNDLE_MANIFEST) -> dict:
    """Every file under ``root`` except the manifest: relative posix path -> sha256 + bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != manifest_name:
            rel = p.relative_to(root).as_posix()
            out[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def graph_entry(root: Path, graph: str, precision: str, extra: dict | None = None) -> dict:
    from .graphs import io_spec
    rel = f"{graph}/model.onnx"
    spec = io_spec(root / rel)
    e = {"path": rel, "precision": precision, "inputs": spec["inputs"], "outputs": spec["outputs"]}
    data = root / graph / "model.onnx_data"
    if data.exists():
        e["external_data"] = f"{graph}/model.onnx_data"
    if extra:
        e.update(extra)
    return e


def write_manifest(root: Path, manifest: dict) -> dict:
    """Fill ``files`` from what is on disk now and write ``zo-edge.json``; returns the manifest."""
    manifest["files"] = file_table(root)
    (root / BUNDLE_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def verify_files(bundle: str | Path, manifest: dict) -> list[str]:
    """Problems found checking every listed file's size and sha256 (empty list: all good)."""
    return file_problems(Path(bundle), manifest["files"])


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def graph_bytes(manifest: dict, graph: str) -> int:
    files = manifest.get("files", {})
    return sum(e.get("bytes", 0) for rel, e in files.items() if rel.startswith(f"{graph}/model.onnx"))


def format_info(manifest: dict, bundle: str | Path | None = None) -> list[str]:
    """What ``zo-edge info`` prints."""
    from .accuracy import format_accuracy
    m = manifest
    lines = []
    if bundle is not None:
        lines.append(f"bundle      {bundle}")
    lines.append(f"format      {m.get('format')} v{m.get('format_version')}  ({m.get('created_by', '?')})")
    src = _d(m.get("source"))
    lines.append(f"family      {m['family']}  ({src.get('pipeline_class', '?')} from {src.get('path', '?')})")
    lines.append(f"resolution  {m.get('resolution')} px  latents {m.get('latent_channels')} ch, "
                 f"1/{m.get('vae_scale_factor')} scale, scaling factor {m.get('vae_scaling_factor')}")
    lines.append(f"text        embedding_dim {m.get('embedding_dim')}, max_length {m.get('max_length')}, "
                 f"token table {_d(m.get('token_embedding')).get('shape')}")
    ns = _d(m.get("noise_schedule"))
    lines.append(f"schedule    {m.get('prediction_type')}, {ns.get('num_train_timesteps')} steps, "
                 f"{ns.get('beta_schedule')} {ns.get('beta_start')}..{ns.get('beta_end')}")
    q = _d(m.get("quantization"))
    t = _d(m.get("target"))
    lines.append(f"weights     {q.get('weights')}  fuse={q.get('fuse')}  target={t.get('name', 'cpu')}"
                 + (f" (standard ONNX ops, batch {t.get('batch') or 'dynamic'})" if t.get("name", "cpu") != "cpu" else ""))
    lines.append("graphs:")
    for g in GRAPH_ORDER:
        e = m["graphs"].get(g)
        if not isinstance(e, dict):
            continue
        ins = ", ".join(f"{i['name']}:{i.get('dtype')}[{_shape(i)}]" for i in e["inputs"])
        outs = ", ".join(f"{o.get('name')}:{o.get('dtype')}[{_shape(o)}]" for o in e.get("outputs", [])
                         if isinstance(o, dict))
        lines.append(f"  {g:<13} {e.get('precision', '?'):<5} {_mb(graph_bytes(m, g)):>10}  {ins} -> {outs}")
    total = sum(e.get("bytes", 0) for e in m["files"].values())
    lines.append(f"files       {len(m.get('files', {}))} files, {_mb(total)}")
    lines.append("accuracy vs FP32 export (held-out inputs):")
    try:
        lines.extend(format_accuracy(_d(m.get("accuracy"))))
    except (KeyError, TypeError, ValueError, AttributeError):
        lines.append("  (the manifest's accuracy report is not readable)")
    return lines


def _d(value) -> dict:
    """A manifest entry that should be an object; anything else reads as empty (info only prints)."""
    return value if isinstance(value, dict) else {}


def _shape(spec: dict) -> str:
    shape = spec.get("shape")
    if shape is None:
        return f"rank {spec.get('rank')}"
    return ",".join("?" if d is None else str(d) for d in shape)
