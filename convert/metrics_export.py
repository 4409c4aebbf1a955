"""Export the evaluation models (CLIP and DINOv2) to ONNX for ``zo-edge evaluate`` (workstation side).

``zo-edge convert-metrics --clip ./clip-vit-base-patch32 --dino ./dinov2-base OUT`` reads LOCAL
Hugging Face folders (no download) and writes a metrics bundle that the torch-free runtime
(``zo_edge.eval.metrics``) reads::

    OUT/
      metrics.json                  the manifest (below)
      clip/image_encoder.onnx       pixel_values float32 [B,3,H,W] -> image_embeds [B,D] (vision tower + visual_projection)
      clip/text_encoder.onnx        input_ids int64 [B,L]           -> text_embeds  [B,D] (text tower + text_projection)
      clip/tokenizer/               vocab.json, merges.txt, configs copied from the CLIP folder
      dino/model.onnx               pixel_values float32 [B,3,H,W] -> cls [B,D] (last_hidden_state[:, 0], after the
                                    final layernorm: the DINOv2 CLS feature the DINO metric uses)

The embeddings are NOT normalized in the graphs; the runtime L2-normalizes them. Every graph has a
dynamic batch axis (and the text graph a dynamic sequence axis); the image graphs take the fixed
size the preprocessing produces (the centre crop). ``metrics.json``::

    {"format": "zo-edge-metrics", "format_version": 1, "created_by": "zo-edge 0.1.0", "opset": 17,
     "clip": {"source": {...}, "embedding_dim": 512, "max_length": 77, "tokenizer": "clip/tokenizer",
              "image": {"path": "clip/image_encoder.onnx", "input": "pixel_values", "output": "image_embeds"},
              "text":  {"path": "clip/text_encoder.onnx",  "input": "input_ids",    "output": "text_embeds"},
              "preprocess": PREPROCESS, "check": {...}},
     "dino": {"source": {...}, "embedding_dim": 768, "image": {...}, "preprocess": PREPROCESS, "check": {...}},
     "files": {"clip/image_encoder.onnx": {"sha256": "...", "bytes": 123}, ...}}

    PREPROCESS = {"processor_class": "CLIPImageProcessor", "convert_rgb": true,
                  "resize": {"shortest_edge": 224} | {"height": h, "width": w} | null,
                  "resample": 3, "resample_name": "bicubic",
                  "center_crop": {"height": 224, "width": 224} | null,
                  "rescale_factor": 0.00392156862745098 | null,
                  "normalize": {"mean": [...], "std": [...]} | null,
                  "input_size": [224, 224]}

The bundle is built in a temporary sibling folder and renamed into place, so a failed export
never leaves a half-written OUT.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

from zo_runtime.errors import UserError
from zo_runtime.manifest import FORMAT_VERSION, METRICS_FORMAT, METRICS_MANIFEST

from .manifest import file_table, replace_dir

OPSET = 17
SUPPORTED_PROCESSORS = ("CLIPImageProcessor", "BitImageProcessor")
CLIP_MODEL_TYPES = ("clip",)
DINO_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.json", "added_tokens.json")
# Largest allowed gap between the exported graph and the PyTorch model on the export check.
CHECK_MIN_COSINE = 0.9999


# -- input validation ------------------------------------------------------------------------

def _read_config(folder: Path, what: str) -> dict:
    if not folder.is_dir():
        raise UserError(f"{what} folder {str(folder)!r} does not exist")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise UserError(f"{str(folder)!r} has no config.json: give a local Hugging Face {what} model folder")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{cfg} is not readable JSON ({e})") from None


def _check_clip_folder(folder: Path) -> dict:
    cfg = _read_config(folder, "CLIP")
    mt = cfg.get("model_type")
    if mt not in CLIP_MODEL_TYPES:
        raise UserError(f"{str(folder)!r} is not a CLIP model (config.json model_type is {mt!r}, want 'clip' "
                        "with both the text and the vision tower)")
    if not (folder / "preprocessor_config.json").is_file():
        raise UserError(f"{str(folder)!r} has no preprocessor_config.json (the CLIP image preprocessing)")
    missing = [f for f in ("vocab.json", "merges.txt") if not (folder / f).is_file()]
    if missing:
        raise UserError(f"{str(folder)!r} has no CLIP tokenizer ({', '.join(missing)} missing)")
    return cfg


def _check_dino_folder(folder: Path) -> dict:
    cfg = _read_config(folder, "DINOv2")
    mt = cfg.get("model_type")
    if mt not in DINO_MODEL_TYPES:
        raise UserError(f"{str(folder)!r} is not a DINOv2 model (config.json model_type is {mt!r}, want 'dinov2')")
    if not (folder / "preprocessor_config.json").is_file():
        raise UserError(f"{str(folder)!r} has no preprocessor_config.json (the DINOv2 image preprocessing)")
    return cfg


# -- preprocessing spec ----------------------------------------------------------------------

def _load_processor(folder: Path):
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(str(folder), use_fast=False, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad folder
        raise UserError(f"cannot read the image preprocessing of {str(folder)!r}: {str(e).splitlines()[0]}") from None
    name = type(proc).__name__
    if name not in SUPPORTED_PROCESSORS:
        raise UserError(f"{str(folder)!r} uses {name}; supported image processors: {', '.join(SUPPORTED_PROCESSORS)}")
    return proc


def preprocess_spec(proc) -> dict:
    """The manifest's PREPROCESS entry from a (slow) transformers CLIP/Bit image processor."""
    from PIL import Image

    resize = None
    if proc.do_resize:
        size = dict(proc.size)
        if "shortest_edge" in size:
            resize = {"shortest_edge": int(size["shortest_edge"])}
        elif "height" in size and "width" in size:
            resize = {"height": int(size["height"]), "width": int(size["width"])}
        else:
            raise UserError(f"unsupported resize setting {size} (want shortest_edge, or height and width)")
    crop = None
    if proc.do_center_crop:
        cs = dict(proc.crop_size)
        crop = {"height": int(cs["height"]), "width": int(cs["width"])}
    if crop is not None:
        input_size = [crop["height"], crop["width"]]
    elif resize is not None and "height" in resize:
        input_size = [resize["height"], resize["width"]]
    else:
        raise UserError("the image preprocessing does not produce a fixed size (no centre crop, no fixed resize)")
    resample = int(proc.resample)
    return {
        "processor_class": type(proc).__name__,
        "convert_rgb": bool(getattr(proc, "do_convert_rgb", True)),
        "resize": resize,
        "resample": resample,
        "resample_name": Image.Resampling(resample).name.lower(),
        "center_crop": crop,
        "rescale_factor": float(proc.rescale_factor) if proc.do_rescale else None,
        "normalize": ({"mean": [float(x) for x in proc.image_mean], "std": [float(x) for x in proc.image_std]}
                      if proc.do_normalize else None),
        "input_size": input_size,
    }


