"""ZOODiP's optimizer and the estimator lab, as small composable pieces in the style of optax.

Three kinds of piece, each with typed, explicit state (NamedTuples of NumPy arrays):

* **Direction samplers** (:class:`DirectionSampler`): where RGE probes. :func:`gaussian` (the
  paper), :func:`orthogonal`, :func:`guided` (biased toward recent estimates), :func:`subspace`
  (a fixed basis, e.g. the principal components of the token table or of the model's vocabulary
  rows: :func:`token_pca_basis`).
* **The estimator** :class:`RGE`: perturbations in, gradient estimate out; one-sided (the paper)
  or antithetic (two-sided).
* **Gradient transformations** (:class:`GradientTransformation`, ``init`` / ``update``):
  :func:`subspace_gradient` (SG), :func:`scale_by_adam`, :func:`scale`,
  :func:`scale_by_learning_rate` (a constant or a schedule: :func:`constant_schedule`,
  :func:`cosine_decay_schedule`), :func:`normalize`, :func:`clip_by_running_norm`,
  :func:`decay_to_init`, :func:`average_iterates`, the sphere's :func:`scale_by_sphere` and
  :func:`retract_to_sphere` (:func:`spherical`)
  (read back with :func:`averaged_params`), :func:`in_subspace` (another transformation run in a
  subspace's coordinates), and the usual compositions :func:`adam`, :func:`sgd`;
  :func:`chain` composes them (its state is a tuple), :func:`apply_updates` adds the step.

Every hyper-parameter is checked once, where the piece is built (``ValueError``).

    >>> rge = RGE(n=2, mu=1e-3)
    >>> opt = chain(subspace_gradient(tau=128, nu=1e-3), adam(lr=5e-3))
    >>> state = opt.init(theta)
    >>> z = rge.directions(rng, theta.shape)            # [n, *theta.shape]
    >>> losses = oracle(rge.candidates(theta, z))       # [rge.passes], losses[0] = L(θ)
    >>> g = rge.estimate(losses, z)                     # theta.shape
    >>> updates, state = opt.update(g, state, theta)
    >>> theta = apply_updates(theta, updates)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np

Schedule = Callable[[int], float]


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _finite_positive(name: str, value: float) -> None:
    _check(isinstance(value, (int, float, np.floating)) and math.isfinite(value) and value > 0,
           f"{name} must be a finite number > 0, got {value}")


def _unit_interval(name: str, value: float) -> None:
    _check(isinstance(value, (int, float, np.floating)) and 0 <= value < 1, f"{name} must be in [0, 1), got {value}")


# --------------------------------------------------------------------------------------------
# Typed states
# --------------------------------------------------------------------------------------------
class EmptyState(NamedTuple):
    pass


class ScaleByAdamState(NamedTuple):
    count: np.ndarray   # int64 scalar: updates taken
    mu: np.ndarray      # first moment, params' shape
    nu: np.ndarray      # second moment, params' shape


class ScheduleState(NamedTuple):
    count: np.ndarray   # int64 scalar


class SubspaceGradientState(NamedTuple):
    history: np.ndarray  # [tau, d] the last tokens θ
    count: np.ndarray    # int64 scalar: tokens in the buffer
    basis: np.ndarray    # [k, d] directions projected out of ĝ


class GuidedState(NamedTuple):
    estimates: np.ndarray  # [k, d] the last k gradient estimates (ring buffer)
    count: np.ndarray      # int64 scalar: estimates seen


class AnchorState(NamedTuple):
    anchor: np.ndarray   # θ₀, the token the run started from


class AverageState(NamedTuple):
    count: np.ndarray    # int64 scalar: iterates averaged
    average: np.ndarray  # bias-corrected exponential average of the iterates θ₁…θ_k


class SphereState(NamedTuple):
    count: np.ndarray    # int64 scalar: estimates seen
    nu: np.ndarray       # [..., 1] EMA of each vector's squared tangent-estimate length (not bias-corrected)


class RadiusState(NamedTuple):
    radius: np.ndarray   # [..., 1] each vector's starting norm, kept


class RunningNormState(NamedTuple):
    log_norm: np.ndarray  # EMA of log ‖ĝ‖ (not bias-corrected)
    count: np.ndarray


class MomentumGuidedState(NamedTuple):
    mean: np.ndarray     # [d] exponential average of the gradient estimates
    count: np.ndarray    # int64 scalar: estimates seen


class SensitivityState(NamedTuple):
    basis: np.ndarray    # float32 [D, D]: the Gauss-Newton matrix's eigenvectors, strongest first (zeros: not yet set)


class WhitenedState(NamedTuple):
    basis: np.ndarray    # float32 [D, D]: as SensitivityState's
    values: np.ndarray   # float32 [D]: the Gauss-Newton matrix's eigenvalues, in the basis's order


class GradientTransformation(NamedTuple):
    init: Callable[[np.ndarray], Any]
    update: Callable[..., tuple[np.ndarray, Any]]


class DirectionSampler(NamedTuple):
    """``init(params) -> state``; ``sample(rng, state, n, shape) -> z [n, *shape]``;
    ``update(state, g) -> state`` after each estimate (stateless samplers return it unchanged)."""
    init: Callable[[np.ndarray], Any]
    sample: Callable[[np.random.Generator, Any, int, tuple], np.ndarray]
    update: Callable[[Any, np.ndarray], Any]


# --------------------------------------------------------------------------------------------
# Direction samplers
# --------------------------------------------------------------------------------------------
def _stateless(sample) -> DirectionSampler:
    return DirectionSampler(lambda params: EmptyState(), sample, lambda state, g: state)


def gaussian() -> DirectionSampler:
    """z ~ N(0, I): the paper's RGE directions (Nesterov & Spokoiny 2017)."""
    return _stateless(lambda rng, state, n, shape: rng.standard_normal((n, *shape), dtype=np.float32))


