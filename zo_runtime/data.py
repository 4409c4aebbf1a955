"""Reference images for personalization: load, orient, crop, resize, encode once with the VAE.

The reference implementation re-encodes every image through the VAE on every iteration. Here
each image and its mirror image are encoded once; the latent distribution (mean, std) is cached
and sampled each iteration, and the VAE encoder session is released before training starts.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_MAX_PIXELS = 2 * 89_478_485     # PIL's own decompression-bomb error threshold (~179 MP)


def list_images(folder: str | Path, what: str = "image") -> list[Path]:
    """The image files at the top level of ``folder`` (by suffix; dot-files such as macOS ``._x.jpg``
    left out), sorted by name. One UserError line, naming the folder as ``what``, when the folder
    does not exist or holds no image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise UserError(f"{what} folder {str(folder)!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_image(path: str | Path, resolution: int, allow_upscale: bool = True,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One reference image: EXIF orientation applied, RGB, centre-cropped to a square and resized.

    Returns uint8 [resolution, resolution, 3]. Images smaller than the resolution are upscaled
    with a warning, or refused when ``allow_upscale`` is False. 16-bit and float images are scaled
    to 8 bits by their range (not clipped); an image over ``max_pixels`` is refused before it is
    decoded (a decompression bomb: a small file that expands to gigabytes).
    """
    path = Path(path)
    try:
        with _open_unguarded(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise UserError(f"image {path} is {w}x{h} = {w * h / 1e6:,.0f} MP, over the limit of "
                                f"{max_pixels / 1e6:,.0f} MP ({max_pixels:,} pixels) that guards against "
                                "decompression bombs; raise it with --max-image-pixels")
            im.load()
            im = ImageOps.exif_transpose(im)
            im = to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    w, h = im.size
    side = min(w, h)
    if side < resolution:
        if not allow_upscale:
            raise UserError(f"image {path} is {w}x{h}, smaller than the training resolution {resolution}")
        print(f"warning: {path.name} is {w}x{h}, upscaling to {resolution}", file=sys.stderr)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(im, np.uint8)


def _open_unguarded(path: Path) -> Image.Image:
    """Image.open without PIL's own pixel limit: :func:`load_image` applies ``max_pixels`` itself,
    so the limit is the one the user set (PIL reads only the header here)."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB, 8 bits: transparency composited on white; 16-bit and 32-bit integer greyscale scaled by
    their bit depth and float greyscale by its range (PIL's own convert clips them: mid-grey would
    become white)."""
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    elif im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            top = 1.0 if np.nanmax(a, initial=0.0) <= 1.0 else 255.0
        else:
            top = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = np.nan_to_num(a / top, nan=0.0, posinf=1.0, neginf=0.0)
        im = Image.fromarray((np.clip(a, 0.0, 1.0) * 255).round().astype(np.uint8), mode="L")
    return im.convert("RGB")


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1] (the VAE encoder's input)."""
    return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2).copy()


@dataclass
class LatentCache:
    """Cached VAE posteriors of the reference images (and their mirror images).

    mean, std: float32 [N, C, h, w], unscaled VAE latents. ``sample`` draws one scaled latent.
    """

    mean: np.ndarray
    std: np.ndarray
    scaling_factor: float

    def __len__(self) -> int:
        return len(self.mean)

    def sample(self, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        """(image index, one latent [C, h, w] from its posterior times the VAE scaling factor).
        With mirror images, index i >= N is the mirror of image i - N."""
        i = int(rng.integers(len(self.mean)))
        eps = rng.standard_normal(self.mean.shape[1:], dtype=np.float32)
        return i, ((self.mean[i] + self.std[i] * eps) * self.scaling_factor).astype(np.float32)


def encode_images(bundle, images: np.ndarray, flip: bool = True, batch: int = 1) -> LatentCache:
    """Encode uint8 [N, H, W, 3] (plus mirror images when ``flip``) once with the bundle's VAE encoder."""
    if flip:
        images = np.concatenate([images, images[:, :, ::-1]])
    sess = bundle.session("vae_encoder")
    in_name = sess.get_inputs()[0].name
    x = to_model_input(images)
    params = np.concatenate([sess.run(None, {in_name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    mean, logvar = np.split(params.astype(np.float32), 2, axis=1)
    logvar = np.clip(logvar, -30.0, 20.0)
    return LatentCache(mean=mean, std=np.exp(0.5 * logvar).astype(np.float32), scaling_factor=bundle.scaling_factor)
