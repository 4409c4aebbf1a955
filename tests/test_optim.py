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


def reference_sg_loop(thetas_after, tau, nu):
    """A transcription of the reference code's SG bookkeeping (ignoww/ZOODiP train_zoodip.py): after
    each step's update the token goes into a ring buffer of tau; when global_step % tau == 0 the PCA
    runs on the buffer; the next update projects. Returns, per step k = 1.., the basis in use."""
    buffer, idx, basis, used = [], 0, None, []
    for step, theta in enumerate(thetas_after, start=1):
        used.append(basis)
        if len(buffer) < tau:
            buffer.append(theta)
        else:
            buffer[idx] = theta
        idx = (idx + 1) % tau
        if step % tau == 0:
            basis = optim.pca_drop_basis(np.stack(buffer), nu)
    return used


def test_sg_timing_matches_the_reference_code():
    """The basis each step uses equals the reference's: fitted on θ₁ … θ_τ (tokens after the updates),
    first used at step τ + 1, refitted every τ steps on the latest τ tokens."""
    tau, d, steps = 4, 6, 13
    rng = np.random.default_rng(3)
    sg = optim.subspace_gradient(tau=tau, nu=0.3)
    thetas = np.cumsum(rng.standard_normal((steps + 1, 2)) @ rng.standard_normal((2, d)), 0)
    thetas += 1e-2 * rng.standard_normal(thetas.shape)
    thetas = thetas.astype(np.float32)  # θ₀ … θ_steps
    expected = reference_sg_loop(list(thetas[1:]), tau, 0.3)
    state = sg.init(thetas[0])
    g = rng.standard_normal(d).astype(np.float32)
    for k in range(1, steps + 1):
        out, state = sg.update(g, state, thetas[k - 1])  # step k sees θ_{k−1}, as the loop passes it
        ref = expected[k - 1]
        if ref is None:  # no PCA yet: the estimate passes unchanged
            np.testing.assert_array_equal(out, g)
        else:
            assert state.basis.shape == ref.shape
            np.testing.assert_allclose(state.basis.T @ state.basis, ref.T @ ref, atol=1e-5)
            np.testing.assert_allclose(out, g - ref.T @ (ref @ g), atol=1e-5)
    assert expected[tau] is not None and expected[tau - 1] is None  # first projection at step τ + 1


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
    assert isinstance(state, tuple) and isinstance(state[0], optim.SubspaceGradientState)
    flat = optim.flatten_state(state)
    assert "0/basis" in flat and "1/0/mu" in flat and "1/1/count" in flat
    back = optim.unflatten_state({k: np.asarray(v) for k, v in flat.items()}, like=opt.init(theta))
    u1, s1 = opt.update(np.ones_like(theta), state, theta)
    u2, s2 = opt.update(np.ones_like(theta), back, theta)
    np.testing.assert_array_equal(u1, u2)
    with pytest.raises(ValueError, match="mismatch"):  # a checkpoint of another recipe is refused
        optim.unflatten_state(flat, like=optim.adam(lr=1e-2).init(theta))


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


# --------------------------------------------------------------------------------------------
# The estimator lab: each piece on an analytic function, showing the property it claims
# --------------------------------------------------------------------------------------------
def spd(rng, d, cond=10.0):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q @ np.diag(np.linspace(1.0, cond, d)) @ q.T


def test_antithetic_differences_are_exact_directional_derivatives_on_a_quadratic():
    """Two-sided differences cancel the curvature term (μ/2) zᵀAz that one-sided ones carry, at 2n
    instead of n + 1 passes."""
    rng = np.random.default_rng(0)
    d = 12
    A, b = spd(rng, d), rng.standard_normal(d)
    f, grad = quadratic(A, b)
    theta = rng.standard_normal(d).astype(np.float32)
    one, two = optim.RGE(n=3, mu=0.5), optim.RGE(n=3, mu=0.5, antithetic=True)
    assert (one.passes, two.passes) == (4, 6)
    z = one.directions(rng, theta.shape)
    g = grad(theta.astype(np.float64))
    exact = (z.astype(np.float64) @ g) @ z.astype(np.float64) / 3
    est2 = two.estimate([f(c.astype(np.float64)) for c in two.candidates(theta, z)], z)
    est1 = one.estimate([f(c.astype(np.float64)) for c in one.candidates(theta, z)], z)
    np.testing.assert_allclose(est2, exact, rtol=1e-4, atol=1e-4)
    assert np.linalg.norm(est1 - exact) > 0.1 * np.linalg.norm(exact)  # the curvature term, μ = 0.5
    losses = [f(c.astype(np.float64)) for c in two.candidates(theta, z)]
    assert abs(two.loss_at_theta(losses) - f(theta.astype(np.float64))) < 0.5 ** 2 * np.trace(A)  # L(θ) + O(μ²)


def test_orthogonal_directions_have_gaussian_second_moment_and_recover_the_gradient_at_n_equals_d():
    rng = np.random.default_rng(1)
    d = 8
    rge = optim.RGE(n=d, mu=1e-3, antithetic=True, sampler=optim.orthogonal())
    z = rge.directions(rng, (d,))
    np.testing.assert_allclose(z @ z.T, d * np.eye(d), atol=1e-4)  # orthogonal, norm √d each
    second = np.mean([np.einsum("ni,nj->ij", *(2 * [rge.directions(rng, (d,))])) / d for _ in range(3000)], axis=0)
    np.testing.assert_allclose(second, np.eye(d), atol=0.08)  # E[z zᵀ] = I, as for N(0, I)
    A, b = spd(rng, d), rng.standard_normal(d)
    f, grad = quadratic(A, b)
    theta = rng.standard_normal(d).astype(np.float32)
    g = rge.estimate([f(c.astype(np.float64)) for c in rge.candidates(theta, z)], z)
    np.testing.assert_allclose(g, grad(theta.astype(np.float64)), rtol=1e-3, atol=1e-3)  # a full frame: exact
    gauss = optim.RGE(n=d, mu=1e-3, antithetic=True)
    zg = gauss.directions(rng, (d,))
    gg = gauss.estimate([f(c.astype(np.float64)) for c in gauss.candidates(theta, zg)], zg)
    assert np.linalg.norm(gg - grad(theta.astype(np.float64))) > 1e-2  # Gaussian directions are not
    with pytest.raises(ValueError):
        optim.orthogonal().sample(rng, None, d + 1, (d,))


