"""PNDM / PLMS (Liu et al., https://huggingface.co/papers/2202.09778) in NumPy, after diffusers' ``PNDMScheduler``.

The Stable Diffusion 1.x default: ``skip_prk_steps=True`` gives plain PLMS (a linear multistep method that warms
up with one extra model evaluation). With ``skip_prk_steps=False`` the first steps are Runge-Kutta (PRK) steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import SCHEDULE_DEFAULTS, TIMESTEP_SPACINGS, SchedulerBase, as_float32, as_float64


class PNDMScheduler(SchedulerBase):
    """Pseudo numerical methods for diffusion models. Stateful: ``step`` must be called once per entry of
    ``timesteps``, in order (``timesteps`` has ``num_inference_steps + 1`` entries with PLMS only, one repeated,
    or ``num_inference_steps + 9`` with PRK warm-up)."""

    name = "pndm"
    config_defaults = {
        **SCHEDULE_DEFAULTS,
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }
    pndm_order = 4

    def __init__(self, **config: Any):
        super().__init__(**config)
        self._check_choice("prediction_type", ("epsilon", "v_prediction"))
        self._check_choice("timestep_spacing", TIMESTEP_SPACINGS)
        self._init_schedule()
        self.final_alpha_cumprod = 1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])
        self.init_noise_sigma = 1.0
        self.timesteps = np.arange(self.config["num_train_timesteps"])[::-1].astype(np.int64)
        self.prk_timesteps = np.zeros(0, dtype=np.int64)
        self.plms_timesteps = np.zeros(0, dtype=np.int64)
        self._reset_state()

    def _reset_state(self) -> None:
        self.counter = 0  # steps taken since set_timesteps
        self.ets: list[np.ndarray] = []  # past epsilon estimates, oldest first
        self.cur_model_output: Any = 0  # running Runge-Kutta combination (PRK)
        self.cur_sample: np.ndarray | None = None  # sample at the start of a PRK step / the PLMS warm-up

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Set ``timesteps`` (int64, descending; see the class docstring for its length) and reset the history."""
        n = self._check_num_inference_steps(num_inference_steps)
        T = self.config["num_train_timesteps"]
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            base = np.linspace(0, T - 1, n).round().astype(np.int64)
        elif spacing == "leading":
            base = (np.arange(0, n) * (T // n)).round().astype(np.int64) + self.config["steps_offset"]
        else:  # trailing
            base = np.round(np.arange(T, 0, -T / n))[::-1].astype(np.int64) - 1
        self._timesteps = base  # ascending

        if self.config["skip_prk_steps"]:
            # PLMS warm-up evaluates the model twice around the first step: repeat the second-highest timestep.
            self.prk_timesteps = np.zeros(0, dtype=np.int64)
            self.plms_timesteps = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        else:
            half = T // n // 2
            prk = np.array(base[-self.pndm_order:]).repeat(2) + np.tile(np.array([0, half]), self.pndm_order)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = base[:-3][::-1].copy()
        self.num_inference_steps = n
        self.timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self._reset_state()

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        """PNDM does not scale the UNet input: [B, ...] -> the same values as float32."""
        return as_float32(sample)

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
             rng: np.random.Generator | None = None, noise: np.ndarray | None = None) -> np.ndarray:
        """One PRK or PLMS step. model_output, sample: [B, ...]; timestep: the current entry of ``timesteps``;
        rng / noise: unused (PNDM is deterministic). Returns prev_sample float32 [B, ...]."""
        self._require_timesteps()
        model_output, sample = as_float64(model_output), as_float64(sample)
        if self.counter < len(self.prk_timesteps) and not self.config["skip_prk_steps"]:
            prev_sample = self._step_prk(model_output, int(timestep), sample)
        else:
            prev_sample = self._step_plms(model_output, int(timestep), sample)
        self.counter += 1
        return as_float32(prev_sample)

    def _step_prk(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        """Runge-Kutta: four model evaluations per step, combined 1/6, 1/3, 1/3, 1/6."""
        T, n = self.config["num_train_timesteps"], self.num_inference_steps
        diff_to_prev = 0 if self.counter % 2 else T // n // 2
        prev_timestep = timestep - diff_to_prev
        timestep = int(self.prk_timesteps[self.counter // 4 * 4])

        phase = self.counter % 4
        if phase == 0:
            self.cur_model_output = self.cur_model_output + 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif phase in (1, 2):
            self.cur_model_output = self.cur_model_output + 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0

        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        return self._get_prev_sample(cur_sample, timestep, prev_timestep, model_output)

    def _step_plms(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        """Linear multistep (Adams-Bashforth) on the epsilon history, order up to 4."""
        if not self.config["skip_prk_steps"] and len(self.ets) < 3:
            raise RuntimeError("PNDMScheduler: PLMS steps need the PRK warm-up steps first")
        step = self.config["num_train_timesteps"] // self.num_inference_steps
        prev_timestep = timestep - step
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:  # second evaluation of the warm-up: redo the first step from its start
            prev_timestep = timestep
            timestep = timestep + step

        if len(self.ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(self.ets) == 1 and self.counter == 1:
            model_output = (model_output + self.ets[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        elif len(self.ets) == 2:
            model_output = (3 * self.ets[-1] - self.ets[-2]) / 2
        elif len(self.ets) == 3:
            model_output = (23 * self.ets[-1] - 16 * self.ets[-2] + 5 * self.ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * self.ets[-1] - 59 * self.ets[-2] + 37 * self.ets[-3] - 9 * self.ets[-4])
        return self._get_prev_sample(sample, timestep, prev_timestep, model_output)

    def _get_prev_sample(self, sample: np.ndarray, timestep: int, prev_timestep: int,
                         model_output: np.ndarray) -> np.ndarray:
        """x_{t-delta} from x_t and epsilon (formula (9) of the PNDM paper)."""
        alpha_prod_t = float(self.alphas_cumprod[timestep])
        alpha_prod_t_prev = (float(self.alphas_cumprod[prev_timestep]) if prev_timestep >= 0
                             else self.final_alpha_cumprod)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        if self.config["prediction_type"] == "v_prediction":
            model_output = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample

        sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** 0.5
        model_output_denom_coeff = (alpha_prod_t * beta_prod_t_prev**0.5
                                    + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** 0.5)
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / model_output_denom_coeff
