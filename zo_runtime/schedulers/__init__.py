"""NumPy noise schedulers for Stable Diffusion sampling, configured from diffusers' ``scheduler_config.json``.

Usage, as with diffusers::

    sched = load_scheduler(bundle_dir / "scheduler_config.json", "dpm++2m")
    sched.set_timesteps(25)
    latents = rng.standard_normal(shape, dtype=np.float32) * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = unet(sched.scale_model_input(latents, t), t, text)
        latents = sched.step(eps, t, latents, rng=rng)

All schedulers share ``from_config(dict)``, ``set_timesteps(n)``, ``timesteps``, ``init_noise_sigma``,
``scale_model_input(sample, t)`` and ``step(model_output, t, sample, rng=None, noise=None) -> prev_sample``.
NumPy only: importing this package never imports torch or diffusers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from ..errors import UserError
from .common import SchedulerBase, add_noise, alphas_cumprod, betas_from_config, training_target, velocity
from .ddim import DDIMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .pndm import PNDMScheduler

# Short names (CLI / manifest) -> scheduler classes.
SCHEDULERS: dict[str, type[SchedulerBase]] = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
}

# diffusers `_class_name` -> scheduler classes (the class names are the same as diffusers').
DIFFUSERS_CLASSES: dict[str, type[SchedulerBase]] = {cls.__name__: cls for cls in SCHEDULERS.values()}

CONFIG_NAME = "scheduler_config.json"


def from_diffusers_class(class_name: str) -> type[SchedulerBase]:
    """The scheduler class for a diffusers ``_class_name`` (e.g. "PNDMScheduler"); UserError for others."""
    try:
        return DIFFUSERS_CLASSES[class_name]
    except (KeyError, TypeError):
        raise UserError(f"scheduler class {class_name!r} is not supported (supported: "
                        f"{', '.join(DIFFUSERS_CLASSES)}); pick one by name: {', '.join(SCHEDULERS)}") from None


def scheduler_class(name: str) -> type[SchedulerBase]:
    """The scheduler class for a short name (``SCHEDULERS`` key, any case) or a diffusers class name."""
    if isinstance(name, str):
        if name.lower() in SCHEDULERS:
            return SCHEDULERS[name.lower()]
        if name in DIFFUSERS_CLASSES:
            return DIFFUSERS_CLASSES[name]
    raise UserError(f"unknown scheduler {name!r} (choose one of {', '.join(SCHEDULERS)})")


def read_scheduler_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``scheduler_config.json``: the file itself, or a folder holding it (directly or in ``scheduler/``)."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / CONFIG_NAME, path / "scheduler" / CONFIG_NAME]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise UserError(f"no {CONFIG_NAME} in {path} (looked in {path} and {path / 'scheduler'})")
        path = found
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"scheduler config not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read scheduler config {path}: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"scheduler config {path} is not a JSON object")
    return config


def load_scheduler(config: Mapping[str, Any] | str | os.PathLike, name: str | None = None) -> SchedulerBase:
    """A scheduler from a diffusers scheduler config (a dict, a ``scheduler_config.json`` path, or a folder).

    name None: the config's own ``_class_name``. Otherwise a short name (``SCHEDULERS`` key) or a diffusers class
    name; the config's schedule (betas, steps_offset, prediction_type, ...) is reused for that scheduler the way
    ``XScheduler.from_config(other_scheduler.config)`` does in diffusers. Call ``set_timesteps`` next.
    """
    if not isinstance(config, Mapping):
        config = read_scheduler_config(config)
    if name is None:
        class_name = config.get("_class_name")
        if class_name is None:
            raise UserError(f"scheduler config has no _class_name; name a scheduler ({', '.join(SCHEDULERS)})")
        cls = from_diffusers_class(class_name)
    else:
        cls = scheduler_class(name)
    return cls.from_config(config)


__all__ = [
    "SCHEDULERS", "DIFFUSERS_CLASSES", "SchedulerBase", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "from_diffusers_class", "scheduler_class",
    "load_scheduler", "read_scheduler_config", "add_noise", "velocity", "training_target", "alphas_cumprod",
    "betas_from_config",
]
