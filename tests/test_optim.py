"""The optimizer pieces alone: RGE on a known quadratic, SG against a direct NumPy PCA, Adam, PUTS."""
import numpy as np
import pytest

from zo_runtime import optim
from zo_runtime.timesteps import puts, uniform


def quadratic(A, b):
    """L(θ) = ½ θᵀAθ − bᵀθ, gradient Aθ − b."""
    return (lambda th: 0.5 * th @ A @ th - b @ th), (lambda th: A @ th - b)


def test_rge_candidates_and_estimate_shapes():
    rge = optim.RGE(n=3, mu=1e-2)
    rng = np.random.default_rng(0)
    theta = rng.standard_normal((2, 5)).astype(np.float32)
    z = rge.directions(rng, theta.shape)
    assert z.shape == (3, 2, 5)
    c = rge.candidates(theta, z)
    assert c.shape == (4, 2, 5)
    np.testing.assert_array_equal(c[0], theta)
    np.testing.assert_allclose(c[2], theta + 1e-2 * z[1], rtol=1e-6)
    g = rge.estimate(np.array([1.0, 1.5, 1.0, 0.5]), z)
    np.testing.assert_allclose(g, (50 * z[0] + 0 * z[1] - 50 * z[2]) / 3, rtol=1e-5)


def test_rge_is_unbiased_direction_on_quadratic():
    """Averaged over many draws, ĝ aligns with the true gradient (E[ĝ] = ∇L + O(μ))."""
    rng = np.random.default_rng(1)
    d = 20
    M = rng.standard_normal((d, d))
    A = M @ M.T / d + np.eye(d)
    b = rng.standard_normal(d)
    f, grad = quadratic(A, b)
    theta = rng.standard_normal(d).astype(np.float32)
    rge = optim.RGE(n=2, mu=1e-3)
    est = np.zeros(d)
    for _ in range(4000):
        z = rge.directions(rng, theta.shape)
        losses = np.array([f(c.astype(np.float64)) for c in rge.candidates(theta, z)])
        est += rge.estimate(losses, z)
    est /= 4000
    g = grad(theta.astype(np.float64))
    cos = est @ g / np.linalg.norm(est) / np.linalg.norm(g)
    assert cos > 0.95
    # a single estimate is noisy but still positively correlated on average
    assert np.linalg.norm(est - g) / np.linalg.norm(g) < 0.3


def test_zo_adam_converges_on_quadratic():
    rng = np.random.default_rng(2)
    d = 16
    A = np.diag(np.linspace(1, 4, d))
    b = rng.standard_normal(d)
    f, _ = quadratic(A, b)
    opt_theta = np.linalg.solve(A, b)
    theta = np.zeros(d, np.float32)
    rge, opt = optim.RGE(n=2, mu=1e-3), optim.adam(lr=2e-2)
    state = opt.init(theta)
    start = f(theta) - f(opt_theta)
    for _ in range(3000):
        z = rge.directions(rng, theta.shape)
        losses = np.array([f(c.astype(np.float64)) for c in rge.candidates(theta, z)])
        updates, state = opt.update(rge.estimate(losses, z), state, theta)
        theta = optim.apply_updates(theta, updates)
    assert f(theta) - f(opt_theta) < 0.02 * start


def test_adam_matches_reference_formula():
    opt = optim.adam(lr=0.1, b1=0.9, b2=0.99, eps=1e-8)
    p = np.zeros(3, np.float32)
    s = opt.init(p)
    g1, g2 = np.array([1.0, -2.0, 0.5], np.float32), np.array([0.5, 0.5, 0.5], np.float32)
    u1, s = opt.update(g1, s, p)
    np.testing.assert_allclose(u1, -0.1 * np.sign(g1), rtol=1e-5)  # first step: m̂/√v̂ = sign
    u2, s = opt.update(g2, s, p)
    m = 0.9 * 0.1 * g1 + 0.1 * g2
    v = 0.99 * 0.01 * g1 ** 2 + 0.01 * g2 ** 2
    ref = -0.1 * (m / (1 - 0.81)) / (np.sqrt(v / (1 - 0.99 ** 2)) + 1e-8)
    np.testing.assert_allclose(u2, ref, rtol=1e-5)
    with pytest.raises(ValueError):
        optim.adam(lr=0.0)