def test_guided_directions_concentrate_on_recent_estimates_and_stay_descent_directions():
    """Σ = α I + (1 − α)(d/k) U Uᵀ: a direction's energy in span(U) is α k + (1 − α) d instead of k,
    tr Σ = d, and E[ĝ] = Σ ∇L has a positive inner product with ∇L."""
    rng = np.random.default_rng(2)
    d, k, alpha = 32, 2, 0.25
    sampler = optim.guided(k=k, alpha=alpha)
    theta = np.zeros(d, np.float32)
    state = sampler.init(theta)
    np.testing.assert_equal(sampler.sample(rng, state, 3, (d,)).shape, (3, d))  # before any estimate: N(0, I)
    u = np.linalg.qr(rng.standard_normal((d, k)))[0]
    for col in u.T:
        state = sampler.update(state, col.astype(np.float32))
    z = sampler.sample(rng, state, 20000, (d,)).astype(np.float64)
    in_span = np.mean(np.sum((z @ u) ** 2, axis=1))
    assert abs(in_span - (alpha * k + (1 - alpha) * d)) < 0.05 * d
    assert abs(np.mean(np.sum(z ** 2, axis=1)) - d) < 0.05 * d
    g = rng.standard_normal(d)
    mean_est = (z @ g) @ z / len(z)  # E[(zᵀg) z] = Σ g
    assert mean_est @ g > 0
    with pytest.raises(ValueError):
        optim.guided(k=0)
    with pytest.raises(ValueError):
        optim.guided(alpha=0.0)


def test_guided_directions_beat_gaussian_when_the_gradient_lives_in_a_few_directions():
    """Noisy quadratic whose gradient stays in a 2-d subspace of R^64: at an equal budget of passes,
    guided directions reach a lower loss than isotropic ones (averaged over seeds)."""
    d = 64

    def run(sampler, seed):
        rng = np.random.default_rng(seed)
        w = np.zeros(d)
        w[:2] = [3.0, -2.0]
        f = lambda th: 0.5 * np.sum((th - w) ** 2 * (np.arange(d) < 2))  # flat outside the first two axes
        rge, opt = optim.RGE(n=2, mu=1e-3, sampler=sampler), optim.sgd(lr=2e-2)
        theta = np.zeros(d, np.float32)
        s_state, o_state = sampler.init(theta), opt.init(theta)
        for _ in range(100):
            z = rge.directions(rng, theta.shape, s_state)
            losses = [f(c.astype(np.float64)) for c in rge.candidates(theta, z)]
            g = rge.estimate(losses, z)
            s_state = sampler.update(s_state, g)
            upd, o_state = opt.update(g, o_state, theta)
            theta = optim.apply_updates(theta, upd)
        return f(theta.astype(np.float64))

    gauss = np.mean([run(optim.gaussian(), s) for s in range(8)])
    guided = np.mean([run(optim.guided(k=4, alpha=0.5), s) for s in range(8)])
    assert guided < 0.6 * gauss


def test_subspace_directions_stay_in_the_basis_and_estimate_the_projected_gradient():
    rng = np.random.default_rng(3)
    d, r = 16, 4
    basis = np.linalg.qr(rng.standard_normal((d, r)))[0].T  # [r, d]
    rge = optim.RGE(n=2, mu=1e-3, antithetic=True, sampler=optim.subspace(basis))
    A, b = spd(rng, d), rng.standard_normal(d)
    f, grad = quadratic(A, b)
    theta = rng.standard_normal(d).astype(np.float32)
    est = np.zeros(d)
    for _ in range(4000):
        z = rge.directions(rng, theta.shape)
        assert np.allclose(z - (z @ basis.T) @ basis, 0, atol=1e-4)  # no component outside span(B)
        est += rge.estimate([f(c.astype(np.float64)) for c in rge.candidates(theta, z)], z)
    est /= 4000
    expect = d / r * basis.T @ (basis @ grad(theta.astype(np.float64)))
    assert np.linalg.norm(est - expect) < 0.1 * np.linalg.norm(expect)
    # per vector of a [V, d] token
    z2 = rge.directions(rng, (3, d))
    assert z2.shape == (2, 3, d) and np.allclose(z2 - (z2 @ basis.T) @ basis, 0, atol=1e-4)
    with pytest.raises(ValueError):
        optim.subspace(np.ones((2, d)))  # not orthonormal


def test_subspace_with_an_isotropic_share_still_sees_the_gradient_outside_the_basis():
    """pca_alpha: z ~ N(0, αI + (1 − α)(d/r)BᵀB), so E[ĝ] = α∇L + (1 − α)(d/r)BᵀB∇L: the component
    outside span(B), which the pure subspace never measures, is still estimated (α of it)."""
    rng = np.random.default_rng(5)
    d, r, alpha = 16, 4, 0.3
    basis = np.linalg.qr(rng.standard_normal((d, r)))[0].T
    sampler = optim.subspace(basis, alpha=alpha)
    z = sampler.sample(rng, sampler.init(np.zeros(d)), 40000, (d,)).astype(np.float64)
    cov = z.T @ z / len(z)
    np.testing.assert_allclose(cov, alpha * np.eye(d) + (1 - alpha) * d / r * basis.T @ basis, atol=0.08)
    assert abs(np.trace(cov) - d) < 0.3                          # the same energy as N(0, I)
    rge = optim.RGE(n=2, mu=1e-3, antithetic=True, sampler=sampler)
    A, b = spd(rng, d), rng.standard_normal(d)
    f, grad = quadratic(A, b)
    theta = rng.standard_normal(d).astype(np.float32)
    g = grad(theta.astype(np.float64))
    outside = g - basis.T @ (basis @ g)
    est = np.zeros(d)
    for _ in range(6000):
        zz = rge.directions(rng, theta.shape)
        est += rge.estimate([f(c.astype(np.float64)) for c in rge.candidates(theta, zz)], zz)
    est /= 6000
    expect = alpha * g + (1 - alpha) * d / r * basis.T @ (basis @ g)
    assert np.linalg.norm(est - expect) < 0.1 * np.linalg.norm(expect)
    seen = est - basis.T @ (basis @ est)                          # the estimate's part outside span(B)
    assert seen @ outside / (np.linalg.norm(seen) * np.linalg.norm(outside)) > 0.9
    with pytest.raises(ValueError):
        optim.subspace(basis, alpha=1.0)                          # all isotropic: not a subspace any more


