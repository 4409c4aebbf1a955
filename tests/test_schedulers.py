"""Parity of zo_runtime.schedulers (NumPy) with diffusers' schedulers (torch).

Every sampling test runs the same loop in both implementations, each on its own trajectory, with the same
deterministic stand-in for the UNet, and checks the timesteps (exactly equal), init_noise_sigma and every step's
UNet input and prev_sample. Tolerance: elementwise ``|ours - diffusers| <= ATOL + RTOL * |diffusers|`` with
ATOL = RTOL = 1e-5 (``np.testing.assert_allclose``). diffusers computes in float32 with a float32 noise schedule;
ours in float64, so part of this budget is diffusers' own rounding.

Two places where diffusers' float32 rounding alone exceeds 1e-5, handled explicitly below:
- ``rescale_betas_zero_snr``: diffusers' float32 rescale cancels digits (alpha_bar off by up to 2e-4 relative), so
  the reference runs diffusers' own rescale function in float64 (fixture ``precise_zero_snr``).
- Euler / Euler ancestral on the zero-SNR config start at sigma = 4096: the first step subtracts numbers of
  magnitude ~1e4 whose float32 ulp is ~1e-3. There (``zero_snr=True``) ATOL grows to 4 float32 ulps of the step's
  input magnitude, and each step starts from diffusers' previous sample, so diffusers' rounding is not carried
  along our trajectory (per-step parity instead of trajectory parity).
- Euler with Karras sigmas: the fractional timesteps come from log-sigma interpolation on diffusers' float32
  sigmas; they are compared with rtol 1e-4 instead of exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, PNDMScheduler)

import zo_runtime.schedulers as zs  # noqa: E402
from zo_runtime.errors import UserError  # noqa: E402
from zo_runtime.schedulers import common  # noqa: E402

torch.set_num_threads(1)
# diffusers' own numpy-2 / deprecation noise
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers", "ignore::FutureWarning:diffusers")

RESCALING_MODULES = ["scheduling_ddim", "scheduling_ddpm", "scheduling_euler_discrete",
                     "scheduling_euler_ancestral_discrete", "scheduling_dpmsolver_multistep"]


@pytest.fixture(autouse=True)
def precise_zero_snr(monkeypatch):
    """Run diffusers' rescale_zero_terminal_snr in float64 (then back to float32, as diffusers stores betas)."""
    import importlib

    for name in RESCALING_MODULES:
        module = importlib.import_module(f"diffusers.schedulers.{name}")
        original = module.rescale_zero_terminal_snr
        monkeypatch.setattr(module, "rescale_zero_terminal_snr",
                            lambda betas, original=original: original(betas.double()).float())

RTOL = ATOL = 1e-5
SHAPE = (2, 4, 8, 8)

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
SD15 = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json (768 px, v-prediction)
SD2V = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}
# zero-terminal-SNR fine-tune style: trailing spacing, rescaled betas
ZSNR = {**SD2V, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}
# cosine schedule, DDIM's clip_sample default (True), set_alpha_to_one True. Leading spacing: the cosine schedule's
# alpha_bar at t=999 is ~1e-5 (beta capped at 0.999), too ill-conditioned for a float32 reference.
COSINE = {"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "leading",
          "set_alpha_to_one": True}

CONFIGS = {"sd15": SD15, "sd2v": SD2V, "zsnr": ZSNR, "cosine": COSINE}

DIFFUSERS = {
    "ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler, "dpm++2m": DPMSolverMultistepScheduler,
}


def fake_unet(x: np.ndarray, t) -> np.ndarray:
    """Deterministic stand-in for the UNet: a smooth function of the (scaled) input and the timestep."""
    t = float(t)
    x = np.asarray(x, dtype=np.float32)
    return (np.tanh(0.5 * x) * np.cos(t / 300.0) + 0.1 * np.sin(3.0 * x + t / 100.0)).astype(np.float32)


