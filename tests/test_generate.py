"""zo-edge generate: parity with diffusers' StableDiffusionPipeline on the same tiny model, learned
tokens that load in diffusers and move its output the same way, PNG metadata, bad input."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from zo_edge.cli.main import main as cli
from zo_runtime.bundle import Bundle
from zo_runtime.embeddings import save_embedding
from zo_runtime.pipeline import Pipeline

# Tolerance, in 0-255 pixel units: ORT and PyTorch kernels differ by ~1e-6 per op; through 10
# guided denoising steps and the VAE decoder the images agree to well under one grey level on
# average. A wrong scheduler, wrong guidance or a missing scaling factor gives tens of levels.
MEAN_ABS_TOL = 0.5


def diffusers_images(src, prompt, latents, steps, guidance, scheduler=None, embedding=None, token=None,
                     output_type="np", **scheduler_kwargs):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config, **scheduler_kwargs)
    if embedding is not None:
        pipe.load_textual_inversion(embedding, token=token)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, latents=torch.from_numpy(latents), num_inference_steps=steps, guidance_scale=guidance,
               output_type=output_type, height=latents.shape[2] * 2, width=latents.shape[3] * 2)
    if output_type == "latent":
        return out.images.numpy()
    return (out.images * 255).round().astype(np.uint8)


def start_latents(bundle, n=1, seed=0):
    h = bundle.resolution // bundle.vae_scale_factor
    return np.random.default_rng(seed).standard_normal((n, bundle.latent_channels, h, h)).astype(np.float32)


@pytest.mark.parametrize("scheduler", [None, "euler", "dpm++2m"])
def test_matches_diffusers(tiny_sd1_dir, tiny_bundle_fp32, scheduler):
    import diffusers

    classes = {None: None, "euler": diffusers.EulerDiscreteScheduler, "dpm++2m": diffusers.DPMSolverMultistepScheduler}
    b = Bundle.load(tiny_bundle_fp32)
    lat = start_latents(b)
    ours = Pipeline(b, scheduler=scheduler)("a red star on a grass background", steps=10, guidance=7.5,
                                            latents=lat, progress=False)
    theirs = diffusers_images(tiny_sd1_dir, "a red star on a grass background", lat, 10, 7.5, classes[scheduler])
    assert ours.shape == theirs.shape
    diff = np.abs(ours.astype(float) - theirs.astype(float))
    assert diff.mean() <= MEAN_ABS_TOL, diff.mean()


@pytest.mark.parametrize("option", [dict(use_karras_sigmas=True), dict(timestep_spacing="linspace")])
def test_euler_fractional_timesteps_match_diffusers(tiny_sd1_dir, tiny_bundle_fp32, option):
    """Karras sigmas and linspace spacing give Euler fractional timesteps; the UNet takes them as floats
    (truncated to integers, the final latents differ from diffusers' by a relative L2 of 2e-4 with Karras sigmas;
    fed as floats, 1e-6)."""
    import diffusers

    b = Bundle.load(tiny_bundle_fp32)
    lat = start_latents(b, seed=2)
    pipe = Pipeline(b, scheduler="euler")
    pipe.scheduler_config = dict(b.scheduler_config, **option)
    # 7 steps: linspace(0, 999, 7) is fractional (10 would give whole numbers)
    _, ours = pipe("a red star on a grass background", steps=7, guidance=7.5, latents=lat, progress=False,
                   return_latents=True)
    theirs = diffusers_images(tiny_sd1_dir, "a red star on a grass background", lat, 7, 7.5,
                              diffusers.EulerDiscreteScheduler, output_type="latent", **option)
    rel = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
    assert rel < 2e-5, rel


def test_learned_token_moves_diffusers_the_same_way(tiny_sd1_dir, tiny_bundle_fp32, tmp_path):
    """Compared on the final latents, where the random tiny model's text dependence is not hidden by
    8-bit rounding: the token's effect (ours with vs without it) is far larger than the gap between
    ours and diffusers with the same token loaded by load_textual_inversion."""
    b = Bundle.load(tiny_bundle_fp32)
    rng = np.random.default_rng(5)
    vec = (rng.standard_normal((1, b.embedding_dim)) * 0.5).astype(np.float32)  # far from any word
    path = tmp_path / "learned_embeds.safetensors"
    save_embedding(path, "<zz-tok>", vec)
    lat = start_latents(b, seed=1)
    prompt = "a photo of a <zz-tok>"
    _, ours = Pipeline(b, embeddings={"<zz-tok>": vec})(prompt, steps=8, guidance=5.0, latents=lat, progress=False,
                                                        return_latents=True)
    _, plain = Pipeline(b)("a photo of a", steps=8, guidance=5.0, latents=lat, progress=False, return_latents=True)
    theirs = diffusers_images(tiny_sd1_dir, prompt, lat, 8, 5.0, embedding=str(path), token="<zz-tok>",
                              output_type="latent")
    effect = np.abs(ours - plain).mean()
    gap = np.abs(ours - theirs).mean()
    assert effect > 1e-3
    assert gap < 0.02 * effect, (gap, effect)


def test_cli_writes_png_with_metadata_and_grid(tiny_bundle_int8, tmp_path):
    b = Bundle.load(tiny_bundle_int8)
    emb = tmp_path / "e.safetensors"
    save_embedding(emb, "<zz-tok>", np.zeros((2, b.embedding_dim), np.float32))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of <zz-tok>\na <zz-tok> on a sky background\n")
    r = CliRunner().invoke(cli, ["generate", "--model", str(tiny_bundle_int8), "--embedding", str(emb),
                                 "--prompts", str(prompts), "--images-per-prompt", "2", "--steps", "3",
                                 "--out-dir", str(tmp_path / "s"), "--grid", "--scheduler", "ddim"])
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert files == ["000_0.png", "000_1.png", "001_0.png", "001_1.png", "grid.png"]
    im = Image.open(tmp_path / "s" / "001_1.png")
    assert im.text["prompt"] == "a <zz-tok> on a sky background"
    assert im.text["scheduler"] == "ddim" and im.text["steps"] == "3"
    assert im.size == (b.resolution, b.resolution)
    # same seed, same image
    r2 = CliRunner().invoke(cli, ["generate", "--model", str(tiny_bundle_int8), "--embedding", str(emb),
                                  "a photo of <zz-tok>", "--images-per-prompt", "2", "--steps", "3",
                                  "--out", str(tmp_path / "one.png"), "--scheduler", "ddim"])
    assert r2.exit_code == 0, r2.output
    a = np.asarray(Image.open(tmp_path / "s" / "000_1.png"))
    c = np.asarray(Image.open(tmp_path / "one_1.png"))
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("extra,needle", [
    (["--scheduler", "nope"], "nope"),
    (["--steps", "0"], "steps"),
    (["--height", "20"], "divisible by 8"),
])
def test_cli_bad_input(tiny_bundle_int8, tmp_path, extra, needle):
    r = CliRunner().invoke(cli, ["generate", "--model", str(tiny_bundle_int8), "a prompt", "--out",
                                 str(tmp_path / "x.png"), *extra])
    assert r.exit_code == 2
    assert needle in r.output.strip().splitlines()[-1]


def test_cli_embedding_problems(tiny_bundle_int8, tmp_path):
    wrong = tmp_path / "wrong.safetensors"
    save_embedding(wrong, "<w>", np.zeros((1, 7), np.float32))
    r = CliRunner().invoke(cli, ["generate", "--model", str(tiny_bundle_int8), "--embedding", str(wrong),
                                 "a <w>", "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "7" in r.output
    pickle = tmp_path / "learned_embeds.bin"
    import torch
    torch.save({"<w>": torch.zeros(1, 4)}, pickle)
    r = CliRunner().invoke(cli, ["generate", "--model", str(tiny_bundle_int8), "--embedding", str(pickle),
                                 "a <w>", "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "pickle" in r.output.lower()
    assert not (tmp_path / "x.png").exists()


def test_placeholder_missing_warns(tiny_bundle_int8, tmp_path, capsys):
    b = Bundle.load(tiny_bundle_int8)
    pipe = Pipeline(b, embeddings={"<zz-tok>": np.zeros((1, b.embedding_dim), np.float32)})
    pipe("a photo of a dog", steps=2, progress=False)
    assert "none of the loaded tokens" in capsys.readouterr().err