def test_token_pca_basis_finds_the_planted_directions_of_a_table():
    rng = np.random.default_rng(4)
    d = 24
    planted = np.linalg.qr(rng.standard_normal((d, 3)))[0].T
    table = (rng.standard_normal((5000, 3)) * [5.0, 4.0, 3.0]) @ planted + 0.05 * rng.standard_normal((5000, d))
    basis = optim.token_pca_basis(table.astype(np.float32), rank=3)
    np.testing.assert_allclose(basis.T @ basis, planted.T @ planted, atol=2e-2)
    with pytest.raises(ValueError):
        optim.token_pca_basis(table, rank=d + 1)


def test_token_pca_basis_of_the_vocabulary_rows_finds_what_a_table_sample_misses():
    """A table that is mostly untrained random rows (as the shapes models'): PCA of the trained rows
    recovers their directions; a sample of the whole table returns noise."""
    rng = np.random.default_rng(6)
    d, vocab = 64, 49408  # the shapes model's table: 35 trained rows of norm 0.25-0.75, the rest 0.15
    planted = np.linalg.qr(rng.standard_normal((d, 3)))[0].T
    table = 0.02 * rng.standard_normal((vocab, d))
    trained = rng.choice(vocab, size=35, replace=False)
    table[trained] = (rng.standard_normal((35, 3)) * [0.5, 0.4, 0.3]) @ planted + 0.01 * rng.standard_normal((35, d))
    table = table.astype(np.float32)
    near = lambda b: np.linalg.norm(b.T @ b - planted.T @ planted)  # noqa: E731
    assert near(optim.token_pca_basis(table, 3, rows=trained)) < 0.1
    assert near(optim.token_pca_basis(table, 3)) > 1.0
    with pytest.raises(ValueError, match="rank"):
        optim.token_pca_basis(table, 35, rows=trained)  # 35 centred rows span at most 34 directions
    with pytest.raises(ValueError, match="vocabulary rows"):
        optim.token_pca_basis(table, 1, rows=[vocab])


def test_adam_in_subspace_coordinates_keeps_its_steps_in_the_span():
    """Subspace directions give estimates inside span(B); plain ZO-Adam's per-coordinate scaling
    moves θ out of it, in_subspace(B, adam) does not, and still reaches the optimum within the span
    of a quadratic whose minimum lies there."""
    rng = np.random.default_rng(8)
    d, r = 24, 4
    basis = np.linalg.qr(rng.standard_normal((d, r)))[0].T.astype(np.float32)
    target = (basis.T @ rng.standard_normal(r)).astype(np.float64)
    f, _ = quadratic(np.eye(d), target)  # minimum at target, inside span(B)
    rge = optim.RGE(n=2, mu=1e-3, sampler=optim.subspace(basis))

    def run(opt):
        theta = np.zeros(d, np.float32)
        state = opt.init(theta)
        for _ in range(600):
            z = rge.directions(rng, theta.shape)
            g = rge.estimate([f(c.astype(np.float64)) for c in rge.candidates(theta, z)], z)
            upd, state = opt.update(g, state, theta)
            theta = optim.apply_updates(theta, upd)
        return theta.astype(np.float64)

    outside = lambda x: np.linalg.norm(x - basis.T @ (basis @ x))  # noqa: E731
    plain = run(optim.adam(lr=0.02))
    inside = run(optim.in_subspace(basis, optim.adam(lr=0.02)))
    assert outside(plain) > 0.1 * np.linalg.norm(plain)
    assert outside(inside) < 1e-5 * np.linalg.norm(inside)
    assert np.linalg.norm(inside - target) < 0.2 * np.linalg.norm(target)
    state = optim.in_subspace(basis, optim.adam(lr=0.02)).init(np.zeros((3, d), np.float32))
    assert state[0].mu.shape == (3, r)  # Adam's moments are r-dimensional
    with pytest.raises(ValueError):
        optim.in_subspace(np.ones((2, d)), optim.sgd(0.1))


def test_reference_step_rule_and_schedules():
    """The reference code's 1/√((d+n−1)/n) scaling is a plain scale; Adam is invariant to it up to ε."""
    assert optim.reference_scale(768, 2) == pytest.approx(1 / np.sqrt(769 / 2))
    rng = np.random.default_rng(5)
    p = np.zeros(6, np.float32)
    grads = [rng.standard_normal(6).astype(np.float32) for _ in range(5)]
    plain, scaled = optim.adam(lr=1e-2, eps=1e-12), optim.chain(optim.scale(0.05), optim.adam(lr=1e-2, eps=1e-12))
    s1, s2 = plain.init(p), scaled.init(p)
    for g in grads:
        u1, s1 = plain.update(g, s1, p)
        u2, s2 = scaled.update(g, s2, p)
        np.testing.assert_allclose(u1, u2, rtol=1e-4)
    cos = optim.cosine_decay_schedule(1.0, 10, alpha=0.1)
    assert cos(0) == pytest.approx(1.0) and cos(10) == pytest.approx(0.1) and cos(5) == pytest.approx(0.55)
    assert cos(20) == pytest.approx(0.1)
    lr = optim.scale_by_learning_rate(cos)
    s = lr.init(p)
    steps = []
    for _ in range(3):
        u, s = lr.update(np.ones(6, np.float32), s)
        steps.append(-float(u[0]))
    np.testing.assert_allclose(steps, [cos(0), cos(1), cos(2)], rtol=1e-6)
    for bad in (dict(b1=1.0), dict(b2=-0.1), dict(eps=0.0), dict(eps=float("nan"))):
        with pytest.raises(ValueError):
            optim.scale_by_adam(**bad)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError):
            optim.adam(lr=bad)


