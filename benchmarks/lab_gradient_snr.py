"""Where the learning signal is: per-sample token gradients of the denoising loss, by timestep.

A diagnostic for the estimator lab (docs/estimator-lab.md), using PyTorch on the shipped shapes
model's diffusers source (backprop here only measures what forward-only training has to find).
For each subject: the references are rendered (seed 0), the token starts at the class noun, and
N per-sample gradients g(ξ) of L(θ₀; ξ) are taken, ξ = (reference, template, noise, t) drawn as
training draws them, t uniform. Reported per timestep band:

* ``signal``: ‖μ_band‖² / mean ‖g‖² (‖μ‖² estimated without the bias of a finite mean) — the share of a sample gradient's energy that is the band's mean
  (1: every sample points the same way; 1/d: pure noise in d dimensions);
* ``align``: cos(ḡ_band, ḡ_all) — whether the band pushes where the whole range pushes;
* ``toward_ti``: cos(ḡ_band, −(θ_TI − θ₀)) when a TI token is given (the descent direction
  points toward where TI went).

    python benchmarks/lab_gradient_snr.py --samples 800 --out docs/results/lab/gradient_snr.json

Two forward-only ways to cancel sample noise, measured before building them: ``--antithetic`` (each draw
again with its noise mirrored, −ε: the signal share of the pair against two independent draws) and
``--along-ti F,...`` (the same draws at init + F × TI's move: how much of a draw's gradient there its
gradient at the init word predicts, i.e. what a control variate anchored at the init word removes).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BANDS = [(0, 250), (250, 500), (500, 900), (900, 1000), (0, 1000)]


def load_source(source: Path, subject: str, seed: int = 0, double: bool = False) -> SimpleNamespace:
    """A shapes model's diffusers source as an instrument: tokenizer, text encoder, VAE, UNet and
    scheduler (no gradients to their weights; text encoder and UNet in float64 with ``double``), the
    subject, its class noun's token id and row θ₀, and the VAE posteriors of its references (and their
    mirrors) rendered at the model's own resolution."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from zo_edge.models import world

    subj = world.Subject.parse(subject)
    tok = CLIPTokenizer.from_pretrained(source / "tokenizer")
    text = CLIPTextModel.from_pretrained(source / "text_encoder").eval()
    vae = AutoencoderKL.from_pretrained(source / "vae").eval()
    unet = UNet2DConditionModel.from_pretrained(source / "unet").eval()
    if double:
        text, unet = text.double(), unet.double()
    sched = DDPMScheduler.from_pretrained(source / "scheduler")
    for m in (text, vae, unet):
        m.requires_grad_(False)
    size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    refs = np.stack(world.reference_images(subj, n=5, seed=seed, size=size))
    init_id = tok.encode(subj.shape, add_special_tokens=False)[0]
    theta0 = text.get_input_embeddings().weight[init_id].detach().clone()
    with torch.no_grad():
        x = torch.from_numpy(np.concatenate([refs, refs[:, :, ::-1]]).copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
        post = vae.encode(x).latent_dist
    return SimpleNamespace(tok=tok, text=text, vae=vae, unet=unet, sched=sched, subj=subj, init_id=init_id,
                           theta0=theta0, post=post)


def draw(rng: np.random.Generator, src: SimpleNamespace):
    """One training draw's reference latent and prompt, as personalize draws them: (scaled latent z,
    prompt ids [1, 77], position of the token). Noise and timestep are the caller's, drawn after."""
    import torch

    from zo_runtime.recipe import TEMPLATES

    post = src.post
    i = int(rng.integers(len(post.mean)))
    z = (post.mean[i] + post.std[i] * torch.from_numpy(rng.standard_normal(post.mean.shape[1:], dtype=np.float32)))
    z = z * src.vae.config.scaling_factor
    prompt = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(src.subj.shape)
    ids = src.tok(prompt, padding="max_length", max_length=src.tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
    return z, ids, int((ids[0] == src.init_id).nonzero()[-1])


def per_sample_gradients(source: Path, subject: str, samples: int, seed: int = 0, t_max: int = 1000,
                         ti_theta: np.ndarray | None = None, along: tuple = (), antithetic: bool = False):
    """Per-sample gradients g(θ; ξ), t ~ U[0, t_max), on the same draws ξ at θ₀ and at θ₀ + f (θ_TI − θ₀)
    for each f in ``along`` (key f"ti*{f}"); with ``antithetic`` also at the mirrored noise −ε of every
    draw (key "-eps")."""
    import torch

    src = load_source(source, subject, seed)
    text, unet, sched, theta0 = src.text, src.unet, src.sched, src.theta0
    at = {"init": theta0}
    for f in along:
        at[f"ti*{f}"] = theta0 + f * (torch.as_tensor(np.asarray(ti_theta).reshape(-1), dtype=theta0.dtype) - theta0)
    rng = np.random.default_rng(seed)
    grads, ts = {k: [] for k in [*at, *(["-eps"] if antithetic else [])]}, []

    def gradient(theta0_, z, ids, pos, noise, t):
        theta = theta0_.clone().requires_grad_(True)

        def put_theta(module, inputs, out):
            return torch.cat([out[:, :pos], theta[None, None], out[:, pos + 1:]], dim=1)

        hook = text.get_input_embeddings().register_forward_hook(put_theta)
        hidden = text(ids)[0]
        hook.remove()
        noisy = sched.add_noise(z[None], noise, torch.tensor([t]))
        pred = unet(noisy, torch.tensor([t]), encoder_hidden_states=hidden).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        (g,) = torch.autograd.grad(loss, theta)
        return g.numpy().astype(np.float64)

    for _ in range(samples):
        z, ids, pos = draw(rng, src)
        noise = torch.from_numpy(rng.standard_normal(z.shape, dtype=np.float32))[None]
        t = int(rng.integers(0, min(t_max, sched.config.num_train_timesteps)))
        for k, theta in at.items():
            grads[k].append(gradient(theta, z, ids, pos, noise, t))
        if antithetic:
            grads["-eps"].append(gradient(theta0, z, ids, pos, -noise, t))
        ts.append(t)
    return {k: np.stack(v) for k, v in grads.items()}, np.array(ts), theta0.numpy()


def signal_share(g: np.ndarray) -> float:
    """‖E g‖² / E‖g‖², ‖E g‖² estimated without the bias of a finite mean."""
    mean = g.mean(0)
    spread = np.sum((g - mean) ** 2) / max(len(g) - 1, 1)
    return float((mean @ mean - spread / len(g)) / np.mean(np.sum(g * g, 1)))


def antithetic_stats(g: np.ndarray, g_mirror: np.ndarray) -> dict:
    """Whether a draw's noise and its mirror −ε cancel the sample noise: the signal share of one draw's
    gradient, of the pair's mean, and of the mean of two independent draws (the pair's cost), and the
    mean cosine between g(ε) and g(−ε)."""
    half = len(g) // 2
    cos = np.sum(g * g_mirror, 1) / np.linalg.norm(g, axis=1) / np.linalg.norm(g_mirror, axis=1)
    return {"single": signal_share(np.concatenate([g, g_mirror])), "pair": signal_share((g + g_mirror) / 2),
            "two_independent": signal_share((g[:half] + g[half:2 * half]) / 2), "cos": float(cos.mean())}


def anchor_stats(g: np.ndarray, g0: np.ndarray) -> dict:
    """How much of a draw's gradient at θ its gradient at θ₀ predicts (a control variate anchored at θ₀):
    mean cos(g, g₀), and the spread of g − g₀ as a share of the spread of g (below 1: the control variate
    removes sample noise)."""
    cos = np.sum(g * g0, 1) / np.linalg.norm(g, axis=1) / np.linalg.norm(g0, axis=1)
    spread = lambda x: float(np.mean(np.sum((x - x.mean(0)) ** 2, 1)))  # noqa: E731
    return {"cos": float(cos.mean()), "noise_ratio": spread(g - g0) / spread(g), "signal": signal_share(g)}


def band_stats(grads: np.ndarray, ts: np.ndarray, toward: np.ndarray | None, t_max: int = 1000) -> list[dict]:
    g_all = grads.mean(0)
    out = []
    for lo, hi in BANDS:
        if lo >= t_max:            # a band outside --t-max; the others are cut at it
            continue
        hi = min(hi, t_max)
        sel = (ts >= lo) & (ts < hi)
        g = grads[sel]
        mean = g.mean(0)
        row = {"band": [lo, hi], "samples": int(sel.sum()), "signal": signal_share(g),
               "align": float(mean @ g_all / np.linalg.norm(mean) / np.linalg.norm(g_all)),
               "mean_norm": float(np.linalg.norm(mean)), "sample_norm": float(np.sqrt(np.mean(np.sum(g * g, 1))))}
        if toward is not None:
            row["toward_ti"] = float(-mean @ toward / np.linalg.norm(mean) / np.linalg.norm(toward))
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(ROOT / "models/shapes/source"))
    ap.add_argument("--subjects", default="green:solid:ring,blue:dotted:heart,red:striped:star,orange:solid:triangle")
    ap.add_argument("--samples", type=int, default=800)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ti-steps", type=int, default=500, help="a TI run per subject for the toward-TI column (0: off)")
    ap.add_argument("--t-max", type=int, default=1000, help="timesteps t ~ U[0, T_MAX)")
    ap.add_argument("--antithetic", action="store_true",
                    help="also each draw with its noise mirrored (-eps): does the pair cancel sample noise?")
    ap.add_argument("--along-ti", default="",
                    help="fractions f: also the same draws at init + f (TI - init), against the init's (needs --ti-steps)")
    ap.add_argument("--out", default=str(ROOT / "docs/results/lab/gradient_snr.json"))
    args = ap.parse_args()
    if args.along_ti and not args.ti_steps:
        ap.error("--along-ti needs a TI token: give --ti-steps > 0")
    if not 1 <= args.t_max <= 1000:
        ap.error(f"--t-max {args.t_max}: must be within 1..1000")
    import torch

    torch.set_num_threads(args.threads)
    from zo_runtime.outputs import write_json

    from zo_runtime.sysinfo import cpu_model, source_commit

    commit = source_commit()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    results = []
    for subject in args.subjects.split(","):
        t0 = time.time()
        ti_theta = None
        if args.ti_steps:
            from zo_edge.eval.textual_inversion import textual_inversion
            from zo_edge.models import world

            subj = world.Subject.parse(subject)
            refs = np.stack(world.reference_images(subj, n=5, seed=0, size=32))
            ti_theta = textual_inversion(args.source, refs, "<subject>", subj.shape, args.ti_steps, seed=0,
                                         threads=args.threads)["theta"][0].astype(np.float64)
        along = tuple(float(f) for f in args.along_ti.split(",") if f) if ti_theta is not None else ()
        grads, ts, theta0 = per_sample_gradients(Path(args.source), subject, args.samples, t_max=args.t_max,
                                                 ti_theta=ti_theta, along=along, antithetic=args.antithetic)
        toward = None if ti_theta is None else ti_theta - theta0
        rows = band_stats(grads["init"], ts, toward, args.t_max)
        results.append({"subject": subject, "bands": rows, "seconds": time.time() - t0,
                        "ti_displacement_norm": None if toward is None else float(np.linalg.norm(toward)),
                        "init_norm": float(np.linalg.norm(theta0))})
        if args.antithetic:
            results[-1]["antithetic"] = antithetic_stats(grads["init"], grads["-eps"])
        if along:
            results[-1]["anchor"] = [{"along_ti": f, **anchor_stats(grads[f"ti*{f}"], grads["init"])} for f in along]
        print(subject, json.dumps(rows), json.dumps({k: results[-1][k] for k in ("antithetic", "anchor")
                                                      if k in results[-1]}), flush=True)
        out = {"samples": args.samples, "threads": args.threads, "ti_steps": args.ti_steps, "bands": BANDS,
               "t_max": args.t_max, "command": " ".join(sys.argv),
               "machine": {"cpu": platform.machine(), "cpu_model": cpu_model(), "python": sys.version.split()[0],
                           "commit": commit},
               "results": results}
        write_json(args.out, out, what="results")      # after every subject: a stopped run keeps what it measured
    print("wrote", args.out)


if __name__ == "__main__":
    main()
