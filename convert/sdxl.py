"""``convert_sdxl``: a local diffusers ``StableDiffusionXLPipeline`` folder -> zo-edge bundle (family
``sdxl``; docs/bundle.md "SDXL bundles").

Each component is exported on its own with ``torch.onnx.export`` (the TorchScript exporter, as
Optimum uses), loaded, exported and freed before the next: the peak is the largest component (the
2.6 B-parameter UNet), not the whole pipeline.

* ``text_encoder`` (CLIP ViT-L, width 768) and ``text_encoder_2`` (OpenCLIP bigG, width 1280, with
  its projection) are exported taking ``inputs_embeds`` (token rows before position embeddings);
  their token tables go to ``token_embedding.npy`` beside each graph. ``input_ids`` stays an input
  only for pooling: the graph pools exactly as transformers does (the first EOS, or the argmax id
  for configs with ``eos_token_id`` 2, as SDXL's are) - the runtime's placeholder stand-in id is
  below EOS, so the pooled ``text_embeds`` stay at the end-of-text position. Outputs: the
  penultimate hidden state (SDXL conditions on ``hidden_states[-2]`` of both encoders,
  concatenated) and, for ``text_encoder_2``, ``text_embeds`` (pooled, projected).
* ``unet`` takes ``sample``, ``timestep`` (float32 [B]), ``encoder_hidden_states`` [B, L, 768+1280],
  and the added conditioning ``text_embeds`` [B, 1280] and ``time_ids`` [B, 6].
* ``vae_encoder`` / ``vae_decoder`` as for SD 1.x, always kept FP32 (weights and activations):
  SDXL's VAE overflows in FP16 (diffusers ships it with ``force_upcast``) and its weights are
  0.3 GB of a 10 GB model, so weight-only INT8 there would save little for a risk no one measured.

Weights: ``fp32``; ``int8w`` (weight-only INT8 on both text encoders and the UNet: the recipe for
personalization); ``int4w`` (the same with the UNet's weights 4-bit in blocks of 32); ``int8`` (static QDQ calibrated on the model's own data, as for SD 1.x) and
``int4`` (UNet MatMuls 4-bit weight-only, its Conv/Gemm INT8) on the text encoders and UNet.
"""
from __future__ import annotations

import gc
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from zo_runtime.errors import UserError

from .source import WEIGHT_FILES, SourceInfo, _component_class, _read_json

GRAPHS = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")
TEXT_GRAPHS = ("text_encoder", "text_encoder_2")
REQUIRED = ("unet", "text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2", "scheduler")
CLASSES = {"unet": "UNet2DConditionModel", "text_encoder": "CLIPTextModel",
           "text_encoder_2": "CLIPTextModelWithProjection", "vae": "AutoencoderKL"}
PENULTIMATE = "penultimate_hidden_state"
POOLED = "text_embeds"
TIME_IDS = 6                 # original (h, w), crop top-left (y, x), target (h, w)
MAIN_OUTPUT = {"text_encoder": PENULTIMATE, "text_encoder_2": PENULTIMATE, "unet": "out_sample",
               "vae_encoder": "latent_parameters", "vae_decoder": "sample"}
PARITY_TOL = 1e-4
PARITY_PROMPTS = ("a photo of a cat", "a red striped star on a grass background",
                  "an oil painting of a harbour at dawn, highly detailed", "")


