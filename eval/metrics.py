"""The paper's evaluation metrics on ONNX Runtime (torch-free): CLIP-I, CLIP-T, DINO, DINO-inter.

Models come from a metrics bundle written by ``zo-edge convert-metrics`` (see
``zo_edge.convert.metrics_export`` for its layout and ``metrics.json``). The image preprocessing
repeats transformers' slow ``CLIPImageProcessor`` / ``BitImageProcessor`` step by step in numpy
and PIL (convert to RGB, PIL resize of the shortest edge, centre crop, rescale 1/255, normalize),
so pixel values match the transformers processors to float32 rounding.

Metric definitions (every embedding is L2-normalized first; "cosine" is their dot product):

* ``clip_i(ref, gen)``  - mean CLIP image-image cosine over every (reference, generated) pair.
* ``clip_t(gen, text)`` - mean cosine of each generated image with the CLIP text embedding of its
  own prompt. For textual-inversion methods the placeholder is replaced with the class word first
  (:func:`prompt_for_clip_t`: ``"a photo of <my-dog>"`` -> ``"a photo of dog"``).
* ``dino(ref, gen)``    - mean DINOv2 CLS cosine over every (reference, generated) pair.
* ``dino_inter(groups)``- for each prompt, the mean DINOv2 cosine over ordered pairs (i != j) of its
  generated images; averaged over prompts (prompts with fewer than two images are skipped).
  Higher means less diverse generations.

Generated images and their prompts (:func:`assign_generated`): every image in ``generated_dir``
(top level; .png .jpg .jpeg .webp .bmp) is assigned to a prompt of the prompts file by

1. its PNG text metadata key ``"prompt"`` (what ``zo-edge generate`` writes), which must equal one
   of the prompts (whitespace-insensitive; a prompt listed twice is told apart by the file name);
2. else its file name ``{prompt_index}_{k}.png`` (``zo-edge generate --out-dir`` writes
   ``003_1.png``: prompt 3 of the file, 0-based, image 1).

``grid.png`` without metadata (``generate --grid``) and dot-files are left out; any other image
that cannot be assigned is an error, and so is a prompt with no image.

The prompts file is read as ``zo-edge generate --prompts`` reads it: UTF-8 text, every non-blank
line a prompt (stripped); or a ``.json`` list of strings.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from zo_runtime.bundle import resolve_provider
from zo_runtime.data import list_images
from zo_runtime.errors import UserError
from zo_runtime.manifest import METRICS_FORMAT, METRICS_MANIFEST, listed, read_manifest, verify_files

PROMPT_KEY = "prompt"
_INDEX_NAME = re.compile(r"^(\d+)_")
SKIP_NAMES = frozenset({"grid.png"})  # zo-edge generate --grid


# -- image preprocessing ----------------------------------------------------------------------

def open_image(path: str | Path) -> Image.Image:
    """Open an image file as transformers' ``load_image`` does: EXIF orientation applied, RGB."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(f"cannot read image {str(path)!r}: {e}") from None


def _as_pil(img, convert_rgb: bool = True) -> Image.Image:
    if isinstance(img, (str, Path)):
        return open_image(img)
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3, 4)):
            raise ValueError(f"image arrays must be uint8 [H, W] or [H, W, 1|3|4], got {img.dtype} {img.shape}")
        img = Image.fromarray(img[..., 0] if img.ndim == 3 and img.shape[2] == 1 else img)
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected an image path, a PIL image or a uint8 array, got {type(img).__name__}")
    if img.mode != "RGB":  # the graphs take 3 channels whatever do_convert_rgb says
        img = img.convert("RGB")
    return img


