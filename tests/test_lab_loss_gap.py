"""benchmarks/lab_loss_gap.py: the split of a ZO move along and across TI's, and the loss evaluation on
common draws (a stub trainer: the loss is a known quadratic, so every figure has an exact value)."""
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("lab_loss_gap", ROOT / "benchmarks" / "lab_loss_gap.py")
lab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lab)


def _tokens():
    init = np.zeros((1, 4), np.float32)
    ti = np.array([[2.0, 0, 0, 0]], np.float32)
    zo = np.array([[1.0, 3.0, 0, 0]], np.float32)                 # half TI's move along it, 3 across
    return {"init": init, "ti": ti, "zo": zo}


def test_moves_are_split_along_and_across_tis_move():
    tokens = _tokens()
    c = lab.candidates(tokens, ["zo"], valley=True)
    np.testing.assert_allclose(c["zo|par"], [[1, 0, 0, 0]])
    np.testing.assert_allclose(c["zo|perp"], [[0, 3, 0, 0]])
    np.testing.assert_allclose(c["zo|ti+perp"], [[2, 3, 0, 0]])
    np.testing.assert_allclose(c["line@0.5"], [[1, 0, 0, 0]])
    for k in ("ti+perp1.0#0", "ti+perp1.0#1"):                       # unit offsets, across TI's move only
        off = c[k] - tokens["ti"]
        assert abs(off[0, 0]) < 1e-6 and abs(np.linalg.norm(off) - 1) < 1e-6
    g = lab.geometry(tokens, ["zo"])["zo"]
    assert abs(g["along_ti_over_ti_move"] - 0.5) < 1e-6 and abs(g["perp"] - 3) < 1e-6


def test_losses_are_paired_differences_from_tis_on_the_same_draws():
    """Stub trainer: a draw's loss is |θ − (2, 0, 0, 0)|² + noise shared by every candidate, so the noise
    cancels in the paired differences exactly."""
    class Oracle:
        def losses(self, thetas, ids, slots, latent, noise, t):
            return np.sum((thetas.reshape(len(thetas), -1) - [2, 0, 0, 0]) ** 2, axis=1) + float(noise)

    trainer = SimpleNamespace(oracle=Oracle(), conditioning=lambda i: {},
                              draw=lambda rng: (0, None, None, None, rng.standard_normal(), 0))
    bands = lab.evaluate(trainer, lab.candidates(_tokens(), ["zo"]), draws=200)
    whole = bands["0-1000"]
    assert whole["ti"]["minus_ti"] == 0
    assert abs(whole["init"]["minus_ti"] - 4) < 1e-9 and whole["init"]["se"] < 1e-9
    assert abs(whole["zo"]["minus_ti"] - 10) < 1e-9                  # |(−1, 3)|²
    assert abs(whole["zo|par"]["minus_ti"] - 1) < 1e-9
    for band in bands.values():                                       # every band: the same exact differences
        assert abs(band["init"]["minus_ti"] - 4) < 1e-9 and abs(band["zo"]["minus_ti"] - 10) < 1e-9
