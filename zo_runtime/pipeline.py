"""Text-to-image on a zo-edge bundle: ONNX Runtime graphs + a NumPy scheduler, no PyTorch.

    pipe = Pipeline(Bundle.load("sd15-int8"), embeddings={"<my-dog>": vecs})
    images = pipe("a photo of <my-dog> on the beach", seed=0, steps=30, guidance=7.5)  # uint8 [B, H, W, 3]

Learned tokens go in through the text encoder's ``inputs_embeds``: the prompt's token-table rows
are gathered from the memory-mapped table and the placeholder's rows replaced; no graph changes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .errors import UserError
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

    def check_prompt(self, prompt: str) -> None:
        if self.embeddings and not any(name in prompt for name in self.embeddings):
            print(f"warning: prompt {prompt!r} uses none of the loaded tokens "
                  f"({', '.join(self.embeddings)})", file=sys.stderr)

    # -- denoising -----------------------------------------------------------------------------
    def _unet(self, x: np.ndarray, t: int, hidden: np.ndarray) -> np.ndarray:
        sess = self.bundle.session("unet")
        feed = {"sample": x.astype(np.float32), "timestep": self.bundle.timestep_feed(int(t), len(x)),
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
        if steps < 1:
            raise UserError(f"--steps must be >= 1, got {steps}")
        height = height or self.bundle.resolution
        width = width or self.bundle.resolution
        f = self.bundle.vae_scale_factor
        if height % 8 or width % 8 or height % f or width % f:
            raise UserError(f"image size {width}x{height} must be divisible by 8")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images)]
        for p in dict.fromkeys(prompts):
            self.check_prompt(p)
        b = len(prompts)
        cond = self.encode_prompts(prompts)
        do_cfg = guidance > 1.0
        if do_cfg:
            uncond = self.encode_prompts([negative_prompt] * b)

        scheduler = load_scheduler(self.scheduler_config, self.scheduler_name)
        scheduler.set_timesteps(steps)
        rng = np.random.default_rng(seed)
        shape = (b, self.bundle.latent_channels, height // f, width // f)
        if latents is None:
            latents = rng.standard_normal(shape, dtype=np.float32)
        elif latents.shape != shape:
            raise UserError(f"latents have shape {latents.shape}, expected {shape}")
        latents = (latents * scheduler.init_noise_sigma).astype(np.float32)

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


def save_png(path: str | Path, image: np.ndarray, metadata: dict | None = None) -> None:
    """Write uint8 [H, W, 3] as PNG with text metadata, atomically (temp file + rename)."""
    import os

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(str(k), str(v))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


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
