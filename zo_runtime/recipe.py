"""Recipes: the named sets of estimator and step-rule settings, and the constants they share.

A recipe is the one place a default lives. ``PersonalizeConfig`` leaves every recipe field at
``None`` ("the recipe's"), and :func:`resolve` fills them in; the command line shows the same table.

- ``zoodip``: exactly the paper's algorithm (arXiv 2503.14868): one-sided RGE with n = 2 Gaussian
  directions, μ = 1e-3, SG (τ = 128, ν = 1e-3), PUTS t ~ U[500, 900), ZO-Adam lr 5e-3, ε = 1e-8.
- ``zo-edge``: zo-edge's default, chosen by ``zo-edge bench quality`` (docs/estimator-lab.md): the
  paper's estimator without SG (its history of τ = 128 tokens spans the whole space when d ≤ τ, as on
  the shapes model, d = 64, and removed most of it: measured), at lr 2e-2 (44 % subject fidelity on
  six tuning subjects against 26 % at the paper's 5e-3, seed 0), with timesteps t ~ U[0, 500) in
  place of PUTS's [500, 900): +15.0 points (95 % CI +2.2 to +26.9) over 18 (subject, seed) pairs at
  3,000 UNet passes, +17.5 on the two untuned subjects, +13.8 at 9,000 passes (8 pairs); [0, 250),
  lr 1e-2 and lr 4e-2 with [0, 500) were each worse (paired, 18 pairs). Each gradient estimate is
  clipped at 2× the running typical length (``clip``): RGE's directional derivatives are heavy-tailed
  (kurtosis 19-88 during runs), and clipping gained +7.5 points (+1.1 to +14.7) over 18 pairs, +5.8 on
  the untuned subjects (6 pairs); normalizing every estimate instead gained nothing (+0.6), clip 1
  lost to clip 2, and at 9,000 passes clipping is not ahead (-5.0, not separated, 8 pairs).
"""
from __future__ import annotations

# Textual inversion's small ImageNet templates (Gal et al. 2022), as used by the paper's code.
TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
)

DIRECTIONS = ("gaussian", "orthogonal", "guided", "momentum", "token-pca", "vocab-pca", "sensitivity", "whitened")
SKETCHED = ("sensitivity", "whitened")   # directions that measure the Gauss-Newton matrix first
# what --rank 0 means: guided keeps the last 4 estimates; token-pca and vocab-pca search the top 16
# components (of the whole table / of the model's vocabulary rows); sensitivity the 8 leading directions
# of the outputs' Gauss-Newton matrix
DEFAULT_RANK = {"guided": 4, "token-pca": 16, "vocab-pca": 16, "sensitivity": 8}
PCA_DIRECTIONS = ("token-pca", "vocab-pca")
OPTIMIZERS = ("adam", "sgd", "sphere")   # sphere: Riemannian SGD on the token's sphere (DTI)
SCHEDULES = ("constant", "cosine")

ZOODIP = dict(
    n=2, mu=1e-3, antithetic=False, directions="gaussian", rank=0, guided_alpha=0.5, guided_beta=0.99,
    sg=True, tau=128, nu=1e-3, puts=True, t_low=500, t_high=900,
    optimizer="adam", lr=5e-3, b1=0.9, adam_eps=1e-8, schedule="constant", reference_scaling=False,
    weight_decay=0.0, average=0.0, normalize=False, clip=0.0, subspace_steps=False, pca_alpha=0.0, sketch=2,
    split=False, eigenbasis_steps=False, sphere_scale=1.0, axes=False, whiten_power=0.5, whiten_floor=0.1,
)

RECIPES: dict[str, dict] = {
    "zoodip": ZOODIP,
    "zo-edge": dict(ZOODIP, sg=False, lr=2e-2, t_low=0, t_high=500, clip=2.0),
}
DEFAULT_RECIPE = "zo-edge"
RECIPE_FIELDS = tuple(ZOODIP)
# Fields added after runs were first recorded, with the value that reproduces those runs: a
# config.json written before a field existed resumes with it (not with today's recipe default).
ADDED_FIELDS = dict(weight_decay=0.0, average=0.0, guided_beta=0.99, normalize=False, clip=0.0,
                    subspace_steps=False, pca_alpha=0.0, sketch=2, split=False,
                    eigenbasis_steps=False, sphere_scale=1.0, axes=False, whiten_power=0.5, whiten_floor=0.1)


def sg_tau_for(dim: int) -> int:
    """The paper's SG history length scaled to a token width: tau = 128 at d = 768 (SD 1.x)."""
    return max(2, round(dim * 128 / 768))


def recipe_values(name: str) -> dict:
    if name not in RECIPES:
        from .errors import UserError
        raise UserError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return dict(RECIPES[name])