def orthogonal() -> DirectionSampler:
    """n Gaussian directions made orthogonal (QR), each rescaled to norm √d: the same second moment
    E[z zᵀ] = I as Gaussian directions, but no two probes measure the same component
    (orthogonal ES, Choromanski et al. 2018, arXiv 1804.02395). Needs n ≤ d."""

    def sample(rng, state, n, shape):
        d = int(np.prod(shape))
        _check(n <= d, f"orthogonal directions need n <= d, got n={n}, d={d}")
        g = rng.standard_normal((d, n))
        q, r = np.linalg.qr(g)
        q = q * np.sign(np.diag(r))  # a Haar-distributed frame
        return (math.sqrt(d) * q.T).astype(np.float32).reshape(n, *shape)

    return _stateless(sample)


def guided(k: int = 4, alpha: float = 0.5) -> DirectionSampler:
    """Guided ES (Maheswaranathan et al. 2019, arXiv 1806.10230): z ~ N(0, Σ) with
    Σ = α I + (1 − α) (d / k) U Uᵀ, U an orthonormal basis of the last k gradient estimates
    (tr Σ = d, as for N(0, I)). E[ĝ] = Σ ∇L is a descent direction biased toward the subspace the
    recent estimates span; α = 1 is plain Gaussian. Until k estimates exist, U spans those seen."""
    _check(isinstance(k, int) and k >= 1, f"guided directions need k >= 1, got {k}")
    _check(0 < alpha <= 1, f"guided directions need 0 < alpha <= 1, got {alpha}")

    def init(params):
        return GuidedState(np.zeros((k, params.size), np.float32), np.int64(0))

    def sample(rng, state, n, shape):
        d = int(np.prod(shape))
        iso = rng.standard_normal((n, d))
        low = rng.standard_normal((n, k))
        seen = min(int(state.count), k)
        if seen == 0:
            return iso.astype(np.float32).reshape(n, *shape)
        q, _ = np.linalg.qr(state.estimates[:seen].astype(np.float64).T)  # [d, seen]
        z = math.sqrt(alpha) * iso + math.sqrt((1 - alpha) * d / seen) * (low[:, :seen] @ q.T)
        return z.astype(np.float32).reshape(n, *shape)

    def update(state, g):
        estimates = state.estimates.copy()
        estimates[int(state.count) % k] = g.reshape(-1)
        return GuidedState(estimates, np.int64(int(state.count) + 1))

    return DirectionSampler(init, sample, update)


def momentum_guided(beta: float = 0.99, alpha: float = 0.5) -> DirectionSampler:
    """Guided ES with the guide taken from a long average of the estimates instead of the last few:
    z ~ N(0, Σ), Σ = α I + (1 − α) d u uᵀ, u the unit direction of m = EMA_β(ĝ) (tr Σ = d). One
    estimate is mostly noise (its signal share is about n/d of a sample gradient's), so the span of
    the last k (:func:`guided`) is nearly random; an average over ~1/(1 − β) steps keeps the mean
    gradient's direction, and a probe along it measures the mean's component with about d times the
    signal-to-noise of a random probe. The idea of Guided ES (Maheswaranathan et al. 2019, arXiv
    1806.10230) with momentum as the guide, as in PRGF's prior (Cheng et al. 2019, arXiv 1906.06919).
    The average is kept of Σ⁻¹ĝ, an estimate of ∇L itself, not of ĝ (which the guide has stretched
    along u). α = 1 is plain Gaussian."""
    _unit_interval("momentum-guided beta", beta)
    _check(0 < alpha <= 1, f"momentum-guided directions need 0 < alpha <= 1, got {alpha}")

    def init(params):
        return MomentumGuidedState(np.zeros(params.size, np.float32), np.int64(0))

    def sample(rng, state, n, shape):
        d = int(np.prod(shape))
        iso = rng.standard_normal((n, d))
        along = rng.standard_normal(n)
        norm = float(np.linalg.norm(state.mean))
        if int(state.count) == 0 or norm == 0:
            return iso.astype(np.float32).reshape(n, *shape)
        u = state.mean.astype(np.float64) / norm
        z = math.sqrt(alpha) * iso + math.sqrt((1 - alpha) * d) * along[:, None] * u[None]
        return z.astype(np.float32).reshape(n, *shape)

    def update(state, g):
        # ĝ estimates Σ∇L, stretched along u; averaging it as it is would feed u back into itself
        # (the guide locks onto its first, noisy direction: measured, it ruined the shapes runs).
        # Σ⁻¹ĝ estimates ∇L itself: Σ⁻¹ = (I − uuᵀ)/α + uuᵀ/(α + (1 − α) d).
        g = g.reshape(-1).astype(np.float64)
        mean = state.mean.astype(np.float64)
        norm = float(np.linalg.norm(mean))
        if int(state.count) > 0 and norm > 0:
            u, d = mean / norm, g.size
            along = (u @ g) * u
            g = (g - along) / alpha + along / (alpha + (1 - alpha) * d)
        mean = beta * mean + (1 - beta) * g
        return MomentumGuidedState(mean.astype(np.float32), np.int64(int(state.count) + 1))

    return DirectionSampler(init, sample, update)


