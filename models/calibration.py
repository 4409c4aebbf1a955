"""The inputs ``zo-edge convert`` calibrates and checks its graphs with: the shapes world.

``zo_edge.convert`` asks for prompts and images through ``convert.calibrate.CalibrationData`` and
knows nothing of where they come from; the caller passes :data:`SHAPES_WORLD` (the ``convert``
command does). Prompts: shapes-world captions and everyday prompts (the converter adds the empty
prompt); images: procedural :mod:`zo_edge.models.world` renders at the model resolution. Held-out
inputs use other seeds, prompts, shapes and images than the calibration inputs.
"""
from __future__ import annotations

import numpy as np

from zo_edge.models import world

EVERYDAY = ("a photo of a dog", "a painting of a lighthouse at sunset", "a cup of coffee on a wooden table",
            "portrait of an old man, studio lighting", "a city street in the rain at night",
            "a bowl of fruit, still life", "a mountain lake with pine trees", "a cat wearing a tiny hat",
            "an astronaut riding a horse", "a watercolor of a red barn in winter")
HELD_OUT_EVERYDAY = ("a close-up photo of a sunflower", "a toy robot on a shelf", "a sailing boat on a calm sea",
                     "a plate of pasta, food photography")


def world_prompts(n: int, seed: int, held_out: bool) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        if held_out and k % 2 == 0:
            s = world.HELD_OUT[rng.integers(len(world.HELD_OUT))]
            subj = world.Subject(*s)
            out.append(world.caption(subj, world.BACKGROUNDS[rng.integers(len(world.BACKGROUNDS))]))
        elif not held_out and k % 3 == 2:
            out.append(EVERYDAY[(k // 3) % len(EVERYDAY)])
        elif held_out:
            out.append(HELD_OUT_EVERYDAY[(k // 2) % len(HELD_OUT_EVERYDAY)])
        else:
            subj, bg = world.sample(rng)
            out.append(world.caption(subj, bg))
    return out


def world_images(n: int, size: int, seed: int, held_out: bool) -> list[np.ndarray]:
    """n procedural RGB images, float32 [3, size, size] in [-1, 1]."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = min(size, 128)
    out = []
    for k in range(n):
        if held_out:
            shape, colour, pattern = world.HELD_OUT[k % len(world.HELD_OUT)]
            bg = world.BACKGROUNDS[(k + 2) % len(world.BACKGROUNDS)]
        else:
            subj, bg = world.sample(rng)
            shape, colour, pattern = subj.shape, subj.colour, subj.pattern
        img = world.render(shape, colour, pattern, bg, seed=int(seed * 1000 + k), size=base)
        if base != size:
            img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
        out.append((img.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0))
    return out


class ShapesWorldData:
    """``zo_edge.convert.calibrate.CalibrationData`` from the shapes world."""

    description = {"text_encoder": "shapes-world captions + everyday prompts + empty prompt",
                   "vae_encoder": "zo_edge.models.world renders at the model resolution"}

    def prompts(self, n: int, seed: int, held_out: bool) -> list[str]:
        return world_prompts(n, seed, held_out)

    def images(self, n: int, size: int, seed: int, held_out: bool) -> list[np.ndarray]:
        return world_images(n, size, seed, held_out)


SHAPES_WORLD = ShapesWorldData()
