"""Forward-only textual inversion (ZOODiP) on a zo-edge bundle: the training loop.

    cfg = PersonalizeConfig(model="sd15-int8", images="my_dog/", token="<my-dog>", init="dog",
                            out="my_dog.safetensors", run_dir="runs/my_dog")
    result = personalize(cfg)                 # or resume("runs/my_dog")

Each iteration: draw one reference latent, noise, timestep (PUTS) and prompt; evaluate
L(θ) and L(θ + μ zᵢ) for i = 1..n through the ONNX sessions; estimate ĝ (RGE); project it (SG);
take an Adam step. No gradients are computed anywhere.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import optim
from .bundle import Bundle
from .data import DEFAULT_MAX_PIXELS, encode_images, list_images, load_image
from .embeddings import save_embedding
from .errors import UserError
from .outputs import check_output, write_npz, write_text
from .oracle import LossOracle
from .precision import precision_recipe
from .progress import Progress
from .sysinfo import peak_rss_mb
from .recipe import (ADDED_FIELDS, DEFAULT_RANK, DEFAULT_RECIPE, DIRECTIONS, OPTIMIZERS, PCA_DIRECTIONS, RECIPE_FIELDS,
                     SCHEDULES, SKETCHED, TEMPLATES, recipe_values, sg_tau_for)
from .timesteps import puts, uniform
from .tokenizer import CLIPTokenizer

CHECKPOINT = "checkpoint.npz"
LOCK = ".lock"
MAX_VECTORS = 75            # 77 tokens less BOS and EOS
MAX_RESOLUTION = 4096
MAX_LR = 1.0


@dataclass
class PersonalizeConfig:
    """Every flag of ``zo-edge personalize``; defaults are the paper's."""

    model: str
    images: str
    token: str
    init: str
    out: str
    run_dir: str | None = None
    steps: int = 3000
    num_vectors: int = 1
    resolution: int | None = None       # None: the model's own
    recipe: str = DEFAULT_RECIPE        # zoodip (the paper) or zo-edge; the fields below default to it
    n: int | None = None                # RGE directions
    mu: float | None = None             # RGE smoothing
    antithetic: bool | None = None      # two-sided differences (2n passes a step) instead of one-sided (n + 1)
    directions: str | None = None       # gaussian, orthogonal, guided, momentum, token-pca, vocab-pca
    rank: int | None = None             # token-/vocab-pca, sensitivity: subspace rank; guided: estimates kept (0: the default)
    pca_alpha: float | None = None      # token-/vocab-pca: share of isotropic directions (0: the subspace only)
    guided_alpha: float | None = None   # guided, momentum, sensitivity: share of isotropic directions
    guided_beta: float | None = None    # momentum: decay of the estimates' average that guides the directions
    sg: bool | None = None              # Subspace Gradient
    tau: int | None = None
    nu: float | None = None
    puts: bool | None = None            # PUTS: t ~ U[t_low, t_high)
    t_low: int | None = None
    t_high: int | None = None
    optimizer: str | None = None        # adam (ZO-Adam) or sgd
    lr: float | None = None
    b1: float | None = None             # Adam's first-moment decay
    adam_eps: float | None = None
    schedule: str | None = None         # constant or cosine (to lr/10 at the last step)
    reference_scaling: bool | None = None  # the reference code's 1/sqrt((d+n-1)/n) on the estimate
    weight_decay: float | None = None   # pull toward the init token, λ(θ − θ₀) per step (0: off)
    average: float | None = None        # output the EMA of the iterates with this decay (0: the last iterate)
    normalize: bool | None = None       # each estimate scaled to length √d (FZOO's step from the losses' spread)
    clip: float | None = None           # clip each estimate at clip × the running typical length (0: off)
    subspace_steps: bool | None = None  # token-/vocab-pca: the optimizer works in the subspace's coordinates
    sketch: int | None = None           # sensitivity: training samples whose Jacobian (D + 1 passes each) sets the subspace
    split: bool | None = None           # sensitivity: probes alternate between the leading subspace and its complement
    eigenbasis_steps: bool | None = None  # sensitivity: the step rule runs in the Gauss-Newton eigenbasis
    axes: bool | None = None            # sensitivity: each probe is one of the leading eigenvectors (n <= rank)
    whiten_power: float | None = None   # whitened: probe covariance (H + λI)^(−power) in the Gauss-Newton eigenbasis
    whiten_floor: float | None = None   # whitened: λ as a share of H's mean eigenvalue
    sphere_scale: float | None = None   # --optimizer sphere: the token's norm, as a multiple of the init word's
    batch_candidates: str = "auto"
    seed: int = 0
    checkpoint_every: int = 100
    preview_every: int = 0              # >0: a preview image through the generate path every K steps
    captions: str | None = None         # optional file: "<image file>\t<caption with {}>" per line
    flip: bool = True
    allow_upscale: bool = True
    provider: str = "cpu"
    threads: int = 0
    low_memory: bool = False            # Bundle.low_memory: less peak memory, slower, the same arithmetic
    overwrite: bool = False
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    templates: tuple = field(default=TEMPLATES)

    def resolved(self) -> "PersonalizeConfig":
        """A copy with every recipe field that is None taken from ``recipe``."""
        values = recipe_values(self.recipe)
        return dataclasses.replace(self, **{k: values[k] for k in RECIPE_FIELDS if getattr(self, k) is None})

    def validate(self) -> None:
        """Checks the run's own settings; the estimator's and step rule's hyper-parameters are checked
        where they are built (``zo_runtime.optim``), by building them once here. Every check runs
        before anything is loaded (the model-dependent ones follow in :class:`Trainer`)."""
        self.check_types()
        cfg = self.resolved()
        if cfg.puts and not 0 <= cfg.t_low < cfg.t_high:
            raise UserError(f"PUTS needs 0 <= T_L < T_U, got T_L={cfg.t_low}, T_U={cfg.t_high}")
        for name, value, allowed in (("--directions", cfg.directions, DIRECTIONS), ("--optimizer", cfg.optimizer, OPTIMIZERS),
                                     ("--schedule", cfg.schedule, SCHEDULES)):
            if value not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if cfg.rank < 0:
            raise UserError(f"--rank must be >= 0, got {cfg.rank}")
        if cfg.sketch < 1:
            raise UserError(f"--sketch must be >= 1, got {cfg.sketch}")
        if self.steps < 1:
            raise UserError(f"--steps must be >= 1, got {self.steps}")
        if not 1 <= self.num_vectors <= MAX_VECTORS:
            raise UserError(f"--num-vectors must be between 1 and {MAX_VECTORS} (a prompt holds 77 tokens), "
                            f"got {self.num_vectors}")
        if self.checkpoint_every < 1:
            raise UserError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        for flag, v in (("--seed", self.seed), ("--preview-every", self.preview_every), ("--threads", self.threads)):
            if v < 0:
                raise UserError(f"{flag} must be >= 0, got {v}")
        if self.resolution is not None and not (8 <= self.resolution <= MAX_RESOLUTION and self.resolution % 8 == 0):
            raise UserError(f"--resolution must be a multiple of 8 between 8 and {MAX_RESOLUTION}, got {self.resolution}")
        if self.max_image_pixels < 1:
            raise UserError(f"--max-image-pixels must be >= 1, got {self.max_image_pixels}")
        if self.batch_candidates not in ("auto", "on", "off"):
            raise UserError(f"--batch-candidates must be auto, on or off, got {self.batch_candidates!r}")
        if not self.templates:
            raise UserError("no training prompt templates")
        try:
            make_optimizer(dataclasses.replace(cfg, sg=True), dim=1)  # every given value, in use or not
            optim.decay_to_init(cfg.weight_decay)
            optim.average_iterates(cfg.average)
            optim.retract_to_sphere(cfg.sphere_scale)
            make_estimator(cfg)
            if cfg.subspace_steps and cfg.directions not in PCA_DIRECTIONS:
                raise ValueError(f"--subspace-steps needs --directions {' or '.join(PCA_DIRECTIONS)}, "
                                 f"not {cfg.directions}")
            optim.subspace(np.eye(1, dtype=np.float32), alpha=cfg.pca_alpha)
            if cfg.subspace_steps and cfg.pca_alpha:
                raise ValueError("--subspace-steps keeps the token in the subspace; --pca-alpha probes outside it: "
                                 "choose one")
            optim.guided(k=cfg.rank or DEFAULT_RANK["guided"], alpha=cfg.guided_alpha)
            optim.momentum_guided(beta=cfg.guided_beta, alpha=cfg.guided_alpha)
            sensitivity_rank = cfg.rank or DEFAULT_RANK["sensitivity"]
            optim.sensitivity(rank=sensitivity_rank, alpha=cfg.guided_alpha, split=cfg.split, axes=cfg.axes)
            for flag, on in (("--split", cfg.split), ("--eigenbasis-steps", cfg.eigenbasis_steps), ("--axes", cfg.axes)):
                if on and cfg.directions != "sensitivity":
                    raise ValueError(f"{flag} needs --directions sensitivity, not {cfg.directions}")
            optim.whitened(power=cfg.whiten_power, floor=cfg.whiten_floor)
            if cfg.axes and cfg.n > sensitivity_rank:
                raise ValueError(f"--axes probes n <= rank leading directions a step, got n = {cfg.n}, rank "
                                 f"{sensitivity_rank}")
            if cfg.split and cfg.n < 2:
                raise ValueError(f"--split needs n >= 2 probes a step (one in the subspace, one outside), got {cfg.n}")
        except ValueError as e:
            raise UserError(str(e)) from None
        why = {"adam": "Adam (it moves every coordinate by about lr per step; a token row has norm about 1)",
               "sphere": "--optimizer sphere (an angle in radians per step)"}
        if cfg.optimizer in why and cfg.lr > MAX_LR:
            raise UserError(f"--lr must be at most {MAX_LR} with {why[cfg.optimizer]}, got {cfg.lr}")
        if cfg.optimizer == "sphere" and (cfg.subspace_steps or cfg.eigenbasis_steps):
            raise UserError("--optimizer sphere steps in the token's own coordinates; it does not go with "
                            "--subspace-steps or --eigenbasis-steps")

    def check_types(self) -> None:
        """Each field has the type its annotation names (a config.json edited by hand, or damaged,
        is caught here rather than deep inside the run)."""
        for f in dataclasses.fields(self):
            allowed = _allowed_types(f.type)
            v = getattr(self, f.name)
            if allowed is not None and (not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed)):
                raise UserError(f"setting {f.name!r} has the wrong type: {v!r}")
        if not all(isinstance(t, str) and "{}" in t for t in self.templates):
            raise UserError("every prompt template must be a string with {} where the token goes")


