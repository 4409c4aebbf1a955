"""Calibration and held-out inputs for the four graphs, made by running the FP32 graphs on
prompts and images that the caller supplies (:class:`CalibrationData`; the ``convert`` command
passes ``zo_edge.models.calibration.SHAPES_WORLD``: shapes-world captions, everyday prompts and
procedural renders).

* text encoder: the prompts plus the empty prompt used for classifier-free guidance, tokenized
  with the pipeline's own tokenizer; the held-out set also holds a prompt whose placeholder row
  is a fresh random vector, as personalization makes.
* VAE encoder: the images at the model resolution.
* VAE decoder: latents sampled from the FP32 VAE encoder's distribution on those images.
* UNet: those latents (times the VAE scaling factor) noised to timesteps spread over the whole
  schedule plus the training range 500-900, with FP32 text-encoder states for the prompts.

Held-out inputs ask the data for its held-out prompts and images, with other seeds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Protocol

import numpy as np

from zo_runtime.bundle import timestep_feed
from zo_runtime.recipe import RECIPES

from .graphs import io_spec, session
from .surgery import text_feeds

# Half the UNet's calibration samples are drawn from the band activation-quantized (NPU) bundles train at:
# PUTS's, the paper's. A16W8 keeps no usable signal at the default recipe's [0, 500) even when calibrated
# for it (docs/results/zo_signal.json, docs/results/lab/zo_signal_htp_lowt.json), so NPUs train at PUTS's.
TRAINING_RANGE = (RECIPES["zoodip"]["t_low"], RECIPES["zoodip"]["t_high"])
BANDS = ((0, 250), (250, 500), (500, 900), (900, 1000))


class FeedsReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over a list of feed dicts."""

    def __init__(self, feeds: list[dict]):
        self.feeds = list(feeds)
        self._it = iter(self.feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)

    def __len__(self):
        return len(self.feeds)


class CalibrationData(Protocol):
    """Where calibration and held-out prompts and images come from; deterministic in ``seed``.
    ``held_out`` asks for other prompts and images than calibration uses. ``description`` says
    what they are (keys ``text_encoder`` and ``vae_encoder``), for the manifest."""

    description: Mapping[str, str]

    def prompts(self, n: int, seed: int, held_out: bool) -> list[str]: ...

    def images(self, n: int, size: int, seed: int, held_out: bool) -> list[np.ndarray]:
        """n RGB images, float32 [3, size, size] in [-1, 1]."""
        ...


@dataclass
class InputSet:
    """Feeds for each graph; ``unet_timesteps`` parallel to ``feeds["unet"]``."""
    feeds: dict[str, list[dict]] = field(default_factory=dict)
    unet_timesteps: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)


def load_tokenizer(tokenizer_dir: str | Path):
    from transformers import AutoTokenizer, CLIPTokenizer
    try:
        return CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception:  # noqa: BLE001 (a tokenizer.json-only folder)
        return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def tokenize(tokenizer, prompts: list[str], max_length: int) -> np.ndarray:
    return np.asarray(tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                                return_tensors="np").input_ids, dtype=np.int64)


def calibration_timesteps(n: int, num_train_timesteps: int, rng: np.random.Generator) -> list[int]:
    """Half stratified over the whole schedule, half over the training range (PUTS's band)."""
    T = num_train_timesteps
    lo, hi = (int(TRAINING_RANGE[0] * T / 1000), int(TRAINING_RANGE[1] * T / 1000))
    n_train = (n + 1) // 2
    n_all = n - n_train
    ts = [int((k + rng.random()) * T / n_all) for k in range(n_all)]
    ts += [int(lo + (k + rng.random()) * (hi - lo) / n_train) for k in range(n_train)]
    return [min(max(t, 0), T - 1) for t in ts]


