"""``convert_pipeline``: diffusers Stable Diffusion folder -> zo-edge bundle (docs/bundle.md).

Stages, each announced with its time and peak RSS: export, rewrite, optimize, calibrate,
quantize, verify (and finalize). Everything is built in a hidden temporary folder next to OUT
(``.OUT.zo-convert-XXXX``) and moved into place with ``os.replace`` only at the very end, so an
interrupted convert never leaves a bundle-looking folder, and ``--overwrite`` replaces an old
bundle only once the new one is complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from zo_runtime.bundle import (TOKEN_FILL_FILE, VOCABULARY_FILE, WEIGHT_ONLY_BITS, fill_table, trim_table,
                               vocabulary_problem)
from zo_runtime.manifest import FILL_GENERATORS
from zo_runtime.errors import UserError
from zo_runtime.manifest import BUNDLE_FORMAT, FORMAT_VERSION
from zo_runtime.sysinfo import peak_rss_mb

from . import accuracy as acc_mod
from .calibrate import CalibrationData
from .export import GRAPHS, export_onnx
from .graphs import copy_graph, session
from .manifest import check_bundle_out, graph_entry, replace_dir, write_manifest
from .quantize import WEIGHTS, quantize_int4, quantize_int8, quantize_weight_only
from .portable import FLOAT_WEIGHTS, PORTABLE_OPSET, TARGET_WEIGHTS, TARGETS
from .source import SourceInfo, inspect_source
from .surgery import check_parity, rewrite_text_encoder

PROVIDERS = ("cpu",)
# Fusion default per weights, measured on CPU (docs/bundle.md "Conversion recipe"): with the fused
# self-attention unpacked before quantization, fusion keeps the projections INT8 and replaces the
# QK^T / softmax / attn.V chain by one kernel: at 512 px (64x64 latents, SD1.5's top UNet levels)
# INT8 peak RSS 820 MB fused vs 1,916 MB unfused, FP32 1,735 vs 2,877 MB, and no slower.
DEFAULT_FUSE = {"fp32": True, "int8": True, "int8w": True, "int4w": True, "int4": True}
PARITY_TOL = 1e-5
PARITY_PROMPTS = ("a photo of a cat", "a red striped star on a grass background",
                  "an oil painting of a harbour at dawn, highly detailed", "")


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, AttributeError, ValueError):  # not Linux: the process's lifetime peak is the best we have
        return int(peak_rss_mb() * 2 ** 20)


class Stages:
    """Times each stage and samples this process's RSS to report the stage's peak."""

    def __init__(self, progress: Callable[[str], None] | None):
        self.progress = progress
        self.records: dict[str, dict] = {}
        self.t0 = time.perf_counter()

    def say(self, msg: str) -> None:
        if self.progress:
            self.progress(msg)

    def run(self, name: str, what: str, fn: Callable, *a, **kw):
        self.say(f"[{name}] {what} ...")
        peak = [_rss_bytes()]
        stop = threading.Event()

        def sample():
            while not stop.wait(0.05):
                peak[0] = max(peak[0], _rss_bytes())

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t = time.perf_counter()
        try:
            result = fn(*a, **kw)
        finally:
            stop.set()
            th.join()
        dt = time.perf_counter() - t
        peak[0] = max(peak[0], _rss_bytes())
        rec = self.records.setdefault(name, {"seconds": 0.0, "peak_rss_mb": 0.0})
        rec["seconds"] = round(rec["seconds"] + dt, 3)
        rec["peak_rss_mb"] = round(max(rec["peak_rss_mb"], peak[0] / 2**20), 1)
        self.say(f"[{name}] done in {dt:.1f} s (peak RSS {peak[0] / 2**20:,.0f} MB)")
        return result

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.t0, 3)


def batch_feeds_if(feeds: list[dict], batch: int | None) -> list[dict]:
    if not batch:
        return feeds
    from .portable import batch_feeds
    return batch_feeds(feeds, batch)


def convert_pipeline(src: str | os.PathLike, out: str | os.PathLike, weights: str | None = None,
                     text_encoder_fp32: bool = False, overwrite: bool = False, calibration_samples: int = 8,
                     provider: str = "cpu", fuse: bool | None = None, per_channel: bool = False,
                     heldout_samples: int = 4, heldout_per_band: int = 2, seed: int = 0,
                     export_dir: str | os.PathLike | None = None,
                     progress: Callable[[str], None] | None = None, target: str = "cpu",
                     batch: int | None = None, *, data: CalibrationData) -> dict:
    """Convert the diffusers Stable Diffusion folder ``src`` (SD1.x / SD2.x) into a bundle at ``out``.

    ``target`` (convert/portable.py): ``cpu`` (onnxruntime CPU fusions, dynamic shapes), ``portable``
    (standard ONNX ops, finite masks, opset 20) or ``qnn`` (portable, fixed shapes, QDQ for Qualcomm's
    HTP). ``batch``: fix the text encoder's and UNet's batch to this (portable: optional; qnn: 1 when
    None); the VAE graphs get batch 1.
    ``weights`` (None: the target's default): cpu: ``int8`` (static QDQ, default), ``int8w``, ``int4w``
    (``int8w`` with the UNet's weights 4-bit), ``int4``
    (UNet MatMuls 4-bit weight-only, rest INT8) or ``fp32``; portable: ``int8w`` (default), ``fp32``,
    ``int8``; qnn: ``a16w8`` (16-bit activations, 8-bit weights, default) or ``a8w8``. ``text_encoder_fp32`` keeps the text encoder FP32. ``fuse``: apply the CPU-safe
    onnxruntime.transformers fusions to the UNet (None: the measured default for ``weights``).
    ``calibration_samples``: calibration inputs per graph. ``heldout_samples`` / ``heldout_per_band``:
    accuracy-report inputs (per UNet timestep band). ``export_dir``: reuse an existing Optimum
    export of ``src`` (skips the export stage). ``progress``: called with one line per stage event.
    ``data``: the prompts and images calibration and the held-out check run the FP32 graphs on
    (:class:`~zo_edge.convert.calibrate.CalibrationData`, e.g. ``zo_edge.models.calibration.SHAPES_WORLD``).

    Returns the manifest written to ``out/zo-edge.json``. Bad input raises UserError. An SDXL folder
    goes to :func:`convert.sdxl.convert_sdxl` (same arguments).
    """
    from .sdxl import is_sdxl_source
    if is_sdxl_source(src):
        if target != "cpu" or batch is not None:
            raise UserError("SDXL converts for the CPU target only (--target portable / qnn and --batch are SD 1.x / 2.x)")
        weights = weights or "int8"
        from .sdxl import convert_sdxl
        return convert_sdxl(src, out, weights=weights, text_encoder_fp32=text_encoder_fp32, overwrite=overwrite,
                            calibration_samples=calibration_samples, provider=provider, fuse=fuse,
                            per_channel=per_channel, heldout_samples=heldout_samples,
                            heldout_per_band=heldout_per_band, seed=seed, export_dir=export_dir, progress=progress,
                            data=data)
    if target not in TARGETS:
        raise UserError(f"unknown --target {target!r}; one of {', '.join(TARGETS)}")
    if weights is None:
        weights = TARGET_WEIGHTS[target][0]
    if weights not in TARGET_WEIGHTS[target]:
        known = weights in WEIGHTS or any(weights in w for w in TARGET_WEIGHTS.values())
        raise UserError(f"{'--weights ' + repr(weights) + ' is not made for' if known else 'unknown --weights ' + repr(weights) + ' for'} "
                        f"--target {target}; one of {', '.join(TARGET_WEIGHTS[target])}")
    if target != "cpu" and fuse:
        raise UserError(f"--fuse makes onnxruntime CPU kernels (com.microsoft ops); --target {target} takes standard "
                        "ONNX ops only")
    if batch is not None and (target == "cpu" or isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise UserError("--batch (fixed shapes) needs --target portable or qnn and a value >= 1" if target == "cpu"
                        else f"--batch must be an integer >= 1, got {batch!r}")
    if target == "qnn" and batch is None:
        batch = 1
    if target == "qnn" and text_encoder_fp32:
        raise UserError("--text-encoder-fp32 does not go with --target qnn: HTP runs every graph at one precision "
                        "(--weights a16w8, a8w8 or fp16)")
    if provider not in PROVIDERS:
        raise UserError(f"unknown --provider {provider!r}; supported: {', '.join(PROVIDERS)}")
    if weights not in (*FLOAT_WEIGHTS, *WEIGHT_ONLY_BITS) and calibration_samples < 1:
        raise UserError("--calibration-samples must be at least 1")
    if heldout_samples < 1 or heldout_per_band < 1:
        raise UserError("held-out sample counts must be at least 1")
    info = inspect_source(src)
    out = Path(out).expanduser().absolute()
    check_bundle_out(out, overwrite)
    if out.resolve() == info.path or info.path in out.resolve().parents:
        raise UserError(f"output {out} must not be inside the source folder {info.path}")
    if export_dir is not None:
        ed = Path(export_dir)
        missing = [g for g in GRAPHS if not (ed / g / "model.onnx").is_file()]
        if missing:
            raise UserError(f"export folder {ed} lacks {', '.join(missing)}")
    fuse = (DEFAULT_FUSE[weights] if target == "cpu" else False) if fuse is None else bool(fuse)
    out.parent.mkdir(parents=True, exist_ok=True)

    st = Stages(progress)
    st.say(f"converting {info.path} ({info.family}, {info.prediction_type}, {info.resolution} px) "
           f"-> {out}  target={target} weights={weights}{' text-encoder=fp32' if text_encoder_fp32 else ''} fuse={fuse}"
           f"{f' batch={batch}' if batch else ''}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.zo-convert-", dir=out.parent))
    try:
        manifest = _build(info, tmp, weights, text_encoder_fp32, calibration_samples, provider, fuse, per_channel,
                          heldout_samples, heldout_per_band, seed, export_dir, st, data, target, batch)
        check_bundle_out(out, overwrite)
        replace_dir(tmp / "bundle", out, overwrite)
        st.say(f"bundle written to {out} in {st.total:.1f} s")
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def trim_token_table(bundle: Path, table_path: Path, fill_spec: Path) -> dict:
    """Keep only the rows of the token table that differ from the source's declared fill
    (``text_encoder/zo_edge_token_fill.json``: generator, seed, std); the runtime regenerates the
    rest (zo_runtime.bundle.fill_table). Checked bit for bit before the full table is dropped."""
    try:
        spec = json.loads(fill_spec.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {fill_spec}: {e}") from None
    if not isinstance(spec, dict) or spec.get("generator") not in FILL_GENERATORS:
        raise UserError(f"{fill_spec}: 'generator' must be one of {', '.join(FILL_GENERATORS)}")
    fill = {"generator": spec["generator"], "seed": spec.get("seed"), "std": spec.get("std")}
    if not isinstance(fill["seed"], int) or not isinstance(fill["std"], (int, float)) or fill["std"] <= 0:
        raise UserError(f"{fill_spec}: needs an integer 'seed' and a positive 'std'")
    table = np.load(table_path, mmap_mode="r")
    ids, rows = trim_table(table, fill)
    if not np.array_equal(fill_table(rows, ids, fill, list(table.shape)).view(np.uint32),
                          np.asarray(table, np.float32).view(np.uint32)):
        raise RuntimeError("the trimmed token table does not rebuild the full one")
    np.save(bundle / "text_encoder" / "token_rows.npy", rows)
    np.save(bundle / "text_encoder" / "token_ids.npy", ids)
    shape = [int(s) for s in table.shape]
    del table
    table_path.unlink()
    return {"path": "text_encoder/token_rows.npy", "ids": "text_encoder/token_ids.npy", "shape": shape,
            "dtype": "float32", "fill": fill, "stored_rows": int(len(ids))}


def read_vocabulary(path: Path, vocab: int) -> list[int]:
    """The token ids a source declares it was trained on (``text_encoder/zo_edge_vocabulary.json``:
    ``{"ids": [...]}``), for the bundle's ``token_embedding.vocabulary_ids`` (docs/bundle.md)."""
    try:
        ids = json.loads(path.read_text(encoding="utf-8")).get("ids")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    problem = vocabulary_problem(ids, vocab)
    if problem:
        raise UserError(f"{path}: 'ids' {problem}")
    return sorted(ids)


def _build(info: SourceInfo, tmp: Path, weights: str, te_fp32: bool, n_calib: int, provider: str, fuse: bool,
           per_channel: bool, n_held: int, per_band: int, seed: int, export_dir, st: Stages,
           data: CalibrationData, target: str = "cpu", batch: int | None = None) -> dict:
    from zo_edge import __version__

    from .calibrate import load_tokenizer, make_inputs, tokenize

    bundle = tmp / "bundle"
    bundle.mkdir()
    # -- export
    if export_dir is None:
        opset = None if target == "cpu" else PORTABLE_OPSET
        exported = st.run("export", f"optimum main_export(task=text-to-image{f', opset={opset}' if opset else ''})",
                          export_onnx, info.path, tmp / "export", opset)
    else:
        exported = {g: Path(export_dir) / g / "model.onnx" for g in GRAPHS}
        st.say(f"[export] reusing {export_dir}")

    # -- rewrite: text encoder takes inputs_embeds; the token table goes to a .npy
    te_fp32_path = tmp / "fp32" / "text_encoder" / "model.onnx"
    table_path = bundle / "text_encoder" / "token_embedding.npy"
    tokenizer = load_tokenizer(info.path / "tokenizer")

    def rewrite():
        res = rewrite_text_encoder(exported["text_encoder"], te_fp32_path, table_path,
                                   vocab_size=int(info.text_encoder.get("vocab_size", 0)) or None)
        table = np.load(table_path, mmap_mode="r")
        ids = tokenize(tokenizer, list(PARITY_PROMPTS), info.max_length)
        diff = check_parity(exported["text_encoder"], te_fp32_path, table, ids)
        if not diff <= PARITY_TOL:
            raise RuntimeError(f"text encoder surgery changed the output: max abs diff {diff:.3g} > {PARITY_TOL}")
        return res, diff
    surgery, parity = st.run("rewrite", "text encoder: token lookup -> inputs_embeds", rewrite)
    st.say(f"[rewrite] dropped {surgery.table_name} {surgery.vocab_size}x{surgery.dim}; "
           f"input_ids kept: {surgery.kept_input_ids}; parity max abs diff {parity:.2e}")
    table = np.load(table_path, mmap_mode="r")
    reference = {"text_encoder": te_fp32_path, "unet": exported["unet"],
                 "vae_encoder": exported["vae_encoder"], "vae_decoder": exported["vae_decoder"]}

    # -- portable: standard ops, finite masks, fixed shapes (every target but cpu)
    sources = dict(reference)  # the FP32 graphs quantization starts from
    target_info: dict = {"name": target}
    graph_batch = {g: (batch if g in ("text_encoder", "unet") else 1) if batch else None for g in GRAPHS}
    if target != "cpu":
        from .portable import MASK_VALUE, fixed_shapes, make_portable

        def portable():
            done = {}
            for g in GRAPHS:
                dst = tmp / "portable" / g / "model.onnx"
                done[g] = make_portable(reference[g], dst, fixed_shapes(g, info, batch) if batch else None)
                sources[g] = dst
            return done
        steps = st.run("portable", "standard ONNX ops, finite masks" + (f", fixed shapes (batch {batch})" if batch else ""),
                       portable)
        target_info.update({"opset": PORTABLE_OPSET, "standard_ops_only": True, "mask_value": MASK_VALUE,
                            "finite_masks": {g: d["finite_masks"] for g, d in steps.items()},
                            "fixed_shapes": bool(batch), "batch": batch})
        st.say(f"[portable] masks made finite: {target_info['finite_masks']}")

    # -- optimize: CPU-safe fusions on the UNet
    unet_src = sources["unet"]
    fusion_counts: dict = {}
    if fuse:
        from .optimize import fuse_unet
        fused = tmp / "fused" / "unet" / "model.onnx"

        fusion_counts = st.run("optimize", "UNet fusions (CPU kernels only)", fuse_unet, exported["unet"], fused,
                               weights != "fp32")
        st.say(f"[optimize] fused ops: {fusion_counts}")
        unet_src = fused
    else:
        st.say("[optimize] skipped (--no-fuse)")

    # -- calibrate + quantize
    recipes: dict[str, dict] = {}
    precision: dict[str, str] = {}
    if weights not in FLOAT_WEIGHTS:
        if weights in WEIGHT_ONLY_BITS:
            calib = None
            st.say("[calibrate] skipped (weight-only: activations stay float)")
        else:
            calib = st.run("calibrate", f"{n_calib} samples per graph from the model's own data", make_inputs,
                           info, reference, table, tokenizer, data, n_calib, seed, False)
            st.say(f"[calibrate] UNet timesteps {sorted(calib.unet_timesteps)}")

        def quantize():
            q = tmp / "q"
            q.mkdir(exist_ok=True)
            dst = {g: bundle / g / "model.onnx" for g in GRAPHS}
            for g in GRAPHS:
                dst[g].parent.mkdir(parents=True, exist_ok=True)
            if weights in WEIGHT_ONLY_BITS:   # int4w: the UNet at 4 bits, the other graphs as int8w
                for g in GRAPHS:
                    if g == "text_encoder" and te_fp32:
                        copy_graph(sources[g], dst[g])
                        precision[g] = "fp32"
                        continue
                    src_g = unet_src if g == "unet" else sources[g]
                    bits = WEIGHT_ONLY_BITS[weights] if g == "unet" else 8
                    recipes[g] = quantize_weight_only(src_g, dst[g], bits=bits)
                    precision[g] = "int4w" if bits == 4 else "int8w"
                return
            if target == "qnn":
                from .portable import batch_feeds, personalization_calibration, quantize_qnn
                feeds, ranges = personalization_calibration(calib.feeds, reference["text_encoder"], table, seed)
                for g in GRAPHS:
                    recipes[g] = quantize_qnn(sources[g], dst[g], batch_feeds(feeds[g], graph_batch[g]), weights,
                                              ranges if g == "text_encoder" else None)
                    precision[g] = weights
                return
            feeds = {g: batch_feeds_if(calib.feeds[g], graph_batch[g]) for g in GRAPHS}
            if te_fp32:
                copy_graph(sources["text_encoder"], dst["text_encoder"])
                precision["text_encoder"] = "fp32"
            else:
                recipes["text_encoder"] = quantize_int8(sources["text_encoder"], dst["text_encoder"],
                                                        feeds["text_encoder"], per_channel=per_channel)
                precision["text_encoder"] = "int8"
            for g in ("vae_encoder", "vae_decoder"):
                recipes[g] = quantize_int8(sources[g], dst[g], feeds[g], per_channel=per_channel)
                precision[g] = "int8"
            if weights == "int8":
                recipes["unet"] = quantize_int8(unet_src, dst["unet"], feeds["unet"], per_channel=per_channel)
                precision["unet"] = "int8"
            else:
                conv8 = q / "unet_conv8" / "model.onnx"
                conv8.parent.mkdir(parents=True)
                r8 = quantize_int8(unet_src, conv8, feeds["unet"], op_types=("Conv", "Gemm"),
                                   per_channel=per_channel)
                r4 = quantize_int4(conv8, dst["unet"])
                recipes["unet"] = {"matmul": r4, "conv_gemm": r8}
                precision["unet"] = "int4"
        st.run("quantize", f"weights {weights}", quantize)
    else:
        st.say(f"[calibrate] skipped (weights {weights})")

        def copy_float():
            for g in GRAPHS:
                copy_graph(unet_src if g == "unet" else sources[g], bundle / g / "model.onnx")
                precision[g] = weights
        st.run("quantize", f"weights {weights}: graphs copied unchanged"
               + (" (stored FP32; HTP computes them in FP16)" if weights == "fp16" else ""), copy_float)

    if target != "cpu":  # the promise of the portable targets, checked on what is shipped
        from .portable import nonstandard_ops
        for g in GRAPHS:
            odd = nonstandard_ops(onnx.load(str(bundle / g / "model.onnx"), load_external_data=False))
            if odd:
                raise RuntimeError(f"--target {target}: the {g} graph ended up with non-standard ops {odd}")

    # -- verify: every graph loads; accuracy vs the FP32 export on held-out inputs
    changed = {g: precision[g] != "fp32" or (g == "unet" and fuse) or target != "cpu" for g in GRAPHS}

    def verify():
        held = make_inputs(info, reference, table, tokenizer, data, n_held, seed + 1000, True, per_band)
        for g in GRAPHS:
            held.feeds[g] = batch_feeds_if(held.feeds[g], graph_batch[g])
        report = {}
        for g in GRAPHS:
            if changed[g]:
                report[g] = acc_mod.graph_accuracy(g, reference[g], bundle / g / "model.onnx", held,
                                                   info.num_train_timesteps)
            else:
                session(bundle / g / "model.onnx")  # it must load
                report[g] = {"output": acc_mod.MAIN_OUTPUT[g], "cosine": 1.0, "rel_l2": 0.0, "identical": True}
        return report
    accuracy = st.run("verify", "held-out accuracy vs the FP32 export", verify)
    for line in acc_mod.format_accuracy(accuracy):
        st.say(f"[verify] {line.strip()}")

    # -- finalize: tokenizer, scheduler, manifest
    def finalize():
        token_entry = {"path": "text_encoder/token_embedding.npy", "shape": [int(s) for s in table.shape],
                       "dtype": "float32"}
        fill_spec = info.path / "text_encoder" / TOKEN_FILL_FILE
        if fill_spec.exists():
            token_entry = trim_token_table(bundle, table_path, fill_spec)
            st.say(f"[finalize] token table trimmed to its {token_entry['stored_rows']} trained rows; the others "
                   f"regenerate from {token_entry['fill']}")
        vocab_spec = info.path / "text_encoder" / VOCABULARY_FILE
        if vocab_spec.exists():
            token_entry["vocabulary_ids"] = read_vocabulary(vocab_spec, int(token_entry["shape"][0]))
        shutil.copytree(info.path / "tokenizer", bundle / "tokenizer")
        (bundle / "scheduler").mkdir()
        shutil.copyfile(info.path / "scheduler" / "scheduler_config.json", bundle / "scheduler" / "scheduler_config.json")
        graphs = {}
        for g in GRAPHS:
            extra = {}
            if g == "unet":
                extra["fused"] = fuse
                if fusion_counts:
                    extra["fusions"] = fusion_counts
            graphs[g] = graph_entry(bundle, g, precision[g], extra)
        quant = {"weights": weights, "text_encoder_fp32": te_fp32, "fuse": fuse, "provider": provider,
                 "per_channel": per_channel,
                 "calibration": None if weights in (*FLOAT_WEIGHTS, *WEIGHT_ONLY_BITS) else {
                     "samples": n_calib, "seed": seed,
                     "text_encoder": data.description["text_encoder"],
                     "vae_encoder": data.description["vae_encoder"],
                     "vae_decoder": "latents sampled from the FP32 VAE encoder on those renders",
                     "unet": "noised scaled latents; timesteps over the whole schedule + 500-900",
                     "unet_timesteps": sorted(int(t) for t in calib.unet_timesteps)},
                 "graphs": recipes}
        manifest = {
            "format": BUNDLE_FORMAT, "format_version": FORMAT_VERSION, "created_by": f"zo-edge {__version__}",
            "family": info.family,
            "source": {"path": str(info.path), "pipeline_class": info.pipeline_class or "StableDiffusionPipeline"},
            "resolution": info.resolution, "vae_scale_factor": info.vae_scale_factor,
            "vae_scaling_factor": info.vae_scaling_factor, "latent_channels": info.latent_channels,
            "embedding_dim": info.embedding_dim, "max_length": info.max_length,
            "prediction_type": info.prediction_type, "noise_schedule": info.noise_schedule,
            "graphs": graphs,
            "token_embedding": token_entry,
            "text_encoder_surgery": {"removed_initializer": surgery.table_name,
                                     "input_ids_kept": surgery.kept_input_ids, "parity_max_abs_diff": parity},
            "tokenizer": "tokenizer", "scheduler_config": "scheduler/scheduler_config.json",
            "quantization": quant, "accuracy": accuracy, "target": target_info,
            "build": {"seconds": None, "stages": st.records},
        }
        return manifest
    manifest = st.run("finalize", "tokenizer, scheduler, manifest", finalize)
    manifest["build"]["seconds"] = st.total
    return write_manifest(bundle, manifest)
