"""Bundle targets beyond onnxruntime's CPU provider: ``portable`` and ``qnn`` (docs/bundle.md).

``cpu`` (the default) is what convert always made: onnxruntime.transformers fusions into
com.microsoft kernels (SkipLayerNormalization, MultiHeadAttention, ...) and dynamic shapes. Those
graphs run on onnxruntime's CPU provider only: onnxruntime-openvino refuses the fused ops, and
Qualcomm's HTP needs static shapes and activation-quantized QDQ.

``portable``: standard ONNX ops only (no com.microsoft domain anywhere), exported at opset 20 so
that GELU is the ONNX ``Gelu`` op (an Erf-based GELU leaves ``Erf`` nodes that HTP cannot run),
attention masks filled with a finite value (:data:`MASK_VALUE`; the text encoder's causal mask is
float32's lowest value in the export, which wrecks activation calibration), and, on request, fixed
shapes (:func:`fixed_shapes`). The graphs for OpenVINO, DirectML and other providers.

``qnn``: portable graphs with fixed shapes, quantized A16W8 (uint16 activations, uint8 weights,
static QDQ) with onnxruntime's QNN helpers (``qnn_preprocess_model`` then
``get_qnn_qdq_config`` + ``quantize``), calibrated on the model's own data (calibrate.py). Measured
on the shapes model (docs/results/zo_signal.json): A16W8 keeps the zeroth-order signal at a larger
smoothing radius; 8-bit activations (``a8w8``) do not. ``--weights fp16``: the same fixed-shape graphs left
float, for the HTP's half-precision mode (no calibration; the graphs are stored FP32 and HTP computes them
in FP16).
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
from onnx import numpy_helper

from zo_runtime.errors import UserError

from .graphs import save_model

TARGETS = ("cpu", "portable", "qnn")
PORTABLE_OPSET = 20           # ONNX Gelu
QDQ16_OPSET = 21              # 16-bit QuantizeLinear / DequantizeLinear in the standard domain
MASK_VALUE = -100.0           # softmax(-100) ~ 4e-44: FP32 parity, and a range a 16-bit activation can hold
HUGE = 1e30                   # a float constant at or below -HUGE is a mask fill
# weights each target accepts, the first being its default
TARGET_WEIGHTS = {"cpu": ("int8", "int8w", "int4w", "int4", "fp32"), "portable": ("int8w", "fp32", "int8"),
                  "qnn": ("a16w8", "a8w8", "fp16")}
# weights that leave the graphs float (copied as exported); fp16: the qnn target's float graphs, which HTP runs
# in half precision (zo_runtime.providers turns that on from the manifest)
FLOAT_WEIGHTS = ("fp32", "fp16")
QNN_TYPES = {"a16w8": ("QUInt16", "QUInt8"), "a8w8": ("QUInt8", "QUInt8")}


def finite_masks(model: onnx.ModelProto, value: float = MASK_VALUE) -> int:
    """Replace float constants at or below -HUGE (float32's lowest, -inf) by ``value``, in Constant and
    ConstantOfShape nodes and in initializers. In place; returns how many tensors changed."""
    def fix(t: onnx.TensorProto) -> bool:
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            return False
        if int(np.prod(t.dims, dtype=np.int64)) > 1 << 20:  # weights, not masks
            return False
        a = numpy_helper.to_array(t)
        hit = a <= -HUGE
        if not hit.any():
            return False
        a = a.copy()
        a[hit] = value
        t.CopyFrom(numpy_helper.from_array(a.astype(a.dtype), t.name))
        return True

    n = 0
    for node in model.graph.node:
        for att in node.attribute:
            if att.type == onnx.AttributeProto.TENSOR and node.op_type in ("Constant", "ConstantOfShape"):
                n += fix(att.t)
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            n += fix(t)
    return n


def nonstandard_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes outside the ONNX standard domain: {"domain:op": count}."""
    out: dict[str, int] = {}
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            key = f"{n.domain}:{n.op_type}"
            out[key] = out.get(key, 0) + 1
    return out


def opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def fixed_shapes(graph: str, info, batch: int) -> dict[str, list[int]]:
    """The input shapes a fixed-shape graph gets: ``batch`` for the text encoder and the UNet (1, or
    n + 1 to evaluate personalize's candidates in one call), 1 for the VAE graphs; the model's
    resolution and the tokenizer's length."""
    res, f, C, L = info.resolution, info.vae_scale_factor, info.latent_channels, info.max_length
    D = info.embedding_dim
    h = res // f
    return {"text_encoder": {"inputs_embeds": [batch, L, D], "input_ids": [batch, L]},
            "unet": {"sample": [batch, C, h, h], "encoder_hidden_states": [batch, L, D]},
            "vae_encoder": {"sample": [1, 3, res, res]},
            "vae_decoder": {"latent_sample": [1, C, h, h]}}[graph]


def make_portable(src: Path, dst: Path, shapes: dict[str, list[int]] | None) -> dict:
    """The portable form of one exported graph: finite masks, shapes fixed when ``shapes`` is given,
    no metadata. Refuses graphs below opset 20 or with non-standard ops. Returns what was done."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    model = onnx.load(str(src))
    if opset(model) < PORTABLE_OPSET:
        raise UserError(f"{src} is at opset {opset(model)}; the portable targets need opset >= {PORTABLE_OPSET} "
                        "(ONNX Gelu): export again (convert exports at opset 20 for --target portable/qnn)")
    odd = nonstandard_ops(model)
    if odd:
        raise UserError(f"{src} has non-standard ops {odd}; the portable targets take standard ONNX ops only")
    masks = finite_masks(model)
    if shapes:
        names = {v.name for v in model.graph.input}
        for name, shape in shapes.items():
            if name in names:
                make_input_shape_fixed(model.graph, name, list(shape))
        fix_output_shapes(model)
    del model.metadata_props[:]  # qnn_preprocess_model chokes on them (TypeError)
    save_model(model, dst)
    if shapes:  # fold the shape arithmetic (Shape -> Gather -> Concat -> Reshape / Resize) into constants
        fold_constants(dst)
    return {"finite_masks": masks, "fixed_shapes": bool(shapes)}


def fold_constants(path: Path) -> None:
    """onnxruntime's basic graph optimizations (constant folding, redundant-node elimination: standard
    ops only), written back over ``path``. With fixed input shapes every shape computation folds."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory(dir=path.parent) as td:
        out = Path(td) / "folded.onnx"
        so.optimized_model_filepath = str(out)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        m = onnx.load(str(out))
    odd = nonstandard_ops(m)
    if odd:  # basic level is not supposed to fuse; refuse rather than ship a non-portable graph
        raise RuntimeError(f"constant folding introduced non-standard ops {odd}")
    del m.metadata_props[:]
    save_model(m, path)


