"""Shared pieces of the NumPy schedulers: the noise schedule, training targets and a small base class.

Everything here mirrors `diffusers` (0.35) but runs on NumPy only. Schedules are computed in float64 (diffusers
uses float32 tensors); samples go in and come out as float32.

Shapes: ``B`` batch, ``T`` train timesteps (``num_train_timesteps``, usually 1000), ``...`` any trailing dims
(for Stable Diffusion latents ``[B, 4, h, w]``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from ..errors import UserError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# The schedule keys every diffusers scheduler reads, with diffusers' defaults.
SCHEDULE_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
}


# --------------------------------------------------------------------------------------------------------------------
# Noise schedule
# --------------------------------------------------------------------------------------------------------------------


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the cosine ("squaredcos_cap_v2") schedule -> float64 [T]."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.asarray(betas, dtype=np.float64)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas [T] so the last timestep has zero SNR (https://huggingface.co/papers/2305.08891, Alg. 1)."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def betas_from_config(cfg: Mapping[str, Any]) -> np.ndarray:
    """Betas of a diffusers scheduler config -> float64 [T].

    Reads ``trained_betas`` (wins when present), else ``beta_schedule`` (linear | scaled_linear |
    squaredcos_cap_v2) with ``beta_start``, ``beta_end``, ``num_train_timesteps``; then applies
    ``rescale_betas_zero_snr`` when set. Missing keys take diffusers' defaults.
    """
    get = lambda key: cfg.get(key, SCHEDULE_DEFAULTS.get(key))  # noqa: E731
    num_train_timesteps = int(get("num_train_timesteps"))
    trained = get("trained_betas")
    schedule = get("beta_schedule")
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float64).reshape(-1)
    elif schedule == "linear":
        betas = np.linspace(float(get("beta_start")), float(get("beta_end")), num_train_timesteps, dtype=np.float64)
    elif schedule == "scaled_linear":
        start, end = float(get("beta_start")) ** 0.5, float(get("beta_end")) ** 0.5
        betas = np.linspace(start, end, num_train_timesteps, dtype=np.float64) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(num_train_timesteps)
    else:
        raise UserError(f"beta_schedule {schedule!r} is not supported (choose one of {', '.join(BETA_SCHEDULES)})")
    if cfg.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod(cfg: Mapping[str, Any]) -> np.ndarray:
    """Cumulative product of ``1 - betas`` of a scheduler config -> float64 [T] (diffusers' ``alphas_cumprod``)."""
    return np.cumprod(1.0 - betas_from_config(cfg))


# --------------------------------------------------------------------------------------------------------------------
# Training helpers (DDPMScheduler.add_noise / get_velocity)
# --------------------------------------------------------------------------------------------------------------------


def _coefficients(t: Any, alphas_cumprod: np.ndarray, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) for int timesteps t [B] (or a scalar), shaped [B, 1, ...] to
    broadcast against an array of ``ndim`` dims."""
    t = np.asarray(t, dtype=np.int64)
    a = np.asarray(alphas_cumprod, dtype=np.float64)[t.reshape(-1)]
    shape = (-1,) + (1,) * (ndim - 1) if t.ndim else ()
    a = a.reshape(shape)
    return np.sqrt(a), np.sqrt(1.0 - a)


def _out_dtype(*arrays: np.ndarray) -> np.dtype:
    dtype = np.result_type(*arrays)
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float32)


def add_noise(x0: np.ndarray, noise: np.ndarray, t: Any, alphas_cumprod: np.ndarray) -> np.ndarray:
    """Forward diffusion q(x_t | x_0): ``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise``.

    x0, noise: [B, ...]; t: int [B] (or a scalar int); alphas_cumprod: [T] -> [B, ...] in the inputs' float dtype
    (float32 for float32 inputs). Matches ``DDPMScheduler.add_noise``.
    """
    x0, noise = np.asarray(x0), np.asarray(noise)
    sa, s1a = _coefficients(t, alphas_cumprod, x0.ndim)
    return (sa * x0 + s1a * noise).astype(_out_dtype(x0, noise))


def velocity(x0: np.ndarray, noise: np.ndarray, t: Any, alphas_cumprod: np.ndarray) -> np.ndarray:
    """v-prediction target: ``sqrt(a_t) * noise - sqrt(1 - a_t) * x0``.

    x0, noise: [B, ...]; t: int [B] (or a scalar int); alphas_cumprod: [T] -> [B, ...]. Matches
    ``DDPMScheduler.get_velocity(x0, noise, t)``.
    """
    x0, noise = np.asarray(x0), np.asarray(noise)
    sa, s1a = _coefficients(t, alphas_cumprod, x0.ndim)
    return (sa * noise - s1a * x0).astype(_out_dtype(x0, noise))


def training_target(x0: np.ndarray, noise: np.ndarray, t: Any, alphas_cumprod: np.ndarray,
                    prediction_type: str) -> np.ndarray:
    """What the UNet should predict for ``add_noise(x0, noise, t)``: noise (epsilon), velocity (v_prediction) or
    x0 (sample). Shapes as in :func:`add_noise`."""
    if prediction_type == "epsilon":
        return np.asarray(noise).astype(_out_dtype(x0, noise))
    if prediction_type == "v_prediction":
        return velocity(x0, noise, t, alphas_cumprod)
    if prediction_type == "sample":
        return np.asarray(x0).astype(_out_dtype(x0, noise))
    raise UserError(f"prediction_type {prediction_type!r} is not supported "
                    f"(choose one of {', '.join(PREDICTION_TYPES)})")


# --------------------------------------------------------------------------------------------------------------------
# Sampling helpers
# --------------------------------------------------------------------------------------------------------------------


def threshold_sample(sample: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Dynamic thresholding (Imagen, https://huggingface.co/papers/2205.11487) of x0 [B, ...] -> [B, ...]:
    per batch item, clip to the ``ratio`` quantile s of |x0| (s clamped to [1, max_value]) and divide by s."""
    flat = sample.reshape(sample.shape[0], -1)
    s = np.quantile(np.abs(flat), ratio, axis=1)
    s = np.clip(s, 1.0, max_value)[:, None]
    return (np.clip(flat, -s, s) / s).reshape(sample.shape)


def draw_noise(shape: Sequence[int], rng: np.random.Generator | None, noise: np.ndarray | None) -> np.ndarray:
    """Standard normal noise of ``shape`` as float64: ``noise`` when given (its shape must match), else
    ``rng.standard_normal(shape, dtype=np.float32)`` (a fresh unseeded generator when ``rng`` is None)."""
    if noise is not None:
        if rng is not None:
            raise ValueError("pass either rng or noise, not both")
        noise = np.asarray(noise, dtype=np.float64)
        if noise.shape != tuple(shape):
            raise ValueError(f"noise has shape {noise.shape}, expected {tuple(shape)}")
        return noise
    rng = rng if rng is not None else np.random.default_rng()
    return rng.standard_normal(tuple(shape), dtype=np.float32).astype(np.float64)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional train timesteps of sigmas [N], by linear interpolation in log-sigma over log_sigmas [T]
    (ascending in t) -> float64 [N]. diffusers' ``_sigma_to_t``, vectorised."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10)).reshape(-1)
    dists = log_sigma[None, :] - log_sigmas[:, None]  # [T, N]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigmas.shape)


def karras_sigmas(in_sigmas: np.ndarray, num_inference_steps: int, sigma_min: float | None = None,
                  sigma_max: float | None = None, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels between ``in_sigmas[-1]`` and ``in_sigmas[0]`` (unless sigma_min/max are
    given) -> float64 [num_inference_steps], descending."""
    sigma_min = float(in_sigmas[-1]) if sigma_min is None else float(sigma_min)
    sigma_max = float(in_sigmas[0]) if sigma_max is None else float(sigma_max)
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def as_float64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def as_float32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------------------------


class SchedulerBase:
    """What all schedulers share: construction from a diffusers config, the config dict, step-index bookkeeping.

    Subclasses set ``name`` (registry key), ``config_defaults`` (the keys their diffusers class reads, with its
    defaults) and implement ``set_timesteps``, ``scale_model_input`` and ``step``.
    """

    name: ClassVar[str] = ""
    config_defaults: ClassVar[dict[str, Any]] = {}
    order: ClassVar[int] = 1

    def __init__(self, **config: Any):
        unknown = sorted(set(config) - set(self.config_defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected config keys: {', '.join(unknown)}")
        self.config: dict[str, Any] = {**self.config_defaults, **config}
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any):
        """Build from a diffusers ``scheduler_config.json`` dict, as ``XScheduler.from_config(config)`` does.

        Only the keys this scheduler reads are taken; keys listed in ``_use_default_values`` (filled in by
        diffusers from another class's defaults) are skipped so this class's own defaults apply. ``kwargs``
        override config keys (and pass extra constructor arguments, e.g. DDIM's ``eta``).
        """
        if not isinstance(config, Mapping):
            raise UserError(f"scheduler config must be a JSON object, got {type(config).__name__}")
        used_defaults = set(config.get("_use_default_values") or ())
        init = {k: v for k, v in config.items() if k in cls.config_defaults and k not in used_defaults}
        init.update(kwargs)
        return cls(**init)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    # ---- the noise schedule -------------------------------------------------------------------------------------

    def _init_schedule(self, sigmas: bool = False) -> None:
        """``betas``, ``alphas``, ``alphas_cumprod`` (float64 [T]) from the config. ``sigmas``: the scheduler
        works in sigma = sqrt((1 - alpha_bar) / alpha_bar), so with ``rescale_betas_zero_snr`` the last alpha_bar
        becomes 2**-24 instead of 0 (as diffusers' sigma-based schedulers do: zero SNR would make sigma
        infinite); DDIM and PNDM keep the 0."""
        self.betas = betas_from_config(self.config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(self.alphas)
        if sigmas and self.config.get("rescale_betas_zero_snr"):
            self.alphas_cumprod[-1] = 2**-24

    # ---- validation -------------------------------------------------------------------------------------------

    def _check_choice(self, key: str, allowed: Sequence[Any]) -> None:
        value = self.config[key]
        if value not in allowed:
            raise UserError(f"{type(self).__name__}: {key}={value!r} is not supported "
                            f"(choose one of {', '.join(map(str, allowed))})")

    def _check_off(self, *keys: str) -> None:
        for key in keys:
            if self.config.get(key):
                raise UserError(f"{type(self).__name__}: {key}={self.config[key]!r} is not supported here")

    def _check_num_inference_steps(self, num_inference_steps: Any) -> int:
        if isinstance(num_inference_steps, (bool, np.bool_)) or not isinstance(num_inference_steps,
                                                                               (int, np.integer)):
            raise UserError(f"number of inference steps must be an integer, got {num_inference_steps!r}")
        n = int(num_inference_steps)
        if n < 1:
            raise UserError(f"number of inference steps must be at least 1, got {n}")
        if n > self.config["num_train_timesteps"]:
            raise UserError(f"number of inference steps {n} exceeds num_train_timesteps "
                            f"{self.config['num_train_timesteps']}")
        return n

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps() before step()")

    # ---- step index (Euler, Euler ancestral, DPM-Solver) ------------------------------------------------------

    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next step; None until the first ``scale_model_input``/``step``."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at ``timesteps[begin_index]`` (img2img) instead of looking the first timestep up."""
        self._begin_index = int(begin_index)

    def index_for_timestep(self, timestep: Any) -> int:
        """Position of ``timestep`` in ``timesteps``; the second match when it appears twice (diffusers)."""
        indices = np.flatnonzero(self.timesteps == np.asarray(timestep).astype(self.timesteps.dtype))
        if len(indices) == 0:
            raise ValueError(f"timestep {timestep!r} is not in this scheduler's timesteps")
        return int(indices[1] if len(indices) > 1 else indices[0])

    def _init_step_index(self, timestep: Any) -> None:
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index
