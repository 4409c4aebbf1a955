"""Timestep samplers for the training loss.

PUTS (Prompt-Uncertainty Timestep Sampling, ZOODiP §3.3): t ~ U[T_L, T_U) = U[500, 900), the band
where the text condition moves the denoiser's output most; ``uniform`` is the ordinary
textual-inversion choice t ~ U[0, T).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TimestepSampler:
    low: int
    high: int

    def __post_init__(self):
        if not 0 <= self.low < self.high:
            raise ValueError(f"timestep range needs 0 <= T_L < T_U, got [{self.low}, {self.high})")

    def __call__(self, rng: np.random.Generator) -> int:
        """One integer timestep in [low, high)."""
        return int(rng.integers(self.low, self.high))


def puts(t_low: int = 500, t_high: int = 900) -> TimestepSampler:
    return TimestepSampler(t_low, t_high)


def uniform(num_train_timesteps: int = 1000) -> TimestepSampler:
    return TimestepSampler(0, num_train_timesteps)
