"""Ordinary backprop textual inversion in PyTorch on a diffusers folder: the baseline a user would
otherwise run (Gal et al. 2022, as in diffusers' textual_inversion example), for benchmarks.

Same data handling as ``zo-edge personalize`` (each image and its mirror encoded once, latents
sampled from the cached posterior), same prompt templates, Adam on the new token's embedding only,
t ~ U[0, T) unless a range is given. It learns bit for bit what diffusers' example learns, but its
optimizer holds the new rows alone (since session 16; before, the whole table, as the example does), so
its time and memory are lower than a user of that example pays: the cost comparisons with PyTorch TI are
``benchmarks/bench_personalize.py``'s, which keeps the example's way.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from zo_runtime.recipe import TEMPLATES
from zo_runtime.sysinfo import peak_rss_mb


def textual_inversion(model_dir: str | Path, images: np.ndarray, token: str, init: str, steps: int,
                      lr: float = 5e-3, seed: int = 0, num_vectors: int = 1, t_range: tuple[int, int] | None = None,
                      templates=TEMPLATES, threads: int | None = None, log_every: int = 0, snapshot=None) -> dict:
    """images: uint8 [N, H, W, 3] at the model's resolution; ``snapshot(step, theta)`` is called after
    every step. Returns {"theta": float32 [V, D],
    "seconds", "peak_rss_mb", "losses", "forward_backward_passes"}."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model_dir = Path(model_dir)
    tok = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    text = CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval()
    vae = AutoencoderKL.from_pretrained(model_dir / "vae").eval()
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").eval()
    sched = DDPMScheduler.from_pretrained(model_dir / "scheduler")
    for m in (text, vae, unet):
        m.requires_grad_(False)

    init_ids = tok.encode(init, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ValueError(f"init word {init!r} is not a single token")
    names = [token] + [f"{token}_{i}" for i in range(1, num_vectors)]
    tok.add_tokens(names)
    new_ids = tok.convert_tokens_to_ids(names)
    text.resize_token_embeddings(len(tok), mean_resizing=False)
    emb = text.get_input_embeddings()
    with torch.no_grad():
        for i in new_ids:
            emb.weight[i] = emb.weight[init_ids[0]]
    # Adam on the new token's rows alone, spliced into the embedding output where the tokens stand. Adam
    # works element by element, so this learns exactly what diffusers' example does (Adam over the whole
    # table, every other row restored after each step: tested bit-identical), without an optimizer state
    # and a restore the size of the table (49,409 x 768 on shapes-768, most of its step time).
    rows = torch.nn.Parameter(emb.weight[new_ids].detach().clone())
    new_ids_t = torch.tensor(new_ids)

    def splice(module, inputs, out):
        hit = (inputs[0][..., None] == new_ids_t).to(out.dtype)            # [B, L, V]
        return out * (1 - hit.sum(-1, keepdim=True)) + hit @ rows

    emb.register_forward_hook(splice)
    opt = torch.optim.Adam([rows], lr=lr)

    with torch.no_grad():
        x = torch.from_numpy(np.concatenate([images, images[:, :, ::-1]]).copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
        post = vae.encode(x).latent_dist
        mean, std = post.mean, post.std
    scaling = vae.config.scaling_factor
    del vae
    lo, hi = t_range or (0, sched.config.num_train_timesteps)
    placeholder_text = " ".join(names)
    losses = []
    t0 = time.time()
    for step in range(steps):
        i = int(rng.integers(len(mean)))
        z = (mean[i] + std[i] * torch.from_numpy(rng.standard_normal(mean.shape[1:], dtype=np.float32))) * scaling
        prompt = templates[int(rng.integers(len(templates)))].format(placeholder_text)
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        noise = torch.from_numpy(rng.standard_normal(z.shape, dtype=np.float32))[None]
        t = torch.tensor([int(rng.integers(lo, hi))])
        noisy = sched.add_noise(z[None], noise, t)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(z[None], noise, t)
        hidden = text(ids)[0]
        pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if snapshot is not None:
            snapshot(step + 1, rows.detach().numpy().astype(np.float32))
        if log_every and (step + 1) % log_every == 0:
            print(f"  ti step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f}", flush=True)
    theta = rows.detach().numpy().astype(np.float32)
    return {"theta": theta, "seconds": time.time() - t0,
            "peak_rss_mb": peak_rss_mb(), "losses": losses,
            "forward_backward_passes": steps}
