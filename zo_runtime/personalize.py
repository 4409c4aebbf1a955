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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import optim
from .bundle import Bundle
from .data import encode_images, list_images, load_image
from .embeddings import save_embedding
from .errors import UserError
from .oracle import LossOracle
from .progress import Progress
from .sysinfo import peak_rss_mb
from .recipe import DEFAULT_RECIPE, DIRECTIONS, OPTIMIZERS, RECIPE_FIELDS, SCHEDULES, TEMPLATES, recipe_values, sg_tau_for
from .timesteps import puts, uniform
from .tokenizer import CLIPTokenizer

CHECKPOINT = "checkpoint.npz"


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
    directions: str | None = None       # gaussian, orthogonal, guided, token-pca
    rank: int | None = None             # token-pca: subspace rank; guided: estimates kept (0: the default)
    guided_alpha: float | None = None   # guided: share of isotropic directions
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
    batch_candidates: str = "auto"
    seed: int = 0
    checkpoint_every: int = 100
    preview_every: int = 0              # >0: a preview image through the generate path every K steps
    captions: str | None = None         # optional file: "<image file>\t<caption with {}>" per line
    flip: bool = True
    allow_upscale: bool = True
    provider: str = "cpu"
    threads: int = 0
    overwrite: bool = False
    templates: tuple = field(default=TEMPLATES)

    def resolved(self) -> "PersonalizeConfig":
        """A copy with every recipe field that is None taken from ``recipe``."""
        values = recipe_values(self.recipe)
        return dataclasses.replace(self, **{k: values[k] for k in RECIPE_FIELDS if getattr(self, k) is None})

    def validate(self) -> None:
        """Checks the run's own settings; the estimator's and step rule's hyper-parameters are checked
        where they are built (``zo_runtime.optim``), by building them once here."""
        cfg = self.resolved()
        if cfg.puts and not 0 <= cfg.t_low < cfg.t_high:
            raise UserError(f"PUTS needs 0 <= T_L < T_U, got T_L={cfg.t_low}, T_U={cfg.t_high}")
        for name, value, allowed in (("--directions", cfg.directions, DIRECTIONS), ("--optimizer", cfg.optimizer, OPTIMIZERS),
                                     ("--schedule", cfg.schedule, SCHEDULES)):
            if value not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if cfg.rank < 0:
            raise UserError(f"--rank must be >= 0, got {cfg.rank}")
        if self.steps < 1:
            raise UserError(f"--steps must be >= 1, got {self.steps}")
        if self.num_vectors < 1:
            raise UserError(f"--num-vectors must be >= 1, got {self.num_vectors}")
        if self.checkpoint_every < 1:
            raise UserError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise UserError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        if self.batch_candidates not in ("auto", "on", "off"):
            raise UserError(f"--batch-candidates must be auto, on or off, got {self.batch_candidates!r}")
        if not self.templates:
            raise UserError("no training prompt templates")
        try:
            make_optimizer(dataclasses.replace(cfg, sg=True), dim=1)  # every given value, in use or not
            make_estimator(cfg)
            optim.guided(k=cfg.rank or 4, alpha=cfg.guided_alpha)
        except ValueError as e:
            raise UserError(str(e)) from None


