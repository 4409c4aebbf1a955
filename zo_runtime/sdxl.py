"""Stable Diffusion XL on a zo-edge bundle (family ``sdxl``): both text encoders, the pooled
embedding and micro-conditioning ``time_ids``, the loss oracle, text-to-image, and SDXL
textual-inversion files. NumPy + ONNX Runtime only.

A learned SDXL token is one row per vector of width 768 + 1280: the CLIP-L row (``clip_l``)
then the OpenCLIP-bigG row (``clip_g``), learned jointly as one vector by the same RGE / SG /
Adam machinery. On disk it is the SDXL textual-inversion format that diffusers and A1111 read:
one safetensors file with ``clip_l`` [V, 768] and ``clip_g`` [V, 1280] (the placeholder is the
metadata ``name``, else the file stem). In diffusers::

    state = safetensors.torch.load_file("tok.safetensors")
    pipe.load_textual_inversion(state["clip_l"], token="<tok>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="<tok>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)

SDXL's shipped text-encoder configs say ``eos_token_id: 2``, so transformers pools ``text_embeds``
at the largest token id, which after ``load_textual_inversion`` is the new token rather than the
end of text. zo-edge pools at the end of text (the placeholder's stand-in id is below EOS), as
CLIP was trained; to make diffusers do the same (tests/test_sdxl.py measures both)::

    pipe.text_encoder.text_model.eos_token_id = pipe.text_encoder_2.text_model.eos_token_id = 49407
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .embeddings import PICKLE_SUFFIXES, _as_matrix, _read_header, _read_tensor, _refuse_pickle
from .errors import UserError
from .manifest import BUNDLE_MANIFEST, inside, listed
from .oracle import inject, mean_squares
from .outputs import write_atomic
from .schedulers.common import add_noise, alphas_cumprod, training_target
from .tokenizer import CLIPTokenizer

FAMILY = "sdxl"
KEYS = ("clip_l", "clip_g")
PENULTIMATE = "penultimate_hidden_state"
POOLED = "text_embeds"


def family_of(model) -> str | None:
    """The ``family`` a bundle's manifest names, or None when it cannot be read (the ordinary
    loaders then say what is wrong)."""
    try:
        m = json.loads((Path(model).expanduser() / BUNDLE_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, TypeError):
        return None
    return m.get("family") if isinstance(m, dict) and isinstance(m.get("family"), str) else None


def is_sdxl(bundle: Bundle) -> bool:
    return bundle.manifest.get("family") == FAMILY


def time_ids(original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    """SDXL's micro-conditioning: (original h, w, crop top, left, target h, w), float32 [6]."""
    return np.array([*original, *crop, *target], np.float32)