def test_zo_sgd_and_zo_adam_both_converge_on_a_noisy_quadratic():
    rng = np.random.default_rng(6)
    d = 10
    A = np.diag(np.linspace(1, 3, d))
    b = rng.standard_normal(d)
    f, _ = quadratic(A, b)
    best = f(np.linalg.solve(A, b))
    for opt in (optim.sgd(lr=2e-2), optim.adam(lr=optim.cosine_decay_schedule(5e-2, 2000, 0.02))):
        theta = np.zeros(d, np.float32)
        state, rge = opt.init(theta), optim.RGE(n=2, mu=1e-3, antithetic=True)
        for _ in range(2000):
            z = rge.directions(rng, theta.shape)
            noise = 1e-3 * rng.standard_normal()  # shared by the candidates of one step, as in the oracle
            losses = [f(c.astype(np.float64)) + noise for c in rge.candidates(theta, z)]
            updates, state = opt.update(rge.estimate(losses, z), state, theta)
            theta = optim.apply_updates(theta, updates)
        assert f(theta.astype(np.float64)) - best < 0.02 * (f(np.zeros(d)) - best)


def test_projected_dims_finds_sg_anywhere_in_a_chain():
    theta = np.zeros(5, np.float32)
    state = optim.chain(optim.scale(2.0), optim.subspace_gradient(tau=2), optim.adam()).init(theta)
    assert optim.projected_dims(state) == 0
    state = (state[0], state[1]._replace(basis=np.ones((3, 5), np.float32)), state[2])
    assert optim.projected_dims(state) == 3
    assert optim.projected_dims(optim.adam().init(theta)) == 0


def _flat_valley_run(weight_decay: float, steps: int = 3000, seed: int = 8):
    """ZO-Adam on L(θ) = ½ Σ_{i<4} (θ_i − 1)² in R^64: four curved coordinates, sixty flat ones, with
    sample noise shared by a step's candidates and a per-sample slope in every coordinate (as a
    diffusion loss has: each draw tilts the landscape, the expectation does not)."""
    rng = np.random.default_rng(seed)
    d, k = 64, 4
    theta = np.zeros(d, np.float32)
    rge = optim.RGE(n=2, mu=1e-3)
    parts = [optim.scale_by_adam()] + ([optim.decay_to_init(weight_decay)] if weight_decay else [])
    opt = optim.chain(*parts, optim.scale_by_learning_rate(2e-2))
    state = opt.init(theta)
    for _ in range(steps):
        tilt = 0.3 * rng.standard_normal(d)
        f = lambda th: 0.5 * np.sum((th[:k] - 1.0) ** 2) + tilt @ th
        z = rge.directions(rng, theta.shape)
        losses = np.array([f(c.astype(np.float64)) for c in rge.candidates(theta, z)])
        updates, state = opt.update(rge.estimate(losses, z), state, theta)
        theta = optim.apply_updates(theta, updates)
    return theta, k


def test_decay_to_init_bounds_the_random_walk_in_flat_directions():
    """Without the pull the token wanders off in the directions the loss does not see; with it the
    wander stays bounded while the curved coordinates still reach their optimum."""
    free, k = _flat_valley_run(0.0)
    pulled, _ = _flat_valley_run(0.1)
    assert np.linalg.norm(pulled[k:]) < 0.5 * np.linalg.norm(free[k:])
    assert np.abs(pulled[:k] - 1.0).max() < 0.5          # the drift holds against the pull (λ biases it a little)
    assert np.abs(free[:k] - 1.0).max() < 0.5


def test_decay_to_init_is_decoupled_and_anchored_at_the_first_params():
    theta0 = np.array([1.0, -2.0], np.float32)
    t = optim.decay_to_init(0.1)
    state = t.init(theta0)
    g, state = t.update(np.zeros(2, np.float32), state, theta0 + np.array([3.0, 0.0], np.float32))
    np.testing.assert_allclose(g, [0.3, 0.0], rtol=1e-6)    # λ (θ − θ₀), whatever θ is now
    np.testing.assert_array_equal(state.anchor, theta0)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            optim.decay_to_init(bad)


def test_average_iterates_is_the_bias_corrected_ema_of_the_iterates():
    rng = np.random.default_rng(9)
    decay = 0.9
    t = optim.average_iterates(decay)
    theta = np.zeros(3, np.float32)
    state = t.init(theta)
    assert optim.averaged_params(state) is None
    iterates = []
    for _ in range(25):
        step = rng.standard_normal(3).astype(np.float32)
        out, state = t.update(step, state, theta)
        np.testing.assert_array_equal(out, step)            # passes the updates through
        theta = optim.apply_updates(theta, step)
        iterates.append(theta.astype(np.float64))
    w = decay ** np.arange(len(iterates))[::-1]
    np.testing.assert_allclose(optim.averaged_params(state), (w[:, None] * iterates).sum(0) / w.sum(), rtol=1e-5)
    first = t.update(np.ones(3, np.float32), t.init(np.zeros(3, np.float32)), np.zeros(3, np.float32))[1]
    np.testing.assert_allclose(first.average, np.ones(3))   # no pull toward zero at the start
    chained = optim.chain(optim.adam(), optim.average_iterates(0.5)).init(theta)
    assert optim.averaged_params(chained) is None and optim.averaged_params(optim.adam().init(theta)) is None
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError):
            optim.average_iterates(bad)