def heldout_timesteps(per_band: int, num_train_timesteps: int, rng: np.random.Generator) -> list[int]:
    T = num_train_timesteps
    ts = []
    for lo, hi in BANDS:
        lo, hi = int(lo * T / 1000), int(hi * T / 1000)
        ts += [int(lo + (k + rng.random()) * (hi - lo) / per_band) for k in range(per_band)]
    return [min(max(t, 0), T - 1) for t in ts]


def make_inputs(info, fp32: dict[str, Path], table: np.ndarray, tokenizer, data: CalibrationData, n: int, seed: int,
                held_out: bool = False, per_band: int = 2) -> InputSet:
    """Build feeds for all four graphs by running the FP32 graphs ``fp32`` (graph -> model.onnx)
    on the prompts and images of ``data``. Calibration: ``n`` samples per graph. Held-out: ``n``
    for the text encoder and VAEs, ``per_band`` per timestep band for the UNet."""
    rng = np.random.default_rng(seed + (7919 if held_out else 0))
    res, C = info.resolution, info.latent_channels
    out = InputSet()

    # text encoder
    n_text = max(n, 2)
    prompts = list(data.prompts(n_text, seed + (1 if held_out else 0), held_out))
    prompts[0 if not held_out else -1] = ""  # the unconditional prompt, as classifier-free guidance runs it
    ids = tokenize(tokenizer, prompts, info.max_length)
    te_spec = io_spec(fp32["text_encoder"])
    te_feeds = [text_feeds(te_spec, table, ids[k:k + 1]) for k in range(len(prompts))]
    if held_out:
        # a personalized placeholder: a fresh vector (row-norm scale) at the first word position
        k = 1 if len(prompts) > 1 else 0
        row_norm = float(np.median(np.linalg.norm(table[ids[k]], axis=-1)))
        v = rng.standard_normal(table.shape[1]).astype(np.float32)
        f = {kk: vv.copy() for kk, vv in te_feeds[k].items()}
        f["inputs_embeds"][0, 1] = v / np.linalg.norm(v) * row_norm
        te_feeds.append(f)
        prompts.append(prompts[k] + " [placeholder]")
    out.feeds["text_encoder"] = te_feeds
    out.prompts = prompts
    te = session(fp32["text_encoder"])
    states = [te.run(["last_hidden_state"], f)[0] for f in te_feeds]
    del te

    # VAE encoder on the images
    n_img = max(n, 1)
    images = data.images(n_img, res, seed + (2 if held_out else 0), held_out)
    out.feeds["vae_encoder"] = [{"sample": im[None]} for im in images]
    enc = session(fp32["vae_encoder"])
    enc_out = enc.get_outputs()[0].name
    latents = []
    for f in out.feeds["vae_encoder"]:
        p = enc.run([enc_out], f)[0]
        mean, logvar = p[:, :C], np.clip(p[:, C:2 * C], -30.0, 20.0)
        latents.append((mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape)).astype(np.float32))
    del enc
    out.feeds["vae_decoder"] = [{"latent_sample": z} for z in latents]

    # UNet: noised scaled latents over the schedule, conditioned on the prompts' states
    unet_spec = io_spec(fp32["unet"])
    ab = info.alphas_cumprod()
    T = info.num_train_timesteps
    ts = heldout_timesteps(per_band, T, rng) if held_out else calibration_timesteps(max(n, 1), T, rng)
    unet_feeds = []
    for k, t in enumerate(ts):
        x0 = latents[k % len(latents)] * info.vae_scaling_factor
        eps = rng.standard_normal(x0.shape).astype(np.float32)
        xt = (np.sqrt(ab[t]) * x0 + np.sqrt(1.0 - ab[t]) * eps).astype(np.float32)
        unet_feeds.append({"sample": xt, "timestep": timestep_feed(unet_spec["inputs"], t, 1),
                           "encoder_hidden_states": states[k % len(states)].astype(np.float32)})
    out.feeds["unet"] = unet_feeds
    out.unet_timesteps = ts
    return out