# -- export ------------------------------------------------------------------------------------

def _export(module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_axes: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET,
                              input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                              do_constant_folding=True)


def _check(module, onnx_path: Path, feed: dict) -> dict:
    """Run the graph in ONNX Runtime and the module in PyTorch on the same input; compare."""
    import numpy as np
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v for k, v in feed.items()})[0]
    with torch.no_grad():
        ref = module(*[torch.from_numpy(v) for v in feed.values()]).float().numpy()
    a = got / np.linalg.norm(got, axis=-1, keepdims=True)
    b = ref / np.linalg.norm(ref, axis=-1, keepdims=True)
    cos = float((a * b).sum(-1).min())
    out = {"batch": int(ref.shape[0]), "max_abs_diff": float(np.abs(got - ref).max()), "min_cosine": cos}
    if not cos >= CHECK_MIN_COSINE:
        raise RuntimeError(f"exported {onnx_path.name} disagrees with PyTorch (min cosine {cos:.6f})")
    return out


def _clip_wrappers(model):
    import torch

    class ClipImage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, pixel_values):
            return self.m.get_image_features(pixel_values=pixel_values)

    class ClipText(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids):
            # No attention mask: the causal mask already hides the padding after the EOS token the
            # features are pooled from, so padded and unpadded prompts give the same text_embeds.
            return self.m.get_text_features(input_ids=input_ids)

    return ClipImage().eval(), ClipText().eval()


def _dino_wrapper(model):
    import torch

    class DinoCls(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, pixel_values):
            return self.m(pixel_values=pixel_values).last_hidden_state[:, 0]

    return DinoCls().eval()


def _max_length(folder: Path, text_cfg) -> int:
    n = int(getattr(text_cfg, "max_position_embeddings", 77))
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        try:
            m = json.loads(tc.read_text(encoding="utf-8")).get("model_max_length")
        except (OSError, json.JSONDecodeError):
            m = None
        if isinstance(m, (int, float)) and 0 < m < 100_000:
            n = min(n, int(m))
    return n


def _source(folder: Path, cfg: dict) -> dict:
    return {"path": str(folder.resolve()), "model_type": cfg.get("model_type"),
            "name_or_path": cfg.get("_name_or_path") or folder.name,
            "architectures": cfg.get("architectures")}