def is_sdxl_source(src) -> bool:
    """A folder whose model_index.json names an SDXL pipeline (``text_encoder_2``, an ``XL`` class
    or a ``text_time`` UNet). Anything unreadable is left to the SD 1.x/2.x checks."""
    p = Path(src).expanduser()
    try:
        mi = json.loads((p / "model_index.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    if not isinstance(mi, dict):
        return False
    if "text_encoder_2" in mi or "XL" in str(mi.get("_class_name", "")):
        return True
    try:
        unet = json.loads((p / "unet" / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(unet, dict) and unet.get("addition_embed_type") == "text_time"


@dataclass
class SDXLSourceInfo(SourceInfo):
    text_encoder_2: dict = field(default_factory=dict)
    force_zeros_for_empty_prompt: bool = True

    @property
    def embedding_dims(self) -> dict:
        return {"clip_l": int(self.text_encoder["hidden_size"]), "clip_g": int(self.text_encoder_2["hidden_size"])}

    @property
    def embedding_dim(self) -> int:        # the learned token's width: both encoders' rows, concatenated
        return sum(self.embedding_dims.values())

    @property
    def pooled_dim(self) -> int:
        return int(self.text_encoder_2.get("projection_dim", self.text_encoder_2["hidden_size"]))

    @property
    def cross_attention_dim(self) -> int:
        c = self.unet.get("cross_attention_dim")
        return int(c[0] if isinstance(c, (list, tuple)) else c)


def inspect_sdxl(src) -> SDXLSourceInfo:
    """Validate ``src`` as an SDXL base pipeline folder; one UserError line naming what is wrong."""
    p = Path(src).expanduser()
    if not p.is_dir():
        raise UserError(f"SDXL source {p} is not a folder")
    mi = _read_json(p / "model_index.json", "model_index")
    if not isinstance(mi, dict):
        raise UserError(f"{p / 'model_index.json'} is not a JSON object")
    cls = str(mi.get("_class_name", ""))
    if mi.get("requires_aesthetics_score") or (_component_class(mi, "text_encoder") is None
                                               and _component_class(mi, "text_encoder_2")):
        raise UserError(f"{cls or 'this SDXL pipeline'} is an SDXL refiner (one text encoder, aesthetic-score time "
                        "ids); zo-edge converts the SDXL base pipeline")
    for comp in REQUIRED:
        if _component_class(mi, comp) is None:
            raise UserError(f"{p} is not an SDXL pipeline: model_index.json has no {comp!r} component")
        if not (p / comp).is_dir():
            raise UserError(f"SDXL component folder {comp}/ is missing in {p}")
    for comp, want in CLASSES.items():
        if _component_class(mi, comp) != want:
            raise UserError(f"unknown SDXL layout: {comp} is {_component_class(mi, comp)}, expected {want}")
        if not (p / comp / "config.json").is_file():
            raise UserError(f"SDXL component {comp}: {p / comp / 'config.json'} is missing")
        if not any((p / comp / w).is_file() for w in WEIGHT_FILES):
            raise UserError(f"SDXL component {comp}: no weights file in {p / comp}")
    if not (p / "scheduler" / "scheduler_config.json").is_file():
        raise UserError(f"SDXL component scheduler: {p / 'scheduler' / 'scheduler_config.json'} is missing")
    for tok in ("tokenizer", "tokenizer_2"):
        if not ((p / tok / "vocab.json").is_file() and (p / tok / "merges.txt").is_file()):
            raise UserError(f"SDXL component {tok}: {p / tok} needs vocab.json and merges.txt")
    unet = _read_json(p / "unet" / "config.json", "unet config")
    te = _read_json(p / "text_encoder" / "config.json", "text_encoder config")
    te2 = _read_json(p / "text_encoder_2" / "config.json", "text_encoder_2 config")
    vae = _read_json(p / "vae" / "config.json", "vae config")
    sched = _read_json(p / "scheduler" / "scheduler_config.json", "scheduler config")
    tok_cfg = _read_json(p / "tokenizer" / "tokenizer_config.json", "tokenizer config") \
        if (p / "tokenizer" / "tokenizer_config.json").is_file() else {}
    info = SDXLSourceInfo(path=p.resolve(), pipeline_class=cls, family="sdxl", model_index=mi, unet=unet, vae=vae,
                          text_encoder=te, scheduler=sched, tokenizer_config=tok_cfg, text_encoder_2=te2,
                          force_zeros_for_empty_prompt=bool(mi.get("force_zeros_for_empty_prompt", True)))
    if unet.get("addition_embed_type") != "text_time":
        raise UserError(f"unknown SDXL layout: the UNet's addition_embed_type is {unet.get('addition_embed_type')!r}, "
                        "expected 'text_time'")
    if not all(isinstance(c.get("hidden_size"), int) for c in (te, te2)):
        raise UserError("unknown SDXL layout: a text encoder config has no integer hidden_size")
    if info.cross_attention_dim != info.embedding_dim:
        raise UserError(f"unknown SDXL layout: UNet cross_attention_dim {info.cross_attention_dim} is not the two text "
                        f"encoders' widths {te['hidden_size']} + {te2['hidden_size']}")
    want = info.pooled_dim + TIME_IDS * int(unet.get("addition_time_embed_dim", 256))
    if int(unet.get("projection_class_embeddings_input_dim") or 0) != want:
        raise UserError(f"unknown SDXL layout: the UNet's added-conditioning width is "
                        f"{unet.get('projection_class_embeddings_input_dim')}, expected {want} (pooled "
                        f"{info.pooled_dim} + {TIME_IDS} time ids)")
    for k in ("in_channels", "out_channels"):
        if int(unet.get(k, 4)) != info.latent_channels:
            raise UserError(f"unknown SDXL layout: UNet {k} {unet.get(k)} for {info.latent_channels} latent channels "
                            "(inpainting models are not supported)")
    if info.prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"unknown SDXL layout: prediction_type {info.prediction_type!r}")
    return info


# -- export ------------------------------------------------------------------------------------

class _EmbedsIn:
    """Stands in for ``CLIPTextEmbeddings`` during tracing: the token lookup is skipped and the
    ``inputs_embeds`` given to the wrapper are used (position embeddings are still added)."""

    def __init__(self, embeddings):
        self.embeddings = embeddings
        self.value = None

    def __call__(self, input_ids=None, position_ids=None, inputs_embeds=None):
        return self.embeddings(position_ids=position_ids, inputs_embeds=self.value)


def _text_wrapper(model, pooled: bool):
    import torch

    class TextEmbeds(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.shim = _EmbedsIn(model.text_model.embeddings)

        def forward(self, inputs_embeds, input_ids):
            original = self.model.text_model.embeddings
            self.shim.value = inputs_embeds
            object.__setattr__(self.model.text_model, "embeddings", self.shim)  # bypass Module registration
            try:
                out = self.model(input_ids=input_ids, output_hidden_states=True, return_dict=True)
            finally:
                object.__setattr__(self.model.text_model, "embeddings", original)
            if pooled:
                return out.hidden_states[-2], out.text_embeds
            return (out.hidden_states[-2],)

    return TextEmbeds()


def _unet_wrapper(unet):
    import torch

    class UNetXL(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
            return self.unet(sample, timestep, encoder_hidden_states,
                             added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False)[0]

    return UNetXL()


def _vae_wrappers(vae):
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, sample):
            h = self.vae.encoder(sample)
            return self.vae.quant_conv(h) if self.vae.quant_conv is not None else h

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, latent_sample):
            z = self.vae.post_quant_conv(latent_sample) if self.vae.post_quant_conv is not None else latent_sample
            return self.vae.decoder(z)

    return Encoder(), Decoder()


def pretranspose_linears(module) -> int:
    """Replace every ``nn.Linear`` by an equivalent module holding its weight already transposed
    ([in, out]), so the traced graph is ``MatMul(x, W) + b`` on the initializer itself. The
    TorchScript exporter otherwise traces ``x @ W.T`` and constant-folds the transpose into a new
    copy of every weight (for the 2.6 B-parameter UNet, gigabytes on top of the model). Each old
    weight is freed as soon as its transposed copy exists. In place; returns how many."""
    import torch

    class LinearT(torch.nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.weight_t = torch.nn.Parameter(lin.weight.detach().t().contiguous(), requires_grad=False)
            self.bias = None if lin.bias is None else torch.nn.Parameter(lin.bias.detach(), requires_grad=False)

        def forward(self, x):
            y = torch.matmul(x, self.weight_t)
            return y if self.bias is None else y + self.bias

    n = 0
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            if type(sub) is torch.nn.Linear:
                setattr(child, attr, LinearT(sub))
                n += 1
    return n


def _onnx_export(module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict,
                 opset: int = 17) -> Path:
    """TorchScript export (torch >= 2.9 defaults to dynamo) into ``path.parent/raw``; returns the raw
    graph's path. :func:`consolidate` then writes ``path`` once the torch module is freed."""
    import warnings

    import torch

    raw = path.parent / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape asserts folded to constants
        torch.onnx.export(module, args, str(raw / "model.onnx"), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False)
    return raw / "model.onnx"


def consolidate(src: Path, dst: Path, align: int = 4096) -> list[Path]:
    """Write the graph at ``src`` to ``dst``: inline when small; over 2 GB, its external data (the
    TorchScript exporter writes one file per tensor) streamed tensor by tensor into one
    ``dst.name + "_data"`` file (page-aligned offsets), never holding the weights in memory. The
    ``src`` folder is removed. Returns the files written."""
    import onnx

    from .graphs import DATA_SUFFIX, _all_tensors, save_model

    dst.parent.mkdir(parents=True, exist_ok=True)
    m = onnx.load(str(src), load_external_data=False)
    external = [t for t in _all_tensors(m) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        files = save_model(m, dst, external=False)
        shutil.rmtree(src.parent)
        return files
    data = dst.with_name(dst.name + DATA_SUFFIX)
    offset = 0
    with open(data, "wb") as out:
        for t in external:
            meta = {e.key: e.value for e in t.external_data}
            with open(src.parent / meta["location"], "rb") as f:
                f.seek(int(meta.get("offset", 0)))
                blob = f.read(int(meta["length"])) if "length" in meta else f.read()
            pad = (-offset) % align
            out.write(b"\0" * pad)
            offset += pad
            out.write(blob)
            del t.external_data[:]
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(len(blob)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += len(blob)
    onnx.save_model(m, str(dst))
    shutil.rmtree(src.parent)
    return [dst, data]


def _tokenize(tokenizer_dir: Path, prompts, max_length: int) -> np.ndarray:
    from .calibrate import load_tokenizer, tokenize
    return tokenize(load_tokenizer(tokenizer_dir), list(prompts), max_length)


def export_sdxl(info: SDXLSourceInfo, out: Path, say: Callable[[str], None] = lambda m: None,
                run: Callable | None = None) -> dict:
    """:func:`_export_sdxl` with autograd off for its duration only (grad mode is process state:
    a caller that trains afterwards must find it as it was)."""
    import torch
    with torch.no_grad():
        return _export_sdxl(info, out, say, run)


def _export_sdxl(info: SDXLSourceInfo, out: Path, say: Callable[[str], None], run: Callable | None) -> dict:
    """Export the five graphs into ``out/<graph>/model.onnx`` and the two token tables into
    ``out/<graph>/token_embedding.npy``, one component in memory at a time. Returns a report with
    the text encoders' parity (max abs difference of the ORT graph on ``table[ids]`` against
    transformers on ``ids``)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    run = run or (lambda name, what, fn: fn())
    report: dict = {"text_parity_max_abs_diff": {}}
    L = info.max_length
    for g, cls, tok in (("text_encoder", CLIPTextModel, "tokenizer"),
                        ("text_encoder_2", CLIPTextModelWithProjection, "tokenizer_2")):
        def one(g=g, cls=cls, tok=tok):
            model = cls.from_pretrained(info.path / g, attn_implementation="eager", dtype=torch.float32).eval()
            table = model.text_model.embeddings.token_embedding.weight.detach().numpy()
            (out / g).mkdir(parents=True, exist_ok=True)
            np.save(out / g / "token_embedding.npy", np.ascontiguousarray(table, np.float32))
            pooled = g == "text_encoder_2"
            ids = torch.from_numpy(_tokenize(info.path / tok, PARITY_PROMPTS, L))
            names = [PENULTIMATE, POOLED] if pooled else [PENULTIMATE]
            axes = {"inputs_embeds": {0: "batch_size", 1: "sequence_length"},
                    "input_ids": {0: "batch_size", 1: "sequence_length"},
                    PENULTIMATE: {0: "batch_size", 1: "sequence_length"}}
            if pooled:
                axes[POOLED] = {0: "batch_size"}
            ref = model(input_ids=ids, output_hidden_states=True, return_dict=True)
            refs = [ref.hidden_states[-2].numpy()] + ([ref.text_embeds.numpy()] if pooled else [])
            pretranspose_linears(model)
            wrapper = _text_wrapper(model, pooled)
            raw = _onnx_export(wrapper, (torch.from_numpy(table[ids.numpy()[:2]]), ids[:2]), out / g / "model.onnx",
                               ["inputs_embeds", "input_ids"], names, axes)
            del model, wrapper
            gc.collect()
            consolidate(raw, out / g / "model.onnx")
            from .graphs import session
            s = session(out / g / "model.onnx")
            feed = {"inputs_embeds": np.ascontiguousarray(table[ids.numpy()], np.float32)}
            if "input_ids" in {i.name for i in s.get_inputs()}:
                feed["input_ids"] = ids.numpy().astype(np.int64)
            got = s.run(names, feed)
            diff = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(refs, got))
            if not diff <= PARITY_TOL:
                raise RuntimeError(f"{g}: the inputs_embeds graph differs from transformers by {diff:.3g}")
            report["text_parity_max_abs_diff"][g] = diff
            report.setdefault("input_ids_kept", {})[g] = "input_ids" in feed
        run("export", f"{g}: inputs_embeds graph + token table", one)
        say(f"[export] {g}: parity with transformers max abs diff {report['text_parity_max_abs_diff'][g]:.2e}")

    def unet_export():
        unet = UNet2DConditionModel.from_pretrained(info.path / "unet", torch_dtype=torch.float32).eval()
        h = w = int(info.unet.get("sample_size", 64) if not isinstance(info.unet.get("sample_size"), (list, tuple))
                    else info.unet["sample_size"][0])
        h = w = min(h, 16)  # traced shapes are dynamic; a small trace input keeps the export's memory low
        args = (torch.randn(2, info.latent_channels, h, w), torch.tensor([999.0, 999.0]),
                torch.randn(2, L, info.embedding_dim), torch.randn(2, info.pooled_dim),
                torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2))
        axes = {"sample": {0: "batch_size", 2: "height", 3: "width"}, "timestep": {0: "batch_size"},
                "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"}, "text_embeds": {0: "batch_size"},
                "time_ids": {0: "batch_size"}, "out_sample": {0: "batch_size", 2: "height", 3: "width"}}
        pretranspose_linears(unet)
        raw = _onnx_export(_unet_wrapper(unet), args, out / "unet" / "model.onnx",
                           ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"], ["out_sample"],
                           axes)
        del unet
        gc.collect()
        consolidate(raw, out / "unet" / "model.onnx")
    run("export", "unet (text_embeds + time_ids added conditioning)", unet_export)

    def vae_export():
        vae = AutoencoderKL.from_pretrained(info.path / "vae", torch_dtype=torch.float32).eval()
        enc, dec = _vae_wrappers(vae)
        f = info.vae_scale_factor
        consolidate(_onnx_export(enc, (torch.randn(1, 3, 8 * f, 8 * f),), out / "vae_encoder" / "model.onnx",
                                 ["sample"], ["latent_parameters"],
                                 {"sample": {0: "batch_size", 2: "height", 3: "width"},
                                  "latent_parameters": {0: "batch_size", 2: "height", 3: "width"}}),
                    out / "vae_encoder" / "model.onnx")
        consolidate(_onnx_export(dec, (torch.randn(1, info.latent_channels, 8, 8),), out / "vae_decoder" / "model.onnx",
                                 ["latent_sample"], ["sample"],
                                 {"latent_sample": {0: "batch_size", 2: "height", 3: "width"},
                                  "sample": {0: "batch_size", 2: "height", 3: "width"}}),
                    out / "vae_decoder" / "model.onnx")
        del vae, enc, dec
        gc.collect()
    run("export", "vae encoder + decoder", vae_export)
    return report


# -- calibration / held-out inputs --------------------------------------------------------------

def time_ids_for(res: int) -> np.ndarray:
    return np.array([[res, res, 0, 0, res, res]], np.float32)


def sdxl_inputs(info: SDXLSourceInfo, fp32: dict, tables: dict, n: int, seed: int, held_out: bool = False,
                per_band: int = 2, resolution: int | None = None, *, data):
    """Feeds for the five graphs from the model's own data (as ``calibrate.make_inputs`` does for
    SD 1.x): prompts through both FP32 text encoders, procedural images through the FP32 VAE
    encoder, those latents noised over the schedule for the UNet with the prompts' states, pooled
    embeddings and ``time_ids``. ``resolution`` (default the model's): the image size."""
    from .calibrate import InputSet, calibration_timesteps, heldout_timesteps
    from .graphs import session

    rng = np.random.default_rng(seed + (7919 if held_out else 0))
    res = resolution or info.resolution
    C = info.latent_channels
    out = InputSet()
    prompts = data.prompts(max(n, 2), seed + (1 if held_out else 0), held_out)
    prompts[0 if not held_out else -1] = ""
    out.prompts = prompts
    states, pooled = {}, None
    for g, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        ids = _tokenize(info.path / tok, prompts, info.max_length)
        s = session(fp32[g])
        names = {i.name for i in s.get_inputs()}
        feeds = []
        for k in range(len(prompts)):
            f = {"inputs_embeds": np.ascontiguousarray(tables[g][ids[k:k + 1]], np.float32)}
            if "input_ids" in names:
                f["input_ids"] = ids[k:k + 1]
            feeds.append(f)
        out.feeds[g] = feeds
        outs = [s.run(None, f) for f in feeds]
        states[g] = [o[0] for o in outs]
        if g == "text_encoder_2":
            pooled = [o[1] for o in outs]
        del s
    images = data.images(max(n, 1), res, seed + (2 if held_out else 0), held_out)
    out.feeds["vae_encoder"] = [{"sample": im[None]} for im in images]
    enc = session(fp32["vae_encoder"])
    latents = []
    for f in out.feeds["vae_encoder"]:
        p = enc.run(None, f)[0]
        mean, logvar = p[:, :C], np.clip(p[:, C:2 * C], -30.0, 20.0)
        latents.append((mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape)).astype(np.float32))
    del enc
    out.feeds["vae_decoder"] = [{"latent_sample": z} for z in latents]
    ab = info.alphas_cumprod()
    T = info.num_train_timesteps
    ts = heldout_timesteps(per_band, T, rng) if held_out else calibration_timesteps(max(n, 1), T, rng)
    unet = []
    for k, t in enumerate(ts):
        x0 = latents[k % len(latents)] * info.vae_scaling_factor
        eps = rng.standard_normal(x0.shape).astype(np.float32)
        xt = (np.sqrt(ab[t]) * x0 + np.sqrt(1.0 - ab[t]) * eps).astype(np.float32)
        j = k % len(prompts)
        unet.append({"sample": xt, "timestep": np.array([t], np.float32),
                     "encoder_hidden_states": np.concatenate([states["text_encoder"][j],
                                                              states["text_encoder_2"][j]], -1).astype(np.float32),
                     "text_embeds": pooled[j].astype(np.float32), "time_ids": time_ids_for(res)})
    out.feeds["unet"] = unet
    out.unet_timesteps = ts
    return out


def graph_accuracy(graph: str, reference: Path, converted: Path, held, num_train_timesteps: int) -> dict:
    """As ``accuracy.graph_accuracy``, with the SDXL graphs' main outputs."""
    from . import accuracy as acc
    from .calibrate import BANDS
    from .graphs import session

    out_name = MAIN_OUTPUT[graph]

    def outputs(path):
        s = session(path)
        names = {i.name for i in s.get_inputs()}
        res = [s.run([out_name], {k: v for k, v in f.items() if k in names})[0] for f in held.feeds[graph]]
        del s
        return res
    refs, outs = outputs(reference), outputs(converted)
    res = {"output": out_name, **acc._summ(refs, outs)}
    if graph == "unet":
        bands = {}
        for lo, hi in BANDS:
            blo, bhi = lo * num_train_timesteps / 1000, hi * num_train_timesteps / 1000
            idx = [k for k, t in enumerate(held.unet_timesteps) if blo <= t < bhi]
            if idx:
                bands[f"{lo}-{hi}"] = acc._summ([refs[k] for k in idx], [outs[k] for k in idx])
        res["bands"] = bands
    return res


# -- the bundle ----------------------------------------------------------------------------------

def convert_sdxl(src, out, weights: str = "int8w", text_encoder_fp32: bool = False, overwrite: bool = False,
                 calibration_samples: int = 8, provider: str = "cpu", fuse: bool | None = None,
                 per_channel: bool = False, heldout_samples: int = 4, heldout_per_band: int = 2, seed: int = 0,
                 export_dir=None, progress: Callable[[str], None] | None = None,
                 verify_resolution: int | None = None, *, data) -> dict:
    """Convert the SDXL folder ``src`` into a bundle at ``out`` (arguments as ``convert_pipeline``).
    ``verify_resolution``: image size of the held-out accuracy inputs (default the model's; the
    benchmark lowers it to keep the FP32 reference UNet's activations small)."""
    from .pipeline import DEFAULT_FUSE, PROVIDERS, Stages
    from .manifest import check_bundle_out, replace_dir
    from .quantize import WEIGHTS

    if weights not in WEIGHTS:
        raise UserError(f"unknown --weights {weights!r}; one of {', '.join(WEIGHTS)}")
    if provider not in PROVIDERS:
        raise UserError(f"unknown --provider {provider!r}; supported: {', '.join(PROVIDERS)}")
    if weights in ("int8", "int4") and calibration_samples < 1:
        raise UserError("--calibration-samples must be at least 1")
    if heldout_samples < 1 or heldout_per_band < 1:
        raise UserError("held-out sample counts must be at least 1")
    info = inspect_sdxl(src)
    out = Path(out).expanduser().absolute()
    check_bundle_out(out, overwrite)
    if out.resolve() == info.path or info.path in out.resolve().parents:
        raise UserError(f"output {out} must not be inside the source folder {info.path}")
    if export_dir is not None:
        missing = [g for g in GRAPHS if not (Path(export_dir) / g / "model.onnx").is_file()]
        if missing:
            raise UserError(f"export folder {export_dir} lacks {', '.join(missing)}")
    fuse = DEFAULT_FUSE[weights] if fuse is None else bool(fuse)
    out.parent.mkdir(parents=True, exist_ok=True)
    st = Stages(progress)
    st.say(f"converting {info.path} (sdxl, {info.prediction_type}, {info.resolution} px, text widths "
           f"{info.embedding_dims['clip_l']} + {info.embedding_dims['clip_g']}) -> {out}  weights={weights} fuse={fuse}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.zo-convert-", dir=out.parent))
    try:
        manifest = _build(info, tmp, weights, text_encoder_fp32, calibration_samples, provider, fuse, per_channel,
                          heldout_samples, heldout_per_band, seed, export_dir, verify_resolution, st, data)
        check_bundle_out(out, overwrite)
        replace_dir(tmp / "bundle", out, overwrite)
        st.say(f"bundle written to {out} in {st.total:.1f} s")
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build(info: SDXLSourceInfo, tmp: Path, weights: str, te_fp32: bool, n_calib: int, provider: str, fuse: bool,
           per_channel: bool, n_held: int, per_band: int, seed: int, export_dir, verify_res, st, data) -> dict:
    from zo_edge import __version__

    from . import accuracy as acc_mod
    from .graphs import session
    from zo_runtime.manifest import BUNDLE_FORMAT as FORMAT, FORMAT_VERSION

    from .graphs import copy_graph as _copy_graph
    from .manifest import graph_entry, write_manifest
    from .quantize import quantize_int4, quantize_int8, quantize_weight_only

    bundle = tmp / "bundle"
    bundle.mkdir()
    exp = Path(export_dir) if export_dir is not None else tmp / "export"
    if export_dir is None:
        report = export_sdxl(info, exp, st.say, st.run)
    else:
        st.say(f"[export] reusing {export_dir}")
        report = json.loads((exp / "export.json").read_text()) if (exp / "export.json").is_file() else {}
    reference = {g: exp / g / "model.onnx" for g in GRAPHS}
    tables = {g: np.load(exp / g / "token_embedding.npy", mmap_mode="r") for g in TEXT_GRAPHS}
    for g in TEXT_GRAPHS:
        (bundle / g).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(exp / g / "token_embedding.npy", bundle / g / "token_embedding.npy")

    unet_src = reference["unet"]
    fusion_counts: dict = {}
    if fuse:
        from .optimize import fuse_unet
        fused = tmp / "fused" / "unet" / "model.onnx"
        fusion_counts = st.run("optimize", "UNet fusions (CPU kernels only)", fuse_unet, reference["unet"], fused,
                               weights != "fp32")
        st.say(f"[optimize] fused ops: {fusion_counts}")
        unet_src = fused

    recipes: dict = {}
    precision: dict = {}
    calib = None
    if weights in ("int8", "int4"):
        calib = st.run("calibrate", f"{n_calib} samples per graph from the model's own data", sdxl_inputs, info,
                       reference, tables, n_calib, seed, False, 2, verify_res, data=data)

    def quantize():
        dst = {g: bundle / g / "model.onnx" for g in GRAPHS}
        for g in GRAPHS:
            dst[g].parent.mkdir(parents=True, exist_ok=True)
        for g in ("vae_encoder", "vae_decoder"):   # SDXL's VAE stays FP32 (module doc)
            _copy_graph(reference[g], dst[g])
            precision[g] = "fp32"
        for g in TEXT_GRAPHS:
            if weights == "fp32" or te_fp32:
                _copy_graph(reference[g], dst[g])
                precision[g] = "fp32"
            elif weights in ("int8w", "int4w"):   # int4w: only the UNet at 4 bits
                recipes[g] = quantize_weight_only(reference[g], dst[g])
                precision[g] = "int8w"
            else:
                recipes[g] = quantize_int8(reference[g], dst[g], calib.feeds[g], per_channel=per_channel)
                precision[g] = "int8"
        if weights == "fp32":
            _copy_graph(unet_src, dst["unet"])
            precision["unet"] = "fp32"
        elif weights in ("int8w", "int4w"):
            recipes["unet"] = quantize_weight_only(unet_src, dst["unet"], bits=8 if weights == "int8w" else 4)
            precision["unet"] = weights
        elif weights == "int8":
            recipes["unet"] = quantize_int8(unet_src, dst["unet"], calib.feeds["unet"], per_channel=per_channel)
            precision["unet"] = "int8"
        else:
            conv8 = tmp / "q" / "unet_conv8" / "model.onnx"
            conv8.parent.mkdir(parents=True)
            r8 = quantize_int8(unet_src, conv8, calib.feeds["unet"], op_types=("Conv", "Gemm"), per_channel=per_channel)
            recipes["unet"] = {"matmul": quantize_int4(conv8, dst["unet"]), "conv_gemm": r8}
            precision["unet"] = "int4"
    st.run("quantize", f"weights {weights} (VAE FP32)", quantize)

    changed = {g: precision[g] != "fp32" or (g == "unet" and fuse) for g in GRAPHS}

    def verify():
        held = sdxl_inputs(info, reference, tables, n_held, seed + 1000, True, per_band, verify_res, data=data)
        rep = {}
        for g in GRAPHS:
            if changed[g]:
                rep[g] = graph_accuracy(g, reference[g], bundle / g / "model.onnx", held, info.num_train_timesteps)
            else:
                session(bundle / g / "model.onnx")
                rep[g] = {"output": MAIN_OUTPUT[g], "cosine": 1.0, "rel_l2": 0.0, "identical": True}
        return rep
    accuracy = st.run("verify", "held-out accuracy vs the FP32 export", verify)
    for line in acc_mod.format_accuracy(accuracy):
        st.say(f"[verify] {line.strip()}")

    def finalize():
        for tok in ("tokenizer", "tokenizer_2"):
            shutil.copytree(info.path / tok, bundle / tok)
        (bundle / "scheduler").mkdir()
        shutil.copyfile(info.path / "scheduler" / "scheduler_config.json", bundle / "scheduler" / "scheduler_config.json")
        graphs = {}
        for g in GRAPHS:
            extra = {"fused": fuse, **({"fusions": fusion_counts} if fusion_counts else {})} if g == "unet" else {}
            graphs[g] = graph_entry(bundle, g, precision[g], extra)
        dims = info.embedding_dims
        quant = {"weights": weights, "text_encoder_fp32": te_fp32, "fuse": fuse, "provider": provider,
                 "per_channel": per_channel, "vae": "fp32: SDXL's VAE overflows in FP16 (force_upcast); kept FP32",
                 "calibration": None if calib is None else {
                     "samples": n_calib, "seed": seed, "unet_timesteps": sorted(int(t) for t in calib.unet_timesteps)},
                 "graphs": recipes}
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"zo-edge {__version__}",
            "family": "sdxl",
            "source": {"path": str(info.path), "pipeline_class": info.pipeline_class or "StableDiffusionXLPipeline"},
            "resolution": info.resolution, "vae_scale_factor": info.vae_scale_factor,
            "vae_scaling_factor": info.vae_scaling_factor, "latent_channels": info.latent_channels,
            "embedding_dim": info.embedding_dim, "embedding_dims": dims, "pooled_dim": info.pooled_dim,
            "max_length": info.max_length, "prediction_type": info.prediction_type,
            "noise_schedule": info.noise_schedule, "graphs": graphs,
            "token_embedding": {"path": "text_encoder/token_embedding.npy", "encoder": "clip_l",
                                "shape": [int(s) for s in tables["text_encoder"].shape], "dtype": "float32"},
            "token_embedding_2": {"path": "text_encoder_2/token_embedding.npy", "encoder": "clip_g",
                                  "shape": [int(s) for s in tables["text_encoder_2"].shape], "dtype": "float32"},
            "sdxl": {"text_outputs": PENULTIMATE, "pooled_from": "text_encoder_2", "time_ids": TIME_IDS,
                     "force_zeros_for_empty_prompt": info.force_zeros_for_empty_prompt},
            "text_encoder_surgery": {"method": "exported taking inputs_embeds (convert/sdxl.py)", **report},
            "tokenizer": "tokenizer", "tokenizer_2": "tokenizer_2",
            "scheduler_config": "scheduler/scheduler_config.json",
            "quantization": quant, "accuracy": accuracy, "build": {"seconds": None, "stages": st.records},
        }
    manifest = st.run("finalize", "tokenizers, scheduler, manifest", finalize)
    manifest["build"]["seconds"] = st.total
    return write_manifest(bundle, manifest)


def export_only(src, out, progress=None) -> dict:
    """Export an SDXL folder's five graphs and token tables to ``out`` (a folder ``convert_sdxl``
    takes as ``export_dir``); writes ``out/export.json``."""
    info = inspect_sdxl(src)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = export_sdxl(info, out, progress or (lambda m: None))
    (out / "export.json").write_text(json.dumps(report))
    return report


__all__ = ["convert_sdxl", "inspect_sdxl", "is_sdxl_source", "export_sdxl", "export_only", "sdxl_inputs"]
