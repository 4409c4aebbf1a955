"""Text encoder surgery: take the token-embedding lookup out of the CLIP text encoder graph.

The exported graph computes ``Gather(token_embedding, input_ids) + position_embedding``. We remove
that Gather, feed its consumers from a new graph input ``inputs_embeds`` float32 [B, L, D], and save
the table as ``token_embedding.npy``. A personalized token is then a row written into
``inputs_embeds``; the graph (which still adds positions itself) never changes.

``input_ids`` stays an input only while something else still reads it: CLIP pools the hidden
state at the first EOS (or argmax id), and the position slice reads its shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from zo_runtime.errors import UserError

from .graphs import io_spec, producers, prune, save_model

INPUTS_EMBEDS = "inputs_embeds"
SHAPE_ONLY = {"Shape", "Size"}


@dataclass
class SurgeryResult:
    table_name: str
    vocab_size: int
    dim: int
    kept_input_ids: bool
    removed_nodes: int


def _const_source(model: onnx.ModelProto, name: str, prod: dict, inits: dict) -> tuple[str, np.ndarray] | None:
    """Follow Identity nodes from ``name`` back to an initializer or Constant; (name, value)."""
    seen = set()
    while name not in seen:
        seen.add(name)
        if name in inits:
            return name, numpy_helper.to_array(inits[name])
        node = prod.get(name)
        if node is None:
            return None
        if node.op_type == "Identity":
            name = node.input[0]
            continue
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return name, numpy_helper.to_array(a.t)
        return None
    return None


def _data_ancestors(name: str, prod: dict) -> set[str]:
    """Tensor names ``name`` depends on through data (not through Shape/Size)."""
    out, stack = set(), [name]
    while stack:
        n = stack.pop()
        if n in out:
            continue
        out.add(n)
        node = prod.get(n)
        if node is None or node.op_type in SHAPE_ONLY:
            continue
        stack.extend(i for i in node.input if i)
    return out


def find_token_embedding(model: onnx.ModelProto, vocab_size: int | None = None):
    """Find the Gather that looks up token ids in the embedding table.

    A candidate is a Gather whose data input is (through Identity) a rank-2 constant and whose
    indices depend, through data, on the int64 ``input_ids`` graph input. Among several, one whose
    table name mentions ``token_embedding`` wins, then the one whose first dimension is the vocab.
    Returns (gather node, table name, table array)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    prod = producers(model)
    ids_inputs = {v.name for v in g.input if v.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)}
    if not ids_inputs:
        raise UserError("text encoder graph has no integer token-id input to rewrite")
    cands = []
    for node in g.node:
        if node.op_type != "Gather" or len(node.input) < 2:
            continue
        src = None
        if node.input[0] in inits or node.input[0] in prod:
            src = _const_source(model, node.input[0], prod, inits)
        if src is None or src[1].ndim != 2:
            continue
        if not (_data_ancestors(node.input[1], prod) & ids_inputs):
            continue
        cands.append((node, src[0], src[1]))
    if vocab_size:
        exact = [c for c in cands if c[2].shape[0] == vocab_size]
        cands = exact or cands
    if not cands:
        raise UserError("could not find the token-embedding Gather in the exported text encoder")
    named = [c for c in cands if "token_embedding" in c[1] or "token_embedding" in c[0].name]
    pick = named or sorted(cands, key=lambda c: -c[2].shape[0])
    return pick[0]


def rewrite_text_encoder(src: str | Path, dst: str | Path, table_path: str | Path,
                         vocab_size: int | None = None) -> SurgeryResult:
    """Rewrite the exported text encoder at ``src`` into ``dst`` (model.onnx) and ``table_path``."""
    model = onnx.load(str(src))
    gather, table_name, table = find_token_embedding(model, vocab_size)
    g = model.graph
    axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
    if axis != 0:
        raise UserError(f"token-embedding Gather uses axis={axis}; expected 0")
    vocab, dim = (int(s) for s in table.shape)
    out_name = gather.output[0]

    # the ids' symbolic dims become the embeds' batch / sequence dims
    ids = next((v for v in g.input if v.name == "input_ids"), None)
    dims = []
    if ids is not None and len(ids.type.tensor_type.shape.dim) == 2:
        for d in ids.type.tensor_type.shape.dim:
            dims.append(d.dim_param or (d.dim_value if d.HasField("dim_value") else None))
    else:
        dims = ["batch_size", "sequence_length"]
    embeds = helper.make_tensor_value_info(INPUTS_EMBEDS, onnx.TensorProto.FLOAT, [*dims, dim])

    for node in g.node:
        for k, name in enumerate(node.input):
            if name == out_name:
                node.input[k] = INPUTS_EMBEDS
    for o in g.output:
        if o.name == out_name:  # pathological: the lookup is itself an output
            raise UserError("token-embedding lookup is a graph output; nothing to rewrite")
    g.node.remove(gather)
    g.input.insert(0, embeds)
    n_before = len(g.node)
    prune(model)
    if any(t.name == table_name for t in g.initializer) or any(table_name in n.input for n in g.node):
        raise UserError(f"token table {table_name} is still used elsewhere in the text encoder; cannot drop it")
    kept = any(v.name == "input_ids" for v in g.input)

    Path(table_path).parent.mkdir(parents=True, exist_ok=True)
    np.save(table_path, np.ascontiguousarray(table, dtype=np.float32))
    save_model(model, dst)
    return SurgeryResult(table_name=table_name, vocab_size=vocab, dim=dim, kept_input_ids=kept,
                         removed_nodes=1 + n_before - len(g.node))


def text_feeds(spec: dict, table: np.ndarray, ids: np.ndarray) -> dict:
    """Feeds for the rewritten text encoder: ``inputs_embeds = table[ids]`` (+ ``input_ids`` if kept)."""
    names = {i["name"] for i in spec["inputs"]}
    feeds = {INPUTS_EMBEDS: np.ascontiguousarray(table[ids], dtype=np.float32)}
    if "input_ids" in names:
        dt = next(i["dtype"] for i in spec["inputs"] if i["name"] == "input_ids")
        feeds["input_ids"] = ids.astype(dt)
    return feeds


def check_parity(original: str | Path, rewritten: str | Path, table: np.ndarray, ids: np.ndarray) -> float:
    """Max abs difference of ``last_hidden_state`` between the original export fed ``ids`` and the
    rewritten graph fed ``table[ids]``."""
    from .graphs import session
    s0, s1 = session(original), session(rewritten)
    dt = next(i.type for i in s0.get_inputs() if i.name == "input_ids")
    a = s0.run(["last_hidden_state"], {"input_ids": ids.astype(np.int32 if "int32" in dt else np.int64)})[0]
    b = s1.run(["last_hidden_state"], text_feeds(io_spec(rewritten), table, ids))[0]
    return float(np.max(np.abs(a.astype(np.float64) - b)))