def subspace(basis: np.ndarray, alpha: float = 0.0) -> DirectionSampler:
    """Directions restricted to a fixed r-dimensional subspace of each token vector: z = √(d/r) Bᵀε,
    ε ~ N(0, I_r), B [r, d] orthonormal rows (per vector of a [V, d] token). E[ĝ] = (d/r) BᵀB ∇L:
    the gradient projected on the subspace, seen with √(n/r) instead of √(n/d) alignment.
    With :func:`token_pca_basis`, the subspace where the vocabulary's tokens vary most (the idea of
    GF-TI, github feizc/Gradient-Free-Textual-Inversion, which searches a PCA space with CMA-ES).

    ``alpha`` > 0 keeps a share of isotropic directions, Guided ES's covariance with the fixed basis
    as its guide (Maheswaranathan et al. 2019, arXiv 1806.10230): z ~ N(0, α I + (1 − α)(d/r) BᵀB),
    E[ĝ] = α ∇L + (1 − α)(d/r) BᵀB ∇L: every component of the gradient is still seen, the subspace's
    (d/r)-fold more. A hedge for a subspace that may not hold the answer (a released CLIP's table,
    where nothing here can measure whether it does)."""
    b = np.asarray(basis, np.float64)
    _check(b.ndim == 2 and 1 <= b.shape[0] <= b.shape[1], f"subspace basis must be [r, d] with 1 <= r <= d, got {b.shape}")
    _check(np.allclose(b @ b.T, np.eye(b.shape[0]), atol=1e-5), "subspace basis rows must be orthonormal")
    _check(0 <= alpha < 1, f"the subspace's isotropic share alpha must be in [0, 1), got {alpha}")
    r, d = b.shape

    def sample(rng, state, n, shape):
        _check(shape[-1] == d, f"subspace basis is for width {d}, the token has width {shape[-1]}")
        eps = rng.standard_normal((n, *shape[:-1], r))
        z = math.sqrt((1 - alpha) * d / r) * eps @ b
        if alpha:
            z = z + math.sqrt(alpha) * rng.standard_normal((n, *shape))
        return z.astype(np.float32)

    return _stateless(sample)


def gauss_newton_eig(jacobians) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues [D], eigenvectors as rows [D, D]), strongest first, of the Gauss-Newton matrix
    H = (1/S) Σₛ Jₛᵀ Jₛ of the S Jacobians given ([N, D] each: the model output's N values against the
    token's D coordinates, one per training sample, e.g. from D + 1 forward passes by differences along
    the D axes)."""
    H = sum(np.asarray(j, np.float64).T @ np.asarray(j, np.float64) for j in jacobians)
    vals, vecs = np.linalg.eigh(0.5 * (H + H.T))
    return np.maximum(vals[::-1] / len(jacobians), 0.0).astype(np.float32), vecs[:, ::-1].T.astype(np.float32)


def gauss_newton_basis(jacobians, rank: int) -> np.ndarray:
    """The ``rank`` leading eigenvectors [rank, D] of :func:`gauss_newton_eig`'s H: the token directions
    the model's output responds to, strongest first."""
    d = np.asarray(jacobians[0]).shape[1]
    _check(1 <= rank <= d, f"sensitivity rank must be in [1, {d}] (the token's size), got {rank}")
    return gauss_newton_eig(jacobians)[1][:rank]


def sensitivity(rank: int = 8, alpha: float = 0.2, split: bool = False, axes: bool = False) -> DirectionSampler:
    """Directions shaped by where the model's output responds to the token. The state holds the
    eigenvectors of the Gauss-Newton matrix H = E[Jᵀ J] (J: the UNet output's Jacobian with respect to
    the token), strongest first, as rows of an orthonormal [D, D] basis (:func:`gauss_newton_basis`
    with rank D; ``state._replace(basis=...)``; isotropic until it is set); U = its first ``rank`` rows.

    - ``split=False``: z ~ N(0, α I + (1 − α)(D/k) UᵀU), Guided ES's covariance (Maheswaranathan et
      al. 2019, arXiv 1806.10230) with the outputs' curvature as the guide: probing where every
      sample's gradient lies (∇L = (2/N) Jᵀ r is in H's range).
    - ``split=True``: the n probes alternate between span(U) and its complement (each scaled so that
      E[(1/n) Σ z zᵀ] = I, so RGE stays unbiased). A probe's loss difference is the sample gradient's
      component along it; in the complement that component leaves out the large, noisy leading
      directions, so the weak directions are measured without their noise (stratified sampling
      across the two blocks; ``alpha`` unused). Needs n >= 2.
    - ``axes=True``: each probe is one of the k leading eigenvectors itself, √k·u_i, n of them drawn
      without replacement (n <= k), so E[(1/n) Σ z zᵀ] = UᵀU and RGE estimates the gradient's part in
      span(U). With n = k every step probes each leading direction once and the estimate is exactly
      that part of the sample's gradient (to O(μ)): no noise from the draw of directions, only the
      sample's own, as a backprop gradient restricted to span(U) has (forward differences along a
      fixed basis; ``alpha`` unused). On the shapes model it loses (k = n = 8: 17-23 % of TI's loss
      drop on a hard subject, four seeds, against the default's 54 %; docs/estimator-lab.md session 14).
    Measured on the shapes model (benchmarks/lab_sensitivity.py): H has effective rank 3-4.5 in
    d = 64 and its 8 leading directions hold 97-100 % of the mean gradient, but TI's move only
    35-61 %."""
    _check(isinstance(rank, (int, np.integer)) and rank >= 1, f"sensitivity directions need rank >= 1, got {rank}")
    _check(0 < alpha <= 1, f"sensitivity directions need 0 < alpha <= 1, got {alpha}")
    _check(not (split and axes), "sensitivity directions take split or axes, not both")

    def init(params):
        _check(rank <= params.size - (1 if split else 0),
               f"sensitivity rank must be at most the token's size {params.size}"
               + (" less one (split probes need a complement)" if split else "") + f", got {rank}")
        return SensitivityState(np.zeros((params.size, params.size), np.float32))

    def sample(rng, state, n, shape):
        d = int(np.prod(shape))
        if not np.any(state.basis):
            return rng.standard_normal((n, *shape), dtype=np.float32)
        if axes:
            _check(n <= rank, f"sensitivity axes need n <= rank probes a step (each a leading direction), got n = {n}, "
                              f"rank {rank}")
            pick = rng.choice(rank, size=n, replace=False) if n < rank else np.arange(rank)
            z = math.sqrt(rank) * state.basis[pick].astype(np.float64)
            return z.astype(np.float32).reshape(n, *shape)
        if split:
            _check(n >= 2, f"split sensitivity directions need n >= 2 probes, got {n}")
            z = np.empty((n, d))
            basis = state.basis.astype(np.float64)
            blocks = (basis[:rank], basis[rank:])
            for b, rows in enumerate(blocks):
                mine = np.arange(b, n, 2)                               # probes 0, 2, .. in U; 1, 3, .. outside
                z[mine] = math.sqrt(n / len(mine)) * rng.standard_normal((len(mine), len(rows))) @ rows
            return z.astype(np.float32).reshape(n, *shape)
        iso = rng.standard_normal((n, d))
        low = rng.standard_normal((n, rank))
        z = math.sqrt(alpha) * iso + math.sqrt((1 - alpha) * d / rank) * (low @ state.basis[:rank].astype(np.float64))
        return z.astype(np.float32).reshape(n, *shape)

    return DirectionSampler(init, sample, lambda state, g: state)