def test_average_of_iterates_is_closer_to_the_optimum_than_the_last_iterate():
    """ZO-Adam at a constant rate ends jittering around the optimum of a noisy quadratic; the
    average of its iterates sits nearer the optimum (median over seeds)."""
    last, avg = [], []
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        d = 16
        A = np.diag(np.linspace(1, 4, d))
        b = rng.standard_normal(d)
        opt_theta = np.linalg.solve(A, b)
        f, _ = quadratic(A, b)
        theta = np.zeros(d, np.float32)
        rge, opt = optim.RGE(n=2, mu=1e-3), optim.chain(optim.adam(lr=5e-2), optim.average_iterates(0.98))
        state = opt.init(theta)
        for _ in range(2000):
            z = rge.directions(rng, theta.shape)
            losses = np.array([f(c.astype(np.float64)) for c in rge.candidates(theta, z)])
            updates, state = opt.update(rge.estimate(losses, z), state, theta)
            theta = optim.apply_updates(theta, updates)
        last.append(np.linalg.norm(theta - opt_theta))
        avg.append(np.linalg.norm(optim.averaged_params(state) - opt_theta))
    assert np.median(avg) < 0.5 * np.median(last)


def test_momentum_guided_directions_beat_gaussian_and_guided_under_sample_noise():
    """Each step's loss is tilted by a fresh random slope (the sample noise of a diffusion loss): the
    last few estimates are mostly that noise, their average over many steps is the mean gradient.
    Probing along the average (momentum-guided) reaches a lower expected loss at an equal budget of
    passes than isotropic probes, and than probes guided by the last estimates (mean over seeds;
    measured 0.64 against 1.00 and 1.48)."""
    d = 64
    w = np.zeros(d)
    w[:2] = [3.0, -2.0]
    mask = np.arange(d) < 2

    def run(sampler, seed):
        rng = np.random.default_rng(seed)
        expected = lambda th: 0.5 * np.sum((th - w) ** 2 * mask)
        rge, opt = optim.RGE(n=2, mu=1e-3, sampler=sampler), optim.adam(lr=2e-2)
        theta = np.zeros(d, np.float32)
        s_state, o_state = sampler.init(theta), opt.init(theta)
        for _ in range(300):
            tilt = rng.standard_normal(d)
            z = rge.directions(rng, theta.shape, s_state)
            losses = [expected(c.astype(np.float64)) + tilt @ c for c in rge.candidates(theta, z)]
            g = rge.estimate(losses, z)
            s_state = sampler.update(s_state, g)
            upd, o_state = opt.update(g, o_state, theta)
            theta = optim.apply_updates(theta, upd)
        return expected(theta.astype(np.float64))

    gauss = np.mean([run(optim.gaussian(), s) for s in range(8)])
    recent = np.mean([run(optim.guided(k=4, alpha=0.5), s) for s in range(8)])
    momentum = np.mean([run(optim.momentum_guided(beta=0.99, alpha=0.5), s) for s in range(8)])
    assert momentum < 0.8 * gauss and momentum < 0.6 * recent


def test_momentum_guided_covariance_and_state():
    rng = np.random.default_rng(4)
    d = 8
    s = optim.momentum_guided(beta=0.5, alpha=0.25)
    state = s.init(np.zeros(d, np.float32))
    z0 = s.sample(rng, state, 3, (d,))                      # no estimate yet: isotropic
    assert z0.shape == (3, d)
    g = np.zeros(d, np.float32)
    g[2] = 4.0
    state = s.update(state, g)
    np.testing.assert_allclose(state.mean, 0.5 * g)
    state = s.update(state, g)                               # now Σ⁻¹ĝ: along u divided by α + (1 − α) d = 6.25
    np.testing.assert_allclose(state.mean, 0.25 * g + 0.5 * g / 6.25, rtol=1e-6)
    z = s.sample(rng, state, 20000, (d,)).astype(np.float64)
    cov = z.T @ z / len(z)
    expect = 0.25 * np.eye(d)
    expect[2, 2] += 0.75 * d                                 # Σ = αI + (1 − α) d uuᵀ, tr Σ = d
    np.testing.assert_allclose(cov, expect, atol=0.15)
    for bad in (dict(beta=1.0), dict(alpha=0.0), dict(alpha=1.5)):
        with pytest.raises(ValueError):
            optim.momentum_guided(**bad)


def _heavy_tailed_run(transform, seed, steps=400, d=16):
    """ZO-Adam on a quadratic whose per-step loss is tilted by a heavy-tailed random slope (Student t,
    2.5 degrees of freedom: finite variance, kurtosis unbounded), like the diffusion loss's samples."""
    rng = np.random.default_rng(seed)
    w = np.ones(d)
    f = lambda th: 0.5 * np.sum((th - w) ** 2)  # noqa: E731
    rge = optim.RGE(n=2, mu=1e-3)
    opt = optim.chain(*([transform] if transform else []), optim.adam(lr=2e-2))
    theta = np.zeros(d, np.float32)
    state = opt.init(theta)
    for _ in range(steps):
        tilt = 3.0 * rng.standard_t(2.5, size=d) * np.exp(rng.standard_normal())  # scale varies by sample
        z = rge.directions(rng, theta.shape)
        losses = [f(c.astype(np.float64)) + tilt @ c for c in rge.candidates(theta, z)]
        updates, state = opt.update(rge.estimate(losses, z), state, theta)
        theta = optim.apply_updates(theta, updates)
    return f(theta.astype(np.float64))


def test_normalize_gives_every_estimate_length_sqrt_d_and_keeps_its_direction():
    t = optim.normalize()
    g = np.array([3.0, -4.0, 0.0, 0.0], np.float32)
    out, _ = t.update(g, t.init(g))
    np.testing.assert_allclose(out, 2.0 * g / 5.0, rtol=1e-6)
    zero, _ = t.update(np.zeros(4, np.float32), t.init(g))
    assert not zero.any()


def test_clip_by_running_norm_cuts_outliers_and_leaves_the_bulk():
    t = optim.clip_by_running_norm(2.0, decay=0.9)
    state = t.init(np.zeros(3))
    rng = np.random.default_rng(0)
    for _ in range(50):  # the bulk: length about 1, passed through
        g = rng.standard_normal(3).astype(np.float32)
        g /= np.linalg.norm(g)
        out, state = t.update(g, state)
        np.testing.assert_array_equal(out, g)
    big = np.array([100.0, 0, 0], np.float32)
    out, state = t.update(big, state)
    assert 1.5 < np.linalg.norm(out) < 2.5  # cut to about 2 × the typical length, direction kept
    assert out[0] > 0 and not out[1:].any()
    with pytest.raises(ValueError):
        optim.clip_by_running_norm(0.0)