def _shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """transformers' ``get_resize_output_image_size(default_to_square=False)``: (height, width)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(a: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """transformers' ``center_crop`` on an [H, W, C] array, zero-padding images smaller than the crop."""
    h, w = a.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0 and top + ch <= h and left + cw <= w:
        return a[top:top + ch, left:left + cw]
    nh, nw = max(ch, h), max(cw, w)
    out = np.zeros((nh, nw) + a.shape[2:], dtype=a.dtype)
    tp, lp = -(-(nh - h) // 2), -(-(nw - w) // 2)  # ceil
    out[tp:tp + h, lp:lp + w] = a
    top, left = top + tp, left + lp
    return out[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


class Preprocess:
    """One model's image preprocessing, from the PREPROCESS entry of ``metrics.json``."""

    def __init__(self, spec: dict):
        self.spec = dict(spec)
        self.convert_rgb = bool(spec.get("convert_rgb", True))
        self.resize = spec.get("resize")
        self.resample = Image.Resampling(int(spec.get("resample", Image.Resampling.BICUBIC)))
        self.crop = spec.get("center_crop")
        self.rescale = spec.get("rescale_factor")
        norm = spec.get("normalize")
        self.mean = np.asarray(norm["mean"], dtype=np.float32) if norm else None
        self.std = np.asarray(norm["std"], dtype=np.float32) if norm else None
        self.input_size = tuple(int(x) for x in spec["input_size"])

    def one(self, image) -> np.ndarray:
        """float32 [3, H, W] for one image (path, PIL image or uint8 array)."""
        img = _as_pil(image, self.convert_rgb)
        if self.resize is not None:
            if "shortest_edge" in self.resize:
                h, w = _shortest_edge_size(img.height, img.width, int(self.resize["shortest_edge"]))
            else:
                h, w = int(self.resize["height"]), int(self.resize["width"])
            img = img.resize((w, h), resample=self.resample)
        a = np.asarray(img)
        if self.crop is not None:
            a = _center_crop(a, int(self.crop["height"]), int(self.crop["width"]))
        if self.rescale is not None:
            a = (a.astype(np.float64) * float(self.rescale)).astype(np.float32)
        else:
            a = a.astype(np.float32)
        if self.mean is not None:
            a = (a - self.mean) / self.std
        if a.shape[:2] != self.input_size:
            raise ValueError(f"preprocessing produced {a.shape[:2]}, the model wants {self.input_size}")
        return np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32)

    def __call__(self, images: Sequence) -> np.ndarray:
        """float32 [B, 3, H, W]."""
        return np.stack([self.one(im) for im in images]).astype(np.float32, copy=False)


# -- the bundle ---------------------------------------------------------------------------------

def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x.astype(np.float64), axis=axis, keepdims=True)
    return (x / np.maximum(n, eps)).astype(np.float32)


def _as_list(images) -> list:
    if isinstance(images, (str, Path, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)
                                                          and images.dtype == np.uint8):
        return [images]
    return list(images)