_TYPE_NAMES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),),
               "tuple": (tuple, list)}


def _allowed_types(annotation) -> tuple | None:
    """``"int | None"`` -> (int, NoneType); None for an annotation not spelled with those names."""
    names = [n.strip() for n in str(annotation).split("|")]
    if not all(n in _TYPE_NAMES for n in names):
        return None
    return tuple(t for n in names for t in _TYPE_NAMES[n])


def default_run_dir(token: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", token).strip("-") or "token"
    return str(Path("runs") / name)


def make_optimizer(cfg: PersonalizeConfig, dim: int, basis: np.ndarray | None = None,
                   rotation: np.ndarray | None = None) -> optim.GradientTransformation:
    """(normalize or clip the estimate) → (SG) → (the reference's scaling) → (Adam's scaling, or the sphere's
    tangent step) → (decay toward θ₀) → a constant or cosine learning rate → (back onto the sphere) →
    (iterate averaging). ``cfg`` resolved; ``dim``: the
    token's size (for the reference scaling); ``basis``: the token-/vocab-pca subspace, in whose
    coordinates everything before the averaging runs when ``cfg.subspace_steps``; ``rotation``: the
    sensitivity directions' eigenbasis [D, D], in whose coordinates it runs when ``cfg.eigenbasis_steps``."""
    parts = []
    if cfg.normalize:
        parts.append(optim.normalize())
    if cfg.clip:
        parts.append(optim.clip_by_running_norm(cfg.clip))
    if cfg.sg:
        parts.append(optim.subspace_gradient(tau=cfg.tau, nu=cfg.nu))
    if cfg.reference_scaling:
        parts.append(optim.scale(optim.reference_scale(dim, cfg.n)))
    if cfg.optimizer == "adam":
        parts.append(optim.scale_by_adam(b1=cfg.b1, eps=cfg.adam_eps))
    elif cfg.optimizer == "sphere":
        parts.append(optim.scale_by_sphere())
    if cfg.weight_decay:
        parts.append(optim.decay_to_init(cfg.weight_decay))
    lr = cfg.lr if cfg.schedule == "constant" else optim.cosine_decay_schedule(cfg.lr, cfg.steps, alpha=0.1)
    parts.append(optim.scale_by_learning_rate(lr))
    if cfg.optimizer == "sphere":
        parts.append(optim.retract_to_sphere(cfg.sphere_scale))
    if cfg.subspace_steps and basis is not None:
        parts = [optim.in_subspace(basis, optim.chain(*parts))]
    if cfg.eigenbasis_steps and rotation is not None:
        parts = [optim.rotated(rotation, optim.chain(*parts))]
    if cfg.average:
        parts.append(optim.average_iterates(cfg.average))
    return optim.chain(*parts)


def setup_passes(cfg: PersonalizeConfig, size: int) -> int:
    """UNet passes spent before the first step: the Jacobian sketch of ``sensitivity`` / ``whitened`` directions (each
    of ``sketch`` samples: θ and θ + μ·axis for the token's ``size`` = V·d axes); 0 for every other
    direction. ``cfg`` resolved."""
    return cfg.sketch * (size + 1) if cfg.directions in SKETCHED else 0


def pca_basis(cfg: PersonalizeConfig, table, vocabulary=None) -> np.ndarray | None:
    """The token-/vocab-pca subspace [rank, d] (``None`` for other directions). ``table``: the token
    table; ``vocabulary``: the ids of the rows the model was trained on (vocab-pca; ``None``, a
    bundle that does not say, as for a released CLIP whose every row is trained: token-pca's sample
    of the whole table)."""
    if cfg.directions not in PCA_DIRECTIONS:
        return None
    rank = cfg.rank or DEFAULT_RANK[cfg.directions]
    try:
        return optim.token_pca_basis(table, rank, rows=vocabulary if cfg.directions == "vocab-pca" else None)
    except ValueError as e:
        raise ValueError(f"--rank for {cfg.directions}: {e}") from None


def make_estimator(cfg: PersonalizeConfig, basis: np.ndarray | None = None) -> optim.RGE:
    """RGE with the recipe's directions. ``cfg`` resolved; ``basis``: token-/vocab-pca's subspace
    (:func:`pca_basis`; ``None`` while only validating, which then checks the rest)."""
    rank = cfg.rank or DEFAULT_RANK.get(cfg.directions, 0)
    if cfg.directions == "orthogonal":
        sampler = optim.orthogonal()
    elif cfg.directions == "guided":
        sampler = optim.guided(k=rank, alpha=cfg.guided_alpha)
    elif cfg.directions == "momentum":
        sampler = optim.momentum_guided(beta=cfg.guided_beta, alpha=cfg.guided_alpha)
    elif cfg.directions == "whitened":
        sampler = optim.whitened(power=cfg.whiten_power, floor=cfg.whiten_floor)
    elif cfg.directions == "sensitivity":
        sampler = optim.sensitivity(rank=rank, alpha=cfg.guided_alpha, split=cfg.split, axes=cfg.axes)
    elif cfg.directions in PCA_DIRECTIONS and basis is not None:
        sampler = optim.subspace(basis, alpha=cfg.pca_alpha)
    else:
        sampler = optim.gaussian()
    return optim.RGE(n=cfg.n, mu=cfg.mu, antithetic=cfg.antithetic, sampler=sampler)


def _read_captions(path: str, files: list[Path], token: str) -> list[str | None]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"captions file {path!r} does not exist")
    table = {}
    for k, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise UserError(f"{path}:{k}: expected '<image file><TAB><caption>'")
        name, cap = line.split("\t", 1)
        cap = cap.strip().replace(token, "{}")
        if "{}" not in cap:
            raise UserError(f"{path}:{k}: caption must contain {{}} or {token!r} where the subject goes")
        table[name.strip()] = cap
    return [table.get(f.name) for f in files]


