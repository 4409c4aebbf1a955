"""DDIM (Song et al., https://huggingface.co/papers/2010.02502) in NumPy, after diffusers' ``DDIMScheduler``."""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import (PREDICTION_TYPES, SCHEDULE_DEFAULTS, TIMESTEP_SPACINGS, SchedulerBase, as_float32, as_float64,
                     draw_noise, threshold_sample)


class DDIMScheduler(SchedulerBase):
    """Denoising diffusion implicit models; deterministic for ``eta == 0`` (the default).

    ``eta > 0`` adds ``eta * sigma_t`` of fresh noise per step (``eta == 1`` is DDPM-like ancestral sampling); the
    noise comes from ``step(..., rng=...)`` or ``step(..., noise=...)``.
    """

    name = "ddim"
    config_defaults = {
        **SCHEDULE_DEFAULTS,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }

    def __init__(self, eta: float = 0.0, **config: Any):
        super().__init__(**config)
        self._check_choice("prediction_type", PREDICTION_TYPES)
        self._check_choice("timestep_spacing", TIMESTEP_SPACINGS)
        self.eta = float(eta)
        self._init_schedule()
        # alpha_bar "before" t=0, used by the last step
        self.final_alpha_cumprod = 1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])
        self.init_noise_sigma = 1.0
        self.timesteps = np.arange(self.config["num_train_timesteps"])[::-1].astype(np.int64)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Set ``timesteps`` (int64 [num_inference_steps], descending) by ``timestep_spacing``."""
        n = self._check_num_inference_steps(num_inference_steps)
        T = self.config["num_train_timesteps"]
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            timesteps = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        elif spacing == "leading":
            step_ratio = T // n
            timesteps = (np.arange(0, n) * step_ratio).round()[::-1].astype(np.int64)
            timesteps += self.config["steps_offset"]
        else:  # trailing
            step_ratio = T / n
            timesteps = np.round(np.arange(T, 0, -step_ratio)).astype(np.int64) - 1
        self.num_inference_steps = n
        self.timesteps = timesteps

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        """DDIM does not scale the UNet input: [B, ...] -> the same values as float32."""
        return as_float32(sample)

    def _alpha_prod(self, timestep: int) -> float:
        return float(self.alphas_cumprod[timestep]) if timestep >= 0 else self.final_alpha_cumprod

    def _get_variance(self, timestep: int, prev_timestep: int) -> float:
        alpha_prod_t, alpha_prod_t_prev = self._alpha_prod(timestep), self._alpha_prod(prev_timestep)
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        return (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
             rng: np.random.Generator | None = None, noise: np.ndarray | None = None,
             eta: float | None = None) -> np.ndarray:
        """One DDIM step x_t -> x_{t_prev}.

        model_output, sample: [B, ...]; timestep: the current entry of ``timesteps``; rng / noise ([B, ...]):
        the variance noise when eta > 0 (ignored otherwise); eta: overrides ``self.eta`` for this call.
        Returns prev_sample float32 [B, ...]; ``self.pred_original_sample`` holds the x0 estimate.
        """
        self._require_timesteps()
        eta = self.eta if eta is None else float(eta)
        cfg = self.config
        timestep = int(timestep)
        prev_timestep = timestep - cfg["num_train_timesteps"] // self.num_inference_steps
        model_output, sample = as_float64(model_output), as_float64(sample)

        alpha_prod_t = self._alpha_prod(timestep)
        alpha_prod_t_prev = self._alpha_prod(prev_timestep)
        beta_prod_t = 1 - alpha_prod_t

        # x0 and epsilon from the model output
        if cfg["prediction_type"] == "epsilon":
            pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
            pred_epsilon = model_output
        elif cfg["prediction_type"] == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5
        else:  # v_prediction
            pred_original_sample = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
            pred_epsilon = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample

        if cfg["thresholding"]:
            pred_original_sample = threshold_sample(pred_original_sample, cfg["dynamic_thresholding_ratio"],
                                                    cfg["sample_max_value"])
        elif cfg["clip_sample"]:
            r = cfg["clip_sample_range"]
            pred_original_sample = np.clip(pred_original_sample, -r, r)

        # sigma_t(eta), formula (16) of the paper; then formula (12)
        std_dev_t = eta * self._get_variance(timestep, prev_timestep) ** 0.5
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * pred_epsilon
        prev_sample = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction
        if eta > 0:
            prev_sample = prev_sample + std_dev_t * draw_noise(model_output.shape, rng, noise)

        self.pred_original_sample = as_float32(pred_original_sample)
        return as_float32(prev_sample)