def all_static(path: Path) -> bool:
    m = onnx.load(str(path), load_external_data=False)
    return all(d.HasField("dim_value") for v in list(m.graph.input) + list(m.graph.output)
               for d in v.type.tensor_type.shape.dim)


def quantize_qnn(src: Path, dst: Path, calib: list[dict], weights: str = "a16w8",
                 ranges: dict[str, tuple[float, float]] | None = None) -> dict:
    """Static QDQ for Qualcomm's HTP through onnxruntime's QNN helpers: ``qnn_preprocess_model``,
    then ``get_qnn_qdq_config`` (activation / weight types from ``weights``) and ``quantize``,
    calibrated (MinMax) on ``calib``; ``ranges``: fixed (min, max) for named tensors (graph inputs), in
    place of the calibrated ones. Returns the recipe for the manifest."""
    from onnxruntime.quantization import CalibrationMethod, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    from .calibrate import FeedsReader

    if not calib:
        raise UserError("calibration needs at least one sample (--calibration-samples >= 1)")
    act, wt = QNN_TYPES[weights]
    work = Path(tempfile.mkdtemp(prefix="zo-qnn-", dir=dst.parent))
    try:
        pre = work / "pre.onnx"
        changed = qnn_preprocess_model(str(src), str(pre))
        model_in = pre if changed else src
        m = onnx.load(str(model_in))
        if opset(m) < QDQ16_OPSET:  # 16-bit QuantizeLinear is standard from opset 21 (else com.microsoft Q/DQ)
            m = onnx.version_converter.convert_version(m, QDQ16_OPSET)
            model_in = work / "opset21.onnx"
            save_model(m, model_in)
        del m
        logging.disable(logging.WARNING)
        try:
            overrides = {k: [{"rmin": np.array(lo, np.float32), "rmax": np.array(hi, np.float32)}] for k, (lo, hi) in (ranges or {}).items()}
            cfg = get_qnn_qdq_config(str(model_in), FeedsReader(calib), calibrate_method=CalibrationMethod.MinMax,
                                     activation_type=getattr(QuantType, act), weight_type=getattr(QuantType, wt),
                                     init_overrides=overrides or None)
            quantize(str(model_in), str(dst), cfg)
        finally:
            logging.disable(logging.NOTSET)
        m = onnx.load(str(dst))
        del m.metadata_props[:]
        save_model(m, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"method": "static QDQ (onnxruntime QNN helpers)", "activation_type": act, "weight_type": wt,
            "calibrate_method": "MinMax", "calibration_samples": len(calib), "qnn_preprocess": bool(changed),
            "fixed_ranges": {k: [float(lo), float(hi)] for k, (lo, hi) in (ranges or {}).items()}}