def close(ours, ref, what: str, atol: float = ATOL) -> None:
    ref = ref.numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    assert ours.dtype == np.float32, f"{what}: dtype {ours.dtype}"
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=atol, err_msg=what)


def make_pair(name: str, config: dict, **overrides):
    """(ours, diffusers') for scheduler `name`, both built from `config` the diffusers way."""
    ours = zs.scheduler_class(name).from_config(config, **overrides)
    ref = DIFFUSERS[name].from_config(config, **overrides)
    return ours, ref


class NoiseFeed:
    """Stands in for diffusers' randn_tensor: hands out pre-drawn noise, in order."""

    def __init__(self, noises: list[np.ndarray]):
        self.noises = list(noises)
        self.used = 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        noise = self.noises[self.used]
        self.used += 1
        assert tuple(shape) == noise.shape
        return torch.from_numpy(noise.copy())


def run_loop(ours, ref, steps: int, noises: list[np.ndarray] | None = None, ddim_eta: float = 0.0,
             what: str = "", exact_timesteps: bool = True, zero_snr: bool = False) -> np.ndarray:
    """Sample with both schedulers from the same initial noise; compare timesteps, init_noise_sigma and every
    step's UNet input and prev_sample. Returns our final sample."""
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    ref_t = ref.timesteps.numpy()
    assert ours.timesteps.dtype == ref_t.dtype, f"{what}: timesteps dtype"
    if exact_timesteps:
        np.testing.assert_array_equal(ours.timesteps, ref_t, err_msg=f"{what}: timesteps")
    else:
        np.testing.assert_allclose(ours.timesteps, ref_t, rtol=1e-4, atol=1e-4, err_msg=f"{what}: timesteps")
    assert isinstance(ours.init_noise_sigma, float)
    np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-6,
                               err_msg=f"{what}: init_noise_sigma")

    latents = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    x = (latents * ours.init_noise_sigma).astype(np.float32)
    xr = torch.from_numpy(latents) * ref.init_noise_sigma
    for i, (t, tr) in enumerate(zip(ours.timesteps, ref.timesteps)):
        inp = ours.scale_model_input(x, t)
        inp_ref = ref.scale_model_input(xr, tr)
        close(inp, inp_ref, f"{what}: scale_model_input at step {i} (t={t})")
        noise = noises[i] if noises is not None else None
        atol = max(ATOL, 4 * np.finfo(np.float32).eps * float(np.abs(x).max())) if zero_snr else ATOL
        x = ours.step(fake_unet(inp, t), t, x, noise=noise)
        kwargs = {}
        if ddim_eta:
            kwargs = {"eta": ddim_eta, "variance_noise": torch.from_numpy(noise)}
        xr = ref.step(torch.from_numpy(fake_unet(inp_ref.numpy(), tr)), tr, xr, **kwargs).prev_sample
        close(x, xr, f"{what}: prev_sample at step {i} (t={t})", atol)
        if zero_snr:
            x = xr.numpy().copy()
    assert np.isfinite(x).all()
    return x


# --------------------------------------------------------------------------------------------------------------------
# Sampling parity
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", ["ddim", "pndm", "euler", "dpm++2m"])
def test_deterministic_sampling_matches_diffusers(name, config, steps):
    ours, ref = make_pair(name, CONFIGS[config])
    run_loop(ours, ref, steps, what=f"{name}/{config}/{steps}", zero_snr=config == "zsnr" and name == "euler")


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_euler_ancestral_matches_diffusers_with_injected_noise(config, steps, monkeypatch):
    ours, ref = make_pair("euler_a", CONFIGS[config])
    rng = np.random.default_rng(1)
    noises = [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(steps)]
    feed = NoiseFeed(noises)
    monkeypatch.setattr("diffusers.schedulers.scheduling_euler_ancestral_discrete.randn_tensor", feed)
    run_loop(ours, ref, steps, noises=noises, what=f"euler_a/{config}/{steps}", zero_snr=config == "zsnr")
    assert feed.used == steps