def default_run_dir(token: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", token).strip("-") or "token"
    return str(Path("runs") / name)


def make_optimizer(cfg: PersonalizeConfig, dim: int) -> optim.GradientTransformation:
    """(SG) → (the reference's scaling) → ZO-Adam or ZO-SGD with a constant or cosine learning rate.
    ``cfg`` resolved; ``dim``: the token's size (for the reference scaling)."""
    parts = []
    if cfg.sg:
        parts.append(optim.subspace_gradient(tau=cfg.tau, nu=cfg.nu))
    if cfg.reference_scaling:
        parts.append(optim.scale(optim.reference_scale(dim, cfg.n)))
    lr = cfg.lr if cfg.schedule == "constant" else optim.cosine_decay_schedule(cfg.lr, cfg.steps, alpha=0.1)
    if cfg.optimizer == "adam":
        parts += [optim.scale_by_adam(b1=cfg.b1, eps=cfg.adam_eps), optim.scale_by_learning_rate(lr)]
    else:
        parts.append(optim.sgd(lr))
    return optim.chain(*parts)


def make_estimator(cfg: PersonalizeConfig, table=None) -> optim.RGE:
    """RGE with the recipe's directions. ``table``: the token table (token-pca only); ``cfg`` resolved."""
    if cfg.directions == "orthogonal":
        sampler = optim.orthogonal()
    elif cfg.directions == "guided":
        sampler = optim.guided(k=cfg.rank or 4, alpha=cfg.guided_alpha)
    elif cfg.directions == "token-pca":
        if table is None:  # validation only: check the rank against the width later, with the bundle
            sampler = optim.gaussian()
        else:
            if not 1 <= (cfg.rank or 16) <= table.shape[1]:
                raise ValueError(f"--rank must be in [1, d={table.shape[1]}] for token-pca, got {cfg.rank}")
            sampler = optim.subspace(optim.token_pca_basis(table, cfg.rank or 16))
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


def _atomic_savez(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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

    def __init__(self, cfg: PersonalizeConfig, resume: bool = False):
        cfg.validate()
        cfg = self.cfg = cfg.resolved()
        self.run_dir = Path(cfg.run_dir or default_run_dir(cfg.token))
        out = Path(cfg.out)
        if not resume:
            if out.exists() and not cfg.overwrite:
                raise UserError(f"output {cfg.out} exists; pass --overwrite to replace it")
            if (self.run_dir / CHECKPOINT).exists() and not cfg.overwrite:
                raise UserError(f"run directory {self.run_dir} already holds a run; resume it with "
                                f"--resume {self.run_dir} or pass --overwrite")
        self.bundle = Bundle.load(cfg.model, provider=cfg.provider, threads=cfg.threads)
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
        self.tokenizer = CLIPTokenizer.from_pretrained(self.bundle.tokenizer_dir)
        if self.tokenizer.is_in_vocab(cfg.token):
            raise UserError(f"placeholder {cfg.token!r} is already a token of the vocabulary; "
                            "choose a new string such as <my-thing>")
        init_id = self.tokenizer.single_token_id(cfg.init)
        if init_id is None:
            raise UserError(f"init word {cfg.init!r} is not a single token of the vocabulary; "
                            "choose a one-token word (e.g. dog, toy, star)")
        self.init_id = init_id

        res = cfg.resolution or self.bundle.resolution
        if res % self.bundle.vae_scale_factor:
            raise UserError(f"--resolution {res} is not divisible by the VAE factor {self.bundle.vae_scale_factor}")
        self.files = list_images(cfg.images)
        images = np.stack([load_image(f, res, cfg.allow_upscale) for f in self.files])
        self.captions = (_read_captions(cfg.captions, self.files, cfg.token) if cfg.captions
                         else [None] * len(self.files))
        self.latents = encode_images(self.bundle, images, flip=cfg.flip)
        self.bundle.release("vae_encoder")  # training needs only the text encoder and the UNet

        self.oracle = LossOracle(self.bundle, cfg.batch_candidates)
        try:
            self.rge = make_estimator(cfg, table=self.bundle.token_table)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.opt = make_optimizer(cfg, dim=cfg.num_vectors * d)
        self.sampler = puts(cfg.t_low, cfg.t_high) if cfg.puts else uniform(
            int(self.bundle.noise_schedule.get("num_train_timesteps", 1000)))
        self.placeholders = {cfg.token: cfg.num_vectors}
        self._prompt_cache: dict[str, tuple[np.ndarray, list]] = {}

    # -- state ------------------------------------------------------------------------------
    def fresh_state(self):
        row = np.asarray(self.bundle.token_table[self.init_id], np.float32)
        theta = np.repeat(row[None], self.cfg.num_vectors, axis=0)
        return 0, theta, self.init_state(theta), np.random.default_rng(self.cfg.seed)

    def init_state(self, theta):
        """(direction sampler's state, the optimizer chain's state)."""
        return self.rge.sampler.init(theta), self.opt.init(theta)

    def save_checkpoint(self, step: int, theta, opt_state, rng) -> None:
        flat = {f"opt/{k}": v for k, v in optim.flatten_state(opt_state).items()}
        _atomic_savez(self.run_dir / CHECKPOINT, step=np.int64(step), theta=theta,
                      rng=np.array(json.dumps(rng.bit_generator.state)),
                      forward_passes=np.int64(self.oracle.forward_passes), **flat)

    def load_checkpoint(self):
        path = self.run_dir / CHECKPOINT
        with np.load(path, allow_pickle=False) as z:
            flat = {k[4:]: z[k] for k in z.files if k.startswith("opt/")}
            rng = np.random.default_rng()
            rng.bit_generator.state = json.loads(str(z["rng"]))
            self.oracle.forward_passes = int(z["forward_passes"])
            theta = z["theta"].astype(np.float32)
            try:
                state = optim.unflatten_state(flat, like=self.init_state(theta))
            except ValueError as e:
                raise UserError(f"{path}: {e} (was it written by another zo-edge version?)") from None
            return int(z["step"]), theta, state, rng

    def prompt(self, text: str):
        if text not in self._prompt_cache:
            ids, slots = self.tokenizer.encode_prompt(text, self.placeholders)
            if not slots:
                raise UserError(f"prompt {text!r} lost the placeholder (truncated?)")
            self._prompt_cache[text] = (ids, slots)
        return self._prompt_cache[text]

    # -- the loop ----------------------------------------------------------------------------
    def step(self, theta, opt_state, rng):
        """One ZOODiP iteration -> (theta, opt_state, loss at θ, timestep, projected dims)."""
        cfg = self.cfg
        i, latent = self.latents.sample(rng)
        template = self.captions[i % len(self.files)] or cfg.templates[int(rng.integers(len(cfg.templates)))]
        ids, slots = self.prompt(template.format(cfg.token))
        noise = rng.standard_normal(latent.shape, dtype=np.float32)
        t = self.sampler(rng)
        sampler_state, chain_state = opt_state
        z = self.rge.directions(rng, theta.shape, sampler_state)
        losses = self.oracle.losses(self.rge.candidates(theta, z), ids, slots, latent, noise, t)
        if not np.all(np.isfinite(losses)):
            raise FloatingPointError(f"loss is {losses.tolist()} at timestep {t}")
        g = self.rge.estimate(losses, z)
        sampler_state = self.rge.sampler.update(sampler_state, g)
        updates, chain_state = self.opt.update(g, chain_state, theta)
        theta = optim.apply_updates(theta, updates)
        return theta, (sampler_state, chain_state), self.rge.loss_at_theta(losses), t, optim.projected_dims(chain_state)

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
        """Run to ``cfg.steps``. ``callback(step, theta)``, if given, is called after every step."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.run_dir / "log.jsonl"
        if resume:
            start, theta, opt_state, rng = self.load_checkpoint()
            # keep the log consistent with the checkpoint: drop lines written after it
            if log_path.exists():
                keep = [l for l in log_path.read_text().splitlines() if l and json.loads(l)["step"] <= start]
                _atomic_write_text(log_path, "".join(l + "\n" for l in keep))
        else:
            start, theta, opt_state, rng = self.fresh_state()
            cfg_dict = dataclasses.asdict(cfg)
            cfg_dict["templates"] = list(cfg.templates)
            _atomic_write_text(self.run_dir / "config.json", json.dumps(cfg_dict, indent=2))
            if log_path.exists():
                log_path.unlink()
            self.save_checkpoint(0, theta, opt_state, rng)

        progress = Progress("personalize", total=cfg.steps, start=start)
        t0 = time.time()
        loss = float("nan")
        with open(log_path, "a") as log:
            for step in range(start + 1, cfg.steps + 1):
                try:
                    theta, opt_state, loss, t, dropped = self.step(theta, opt_state, rng)
                except FloatingPointError as e:
                    progress.close()
                    raise UserError(f"stopping at step {step}: {e}; the last good checkpoint in "
                                    f"{self.run_dir} is intact") from None
                log.write(json.dumps({"step": step, "loss": loss, "timestep": t, "projected_dims": dropped,
                                      "forward_passes": self.oracle.forward_passes,
                                      "wall_time": round(time.time() - t0, 3)}) + "\n")
                progress.update(step, loss=loss)
                if callback is not None:
                    callback(step, theta)
                if cfg.preview_every and step % cfg.preview_every == 0:
                    self.preview(step, theta)
                if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    log.flush()
                    self.save_checkpoint(step, theta, opt_state, rng)
        progress.close()
        save_embedding(cfg.out, cfg.token, theta, {"zo_edge_steps": str(cfg.steps), "zo_edge_recipe": cfg.recipe})
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
    path = Path(run_dir) / "config.json"
    if not path.is_file() or not (Path(run_dir) / CHECKPOINT).is_file():
        raise UserError(f"{run_dir} is not a personalize run directory (config.json and {CHECKPOINT} expected)")
    d = json.loads(path.read_text())
    d["templates"] = tuple(d.get("templates", TEMPLATES))
    d.setdefault("recipe", "zoodip")  # runs from before recipes were the paper's algorithm
    known = {f.name for f in dataclasses.fields(PersonalizeConfig)}
    return PersonalizeConfig(**{k: v for k, v in d.items() if k in known})


def resume(run_dir: str | Path, steps: int | None = None) -> Result:
    """Continue an interrupted run exactly where its last checkpoint left it."""
    cfg = load_run_config(run_dir)
    cfg.run_dir = str(run_dir)
    if steps is not None:
        cfg.steps = steps
    return Trainer(cfg, resume=True).train(resume=True)
