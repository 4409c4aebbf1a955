"""Text-to-image on a zo-edge bundle: ONNX Runtime graphs + a NumPy scheduler, no PyTorch.

    pipe = Pipeline(Bundle.load("sd15-int8"), embeddings={"<my-dog>": vecs})
    images = pipe("a photo of <my-dog> on the beach", seed=0, steps=30, guidance=7.5)  # uint8 [B, H, W, 3]

Learned tokens go in through the text encoder's ``inputs_embeds``: the prompt's token-table rows
are gathered from the memory-mapped table and the placeholder's rows replaced; no graph changes.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .errors import UserError
from .outputs import write_atomic
from .progress import Progress
from .schedulers import load_scheduler
from .tokenizer import CLIPTokenizer


class Pipeline:
    def __init__(self, bundle: Bundle, embeddings: dict[str, np.ndarray] | None = None,
                 scheduler: str | None = None, low_memory: bool = False):
        self.bundle = bundle
        self.tokenizer = CLIPTokenizer.from_pretrained(bundle.tokenizer_dir)
        self.embeddings = {}
        for name, vecs in (embeddings or {}).items():
            vecs = np.asarray(vecs, np.float32)
            if vecs.ndim == 1:
                vecs = vecs[None]
            if vecs.shape[-1] != bundle.embedding_dim:
                raise UserError(f"embedding {name!r} has dimension {vecs.shape[-1]}, the model expects "
                                f"{bundle.embedding_dim}")
            self.check_placeholder(name, len(vecs))
            self.embeddings[name] = vecs
        self.scheduler_name = scheduler
        self.scheduler_config = bundle.scheduler_config
        load_scheduler(self.scheduler_config, scheduler)  # fail early on an unknown name
        self.low_memory = low_memory
        self.text_inputs = {i.name for i in bundle.session("text_encoder").get_inputs()}

    # -- text --------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> np.ndarray:
        """prompts -> encoder hidden states [B, L, D], learned tokens injected."""
        placeholders = {k: len(v) for k, v in self.embeddings.items()}
        ids, slots = self.tokenizer.batch_encode(prompts, placeholders)
        table = self.bundle.token_table
        embeds = np.stack([np.asarray(table[row], np.float32) for row in ids])
        for b, row_slots in enumerate(slots):
            for pos, name, vec in row_slots:
                embeds[b, pos] = self.embeddings[name][vec]
        feed = {"inputs_embeds": embeds}
        if "input_ids" in self.text_inputs:
            feed["input_ids"] = ids.astype(np.int64)
        return self.bundle.session("text_encoder").run(["last_hidden_state"], feed)[0]

    def check_placeholder(self, name: str, n_vectors: int) -> None:
        """A placeholder must not be a word of the vocabulary (an embedding named ``a`` would replace
        every "a", even inside words) and its vectors must fit in a prompt."""
        if not isinstance(name, str) or not name or any(ch.isspace() for ch in name):
            raise UserError(f"placeholder {name!r} must be a non-empty string without spaces")
        if self.tokenizer.is_in_vocab(name):
            raise UserError(f"placeholder {name!r} is a word of the vocabulary: prompts could no longer say the "
                            "word itself; rename the embedding (e.g. <my-thing>)")
        if n_vectors > self.tokenizer.max_length - 2:
            raise UserError(f"embedding {name!r} has {n_vectors} vectors; a prompt holds at most "
                            f"{self.tokenizer.max_length - 2} tokens")

    def check_prompt(self, prompt: str) -> None:
        """Refuse a prompt naming a ``<token>`` no loaded embedding defines (it would be drawn from
        its spelling, silently); warn when it uses none of the loaded tokens."""
        named = dict.fromkeys(re.findall(r"<[^<>\s]+>", prompt))
        unknown = [t for t in named if t not in self.embeddings and t not in self.tokenizer.added_tokens
                   and not any(t in name for name in self.embeddings)]
        if unknown:
            loaded = ", ".join(self.embeddings) or "none"
            raise UserError(f"prompt {prompt!r} names {unknown[0]}, which no loaded embedding defines "
                            f"(loaded: {loaded}); pass it with --embedding FILE")
        if self.embeddings and not any(name in prompt for name in self.embeddings):
            print(f"warning: prompt {prompt!r} uses none of the loaded tokens "
                  f"({', '.join(self.embeddings)})", file=sys.stderr)

    # -- denoising -----------------------------------------------------------------------------
    def _unet(self, x: np.ndarray, t: int, hidden: np.ndarray) -> np.ndarray:
        sess = self.bundle.session("unet")
        feed = {"sample": x.astype(np.float32), "timestep": self.bundle.timestep_feed(t, len(x)),
                "encoder_hidden_states": hidden.astype(np.float32)}
        return sess.run(None, feed)[0]

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """latents [B, C, h, w] (scaled) -> uint8 images [B, H, W, 3]."""
        sess = self.bundle.session("vae_decoder")
        name = sess.get_inputs()[0].name
        x = latents / self.bundle.scaling_factor
        out = np.concatenate([sess.run(None, {name: x[i:i + 1].astype(np.float32)})[0] for i in range(len(x))])
        img = np.clip(out / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
        return (img * 255).round().astype(np.uint8)

    def __call__(self, prompt: str | list[str], negative_prompt: str = "", num_images: int = 1,
                 steps: int = 30, guidance: float = 7.5, seed: int = 0, height: int | None = None,
                 width: int | None = None, latents: np.ndarray | None = None, progress: bool = True,
                 return_latents: bool = False):
        """Generate ``num_images`` images per prompt. Returns uint8 [B, H, W, 3]."""
        check_sampling(self.bundle, steps, guidance, seed, height, width)
        height = height or self.bundle.resolution
        width = width or self.bundle.resolution
        f = self.bundle.vae_scale_factor
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images)]
        for p in dict.fromkeys(prompts):
            self.check_prompt(p)
        b = len(prompts)
        cond = self.encode_prompts(prompts)
        do_cfg = guidance > 1.0
        if do_cfg:
            uncond = self.encode_prompts([negative_prompt] * b)

        scheduler, latents, rng = start_denoising(self.scheduler_config, self.scheduler_name, steps, seed,
                                                  (b, self.bundle.latent_channels, height // f, width // f), latents)

        bar = Progress("denoise", total=len(scheduler.timesteps)) if progress else None
        for i, t in enumerate(scheduler.timesteps):
            x = scheduler.scale_model_input(latents, t)
            if do_cfg and not self.low_memory:
                out = self._unet(np.concatenate([x, x]), t, np.concatenate([uncond, cond]))
                out_u, out_c = out[:b], out[b:]
            elif do_cfg:
                out_u, out_c = self._unet(x, t, uncond), self._unet(x, t, cond)
            else:
                out_c = self._unet(x, t, cond)
            pred = out_u + guidance * (out_c - out_u) if do_cfg else out_c
            latents = scheduler.step(pred, t, latents, rng=rng).astype(np.float32)
            if bar:
                bar.update(i + 1)
        if bar:
            bar.close()
        images = self.decode(latents)
        return (images, latents) if return_latents else images


MAX_SIDE = 8192


def check_sampling(bundle: Bundle, steps: int, guidance: float, seed: int, height: int | None,
                   width: int | None) -> None:
    """The sampling settings, before any work: one UserError line for the first bad one."""
    train_steps = int(bundle.noise_schedule["num_train_timesteps"])
    if not 1 <= steps <= train_steps:
        raise UserError(f"--steps must be between 1 and the model's {train_steps} training timesteps, got {steps}")
    if not math.isfinite(guidance) or not 0 <= guidance <= 100:
        raise UserError(f"--guidance must be a finite number between 0 and 100, got {guidance}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    f = bundle.vae_scale_factor
    for name, v in (("--height", height), ("--width", width)):
        if v is not None and (v < 8 or v > MAX_SIDE or v % 8 or v % f):
            raise UserError(f"{name} must be divisible by 8 (and by the VAE factor {f}) and between 8 and "
                            f"{MAX_SIDE}, got {v}")


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def save_image(path: str | Path, image: np.ndarray, metadata: dict | None = None, overwrite: bool = True) -> None:
    """Write uint8 [H, W, 3] in the format its suffix names (PNG with text metadata, JPEG quality 95
    with the metadata as a comment, lossless WebP), atomically: a temporary file, then renamed into
    place; without ``overwrite`` an existing file is never replaced."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    fmt = IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"cannot write an image as {path.name!r}: use .png, .jpg or .webp")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if fmt == "PNG":
        info = PngInfo()
        for k, v in meta.items():
            info.add_text(k, v)
        options = {"pnginfo": info}
    elif fmt == "JPEG":
        options = {"quality": 95, "comment": json.dumps(meta)} if meta else {"quality": 95}
    else:
        options = {"lossless": True}
    write_atomic(path, lambda tmp: Image.fromarray(image).save(tmp, format=fmt, **options), overwrite, "image")


save_png = save_image  # the name earlier callers use


def grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one uint8 grid image."""
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    out = np.full((rows * h, cols * w, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        out[r * h:(r + 1) * h, q * w:(q + 1) * w] = im
    return out


def start_denoising(scheduler_config, scheduler_name, steps: int, seed: int, shape: tuple, latents=None):
    """A scheduler set to ``steps``, the starting latents (drawn from ``seed``, or the given ones checked
    against ``shape``) scaled by its initial sigma, and the generator the scheduler's noise goes on with."""
    scheduler = load_scheduler(scheduler_config, scheduler_name)
    scheduler.set_timesteps(steps)
    rng = np.random.default_rng(seed)
    if latents is None:
        latents = rng.standard_normal(shape, dtype=np.float32)
    elif latents.shape != shape:
        raise UserError(f"latents have shape {latents.shape}, expected {shape}")
    return scheduler, (latents * scheduler.init_noise_sigma).astype(np.float32), rng