@pytest.mark.parametrize("config", ["sd15", "sd2v"])
def test_ddim_eta_matches_diffusers_with_injected_noise(config):
    steps = 10
    ours, ref = make_pair("ddim", CONFIGS[config])
    ours.eta = 0.7
    rng = np.random.default_rng(2)
    noises = [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(steps)]
    run_loop(ours, ref, steps, noises=noises, ddim_eta=0.7, what=f"ddim eta/{config}")


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_pndm_prk_matches_diffusers(spacing):
    config = {**SD15, "skip_prk_steps": False, "timestep_spacing": spacing}
    ours, ref = make_pair("pndm", config)
    run_loop(ours, ref, 10, what=f"pndm prk/{spacing}")
    assert len(ours.timesteps) == 10 + 9


@pytest.mark.parametrize("name,overrides", [
    ("euler", {"use_karras_sigmas": True}),
    ("euler", {"final_sigmas_type": "sigma_min", "timestep_spacing": "leading"}),
    ("dpm++2m", {"use_karras_sigmas": True}),
    ("dpm++2m", {"solver_order": 3}),
    ("dpm++2m", {"solver_type": "heun", "lower_order_final": False}),
    ("dpm++2m", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    ("dpm++2m", {"timestep_spacing": "leading"}),
    ("dpm++2m", {"thresholding": True, "sample_max_value": 1.5, "prediction_type": "sample"}),
    ("ddim", {"timestep_spacing": "linspace"}),
    ("pndm", {"timestep_spacing": "linspace"}),
    ("pndm", {"timestep_spacing": "trailing"}),
    ("ddim", {"thresholding": True, "sample_max_value": 1.5}),
    ("ddim", {"prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.8}),
    ("euler", {"prediction_type": "sample"}),
])
@pytest.mark.parametrize("steps", [8, 20])
def test_options_match_diffusers(name, overrides, steps):
    ours, ref = make_pair(name, SD15, **overrides)
    exact = not (name == "euler" and overrides.get("use_karras_sigmas"))  # fractional timesteps (see top)
    run_loop(ours, ref, steps, what=f"{name} {overrides} {steps}", exact_timesteps=exact)


def test_trained_betas():
    betas = np.linspace(0.0002, 0.015, 1000) ** 1.1
    config = {**SD15, "trained_betas": betas.tolist()}
    np.testing.assert_allclose(common.betas_from_config(config), betas)
    for name in ("ddim", "euler", "dpm++2m"):
        ours, ref = make_pair(name, config)
        run_loop(ours, ref, 10, what=f"{name} trained_betas")


@pytest.mark.parametrize("config", list(CONFIGS))
def test_schedule_matches_diffusers(config):
    cfg = CONFIGS[config]
    ref = DDIMScheduler.from_config(cfg)
    betas = common.betas_from_config(cfg)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    np.testing.assert_allclose(betas, ref.betas.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(common.alphas_cumprod(cfg), ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------------------------
# Config handling (the diffusers `from_config` rules)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(zs.SCHEDULERS))
@pytest.mark.parametrize("config", ["sd15", "sd2v"])
def test_reused_config_like_diffusers(name, config):
    """load_scheduler(config, name) == XScheduler.from_config(source_scheduler.config), including a config that
    diffusers has filled with the source class's defaults (`_use_default_values`)."""
    source = getattr(diffusers, CONFIGS[config]["_class_name"]).from_config(CONFIGS[config])
    filled = dict(source.config)
    assert filled.get("_use_default_values")
    for cfg in (CONFIGS[config], filled):
        ours = zs.load_scheduler(cfg, name)
        ref = DIFFUSERS[name].from_config(cfg)
        for key, value in ours.config.items():
            ref_value = ref.config[key]
            assert value == ref_value or (value is None and ref_value is None), (name, key, value, ref_value)
        ours.set_timesteps(25)
        ref.set_timesteps(25)
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())


def test_load_scheduler_by_class_name_and_path(tmp_path):
    assert isinstance(zs.load_scheduler(SD15), zs.PNDMScheduler)
    assert isinstance(zs.load_scheduler(SD2V), zs.DDIMScheduler)
    assert isinstance(zs.load_scheduler(SD15, "EulerDiscreteScheduler"), zs.EulerDiscreteScheduler)
    assert isinstance(zs.load_scheduler(SD15, "DPM++2M"), zs.DPMSolverMultistepScheduler)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD2V))
    for where in (tmp_path, tmp_path / "scheduler", tmp_path / "scheduler" / "scheduler_config.json",
                  str(tmp_path)):
        sched = zs.load_scheduler(where, "euler_a")
        assert isinstance(sched, zs.EulerAncestralDiscreteScheduler)
        assert sched.config["prediction_type"] == "v_prediction"
    for cls_name, cls in zs.DIFFUSERS_CLASSES.items():
        assert zs.from_diffusers_class(cls_name) is cls
        assert cls.__name__ == cls_name == DIFFUSERS[cls.name].__name__


def one_line_user_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("bad", ["lms", "heun", "", "DDPMScheduler"])
def test_unknown_scheduler_name(bad):
    with pytest.raises(UserError) as e:
        zs.load_scheduler(SD15, bad)
    assert "ddim" in one_line_user_error(e)


@pytest.mark.parametrize("cls_name", ["LMSDiscreteScheduler", "DDPMScheduler", "UniPCMultistepScheduler"])
def test_unsupported_diffusers_class(cls_name):
    with pytest.raises(UserError) as e:
        zs.from_diffusers_class(cls_name)
    assert cls_name in one_line_user_error(e)
    with pytest.raises(UserError):
        zs.load_scheduler({**SD15, "_class_name": cls_name})
    assert isinstance(zs.load_scheduler({**SD15, "_class_name": cls_name}, "euler"), zs.EulerDiscreteScheduler)


@pytest.mark.parametrize("name", list(zs.SCHEDULERS))
@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True, "10"])
def test_bad_step_counts(name, steps):
    sched = zs.load_scheduler(SD15, name)
    with pytest.raises(UserError) as e:
        sched.set_timesteps(steps)
    one_line_user_error(e)