def whitened(power: float = 0.5, floor: float = 0.1) -> DirectionSampler:
    """Directions shaped against the model's curvature: z ~ N(0, Σ) with Σ = c (H + λI)^(−power) in H's
    eigenbasis (H: the Gauss-Newton matrix, :func:`gauss_newton_eig`, set in the state once sketched;
    isotropic until then), λ = ``floor`` × H's mean eigenvalue, c such that tr Σ = D (a probe's size as
    an isotropic one's). RGE then estimates Σ∇L: ``power`` = 1 a Newton step, ½ the square root of the
    curvature that Adam's second moment gives backprop TI per coordinate.

    Why: along an eigendirection with curvature h and gradient g the loss can fall by g²/2h, and a
    sample's gradient there has a spread of about √h, so the weakly curved directions hold much of the
    descent at a good signal-to-noise ratio; an isotropic probe's loss difference, though, carries the
    whole sample gradient's spread, which the strongly curved directions dominate, into every
    direction it estimates. Weighting probes toward weak curvature gives those directions back the
    share of each step that TI's Adam gives them. Measured on the shapes model: TI's move lies only
    35-61 % in H's 8 leading directions, and probing mostly there loses (``sensitivity``); these
    probes lose too (about 20 % of TI's loss drop on a hard subject against the default's 54 %, four
    seeds; benchmarks/lab_loss_gap.py, docs/estimator-lab.md session 14)."""
    _check(power > 0, f"whitened directions need power > 0, got {power}")
    _check(floor > 0, f"whitened directions need floor > 0, got {floor}")

    def init(params):
        return WhitenedState(np.zeros((params.size, params.size), np.float32), np.zeros(params.size, np.float32))

    def sample(rng, state, n, shape):
        d = int(np.prod(shape))
        if not np.any(state.basis):
            return rng.standard_normal((n, *shape), dtype=np.float32)
        h = state.values.astype(np.float64)
        var = (h + floor * max(h.mean(), 1e-30)) ** -power
        scale = np.sqrt(var * d / var.sum())
        z = (rng.standard_normal((n, d)) * scale) @ state.basis.astype(np.float64)
        return z.astype(np.float32).reshape(n, *shape)

    return DirectionSampler(init, sample, lambda state, g: state)


def rotated(basis: np.ndarray, inner: GradientTransformation) -> GradientTransformation:
    """Runs ``inner`` in the coordinates of an orthonormal basis R [D, D] of the whole (flattened) token:
    it sees R ĝ and R θ and its update comes back as Rᵀ u. Adam's per-coordinate scaling then acts per
    basis direction: with H's eigenvectors (:func:`gauss_newton_basis`), each direction of the output's
    curvature gets its own second moment, as TI's Adam gives each coordinate its own. The state is
    ``inner``'s, shaped as the token (a rotation keeps every shape)."""
    r = np.asarray(basis, np.float64)
    _check(r.ndim == 2 and r.shape[0] == r.shape[1], f"a rotation must be a square [D, D] basis, got {r.shape}")
    _check(np.allclose(r @ r.T, np.eye(len(r)), atol=1e-4), "a rotation's rows must be orthonormal")

    def to(x):
        x = np.asarray(x, np.float64)
        return (r @ x.reshape(-1)).reshape(x.shape).astype(np.float32)

    def init(params):
        return inner.init(to(params))

    def update(grads, state, params):
        u, state = inner.update(to(grads), state, to(params))
        u = np.asarray(u, np.float64)
        return (r.T @ u.reshape(-1)).reshape(u.shape).astype(np.float32), state

    return GradientTransformation(init, update)


