"""ZOODiP's optimizer as small composable pieces, in the style of optax.

* :class:`RGE` — the random gradient estimator: perturbations in, gradient estimate out.
* :func:`subspace_gradient` — SG: project the estimate off low-variance directions of the
  recent token trajectory.
* :func:`adam` — Adam on the (projected) estimate.
* :func:`chain` — compose transformations; :func:`apply_updates` — θ + updates.

A gradient transformation is a pair ``init(params) -> state`` and
``update(grads, state, params) -> (updates, state)``. States are dicts of NumPy arrays and
scalars, so a checkpoint is just ``np.savez``. Parameters are float arrays of any shape
(a textual-inversion token is [num_vectors, dim]); SG works on their flattened form (d = size).

    >>> rge = RGE(n=2, mu=1e-3)
    >>> opt = chain(subspace_gradient(tau=128, nu=1e-3), adam(lr=5e-3))
    >>> state = opt.init(theta)
    >>> z = rge.directions(rng, theta.shape)            # [n, *theta.shape]
    >>> losses = oracle(rge.candidates(theta, z))       # [n + 1], losses[0] = L(θ)
    >>> g = rge.estimate(losses, z)                     # theta.shape
    >>> updates, state = opt.update(g, state, theta)
    >>> theta = apply_updates(theta, updates)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

State = dict


class GradientTransformation(NamedTuple):
    init: Callable[[np.ndarray], State]
    update: Callable[[np.ndarray, State, np.ndarray], tuple[np.ndarray, State]]


# --------------------------------------------------------------------------------------------
# Random gradient estimator
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RGE:
    """One-sided random gradient estimator.

    ĝ = (1/n) Σᵢ [L(θ + μ zᵢ) − L(θ)] / μ · zᵢ,  zᵢ ~ N(0, I).

    n: number of perturbations (paper: 2). mu: smoothing radius μ (paper: 1e-3).
    One iteration costs n + 1 loss evaluations, which must share latent, noise and timestep.
    """

    n: int = 2
    mu: float = 1e-3

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"RGE needs n >= 1 perturbations, got {self.n}")
        if not self.mu > 0:
            raise ValueError(f"RGE needs mu > 0, got {self.mu}")

    def directions(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """z: float32 [n, *shape], standard normal."""
        return rng.standard_normal((self.n, *shape), dtype=np.float32)

    def candidates(self, theta: np.ndarray, z: np.ndarray) -> np.ndarray:
        """[n + 1, *theta.shape]: θ first, then θ + μ zᵢ."""
        return np.concatenate([theta[None], theta[None] + np.float32(self.mu) * z]).astype(np.float32)

    def estimate(self, losses: np.ndarray, z: np.ndarray) -> np.ndarray:
        """losses: [n + 1] with losses[0] = L(θ); z: [n, *shape] -> ĝ [*shape] float32."""
        losses = np.asarray(losses, np.float64)
        coeff = (losses[1:] - losses[0]) / self.mu  # [n] directional derivatives
        g = np.tensordot(coeff, z.astype(np.float64), axes=1) / self.n
        return g.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Subspace Gradient
# --------------------------------------------------------------------------------------------
def pca_drop_basis(history: np.ndarray, nu: float) -> np.ndarray:
    """Directions SG removes, from a token history.

    history: [tau, d] tokens θ from the last tau iterations. Each feature is standardized
    (zero mean, unit variance; constant features stay 0), then PCA by SVD: eigenvalues
    λ = σ², i* = the smallest i whose cumulative variance share exceeds 1 − ν. Returns the
    eigenvectors i*+1 … (rows, [k, d]; k may be 0) whose variance SG treats as noise.
    """
    h = np.asarray(history, np.float64)
    centred = h - h.mean(axis=0)
    std = centred.std(axis=0)
    std[std == 0] = 1.0
    hs = centred / std
    _, s, vt = np.linalg.svd(hs, full_matrices=False)
    # Keep the numerical rank only: centred, tau tokens span at most tau - 1 directions, and a
    # null direction's eigenvector is arbitrary, so it is neither kept nor dropped.
    rank = int(np.sum(s > s.max(initial=0.0) * max(hs.shape) * np.finfo(np.float64).eps))
    s, vt = s[:rank], vt[:rank]
    lam = s ** 2
    total = lam.sum()
    if rank == 0 or total <= 0:
        return np.zeros((0, h.shape[1]))
    share = np.cumsum(lam) / total
    i_star = int(np.searchsorted(share, 1.0 - nu, side="right")) + 1  # 1-based: first share > 1 − ν
    i_star = min(i_star, len(lam))
    return vt[i_star:]


def subspace_gradient(tau: int = 128, nu: float = 1e-3) -> GradientTransformation:
    """SG: every tau iterations, refit the dropped basis V from the last tau tokens; in between,
    ĝ ← ĝ − (ĝ Vᵀ) V. No projection during the first tau iterations.

    State: ``history`` [tau, d], ``count`` (tokens in the buffer), ``basis`` [k, d].
    """
    if tau < 2:
        raise ValueError(f"SG needs tau >= 2, got {tau}")
    if not 0 < nu < 1:
        raise ValueError(f"SG needs 0 < nu < 1, got {nu}")

    def init(params: np.ndarray) -> State:
        d = params.size
        return {"history": np.zeros((tau, d), np.float32), "count": np.int64(0),
                "basis": np.zeros((0, d), np.float32)}

    def update(grads, state, params):
        history, count, basis = state["history"].copy(), int(state["count"]), state["basis"]
        history[count] = params.reshape(-1)
        count += 1
        if count == tau:
            basis = pca_drop_basis(history, nu).astype(np.float32)
            count = 0
        g = grads.reshape(-1).astype(np.float64)
        if basis.shape[0]:
            g = g - (basis.astype(np.float64).T @ (basis.astype(np.float64) @ g))
        return g.astype(np.float32).reshape(grads.shape), {"history": history, "count": np.int64(count),
                                                           "basis": basis}

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------------------------
# Adam
# --------------------------------------------------------------------------------------------
def adam(lr: float = 5e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam on the gradient estimate; updates are the step to add (−lr · m̂ / (√v̂ + ε))."""
    if not lr > 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")

    def init(params):
        return {"m": np.zeros_like(params, np.float32), "v": np.zeros_like(params, np.float32),
                "count": np.int64(0)}

    def update(grads, state, params=None):
        count = int(state["count"]) + 1
        g = grads.astype(np.float64)
        m = b1 * state["m"] + (1 - b1) * g
        v = b2 * state["v"] + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** count)
        v_hat = v / (1 - b2 ** count)
        step = -lr * m_hat / (np.sqrt(v_hat) + eps)
        return step.astype(np.float32), {"m": m.astype(np.float32), "v": v.astype(np.float32),
                                         "count": np.int64(count)}

    return GradientTransformation(init, update)


