"""Weight quantization recipes for the bundle graphs (ONNX Runtime quantization tools).

``int8`` (default): static QDQ (``quantize_static``), calibrated on the model's own data (see
calibrate.py): QUInt8 activations, QInt8 weights with ``reduce_range`` (7-bit), MinMax ranges,
per-tensor (``per_channel`` optional). ``reduce_range`` matters: on AVX2 CPUs without VNNI,
ONNX Runtime's u8s8 kernels (vpmaddubsw) saturate int16 partial sums; measured on the tiny UNet,
full-range weights gave rel-L2 0.31 against FP32 while the same QDQ graph run unfused (pure
fake-quant) gave 0.066; reduce_range gave 0.083 and ran as fast (U8U8 was as accurate but ran at
FP32 speed in a 320-channel micro-benchmark).
Only Conv / MatMul / Gemm *with a constant weight* are quantized; activation x activation MatMuls
(attention QK^T and attn.V) and every normalization are listed in ``nodes_to_exclude`` and stay
float. Applies to the UNet, both VAE graphs and the text encoder
(unless ``text_encoder_fp32``).

``int4``: the UNet's constant-weight MatMuls become 4-bit weight-only ``MatMulNBits`` (block 32,
symmetric, accuracy_level 4 = int8 compute on CPU); the UNet's Conv and Gemm get the INT8 static
QDQ recipe above, since ``MatMulNBits`` covers MatMul only and FP32 convolutions would leave most
of the UNet's bytes untouched. Text encoder and VAEs as in ``int8``.

``int8w``: weight-only INT8 on every graph (``quantize_weight_only_int8``): int8 per-channel weights
behind DequantizeLinear, float activations. The recipe for personalization: static QDQ's
activation rounding drowns the zeroth-order signal (see that function's doc).

``fp32``: nothing.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from zo_runtime.errors import UserError

from .calibrate import FeedsReader
from .graphs import WEIGHT_ONLY_KEY, copy_graph, needs_external_data, prune, save_model

WEIGHT_OPS = ("Conv", "MatMul", "Gemm")
NORM_OPS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization", "SkipLayerNormalization",
            "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "GroupNorm", "SkipGroupNorm",
            "BatchNormalization", "ReduceMean", "Softmax")
WEIGHTS = ("int8", "int8w", "int4", "fp32")
WEIGHT_TYPE = "QInt8"
REDUCE_RANGE = True  # 7-bit weights: AVX2 u8s8 (vpmaddubsw) saturates otherwise; see module doc
INT4_BLOCK = 32
INT4_ACCURACY_LEVEL = 4


def _constant_names(model: onnx.ModelProto) -> set[str]:
    names = {t.name for t in model.graph.initializer}
    changed = True
    prod = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type == "Constant":
            names.update(n.output)
    while changed:  # Identity / Transpose / Cast / DequantizeLinear of a constant is constant
        changed = False
        for o, n in prod.items():
            if o not in names and n.op_type in ("Identity", "Transpose", "Cast", "DequantizeLinear", "Reshape") \
                    and n.input and all(i in names for i in n.input if i):
                names.add(o)
                changed = True
    return names


def exclusions(model: onnx.ModelProto) -> tuple[list[str], dict]:
    """Node names to keep float: activation x activation MatMuls and normalization nodes.
    Also names every unnamed node (quantize_static needs names to exclude)."""
    const = _constant_names(model)
    seen: set[str] = set()
    for k, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_zo_{k}"
        seen.add(n.name)
    act_mm, norms = [], []
    for n in model.graph.node:
        if n.op_type == "MatMul" and not any(i in const for i in n.input[:2]):
            act_mm.append(n.name)
        elif n.op_type in NORM_OPS:
            norms.append(n.name)
    return act_mm + norms, {"activation_matmuls": len(act_mm), "normalization": len(norms)}


def restore_io(model: onnx.ModelProto, src: Path) -> None:
    """Put back the source graph's input/output types: symbolic shape inference rewrites output dims
    into expressions like ``floor(2.0*latent_height)``. In place."""
    orig = onnx.load(str(src), load_external_data=False)
    by_name = {v.name: v for v in list(orig.graph.input) + list(orig.graph.output)}
    for v in list(model.graph.input) + list(model.graph.output):
        if v.name in by_name:
            v.type.CopyFrom(by_name[v.name].type)


def weight_nodes(model: onnx.ModelProto, op_types=WEIGHT_OPS) -> int:
    const = _constant_names(model)
    return sum(1 for n in model.graph.node if n.op_type in op_types and len(n.input) > 1 and n.input[1] in const)


def preprocess(src: Path, dst: Path) -> str:
    """``quant_pre_process`` (symbolic shape inference + basic ORT optimization + ONNX shape
    inference). Graphs over 2 GB skip the ORT optimization step (it cannot write them back).
    Returns what ran: "full", "shapes-only" or "skipped" (on failure, the input is used as is)."""
    from onnxruntime.quantization import quant_pre_process
    m = onnx.load(str(src), load_external_data=False)
    big = any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    del m
    logging.disable(logging.ERROR)
    try:
        quant_pre_process(str(src), str(dst), skip_optimization=big, auto_merge=True,
                          save_as_external_data=big, all_tensors_to_one_file=True,
                          external_data_location=dst.name + "_data" if big else None)
        return "shapes-only" if big else "full"
    except Exception:  # noqa: BLE001 - pre-processing is an optimization; fall back to the raw graph
        copy_graph(src, dst)
        return "skipped"
    finally:
        logging.disable(logging.NOTSET)


def quantize_int8(src: Path, dst: Path, calib: list[dict], op_types=WEIGHT_OPS, per_channel: bool = False,
                  extra_exclude: list[str] | None = None, weight_type: str = WEIGHT_TYPE,
                  reduce_range: bool = REDUCE_RANGE) -> dict:
    """Static QDQ INT8 of ``src`` into ``dst``; returns the recipe details for the manifest."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    if not calib:
        raise UserError("calibration needs at least one sample (--calibration-samples >= 1)")
    work = Path(tempfile.mkdtemp(prefix="zo-quant-", dir=dst.parent))
    try:
        pre = work / "pre.onnx"
        pre_mode = preprocess(src, pre)
        model = onnx.load(str(pre))
        restore_io(model, src)
        exclude, counts = exclusions(model)
        exclude += list(extra_exclude or [])
        n_weight = weight_nodes(model, op_types)
        big = needs_external_data(model)
        named = work / "named.onnx"
        save_model(model, named, external=big)
        del model
        logging.disable(logging.WARNING)
        try:
            quantize_static(
                model_input=str(named), model_output=str(dst), calibration_data_reader=FeedsReader(calib),
                quant_format=QuantFormat.QDQ, op_types_to_quantize=list(op_types), per_channel=per_channel,
                reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=getattr(QuantType, weight_type),
                nodes_to_exclude=exclude, use_external_data_format=big, calibrate_method=CalibrationMethod.MinMax,
                extra_options={"MatMulConstBOnly": True,
                               "CalibTensorRangeSymmetric": False, "ActivationSymmetric": False,
                               "WeightSymmetric": True})
        finally:
            logging.disable(logging.NOTSET)
        if big:  # quantize_static names the data file after the model: make it model.onnx_data
            m = onnx.load(str(dst))
            for f in dst.parent.glob(dst.name + "*.data"):
                f.unlink()
            save_model(m, dst, external=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"method": "static QDQ", "op_types": list(op_types), "activation_type": "QUInt8",
            "weight_type": weight_type, "per_channel": per_channel, "reduce_range": reduce_range, "calibrate_method": "MinMax",
            "calibration_samples": len(calib), "pre_process": pre_mode, "weight_nodes": n_weight,
            "excluded": counts}