def token_pca_basis(table: np.ndarray, rank: int, rows=None, sample: int = 8192, seed: int = 0) -> np.ndarray:
    """The top ``rank`` principal directions of a token-embedding table [vocab, d] -> [rank, d].

    ``rows``: the token ids to analyse, e.g. the rows the model was trained on (its vocabulary);
    ``None``: a fixed random sample of ``sample`` rows of the whole table (deterministic for a seed).
    A model whose table is mostly untrained random rows (the shapes models: 35 or 54 of 49,408 rows
    trained) has no principal directions of its own outside its vocabulary: the whole-table sample
    then returns noise."""
    if rows is None:
        picked = np.sort(np.random.default_rng(seed).choice(len(table), size=min(sample, len(table)), replace=False))
    else:
        picked = np.unique(np.asarray(rows, np.int64))
        _check(picked.ndim == 1 and len(picked) >= 2 and picked[0] >= 0 and picked[-1] < len(table),
               f"vocabulary rows must be at least 2 distinct ids below the table's {len(table)} rows")
    limit = min(table.shape[1], len(picked) - 1)  # n centred rows span at most n - 1 directions
    _check(1 <= rank <= limit, f"subspace rank must be in [1, {limit}] (d = {table.shape[1]}, "
                               f"{len(picked)} rows analysed), got {rank}")
    x = np.asarray(table[picked], np.float64)
    _, _, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    return vt[:rank].astype(np.float32)


# --------------------------------------------------------------------------------------------
# Random gradient estimator
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RGE:
    """Random gradient estimator.

    one-sided (the paper):  ĝ = (1/n) Σᵢ [L(θ + μ zᵢ) − L(θ)] / μ · zᵢ          n + 1 losses
    antithetic:             ĝ = (1/n) Σᵢ [L(θ + μ zᵢ) − L(θ − μ zᵢ)] / (2μ) · zᵢ   2n losses

    n: number of directions (paper: 2). mu: smoothing radius μ (paper: 1e-3). All losses of one
    step must share latent, noise and timestep. ``sampler`` draws the zᵢ (default N(0, I)).
    """

    n: int = 2
    mu: float = 1e-3
    antithetic: bool = False
    sampler: DirectionSampler = None  # None: gaussian()

    def __post_init__(self):
        _check(isinstance(self.n, (int, np.integer)) and self.n >= 1, f"RGE needs n >= 1 directions, got {self.n}")
        _finite_positive("RGE mu", self.mu)
        if self.sampler is None:
            object.__setattr__(self, "sampler", gaussian())

    @property
    def passes(self) -> int:
        """Loss evaluations (UNet passes) per estimate."""
        return 2 * self.n if self.antithetic else self.n + 1

    def directions(self, rng: np.random.Generator, shape: tuple[int, ...], state=None) -> np.ndarray:
        """z: float32 [n, *shape]. ``state``: the sampler's (None for stateless samplers)."""
        return self.sampler.sample(rng, state, self.n, tuple(shape))

    def candidates(self, theta: np.ndarray, z: np.ndarray) -> np.ndarray:
        """[passes, *theta.shape]: one-sided θ, θ + μz₁, …; antithetic θ + μz₁, θ − μz₁, …"""
        mz = np.float32(self.mu) * z
        if self.antithetic:
            return np.stack([theta[None] + mz, theta[None] - mz], axis=1).reshape(-1, *theta.shape).astype(np.float32)
        return np.concatenate([theta[None], theta[None] + mz]).astype(np.float32)

    def estimate(self, losses: np.ndarray, z: np.ndarray) -> np.ndarray:
        """losses: [passes] in the order of :meth:`candidates`; z: [n, *shape] -> ĝ [*shape] float32."""
        losses = np.asarray(losses, np.float64)
        if self.antithetic:
            coeff = (losses[0::2] - losses[1::2]) / (2 * self.mu)
        else:
            coeff = (losses[1:] - losses[0]) / self.mu  # [n] directional derivatives
        g = np.tensordot(coeff, z.astype(np.float64), axes=1) / self.n
        return g.astype(np.float32)

    def loss_at_theta(self, losses: np.ndarray) -> float:
        """L(θ) (one-sided) or the mean of the ± pairs, L(θ) + O(μ²) (antithetic): what a run logs."""
        return float(np.mean(losses)) if self.antithetic else float(losses[0])


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

    Timing, as the reference code (github ignoww/ZOODiP, ``ZOAdam.update`` and the PCA every
    ``tau`` global steps): its buffer holds the tokens *after* each update, θ₁ … θ_τ, PCA runs after
    step τ, and the projection starts at step τ + 1. ``update`` at step k receives θ_{k−1}, so it
    skips θ₀ at step 1, fits when the buffer holds θ₁ … θ_τ (at step τ + 1) and projects from that
    step on (``tests/test_optim.py`` pins it against a transcription of the reference's loop).
    State ``count`` is −1 before the first step.
    """
    _check(isinstance(tau, (int, np.integer)) and tau >= 2, f"SG needs tau >= 2, got {tau}")
    _check(0 < nu < 1, f"SG needs 0 < nu < 1, got {nu}")

    def init(params: np.ndarray) -> SubspaceGradientState:
        d = params.size
        return SubspaceGradientState(np.zeros((tau, d), np.float32), np.int64(-1), np.zeros((0, d), np.float32))

    def update(grads, state, params):
        history, count, basis = state.history, int(state.count), state.basis
        if count >= 0:  # θ₀, the init, is not part of the reference's buffer
            history = history.copy()
            history[count] = params.reshape(-1)
        count += 1
        if count == tau:
            basis = pca_drop_basis(history, nu).astype(np.float32)
            count = 0
        g = grads.reshape(-1).astype(np.float64)
        if basis.shape[0]:
            b = basis.astype(np.float64)
            g = g - b.T @ (b @ g)
        return g.astype(np.float32).reshape(grads.shape), SubspaceGradientState(history, np.int64(count), basis)

    return GradientTransformation(init, update)


def projected_dims(state) -> int:
    """How many directions SG currently projects out, found anywhere in a (chain) state; 0 without SG."""
    if isinstance(state, SubspaceGradientState):
        return int(state.basis.shape[0])
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        return sum(projected_dims(s) for s in state)
    return 0


# --------------------------------------------------------------------------------------------
# Step rules
# --------------------------------------------------------------------------------------------
def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam's direction m̂ / (√v̂ + ε) (Kingma & Ba 2015), without the learning rate."""
    _unit_interval("Adam b1", b1)
    _unit_interval("Adam b2", b2)
    _finite_positive("Adam eps", eps)

    def init(params):
        return ScaleByAdamState(np.int64(0), np.zeros_like(params, np.float32), np.zeros_like(params, np.float32))

    def update(grads, state, params=None):
        count = int(state.count) + 1
        g = grads.astype(np.float64)
        m = b1 * state.mu + (1 - b1) * g
        v = b2 * state.nu + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** count)
        v_hat = v / (1 - b2 ** count)
        return m_hat / (np.sqrt(v_hat) + eps), ScaleByAdamState(np.int64(count), m.astype(np.float32), v.astype(np.float32))

    return GradientTransformation(init, update)