def test_normalize_and_clip_beat_plain_zo_adam_under_heavy_tailed_sample_noise():
    """Mean over six seeds of the final loss (start 8); measured: plain 5.7, clip 2 3.9, normalize 2.4."""
    plain = np.mean([_heavy_tailed_run(None, s) for s in range(6)])
    clipped = np.mean([_heavy_tailed_run(optim.clip_by_running_norm(2.0), s) for s in range(6)])
    normed = np.mean([_heavy_tailed_run(optim.normalize(), s) for s in range(6)])
    assert clipped < 0.8 * plain and normed < 0.8 * plain


def _low_rank_least_squares(d=64, k=4, m=256, seed=0):
    """L(θ) = ‖A θ − b‖² / m with A = P Bᵀ of rank k: the output responds to k directions of R^d only."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, k)))            # [d, k] orthonormal
    A = rng.standard_normal((m, k)) * np.array([4.0, 3.0, 2.0, 1.0][:k]) @ basis.T
    b = A @ rng.standard_normal(d)
    return A, b, basis


def test_gauss_newton_basis_finds_the_directions_the_output_responds_to():
    A, _, basis = _low_rank_least_squares()
    u = optim.gauss_newton_basis([A[:128], A[128:]], rank=4).astype(np.float64)     # two "samples"
    assert u.shape == (4, 64)
    np.testing.assert_allclose(u @ u.T, np.eye(4), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(u @ basis, axis=0), 1.0, atol=1e-5)   # spans the planted ones
    top = optim.gauss_newton_basis([A], rank=1).astype(np.float64)[0]
    strongest = np.linalg.eigh(A.T @ A)[1][:, -1]
    assert abs(top @ strongest) > 1 - 1e-6
    for bad in (0, 65):
        with pytest.raises(ValueError, match="sensitivity rank"):
            optim.gauss_newton_basis([A], rank=bad)


def test_sensitivity_directions_are_isotropic_until_the_basis_is_set_then_guided_by_it():
    d, k, alpha = 16, 2, 0.25
    sampler = optim.sensitivity(rank=k, alpha=alpha)
    theta = np.zeros(d, np.float32)
    state = sampler.init(theta)
    rng = np.random.default_rng(0)
    z = sampler.sample(rng, state, 40000, theta.shape).astype(np.float64)
    np.testing.assert_allclose(z.T @ z / len(z), np.eye(d), atol=0.05)
    full = np.linalg.qr(rng.standard_normal((d, d)))[0].T                           # an eigenbasis, rows
    u = full[:k]
    state = state._replace(basis=full.astype(np.float32))
    z = sampler.sample(rng, state, 40000, theta.shape).astype(np.float64)
    expected = alpha * np.eye(d) + (1 - alpha) * d / k * u.T @ u                      # tr = d, as N(0, I)
    np.testing.assert_allclose(z.T @ z / len(z), expected, atol=0.12)
    back = optim.unflatten_state(optim.flatten_state(state), sampler.init(theta))
    np.testing.assert_array_equal(back.basis, state.basis)
    for bad in (dict(rank=0), dict(alpha=0.0), dict(alpha=1.5)):
        with pytest.raises(ValueError):
            optim.sensitivity(**bad)
    with pytest.raises(ValueError, match="at most the token's size"):
        optim.sensitivity(rank=17).init(theta)


def test_sensitivity_directions_beat_gaussian_at_equal_passes_sketch_included():
    """Noisy least squares (a fresh perturbation of the target every step, as a fresh noise draw) whose
    output responds to 4 of 64 directions. Sensitivity directions pay 65 passes for one Jacobian by
    forward differences, then probe its Gauss-Newton subspace; at an equal budget of passes they reach a
    lower loss than isotropic probes (mean over seeds)."""
    A, b, _ = _low_rank_least_squares()
    budget, mu = 600, 1e-3

    def run(sensitive: bool, seed):
        rng = np.random.default_rng(seed)
        theta = np.zeros(64, np.float32)
        passes = 0
        sampler = optim.sensitivity(rank=4, alpha=0.2) if sensitive else optim.gaussian()
        s_state = sampler.init(theta)
        if sensitive:                                  # the sketch: θ and θ + μ·axis, 65 passes
            target = b + 0.5 * rng.standard_normal(b.shape)
            outs = np.stack([A @ c for c in theta[None].astype(np.float64) + mu * np.vstack([np.zeros(64), np.eye(64)])])
            s_state = s_state._replace(basis=optim.gauss_newton_basis([((outs[1:] - outs[0]) / mu).T], 64))
            passes += 65
        rge, opt = optim.RGE(n=2, mu=mu, sampler=sampler), optim.adam(lr=1e-2)
        o_state = opt.init(theta)
        while passes + rge.passes <= budget:
            target = b + 0.5 * rng.standard_normal(b.shape)
            z = rge.directions(rng, theta.shape, s_state)
            losses = [np.mean((A @ c.astype(np.float64) - target) ** 2) for c in rge.candidates(theta, z)]
            upd, o_state = opt.update(rge.estimate(losses, z), o_state, theta)
            theta = optim.apply_updates(theta, upd)
            passes += rge.passes
        return np.mean((A @ theta.astype(np.float64) - b) ** 2)

    gauss = np.mean([run(False, s) for s in range(6)])
    sens = np.mean([run(True, s) for s in range(6)])
    assert sens < 0.25 * gauss, (sens, gauss)      # measured: 0.006 against 0.15


def test_split_sensitivity_probes_alternate_between_the_subspace_and_its_complement_unbiased():
    d, k, n = 10, 3, 4
    rng = np.random.default_rng(0)
    full = np.linalg.qr(rng.standard_normal((d, d)))[0].T
    sampler = optim.sensitivity(rank=k, split=True)
    theta = np.zeros(d, np.float32)
    state = sampler.init(theta)._replace(basis=full.astype(np.float32))
    z = sampler.sample(rng, state, n, theta.shape).astype(np.float64)
    inside = np.linalg.norm(z @ full[:k].T, axis=1) / np.linalg.norm(z, axis=1)
    np.testing.assert_allclose(inside, [1, 0, 1, 0], atol=1e-5)           # probes 0, 2 in U; 1, 3 outside
    second = np.zeros((d, d))
    for _ in range(20000):
        z = sampler.sample(rng, state, n, theta.shape).astype(np.float64)
        second += z.T @ z / n
    np.testing.assert_allclose(second / 20000, np.eye(d), atol=0.05)     # E[(1/n) Σ z zᵀ] = I: RGE unbiased
    with pytest.raises(ValueError, match="less one"):
        optim.sensitivity(rank=d, split=True).init(theta)
    with pytest.raises(ValueError, match="n >= 2"):
        sampler.sample(rng, state, 1, theta.shape)


def test_axes_probes_are_the_leading_directions_and_with_n_equal_rank_give_the_exact_projection():
    """n = rank probes along U's rows measure the gradient's part in span(U) exactly on a quadratic (no
    noise from drawing directions); fewer probes draw a subset of them, unbiased for that part."""
    d, k = 12, 4
    rng = np.random.default_rng(0)
    full = np.linalg.qr(rng.standard_normal((d, d)))[0].T.astype(np.float32)
    A = rng.standard_normal((d, d))
    A = A @ A.T / d
    b = rng.standard_normal(d)
    theta = rng.standard_normal(d).astype(np.float32)
    grad = A @ theta.astype(np.float64) - b
    loss = lambda x: 0.5 * x.astype(np.float64) @ A @ x.astype(np.float64) - b @ x.astype(np.float64)
    want = full[:k].T.astype(np.float64) @ (full[:k].astype(np.float64) @ grad)      # P_U ∇L
    sampler = optim.sensitivity(rank=k, axes=True)
    state = sampler.init(theta)._replace(basis=full)
    rge = optim.RGE(n=k, mu=1e-4, sampler=sampler)
    for _ in range(3):                                                     # every step the same, exact part
        z = rge.directions(rng, theta.shape, state)
        np.testing.assert_allclose(np.abs(z @ full[:k].T), np.sqrt(k) * np.eye(k), atol=1e-5)
        est = rge.estimate([loss(c) for c in rge.candidates(theta, z)], z)
        np.testing.assert_allclose(est, want, atol=2e-3 * np.linalg.norm(want))
    rge2 = optim.RGE(n=2, mu=1e-4, sampler=sampler)
    mean = np.mean([rge2.estimate([loss(c) for c in rge2.candidates(theta, z)], z)
                    for z in (rge2.directions(rng, theta.shape, state) for _ in range(3000))], axis=0)
    np.testing.assert_allclose(mean, want, atol=0.05 * np.linalg.norm(want))          # unbiased for P_U ∇L
    with pytest.raises(ValueError, match="n <= rank"):
        sampler.sample(rng, state, k + 1, theta.shape)
    with pytest.raises(ValueError, match="not both"):
        optim.sensitivity(rank=k, split=True, axes=True)


def test_whitened_directions_have_the_curvatures_inverse_power_as_covariance():
    d = 8
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.standard_normal((d, d)))[0].T
    h = np.array([50.0, 10, 5, 1, 1, 0.5, 0.1, 0.0])
    sampler = optim.whitened(power=1.0, floor=0.1)
    theta = np.zeros(d, np.float32)
    state = sampler.init(theta)
    z0 = sampler.sample(rng, state, 20000, theta.shape).astype(np.float64)
    np.testing.assert_allclose(z0.T @ z0 / len(z0), np.eye(d), atol=0.06)         # isotropic until sketched
    state = state._replace(basis=q.astype(np.float32), values=h.astype(np.float32))
    z = sampler.sample(rng, state, 40000, theta.shape).astype(np.float64)
    want = q.T @ np.diag(1 / (h + 0.1 * h.mean())) @ q
    want *= d / np.trace(want)                                                      # tr Σ = D
    np.testing.assert_allclose(z.T @ z / len(z), want, atol=0.06 * np.abs(want).max())
    for bad in (dict(power=0.0), dict(floor=0.0)):
        with pytest.raises(ValueError):
            optim.whitened(**bad)


def test_whitened_probes_beat_gaussian_on_a_noisy_ill_conditioned_quadratic():
    """A sample gradient whose noise has the curvature's shape (∇L = H(θ − θ*) + H^½ ξ, as a denoising
    loss's J^T r has): at each sampler's best rate on a grid, probes with covariance H⁻¹ (power 1) reach a
    far lower loss than Gaussian ones in the same passes, since the weakly curved directions, which
    hold most of the loss here, are no longer measured under the strong ones' noise."""
    d = 16
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.standard_normal((d, d)))[0].T
    h = np.array([100.0, 30, 10, 3] + [1.0] * 4 + [0.3] * 8)
    H = q.T @ np.diag(h) @ q
    star = rng.standard_normal(d)

    def run(sampler, state, lr, seed):
        r = np.random.default_rng(seed)
        rge, theta = optim.RGE(n=2, mu=1e-4, sampler=sampler), np.zeros(d, np.float32)
        for _ in range(600):
            xi = q.T @ (np.sqrt(h) * r.standard_normal(d))
            z = rge.directions(r, (d,), state)
            losses = [0.5 * (x - star) @ H @ (x - star) + xi @ x for x in rge.candidates(theta, z).astype(np.float64)]
            theta = (theta - lr * rge.estimate(losses, z)).astype(np.float32)
        return 0.5 * (theta - star) @ H @ (theta - star)

    white = optim.whitened(power=1.0, floor=0.1)
    w_state = white.init(np.zeros(d, np.float32))._replace(basis=q.astype(np.float32), values=h.astype(np.float32))
    best = {name: min(np.mean([run(s, st, lr, seed) for seed in range(3)]) for lr in (1e-3, 3e-3, 1e-2))
            for name, s, st in (("gaussian", optim.gaussian(), None), ("whitened", white, w_state))}
    assert best["whitened"] < 0.3 * best["gaussian"], best                      # measured: 0.24 against 1.81