class MetricsBundle:
    """A metrics bundle: CLIP (image + text) and/or DINOv2 ONNX graphs with their preprocessing."""

    def __init__(self, root: Path, manifest: dict, provider: str = "cpu", threads: int = 0):
        self.root = root
        self.manifest = manifest
        self.provider = provider
        self.threads = threads
        self._sessions: dict = {}
        self._tokenizer = None
        self._pre = {k: Preprocess(manifest[k]["preprocess"]) for k in ("clip", "dino") if k in manifest}

    @classmethod
    def load(cls, path: str | Path, provider: str = "cpu", verify: bool = True, threads: int = 0) -> "MetricsBundle":
        root = Path(path)
        mf = root / METRICS_MANIFEST
        manifest = read_manifest(root, METRICS_MANIFEST, METRICS_FORMAT, "metrics bundle",
                                 "run zo-edge convert-metrics")
        if "clip" not in manifest and "dino" not in manifest:
            raise UserError(f"{mf} lists neither a CLIP nor a DINOv2 model")
        try:
            b = cls(root, manifest, provider=provider, threads=threads)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{mf} is damaged ({type(e).__name__}: {e}): convert the metrics again") from None
        if verify:
            b.verify()
        return b

    def verify(self) -> None:
        """Check every file listed in the manifest exists with its recorded size and sha256."""
        verify_files(self.root, self.manifest.get("files", {}), "metrics bundle", "convert the metrics again")

    @property
    def has_clip(self) -> bool:
        return "clip" in self.manifest

    @property
    def has_dino(self) -> bool:
        return "dino" in self.manifest

    def _need(self, key: str) -> dict:
        if key not in self.manifest:
            name = {"clip": "CLIP", "dino": "DINOv2"}[key]
            raise UserError(f"the metrics bundle {self.root} has no {name} model (convert-metrics --{key} ...)")
        return self.manifest[key]

    def session(self, key: str, part: str):
        if (key, part) not in self._sessions:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if self.threads:
                opts.intra_op_num_threads = self.threads
            path = listed(self.root, self.manifest, self._need(key)[part]["path"], f"{key} {part} graph")
            self._sessions[(key, part)] = ort.InferenceSession(str(path), sess_options=opts,
                                                               providers=resolve_provider(self.provider))
        return self._sessions[(key, part)]

    def preprocess(self, key: str, images) -> np.ndarray:
        """Pixel values float32 [B, 3, H, W] exactly as the model's transformers processor makes them."""
        self._need(key)
        return self._pre[key](_as_list(images))

    def _embed_images(self, key: str, images, batch_size: int) -> np.ndarray:
        spec = self._need(key)["image"]
        images = _as_list(images)
        if not images:
            raise ValueError("no images to embed")
        sess = self.session(key, "image")
        out = []
        for i in range(0, len(images), batch_size):
            px = self._pre[key](images[i:i + batch_size])
            out.append(sess.run([spec["output"]], {spec["input"]: px})[0])
        return l2_normalize(np.concatenate(out))

    def clip_image(self, images, batch_size: int = 16) -> np.ndarray:
        """L2-normalized CLIP image embeddings, float32 [B, D]."""
        return self._embed_images("clip", images, batch_size)

    def dino(self, images, batch_size: int = 16) -> np.ndarray:
        """L2-normalized DINOv2 CLS features, float32 [B, D]."""
        return self._embed_images("dino", images, batch_size)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from zo_runtime.manifest import inside
            from zo_runtime.tokenizer import CLIPTokenizer
            self._tokenizer = CLIPTokenizer.from_pretrained(inside(self.root, self._need("clip")["tokenizer"],
                                                                   "clip tokenizer folder"))
        return self._tokenizer

    def clip_text(self, texts: Iterable[str] | str, batch_size: int = 64) -> np.ndarray:
        """L2-normalized CLIP text embeddings, float32 [B, D] (prompts truncated to max_length)."""
        spec = self._need("clip")["text"]
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no texts to embed")
        ids, _ = self.tokenizer.batch_encode(texts)
        sess = self.session("clip", "text")
        out = [sess.run([spec["output"]], {spec["input"]: ids[i:i + batch_size]})[0]
               for i in range(0, len(ids), batch_size)]
        return l2_normalize(np.concatenate(out))


# -- metric definitions -------------------------------------------------------------------------

def _emb(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] array, got shape {a.shape}")
    n = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.maximum(n, 1e-12)


