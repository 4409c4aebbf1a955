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

``int8w``: weight-only INT8 on every graph (``quantize_weight_only``): int8 per-channel weights
behind DequantizeLinear, float activations. The recipe for personalization: static QDQ's
activation rounding drowns the zeroth-order signal (see that function's doc).

``int4w``: weight-only on every graph, the UNet's weights 4-bit in blocks of 32 inputs (text encoder and
VAEs as ``int8w``): the personalization recipe at about half the UNet's memory.

``fp32``: nothing.
"""
from __future__ import annotations

import inspect
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from zo_runtime.errors import UserError

from .calibrate import FeedsReader
from .graphs import (WEIGHT_ONLY_KEY, copy_graph, has_external_refs, load_lazy, maps_weights, needs_external_data,
                     prune, save_model, tensor_array, working_directory)

WEIGHT_OPS = ("Conv", "MatMul", "Gemm")
NORM_OPS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization", "SkipLayerNormalization",
            "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "GroupNorm", "SkipGroupNorm",
            "BatchNormalization", "ReduceMean", "Softmax")
WEIGHTS = ("int8", "int8w", "int4w", "int4", "fp32")
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
    inference). Graphs with external data (over 2 GB) get the two shape inferences only, on the graph
    with its weights left on disk (the ORT optimization cannot write them back, and loading them
    whole cost 10 GB at SD1.5 size). Returns what ran: "full", "shapes-only" or "skipped" (on
    failure, the input is used as is)."""
    from onnxruntime.quantization import quant_pre_process
    src = Path(src).absolute()
    big = has_external_refs(load_lazy(src))
    logging.disable(logging.ERROR)
    try:
        if big:
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
            with working_directory(src.parent):  # the tools read external data from there
                m = SymbolicShapeInference.infer_shapes(load_lazy(src), 2**31 - 1, True, False, 0)
                m = onnx.shape_inference.infer_shapes(m)
            onnx.helper.set_model_props(m, {**{p.key: p.value for p in m.metadata_props},
                                            "onnx.quant.pre_process": "onnxruntime.quant"})
            save_model(m, dst, base_dir=src.parent)
            return "shapes-only"
        quant_pre_process(str(src), str(dst), auto_merge=True)
        return "full"
    except Exception:  # noqa: BLE001 - pre-processing is an optimization; fall back to the raw graph
        copy_graph(src, dst)
        return "skipped"
    finally:
        logging.disable(logging.NOTSET)