def test_split_probes_measure_weak_directions_without_the_strong_ones_noise():
    """A sample gradient whose noise lives in a strong 2-d subspace and whose steady part is weak and
    outside it: split probes estimate the weak part with far less error than isotropic ones."""
    d, k = 32, 2
    rng = np.random.default_rng(1)
    full = np.linalg.qr(rng.standard_normal((d, d)))[0].T
    weak = 0.05 * full[k:].sum(0) / np.sqrt(d - k)                        # the steady gradient, outside U
    rge_iso = optim.RGE(n=2, mu=1e-3)
    split = optim.sensitivity(rank=k, split=True)
    rge_split = optim.RGE(n=2, mu=1e-3, sampler=split)
    state = split.init(np.zeros(d, np.float32))._replace(basis=full.astype(np.float32))
    errs = {"iso": [], "split": []}
    for _ in range(3000):
        g = weak + 3.0 * rng.standard_normal(k) @ full[:k]                # large noise inside U
        for name, rge, st in (("iso", rge_iso, None), ("split", rge_split, state)):
            z = rge.directions(rng, (d,), st)
            losses = [float(g @ c) for c in rge.candidates(np.zeros(d, np.float32), z)]
            est = rge.estimate(losses, z).astype(np.float64)
            errs[name].append(full[k:] @ (est - weak))                    # error in the weak directions
    iso, spl = (np.mean(np.sum(np.square(errs[n]), axis=1)) for n in ("iso", "split"))
    assert spl < 0.05 * iso, (spl, iso)                                  # measured: 3,600 times smaller