def read_log(path: Path, upto: int) -> list[str]:
    """The log's lines for steps 1..upto; a line cut short by a kill or a full disk, or otherwise
    unreadable, is dropped (the checkpoint, not the log, is what a run resumes from)."""
    keep = []
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return keep
    for line in raw.split(b"\n"):
        try:
            entry = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and 1 <= entry["step"] <= upto:
            keep.append(line.decode("utf-8"))
    return keep


class RunLock:
    """An exclusive claim on a run directory for as long as a run writes to it: two processes never
    share one (the kernel drops the claim when a process dies, so kill -9 leaves nothing stale)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.fd = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): the checks before and after still apply
            return
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot use the run directory {self.path.parent}: {e.strerror or e}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise UserError(f"run directory {self.path.parent} is in use by another zo-edge run; wait for it "
                            "or choose another --run-dir") from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def remove_stale_temp_files(run_dir: Path) -> None:
    """Temporary files a killed run left behind (never read: every write renames its file into place)."""
    for p in [*run_dir.glob(".*.tmp"), *run_dir.glob("*.tmp.npz"), *run_dir.glob("*.json.tmp")]:
        try:
            p.unlink()
        except OSError:
            pass


@dataclass
class Result:
    theta: np.ndarray          # [num_vectors, dim]
    out: str
    run_dir: str
    steps: int
    forward_passes: int
    seconds: float
    peak_rss_mb: float
    final_loss: float


class Trainer:
    """One personalization run: setup (bundle, data, oracle), then ``train()``."""

    def __new__(cls, cfg: PersonalizeConfig, resume: bool = False):
        if cls is Trainer and isinstance(cfg, PersonalizeConfig):  # family dispatch: an SDXL bundle's own trainer
            from .sdxl import FAMILY, family_of
            if family_of(cfg.model) == FAMILY:
                from .personalize_sdxl import SDXLTrainer
                cls = SDXLTrainer
        return super().__new__(cls)

    def __init__(self, cfg: PersonalizeConfig, resume: bool = False):
        cfg.validate()
        self.given = cfg                # as the user gave it: what the recipe, not the user, chose
        self.cfg = cfg.resolved()
        self.resuming = resume
        self.run_dir = Path(self.cfg.run_dir or default_run_dir(self.cfg.token))
        self.last_checkpoint = None
        self.check_outputs()           # before anything long: --out and the run directory
        self.load_model()              # the bundle, and what it says about this recipe
        self.check_words()             # placeholder new, init word one token
        self.check_against_model()     # resolution, timestep range
        self.load_data()               # images, captions, prompts; VAE latents, once
        self.build_optimizer()         # loss oracle, estimator, step rule, timestep sampler

    def check_outputs(self) -> None:
        check_output(self.cfg.out, (".safetensors",), self.cfg.overwrite, "--out")
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"run directory {self.run_dir} exists and is not a folder")
        self.check_run_dir()

    def load_model(self) -> None:
        cfg = self.cfg
        self.bundle = Bundle.load(cfg.model, provider=cfg.provider, threads=cfg.threads, low_memory=cfg.low_memory)
        # hook (zo_runtime/precision.py): the μ measured for this bundle's precision on this provider
        cfg = self.cfg = precision_recipe(self.given, cfg, self.bundle)
        static = [g for g in ("text_encoder", "unet") if self.bundle.graph(g).get("precision") in ("int8", "int4")]
        if static:
            print(f"warning: this bundle's {' and '.join(static)} quantize activations (static INT8 QDQ); measured, "
                  "that rounding drowns the zeroth-order signal at mu=1e-3. For personalization convert with "
                  "--weights int8w (weight-only INT8) or fp32.", file=sys.stderr)
        d = self.bundle.embedding_dim
        if cfg.sg and cfg.tau >= d:
            print(f"warning: SG keeps tau={cfg.tau} tokens but a token has only {d} dimensions: the history spans "
                  f"the whole space and SG drops most of it (measured on the shapes model, README). The paper's "
                  f"ratio (128 of 768) gives --tau {sg_tau_for(d)}; or use --no-sg.", file=sys.stderr)

    def check_words(self) -> None:
        cfg = self.cfg
        self.tokenizer = CLIPTokenizer.from_pretrained(self.bundle.tokenizer_dir)
        if self.tokenizer.is_in_vocab(cfg.token):
            raise UserError(f"placeholder {cfg.token!r} is already a token of the vocabulary; "
                            "choose a new string such as <my-thing>")
        self.init_id = self.tokenizer.single_token_id(cfg.init)
        if self.init_id is None:
            raise UserError(f"init word {cfg.init!r} is not a single token of the vocabulary; "
                            "choose a one-token word (e.g. dog, toy, star)")

    def check_against_model(self) -> None:
        cfg = self.cfg
        self.resolution = cfg.resolution or self.bundle.resolution
        if self.resolution % self.bundle.vae_scale_factor:
            raise UserError(f"--resolution {self.resolution} is not divisible by the VAE factor "
                            f"{self.bundle.vae_scale_factor}")
        schedule = int(self.bundle.noise_schedule["num_train_timesteps"])
        if cfg.puts and cfg.t_high > schedule:
            raise UserError(f"--t-high {cfg.t_high} is past the model's {schedule} training timesteps "
                            f"(PUTS draws t in [T_L, T_U) of 0..{schedule - 1})")

    def load_data(self) -> None:
        cfg = self.cfg
        self.files = list_images(cfg.images)
        self.captions = (_read_captions(cfg.captions, self.files, cfg.token) if cfg.captions
                         else [None] * len(self.files))
        self.placeholders = {cfg.token: cfg.num_vectors}
        self._prompt_cache: dict[str, tuple[np.ndarray, list]] = {}
        for text in {*cfg.templates, *(c for c in self.captions if c)}:
            self.prompt(text.format(cfg.token))
        images = np.stack([load_image(f, self.resolution, cfg.allow_upscale, cfg.max_image_pixels) for f in self.files])
        self.latents = encode_images(self.bundle, images, flip=cfg.flip)
        self.bundle.release("vae_encoder")  # training needs only the text encoder and the UNet

    def build_optimizer(self) -> None:
        cfg = self.cfg
        self.oracle = self.make_oracle()
        try:
            basis = pca_basis(cfg, self.token_table(), self.vocabulary())
        except ValueError as e:
            raise UserError(str(e)) from None
        self.rge = make_estimator(cfg, basis)
        size = cfg.num_vectors * self.bundle.embedding_dim
        top = size - 1 if cfg.split else size
        if cfg.directions == "sensitivity" and not 1 <= (cfg.rank or DEFAULT_RANK["sensitivity"]) <= top:
            raise UserError(f"--rank for sensitivity must be in [1, {top}] (the token's size"
                            + (" less one, with --split" if cfg.split else "") + f"), got {cfg.rank}")
        # eigenbasis steps: rotated from the start (by the identity until the sketch, or the checkpoint,
        # gives the basis), so the state has one layout before and after
        self.opt = make_optimizer(cfg, dim=size, basis=basis, rotation=np.eye(size) if cfg.eigenbasis_steps else None)
        self.sampler = puts(cfg.t_low, cfg.t_high) if cfg.puts else uniform(
            int(self.bundle.noise_schedule.get("num_train_timesteps", 1000)))

    # -- what a model family changes (zo_runtime/personalize_sdxl.py overrides these) ----------------
    def make_oracle(self):
        return LossOracle(self.bundle, self.cfg.batch_candidates)

    def token_table(self) -> np.ndarray:
        return self.bundle.token_table

    def vocabulary(self) -> np.ndarray | None:
        """The rows the model was trained on, for vocab-pca (``None``: the bundle does not say)."""
        return self.bundle.vocabulary_ids if self.cfg.directions == "vocab-pca" else None

    def init_row(self) -> np.ndarray:
        return np.asarray(self.bundle.token_table[self.init_id], np.float32)

    def conditioning(self, image_index: int) -> dict:
        """Extra keyword arguments of ``oracle.losses`` for reference image ``image_index``."""
        return {}

    def save_token(self, path: str, theta: np.ndarray, metadata: dict) -> None:
        save_embedding(path, self.cfg.token, theta, metadata, overwrite=self.cfg.overwrite)

    def check_run_dir(self) -> None:
        """A new run never takes over a directory that holds another run (without --overwrite)."""
        if not self.resuming and (self.run_dir / CHECKPOINT).exists() and not self.cfg.overwrite:
            raise UserError(f"run directory {self.run_dir} already holds a run; resume it with "
                            f"--resume {self.run_dir} or pass --overwrite")

    # -- state ------------------------------------------------------------------------------
    def fresh_state(self):
        row = self.init_row()
        theta = np.repeat(row[None], self.cfg.num_vectors, axis=0)
        rng = np.random.default_rng(self.cfg.seed)
        sampler_state, chain_state = self.init_state(theta)
        if self.cfg.directions in SKETCHED:
            values, basis = self.sketch(theta, rng)
            sampler_state = sampler_state._replace(basis=basis)
            if self.cfg.directions == "whitened":
                sampler_state = sampler_state._replace(values=values)
            if self.use_rotation(sampler_state):
                chain_state = self.opt.init(theta)
        return 0, theta, (sampler_state, chain_state), rng

    def use_rotation(self, sampler_state) -> bool:
        """With ``eigenbasis_steps``, rebuild the step rule in the sketched eigenbasis (the state keeps
        its shapes, so a checkpoint loads either way)."""
        if not self.cfg.eigenbasis_steps:
            return False
        self.opt = make_optimizer(self.cfg, dim=self.cfg.num_vectors * self.bundle.embedding_dim,
                                  rotation=sampler_state.basis)
        return True

    def sketch(self, theta, rng) -> tuple[np.ndarray, np.ndarray]:
        """The Gauss-Newton eigenvalues [V·d] and eigenbasis [V·d, V·d], strongest first: for ``sketch`` training samples
        drawn as steps draw them, the UNet output's Jacobian with respect to the token by forward
        differences along every axis (θ, then θ + μ·axis with the estimator's μ, a step's worth of
        candidates at a time, so the peak memory stays a step's), then :func:`optim.gauss_newton_eig`."""
        cfg = self.cfg
        size, chunk, mu = theta.size, self.rge.passes, self.rge.mu
        progress = Progress("sketch", total=cfg.sketch * (size + 1))
        jacobians = []
        try:
            for s in range(cfg.sketch):
                i, ids, slots, latent, noise, t = self.draw(rng)
                cands = np.repeat(theta.reshape(1, -1), size + 1, axis=0)
                cands[1 + np.arange(size), np.arange(size)] += np.float32(mu)
                res = []
                for a in range(0, size + 1, chunk):
                    part = cands[a:a + chunk].reshape(-1, *theta.shape)
                    res.append(self.oracle.residuals(part, ids, slots, latent, noise, t, **self.conditioning(i)))
                    progress.update(s * (size + 1) + a + len(part))
                flat = np.concatenate(res).reshape(size + 1, -1)
                jacobians.append(((flat[1:] - flat[0]) / mu).T)         # [N, V·d]
        finally:
            progress.close()
        return optim.gauss_newton_eig(jacobians)

    def draw(self, rng):
        """One training sample, as a step draws it: (image index, prompt ids, slots, latent, noise, t)."""
        cfg = self.cfg
        i, latent = self.latents.sample(rng)
        template = self.captions[i % len(self.files)] or cfg.templates[int(rng.integers(len(cfg.templates)))]
        ids, slots = self.prompt(template.format(cfg.token))
        noise = rng.standard_normal(latent.shape, dtype=np.float32)
        t = self.sampler(rng)
        return i, ids, slots, latent, noise, t

    def init_state(self, theta):
        """(direction sampler's state, the optimizer chain's state)."""
        return self.rge.sampler.init(theta), self.opt.init(theta)

    def snapshot(self, step: int, theta, opt_state, rng) -> dict:
        """Everything a checkpoint holds, copied now (the loop goes on changing the originals)."""
        flat = {f"opt/{k}": np.array(v) for k, v in optim.flatten_state(opt_state).items()}
        return dict(step=np.int64(step), theta=np.array(theta), rng=np.array(json.dumps(rng.bit_generator.state)),
                    forward_passes=np.int64(self.oracle.forward_passes), **flat)

    def write_checkpoint(self, snap: dict) -> None:
        write_npz(self.run_dir / CHECKPOINT, what="checkpoint", **snap)
        self.last_checkpoint = int(snap["step"])

    def save_checkpoint(self, step: int, theta, opt_state, rng) -> None:
        self.write_checkpoint(self.snapshot(step, theta, opt_state, rng))

    def load_checkpoint(self):
        path = self.run_dir / CHECKPOINT
        try:
            with np.load(path, allow_pickle=False) as z:
                flat = {k[4:]: z[k] for k in z.files if k.startswith("opt/")}
                rng = np.random.default_rng()
                rng.bit_generator.state = json.loads(str(z["rng"]))
                step, theta, passes = int(z["step"]), z["theta"].astype(np.float32), int(z["forward_passes"])
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
            raise UserError(f"checkpoint {path} is damaged ({type(e).__name__}: {e}); start the run again "
                            "without --resume") from None
        want = (self.cfg.num_vectors, self.bundle.embedding_dim)
        if theta.shape != want or not np.isfinite(theta).all() or not 0 <= step:
            raise UserError(f"checkpoint {path} does not match its run (theta {list(theta.shape)}, expected "
                            f"{list(want)}, finite); start the run again without --resume")
        if step > self.cfg.steps:
            raise UserError(f"the checkpoint is at step {step}, past --steps {self.cfg.steps}")
        try:
            state = optim.unflatten_state(flat, like=self.init_state(theta))
        except ValueError as e:
            raise UserError(f"{path}: {e} (was it written by another zo-edge version?)") from None
        self.oracle.forward_passes = passes
        self.last_checkpoint = step
        if self.cfg.directions == "sensitivity":
            self.use_rotation(state[0])
        return step, theta, state, rng

    def prompt(self, text: str):
        if text not in self._prompt_cache:
            ids, slots = self.tokenizer.encode_prompt(text, self.placeholders)
            if len(slots) != self.cfg.num_vectors * text.count(self.cfg.token) or not slots:
                raise UserError(f"the training prompt {text!r} does not fit the text encoder's "
                                f"{self.tokenizer.max_length} tokens with --num-vectors {self.cfg.num_vectors}; "
                                "use fewer vectors or shorter captions")
            self._prompt_cache[text] = (ids, slots)
        return self._prompt_cache[text]

    # -- the loop ----------------------------------------------------------------------------
    def step(self, theta, opt_state, rng):
        """One ZOODiP iteration -> (theta, opt_state, loss at θ, timestep, projected dims)."""
        i, ids, slots, latent, noise, t = self.draw(rng)
        sampler_state, chain_state = opt_state
        z = self.rge.directions(rng, theta.shape, sampler_state)
        losses = self.oracle.losses(self.rge.candidates(theta, z), ids, slots, latent, noise, t,
                                    **self.conditioning(i))
        if not np.all(np.isfinite(losses)):
            raise FloatingPointError(f"loss is {losses.tolist()} at timestep {t}")
        g = self.rge.estimate(losses, z)
        sampler_state = self.rge.sampler.update(sampler_state, g)
        updates, chain_state = self.opt.update(g, chain_state, theta)
        theta = optim.apply_updates(theta, updates)
        return theta, (sampler_state, chain_state), self.rge.loss_at_theta(losses), t, optim.projected_dims(chain_state)

    @staticmethod
    def answer(theta, opt_state) -> np.ndarray:
        """The run's token: the iterate average when the recipe averages, else the last iterate."""
        average = optim.averaged_params(opt_state[1])
        return theta if average is None else average

    def preview(self, step: int, theta: np.ndarray) -> None:
        """One image of the token so far, through the generate path, to run_dir/previews/."""
        from .pipeline import Pipeline, save_png

        prompt = self.cfg.templates[0].format(self.cfg.token)
        pipe = Pipeline(self.bundle, embeddings={self.cfg.token: theta})
        image = pipe(prompt, steps=20, seed=self.cfg.seed, height=self.latents.mean.shape[2] * self.bundle.vae_scale_factor,
                     width=self.latents.mean.shape[3] * self.bundle.vae_scale_factor, progress=False)[0]
        folder = self.run_dir / "previews"
        folder.mkdir(exist_ok=True)
        save_png(folder / f"step_{step:06d}.png", image, {"prompt": prompt, "step": step})

    def train(self, resume: bool = False, callback=None) -> Result:
        """Run to ``cfg.steps``. ``callback(step, theta)``, if given, is called after every step.

        The run directory is claimed for the whole run (:class:`RunLock`). A checkpoint holds a θ
        whose loss was seen finite: the state after step k is written once step k + 1 has evaluated
        L(θ_k); only the last step's θ, never evaluated, is checked to be finite instead."""
        lock = RunLock(self.run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the run directory {self.run_dir}: {e.strerror or e}") from None
        lock.acquire()
        try:
            self.resuming = resume
            self.check_run_dir()    # again, now that the directory is ours
            remove_stale_temp_files(self.run_dir)
            return self._train(resume, callback)
        finally:
            lock.release()

    def _write_config(self) -> None:
        cfg_dict = dataclasses.asdict(self.cfg)
        cfg_dict["templates"] = list(self.cfg.templates)
        cfg_dict["overwrite"] = False   # an --overwrite applies to the command that gave it, not to a resume
        write_text(self.run_dir / "config.json", json.dumps(cfg_dict, indent=2), what="run config")

    def _train(self, resume: bool, callback) -> Result:
        cfg = self.cfg
        log_path = self.run_dir / "log.jsonl"
        if resume:
            start, theta, opt_state, rng = self.load_checkpoint()
            # keep the log consistent with the checkpoint: drop lines written after it, and torn ones
            keep = read_log(log_path, start)
            write_text(log_path, "".join(line + "\n" for line in keep), what="run log")
            self._write_config()            # --out / --steps given to --resume hold for later resumes too
        else:
            start, theta, opt_state, rng = self.fresh_state()
            self._write_config()
            write_text(log_path, "", what="run log")
            self.save_checkpoint(0, theta, opt_state, rng)

        progress = Progress("personalize", total=cfg.steps, start=start)
        t0 = time.time()
        loss = float("nan")
        try:
            with open(log_path, "a") as log:
                pending = None
                for step in range(start + 1, cfg.steps + 1):
                    if step - 1 > start and (step - 1) % cfg.checkpoint_every == 0:
                        pending = self.snapshot(step - 1, theta, opt_state, rng)
                    try:
                        theta, opt_state, loss, t, dropped = self.step(theta, opt_state, rng)
                    except FloatingPointError as e:
                        raise UserError(f"stopping at step {step}: {e}; the last good checkpoint (step "
                                        f"{self.last_checkpoint}) in {self.run_dir} is intact") from None
                    if pending is not None:     # θ of the pending checkpoint just gave a finite loss
                        log.flush()
                        self.write_checkpoint(pending)
                        pending = None
                    log.write(json.dumps({"step": step, "loss": loss, "timestep": t, "projected_dims": dropped,
                                          "forward_passes": self.oracle.forward_passes,
                                          "wall_time": round(time.time() - t0, 3)}) + "\n")
                    progress.update(step, loss=loss)
                    if callback is not None:
                        callback(step, self.answer(theta, opt_state))
                    if cfg.preview_every and step % cfg.preview_every == 0:
                        self.preview(step, self.answer(theta, opt_state))
                    if step == cfg.steps:
                        if not np.isfinite(self.answer(theta, opt_state)).all():
                            raise UserError(f"θ is not finite after the last step; the last good checkpoint "
                                            f"(step {self.last_checkpoint}) in {self.run_dir} is intact")
                        log.flush()
                        self.save_checkpoint(step, theta, opt_state, rng)
        except OSError as e:
            raise UserError(f"cannot write to the run directory {self.run_dir}: {e.strerror or e}; the checkpoint "
                            f"of step {self.last_checkpoint} is intact (continue with --resume {self.run_dir})"
                            ) from None
        finally:
            progress.close()
        theta = self.answer(theta, opt_state)
        try:
            self.save_token(cfg.out, theta, {"zo_edge_steps": str(cfg.steps), "zo_edge_recipe": cfg.recipe})
        except UserError as e:
            raise UserError(f"{e}; the trained token is in {self.run_dir}: write it with zo-edge personalize "
                            f"--resume {self.run_dir} --out OTHER.safetensors") from None
        peak = peak_rss_mb()
        seconds = time.time() - t0
        print(f"done: {cfg.out} ({cfg.steps} steps, {self.oracle.forward_passes} UNet forward passes, "
              f"{seconds:.1f} s, peak RSS {peak:.0f} MB)", file=sys.stderr)
        return Result(theta=theta, out=cfg.out, run_dir=str(self.run_dir), steps=cfg.steps,
                      forward_passes=self.oracle.forward_passes, seconds=seconds, peak_rss_mb=peak,
                      final_loss=loss)


def personalize(cfg: PersonalizeConfig) -> Result:
    return Trainer(cfg).train()


def load_run_config(run_dir: str | Path) -> PersonalizeConfig:
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise UserError(f"run directory {str(run_dir)!r} does not exist")
    if not path.is_file():
        raise UserError(f"{run_dir} is not a personalize run directory (config.json and {CHECKPOINT} expected)")
    if not (run_dir / CHECKPOINT).is_file():
        raise UserError(f"{run_dir} holds no checkpoint: the run stopped before its first one; start it again "
                        "(the same command without --resume, with --run-dir pointing here)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        d["templates"] = tuple(d.get("templates", TEMPLATES))
        d.setdefault("recipe", "zoodip")  # runs from before recipes were the paper's algorithm
        for name, value in ADDED_FIELDS.items():
            d.setdefault(name, value)
        known = {f.name for f in dataclasses.fields(PersonalizeConfig)}
        cfg = PersonalizeConfig(**{k: v for k, v in d.items() if k in known})
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
        raise UserError(f"{path} is damaged ({e}); start the run again without --resume") from None
    cfg.check_types()
    return cfg


def resume(run_dir: str | Path, steps: int | None = None, out: str | None = None, overwrite: bool = False,
           provider: str | None = None, threads: int | None = None, low_memory: bool | None = None) -> Result:
    """Continue an interrupted run exactly where its last checkpoint left it. ``steps`` and ``out``
    replace the run's own (a finished run can so be extended, or its token written elsewhere);
    ``overwrite`` is this command's own: the first run's --overwrite does not carry over."""
    cfg = load_run_config(run_dir)
    cfg.run_dir = str(run_dir)
    cfg.overwrite = overwrite
    for name, value in (("steps", steps), ("out", out), ("provider", provider), ("threads", threads),
                        ("low_memory", low_memory)):
        if value is not None:
            setattr(cfg, name, value)
    return Trainer(cfg, resume=True).train(resume=True)
