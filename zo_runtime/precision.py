"""The zeroth-order recipe per precision × backend: which smoothing radius μ keeps the signal.

RGE differences L(θ + μz) − L(θ) must stand above the rounding of the graphs that compute L. How
far they must be pushed depends on the bundle's precision (its UNet's, as the manifest records it)
and on the backend that runs it: weight-only INT8 (CPU, OpenVINO) keeps the FP32 signal at the
paper's μ = 1e-3; 16-bit activations (A16W8, the HTP recipe) need μ = 3e-2, and keep only a weak signal
on the simulated HTP (0.70); 8-bit activations lose it at every measured μ. ``benchmarks/bench_zo_signal.py`` measures the correlation of each bundle's directional
derivatives with FP32's (docs/results/zo_signal.json); :data:`MEASURED` is what it found, and
``tests/test_precision.py`` checks this table against that file with :func:`choose_mu`.

``personalize`` calls :func:`precision_recipe`: when the user gave no ``--mu``, the run takes the
measured μ for its bundle and provider, and says so on stderr; with ``--mu`` the user's value stands.
"""
from __future__ import annotations

import dataclasses
import sys

MIN_CORR = 0.95   # correlation with FP32's directional derivative a recipe should reach
WEAK_CORR = 0.5   # below this at every measured μ: no usable signal
RESULTS = "docs/results/zo_signal.json"

# The timestep band MEASURED was measured at: t ~ U[500, 900), PUTS's band (the default recipe's until it
# moved to [0, 500); rows measured at other bands are in RESULTS beside these).
MEASURED_AT = (500, 900)
# (UNet precision, backend) -> (μ, correlation with FP32 at that μ, draws), from RESULTS at MEASURED_AT.
# μ is the smallest measured value reaching MIN_CORR, else the best one if it reaches WEAK_CORR (a weak
# signal, said as a warning), else None (no signal: the recipe's μ stays, with a warning).
MEASURED: dict[tuple[str, str], tuple[float | None, float, int]] = {
    ("a16w8", "cpu"): (0.03, 0.9505, 96),
    ("a16w8", "qnn"): (0.03, 0.6961, 96),      # the HTP (simulated): a weak signal even at 3e-2
    ("a8w8", "cpu"): (None, 0.2117, 96),
    ("a8w8", "qnn"): (None, 0.1914, 96),
    ("fp32", "cpu"): (0.001, 1.0, 96),
    ("fp32", "openvino"): (0.001, 1.0, 96),
    ("int8", "cpu"): (None, 0.209, 96),
    ("int8w", "cpu"): (0.001, 1.0, 96),
    ("int8w", "openvino"): (0.001, 1.0, 96),
}


def choose_mu(rows: list[dict], precision: str, backend: str, min_corr: float = MIN_CORR):
    """From results rows (bench_zo_signal.py): (μ, corr) with μ the smallest reaching ``min_corr``; else
    the μ of the best correlation if it reaches WEAK_CORR; else (None, best corr). None when the pair was
    not measured."""
    mine = sorted((r for r in rows if r["precision"] == precision and r["backend"] == backend),
                  key=lambda r: r["mu"])
    if not mine:
        return None
    for r in mine:
        if r["corr"] >= min_corr:
            return r["mu"], r["corr"]
    best = max(mine, key=lambda r: r["corr"])
    return (best["mu"] if best["corr"] >= WEAK_CORR else None), best["corr"]


def table_from(rows: list[dict], min_corr: float = MIN_CORR, band: tuple[int, int] = MEASURED_AT) -> dict:
    """:data:`MEASURED` as the results rows measured at timestep ``band`` give it."""
    rows = [r for r in rows if tuple(r["timesteps"]) == tuple(band)]
    out = {}
    for precision, backend in sorted({(r["precision"], r["backend"]) for r in rows}):
        mu, corr = choose_mu(rows, precision, backend, min_corr)
        draws = min(r["draws"] for r in rows if r["precision"] == precision and r["backend"] == backend)
        out[(precision, backend)] = (mu, corr, draws)
    return out


def recipe_for(precision: str, backend: str):
    """(μ or None, corr, draws) measured for this pair, or None if it was not measured."""
    return MEASURED.get((precision, backend))


def precision_recipe(given, cfg, bundle, say=None):
    """``cfg`` (resolved) with μ set from :data:`MEASURED` for ``bundle`` on ``cfg.provider`` when
    ``given`` (the config as the user gave it) left μ to the recipe. Says what it chose on stderr."""
    from .providers import parse

    say = say or (lambda line: print(line, file=sys.stderr))
    precision = bundle.graph("unet").get("precision", "fp32")
    backend = parse(cfg.provider).backend
    found = recipe_for(precision, backend)
    if found is None:
        return cfg
    mu, corr, draws = found
    if mu is None:
        say(f"warning: {precision} on {backend} keeps no zeroth-order signal at any measured mu (best correlation "
            f"with FP32 {corr:.2f}, {draws} draws, {RESULTS}); personalization will mostly follow noise")
        return cfg
    if given.mu is not None:
        if given.mu < mu:
            say(f"note: --mu {given.mu:g} is below the {mu:g} measured to keep the signal for {precision} on "
                f"{backend} ({RESULTS})")
        return cfg
    weak = "" if corr >= MIN_CORR else f"; a weak signal, below the {MIN_CORR} aimed at: expect slower progress"
    if mu != cfg.mu:
        say(f"personalize: mu {mu:g} for {precision} on {backend} (recipe default {cfg.mu:g}): measured correlation "
            f"with FP32's directional derivative {corr:.2f} over {draws} draws ({RESULTS}){weak}; --mu overrides it")
        return dataclasses.replace(cfg, mu=mu)
    if weak:
        say(f"warning: {precision} on {backend} at mu {mu:g}: correlation with FP32 {corr:.2f} ({RESULTS}){weak}")
    return cfg
