"""Euler sampler (Karras et al., https://huggingface.co/papers/2206.00364, Algorithm 2 without churn) in NumPy,
after diffusers' ``EulerDiscreteScheduler``.

Works in the sigma parameterisation ``x = x0 + sigma * eps``: the initial latents are scaled by
``init_noise_sigma`` and the UNet input by ``1 / sqrt(sigma^2 + 1)`` (``scale_model_input``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import (PREDICTION_TYPES, SCHEDULE_DEFAULTS, TIMESTEP_SPACINGS, SchedulerBase, as_float32, as_float64,
                     karras_sigmas, sigma_to_t)


def sigma_timesteps(config: dict, n: int) -> np.ndarray:
    """Timesteps of the sigma-based schedulers (Euler, Euler ancestral) -> float32 [n], descending; fractional
    under ``linspace`` spacing, as in diffusers."""
    T = config["num_train_timesteps"]
    spacing = config["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        timesteps = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float32)
        return timesteps + np.float32(config["steps_offset"])
    step_ratio = T / n  # trailing
    return np.arange(T, 0, -step_ratio).round().astype(np.float32) - np.float32(1)


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - a_t) / a_t) for every train timestep -> float64 [T], ascending in t."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


class EulerDiscreteScheduler(SchedulerBase):
    """Euler steps on the probability-flow ODE. ``timesteps`` are float32 (fractional for ``linspace`` spacing
    with most step counts, as diffusers gives them to the UNet); ``sigmas`` has one entry more than
    ``timesteps`` (the final sigma, 0 by default)."""

    name = "euler"
    config_defaults = {
        **SCHEDULE_DEFAULTS,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    }

    def __init__(self, **config: Any):
        super().__init__(**config)
        self._check_choice("prediction_type", PREDICTION_TYPES)
        self._check_choice("timestep_spacing", TIMESTEP_SPACINGS)
        self._check_choice("interpolation_type", ("linear",))
        self._check_choice("timestep_type", ("discrete",))
        self._check_choice("final_sigmas_type", ("zero", "sigma_min"))
        self._check_off("use_exponential_sigmas", "use_beta_sigmas")
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
        """Set ``timesteps`` (float32 [n], descending) and ``sigmas`` (float64 [n + 1]); reset the step index."""
        n = self._check_num_inference_steps(num_inference_steps)
        timesteps = sigma_timesteps(self.config, n)
        sigmas_all = train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(sigmas_all)
        sigmas = np.interp(timesteps, np.arange(0, len(sigmas_all)), sigmas_all)
        if self.config["use_karras_sigmas"]:
            sigmas = karras_sigmas(sigmas, n, self.config["sigma_min"], self.config["sigma_max"])
            timesteps = sigma_to_t(sigmas, log_sigmas)
        if self.config["final_sigmas_type"] == "sigma_min":
            sigma_last = sigmas_all[0]
        else:
            sigma_last = 0.0
        self.num_inference_steps = n
        self.sigmas = np.concatenate([sigmas, [sigma_last]])
        self.timesteps = np.asarray(timesteps).astype(np.float32)
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
        """One Euler step from sigmas[i] to sigmas[i + 1]. model_output, sample: [B, ...]; timestep: the current
        entry of ``timesteps``; rng / noise: unused (no churn). Returns prev_sample float32 [B, ...];
        ``self.pred_original_sample`` holds the x0 estimate."""
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
        model_output, sample = as_float64(model_output), as_float64(sample)
        sigma = self.sigmas[self._step_index]

        prediction_type = self.config["prediction_type"]
        if prediction_type == "epsilon":
            pred_original_sample = sample - sigma * model_output
        elif prediction_type == "v_prediction":
            pred_original_sample = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        else:  # sample
            pred_original_sample = model_output

        derivative = (sample - pred_original_sample) / sigma  # dx/dsigma
        dt = self.sigmas[self._step_index + 1] - sigma
        prev_sample = sample + derivative * dt

        self._step_index += 1
        self.pred_original_sample = as_float32(pred_original_sample)
        return as_float32(prev_sample)