def export_clip(folder: Path, out: Path, rel: str = "clip") -> dict:
    import numpy as np
    import torch
    from transformers import CLIPModel

    cfg = _check_clip_folder(folder)
    proc = _load_processor(folder)
    pre = preprocess_spec(proc)
    try:
        model = CLIPModel.from_pretrained(str(folder), attn_implementation="eager", local_files_only=True,
                                          torch_dtype=torch.float32).eval()
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot load the CLIP weights from {str(folder)!r}: {str(e).splitlines()[0]}") from None
    vis = model.config.vision_config
    if pre["input_size"] != [vis.image_size, vis.image_size]:
        raise UserError(f"CLIP preprocessing makes {pre['input_size']} images but the vision tower wants "
                        f"{vis.image_size}x{vis.image_size}")
    h, w = pre["input_size"]
    image_mod, text_mod = _clip_wrappers(model)
    (out / rel).mkdir(parents=True, exist_ok=True)

    image_path = out / rel / "image_encoder.onnx"
    _export(image_mod, (torch.randn(2, 3, h, w),), image_path, ["pixel_values"], ["image_embeds"],
            {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}})
    max_length = _max_length(folder, model.config.text_config)
    text_path = out / rel / "text_encoder.onnx"
    bos = int(model.config.text_config.bos_token_id)
    eos = int(model.config.text_config.eos_token_id)
    ids = np.full((2, max_length), eos if eos != 2 else 49407, dtype=np.int64)
    ids[:, 0] = bos
    ids[:, 1:4] = 320
    _export(text_mod, (torch.from_numpy(ids),), text_path, ["input_ids"], ["text_embeds"],
            {"input_ids": {0: "batch", 1: "sequence"}, "text_embeds": {0: "batch"}})

    # Export check on a different batch size and random content.
    rng = np.random.default_rng(0)
    check_img = _check(image_mod, image_path, {"pixel_values": rng.standard_normal((3, 3, h, w)).astype(np.float32)})
    vocab = int(model.config.text_config.vocab_size)
    ids = rng.integers(0, min(vocab, 49405), size=(3, max_length)).astype(np.int64)
    ids[:, 0] = min(bos, vocab - 1)
    for i, n in enumerate((3, 9, max_length - 1)):
        ids[i, n:] = min(eos if eos != 2 else vocab - 1, vocab - 1)
    check_txt = _check(text_mod, text_path, {"input_ids": ids})

    tok_dir = out / rel / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        if (folder / f).is_file():
            shutil.copy2(folder / f, tok_dir / f)
    return {
        "source": _source(folder, cfg),
        "embedding_dim": int(model.config.projection_dim),
        "max_length": max_length,
        "tokenizer": f"{rel}/tokenizer",
        "image": {"path": f"{rel}/image_encoder.onnx", "input": "pixel_values", "output": "image_embeds"},
        "text": {"path": f"{rel}/text_encoder.onnx", "input": "input_ids", "output": "text_embeds"},
        "preprocess": pre,
        "check": {"image": check_img, "text": check_txt},
    }


def export_dino(folder: Path, out: Path, rel: str = "dino") -> dict:
    import numpy as np
    import torch
    from transformers import AutoModel

    cfg = _check_dino_folder(folder)
    proc = _load_processor(folder)
    pre = preprocess_spec(proc)
    try:
        model = AutoModel.from_pretrained(str(folder), attn_implementation="eager", local_files_only=True,
                                          torch_dtype=torch.float32).eval()
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot load the DINOv2 weights from {str(folder)!r}: {str(e).splitlines()[0]}") from None
    patch = int(model.config.patch_size)
    h, w = pre["input_size"]
    if h % patch or w % patch:
        raise UserError(f"DINOv2 input size {h}x{w} is not a multiple of its patch size {patch}")
    mod = _dino_wrapper(model)
    path = out / rel / "model.onnx"
    _export(mod, (torch.randn(2, 3, h, w),), path, ["pixel_values"], ["cls"],
            {"pixel_values": {0: "batch"}, "cls": {0: "batch"}})
    rng = np.random.default_rng(0)
    check = _check(mod, path, {"pixel_values": rng.standard_normal((3, 3, h, w)).astype(np.float32)})
    return {
        "source": _source(folder, cfg),
        "embedding_dim": int(model.config.hidden_size),
        "image": {"path": f"{rel}/model.onnx", "input": "pixel_values", "output": "cls"},
        "feature": "last_hidden_state[:, 0] (CLS token after the final layernorm)",
        "preprocess": pre,
        "check": {"image": check},
    }


def export_metrics(out_dir: str | Path, clip_dir: str | Path | None = None, dino_dir: str | Path | None = None,
                   overwrite: bool = False, log=print) -> Path:
    """Export CLIP and/or DINOv2 into a metrics bundle at ``out_dir``; returns its path."""
    from zo_edge import __version__

    if clip_dir is None and dino_dir is None:
        raise UserError("give --clip and/or --dino: there is nothing to export")
    out = Path(out_dir)
    # Validate every input before any slow work.
    if clip_dir is not None:
        _check_clip_folder(Path(clip_dir))
    if dino_dir is not None:
        _check_dino_folder(Path(dino_dir))
    if out.exists() and not out.is_dir():
        raise UserError(f"{str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{str(out)!r} already exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        manifest: dict = {"format": METRICS_FORMAT, "format_version": FORMAT_VERSION,
                          "created_by": f"zo-edge {__version__}", "opset": OPSET}
        if clip_dir is not None:
            log(f"exporting CLIP from {clip_dir}")
            manifest["clip"] = export_clip(Path(clip_dir), tmp)
        if dino_dir is not None:
            log(f"exporting DINOv2 from {dino_dir}")
            manifest["dino"] = export_dino(Path(dino_dir), tmp)
        manifest["files"] = file_table(tmp, METRICS_MANIFEST)
        (tmp / METRICS_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.exists() and not (out.is_dir() and (overwrite or not any(out.iterdir()))):
            raise UserError(f"{str(out)!r} appeared while this command ran; refusing to replace it")
        replace_dir(tmp, out, overwrite=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