@pytest.mark.parametrize("cfg", [
    {"beta_schedule": "cubic"},
    {"prediction_type": "flow"},
    {"timestep_spacing": "uniform"},
])
@pytest.mark.parametrize("name", list(zs.SCHEDULERS))
def test_bad_config_values(name, cfg):
    with pytest.raises(UserError) as e:
        zs.load_scheduler({**SD15, **cfg}, name)
    one_line_user_error(e)


def test_bad_config_files(tmp_path):
    with pytest.raises(UserError):
        zs.load_scheduler(tmp_path)
    with pytest.raises(UserError):
        zs.load_scheduler(tmp_path / "missing.json")
    (tmp_path / "scheduler_config.json").write_text("{not json")
    with pytest.raises(UserError):
        zs.load_scheduler(tmp_path)
    with pytest.raises(UserError):
        zs.load_scheduler({"beta_schedule": "linear"})  # no _class_name and no name


def test_single_step_and_step_before_set_timesteps():
    for name in zs.SCHEDULERS:
        sched = zs.load_scheduler(SD15, name)
        with pytest.raises(RuntimeError):
            sched.step(np.zeros(SHAPE, np.float32), 981, np.zeros(SHAPE, np.float32))
        sched.set_timesteps(1)
        ref = DIFFUSERS[name].from_config(SD15)
        ref.set_timesteps(1)
        np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())


@pytest.mark.parametrize("name", list(zs.SCHEDULERS))
def test_set_timesteps_resets_state(name):
    """A second loop on the same scheduler (after set_timesteps) gives the same result: history/step index reset."""
    sched = zs.load_scheduler(SD15, name)

    def sample(steps):
        sched.set_timesteps(steps)
        x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32) * sched.init_noise_sigma
        noise = np.random.default_rng(1)
        for t in sched.timesteps:
            x = sched.step(fake_unet(sched.scale_model_input(x, t), t), t, x, rng=noise)
        return x

    first = sample(12)
    sample(7)
    np.testing.assert_array_equal(sample(12), first)