def scale(factor: float) -> GradientTransformation:
    """updates = factor · g. The reference code's extra 1/√((d+n−1)/n) on ĝ is
    ``scale(reference_scale(d, n))``."""
    _check(math.isfinite(factor) and factor != 0, f"scale factor must be finite and non-zero, got {factor}")
    return GradientTransformation(lambda params: EmptyState(),
                                  lambda g, state, params=None: ((factor * g).astype(np.float32), state))


def reference_scale(d: int, n: int) -> float:
    """ZOODiP's reference code divides ĝ by √((d + n − 1)/n) before ZO-Adam."""
    return 1.0 / math.sqrt((d + n - 1) / n)


def constant_schedule(value: float) -> Schedule:
    _finite_positive("learning rate", value)
    return lambda count: value


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """lr(k) = init · ((1 − α) · ½(1 + cos(π min(k, K)/K)) + α) (Loshchilov & Hutter 2017)."""
    _finite_positive("learning rate", init_value)
    _check(isinstance(decay_steps, (int, np.integer)) and decay_steps >= 1,
           f"cosine decay needs decay_steps >= 1, got {decay_steps}")
    _check(0 <= alpha <= 1, f"cosine decay alpha must be in [0, 1], got {alpha}")

    def schedule(count: int) -> float:
        frac = min(count, decay_steps) / decay_steps
        return init_value * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * frac)) + alpha)

    return schedule


def scale_by_learning_rate(learning_rate: float | Schedule) -> GradientTransformation:
    """updates = −lr(k) · g, lr a constant or a schedule of the update count k = 0, 1, …"""
    schedule = learning_rate if callable(learning_rate) else constant_schedule(learning_rate)

    def update(grads, state, params=None):
        count = int(state.count)
        return (-schedule(count) * grads.astype(np.float64)).astype(np.float32), ScheduleState(np.int64(count + 1))

    return GradientTransformation(lambda params: ScheduleState(np.int64(0)), update)


def normalize() -> GradientTransformation:
    """ĝ ← √d · ĝ / ‖ĝ‖: every step's estimate gets the same length, its direction unchanged.

    RGE's directional derivatives are heavy-tailed on the shapes model (measured during zo-edge runs,
    benchmarks/lab_tails.py: kurtosis 19 to 88, the largest 1 % of them carry 31-59 % of the energy,
    the lowest timesteps give the largest), so a few samples decide Adam's moments. Normalizing weighs every sample alike: ĝ/‖ĝ‖
    estimates the mean of the per-sample unit gradients. The step size from the spread of the step's
    own losses is FZOO's (Dang et al. 2025, "FZOO: Fast Zeroth-Order Optimizer"); ‖ĝ‖ is that spread
    times ‖z‖ for one-sided RGE. A zero estimate stays zero."""

    def update(grads, state, params=None):
        g = grads.astype(np.float64)
        norm = float(np.linalg.norm(g))
        if norm == 0 or not math.isfinite(norm):
            return grads, state
        return (math.sqrt(g.size) * g / norm).astype(np.float32), state

    return GradientTransformation(lambda params: EmptyState(), update)