def quantize_int4(src: Path, dst: Path, block_size: int = INT4_BLOCK, accuracy_level: int = INT4_ACCURACY_LEVEL) -> dict:
    """4-bit weight-only MatMulNBits for every MatMul with a constant 2-D weight."""
    try:
        from onnxruntime.quantization import QuantFormat
        from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                     MatMulNBitsQuantizer)
    except ImportError as e:
        raise UserError(f"--weights int4 needs the onnx-ir package (pip install onnx-ir): {e}") from None
    model = onnx.load(str(src))
    exclude, _ = exclusions(model)
    n_mm = weight_nodes(model, ("MatMul",))
    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
                                       quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",), bits=4)
    logging.disable(logging.WARNING)
    try:
        q = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True,
                                 accuracy_level=accuracy_level, nodes_to_exclude=exclude,
                                 op_types_to_quantize=("MatMul",), algo_config=cfg)
        q.process()
    finally:
        logging.disable(logging.NOTSET)
    out = q.model.model
    prune(out)
    n_nbits = sum(1 for n in out.graph.node if n.op_type == "MatMulNBits")
    save_model(out, dst)
    return {"method": "MatMulNBits weight-only", "bits": 4, "block_size": block_size, "symmetric": True,
            "accuracy_level": accuracy_level, "matmuls": n_mm, "matmul_nbits": n_nbits}