class SDXLModel:
    """What an SDXL bundle has beyond an SD 1.x one: the second encoder, its token table and
    tokenizer, the pooled embedding and ``time_ids``. Checks the manifest's SDXL keys once."""

    def __init__(self, bundle: Bundle):
        if not is_sdxl(bundle):
            raise UserError(f"bundle {bundle.root} is {bundle.manifest.get('family')!r}, not SDXL")
        m, where = bundle.manifest, f"{bundle.root / BUNDLE_MANIFEST}"
        dims = m.get("embedding_dims")
        if not isinstance(dims, dict) or not all(isinstance(dims.get(k), int) and not isinstance(dims.get(k), bool)
                                                 and dims[k] > 0 for k in KEYS):
            raise UserError(f"{where}: an SDXL manifest needs 'embedding_dims' with positive integers clip_l, clip_g")
        self.dims = (dims["clip_l"], dims["clip_g"])
        if sum(self.dims) != bundle.embedding_dim:
            raise UserError(f"{where}: embedding_dim {bundle.embedding_dim} is not clip_l + clip_g = {sum(self.dims)}")
        for g in ("text_encoder", "text_encoder_2", "unet"):
            bundle.graph(g)
        emb2 = m.get("token_embedding_2")
        self._paths = (listed(bundle.root, m, m["token_embedding"]["path"], f"{where}: token_embedding path"),
                       listed(bundle.root, m, emb2.get("path") if isinstance(emb2, dict) else None,
                              f"{where}: token_embedding_2 path"))
        tok2 = inside(bundle.root, m.get("tokenizer_2", "tokenizer_2"), f"{where}: tokenizer_2 folder")
        for fname in ("vocab.json", "merges.txt"):
            listed(bundle.root, m, f"{m.get('tokenizer_2', 'tokenizer_2')}/{fname}", f"{where}: tokenizer_2 file")
        self.bundle = bundle
        self.tokenizers = (CLIPTokenizer.from_pretrained(bundle.tokenizer_dir), CLIPTokenizer.from_pretrained(tok2))
        self.zero_negative = bool((m.get("sdxl") or {}).get("force_zeros_for_empty_prompt", True))
        self._tables = None
        self._inputs = {}

    @property
    def width(self) -> int:
        return sum(self.dims)

    @property
    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """The two token tables, float32 [vocab, 768] and [vocab, 1280], memory-mapped read-only."""
        if self._tables is None:
            out = []
            for path, d in zip(self._paths, self.dims):
                try:
                    t = np.load(path, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as e:
                    raise UserError(f"cannot read the token table {path}: {e}") from None
                if t.ndim != 2 or t.shape[1] != d or not np.issubdtype(t.dtype, np.floating):
                    raise UserError(f"the token table {path} has shape {list(t.shape)}; the manifest says width {d}")
                out.append(t)
            self._tables = tuple(out)
        return self._tables

    def init_row(self, token_id: int) -> np.ndarray:
        """The concatenated [768 + 1280] row of a vocabulary token (an --init word)."""
        return np.concatenate([np.asarray(t[token_id], np.float32) for t in self.tables])

    def concatenated_table(self) -> np.ndarray:
        """[vocab, 768 + 1280] in memory (token-pca directions only)."""
        return np.concatenate([np.asarray(t, np.float32) for t in self.tables], axis=1)

    def encode(self, text: str, placeholders: dict | None = None):
        """One prompt through both tokenizers -> ((ids_l, slots_l), (ids_g, slots_g)). The two can
        differ: tokenizer_2 pads with "!" and so splits every "!" out as that token."""
        return tuple(tok.encode_prompt(text, placeholders) for tok in self.tokenizers)

    def _text(self, g: str, ids: np.ndarray, embeds: np.ndarray):
        sess = self.bundle.session(g)
        if g not in self._inputs:
            self._inputs[g] = {i.name for i in sess.get_inputs()}
        feed = {"inputs_embeds": embeds.astype(np.float32)}
        if "input_ids" in self._inputs[g]:
            feed["input_ids"] = ids.astype(np.int64)
        return sess.run([PENULTIMATE, POOLED] if g == "text_encoder_2" else [PENULTIMATE], feed)

    def text(self, ids: tuple[np.ndarray, np.ndarray], embeds: tuple[np.ndarray, np.ndarray]):
        """ids: ([B, L], [B, L]); embeds: ([B, L, 768], [B, L, 1280]) ->
        (encoder_hidden_states [B, L, 2048], text_embeds [B, 1280])."""
        (h_l,) = self._text("text_encoder", ids[0], embeds[0])
        h_g, pooled = self._text("text_encoder_2", ids[1], embeds[1])
        return np.concatenate([h_l, h_g], axis=-1), pooled

    def embed_rows(self, encoded, names_vectors: dict, batch_slots=None):
        """Token rows for prompts encoded by :meth:`encode`, learned rows written in:
        encoded: list of ((ids_l, slots_l), (ids_g, slots_g)); names_vectors: {placeholder: [V, 2048]}
        -> ids ([B, L], [B, L]) and inputs_embeds ([B, L, 768], [B, L, 1280])."""
        ids, embeds = [], []
        for k, (table, lo, hi) in enumerate(((self.tables[0], 0, self.dims[0]), (self.tables[1], self.dims[0], None))):
            rows = np.stack([e[k][0] for e in encoded])
            x = np.stack([np.asarray(table[r], np.float32) for r in rows])
            for b, e in enumerate(encoded):
                for pos, name, vec in e[k][1]:
                    x[b, pos] = names_vectors[name][vec, lo:hi]
            ids.append(rows)
            embeds.append(x)
        return tuple(ids), tuple(embeds)

    def unet(self, x: np.ndarray, t, hidden: np.ndarray, pooled: np.ndarray, tids: np.ndarray) -> np.ndarray:
        spec = self.bundle.input_spec("unet", "timestep") or {"dtype": "float32", "rank": 1}
        dtype = np.dtype(spec["dtype"])
        ts = np.asarray(t, dtype) if spec["rank"] == 0 else np.full((len(x),), t, dtype)
        feed = {"sample": x.astype(np.float32), "timestep": ts, "encoder_hidden_states": hidden.astype(np.float32),
                "text_embeds": pooled.astype(np.float32), "time_ids": np.asarray(tids, np.float32).reshape(len(x), -1)}
        return self.bundle.session("unet").run(None, feed)[0]


# -- the loss oracle ---------------------------------------------------------------------------------

class SDXLOracle:
    """:class:`zo_runtime.oracle.LossOracle` for SDXL: candidates [k, V, 768 + 1280] go through both
    text encoders (each gets its half of every row); the UNet gets their penultimate states
    concatenated, the pooled embedding and the reference image's ``time_ids``."""

    def __init__(self, model: SDXLModel, batch_candidates: str = "auto"):
        if batch_candidates not in ("auto", "on", "off"):
            raise ValueError(f"batch_candidates must be auto|on|off, got {batch_candidates!r}")
        self.model = model
        self.mode = batch_candidates
        self.alphas_cumprod = alphas_cumprod(model.bundle.noise_schedule)
        self.prediction_type = model.bundle.prediction_type
        self.forward_passes = 0

    def batched(self, latent_hw) -> bool:
        if self.mode == "auto":
            return latent_hw[0] * latent_hw[1] <= 32 * 32
        return self.mode == "on"

    def _hidden(self, encoded, thetas: np.ndarray):
        """thetas [k, V, D] -> (hidden [k, L, 2048], pooled [k, 1280])."""
        dl = self.model.dims[0]
        ids, embeds = [], []
        for (row, slots), table, th in zip(encoded, self.model.tables, (thetas[..., :dl], thetas[..., dl:])):
            embeds.append(inject(np.asarray(table[row], np.float32), slots, th))
            ids.append(np.repeat(row[None], len(thetas), axis=0))
        return self.model.text(tuple(ids), tuple(embeds))

    def losses(self, thetas: np.ndarray, encoded, slots, latent: np.ndarray, noise: np.ndarray, t: int,
               time_ids: np.ndarray | None = None) -> np.ndarray:
        """thetas [k, V, 2048]; encoded: :meth:`SDXLModel.encode` of the prompt (``slots`` unused:
        each encoder has its own); latent, noise [C, h, w]; time_ids [6] -> losses float64 [k]."""
        return mean_squares(self.residuals(thetas, encoded, slots, latent, noise, t, time_ids))

    def residuals(self, thetas: np.ndarray, encoded, slots, latent: np.ndarray, noise: np.ndarray, t: int,
                  time_ids: np.ndarray | None = None) -> np.ndarray:
        """As :meth:`losses`, but each candidate's prediction − target, float64 [k, C, h, w]."""
        if time_ids is None:
            raise ValueError("SDXL losses need the reference image's time_ids")
        tt = np.array([t])
        noisy = add_noise(latent[None], noise[None], tt, self.alphas_cumprod).astype(np.float32)
        target = training_target(latent[None], noise[None], tt, self.alphas_cumprod,
                                 self.prediction_type).astype(np.float32)
        k = len(thetas)
        if self.batched(latent.shape[1:]):
            hidden, pooled = self._hidden(encoded, thetas)
            self.forward_passes += k
            pred = self.model.unet(np.repeat(noisy, k, axis=0), t, hidden, pooled, np.repeat(time_ids[None], k, 0))
        else:
            outs = []
            for i in range(k):
                hidden, pooled = self._hidden(encoded, thetas[i:i + 1])
                self.forward_passes += 1
                outs.append(self.model.unet(noisy, t, hidden, pooled, time_ids[None]))
            pred = np.concatenate(outs)
        return pred.astype(np.float64) - target.astype(np.float64)


# -- text to image -----------------------------------------------------------------------------------

def _pipeline_base():
    from .pipeline import Pipeline
    return Pipeline


class SDXLPipeline(_pipeline_base()):
    """Text-to-image on an SDXL bundle, as diffusers' ``StableDiffusionXLPipeline`` computes it:
    penultimate states of both encoders concatenated, ``text_embeds`` pooled by text_encoder_2,
    ``time_ids`` = (H, W, 0, 0, H, W), classifier-free guidance with the negative prompt (an empty
    negative prompt is all zeros, as diffusers does when ``force_zeros_for_empty_prompt``), a NumPy
    scheduler. ``embeddings``: {placeholder: [V, 768 + 1280]} (see :func:`load_sdxl_embeddings`)."""

    def __init__(self, bundle: Bundle, embeddings: dict | None = None, scheduler: str | None = None,
                 low_memory: bool = False):
        self.model = SDXLModel(bundle)
        super().__init__(bundle, embeddings=embeddings, scheduler=scheduler, low_memory=low_memory)

    def encode_prompts(self, prompts: list[str]):
        """prompts -> (encoder_hidden_states [B, L, 2048], text_embeds [B, 1280])."""
        placeholders = {k: len(v) for k, v in self.embeddings.items()}
        encoded = [self.model.encode(p, placeholders) for p in prompts]
        ids, embeds = self.model.embed_rows(encoded, self.embeddings)
        return self.model.text(ids, embeds)

    def __call__(self, prompt, negative_prompt: str | None = "", num_images: int = 1, steps: int = 30,
                 guidance: float = 5.0, seed: int = 0, height: int | None = None, width: int | None = None,
                 latents: np.ndarray | None = None, progress: bool = True, return_latents: bool = False):
        from .pipeline import check_sampling, start_denoising
        from .progress import Progress

        check_sampling(self.bundle, steps, guidance, seed, height, width)
        height = height or self.bundle.resolution
        width = width or self.bundle.resolution
        f = self.bundle.vae_scale_factor
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images)]
        for p in dict.fromkeys(prompts):
            self.check_prompt(p)
        b = len(prompts)
        cond, pooled = self.encode_prompts(prompts)
        do_cfg = guidance > 1.0
        if do_cfg:
            if not negative_prompt and self.model.zero_negative:
                uncond, uncond_pooled = np.zeros_like(cond), np.zeros_like(pooled)
            else:
                uncond, uncond_pooled = self.encode_prompts([negative_prompt or ""] * b)
        tids = np.repeat(time_ids((height, width), (0, 0), (height, width))[None], b, axis=0)

        scheduler, latents, rng = start_denoising(self.scheduler_config, self.scheduler_name, steps, seed,
                                                  (b, self.bundle.latent_channels, height // f, width // f), latents)
        bar = Progress("denoise", total=len(scheduler.timesteps)) if progress else None
        for i, t in enumerate(scheduler.timesteps):
            x = scheduler.scale_model_input(latents, t)
            if do_cfg and not self.low_memory:
                out = self.model.unet(np.concatenate([x, x]), t, np.concatenate([uncond, cond]),
                                      np.concatenate([uncond_pooled, pooled]), np.concatenate([tids, tids]))
                out_u, out_c = out[:b], out[b:]
            elif do_cfg:
                out_u = self.model.unet(x, t, uncond, uncond_pooled, tids)
                out_c = self.model.unet(x, t, cond, pooled, tids)
            else:
                out_c = self.model.unet(x, t, cond, pooled, tids)
            pred = out_u + guidance * (out_c - out_u) if do_cfg else out_c
            latents = scheduler.step(pred, t, latents, rng=rng).astype(np.float32)
            if bar:
                bar.update(i + 1)
        if bar:
            bar.close()
        images = self.decode(latents)
        return (images, latents) if return_latents else images


def make_pipeline(bundle: Bundle, embeddings=None, scheduler=None, low_memory=False):
    """The text-to-image pipeline for the bundle's family."""
    if is_sdxl(bundle):
        return SDXLPipeline(bundle, embeddings=embeddings, scheduler=scheduler, low_memory=low_memory)
    from .pipeline import Pipeline
    return Pipeline(bundle, embeddings=embeddings, scheduler=scheduler, low_memory=low_memory)


# -- SDXL textual-inversion files --------------------------------------------------------------------

def save_sdxl_embedding(path, placeholder: str, vectors: np.ndarray, dims: tuple[int, int],
                        extra_metadata: dict | None = None, overwrite: bool = True) -> Path:
    """Write ``vectors`` [V, 768 + 1280] as ``clip_l`` [V, 768] and ``clip_g`` [V, 1280] (float32) with
    metadata ``name`` = the placeholder; atomically, never replacing a file without ``overwrite``."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"{path}: embeddings are saved as safetensors; use a .safetensors file name")
    if not isinstance(placeholder, str) or not placeholder or placeholder != placeholder.strip():
        raise UserError(f"placeholder {placeholder!r} must be a non-empty string without surrounding spaces")
    arr = np.asarray(vectors, np.float32)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != sum(dims) or arr.shape[0] < 1:
        raise UserError(f"SDXL embedding vectors must have shape [n, {dims[0]} + {dims[1]}], got {list(arr.shape)}")
    if not np.isfinite(arr).all():
        raise UserError(f"refusing to save embedding {placeholder!r}: it contains NaN or infinite values")
    tensors = {"clip_l": np.ascontiguousarray(arr[:, :dims[0]]), "clip_g": np.ascontiguousarray(arr[:, dims[0]:])}
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (extra_metadata or {}).items()}
    metadata.update(format="pt", name=placeholder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write embedding to {path}: {e.strerror or e}") from None
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), overwrite, "embedding")


def load_sdxl_embeddings(path, dims: tuple[int, int]) -> dict[str, np.ndarray]:
    """``{placeholder: float32 [V, 768 + 1280]}`` from an SDXL embedding file (``clip_l`` + ``clip_g``;
    placeholder = metadata ``name``, else the file stem, as A1111 names it). An SD 1.x/2.x file,
    widths other than ``dims`` or a pickle: one UserError line."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass the SDXL embedding file (.safetensors with clip_l and clip_g)")
    if not path.is_file():
        raise UserError(f"embedding file not found: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        _refuse_pickle(path, f"a {path.suffix} file is a pickle")
    header, metadata, start = _read_header(path)
    keys = set(header)
    if not set(KEYS) <= keys:
        widths = sorted({int(v["shape"][-1]) for v in header.values()
                         if isinstance(v, dict) and isinstance(v.get("shape"), list) and v["shape"]
                         and isinstance(v["shape"][-1], int)})
        raise UserError(f"{path} is an SD 1.x/2.x embedding (width {', '.join(map(str, widths)) or '?'}), not SDXL: "
                        f"this bundle is SDXL, which needs clip_l [n, {dims[0]}] and clip_g [n, {dims[1]}] tensors")
    name = metadata.get("name") or path.stem
    try:
        with open(path, "rb") as f:
            parts = []
            for key, d in zip(KEYS, dims):
                info = header[key]
                if not isinstance(info, dict):
                    raise UserError(f"{path}: malformed safetensors entry for {key!r}")
                arr = _read_tensor(path, f, info, start, key)
                if arr.ndim == 1:
                    arr = arr[None]
                if arr.ndim != 2 or arr.shape[1] != d:
                    raise UserError(f"{path}: {key} has shape {list(arr.shape)}; this SDXL bundle's {key} width is {d}")
                parts.append(_as_matrix(path, f"{name}:{key}", arr, d))
    except OSError as e:
        raise UserError(f"cannot read embedding file {path}: {e}") from None
    if len(parts[0]) != len(parts[1]):
        raise UserError(f"{path}: clip_l has {len(parts[0])} vectors and clip_g {len(parts[1])}; they must match")
    return {name: np.concatenate(parts, axis=1)}


def load_embeddings_for(bundle: Bundle, path) -> dict[str, np.ndarray]:
    """The embedding file reader for the bundle's family (an SD1 file on an SDXL bundle, or the
    reverse, is one line)."""
    if is_sdxl(bundle):
        return load_sdxl_embeddings(path, SDXLModel(bundle).dims)
    from .embeddings import load_embeddings
    return load_embeddings(path, expected_dim=bundle.embedding_dim)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)
