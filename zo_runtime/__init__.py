"""zo_runtime: forward-only (zeroth-order) personalization for ONNX Runtime applications.

NumPy + onnxruntime only. The pieces, each usable alone with plain arrays:

- :class:`RGE` — random gradient estimator (one-sided or antithetic) with direction samplers
  :func:`gaussian`, :func:`orthogonal`, :func:`guided`, :func:`subspace`; :func:`subspace_gradient` — SG;
  :func:`adam`, :func:`sgd`, :func:`scale_by_learning_rate` and schedules; :func:`chain` /
  :func:`apply_updates` (``zo_runtime.optim``, optax-style, typed NamedTuple states);
- ``zo_runtime.recipe``: the named recipes (``zoodip``, ``zo-edge``) and their constants;
- :func:`puts` / :func:`uniform` — timestep samplers (``zo_runtime.timesteps``);
- :class:`LossOracle` — the ORT text encoder + UNet as a black-box loss (``zo_runtime.oracle``);
- :class:`Bundle` — a converted model; :class:`Pipeline` — text-to-image;
- ``zo_runtime.personalize``: :class:`PersonalizeConfig`, :class:`Trainer`, ``personalize(cfg)`` and
  ``resume(run_dir)`` — the whole training loop.
"""
from .bundle import Bundle
from .errors import UserError
from .optim import (RGE, adam, apply_updates, chain, gaussian, guided, orthogonal, pca_drop_basis, sgd, subspace,
                    subspace_gradient)
from .oracle import LossOracle
from .timesteps import puts, uniform

__version__ = "0.1.0"


def __getattr__(name):  # heavier modules on first use
    if name in ("PersonalizeConfig", "Trainer"):
        from . import personalize as _p
        return getattr(_p, name)
    if name == "Pipeline":
        from .pipeline import Pipeline
        return Pipeline
    raise AttributeError(name)


__all__ = ["Bundle", "UserError", "RGE", "adam", "apply_updates", "chain", "gaussian", "guided", "orthogonal",
           "pca_drop_basis", "sgd", "subspace", "subspace_gradient",
           "LossOracle", "puts", "uniform", "PersonalizeConfig", "Trainer", "Pipeline"]