def test_rotated_runs_the_inner_rule_in_the_basis_coordinates():
    rng = np.random.default_rng(0)
    theta = rng.standard_normal((2, 3)).astype(np.float32)
    perm = np.eye(6)[[3, 0, 5, 1, 4, 2]]                                   # a rotation that permutes coordinates
    inner = optim.adam(lr=0.1)
    rot = optim.rotated(perm, inner)
    s_rot, s_in = rot.init(theta), inner.init(theta.reshape(-1)[[3, 0, 5, 1, 4, 2]])
    for _ in range(5):
        g = rng.standard_normal((2, 3)).astype(np.float32) * np.array([1.0, 10.0, 0.1], np.float32)
        u_rot, s_rot = rot.update(g, s_rot, theta)
        u_in, s_in = inner.update(g.reshape(-1)[[3, 0, 5, 1, 4, 2]], s_in, None)
        np.testing.assert_allclose(u_rot.reshape(-1)[[3, 0, 5, 1, 4, 2]], u_in, rtol=1e-5)
        assert u_rot.shape == theta.shape
    identity = optim.rotated(np.eye(6), optim.adam(lr=0.1))
    u, _ = identity.update(g, identity.init(theta), theta)
    np.testing.assert_allclose(u, optim.adam(lr=0.1).update(g, optim.adam(lr=0.1).init(theta), theta)[0], rtol=1e-6)
    with pytest.raises(ValueError, match="orthonormal"):
        optim.rotated(2 * np.eye(3), inner)
    with pytest.raises(ValueError, match="square"):
        optim.rotated(np.eye(3)[:2], inner)


def test_sphere_keeps_the_norm_and_reaches_the_best_direction():
    """On the sphere (DTI's Riemannian SGD): every iterate keeps each vector's starting norm; on a linear
    loss L = -<c, θ> (whose best point on the sphere is r·ĉ) noisy estimates and a decaying rate turn θ to
    within about ten degrees of ĉ, while plain SGD on the same estimates lets the norm run away."""
    rng = np.random.default_rng(0)
    c = rng.standard_normal(64)
    theta0 = rng.standard_normal((1, 64)).astype(np.float32)
    r = np.linalg.norm(theta0)
    sph, sgd_ = optim.spherical(lr=optim.cosine_decay_schedule(0.05, 600, alpha=0.05)), optim.sgd(0.05)
    a, b = theta0.copy(), theta0.copy()
    sa, sb = sph.init(a), sgd_.init(b)
    for k in range(600):
        g = (-c + 3.0 * rng.standard_normal(64)).astype(np.float32)[None]   # the gradient of L, noisy
        ua, sa = sph.update(g, sa, a)
        ub, sb = sgd_.update(g, sb, b)
        a, b = optim.apply_updates(a, ua), optim.apply_updates(b, ub)
        assert abs(np.linalg.norm(a) - r) < 1e-4 * r
    cos = float(a[0] @ c / (np.linalg.norm(a) * np.linalg.norm(c)))
    assert cos > 0.98, cos       # within about ten degrees
    assert np.linalg.norm(b) > 3 * r


def test_sphere_steps_are_angles_and_tangent():
    """A step of lr turns the vector by lr radians, whatever the estimate's length or radial part; each
    row of a multi-vector token is its own sphere."""
    theta = np.array([[3.0, 0.0, 0.0], [0.0, 0.5, 0.0]], np.float32)
    opt = optim.spherical(lr=0.1)
    state = opt.init(theta)
    g = np.array([[100.0, -7.0, 0.0], [0.0, 1.0, -0.01]], np.float32)   # radial parts are ignored
    u, state = opt.update(g, state, theta)
    new = theta + u
    for i, r in enumerate((3.0, 0.5)):
        assert np.linalg.norm(new[i]) == pytest.approx(r, rel=1e-6)
        angle = np.arccos(np.clip(new[i] @ theta[i] / r**2, -1, 1))
        assert angle == pytest.approx(np.arctan(0.1), rel=1e-5)      # a tangent step of lr, retracted
    assert new[0, 1] > 0 and new[1, 2] > 0                 # against the estimate's tangent part
    with pytest.raises(ValueError):
        optim.scale_by_sphere(beta=1.0)
