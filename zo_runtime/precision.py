"""The zeroth-order recipe per precision × backend: which smoothing radius μ keeps the signal.

RGE differences L(θ + μz) − L(θ) must stand above the rounding of the graphs that compute L. How
far they must be pushed depends on the bundle's precision (its UNet's, as the manifest records it)
and on the backend that runs it: weight-only INT8 (CPU, OpenVINO) keeps the FP32 signal at the
paper's μ = 1e-3; weight-only with a 4-bit UNet (int4w) correlates 0.95 with FP32 at every μ (a slightly
different model, not rounding: the plateau rule of :func:`choose_mu` keeps μ = 1e-3); 16-bit activations (A16W8, the HTP recipe) need μ = 3e-2 at t ∈ [500, 900), keep only
a weak signal on the simulated HTP there (0.70), and a weak one on the CPU provider at the default recipe's
t ∈ [0, 500) (0.63); the HTP's FP16 mode (``--target qnn --weights fp16``) keeps 0.88-0.92 at μ = 1e-2 and
0.98-0.99 at 3e-2, and trains better at 1e-2; 8-bit activations lose it at every measured μ. ``benchmarks/bench_zo_signal.py``
measures the correlation of each bundle's directional
derivatives with FP32's (docs/results/zo_signal.json); :data:`MEASURED` is what it found, and
``tests/test_precision.py`` checks this table against that file with :func:`choose_mu`.

``personalize`` calls :func:`precision_recipe`: when the user gave no ``--mu``, the run takes the
measured μ for its bundle and provider, and says so on stderr; with ``--mu`` the user's value stands.
"""
from __future__ import annotations

import dataclasses
import sys

# Correlation with FP32's directional derivative a recipe should reach. 0.85, not more: a larger μ smooths the
# loss and costs quality of its own. On the HTP's FP16 mode μ = 1e-2 (correlation 0.88) trained two subjects to
# 50 % against 30 % at μ = 3e-2 (0.98), and on the CPU, where the signal is exact at every μ, 1e-2 and 3e-2
# scored 45 and 22.5 % (docs/results/lab/npu-quality-fp16-1500.json; one seed each, so the threshold is a
# judgement from few runs, not a fit).
MIN_CORR = 0.85
WEAK_CORR = 0.5   # below this at every measured μ: no usable signal
PLATEAU = 0.01    # a smaller μ within this of the best correlation is as good: what differs is the model
RESULTS = "docs/results/zo_signal.json"
# Per backend, the precision to convert to where a bundle's loses the signal (named in the warning when it
# keeps the signal at the run's band), and how.
BETTER_ON = {"qnn": ("fp16", "zo-edge convert SRC OUT --target qnn --weights fp16")}

# (UNet precision, backend, timestep band) -> (μ, correlation with FP32 at that μ, draws), from RESULTS.
# The band matters: differences at low timesteps are smaller, and rounding swallows more of them.
# μ is the smallest measured value reaching MIN_CORR, else the best one if it reaches WEAK_CORR (a weak
# signal, said as a warning), else None (no signal: the recipe's μ stays, with a warning).
MEASURED: dict[tuple[str, str, tuple[int, int]], tuple[float | None, float, int]] = {
    ('a16w8', 'cpu', (0, 500)): (0.03, 0.6293, 96),
    ('a8w8', 'cpu', (0, 500)): (None, 0.1445, 96),
    ('fp16', 'qnn', (0, 500)): (0.01, 0.8752, 96),
    ('fp32', 'cpu', (0, 500)): (0.001, 1.0, 96),
    ('fp32', 'openvino', (0, 500)): (0.001, 1.0, 96),
    ('int4w', 'cpu', (0, 500)): (0.001, 0.946, 96),
    ('int8', 'cpu', (0, 500)): (None, 0.2728, 96),
    ('int8w', 'cpu', (0, 500)): (0.001, 1.0, 96),
    ('int8w', 'openvino', (0, 500)): (0.001, 1.0, 96),
    ('a16w8', 'cpu', (500, 900)): (0.03, 0.9505, 96),
    ('a16w8', 'qnn', (500, 900)): (0.03, 0.6961, 96),
    ('a8w8', 'cpu', (500, 900)): (None, 0.2117, 96),
    ('a8w8', 'qnn', (500, 900)): (None, 0.1914, 96),
    ('fp16', 'qnn', (500, 900)): (0.01, 0.9219, 96),
    ('fp32', 'cpu', (500, 900)): (0.001, 1.0, 96),
    ('fp32', 'openvino', (500, 900)): (0.001, 1.0, 96),
    ('int4w', 'cpu', (500, 900)): (0.001, 0.9558, 96),
    ('int8', 'cpu', (500, 900)): (None, 0.209, 96),
    ('int8w', 'cpu', (500, 900)): (0.001, 1.0, 96),
    ('int8w', 'openvino', (500, 900)): (0.001, 1.0, 96),
}