# ops whose weight input (index 1) is a constant matrix / kernel, and the axis of its output channels
_WEIGHT_AXIS = {"Conv": lambda n, w: 0, "ConvTranspose": lambda n, w: 1,
                "MatMul": lambda n, w: w.ndim - 1, "Attention": lambda n, w: w.ndim - 1,
                "Gemm": lambda n, w: 0 if any(a.name == "transB" and a.i for a in n.attribute) else 1}


def quantize_weight_only_int8(src: Path, dst: Path, min_size: int = 1024) -> dict:
    """Weight-only INT8: every constant weight of Conv / MatMul / Gemm / Attention is stored as int8
    with a symmetric per-output-channel scale and a DequantizeLinear in front; activations stay
    float. ORT keeps the DequantizeLinear nodes (it does not constant-fold QDQ), so weights sit in
    memory as int8 and are widened layer by layer at run time.

    Why this exists: static QDQ rounds activations to 256 levels, which makes the loss a step
    function of the token embedding; zeroth-order differences with μ = 1e-3 then measure rounding,
    not the gradient (benchmarks/bench_zo_signal.py). Weight-only keeps the loss smooth in θ, as in
    the paper (optimum-quanto qint8 weights, float activations)."""
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    users: dict[str, list] = {}
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            users.setdefault(name, []).append((n, i))
    done, new_nodes, q_bytes, f_bytes = {}, [], 0, 0
    for n in model.graph.node:
        axis_of = _WEIGHT_AXIS.get(n.op_type)
        if axis_of is None or len(n.input) < 2 or n.input[1] not in inits:
            continue
        name = n.input[1]
        t = inits[name]
        if t.data_type != onnx.TensorProto.FLOAT or len(t.dims) < 2 or int(np.prod(t.dims)) < min_size:
            continue
        if name not in done:
            w = numpy_helper.to_array(t)
            axis = axis_of(n, w)
            red = tuple(i for i in range(w.ndim) if i != axis)
            scale = np.abs(w).max(axis=red) / 127.0
            scale[scale == 0] = 1.0
            shape = [1] * w.ndim
            shape[axis] = -1
            wq = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
            qn, sn, zn, out = name + "_w8", name + "_w8_scale", name + "_w8_zp", name + "_w8_dq"
            model.graph.initializer.extend([numpy_helper.from_array(wq, qn),
                                            numpy_helper.from_array(scale.astype(np.float32), sn),
                                            numpy_helper.from_array(np.zeros(scale.shape, np.int8), zn)])
            new_nodes.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [out], name=name + "_w8_DQ", axis=axis))
            done[name] = out
            q_bytes += wq.nbytes + scale.nbytes
            f_bytes += w.nbytes
        n.input[1] = done[name]
    # drop the float originals nobody reads any more
    still = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in still or t.name.endswith(("_w8", "_w8_scale", "_w8_zp"))]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    # DequantizeLinear nodes first, so the graph stays topologically sorted
    nodes = new_nodes + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, WEIGHT_ONLY_KEY: "1"})
    if not any(o.domain in ("", "ai.onnx") and o.version >= 13 for o in model.opset_import):
        raise UserError(f"{src}: weight-only INT8 needs opset >= 13 (per-axis DequantizeLinear)")
    save_model(model, dst, external=needs_external_data(model))
    return {"method": "weight-only", "weight_type": "QInt8", "symmetric": True, "per_channel": True,
            "activations": "float32", "weights_quantized": len(done),
            "weight_bytes_fp32": int(f_bytes), "weight_bytes_int8": int(q_bytes)}
