"""Rebuild the diffusers source folder of a zo-edge bundle from the bundle's own ONNX graphs.

For a bundle whose FP32 diffusers folder is lost: instantiate the model's diffusers architecture
(the shapes recipe's configs by default, :mod:`zo_edge.models.train_shapes`) and fill every
parameter from the graphs' initializers, then save a ``StableDiffusionPipeline`` folder
(safetensors). No parameter may keep its random initial value: anything left unfilled, and any
float initializer of the graphs that no parameter took, is an error listing the names.

How each initializer finds its parameter:

* a weight-only INT8 weight (``<name>_w8`` + ``_w8_scale`` + ``_w8_zp`` behind ``DequantizeLinear``)
  is dequantized exactly as ONNX Runtime does, ``(w8 - zp) * scale`` per channel in float32; the
  graph then uses the float tensor, so the rebuilt parameter is bit-identical to the weight the
  bundle computes with;
* an initializer named after a diffusers / transformers parameter (Conv and Gemm weights, biases,
  LayerNorm and SkipLayerNormalization gamma / beta, the position table) goes to that name
  (transposed when a MatMul reads it, reshaped when only the layout differs);
* an anonymous one (``onnx::MatMul_*``, ``onnx::Mul_*`` ...) is named by the node that reads it:
  the exporter names nodes after the module path (``/down_blocks.1/attentions.0/.../to_k/MatMul``
  -> ``down_blocks.1.attentions.0....to_k.weight``, transposed from MatMul's [in, out]); GroupNorm,
  exported as InstanceNormalization + ``Mul`` (gamma) + ``Add`` (beta), gives ``norm.weight`` /
  ``norm.bias``; Gemm honours ``transB``;
* the fusions of ``onnxruntime.transformers`` (convert/optimize.py) are undone: self-attention
  unpacked into ``Attention_k_MatMul_{Q,K,V}`` + MultiHeadAttention takes its module path from the
  MultiHeadAttention output (``.../attn1/Reshape_3_output_0``), a packed ``Attention`` weight
  [in, 3 * out] is split, MultiHeadAttention's packed q/k/v bias is split onto ``to_q/k/v.bias``
  or, where diffusers has no such bias, checked to be all zero;
* the text encoder's token table is ``text_encoder/token_embedding.npy`` (taken out of the graph
  by convert/surgery.py).

    python -m zo_edge.convert.rebuild_source models/shapes/bundle models/shapes/source

The rebuilt weights are the bundle's (INT8-rounded) weights, not the lost FP32 originals; they
match the bundle's graphs, which is what a baseline next to the bundle needs.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from zo_runtime.errors import UserError
from zo_runtime.manifest import BUNDLE_MANIFEST

GRAPHS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
COMPONENT = {"text_encoder": "text_encoder", "unet": "unet", "vae_encoder": "vae", "vae_decoder": "vae"}
TOKEN_TABLE_PARAM = "text_model.embeddings.token_embedding.weight"
PROJ = {"Q": "to_q", "K": "to_k", "V": "to_v"}
DTYPES = ("float16", "float32")
SOURCE_JSON = "zo_edge_source.json"
UNPACKED = re.compile(r"^(Attention_\d+)_MatMul_([QKV])$")


# -- reading the graphs ------------------------------------------------------------------------

def _dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int) -> np.ndarray:
    """ONNX DequantizeLinear in float32: ``(q - zp) * scale``, per axis when ``scale`` is 1-D."""
    shape = [1] * q.ndim
    if scale.ndim == 1 and q.ndim:
        shape[axis % q.ndim] = -1
    x = q.astype(np.float32)
    if zp is not None:
        x = x - zp.astype(np.float32).reshape(shape)
    return (x * scale.astype(np.float32).reshape(shape)).astype(np.float32)


def _module_path(tensor_or_node_name: str) -> str:
    """``/down_blocks.1/resnets.0/norm1/Mul`` -> ``down_blocks.1.resnets.0.norm1`` (the exporter names
    nodes and their outputs after the module path; the last component is the op)."""
    parts = [p for p in tensor_or_node_name.split("/") if p]
    return ".".join(parts[:-1])


class _Graph:
    """One bundle graph: its float constants (initializers and dequantized INT8 weights, by tensor
    name) and the bookkeeping of which ones a parameter took."""

    def __init__(self, path: Path):
        import onnx
        from onnx import helper, numpy_helper
        self.path = path
        self.model = onnx.load(str(path))
        g = self.model.graph
        self.inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for i, x in enumerate(n.input):
                self.consumers.setdefault(x, []).append((n, i))
        self.const: dict[str, np.ndarray] = {}   # tensor name -> float value
        self.origin: dict[str, str] = {}         # tensor name -> the name a parameter would carry
        self.raw: dict[str, list[str]] = {}      # tensor name -> the initializers it is made of
        for name, v in self.inits.items():
            if v.dtype.kind == "f":
                self.const[name] = v.astype(np.float32)
                self.origin[name] = name
                self.raw[name] = [name]
        for n in g.node:
            if n.op_type == "DequantizeLinear" and n.input[0] in self.inits and n.input[1] in self.inits:
                axis = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "axis"), 1)
                zp = self.inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
                self.const[n.output[0]] = _dequantize(self.inits[n.input[0]], self.inits[n.input[1]], zp, axis)
                base = n.input[0][:-3] if n.input[0].endswith("_w8") else n.input[0]
                self.origin[n.output[0]] = base
                self.raw[n.output[0]] = [x for x in n.input if x]
            elif n.op_type == "Identity" and n.input[0] in self.const:
                # the exporter shares equal initializers (a fresh model's zero biases, unit gammas)
                # through Identity nodes named after the other parameters
                self.const[n.output[0]] = self.const[n.input[0]]
                self.origin[n.output[0]] = n.output[0]
                self.raw[n.output[0]] = self.raw[n.input[0]]
        self.used: set[str] = set()

    def mha_path(self, node) -> str:
        """Module path of the attention an unpacked ``Attention_k_MatMul_Q`` feeds."""
        for c, _ in self.consumers.get(node.output[0], []):
            if c.op_type == "MultiHeadAttention":
                return _module_path(c.output[0])
        raise UserError(f"{self.path}: {node.name} feeds no MultiHeadAttention")


def _fit(value: np.ndarray, shape: tuple) -> np.ndarray | None:
    """``value`` as ``shape`` when only size-1 axes differ (GroupNorm's [C, 1, 1] gamma); else None."""
    if tuple(value.shape) == shape:
        return value
    if value.size == int(np.prod(shape)) and value.squeeze().shape == tuple(s for s in shape if s != 1):
        return value.reshape(shape)
    return None


def _candidates(g: _Graph, node, i: int, x: str, keys: dict) -> list[tuple[str, np.ndarray]]:
    """(parameter name, value) pairs the constant ``x`` at input ``i`` of ``node`` fills: named by the
    reading node's module path first (the exporter shares equal initializers, e.g. a fresh model's
    unit LayerNorm gammas, under one parameter's name), by the initializer's own name otherwise."""
    v, origin, op = g.const[x], g.origin[x], node.op_type
    found = _by_node(g, node, i, v)
    if found and all(name in keys for name, _ in found):
        return found
    if origin in keys:  # named after the parameter; the layout is the reading op's
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        if v.ndim == 2 and i == 1 and (op == "MatMul" or (op == "Gemm" and not trans_b)):
            v = np.ascontiguousarray(v.T)  # [in, out] -> torch Linear's [out, in]
        fitted = _fit(v, keys[origin])
        if fitted is None:
            raise UserError(f"{g.path}: {origin} has shape {list(v.shape)}, the model expects {list(keys[origin])}")
        return [(origin, fitted)]
    return found


def _by_node(g: _Graph, node, i: int, v: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """What input ``i`` of ``node`` is, by the node's op and module path (see the module doc)."""
    op = node.op_type
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    if op == "MatMul" and i == 1:
        m = UNPACKED.match(node.name)
        path = f"{g.mha_path(node)}.{PROJ[m.group(2)]}" if m else _module_path(node.name)
        return [(f"{path}.weight", np.ascontiguousarray(v.T))]
    if op == "Gemm" and i in (1, 2):
        path = _module_path(node.name)
        if i == 2:
            return [(f"{path}.bias", v.reshape(-1))]
        return [(f"{path}.weight", v if trans_b else np.ascontiguousarray(v.T))]
    if op in ("Conv", "LayerNormalization") and i in (1, 2):
        return [(f"{_module_path(node.name)}.{'weight' if i == 1 else 'bias'}", v)]
    if op in ("Mul", "Add"):  # GroupNorm's gamma / beta after InstanceNormalization, or a Linear's bias
        return [(f"{_module_path(node.name)}.{'weight' if op == 'Mul' else 'bias'}", v.reshape(-1))]
    if op == "SkipLayerNormalization" and i in (2, 3, 4):
        if i == 4:  # the bias of the Linear whose output is the first input
            return [(f"{_module_path(node.input[0])}.bias", v.reshape(-1))]
        return [(f"{_module_path(node.output[0])}.{'weight' if i == 2 else 'bias'}", v.reshape(-1))]
    if op == "MultiHeadAttention" and i == 3:  # packed q/k/v bias
        path = _module_path(node.output[0])
        return [(f"{path}.{p}.bias", b) for p, b in zip(("to_q", "to_k", "to_v"), np.split(v.reshape(-1), 3))]
    if op == "Attention" and i in (1, 2):  # packed self-attention (not unpacked by convert/optimize.py)
        path = _module_path(node.output[0])
        if i == 1:
            w3 = v.reshape(v.shape[0], 3, -1)
            return [(f"{path}.{p}.weight", np.ascontiguousarray(w3[:, k, :].T))
                    for k, p in enumerate(("to_q", "to_k", "to_v"))]
        return [(f"{path}.{p}.bias", b) for p, b in zip(("to_q", "to_k", "to_v"), np.split(v.reshape(-1), 3))]
    if op == "Gather" and i == 0:
        return [(f"{_module_path(node.name)}.weight", v)]
    return []


def collect_parameters(graph_path: Path, keys: dict[str, tuple], filled: dict[str, np.ndarray],
                       provenance: dict[str, str]) -> dict:
    """Fill ``filled`` (parameter name -> float32 array) from the graph at ``graph_path`` for the
    parameters ``keys`` (name -> shape). Returns a small report; UserError on any inconsistency."""
    g = _Graph(graph_path)
    zero_biases, unknown = [], []
    for node in g.model.graph.node:
        if node.op_type in ("DequantizeLinear", "Identity"):
            continue
        for i, x in enumerate(node.input):
            if x not in g.const:
                continue
            for name, value in _candidates(g, node, i, x, keys):
                if name not in keys and g.const[x].size == 1:
                    continue  # a scalar operand (a scale, an epsilon), not a parameter
                if name not in keys:
                    if node.op_type in ("MultiHeadAttention", "Attention") and not np.any(value):
                        zero_biases.append(name)  # diffusers' to_q/k/v have no bias; the fusion added zeros
                        g.used.add(x)
                        continue
                    unknown.append(f"{x} ({node.op_type} {node.name}) -> {name}")
                    continue
                value = _fit(np.asarray(value, np.float32), keys[name])
                if value is None:
                    raise UserError(f"{graph_path}: {x} does not fit {name} {list(keys[name])}")
                if name in filled and not np.array_equal(filled[name], value):
                    raise UserError(f"{graph_path}: {name} is filled twice with different values "
                                    f"({provenance[name]} and {x})")
                filled[name] = value
                provenance.setdefault(name, f"{graph_path.parent.name}:{g.origin[x]}")
                g.used.add(x)
    left = [x for x in g.const if x in g.inits and g.const[x].size > 1
            and not any(x in g.raw[u] for u in g.used)]
    if unknown or left:
        lines = unknown + [f"{x} {list(g.const[x].shape)} (read by no parameter)" for x in left]
        raise UserError(f"{graph_path}: {len(lines)} initializer(s) map to no parameter of the model:\n  "
                        + "\n  ".join(lines))
    return {"initializers": len(g.inits), "zero_biases_checked": len(zero_biases)}


# -- the model -----------------------------------------------------------------------------------

def shapes_configs() -> dict:
    """The shipped shapes model's architecture (its training recipe)."""
    from zo_edge.models.train_shapes import text_config, unet_config, vae_config
    return {"unet": unet_config(), "text_encoder": text_config(), "vae": vae_config()}


def configs_of(diffusers_dir: str | Path) -> dict:
    """The component configs of an existing diffusers folder (for rebuilding another model's bundle)."""
    d = Path(diffusers_dir)
    return {c: json.loads((d / c / "config.json").read_text()) for c in ("unet", "text_encoder", "vae")}


def build_models(configs: dict, scaling_factor: float | None = None) -> dict:
    """Random-weight modules of the given architecture (float32, eval mode)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    vae_cfg = dict(configs["vae"])
    if scaling_factor is not None:
        vae_cfg["scaling_factor"] = float(scaling_factor)
    text_cfg = {k: v for k, v in configs["text_encoder"].items() if not k.startswith("_")}
    return {"unet": UNet2DConditionModel.from_config(configs["unet"]).eval(),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**text_cfg)).eval(),
            "vae": AutoencoderKL.from_config(vae_cfg).eval()}


def rebuild_models(bundle: str | Path, configs: dict | None = None) -> tuple[dict, dict]:
    """Float32 modules (``unet``, ``text_encoder``, ``vae``) holding the bundle's weights, and a report.

    UserError when a parameter is left unfilled or an initializer fits no parameter."""
    import torch
    from zo_runtime.bundle import Bundle
    b = Bundle.load(bundle, verify=True)
    if b.manifest.get("quantization", {}).get("weights") not in ("int8w", "fp32", None):
        raise UserError(f"bundle {bundle} has {b.manifest['quantization']['weights']} weights: static QDQ / INT4 "
                        "graphs cannot be rebuilt into diffusers weights (int8w or fp32 only)")
    models = build_models(configs or shapes_configs(), b.scaling_factor)
    report = {}
    for comp in ("text_encoder", "unet", "vae"):
        keys = {k: tuple(v.shape) for k, v in models[comp].state_dict().items()}
        filled: dict[str, np.ndarray] = {}
        prov: dict[str, str] = {}
        rep = {}
        if comp == "text_encoder":
            table = np.array(b.token_table, np.float32)  # a copy: the bundle's is memory-mapped read-only
            if tuple(table.shape) != keys.get(TOKEN_TABLE_PARAM):
                raise UserError(f"token table {list(table.shape)} does not fit {TOKEN_TABLE_PARAM} "
                                f"{list(keys.get(TOKEN_TABLE_PARAM, ()))}")
            filled[TOKEN_TABLE_PARAM] = table
            prov[TOKEN_TABLE_PARAM] = "text_encoder/token_embedding.npy"
        for graph in GRAPHS:
            if COMPONENT[graph] == comp:
                rep[graph] = collect_parameters(b.root / b.graph(graph)["path"], keys, filled, prov)
        missing = sorted(set(keys) - set(filled))
        if missing:
            raise UserError(f"{comp}: {len(missing)} parameter(s) not found in the bundle (no random weights "
                            f"may remain):\n  " + "\n  ".join(missing))
        models[comp].load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in filled.items()},
                                     strict=True)
        report[comp] = {"parameters": len(keys), "elements": int(sum(np.prod(s) for s in keys.values())),
                        "graphs": rep}
    return models, report


def load_source(source: str | Path) -> dict:
    """The components of a diffusers folder as float32 modules in eval mode (whatever dtype was saved)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    s = Path(source)
    return {"unet": UNet2DConditionModel.from_pretrained(s / "unet", torch_dtype=torch.float32).eval(),
            "text_encoder": CLIPTextModel.from_pretrained(s / "text_encoder", dtype=torch.float32).eval(),
            "vae": AutoencoderKL.from_pretrained(s / "vae", torch_dtype=torch.float32).eval()}


# -- parity --------------------------------------------------------------------------------------

def _torch_text(text, embeds: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """last_hidden_state of ``text`` fed ``inputs_embeds`` (the ids only give the shape and the pooling
    position, as in the bundle's graph): the token-embedding lookup is bypassed for the call."""
    import torch
    lookup = text.text_model.embeddings.token_embedding
    lookup.forward = lambda _ids: torch.from_numpy(embeds)
    try:
        with torch.no_grad():
            return text(input_ids=torch.from_numpy(ids.astype(np.int64)))[0].numpy()
    finally:
        del lookup.forward


def _pooled(refs: list[np.ndarray], outs: list[np.ndarray]) -> dict:
    from .accuracy import compare
    pooled = compare(np.concatenate([r.ravel() for r in refs]), np.concatenate([o.ravel() for o in outs]))
    per = [compare(r, o) for r, o in zip(refs, outs)]
    sig = lambda x: float(f"{x:.3g}")  # noqa: E731
    return {"cosine": round(pooled["cosine"], 9), "rel_l2": sig(pooled["rel_l2"]),
            "worst_cosine": round(min(p["cosine"] for p in per), 9),
            "worst_rel_l2": sig(max(p["rel_l2"] for p in per)), "samples": len(per)}


def _captions(n: int, rng: np.random.Generator) -> list[str]:
    from zo_edge.models import world
    out = []
    for _ in range(n):
        s, bg = world.sample(rng, held_out_ok=True)
        out.append(world.caption(s, bg))
    return out


def _images(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [n, 3, size, size] in [-1, 1]: world renders (the training distribution)."""
    from zo_edge.models import world
    imgs = []
    for k in range(n):
        s, bg = world.sample(rng, held_out_ok=True)
        imgs.append(world.render(s.shape, s.colour, s.pattern, bg, seed=k, size=size))
    x = np.stack(imgs).astype(np.float32) / 127.5 - 1
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def parity(models: dict, bundle: str | Path, seed: int = 0, samples: int = 4, unet_samples: int = 8,
           threads: int = 0) -> dict:
    """Each rebuilt PyTorch component against the bundle's ONNX Runtime session on the same inputs:
    pooled cosine and relative L2 of the main output (and the worst sample).

    text_encoder: world captions (``inputs_embeds`` = table[ids]) and the same with one token's
    embedding replaced by a random vector of the table's scale (what personalization feeds);
    unet: N(0, 1) latents at timesteps spread over [0, T) with text-encoder hidden states of world
    captions, and again with N(0, 1) hidden states; vae_encoder: world renders -> latent parameters;
    vae_decoder: N(0, 1) / scaling latents -> images."""
    import torch
    from transformers import CLIPTokenizer
    from zo_runtime.bundle import Bundle
    b = Bundle.load(bundle, verify=False, threads=threads)
    rng = np.random.default_rng(seed)
    tok = CLIPTokenizer.from_pretrained(b.tokenizer_dir)
    table = np.asarray(b.token_table, np.float32)
    max_len = int(b.manifest.get("max_length", 77))
    text, unet, vae = models["text_encoder"], models["unet"], models["vae"]
    te = b.session("text_encoder")
    te_inputs = {i.name for i in te.get_inputs()}
    out: dict = {}

    def run_text(embeds, ids):
        feeds = {"inputs_embeds": embeds}
        if "input_ids" in te_inputs:
            feeds["input_ids"] = ids.astype(np.int64)
        return te.run(["last_hidden_state"], feeds)[0]

    caps = _captions(samples, rng)
    ids_all = [tok(c, padding="max_length", max_length=max_len, truncation=True, return_tensors="np").input_ids
               for c in caps]
    refs, outs, refs_p, outs_p, hidden = [], [], [], [], []
    scale = float(table[ids_all[0][0]].std())
    for ids in ids_all:
        e = np.ascontiguousarray(table[ids], np.float32)
        r = run_text(e, ids)
        refs.append(r)
        hidden.append(r)
        outs.append(_torch_text(text, e, ids))
        e2 = e.copy()
        e2[0, 2] = rng.standard_normal(e.shape[-1]).astype(np.float32) * scale  # a "placeholder" token
        refs_p.append(run_text(e2, ids))
        outs_p.append(_torch_text(text, e2, ids))
    out["text_encoder"] = _pooled(refs, outs)
    out["text_encoder_new_token"] = _pooled(refs_p, outs_p)

    un = b.session("unet")
    lat = b.resolution // b.vae_scale_factor
    ts = np.linspace(0, b.noise_schedule.get("num_train_timesteps", 1000) - 1, unet_samples).round().astype(int)
    for tag, conds in (("unet", "text"), ("unet_random_cond", "random")):
        refs, outs = [], []
        for k, t in enumerate(ts):
            x = rng.standard_normal((1, b.latent_channels, lat, lat)).astype(np.float32)
            h = hidden[k % len(hidden)] if conds == "text" else \
                rng.standard_normal(hidden[0].shape).astype(np.float32)
            refs.append(un.run(None, {"sample": x, "timestep": b.timestep_feed(int(t), 1),
                                      "encoder_hidden_states": h})[0])
            with torch.no_grad():
                outs.append(unet(torch.from_numpy(x), int(t), encoder_hidden_states=torch.from_numpy(h)).sample.numpy())
        out[tag] = _pooled(refs, outs)

    enc = b.session("vae_encoder")
    x = _images(samples, b.resolution, rng)
    refs, outs = [], []
    for k in range(samples):
        refs.append(enc.run(None, {"sample": x[k:k + 1]})[0])
        with torch.no_grad():
            outs.append(vae.quant_conv(vae.encoder(torch.from_numpy(x[k:k + 1]))).numpy()
                        if vae.quant_conv is not None else vae.encoder(torch.from_numpy(x[k:k + 1])).numpy())
    out["vae_encoder"] = _pooled(refs, outs)

    dec = b.session("vae_decoder")
    refs, outs = [], []
    for k in range(samples):
        z = (rng.standard_normal((1, b.latent_channels, lat, lat)) / b.scaling_factor).astype(np.float32)
        refs.append(dec.run(None, {"latent_sample": z})[0])
        with torch.no_grad():
            outs.append(vae.decode(torch.from_numpy(z)).sample.numpy())
    out["vae_decoder"] = _pooled(refs, outs)
    return out


def format_parity(par: dict) -> list[str]:
    return [f"  {k:<23} cosine {v['cosine']:.9f}  rel_l2 {v['rel_l2']:.2e}  worst cos {v['worst_cosine']:.9f}  "
            f"n={v['samples']}" for k, v in par.items()]


# -- the folder ----------------------------------------------------------------------------------

def save_pipeline(models: dict, bundle: str | Path, out: str | Path, dtype: str = "float16") -> Path:
    """Save ``models`` with the bundle's tokenizer and scheduler as a StableDiffusionPipeline folder."""
    import torch
    import diffusers
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer
    from zo_runtime.bundle import Bundle
    b = Bundle.load(bundle, verify=False)
    out = Path(out)
    tok = CLIPTokenizer.from_pretrained(b.tokenizer_dir)
    sched_dir = b.root / Path(b.manifest["scheduler_config"]).parent
    cls = json.loads((sched_dir / "scheduler_config.json").read_text()).get("_class_name", "DDIMScheduler")
    sched = getattr(diffusers, cls, diffusers.DDIMScheduler).from_pretrained(sched_dir)
    pipe = StableDiffusionPipeline(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tok,
                                   unet=models["unet"], scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    if dtype == "float16":
        pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    for f in out.rglob("*"):  # safetensors writes 0600; a package's data must be readable by all
        if f.is_file():
            f.chmod(0o644)
    if dtype == "float16":
        pipe.to(torch.float32)
    return out


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def rebuild_source(bundle: str | Path, out: str | Path, dtype: str = "float16", configs: dict | None = None,
                   overwrite: bool = False, check: bool = True, threads: int = 0, command: str | None = None,
                   log=print) -> dict:
    """Rebuild the diffusers folder of ``bundle`` into ``out``; returns the record written to
    ``out/zo_edge_source.json`` (how it was made, parity of the saved folder against the bundle)."""
    from zo_runtime.bundle import sha256_file
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; one of {', '.join(DTYPES)}")
    bundle, out = Path(bundle), Path(out)
    if out.exists():
        if not overwrite:
            raise UserError(f"{out} exists (pass --overwrite to replace it)")
        if not (out / "model_index.json").is_file() and any(out.iterdir()):
            raise UserError(f"{out} exists and is not a diffusers folder; not replacing it")
        shutil.rmtree(out)
    t0 = time.time()
    models, report = rebuild_models(bundle, configs)
    for comp, r in report.items():
        log(f"[rebuild] {comp}: {r['parameters']} parameters, {r['elements']:,} values filled from the bundle")
    parity_f32 = None
    if check:  # the rebuilt float32 modules, before saving rounds them: the mapping alone
        import torch
        torch.set_num_threads(max(1, threads or torch.get_num_threads()))
        parity_f32 = parity(models, bundle, threads=threads)
    save_pipeline(models, bundle, out, dtype)
    del models
    record = {
        "made_by": "zo_edge.convert.rebuild_source",
        "command": command or f"python -m zo_edge.convert.rebuild_source {bundle} {out} --dtype {dtype}",
        "what": "diffusers weights rebuilt from the bundle's graphs: INT8 weights dequantized exactly as the "
                "bundle computes with them ((w8 - zp) * scale, float32), fusions undone; the FP32 originals "
                "the bundle was converted from are not recoverable",
        "dtype": dtype,
        "compute_dtype": "float32 (load with torch_dtype=torch.float32)",
        "bundle_files_sha256": {**{BUNDLE_MANIFEST: sha256_file(bundle / BUNDLE_MANIFEST)},
                                **{k: sha256_file(bundle / k) for k in sorted(_bundle_files(bundle))}},
        "parameters": report,
    }
    if check:
        record["parity_rebuilt_float32"] = parity_f32
        loaded = load_source(out)  # what users get: the saved folder, computed in float32
        record["parity"] = parity(loaded, bundle, threads=threads)
        record["parity_inputs"] = parity.__doc__.split("\n\n")[1].strip().replace("\n    ", " ")
        log("parity against the bundle, rebuilt float32 modules:")
        for line in format_parity(record["parity_rebuilt_float32"]):
            log(line)
        log(f"parity against the bundle, the saved folder ({dtype} weights, float32 compute):")
        for line in format_parity(record["parity"]):
            log(line)
    record["seconds"] = round(time.time() - t0, 1)
    record["bytes"] = folder_bytes(out)
    (out / SOURCE_JSON).write_text(json.dumps(record, indent=2) + "\n")
    record["bytes"] = folder_bytes(out)
    (out / SOURCE_JSON).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _bundle_files(bundle: Path) -> list[str]:
    m = json.loads((bundle / BUNDLE_MANIFEST).read_text())
    return list(m.get("files", {}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", help="zo-edge bundle (int8w or fp32 weights)")
    ap.add_argument("out", help="diffusers folder to write")
    ap.add_argument("--dtype", choices=DTYPES, default="float16", help="dtype of the saved weights")
    ap.add_argument("--configs-from", help="take the architecture from this diffusers folder's configs "
                                           "(default: the shapes model's recipe)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="skip the parity check against the bundle")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    cmd = "python -m zo_edge.convert.rebuild_source " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        rec = rebuild_source(args.bundle, args.out, dtype=args.dtype,
                             configs=configs_of(args.configs_from) if args.configs_from else None,
                             overwrite=args.overwrite, check=not args.no_check, threads=args.threads, command=cmd)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({rec['bytes'] / 1e6:.1f} MB, {rec['dtype']}) in {rec['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