def sgd(lr: float) -> GradientTransformation:
    """Plain ZO-SGD (for comparisons): updates = −lr · ĝ."""
    return GradientTransformation(lambda p: {}, lambda g, s, p=None: ((-lr * g).astype(np.float32), s))


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transformations in order; the state is a tuple-like dict {"0": s0, "1": s1, ...}."""

    def init(params):
        return {str(i): t.init(params) for i, t in enumerate(transforms)}

    def update(grads, state, params):
        new = {}
        for i, t in enumerate(transforms):
            grads, new[str(i)] = t.update(grads, state[str(i)], params)
        return grads, new

    return GradientTransformation(init, update)


def apply_updates(params: np.ndarray, updates: np.ndarray) -> np.ndarray:
    return (params + updates).astype(params.dtype)


# --------------------------------------------------------------------------------------------
# State <-> flat dict of arrays (for checkpoints)
# --------------------------------------------------------------------------------------------
def flatten_state(state: State, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_state(v, key + "/"))
        else:
            out[key] = np.asarray(v)
    return out


def unflatten_state(flat: dict[str, np.ndarray]) -> State:
    out: State = {}
    for key, v in flat.items():
        node = out
        parts = key.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = np.int64(v) if v.ndim == 0 and v.dtype.kind == "i" else np.array(v)
    return out
