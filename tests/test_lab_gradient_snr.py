"""benchmarks/lab_gradient_snr.py: the statistics it reports, on synthetic gradients with known answers."""
import importlib.util
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("lab_gradient_snr", ROOT / "benchmarks" / "lab_gradient_snr.py")
lab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lab)

rng = np.random.default_rng(0)
MEAN = np.r_[1.0, np.zeros(15)]


def test_signal_share_is_the_means_share_of_a_samples_energy():
    assert abs(lab.signal_share(np.tile(MEAN, (50, 1))) - 1.0) < 1e-12
    noise = rng.standard_normal((20000, 16))              # E‖g‖² = 1 + 16, ‖μ‖² = 1
    assert abs(lab.signal_share(MEAN + noise) - 1 / 17) < 0.01
    assert abs(lab.signal_share(noise)) < 0.01


def test_mirrored_noise_that_cancels_makes_the_pair_all_signal():
    noise = rng.standard_normal((4000, 16))
    odd = lab.antithetic_stats(MEAN + noise, MEAN - noise)       # noise odd in eps: the pair cancels it
    assert abs(odd["pair"] - 1.0) < 1e-9 and odd["cos"] < -0.8
    indep = lab.antithetic_stats(MEAN + noise, MEAN + rng.standard_normal((4000, 16)))
    assert abs(indep["pair"] - indep["two_independent"]) < 0.02     # unrelated noise: a pair is two draws
    assert abs(indep["pair"] - 2 / 18) < 0.02                        # ‖μ‖² / (‖μ‖² + 16 / 2)


def test_an_anchor_that_predicts_the_sample_noise_removes_it():
    g0 = MEAN + rng.standard_normal((2000, 16))
    same_noise = lab.anchor_stats(g0 + 0.5, g0)                  # g(θ) = g(θ₀) + a constant shift
    assert same_noise["noise_ratio"] < 1e-12 and same_noise["cos"] > 0.5
    fresh = lab.anchor_stats(MEAN + rng.standard_normal((2000, 16)), g0)
    assert abs(fresh["noise_ratio"] - 2.0) < 0.15 and abs(fresh["cos"]) < 0.05   # unrelated: g − g₀ has both
