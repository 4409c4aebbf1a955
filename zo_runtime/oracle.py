"""The loss oracle: ONNX Runtime sessions as a black box that maps candidate tokens to losses.

L(θ) = ‖ UNet(x_t, t, TextEncoder(prompt with θ)) − target ‖² / numel, the latent-diffusion
denoising loss with target = noise (epsilon models) or velocity (v_prediction models). All
candidates of one call share the prompt, latent x₀, noise and timestep, so the differences
between their losses come from θ alone.
"""
from __future__ import annotations

import numpy as np

from .schedulers.common import add_noise, alphas_cumprod, training_target


def mean_squares(residuals: np.ndarray) -> np.ndarray:
    """[k, ...] -> [k]: each candidate's loss, the mean of its squared residual."""
    return (residuals ** 2).reshape(len(residuals), -1).mean(axis=1)


def inject(base_embeds: np.ndarray, slots, thetas: np.ndarray) -> np.ndarray:
    """base_embeds: [L, D] token-table rows of a prompt; slots: (position, placeholder, vector) triples;
    thetas: [k, V, D] candidate tokens -> inputs_embeds [k, L, D] with each slot's row replaced."""
    out = np.repeat(base_embeds[None].astype(np.float32), len(thetas), axis=0)
    for pos, _, vec in slots:
        out[:, pos] = thetas[:, vec]
    return out


class LossOracle:
    """Batched or sequential loss evaluation on a bundle's text encoder and UNet.

    batch_candidates: "on" runs the k candidates as one batch through each graph (fastest),
    "off" runs them one by one (least activation memory), "auto" batches when the latent is at
    most 32x32 (256 px for SD1.5) and goes sequential above.
    """

    def __init__(self, bundle, batch_candidates: str = "auto"):
        if batch_candidates not in ("auto", "on", "off"):
            raise ValueError(f"batch_candidates must be auto|on|off, got {batch_candidates!r}")
        self.bundle = bundle
        self.mode = batch_candidates
        self.table = bundle.token_table
        self.text = bundle.session("text_encoder")
        self.unet = bundle.session("unet")
        self.text_inputs = {i.name for i in self.text.get_inputs()}
        self.alphas_cumprod = alphas_cumprod(bundle.noise_schedule)
        self.prediction_type = bundle.prediction_type
        self.forward_passes = 0  # UNet forward passes, one per candidate

    def batched(self, latent_hw: tuple[int, int]) -> bool:
        if self.mode == "auto":
            return latent_hw[0] * latent_hw[1] <= 32 * 32
        return self.mode == "on"

    def encode_text(self, ids: np.ndarray, inputs_embeds: np.ndarray) -> np.ndarray:
        """ids: int64 [L]; inputs_embeds: [k, L, D] -> last_hidden_state [k, L, D]."""
        feed = {"inputs_embeds": inputs_embeds}
        if "input_ids" in self.text_inputs:
            feed["input_ids"] = np.repeat(ids[None].astype(np.int64), len(inputs_embeds), axis=0)
        return self.text.run(["last_hidden_state"], feed)[0]

    def predict(self, noisy: np.ndarray, t: int, hidden: np.ndarray) -> np.ndarray:
        """noisy: [k, C, h, w]; hidden: [k, L, D] -> UNet output [k, C, h, w]."""
        feed = {"sample": noisy, "timestep": self.bundle.timestep_feed(t, len(noisy)),
                "encoder_hidden_states": hidden.astype(np.float32)}
        self.forward_passes += len(noisy)
        return self.unet.run(None, feed)[0]

    def losses(self, thetas: np.ndarray, ids: np.ndarray, slots, latent: np.ndarray, noise: np.ndarray,
               t: int) -> np.ndarray:
        """thetas: [k, V, D] candidate tokens; ids: int64 [L] the prompt; slots: where θ goes;
        latent, noise: [C, h, w] (latent already scaled); t: int timestep -> losses float64 [k]."""
        return mean_squares(self.residuals(thetas, ids, slots, latent, noise, t))

    def residuals(self, thetas: np.ndarray, ids: np.ndarray, slots, latent: np.ndarray, noise: np.ndarray,
                  t: int) -> np.ndarray:
        """As :meth:`losses`, but each candidate's prediction − target, float64 [k, C, h, w]."""
        base = np.asarray(self.table[ids], np.float32)
        embeds = inject(base, slots, thetas)
        tt = np.array([t])
        noisy = add_noise(latent[None], noise[None], tt, self.alphas_cumprod).astype(np.float32)
        target = training_target(latent[None], noise[None], tt, self.alphas_cumprod,
                                 self.prediction_type).astype(np.float32)
        if self.batched(latent.shape[1:]):
            hidden = self.encode_text(ids, embeds)
            pred = self.predict(np.repeat(noisy, len(thetas), axis=0), t, hidden)
        else:
            pred = np.concatenate([self.predict(noisy, t, self.encode_text(ids, embeds[i:i + 1]))
                                   for i in range(len(thetas))])
        return pred.astype(np.float64) - target.astype(np.float64)