def minmax_ranges(model_path: Path, calib: list[dict], op_types=WEIGHT_OPS) -> dict:
    """Activation ranges as onnxruntime's ``MinMaxCalibrater`` computes them for ``quantize_static``
    (the float inputs and outputs of every ``op_types`` node after ONNX shape inference; the min of
    the per-sample minima and the max of the maxima, NaN ignored), with the weights left on disk: the
    graph plus one ReduceMin / ReduceMax per tensor is written beside the model, sharing its weight
    file, and only the one ORT session holds the weights. onnxruntime's own calibrator loads and copies
    the model beside its session (past 14 GB at SD1.5 size before it had calibrated, measured). Returns
    ``{tensor: (min, max)}``, each a float32 array of shape (1,) as the calibrator's."""
    import uuid

    import onnxruntime as ort
    from onnx import TensorProto, helper
    model_path = Path(model_path).absolute()
    with working_directory(model_path.parent):
        m = onnx.shape_inference.infer_shapes(load_lazy(model_path))
    vis = {v.name: v for v in m.graph.value_info}
    vis.update({v.name: v for v in m.graph.output})
    vis.update({v.name: v for v in m.graph.input})
    inits = {t.name for t in m.graph.initializer}
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    tensors = sorted({t for n in m.graph.node if n.op_type in op_types for t in (*n.input, *n.output)
                      if t in vis and t not in inits and vis[t].type.HasField("tensor_type")
                      and vis[t].type.tensor_type.elem_type in floats})
    # each tensor's reductions right after it is made, run in that order (ORT's priority-based order
    # follows the node list), so ORT frees each activation there: in ORT's default order the reductions
    # run last and keep every activation alive (SD1.5's VAE decoder at 512 px: 5.8 GB a sample against
    # 1.7 GB, measured)
    index = {t: k for k, t in enumerate(tensors)}
    reductions = {t: [helper.make_node(op, [t], [f"zo_calib_{k}_{op}"], keepdims=0, name=f"zo_calib_{k}_{op}")
                      for op in ("ReduceMin", "ReduceMax")] for t, k in index.items()}
    made = {o for n in m.graph.node for o in n.output}
    nodes = [r for t in tensors if t not in made for r in reductions[t]]  # graph inputs: first
    for n in m.graph.node:
        nodes.append(n)
        nodes.extend(r for o in n.output if o in index for r in reductions[o])
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.output.extend(helper.make_tensor_value_info(r.output[0], vis[t].type.tensor_type.elem_type, [])
                          for t in tensors for r in reductions[t])
    aug = model_path.with_name(f".zo-calib-{uuid.uuid4().hex[:8]}.onnx")
    try:
        onnx.save_model(m, str(aug))  # its weights still point at the model's own data file, beside it
        del m
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as the calibrator runs it
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(aug), so, providers=["CPUExecutionProvider"])
        names = [f"zo_calib_{k}_{op}" for k in range(len(tensors)) for op in ("ReduceMin", "ReduceMax")]
        lo = np.full(len(tensors), np.nan, np.float32)
        hi = np.full(len(tensors), np.nan, np.float32)
        for feeds in calib:
            outs = sess.run(names, feeds)
            lo = np.fmin(lo, np.array(outs[0::2], np.float32))
            hi = np.fmax(hi, np.array(outs[1::2], np.float32))
        del sess
    finally:
        aug.unlink(missing_ok=True)
    return {t: (lo[k:k + 1], hi[k:k + 1]) for k, t in enumerate(tensors)}


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
        model = load_lazy(pre)
        restore_io(model, src)
        exclude, counts = exclusions(model)
        exclude += list(extra_exclude or [])
        n_weight = weight_nodes(model, op_types)
        big = needs_external_data(model)
        named = work / "named.onnx"
        save_model(model, named, external=big, base_dir=work)
        del model
        if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
            # calibrated here with the weights on disk; quantize_static reads the ranges from its cache
            from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data
            ranges = work / "ranges.json"
            save_tensors_data(TensorsData(CalibrationMethod.MinMax, minmax_ranges(named, calib, op_types)), ranges)
            calibration = {"calibration_data_reader": None, "calibration_cache_path": str(ranges)}
        else:  # an onnxruntime without the calibration cache: its own calibrator (more memory)
            calibration = {"calibration_data_reader": FeedsReader(calib)}
        logging.disable(logging.WARNING)
        try:
            quantize_static(
                model_input=str(named), model_output=str(dst), **calibration,
                quant_format=QuantFormat.QDQ, op_types_to_quantize=list(op_types), per_channel=per_channel,
                reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=getattr(QuantType, weight_type),
                nodes_to_exclude=exclude, use_external_data_format=big, calibrate_method=CalibrationMethod.MinMax,
                extra_options={"MatMulConstBOnly": True,
                               "CalibTensorRangeSymmetric": False, "ActivationSymmetric": False,
                               "WeightSymmetric": True})
        finally:
            logging.disable(logging.NOTSET)
        if big:  # quantize_static names the data file after the model: make it model.onnx_data
            old = list(dst.parent.glob(dst.name + "*.data"))
            save_model(load_lazy(dst), dst, external=True, base_dir=dst.parent)
            for f in old:
                f.unlink()
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


# the axis a weight's dot products run over (the input channels), where 4-bit blocks are cut
_INPUT_AXIS = {"Conv": lambda n, w: 1, "ConvTranspose": lambda n, w: 0,
               "MatMul": lambda n, w: w.ndim - 2, "Attention": lambda n, w: w.ndim - 2,
               "Gemm": lambda n, w: 1 if any(a.name == "transB" and a.i for a in n.attribute) else 0}
INT4_OPSET = 21  # DequantizeLinear with int4 input and block_size (ONNX opset 21, IR 10)


def _int4_tensor(q: np.ndarray, name: str) -> onnx.TensorProto:
    """An ONNX INT4 initializer: two values a byte, the first in the low nibble (the ONNX layout)."""
    flat = (q.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    t = onnx.TensorProto(name=name, data_type=onnx.TensorProto.INT4, dims=list(q.shape))
    t.raw_data = (flat[0::2] | (flat[1::2] << 4)).tobytes()
    return t


def _quantize_per_channel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    red = tuple(i for i in range(w.ndim) if i != axis)
    scale = np.abs(w).max(axis=red) / 127.0
    scale[scale == 0] = 1.0
    shape = [1] * w.ndim
    shape[axis] = -1
    return np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8), scale.astype(np.float32)