# Personalization feeds the text encoder rows no prompt has: a token that training moves (Adam at lr 2e-2
# moves each coordinate by about that much a step) and its RGE perturbations. Activations calibrated on real
# prompts only would clip such a token at its first layer and along the residual stream, and the loss would go
# flat in θ. So the text encoder is also calibrated with a placeholder row of these multiples of the median row
# norm, the UNet with the states they give, and the ``inputs_embeds`` range is fixed at EMBEDS_RANGE x the
# table's largest coordinate.
PLACEHOLDER_NORMS = (1.0, 4.0, 16.0)
EMBEDS_RANGE = 8.0


def personalization_calibration(feeds: dict[str, list[dict]], te_fp32: Path, table: np.ndarray,
                                seed: int = 0) -> tuple[dict[str, list[dict]], dict[str, tuple[float, float]]]:
    """Calibration feeds with placeholder samples added (see PLACEHOLDER_NORMS), and the fixed
    ``inputs_embeds`` range. ``feeds``: graph -> list of batch-1 feeds (calibrate.make_inputs)."""
    from .graphs import session

    rng = np.random.default_rng(seed + 4242)
    te = session(te_fp32)
    norm = float(np.median(np.linalg.norm(np.asarray(table[:4096], np.float32), axis=-1)))
    extra_te, states = [], []
    for k, scale in enumerate(PLACEHOLDER_NORMS):
        base = feeds["text_encoder"][(k + 1) % len(feeds["text_encoder"])]
        f = {name: np.array(v) for name, v in base.items()}
        v = rng.standard_normal(f["inputs_embeds"].shape[-1]).astype(np.float32)
        f["inputs_embeds"][0, 1 + k % 4] = v / np.linalg.norm(v) * norm * scale
        extra_te.append(f)
        states.append(te.run(["last_hidden_state"], f)[0].astype(np.float32))
    extra_unet = []
    for k, st in enumerate(states):
        u = dict(feeds["unet"][k % len(feeds["unet"])])
        u["encoder_hidden_states"] = st
        extra_unet.append(u)
    out = dict(feeds)
    out["text_encoder"] = list(feeds["text_encoder"]) + extra_te
    out["unet"] = list(feeds["unet"]) + extra_unet
    r = EMBEDS_RANGE * float(np.abs(np.asarray(table)).max())
    return out, {"inputs_embeds": (-r, r)}


def batch_feeds(feeds: list[dict], batch: int) -> list[dict]:
    """Calibration / held-out feeds (batch 1) tiled to a fixed batch (scalar inputs unchanged): the
    ranges a calibrator sees are those of batch 1."""
    if batch == 1:
        return feeds
    return [{k: (np.concatenate([v] * batch) if np.ndim(v) > 0 else v) for k, v in f.items()} for f in feeds]