def clip_by_running_norm(clip: float, decay: float = 0.99) -> GradientTransformation:
    """ĝ ← ĝ · min(1, c · r / ‖ĝ‖), r the running geometric mean of the earlier estimates' ‖ĝ‖ (EMA
    of log ‖ĝ‖ with ``decay``, bias-corrected; the first estimate passes and sets it).

    Clipping at a multiple of the typical size keeps the ordinary estimates as they are and cuts the
    rare huge ones that heavy-tailed directional derivatives produce (see :func:`normalize`); the log
    average is hardly moved by those outliers, so the threshold stays where the bulk is. Gradient
    clipping for heavy-tailed noise: Zhang et al. 2020 (arXiv 1912.03194). The ``zo-edge`` recipe
    clips at c = 2 (docs/estimator-lab.md)."""
    _finite_positive("clip", clip)
    _unit_interval("clip decay", decay)

    def init(params):
        return RunningNormState(np.float64(0.0), np.int64(0))

    def update(grads, state, params=None):
        g = grads.astype(np.float64)
        norm = float(np.linalg.norm(g))
        if norm == 0 or not math.isfinite(norm):
            return grads, state
        count = int(state.count)
        factor = 1.0  # the first estimate sets the typical length; later ones are cut at c × the earlier ones'
        if count:
            factor = min(1.0, clip * math.exp(float(state.log_norm) / (1 - decay ** count)) / norm)
        log_norm = decay * float(state.log_norm) + (1 - decay) * math.log(norm)
        return (g * factor).astype(np.float32), RunningNormState(np.float64(log_norm), np.int64(count + 1))

    return GradientTransformation(init, update)


def decay_to_init(weight_decay: float) -> GradientTransformation:
    """updates += λ (θ − θ₀): weight decay toward the starting token instead of toward zero (L2-SP,
    Li et al. 2018, arXiv 1802.01483), decoupled from the gradient as in AdamW (Loshchilov & Hutter
    2019): chain it after :func:`scale_by_adam` and before the learning rate. With a noisy estimate
    the token random-walks in directions the loss hardly sees; the pull toward θ₀ bounds that walk
    (an Ornstein-Uhlenbeck process) while the gradient's drift holds against it."""
    _check(isinstance(weight_decay, (int, float, np.floating)) and math.isfinite(weight_decay) and weight_decay >= 0,
           f"weight decay must be a finite number >= 0, got {weight_decay}")

    def init(params):
        return AnchorState(np.array(params, np.float32))

    def update(grads, state, params):
        return (grads.astype(np.float64) + weight_decay * (params.astype(np.float64) - state.anchor)).astype(np.float32), state

    return GradientTransformation(init, update)


def average_iterates(decay: float) -> GradientTransformation:
    """Keeps an exponential moving average of the iterates, bias-corrected (Polyak & Juditsky 1992;
    the EMA form as in Adam's moments); the run's answer is the average, read with
    :func:`averaged_params`. Passes the updates through unchanged, so it goes last in a chain (it sees
    the final step: θ_k = params + updates). With a noisy estimate the iterate jitters around where
    the drift has taken it; the average keeps the drift and cancels much of the jitter."""
    _unit_interval("averaging decay", decay)

    def init(params):
        return AverageState(np.int64(0), np.zeros_like(params, np.float32))

    def update(grads, state, params):
        count = int(state.count) + 1
        new = params.astype(np.float64) + grads
        weight = (1 - decay) / (1 - decay ** count)   # = 1 at the first iterate: no bias toward zero
        avg = state.average + weight * (new - state.average)
        return grads, AverageState(np.int64(count), avg.astype(np.float32))

    return GradientTransformation(init, update)


def averaged_params(state) -> np.ndarray | None:
    """The iterate average held anywhere in a (chain) state, or None without :func:`average_iterates`
    (or before its first update)."""
    if isinstance(state, AverageState):
        return np.array(state.average) if int(state.count) > 0 else None
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        found = [a for a in (averaged_params(s) for s in state) if a is not None]
        return found[-1] if found else None
    return None


