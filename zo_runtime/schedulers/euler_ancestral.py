"""Euler ancestral sampler ("Euler a") in NumPy, after diffusers' ``EulerAncestralDiscreteScheduler``.

Each step goes down to ``sigma_down`` by an Euler step, then adds fresh noise of std ``sigma_up`` so the result
sits at the next noise level ``sigma_to`` (``sigma_down^2 + sigma_up^2 = sigma_to^2``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import (SCHEDULE_DEFAULTS, TIMESTEP_SPACINGS, SchedulerBase, as_float32, as_float64,
                     draw_noise)
from .euler import sigma_timesteps, train_sigmas


class EulerAncestralDiscreteScheduler(SchedulerBase):
    """Ancestral Euler steps; stochastic: every ``step`` draws one standard normal of the sample's shape from
    ``rng`` (or takes ``noise``). ``timesteps`` are float32 as in :class:`EulerDiscreteScheduler`."""

    name = "euler_a"
    config_defaults = {
        **SCHEDULE_DEFAULTS,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }

    def __init__(self, **config: Any):
        super().__init__(**config)
        self._check_choice("prediction_type", ("epsilon", "v_prediction"))
        self._check_choice("timestep_spacing", TIMESTEP_SPACINGS)
        self._init_schedule(sigmas=True)
        T = len(self.alphas_cumprod)
        self.timesteps = np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy()
        self.sigmas = np.concatenate([train_sigmas(self.alphas_cumprod)[::-1], [0.0]])

    @property
    def init_noise_sigma(self) -> float:
        """Std of the initial latents: the largest sigma (sqrt(sigma^2 + 1) with ``leading`` spacing)."""
        max_sigma = float(self.sigmas.max())
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Set ``timesteps`` (float32 [n], descending) and ``sigmas`` (float64 [n + 1], ending in 0)."""
        n = self._check_num_inference_steps(num_inference_steps)
        timesteps = sigma_timesteps(self.config, n)
        sigmas_all = train_sigmas(self.alphas_cumprod)
        sigmas = np.interp(timesteps, np.arange(0, len(sigmas_all)), sigmas_all)
        self.num_inference_steps = n
        self.sigmas = np.concatenate([sigmas, [0.0]])
        self.timesteps = timesteps
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray:
        """UNet input for ``timestep``: sample [B, ...] / sqrt(sigma^2 + 1) -> float32 [B, ...]."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return as_float32(as_float64(sample) / (sigma**2 + 1) ** 0.5)

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
             rng: np.random.Generator | None = None, noise: np.ndarray | None = None) -> np.ndarray:
        """One ancestral step. model_output, sample: [B, ...]; timestep: the current entry of ``timesteps``;
        rng: draws the step's noise as ``rng.standard_normal(shape, dtype=float32)``; noise [B, ...]: use this
        instead (unseeded noise when both are None). Returns prev_sample float32 [B, ...]."""
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
        model_output, sample = as_float64(model_output), as_float64(sample)
        sigma = self.sigmas[self._step_index]

        if self.config["prediction_type"] == "epsilon":
            pred_original_sample = sample - sigma * model_output
        else:  # v_prediction
            pred_original_sample = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)

        sigma_from, sigma_to = sigma, self.sigmas[self._step_index + 1]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = max(sigma_to**2 - sigma_up**2, 0.0) ** 0.5

        derivative = (sample - pred_original_sample) / sigma
        dt = sigma_down - sigma
        prev_sample = sample + derivative * dt
        prev_sample = prev_sample + draw_noise(model_output.shape, rng, noise) * sigma_up

        self._step_index += 1
        self.pred_original_sample = as_float32(pred_original_sample)
        return as_float32(prev_sample)