def test_from_diffusers_frozen_config():
    """A live diffusers scheduler's .config (a FrozenDict with _use_default_values) works as the config."""
    source = PNDMScheduler.from_config(SD15)
    for name in zs.SCHEDULERS:
        ours, ref = zs.load_scheduler(source.config, name), DIFFUSERS[name].from_config(source.config)
        ours.set_timesteps(20)
        ref.set_timesteps(20)
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    assert isinstance(zs.load_scheduler(source.config), zs.PNDMScheduler)


# --------------------------------------------------------------------------------------------------------------------
# Noise sources
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["euler_a", "ddim"])
def test_rng_is_noise_from_standard_normal_float32(name):
    """step(rng=g) draws g.standard_normal(shape, dtype=float32) once per step."""
    def sample(**noise_source):
        sched = zs.load_scheduler(SD15, name)
        sched.eta = 1.0  # only DDIM reads it
        sched.set_timesteps(6)
        x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32) * sched.init_noise_sigma
        gen = np.random.default_rng(5)
        for t in sched.timesteps:
            out = fake_unet(sched.scale_model_input(x, t), t)
            if noise_source.get("rng"):
                x = sched.step(out, t, x, rng=noise_source["rng"])
            else:
                x = sched.step(out, t, x, noise=gen.standard_normal(SHAPE, dtype=np.float32))
        return x

    a = sample(rng=np.random.default_rng(5))
    b = sample()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, sample(rng=np.random.default_rng(6)))


def test_ddim_eta_from_config_and_step_override():
    a, _ = make_pair("ddim", SD15)
    b = zs.DDIMScheduler.from_config(SD15, eta=0.5)
    assert b.eta == 0.5 and a.eta == 0.0
    for s in (a, b):
        s.set_timesteps(5)
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    noise = np.random.default_rng(1).standard_normal(SHAPE, dtype=np.float32)
    t = a.timesteps[0]
    np.testing.assert_array_equal(a.step(fake_unet(x, t), t, x, noise=noise, eta=0.5),
                                  b.step(fake_unet(x, t), t, x, noise=noise))
    with pytest.raises(ValueError):
        b.step(fake_unet(x, t), t, x, noise=noise, rng=np.random.default_rng(0))


# --------------------------------------------------------------------------------------------------------------------
# Training helpers
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
def test_add_noise_velocity_and_targets_match_ddpm(config):
    cfg = CONFIGS[config]
    ddpm = DDPMScheduler.from_config(cfg)
    ac = common.alphas_cumprod(cfg)
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal(SHAPE, dtype=np.float32)
    noise = rng.standard_normal(SHAPE, dtype=np.float32)
    for t in (np.array([0, 999]), np.array([17, 500]), np.array([981, 981])):
        tt = torch.from_numpy(t)
        noisy = common.add_noise(x0, noise, t, ac)
        v = common.velocity(x0, noise, t, ac)
        close(noisy, ddpm.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt), f"add_noise t={t}")
        close(v, ddpm.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt), f"velocity t={t}")
        np.testing.assert_array_equal(common.training_target(x0, noise, t, ac, "v_prediction"), v)
        np.testing.assert_array_equal(common.training_target(x0, noise, t, ac, "epsilon"), noise)
        np.testing.assert_array_equal(common.training_target(x0, noise, t, ac, "sample"), x0)
    # a scalar t broadcasts over the batch; float64 inputs stay float64
    np.testing.assert_array_equal(common.add_noise(x0, noise, 500, ac),
                                  common.add_noise(x0, noise, np.array([500, 500]), ac))
    assert common.add_noise(x0.astype(np.float64), noise, np.array([1, 2]), ac).dtype == np.float64
    with pytest.raises(UserError):
        common.training_target(x0, noise, t, ac, "flow")


def test_import_is_torch_free():
    code = "import zo_runtime.schedulers, sys; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
