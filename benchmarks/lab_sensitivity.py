"""Which token directions the model responds to: the Gauss-Newton matrix of the denoising loss.

A diagnostic for the estimator lab (docs/estimator-lab.md, issue 12), using PyTorch on a shapes
model's diffusers source as a measuring instrument. For each subject the token starts at the class
noun; for S training draws ξ = (reference, template, noise, t ∈ [t_low, t_high)) the Jacobian J_ξ of
the UNet's output with respect to the token (central differences in float64, one batch of 2d
candidates) gives

* the per-sample gradient g_ξ = (2 / numel) J_ξᵀ r_ξ, r_ξ = prediction − target;
* the Gauss-Newton matrix H = mean_ξ (2 / numel) J_ξᵀ J_ξ, whose eigenvectors order the token's
  directions by how much the UNet's output moves along them.

Reported per subject: H's eigenvalue shares, and the share of energy in H's top-k eigenvectors of
the mean gradient, of the per-sample gradients, and of two displacements from the init token:
backprop TI's and the zo-edge default's after the same number of steps (when --zo-steps / --ti-steps).
If the gradient lives in a few of H's directions while ZO's displacement spreads over all d, probes
confined to H's leading subspace would carry d/k times more of the gradient per pass.

    python benchmarks/lab_sensitivity.py --samples 48 --out docs/results/lab/sensitivity.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))   # lab_gradient_snr's loader
KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def jacobians(source: Path, subject: str, samples: int, t_range, seed: int = 0, eps: float = 1e-4,
              chunk: int = 128):
    import torch

    from lab_gradient_snr import draw, load_source

    src = load_source(source, subject, seed, double=True)
    text, unet, sched, theta0 = src.text, src.unet, src.sched, src.theta0
    torch.set_default_dtype(torch.float64)      # transformers builds its causal mask in the default dtype
    d = theta0.numel()
    rng = np.random.default_rng(seed)
    basis = torch.eye(d, dtype=torch.float64)
    thetas = torch.cat([theta0 + eps * basis, theta0 - eps * basis, theta0[None]])   # [2d + 1, d]
    Js, rs = [], []
    for _ in range(samples):
        z, ids, pos = draw(rng, src)
        z = z.double()
        noise = torch.from_numpy(rng.standard_normal(z.shape)).double()[None]
        t = int(rng.integers(*t_range))
        preds = []
        for a in range(0, len(thetas), chunk):                          # bounded activation memory
            part = thetas[a:a + chunk]

            def put(module, inputs, out, pos=pos, part=part):
                out = out.clone()
                out[:, pos] = part
                return out

            with torch.no_grad():
                hook = text.get_input_embeddings().register_forward_hook(put)
                hidden = text(ids.repeat(len(part), 1))[0]
                hook.remove()
                noisy = sched.add_noise(z[None], noise, torch.tensor([t])).repeat(len(part), 1, 1, 1)
                preds.append(unet(noisy, torch.tensor([t] * len(part)), encoder_hidden_states=hidden).sample)
        pred = torch.cat(preds)
        pred = pred.reshape(len(thetas), -1).numpy()
        J = (pred[:d] - pred[d:2 * d]).T / (2 * eps)                       # [numel, d]
        Js.append(J)
        rs.append(pred[-1] - noise.reshape(-1).numpy())
    torch.set_default_dtype(torch.float32)
    return np.stack(Js), np.stack(rs), theta0.numpy()


def shares(vecs: np.ndarray, U: np.ndarray) -> dict:
    """vecs [m, d]: the share of their total energy inside the top-k columns of U, for each k."""
    total = np.sum(vecs ** 2)
    proj = (vecs @ U) ** 2                                   # [m, d] energy per eigvector
    cum = np.cumsum(proj.sum(0)) / total
    return {str(k): float(cum[k - 1]) for k in KS if k <= U.shape[1]}


def zo_token(bundle: str, subject: str, steps: int, seed: int = 0) -> np.ndarray:
    from PIL import Image

    from zo_edge.models import world
    from zo_runtime.embeddings import load_embeddings
    from zo_runtime.personalize import PersonalizeConfig, Trainer

    subj = world.Subject.parse(subject)
    work = Path(tempfile.mkdtemp(prefix="zo-sens-"))
    (work / "refs").mkdir()
    for i, im in enumerate(world.reference_images(subj, n=5, seed=seed)):
        Image.fromarray(im).save(work / "refs" / f"{i}.png")
    cfg = PersonalizeConfig(model=bundle, images=str(work / "refs"), token="<s>", init=subj.shape,
                            out=str(work / "t.safetensors"), run_dir=str(work / "run"), steps=steps, seed=seed)
    Trainer(cfg).train()
    return np.asarray(next(iter(load_embeddings(work / "t.safetensors").values())), np.float64)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(ROOT / "models/shapes/source"))
    ap.add_argument("--bundle", default=str(ROOT / "models/shapes/bundle"), help="the bundle zo-edge trains on for the ZO displacement")
    ap.add_argument("--subjects", default="red:striped:star,green:solid:ring,blue:dotted:heart")
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--t-range", default="0,500")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ti-steps", type=int, default=300)
    ap.add_argument("--zo-steps", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "docs/results/lab/sensitivity.json"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from zo_runtime.outputs import write_json
    from zo_runtime.sysinfo import source_commit

    t_range = tuple(int(v) for v in args.t_range.split(","))
    results = []
    for subject in args.subjects.split(","):
        t0 = time.time()
        J, r, theta0 = jacobians(Path(args.source), subject, args.samples, t_range)
        numel = J.shape[1]
        grads = 2.0 / numel * np.einsum("snd,sn->sd", J, r)
        H = 2.0 / numel * np.einsum("snd,sne->de", J, J) / len(J)
        evals, U = np.linalg.eigh(H)
        evals, U = evals[::-1], U[:, ::-1]
        row = {"subject": subject, "samples": args.samples, "d": int(theta0.size), "output_numel": int(numel),
               "eig_share": {str(k): float(np.cumsum(evals)[k - 1] / evals.sum()) for k in KS if k <= len(evals)},
               "effective_rank": float(evals.sum() ** 2 / np.sum(evals ** 2)),
               "mean_gradient_in_topk": shares(grads.mean(0, keepdims=True), U),
               "sample_gradients_in_topk": shares(grads, U),
               "isotropic_in_topk": {str(k): k / len(evals) for k in KS if k <= len(evals)}}
        if args.ti_steps:
            from zo_edge.eval.textual_inversion import textual_inversion
            from zo_edge.models import world

            subj = world.Subject.parse(subject)
            refs = np.stack(world.reference_images(subj, n=5, seed=0))
            ti = textual_inversion(args.source, refs, "<subject>", subj.shape, args.ti_steps, seed=0,
                                   threads=args.threads)
            move = ti["theta"][0].astype(np.float64) - theta0
            row["ti_steps"] = args.ti_steps
            row["ti_move_norm"] = float(np.linalg.norm(move))
            row["ti_move_in_topk"] = shares(move[None], U)
        if args.zo_steps:
            move = zo_token(args.bundle, subject, args.zo_steps) - theta0
            row["zo_steps"] = args.zo_steps
            row["zo_move_norm"] = float(np.linalg.norm(move))
            row["zo_move_in_topk"] = shares(move[None], U)
        row["seconds"] = time.time() - t0
        results.append(row)
        print(json.dumps(row), flush=True)
        write_json(args.out, {"samples": args.samples, "t_range": t_range, "threads": args.threads,
                              "source": args.source, "bundle": args.bundle,
                              "machine": {"cpu": platform.machine(), "python": sys.version.split()[0],
                                          "commit": source_commit()},
                              "results": results}, what="results")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
