"""DPM-Solver++ multistep (Lu et al., https://huggingface.co/papers/2211.01095) in NumPy, after diffusers'
``DPMSolverMultistepScheduler``.

Defaults as diffusers: ``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``solver_type="midpoint"``,
``lower_order_final=True`` ("DPM++ 2M"; with ``use_karras_sigmas=True``, "DPM++ 2M Karras"). The deterministic
algorithms (dpmsolver++, dpmsolver) and solver orders 1-3 are implemented; the SDE variants are not.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import UserError
from .common import (PREDICTION_TYPES, SCHEDULE_DEFAULTS, TIMESTEP_SPACINGS, SchedulerBase, as_float32, as_float64,
                     karras_sigmas, sigma_to_t, threshold_sample)
from .euler import train_sigmas


def _alpha_sigma(sigma: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) of the VP process from the VE-style sigma = sigma_t / alpha_t."""
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t


def _lambda(alpha_t: float, sigma_t: float) -> float:
    """Half log-SNR: log(alpha_t) - log(sigma_t) (+inf at sigma_t = 0)."""
    with np.errstate(divide="ignore"):
        return float(np.log(alpha_t) - np.log(sigma_t))


class DPMSolverMultistepScheduler(SchedulerBase):
    """Multistep DPM-Solver(++). Stateful: keeps the last ``solver_order`` converted model outputs (x0 estimates
    for dpmsolver++, epsilon for dpmsolver); ``step`` must follow ``timesteps`` in order."""

    name = "dpm++2m"
    config_defaults = {
        **SCHEDULE_DEFAULTS,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }

    def __init__(self, **config: Any):
        super().__init__(**config)
        cfg = self.config
        # diffusers maps these aliases on load
        if cfg["algorithm_type"] == "deis":
            cfg["algorithm_type"] = "dpmsolver++"
        if cfg["solver_type"] in ("logrho", "bh1", "bh2"):
            cfg["solver_type"] = "midpoint"
        self._check_choice("algorithm_type", ("dpmsolver++", "dpmsolver"))
        self._check_choice("solver_type", ("midpoint", "heun"))
        self._check_choice("solver_order", (1, 2, 3))
        self._check_choice("prediction_type", PREDICTION_TYPES)
        self._check_choice("timestep_spacing", TIMESTEP_SPACINGS)
        self._check_choice("final_sigmas_type", ("zero", "sigma_min"))
        self._check_off("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
                        "use_dynamic_shifting")
        if cfg["algorithm_type"] != "dpmsolver++" and cfg["final_sigmas_type"] == "zero":
            raise UserError(f"DPMSolverMultistepScheduler: final_sigmas_type 'zero' needs algorithm_type "
                            f"'dpmsolver++' (got {cfg['algorithm_type']!r}); use 'sigma_min'")

        self._init_schedule(sigmas=True)
        self.alpha_t = np.sqrt(self.alphas_cumprod)
        self.sigma_t = np.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = np.log(self.alpha_t) - np.log(self.sigma_t)  # [T], decreasing in t
        self.sigmas = train_sigmas(self.alphas_cumprod)
        self.init_noise_sigma = 1.0
        T = len(self.alphas_cumprod)
        self.timesteps = np.arange(T)[::-1].astype(np.int64)
        self.model_outputs: list[np.ndarray | None] = [None] * cfg["solver_order"]
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Set ``timesteps`` (int64 [n], descending) and ``sigmas`` (float64 [n + 1]); reset the history."""
        n = self._check_num_inference_steps(num_inference_steps)
        cfg = self.config
        T = cfg["num_train_timesteps"]
        # skip the high-noise end where lambda < lambda_min_clipped (cosine schedules)
        clipped_idx = int(np.searchsorted(self.lambda_t[::-1], cfg["lambda_min_clipped"]))
        last_timestep = T - clipped_idx
        spacing = cfg["timestep_spacing"]
        if spacing == "linspace":
            timesteps = np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            step_ratio = last_timestep // (n + 1)
            timesteps = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].astype(np.int64)
            timesteps += cfg["steps_offset"]
        else:  # trailing
            step_ratio = T / n
            timesteps = np.arange(last_timestep, 0, -step_ratio).round().astype(np.int64) - 1

        sigmas_all = train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(sigmas_all)
        if cfg["use_karras_sigmas"]:
            sigmas = karras_sigmas(sigmas_all[::-1], n)
            timesteps = sigma_to_t(sigmas, log_sigmas)
            if cfg["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas_all)), sigmas_all)
        sigma_last = sigmas_all[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0

        self.sigmas = np.concatenate([sigmas, [sigma_last]])
        self.timesteps = np.asarray(timesteps).astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None] * cfg["solver_order"]
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: Any) -> int:
        """Position of ``timestep`` in ``timesteps`` (second match if repeated; the last step if absent)."""
        indices = np.flatnonzero(self.timesteps == int(timestep))
        if len(indices) == 0:
            return len(self.timesteps) - 1
        return int(indices[1] if len(indices) > 1 else indices[0])

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        """DPM-Solver does not scale the UNet input: [B, ...] -> the same values as float32."""
        return as_float32(sample)

    # ---- model output conversion and updates ------------------------------------------------------------------

    def convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """UNet output [B, ...] -> x0 estimate (dpmsolver++) or epsilon estimate (dpmsolver) [B, ...]."""
        cfg = self.config
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[self._step_index])
        if cfg["variance_type"] in ("learned", "learned_range") and cfg["prediction_type"] == "epsilon":
            model_output = model_output[:, :3]
        if cfg["algorithm_type"] == "dpmsolver++":
            if cfg["prediction_type"] == "epsilon":
                x0_pred = (sample - sigma_t * model_output) / alpha_t
            elif cfg["prediction_type"] == "sample":
                x0_pred = model_output
            else:  # v_prediction
                x0_pred = alpha_t * sample - sigma_t * model_output
            if cfg["thresholding"]:
                x0_pred = threshold_sample(x0_pred, cfg["dynamic_thresholding_ratio"], cfg["sample_max_value"])
            return x0_pred
        # dpmsolver: work with epsilon
        if cfg["prediction_type"] == "epsilon":
            epsilon = model_output
        elif cfg["prediction_type"] == "sample":
            epsilon = (sample - alpha_t * model_output) / sigma_t
        else:  # v_prediction
            epsilon = alpha_t * model_output + sigma_t * sample
        if cfg["thresholding"]:
            x0_pred = (sample - sigma_t * epsilon) / alpha_t
            x0_pred = threshold_sample(x0_pred, cfg["dynamic_thresholding_ratio"], cfg["sample_max_value"])
            epsilon = (sample - alpha_t * x0_pred) / sigma_t
        return epsilon

    def _lambdas(self, offsets: tuple[int, ...]) -> tuple[list[float], list[float], list[float]]:
        """alpha, sigma, lambda at sigmas[step_index + k] for k in offsets."""
        alphas, sigmas, lambdas = [], [], []
        for k in offsets:
            a, s = _alpha_sigma(self.sigmas[self._step_index + k])
            alphas.append(a)
            sigmas.append(s)
            lambdas.append(_lambda(a, s))
        return alphas, sigmas, lambdas

    def dpm_solver_first_order_update(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """First-order step (DDIM in lambda). model_output: converted [B, ...]; sample [B, ...] -> [B, ...]."""
        (alpha_t, alpha_s), (sigma_t, sigma_s), (lambda_t, lambda_s) = self._lambdas((1, 0))
        h = lambda_t - lambda_s
        if self.config["algorithm_type"] == "dpmsolver++":
            return (sigma_t / sigma_s) * sample - (alpha_t * (np.exp(-h) - 1.0)) * model_output
        return (alpha_t / alpha_s) * sample - (sigma_t * (np.exp(h) - 1.0)) * model_output

    def multistep_dpm_solver_second_order_update(self, model_output_list: list[np.ndarray],
                                                 sample: np.ndarray) -> np.ndarray:
        """Second-order multistep step from the last two converted outputs; sample [B, ...] -> [B, ...]."""
        (alpha_t, alpha_s0, _), (sigma_t, sigma_s0, _), (lambda_t, lambda_s0, lambda_s1) = self._lambdas((1, 0, -1))
        m0, m1 = model_output_list[-1], model_output_list[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m0, (1.0 / r0) * (m0 - m1)
        midpoint = self.config["solver_type"] == "midpoint"
        if self.config["algorithm_type"] == "dpmsolver++":
            x_t = (sigma_t / sigma_s0) * sample - (alpha_t * (np.exp(-h) - 1.0)) * D0
            if midpoint:
                return x_t - 0.5 * (alpha_t * (np.exp(-h) - 1.0)) * D1
            return x_t + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * D1
        x_t = (alpha_t / alpha_s0) * sample - (sigma_t * (np.exp(h) - 1.0)) * D0
        if midpoint:
            return x_t - 0.5 * (sigma_t * (np.exp(h) - 1.0)) * D1
        return x_t - (sigma_t * ((np.exp(h) - 1.0) / h - 1.0)) * D1

    def multistep_dpm_solver_third_order_update(self, model_output_list: list[np.ndarray],
                                                sample: np.ndarray) -> np.ndarray:
        """Third-order multistep step from the last three converted outputs; sample [B, ...] -> [B, ...]."""
        (alpha_t, alpha_s0, _, _), (sigma_t, sigma_s0, _, _), lambdas = self._lambdas((1, 0, -1, -2))
        lambda_t, lambda_s0, lambda_s1, lambda_s2 = lambdas
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        D0 = m0
        D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
        if self.config["algorithm_type"] == "dpmsolver++":
            return ((sigma_t / sigma_s0) * sample
                    - (alpha_t * (np.exp(-h) - 1.0)) * D0
                    + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * D1
                    - (alpha_t * ((np.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2)
        return ((alpha_t / alpha_s0) * sample
                - (sigma_t * (np.exp(h) - 1.0)) * D0
                - (sigma_t * ((np.exp(h) - 1.0) / h - 1.0)) * D1
                - (sigma_t * ((np.exp(h) - 1.0 - h) / h**2 - 0.5)) * D2)

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
             rng: np.random.Generator | None = None, noise: np.ndarray | None = None) -> np.ndarray:
        """One multistep step from sigmas[i] to sigmas[i + 1]. model_output, sample: [B, ...]; timestep: the
        current entry of ``timesteps``; rng / noise: unused (deterministic algorithms only). Returns prev_sample
        float32 [B, ...]."""
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
        cfg = self.config
        n = len(self.timesteps)
        last, second_last = self._step_index == n - 1, self._step_index == n - 2
        # first order on the last step (always when it goes to sigma 0), second order on the one before it
        lower_order_final = last and (cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15)
                                      or cfg["final_sigmas_type"] == "zero")
        lower_order_second = second_last and cfg["lower_order_final"] and n < 15

        sample = as_float64(sample)
        model_output = self.convert_model_output(as_float64(model_output), sample)
        self.model_outputs = self.model_outputs[1:] + [model_output]

        order = cfg["solver_order"]
        with np.errstate(divide="ignore", invalid="ignore"):
            if order == 1 or self.lower_order_nums < 1 or lower_order_final:
                prev_sample = self.dpm_solver_first_order_update(model_output, sample)
            elif order == 2 or self.lower_order_nums < 2 or lower_order_second:
                prev_sample = self.multistep_dpm_solver_second_order_update(self.model_outputs, sample)
            else:
                prev_sample = self.multistep_dpm_solver_third_order_update(self.model_outputs, sample)
        if self.lower_order_nums < order:
            self.lower_order_nums += 1

        self._step_index += 1
        return as_float32(prev_sample)