def choose_mu(rows: list[dict], precision: str, backend: str, min_corr: float = MIN_CORR):
    """From results rows (bench_zo_signal.py): (μ, corr) with μ the smallest reaching ``min_corr`` or
    within :data:`PLATEAU` of the best correlation, whichever asks less; (None, best corr) when the
    best is below WEAK_CORR. None when the pair was not measured.

    The plateau: where rounding swallows small differences, the correlation climbs with μ; where the
    correlation is flat in μ (4-bit weights: 0.95 at every μ), the quantized model simply differs a
    little from FP32, and a larger μ buys nothing but a coarser difference."""
    mine = sorted((r for r in rows if r["precision"] == precision and r["backend"] == backend),
                  key=lambda r: r["mu"])
    if not mine:
        return None
    best = max(mine, key=lambda r: r["corr"])
    if best["corr"] < WEAK_CORR:
        return None, best["corr"]
    enough = min(min_corr, best["corr"] - PLATEAU)
    r = next(r for r in mine if r["corr"] >= enough)
    return r["mu"], r["corr"]


def table_from(rows: list[dict], min_corr: float = MIN_CORR) -> dict:
    """:data:`MEASURED` as the results rows give it, per timestep band."""
    out = {}
    for band in sorted({tuple(r["timesteps"]) for r in rows}):
        at = [r for r in rows if tuple(r["timesteps"]) == band]
        for precision, backend in sorted({(r["precision"], r["backend"]) for r in at}):
            mu, corr = choose_mu(at, precision, backend, min_corr)
            draws = min(r["draws"] for r in at if r["precision"] == precision and r["backend"] == backend)
            out[(precision, backend, band)] = (mu, corr, draws)
    return out


def recipe_for(precision: str, backend: str, band: tuple[int, int]):
    """(μ or None, corr, draws, band) measured for this pair at ``band``; else at the nearest measured band
    (the signal was not measured where this run trains); None if the pair was never measured."""
    bands = [b for (p, k, b) in MEASURED if (p, k) == (precision, backend)]
    if not bands:
        return None
    near = min(bands, key=lambda b: abs(b[0] - band[0]) + abs(b[1] - band[1]))
    return (*MEASURED[(precision, backend, near)], near)


def _band_text(band) -> str:
    return f"t in [{band[0]}, {band[1]})"


def precision_recipe(given, cfg, bundle, say=None):
    """``cfg`` (resolved) with μ set from :data:`MEASURED` for ``bundle`` on ``cfg.provider`` at the run's
    timestep band when ``given`` (the config as the user gave it) left μ to the recipe. Says what it chose
    on stderr, and where the signal is weak at the run's band but not at another measured band, names it."""
    from .providers import parse

    say = say or (lambda line: print(line, file=sys.stderr))
    precision = bundle.graph("unet").get("precision", "fp32")
    backend = parse(cfg.provider).backend
    band = (cfg.t_low, cfg.t_high) if cfg.puts else (0, int(bundle.noise_schedule.get("num_train_timesteps", 1000)))
    found = recipe_for(precision, backend, band)
    if found is None:
        return cfg
    mu, corr, draws, at = found
    where = f"{draws} draws at {_band_text(at)}" + ("" if at == band else f", not this run's {_band_text(band)}")
    better = [(b, v) for (p, k, b), v in MEASURED.items()
              if (p, k) == (precision, backend) and b != at and v[1] >= MIN_CORR > corr]
    hint = "".join(f"; at {_band_text(b)} it keeps {v[1]:.2f} at mu {v[0]:g} (--t-low {b[0]} --t-high {b[1]})"
                   for b, v in better)
    alt, how = BETTER_ON.get(backend, (None, None))
    kept = MEASURED.get((alt, backend, at))
    if alt != precision and kept is not None and corr < MIN_CORR <= kept[1]:
        hint += f"; {alt} bundles keep {kept[1]:.2f} on {backend} at mu {kept[0]:g} ({how})"
    if mu is None:
        say(f"warning: {precision} on {backend} keeps no zeroth-order signal at any measured mu (best correlation "
            f"with FP32 {corr:.2f}, {where}, {RESULTS}){hint}; personalization will mostly follow noise")
        return cfg
    if given.mu is not None:
        if given.mu < mu:
            say(f"note: --mu {given.mu:g} is below the {mu:g} measured to keep the signal for {precision} on "
                f"{backend} ({RESULTS})")
        return cfg
    weak = "" if corr >= MIN_CORR else f"; a weak signal, below the {MIN_CORR} aimed at: expect slower progress"
    if mu != cfg.mu:
        say(f"personalize: mu {mu:g} for {precision} on {backend} (recipe default {cfg.mu:g}): measured correlation "
            f"with FP32's directional derivative {corr:.2f} over {where} ({RESULTS}){weak}{hint}; --mu overrides it")
        return dataclasses.replace(cfg, mu=mu)
    if weak:
        say(f"warning: {precision} on {backend} at mu {mu:g}: correlation with FP32 {corr:.2f} over {where} "
            f"({RESULTS}){weak}{hint}")
    return cfg
