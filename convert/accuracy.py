"""Accuracy of converted graphs against the FP32 export, on held-out inputs.

Per graph: cosine similarity and relative L2 error (``||q - f|| / ||f||``) of the main output,
pooled over all held-out samples, plus the worst single sample. For the UNet also per timestep
band (0-250, 250-500, 500-900, 900-1000 of a 1000-step schedule).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # onnx is imported only where a graph is run: `zo-edge info` works without it
    from .calibrate import InputSet

MAIN_OUTPUT = {"text_encoder": "last_hidden_state", "unet": "out_sample", "vae_encoder": "latent_parameters",
               "vae_decoder": "sample"}


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """cosine and relative L2 of ``b`` (converted) against ``a`` (reference)."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = float(a @ b / (na * nb)) if na > 0 and nb > 0 else float(na == nb)
    rel = float(np.linalg.norm(b - a) / na) if na > 0 else float(np.linalg.norm(b))
    return {"cosine": cos, "rel_l2": rel}


def _summ(refs: list[np.ndarray], outs: list[np.ndarray]) -> dict:
    pooled = compare(np.concatenate([r.ravel() for r in refs]), np.concatenate([o.ravel() for o in outs]))
    per = [compare(r, o) for r, o in zip(refs, outs)]
    return {"cosine": round(pooled["cosine"], 6), "rel_l2": round(pooled["rel_l2"], 6),
            "worst_cosine": round(min(p["cosine"] for p in per), 6),
            "worst_rel_l2": round(max(p["rel_l2"] for p in per), 6), "samples": len(per)}


def _run(path: Path, output: str, feeds: list[dict]) -> list[np.ndarray]:
    from .graphs import session
    s = session(path)
    names = {i.name for i in s.get_inputs()}
    return [s.run([output], {k: v for k, v in f.items() if k in names})[0] for f in feeds]


def graph_accuracy(graph: str, reference: Path, converted: Path, heldout: InputSet,
                   num_train_timesteps: int = 1000) -> dict:
    out_name = MAIN_OUTPUT[graph]
    feeds = heldout.feeds[graph]
    refs = _run(reference, out_name, feeds)
    outs = _run(converted, out_name, feeds)
    res = {"output": out_name, **_summ(refs, outs)}
    if graph == "unet":
        from .calibrate import BANDS
        bands = {}
        for lo, hi in BANDS:
            blo, bhi = lo * num_train_timesteps / 1000, hi * num_train_timesteps / 1000
            idx = [k for k, t in enumerate(heldout.unet_timesteps) if blo <= t < bhi]
            if idx:
                bands[f"{lo}-{hi}"] = _summ([refs[k] for k in idx], [outs[k] for k in idx])
        res["bands"] = bands
    return res


def format_accuracy(acc: dict) -> list[str]:
    """Human-readable lines for ``manifest["accuracy"]``."""
    lines = []
    if not acc:
        return ["  (no accuracy report)"]
    for g, r in acc.items():
        if not isinstance(r, dict) or "cosine" not in r:
            continue
        if r.get("identical"):
            lines.append(f"  {g:<13} unchanged FP32 export (cosine 1, rel_l2 0)")
            continue
        lines.append(f"  {g:<13} cosine {r['cosine']:.6f}  rel_l2 {r['rel_l2']:.4f}  "
                     f"worst cos {r.get('worst_cosine', r['cosine']):.6f}  n={r.get('samples', 0)}")
        for band, b in (r.get("bands") or {}).items():
            lines.append(f"    t {band:<9} cosine {b['cosine']:.6f}  rel_l2 {b['rel_l2']:.4f}  n={b['samples']}")
    return lines