def cosine_matrix(a, b) -> np.ndarray:
    """Cosine of every row of ``a`` with every row of ``b``: float64 [len(a), len(b)]."""
    a, b = _emb(a, "a"), _emb(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding sizes differ: {a.shape[1]} vs {b.shape[1]}")
    return a @ b.T


def clip_i(ref_emb, gen_emb) -> float:
    """CLIP-I: mean cosine over every (reference image, generated image) pair."""
    return float(cosine_matrix(ref_emb, gen_emb).mean())


def clip_t(gen_img_emb, text_emb) -> float:
    """CLIP-T: mean cosine of each generated image with its prompt's text embedding.

    ``text_emb`` is row-aligned with ``gen_img_emb`` ([N, D]: row i is image i's prompt) or a
    single prompt [1, D] for all images."""
    g, t = _emb(gen_img_emb, "gen_img_emb"), _emb(text_emb, "text_emb")
    if g.shape[1] != t.shape[1]:
        raise ValueError(f"embedding sizes differ: {g.shape[1]} vs {t.shape[1]}")
    if t.shape[0] not in (1, g.shape[0]):
        raise ValueError(f"text_emb has {t.shape[0]} rows; want 1 or one per generated image ({g.shape[0]})")
    return float((g * t).sum(axis=1).mean())


def dino(ref_emb, gen_emb) -> float:
    """DINO: mean DINOv2 CLS cosine over every (reference image, generated image) pair."""
    return float(cosine_matrix(ref_emb, gen_emb).mean())


dino_i = dino


def _inter(g) -> float | None:
    g = _emb(g, "gen_by_prompt[i]")
    n = g.shape[0]
    if n < 2:
        return None
    c = g @ g.T
    return float((c.sum() - np.trace(c)) / (n * (n - 1)))


def dino_inter(gen_by_prompt: Sequence) -> float:
    """DINO-inter: per prompt, the mean cosine over pairs (i != j) of its generated images' DINOv2
    features; averaged over the prompts that have at least two images."""
    vals = [v for v in (_inter(g) for g in gen_by_prompt) if v is not None]
    if not vals:
        raise ValueError("dino_inter needs at least one prompt with two or more images")
    return float(np.mean(vals))


def prompt_for_clip_t(prompt: str, placeholder: str | None, class_word: str | None) -> str:
    """The text CLIP-T compares against: the placeholder replaced with the class word.

    ``"a photo of <my-dog>"`` -> ``"a photo of dog"``; DreamBooth-style ``"a <my-dog> dog on the
    beach"`` -> ``"a dog on the beach"`` (no doubled class word). No placeholder: unchanged."""
    if not placeholder:
        return prompt
    if not class_word:
        raise ValueError("a class word is needed to replace the placeholder")
    pat = re.compile(re.escape(placeholder) + r"(?:\s+" + re.escape(class_word) + r"(?![\w-]))?", re.IGNORECASE)
    out = pat.sub(lambda m: class_word, prompt)
    return " ".join(out.split())


# -- files: prompts, references, generated images -------------------------------------------------

def _norm_ws(s: str) -> str:
    return " ".join(s.split())


def read_prompts(path: str | Path) -> list[str]:
    """Prompts as ``zo-edge generate --prompts`` reads them: every non-blank line of a UTF-8 text
    file, stripped (so line i is prompt i); or a ``.json`` list of strings."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompts file {str(path)!r}: {e}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"prompts file {str(path)!r} is not valid JSON ({e})") from None
        if isinstance(data, dict):
            data = data.get("prompts")
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise UserError(f"prompts file {str(path)!r} must hold a JSON list of strings")
        prompts = [p.strip() for p in data if p.strip()]
    else:
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not prompts:
        raise UserError(f"prompts file {str(path)!r} has no prompts")
    return prompts


def png_prompt(path: str | Path) -> str | None:
    """The PNG text metadata ``prompt`` of an image (``zo-edge generate`` writes it), or None."""
    try:
        with Image.open(path) as im:
            text = getattr(im, "text", None)  # PNG: all tEXt/iTXt/zTXt chunks
            if text is None:
                text = im.info
            v = text.get(PROMPT_KEY)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(f"cannot read image {str(path)!r}: {e}") from None
    return v if isinstance(v, str) else None


def assign_generated(generated_dir: str | Path, prompts: Sequence[str],
                     skipped: list[str] | None = None) -> list[list[Path]]:
    """Generated images grouped by prompt index (see the module docstring for the rules).

    ``grid.png`` without prompt metadata (``zo-edge generate --grid``) is left out and its name
    appended to ``skipped``."""
    files = list_images(generated_dir, "generated images")
    index: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        index.setdefault(_norm_ws(p), []).append(i)
    groups: list[list[Path]] = [[] for _ in prompts]
    for f in files:
        meta = png_prompt(f)
        m = _INDEX_NAME.match(f.name)
        named = int(m.group(1)) if m else None
        if meta is not None:
            cands = index.get(_norm_ws(meta), [])
            if not cands:
                raise UserError(f"generated image {f.name} was made from prompt {meta!r}, which is not in the "
                                "prompts file")
            if named in cands:
                i = named
            elif len(cands) == 1:
                i = cands[0]
            else:
                raise UserError(f"generated image {f.name}: its prompt {meta!r} is listed {len(cands)} times in the "
                                "prompts file and its name does not say which ({prompt_index}_{k}.png)")
        elif named is not None:
            i = named
            if i >= len(prompts):
                raise UserError(f"generated image {f.name} names prompt {i}, but the prompts file has only "
                                f"{len(prompts)} (0-based)")
        elif f.name.lower() in SKIP_NAMES:
            if skipped is not None:
                skipped.append(f.name)
            continue
        else:
            raise UserError(f"cannot tell which prompt generated image {f.name} belongs to: it has no PNG "
                            f"'{PROMPT_KEY}' metadata and its name is not {{prompt_index}}_{{k}}.png")
        groups[i].append(f)
    empty = [i for i, g in enumerate(groups) if not g]
    if empty:
        shown = ", ".join(str(i) for i in empty[:5]) + (" ..." if len(empty) > 5 else "")
        n = sum(len(g) for g in groups)
        raise UserError(f"{len(empty)} of {len(prompts)} prompts have no generated images (prompt {shown}); "
                        f"{n} images in {str(generated_dir)!r}")
    return groups


# -- the whole evaluation -----------------------------------------------------------------------

def evaluate(metrics_dir: str | Path | MetricsBundle, references_dir: str | Path, generated_dir: str | Path,
             prompts_file: str | Path, placeholder: str | None = None, class_word: str | None = None, *,
             provider: str = "cpu", batch_size: int = 16, verify: bool = True) -> dict:
    """Score one subject: CLIP-I, CLIP-T and DINO against the reference images, DINO-inter among the
    generated images of each prompt. Returns a JSON-ready dict; a metric whose model is not in the
    bundle (or DINO-inter with one image per prompt) is None."""
    if placeholder and not class_word:
        raise UserError("--placeholder needs --class-word (CLIP-T replaces the placeholder with the class word)")
    if class_word and not placeholder:
        raise UserError("--class-word is only used with --placeholder")
    if isinstance(metrics_dir, MetricsBundle):
        bundle = metrics_dir
    else:
        bundle = MetricsBundle.load(metrics_dir, provider=provider, verify=False)
    prompts = read_prompts(prompts_file)
    refs = list_images(references_dir, "references")
    skipped: list[str] = []
    groups = assign_generated(generated_dir, prompts, skipped)
    if verify and not isinstance(metrics_dir, MetricsBundle):
        bundle.verify()

    warnings: list[str] = [f"left out {name} (no prompt metadata)" for name in skipped]
    if placeholder and not any(placeholder in p for p in prompts):
        warnings.append(f"placeholder {placeholder!r} appears in no prompt")
    if not placeholder and any(re.search(r"<[^<>\s]+>", p) for p in prompts):
        warnings.append("prompts contain a <placeholder> but none was given: CLIP-T reads it as plain text")
    counts = [len(g) for g in groups]
    if len(set(counts)) > 1:
        warnings.append(f"prompts have different numbers of images ({min(counts)} to {max(counts)})")

    gen_files = [f for g in groups for f in g]
    owner = np.repeat(np.arange(len(groups)), counts)
    texts = [prompt_for_clip_t(p, placeholder, class_word) for p in prompts]
    res: dict = {"clip_i": None, "clip_t": None, "dino": None, "dino_inter": None,
                 "n_references": len(refs), "n_generated": len(gen_files), "n_prompts": len(prompts),
                 "images_per_prompt": counts, "placeholder": placeholder, "class_word": class_word,
                 "metrics_bundle": str(bundle.root),
                 "models": {k: bundle.manifest[k]["source"].get("name_or_path")
                            for k in ("clip", "dino") if k in bundle.manifest}}
    per = [{"prompt": p, "clip_t_text": t, "n_images": n} for p, t, n in zip(prompts, texts, counts)]
    if bundle.has_clip:
        ref_c = bundle.clip_image(refs, batch_size)
        gen_c = bundle.clip_image(gen_files, batch_size)
        txt = bundle.clip_text(texts)
        res["clip_i"] = clip_i(ref_c, gen_c)
        res["clip_t"] = clip_t(gen_c, txt[owner])
        for i, row in enumerate(per):
            g = gen_c[owner == i]
            row["clip_i"] = clip_i(ref_c, g)
            row["clip_t"] = clip_t(g, txt[i:i + 1])
    if bundle.has_dino:
        ref_d = bundle.dino(refs, batch_size)
        gen_d = bundle.dino(gen_files, batch_size)
        res["dino"] = dino(ref_d, gen_d)
        by_prompt = [gen_d[owner == i] for i in range(len(groups))]
        if max(counts) >= 2:
            res["dino_inter"] = dino_inter(by_prompt)
        else:
            warnings.append("one image per prompt: DINO-inter is undefined")
        for i, row in enumerate(per):
            row["dino"] = dino(ref_d, by_prompt[i])
            row["dino_inter"] = _inter(by_prompt[i])
    res["per_prompt"] = per
    res["warnings"] = warnings
    return res
