"""Graph fusions from ``onnxruntime.transformers.optimizer`` that run on the CPU provider.

Only the UNet is fused. On CPU these fusions have no kernel and are switched off: GroupNorm,
SkipGroupNorm, BiasSplitGelu, NhwcConv, BiasAdd, packed QKV and packed KV. What stays: LayerNorm,
SkipLayerNorm, Gelu/BiasGelu, and attention (self-attention becomes ``Attention`` with packed
QKV weights, cross-attention ``MultiHeadAttention`` fed by separate Q/K/V MatMuls).

Before weight quantization, :func:`unpack_self_attention` turns each ``Attention`` back into three
Q/K/V MatMuls feeding a ``MultiHeadAttention`` node: the projections become quantizable (the field
notes found fused Attention weights staying FP32 after INT8) while the attention kernel itself
stays fused (no QK^T / attn.V MatMuls, no transposes).
"""
from __future__ import annotations

import importlib
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graphs import load_lazy, prune, save_model, tensor_array, working_directory

CPU_LESS_FUSIONS = ("enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu", "enable_nhwc_conv",
                    "enable_bias_add", "enable_packed_qkv", "enable_packed_kv")


def cpu_fusion_options(model_type: str = "unet"):
    from onnxruntime.transformers.fusion_options import FusionOptions
    opts = FusionOptions(model_type)
    for name in CPU_LESS_FUSIONS:
        if hasattr(opts, name):
            setattr(opts, name, False)
    return opts


def fuse_unet(src: str | Path, dst: str | Path, unpack: bool = False) -> dict:
    """Apply the CPU-safe fusions to the UNet at ``src``; save to ``dst``. Returns fused-op counts.

    The weights stay on disk (graphs.load_lazy): the fusions read the few they rewrite (the attention
    projections they pack) from ``src``'s folder, which is the working directory meanwhile (they and
    ONNX's checker resolve external data from there), and the save streams the rest tensor by tensor.
    ``unpack``: then :func:`unpack_self_attention` (for weight quantization), before saving."""
    from onnxruntime.transformers.optimizer import optimize_model
    src = Path(src).absolute()
    # optimizer.py imports its helpers as top-level modules (its folder is put on sys.path)
    onnx_model_unet = sys.modules.get("onnx_model_unet") or importlib.import_module(
        "onnxruntime.transformers.onnx_model_unet")
    is_installed = onnx_model_unet.is_installed
    onnx_model_unet.is_installed = lambda name: False if name == "tqdm" else is_installed(name)  # no progress bar
    logging.disable(logging.WARNING)  # its INFO / WARNING chatter
    try:
        with warnings.catch_warnings(), working_directory(src.parent):
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy: int() of a 1-element array
            opt = optimize_model(load_lazy(src), model_type="unet", num_heads=0, hidden_size=0,
                                 optimization_options=cpu_fusion_options("unet"), opt_level=0, use_gpu=False,
                                 only_onnxruntime=False)
    finally:
        logging.disable(logging.NOTSET)
        onnx_model_unet.is_installed = is_installed
    model = opt.model
    ensure_ms_domain(model)
    counts = fused_op_counts(model)
    if unpack:
        counts["unpacked_self_attention"] = unpack_self_attention(model, src.parent)
    save_model(model, dst, base_dir=src.parent)
    return counts


def ensure_ms_domain(model: onnx.ModelProto) -> None:
    """Contrib ops need a ``com.microsoft`` opset import, or ONNX shape inference (which the
    quantizer runs) rejects the graph; ONNX Runtime itself does not mind."""
    if any(n.domain == "com.microsoft" for n in model.graph.node) and \
            not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def fused_op_counts(model: onnx.ModelProto) -> dict:
    out: dict[str, int] = {}
    for n in model.graph.node:
        if n.domain == "com.microsoft":
            out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def unpack_self_attention(model: onnx.ModelProto, base_dir: str | Path | None = None) -> int:
    """Replace each com.microsoft ``Attention`` (packed QKV weight initializer) by Q/K/V MatMuls and a
    ``MultiHeadAttention``. In place; returns how many were replaced. ``base_dir``: where a lazily
    loaded model's weights are."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    new_nodes, n_done = [], 0
    for node in g.node:
        if not (node.op_type == "Attention" and node.domain == "com.microsoft" and len(node.input) >= 2
                and node.input[1] in inits):
            new_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if set(attrs) - {"num_heads", "scale"} or (len(node.input) > 3 and any(node.input[3:])):
            new_nodes.append(node)  # mask / past / unusual attributes: leave it
            continue
        w = tensor_array(inits[node.input[1]], base_dir)
        c_in, three_out = w.shape
        out = three_out // 3
        w3 = w.reshape(c_in, 3, out)
        x = node.input[0]
        outs = []
        for k, tag in enumerate("QKV"):
            wn = f"{node.name}_{tag}_weight"
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w3[:, k, :]), wn))
            on = f"{node.name}_{tag}_out"
            new_nodes.append(helper.make_node("MatMul", [x, wn], [on], name=f"{node.name}_MatMul_{tag}"))
            outs.append(on)
        mha_in = list(outs)
        if len(node.input) > 2 and node.input[2] and node.input[2] in inits:
            b = tensor_array(inits[node.input[2]], base_dir)
            if np.any(b != 0):
                mha_in.append(node.input[2])  # MHA's bias input has the same [3 * hidden] layout
        mha = helper.make_node("MultiHeadAttention", mha_in, [node.output[0]], name=f"{node.name}_MHA",
                               domain="com.microsoft", num_heads=int(attrs["num_heads"]))
        if "scale" in attrs:
            mha.attribute.append(helper.make_attribute("scale", float(attrs["scale"])))
        new_nodes.append(mha)
        n_done += 1
    if n_done:
        del g.node[:]
        g.node.extend(new_nodes)
        prune(model)
        ensure_ms_domain(model)
    return n_done