def direct_pca_drop(history, nu):
    """Reference: covariance eigendecomposition of the standardized history."""
    h = history - history.mean(0)
    sd = h.std(0)
    sd[sd == 0] = 1
    hs = h / sd
    lam, vec = np.linalg.eigh(hs.T @ hs)
    order = np.argsort(lam)[::-1]
    lam, vec = lam[order], vec[:, order]
    k = int(np.sum(lam > lam[0] * 1e-12))  # numerical rank: null directions are arbitrary
    lam, vec = np.clip(lam[:k], 0, None), vec[:, :k]
    share = np.cumsum(lam) / lam.sum()
    i_star = next(i + 1 for i, s in enumerate(share) if s > 1 - nu)
    return vec[:, i_star:].T, i_star


@pytest.mark.parametrize("tau,d", [(8, 5), (16, 40), (32, 12)])
def test_sg_basis_matches_direct_pca(tau, d):
    rng = np.random.default_rng(tau + d)
    # a trajectory with a few strong directions plus small noise
    steps = np.cumsum(rng.standard_normal((tau, 3)) @ rng.standard_normal((3, d)), 0)
    history = steps + 1e-3 * rng.standard_normal((tau, d))
    nu = 1e-3
    basis = optim.pca_drop_basis(history, nu)
    ref, i_star = direct_pca_drop(history, nu)
    assert basis.shape == ref.shape
    assert basis.shape[0] == min(tau - 1, d) - i_star
    # same subspace: projectors agree (eigenvector signs and order within ties may differ)
    np.testing.assert_allclose(basis.T @ basis, ref.T @ ref, atol=1e-6)


def test_sg_i_star_edge_cases():
    d = 6
    # one direction carries all the variance: i* = 1, everything else dropped
    line = np.outer(np.arange(10.0), np.ones(d))
    assert optim.pca_drop_basis(line, 1e-3).shape[0] == 0  # rank 1: nothing else to drop
    # constant history: no variance, nothing dropped
    assert optim.pca_drop_basis(np.ones((10, d)), 1e-3).shape[0] == 0
    # isotropic noise with huge ν keeps just the top component; tiny ν keeps all but the null one
    rng = np.random.default_rng(0)
    iso = rng.standard_normal((50, d))
    assert optim.pca_drop_basis(iso, 0.999).shape[0] == d - 1
    assert optim.pca_drop_basis(iso, 1e-12).shape[0] == 0


def test_sg_projects_only_after_tau_and_removes_dropped_directions():
    tau, d = 4, 6
    sg = optim.subspace_gradient(tau=tau, nu=1e-3)
    rng = np.random.default_rng(3)
    theta = np.zeros(d, np.float32)
    state = sg.init(theta)
    g = rng.standard_normal(d).astype(np.float32)
    direction = rng.standard_normal(d)
    for k in range(tau):
        out, state = sg.update(g, state, (theta + k * direction).astype(np.float32))
        if k < tau - 1:
            np.testing.assert_array_equal(out, g)  # no projection during the first τ iterations
    basis = state["basis"]
    assert basis.shape[0] > 0
    out, state = sg.update(g, state, theta)
    np.testing.assert_allclose(basis @ out, 0, atol=1e-5)
    np.testing.assert_allclose(out, g - basis.T @ (basis @ g), atol=1e-5)


def test_sg_validates():
    with pytest.raises(ValueError):
        optim.subspace_gradient(tau=1)
    with pytest.raises(ValueError):
        optim.RGE(n=0)


def test_chain_state_roundtrip():
    opt = optim.chain(optim.subspace_gradient(tau=3), optim.adam(lr=1e-2))
    theta = np.ones((2, 4), np.float32)
    state = opt.init(theta)
    for _ in range(5):
        _, state = opt.update(np.ones_like(theta), state, theta)
    flat = optim.flatten_state(state)
    back = optim.unflatten_state({k: np.asarray(v) for k, v in flat.items()})
    u1, s1 = opt.update(np.ones_like(theta), state, theta)
    u2, s2 = opt.update(np.ones_like(theta), back, theta)
    np.testing.assert_array_equal(u1, u2)


def test_puts_bounds():
    rng = np.random.default_rng(0)
    s = puts(500, 900)
    ts = np.array([s(rng) for _ in range(5000)])
    assert ts.min() >= 500 and ts.max() <= 899 and ts.dtype.kind == "i"
    assert ts.min() < 510 and ts.max() > 890
    u = uniform(1000)
    us = np.array([u(rng) for _ in range(5000)])
    assert us.min() >= 0 and us.max() < 1000 and us.min() < 20
    with pytest.raises(ValueError):
        puts(900, 500)
