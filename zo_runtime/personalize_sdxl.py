"""Forward-only textual inversion on an SDXL bundle: :class:`zo_runtime.personalize.Trainer` with
SDXL's pieces (``Trainer(cfg)`` picks this class when the bundle's family is ``sdxl``).

* The token: one row per vector of width 768 + 1280 (CLIP-L row, then OpenCLIP-bigG row), learned
  jointly by the same RGE / SG / PUTS / Adam chain as SD 1.x: both halves of a candidate move
  together, each encoder gets its half. Initialized from the --init word's rows of both tables.
  SG runs on the concatenated vector (the paper's SG on the token as one vector; the reason and
  what per-encoder SG would change are in docs/findings.md "SDXL").
* Micro-conditioning as diffusers' SDXL fine-tuning (examples/text_to_image/train_text_to_image_sdxl.py)
  computes it for a centre crop: ``time_ids`` = (original height, width; the crop's top-left corner
  in the image resized so its short side is the training resolution; target = resolution,
  resolution), per reference image (its mirror image has the same).
* The reference latents are encoded once and cached, scaled by the bundle's VAE scaling factor
  (0.13025 for SDXL), as for SD 1.x.
* The output is the SDXL textual-inversion file (``clip_l`` + ``clip_g``, see zo_runtime.sdxl).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError
from .personalize import Trainer
from .recipe import PCA_DIRECTIONS
from .sdxl import SDXLModel, SDXLOracle, SDXLPipeline, save_sdxl_embedding, time_ids

_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)   # EXIF orientations that rotate by 90 degrees


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image as ``data.load_image`` sees it (EXIF orientation applied); only
    the header is read."""
    from PIL import UnidentifiedImageError

    from .data import _open_unguarded
    try:
        with _open_unguarded(Path(path)) as im:
            w, h = im.size
            orientation = im.getexif().get(_ORIENTATION, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    return (w, h) if orientation in _SWAPS_SIDES else (h, w)


def micro_conditioning(size: tuple[int, int], resolution: int) -> np.ndarray:
    """``time_ids`` [6] for an image of ``size`` (h, w) centre-cropped to a square and resized to
    ``resolution``: the crop corner is where diffusers' centre crop puts it once the short side is
    resized to ``resolution``."""
    h, w = size
    side = min(h, w)
    rh, rw = round(h * resolution / side), round(w * resolution / side)
    crop = (max(0, int(round((rh - resolution) / 2.0))), max(0, int(round((rw - resolution) / 2.0))))
    return time_ids((h, w), crop, (resolution, resolution))


class SDXLTrainer(Trainer):
    """A personalization run on an SDXL bundle (see the module docstring)."""

    def __init__(self, cfg, resume: bool = False):
        self._sdxl = None
        super().__init__(cfg, resume)
        res = self.latents.mean.shape[-1] * self.bundle.vae_scale_factor
        self.time_ids = np.stack([micro_conditioning(image_size(f), res) for f in self.files])

    @property
    def sdxl(self) -> SDXLModel:
        if self._sdxl is None:
            self._sdxl = SDXLModel(self.bundle)
        return self._sdxl

    def make_oracle(self):
        return SDXLOracle(self.sdxl, self.cfg.batch_candidates)

    def token_table(self):
        """The concatenated [vocab, 2048] table for token-pca / vocab-pca directions (built only for them)."""
        return self.sdxl.concatenated_table() if self.cfg.directions in PCA_DIRECTIONS else None

    def vocabulary(self):
        """SDXL bundles do not declare a vocabulary: vocab-pca analyses the whole table, as token-pca."""
        return None

    def init_row(self) -> np.ndarray:
        return self.sdxl.init_row(self.init_id)

    def conditioning(self, image_index: int) -> dict:
        return {"time_ids": self.time_ids[image_index % len(self.files)]}

    def save_token(self, path: str, theta: np.ndarray, metadata: dict) -> None:
        save_sdxl_embedding(path, self.cfg.token, theta, self.sdxl.dims, metadata, overwrite=self.cfg.overwrite)

    def prompt(self, text: str):
        """(both tokenizers' (ids, slots), CLIP-L's slots) for a training prompt."""
        if text not in self._prompt_cache:
            encoded = self.sdxl.encode(text, self.placeholders)
            want = self.cfg.num_vectors * text.count(self.cfg.token)
            if not encoded[0][1] or any(len(slots) != want for _, slots in encoded):
                raise UserError(f"the training prompt {text!r} does not fit the text encoders' "
                                f"{self.tokenizer.max_length} tokens with --num-vectors {self.cfg.num_vectors}; "
                                "use fewer vectors or shorter captions")
            self._prompt_cache[text] = (encoded, encoded[0][1])
        return self._prompt_cache[text]

    def preview(self, step: int, theta: np.ndarray) -> None:
        from .pipeline import save_png

        prompt = self.cfg.templates[0].format(self.cfg.token)
        side = self.latents.mean.shape[2] * self.bundle.vae_scale_factor
        image = SDXLPipeline(self.bundle, embeddings={self.cfg.token: theta})(
            prompt, steps=20, seed=self.cfg.seed, height=side, width=side, progress=False)[0]
        folder = self.run_dir / "previews"
        folder.mkdir(exist_ok=True)
        save_png(folder / f"step_{step:06d}.png", image, {"prompt": prompt, "step": step})
