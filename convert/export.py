"""Export a diffusers Stable Diffusion folder to ONNX with optimum-onnx's ``main_export``.

Produces ``text_encoder/``, ``unet/``, ``vae_encoder/`` and ``vae_decoder/`` (each ``model.onnx``,
plus ``model.onnx_data`` when a graph is over 2 GB), local files only.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

from zo_runtime.errors import UserError

GRAPHS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


def export_onnx(src: str | Path, out: str | Path, opset: int | None = None, quiet: bool = True) -> dict[str, Path]:
    """Run ``optimum.exporters.onnx.main_export(task="text-to-image")``; returns graph -> model.onnx."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as e:  # pragma: no cover - depends on the install
        raise UserError(f"convert needs the convert extras (optimum-onnx): {e}") from None
    out = Path(out)
    loggers = [logging.getLogger(n) for n in ("optimum", "transformers", "diffusers", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    sink = io.StringIO()
    bars = None
    if quiet:
        try:
            from diffusers.utils import logging as dlog
            bars = dlog.is_progress_bar_enabled()
            dlog.disable_progress_bar()  # "Loading pipeline components..."
        except Exception:  # noqa: BLE001
            bars = None
    try:
        for lg in loggers:
            if quiet:
                lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
                main_export(model_name_or_path=str(src), output=str(out), task="text-to-image", opset=opset,
                            device="cpu", local_files_only=True, do_validation=False, library_name="diffusers")
    except UserError:
        raise
    except Exception as e:  # an export failure is a property of the source model: say it in one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"ONNX export of {src} failed: {type(e).__name__}: {msg}") from e
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if bars:
            from diffusers.utils import logging as dlog
            dlog.enable_progress_bar()
    paths = {}
    for g in GRAPHS:
        p = out / g / "model.onnx"
        if not p.is_file():
            raise UserError(f"ONNX export of {src} did not produce {g}/model.onnx")
        paths[g] = p
    return paths