def in_subspace(basis: np.ndarray, inner: GradientTransformation) -> GradientTransformation:
    """Runs ``inner`` in the coordinates w of θ = θ₀ + Bᵀw: it sees Bĝ and Bθ, and its update u_w comes
    back as Bᵀu_w, so the token moves only within span(B). B [r, d], orthonormal rows, applied to
    the last axis. With :func:`subspace` directions every estimate already lies in span(B), but Adam's
    per-coordinate scaling of θ's d coordinates does not keep its steps there; in w's coordinates its
    moments are r-dimensional and the steps stay in the span (GF-TI searches its PCA space this way,
    github feizc/Gradient-Free-Textual-Inversion). The state is ``inner``'s, of width r."""
    b = np.asarray(basis, np.float64)
    _check(b.ndim == 2 and 1 <= b.shape[0] <= b.shape[1], f"subspace basis must be [r, d] with 1 <= r <= d, got {b.shape}")
    _check(np.allclose(b @ b.T, np.eye(b.shape[0]), atol=1e-5), "subspace basis rows must be orthonormal")

    def coords(x):
        return (np.asarray(x, np.float64) @ b.T).astype(np.float32)

    def init(params):
        return inner.init(coords(params))

    def update(grads, state, params):
        u, state = inner.update(coords(grads), state, coords(params))
        return (np.asarray(u, np.float64) @ b).astype(np.float32), state

    return GradientTransformation(init, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transformations in order; the state is a tuple with one entry per transformation."""

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(grads, state, params):
        _check(len(state) == len(transforms), f"chain of {len(transforms)} got a state of {len(state)}")
        new = []
        for t, s in zip(transforms, state):
            grads, s = t.update(grads, s, params)
            new.append(s)
        return grads, tuple(new)

    return GradientTransformation(init, update)


def adam(lr: float | Schedule = 5e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """ZO-Adam: Adam on the gradient estimate; updates = −lr · m̂ / (√v̂ + ε)."""
    return chain(scale_by_adam(b1, b2, eps), scale_by_learning_rate(lr))


def scale_by_sphere(beta: float = 0.0, eps: float = 1e-8) -> GradientTransformation:
    """The estimate as a step on the sphere the token lives on (each vector of ``params`` [..., d] on its
    own): projected on the tangent space at θ (g − ⟨g, θ̂⟩θ̂), divided by the root of a bias-corrected
    EMA (``beta``) of its squared length (β = 0: unit length), times ‖θ‖, so that a learning rate lr
    after it turns the token by arctan(lr) ≈ lr radians a step. Riemannian SGD's direction as in
    Directional Textual Inversion (Kim et al., ICLR 2026, arXiv 2512.13672; github kunheek/dti,
    ``SphericalSGD``), where it fixes the token's magnitude: a token whose norm grows out of the
    vocabulary's scale drowns the position embedding and the residual updates of CLIP's pre-norm
    layers. Chain :func:`retract_to_sphere` after the rate."""
    _unit_interval("sphere EMA decay", beta)
    _check(isinstance(eps, (int, float, np.floating)) and math.isfinite(eps) and eps > 0, f"eps must be > 0, got {eps}")

    def init(params):
        return SphereState(np.int64(0), np.zeros((*np.shape(params)[:-1], 1), np.float64))

    def update(grads, state, params):
        theta = np.asarray(params, np.float64)
        norm = np.linalg.norm(theta, axis=-1, keepdims=True)
        unit = theta / np.where(norm > 0, norm, 1.0)
        g = np.asarray(grads, np.float64)
        g = g - np.sum(g * unit, axis=-1, keepdims=True) * unit
        count = int(state.count) + 1
        nu = beta * state.nu + (1 - beta) * np.sum(g * g, axis=-1, keepdims=True)
        step = g / (np.sqrt(nu / (1 - beta ** count)) + eps) * norm
        return step.astype(np.float32), SphereState(np.int64(count), nu)

    return GradientTransformation(init, update)


def retract_to_sphere(scale: float = 1.0) -> GradientTransformation:
    """updates ← r (θ + u)/‖θ + u‖ − θ: the step lands back on the sphere of radius r = ``scale`` × the
    vector's norm when the run started (the retraction of Riemannian SGD; DTI, arXiv 2512.13672, keeps
    the token at an in-distribution norm: ``scale`` = 1). Goes after the learning rate; with
    :func:`scale_by_sphere` before it, the token's direction learns and its norm stays fixed."""
    _check(isinstance(scale, (int, float, np.floating)) and math.isfinite(scale) and scale > 0,
           f"the sphere's scale must be > 0, got {scale}")

    def init(params):
        return RadiusState(scale * np.linalg.norm(np.asarray(params, np.float64), axis=-1, keepdims=True))

    def update(updates, state, params):
        theta = np.asarray(params, np.float64)
        moved = theta + np.asarray(updates, np.float64)
        norm = np.linalg.norm(moved, axis=-1, keepdims=True)
        landed = np.where(norm > 0, state.radius * moved / np.where(norm > 0, norm, 1.0), theta)
        return (landed - theta).astype(np.float32), state

    return GradientTransformation(init, update)


def spherical(lr: float | Schedule = 1e-2, beta: float = 0.0, scale: float = 1.0) -> GradientTransformation:
    """Riemannian SGD on the token's sphere (DTI's ``SphericalSGD``, arXiv 2512.13672): each step turns the
    token by arctan(``lr``) ≈ ``lr`` radians along the tangent estimate, its norm fixed at ``scale`` × the
    start's."""
    return chain(scale_by_sphere(beta), scale_by_learning_rate(lr), retract_to_sphere(scale))


def sgd(lr: float | Schedule) -> GradientTransformation:
    """ZO-SGD: updates = −lr · ĝ."""
    return scale_by_learning_rate(lr)


def apply_updates(params: np.ndarray, updates: np.ndarray) -> np.ndarray:
    return (params + updates).astype(params.dtype)


# --------------------------------------------------------------------------------------------
# State <-> flat dict of arrays (for checkpoints)
# --------------------------------------------------------------------------------------------
def flatten_state(state, prefix: str = "") -> dict[str, np.ndarray]:
    """A (nested) state -> {"0/mu": array, ...}: tuples by position, NamedTuples by field name."""
    out = {}
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        items = zip(state._fields, state)
    elif isinstance(state, tuple):
        items = ((str(i), s) for i, s in enumerate(state))
    else:
        return {prefix.rstrip("/"): np.asarray(state)}
    for k, v in items:
        out.update(flatten_state(v, f"{prefix}{k}/"))
    return out


def unflatten_state(flat: dict[str, np.ndarray], like):
    """Inverse of :func:`flatten_state`, shaped by ``like`` (a state from ``init``): the checkpoint
    must hold exactly the arrays ``like`` has, or ``ValueError``."""
    expected = flatten_state(like)
    if set(flat) != set(expected):
        raise ValueError(f"optimizer state mismatch: checkpoint has {sorted(set(flat) ^ set(expected))[:4]} "
                         "where the recipe differs")

    def build(node, prefix):
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(build(v, f"{prefix}{k}/") for k, v in zip(node._fields, node)))
        if isinstance(node, tuple):
            return tuple(build(v, f"{prefix}{i}/") for i, v in enumerate(node))
        v = np.asarray(flat[prefix.rstrip("/")])
        return np.int64(v) if v.ndim == 0 and v.dtype.kind == "i" else np.array(v)

    return build(like, "")
