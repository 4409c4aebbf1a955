"""The bundle manifest ``zo-edge.json`` (docs/bundle.md): writing, reading, checking, printing."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from zo_runtime.bundle import sha256_file
from zo_runtime.errors import UserError

from .graphs import io_spec

MANIFEST = "zo-edge.json"
FORMAT = "zo-edge-bundle"
FORMAT_VERSION = 1
GRAPH_ORDER = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


def check_bundle_out(out: Path, overwrite: bool) -> None:
    """May a bundle be written to ``out``? Only a new path, or with ``overwrite`` an earlier bundle
    or an empty folder: never a user's other folder."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise UserError(f"{out} already exists; pass --overwrite to replace it")
        if not out.is_dir():
            raise UserError(f"{out} exists and is not a folder; refusing to replace it")
        if (out / MANIFEST).is_file() or not any(out.iterdir()):
            return
        raise UserError(f"{out} exists and is not a zo-edge bundle; refusing to replace it")


def replace_dir(new: Path, out: Path) -> None:
    """Move the finished folder ``new`` to ``out`` (same filesystem). A folder already at ``out`` is
    moved aside first, put back if the move fails, and deleted only once ``new`` is in place."""
    old = None
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


def file_table(root: Path, manifest_name: str = MANIFEST) -> dict:
    """Every file under ``root`` except the manifest: relative posix path -> sha256 + bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != manifest_name:
            rel = p.relative_to(root).as_posix()
            out[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def graph_entry(root: Path, graph: str, precision: str, extra: dict | None = None) -> dict:
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
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(bundle: str | Path) -> dict:
    """Load and sanity-check a bundle's manifest; UserError (one line) when it is not a bundle."""
    b = Path(bundle).expanduser()
    if not b.exists():
        raise UserError(f"bundle {b} does not exist")
    if not b.is_dir():
        raise UserError(f"bundle {b} is not a folder")
    p = b / MANIFEST
    if not p.is_file():
        raise UserError(f"{b} is not a zo-edge bundle: {MANIFEST} is missing")
    try:
        m = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UserError(f"{p} is not a zo-edge bundle manifest (format is not {FORMAT!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{p} has format_version {m.get('format_version')}; this zo-edge reads version {FORMAT_VERSION}")
    for k in ("family", "graphs", "files"):
        if k not in m:
            raise UserError(f"{p} has no {k!r} entry")
    return m


def verify_files(bundle: str | Path, manifest: dict) -> list[str]:
    """Problems found checking every listed file's size and sha256 (empty list: all good)."""
    from zo_runtime.bundle import file_problems
    return file_problems(Path(bundle), manifest.get("files", {}))


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def graph_bytes(manifest: dict, graph: str) -> int:
    files = manifest.get("files", {})
    return sum(e["bytes"] for rel, e in files.items() if rel.startswith(f"{graph}/") and rel.startswith(f"{graph}/model.onnx"))


def format_info(manifest: dict, bundle: str | Path | None = None) -> list[str]:
    """What ``zo-edge info`` prints."""
    from .accuracy import format_accuracy
    m = manifest
    lines = []
    if bundle is not None:
        lines.append(f"bundle      {bundle}")
    lines.append(f"format      {m.get('format')} v{m.get('format_version')}  ({m.get('created_by', '?')})")
    src = m.get("source", {})
    lines.append(f"family      {m['family']}  ({src.get('pipeline_class', '?')} from {src.get('path', '?')})")
    lines.append(f"resolution  {m.get('resolution')} px  latents {m.get('latent_channels')} ch, "
                 f"1/{m.get('vae_scale_factor')} scale, scaling factor {m.get('vae_scaling_factor')}")
    lines.append(f"text        embedding_dim {m.get('embedding_dim')}, max_length {m.get('max_length')}, "
                 f"token table {m.get('token_embedding', {}).get('shape')}")
    ns = m.get("noise_schedule", {})
    lines.append(f"schedule    {m.get('prediction_type')}, {ns.get('num_train_timesteps')} steps, "
                 f"{ns.get('beta_schedule')} {ns.get('beta_start')}..{ns.get('beta_end')}")
    q = m.get("quantization", {})
    lines.append(f"weights     {q.get('weights')}  fuse={q.get('fuse')}  provider={q.get('provider')}")
    lines.append("graphs:")
    for g in GRAPH_ORDER:
        e = m["graphs"].get(g)
        if not e:
            continue
        ins = ", ".join(f"{i['name']}:{i['dtype']}[{_shape(i)}]" for i in e["inputs"])
        outs = ", ".join(f"{o['name']}:{o['dtype']}[{_shape(o)}]" for o in e["outputs"])
        lines.append(f"  {g:<13} {e.get('precision', '?'):<5} {_mb(graph_bytes(m, g)):>10}  {ins} -> {outs}")
    total = sum(e["bytes"] for e in m.get("files", {}).values())
    lines.append(f"files       {len(m.get('files', {}))} files, {_mb(total)}")
    lines.append("accuracy vs FP32 export (held-out inputs):")
    lines.extend(format_accuracy(m.get("accuracy", {})))
    return lines


def _shape(spec: dict) -> str:
    shape = spec.get("shape")
    if shape is None:
        return f"rank {spec.get('rank')}"
    return ",".join("?" if d is None else str(d) for d in shape)