def _quantize_blocked4(w: np.ndarray, axis: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 4-bit values in [-7, 7] and one scale per ``block`` consecutive inputs along ``axis``
    (the scale has w's shape with that axis divided by ``block``: ONNX's blocked DequantizeLinear)."""
    shape = list(w.shape)
    blocks = w.reshape(shape[:axis] + [shape[axis] // block, block] + shape[axis + 1:])
    scale = np.abs(blocks).max(axis=axis + 1) / 7.0
    scale[scale == 0] = 1.0
    q = np.clip(np.round(blocks / np.expand_dims(scale, axis + 1)), -7, 7).astype(np.int8)
    return q.reshape(shape), scale.astype(np.float32)


def quantize_weight_only(src: Path, dst: Path, bits: int = 8, block_size: int = INT4_BLOCK,
                         min_size: int = 1024) -> dict:
    """Weight-only quantization: every constant weight of Conv / MatMul / Gemm / Attention is stored in
    ``bits`` with a DequantizeLinear in front; activations stay float. ORT keeps the DequantizeLinear
    nodes (it does not constant-fold QDQ), so weights sit in memory quantized and are widened layer by
    layer at run time; DequantizeLinear -> MatMul is fused into MatMulNBits at load (float compute with
    :func:`zo_runtime.bundle.weight_only_options`).

    ``bits=8`` (``int8w``): int8, symmetric, one scale per output channel.
    ``bits=4`` (``int4w``): int4, symmetric, one scale per ``block_size`` inputs (ONNX opset 21's blocked
    DequantizeLinear; the graph's opset is raised to 21, whose changes from 18 only add types); a
    weight whose input width is not a multiple of ``block_size`` keeps the int8 per-channel form.

    Why weight-only: static QDQ rounds activations to 256 levels, which makes the loss a step
    function of the token embedding; zeroth-order differences with μ = 1e-3 then measure rounding,
    not the gradient (benchmarks/bench_zo_signal.py). Weight-only keeps the loss smooth in θ, as in
    the paper (optimum-quanto qint8 weights, float activations)."""
    from onnx import helper, numpy_helper

    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    src = Path(src)
    model = load_lazy(src)  # weights stay on disk: read, quantized and dropped one at a time
    if not any(o.domain in ("", "ai.onnx") and o.version >= 13 for o in model.opset_import):
        raise UserError(f"{src}: weight-only quantization needs opset >= 13 (per-axis DequantizeLinear)")
    inits = {t.name: t for t in model.graph.initializer}
    done, new_nodes, q_bytes, f_bytes, n4 = {}, [], 0, 0, 0
    for n in model.graph.node:
        axis_of = _WEIGHT_AXIS.get(n.op_type)
        if axis_of is None or len(n.input) < 2 or n.input[1] not in inits:
            continue
        name = n.input[1]
        t = inits[name]
        if t.data_type != onnx.TensorProto.FLOAT or len(t.dims) < 2 or int(np.prod(t.dims)) < min_size:
            continue
        if name not in done:
            w = tensor_array(t, src.parent)
            in_axis = _INPUT_AXIS[n.op_type](n, w)
            if bits == 4 and w.shape[in_axis] % block_size == 0:
                wq, scale = _quantize_blocked4(w, in_axis, block_size)
                qn, sn, out = name + "_w4", name + "_w4_scale", name + "_w4_dq"
                model.graph.initializer.extend([_int4_tensor(wq, qn), numpy_helper.from_array(scale, sn)])
                new_nodes.append(helper.make_node("DequantizeLinear", [qn, sn], [out], name=name + "_w4_DQ",
                                                  axis=in_axis, block_size=block_size))
                q_bytes += (wq.size + 1) // 2 + scale.nbytes
                n4 += 1
            else:
                axis = axis_of(n, w)
                wq, scale = _quantize_per_channel(w, axis)
                qn, sn, zn, out = name + "_w8", name + "_w8_scale", name + "_w8_zp", name + "_w8_dq"
                model.graph.initializer.extend([numpy_helper.from_array(wq, qn), numpy_helper.from_array(scale, sn),
                                                numpy_helper.from_array(np.zeros(scale.shape, np.int8), zn)])
                new_nodes.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [out], name=name + "_w8_DQ",
                                                  axis=axis))
                q_bytes += wq.nbytes + scale.nbytes
            done[name] = out
            f_bytes += w.nbytes
        n.input[1] = done[name]
    # drop the float originals nobody reads any more
    still = {i for n in list(model.graph.node) + new_nodes for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in still]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    # DequantizeLinear nodes first, so the graph stays topologically sorted
    nodes = new_nodes + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if n4:
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = max(o.version, INT4_OPSET)
        model.ir_version = max(model.ir_version, 10)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, WEIGHT_ONLY_KEY: "1"})
    save_model(model, dst, external=needs_external_data(model) or maps_weights(model), base_dir=src.parent)
    if bits == 8:
        return {"method": "weight-only", "weight_type": "QInt8", "symmetric": True, "per_channel": True,
                "activations": "float32", "weights_quantized": len(done),
                "weight_bytes_fp32": int(f_bytes), "weight_bytes_int8": int(q_bytes)}
    return {"method": "weight-only", "weight_type": "QInt4", "symmetric": True, "block_size": block_size,
            "activations": "float32", "weights_quantized": len(done), "weights_int4": n4,
            "weights_int8_per_channel": len(done) - n4,
            "weight_bytes_fp32": int(f_bytes), "weight_bytes_quantized": int(q_bytes)}

