"""SDXL: convert a tiny random StableDiffusionXLPipeline, generate in parity with diffusers, learn a
token (768 + 1280 there, 32 + 48 here) that diffusers loads into both encoders and that moves its
latents as it moves ours, and the one-line errors when SD 1.x and SDXL files or bundles are mixed."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open

from zo_edge.cli.main import main as cli
from zo_edge.models.calibration import SHAPES_WORLD
from zo_runtime.bundle import Bundle
from zo_runtime.embeddings import save_embedding
from zo_runtime.errors import UserError
from zo_runtime.personalize_sdxl import micro_conditioning
from zo_runtime.sdxl import SDXLModel, SDXLPipeline, load_sdxl_embeddings, save_sdxl_embedding

DIMS = (32, 48)            # the tiny model's CLIP-L and bigG widths (zo_edge/testing_sdxl.py)
MEAN_ABS_TOL = 0.5         # 0-255 grey levels, as tests/test_generate.py
PROMPT = "a red star on a grass background"


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from zo_edge.testing_sdxl import build_sdxl_pipeline
    return build_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl") / "pipeline", size="tiny", seed=0)


@pytest.fixture(scope="module")
def sdxl_export(sdxl_dir, tmp_path_factory):
    from zo_edge.convert.sdxl import export_only
    out = tmp_path_factory.mktemp("tiny_sdxl_export") / "onnx"
    export_only(sdxl_dir, out)
    return out


@pytest.fixture(scope="module")
def sdxl_fp32(sdxl_dir, sdxl_export, tmp_path_factory):
    from zo_edge.convert import convert_pipeline
    out = tmp_path_factory.mktemp("sdxl_bundles") / "fp32"
    convert_pipeline(sdxl_dir, out, weights="fp32", fuse=False, export_dir=sdxl_export, data=SHAPES_WORLD)
    return out


@pytest.fixture(scope="module")
def sdxl_int8w(sdxl_dir, sdxl_export, tmp_path_factory):
    from zo_edge.convert import convert_pipeline
    out = tmp_path_factory.mktemp("sdxl_bundles") / "int8w"
    convert_pipeline(sdxl_dir, out, weights="int8w", export_dir=sdxl_export, data=SHAPES_WORLD)
    return out


def one_line_error(r) -> str:
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("zo-edge: error:"), r.output
    return lines[0]


def start_latents(seed=0):
    return np.random.default_rng(seed).standard_normal((1, 4, 8, 8)).astype(np.float32)


def diffusers_pipe(src, scheduler=None, embedding=None, token=None, pool_at_eot=True):
    import diffusers
    from safetensors.torch import load_file

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(src)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    if embedding is not None:
        state = load_file(str(embedding))
        pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    if pool_at_eot:   # SDXL's configs say eos_token_id 2 (pool at the largest id): pool at the end of text
        pipe.text_encoder.text_model.eos_token_id = pipe.text_encoder_2.text_model.eos_token_id = 49407
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_run(pipe, prompt, latents, steps, guidance, negative_prompt=None, output_type="np"):
    import torch
    out = pipe(prompt, negative_prompt=negative_prompt, latents=torch.from_numpy(latents), num_inference_steps=steps,
               guidance_scale=guidance, output_type=output_type, height=16, width=16)
    if output_type == "latent":
        return out.images.numpy()
    return (out.images * 255).round().astype(np.uint8)


def test_bundle_manifest(sdxl_fp32, sdxl_int8w):
    m = json.loads((sdxl_int8w / "zo-edge.json").read_text())
    assert m["family"] == "sdxl" and m["embedding_dims"] == {"clip_l": 32, "clip_g": 48}
    assert m["embedding_dim"] == 80 and m["pooled_dim"] == 48 and m["vae_scaling_factor"] == 0.13025
    assert set(m["graphs"]) == {"text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"}
    prec = {g: e["precision"] for g, e in m["graphs"].items()}
    assert prec == {"text_encoder": "int8w", "text_encoder_2": "int8w", "unet": "int8w", "vae_encoder": "fp32",
                    "vae_decoder": "fp32"}
    unet_in = {i["name"] for i in m["graphs"]["unet"]["inputs"]}
    assert unet_in == {"sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"}
    assert {i["name"] for i in m["graphs"]["text_encoder_2"]["inputs"]} >= {"inputs_embeds"}
    for g, d in (("text_encoder", 32), ("text_encoder_2", 48)):
        assert max(m["text_encoder_surgery"]["text_parity_max_abs_diff"].values()) < 1e-5
        table = np.load(sdxl_int8w / g / "token_embedding.npy", mmap_mode="r")
        assert table.shape == (49408, d)
    for g in ("text_encoder", "text_encoder_2", "unet"):
        assert m["accuracy"][g]["cosine"] > 0.999, (g, m["accuracy"][g])
    b = Bundle.load(sdxl_fp32)   # sha256 of every file
    assert SDXLModel(b).dims == DIMS
    r = CliRunner().invoke(cli, ["info", str(sdxl_int8w)])
    assert r.exit_code == 0 and "sdxl" in r.output


@pytest.mark.parametrize("scheduler,negative", [(None, None), ("dpm++2m", "blurry, low quality")])
def test_matches_diffusers(sdxl_dir, sdxl_fp32, scheduler, negative):
    """Same initial latents, same steps: the images agree to under a grey level, and the latents
    far closer than a change of prompt moves them (the text path is exercised, not bypassed)."""
    import diffusers
    classes = {None: None, "dpm++2m": diffusers.DPMSolverMultistepScheduler}
    b = Bundle.load(sdxl_fp32)
    lat = start_latents()
    pipe = SDXLPipeline(b, scheduler=scheduler)
    ours, ours_lat = pipe(PROMPT, negative_prompt=negative or "", steps=8, guidance=5.0, latents=lat, progress=False,
                          return_latents=True)
    _, other_lat = pipe("a blue circle on a sky background", negative_prompt=negative or "", steps=8, guidance=5.0,
                        latents=lat, progress=False, return_latents=True)
    d = diffusers_pipe(sdxl_dir, classes[scheduler], pool_at_eot=False)
    theirs = diffusers_run(d, PROMPT, lat, 8, 5.0, negative)
    theirs_lat = diffusers_run(d, PROMPT, lat, 8, 5.0, negative, output_type="latent")
    assert np.abs(ours.astype(float) - theirs.astype(float)).mean() <= MEAN_ABS_TOL
    gap, effect = np.abs(ours_lat - theirs_lat).mean(), np.abs(ours_lat - other_lat).mean()
    assert effect > 1e-3 and gap < 1e-3 * effect, (gap, effect)


def test_placeholder_with_word_rows_equals_the_word(sdxl_fp32):
    """A token whose two halves are a word's rows in both tables gives exactly the word's
    conditioning: the halves go to the right encoders and the pooled embedding stays at EOT."""
    b = Bundle.load(sdxl_fp32)
    model = SDXLModel(b)
    dog = model.tokenizers[0].single_token_id("dog")
    pipe = SDXLPipeline(b, embeddings={"<zz-tok>": model.init_row(dog)[None]})
    h1, p1 = pipe.encode_prompts(["a photo of a <zz-tok> on the grass"])
    h2, p2 = pipe.encode_prompts(["a photo of a dog on the grass"])
    np.testing.assert_allclose(h1, h2, atol=1e-5)
    np.testing.assert_allclose(p1, p2, atol=1e-5)
    swapped = np.concatenate([model.init_row(dog)[None, DIMS[0]:DIMS[0] + DIMS[0]],
                              model.init_row(dog)[None, :DIMS[0]],
                              model.init_row(dog)[None, 2 * DIMS[0]:]], axis=1)  # halves shuffled
    h3, _ = SDXLPipeline(b, embeddings={"<zz-tok>": swapped}).encode_prompts(["a photo of a <zz-tok> on the grass"])
    assert np.abs(h3 - h2).max() > 1e-3


def test_learned_token_moves_diffusers_the_same_way(sdxl_dir, sdxl_fp32, tmp_path):
    b = Bundle.load(sdxl_fp32)
    vec = (np.random.default_rng(5).standard_normal((1, sum(DIMS))) * 0.5).astype(np.float32)
    path = tmp_path / "zz.safetensors"
    save_sdxl_embedding(path, "<zz-tok>", vec, DIMS)
    with safe_open(str(path), "np") as f:
        assert f.metadata()["name"] == "<zz-tok>"
        assert f.get_tensor("clip_l").shape == (1, 32) and f.get_tensor("clip_g").shape == (1, 48)
    loaded = load_sdxl_embeddings(path, DIMS)
    np.testing.assert_array_equal(loaded["<zz-tok>"], vec)
    lat = start_latents(1)
    prompt = "a photo of a <zz-tok>"
    _, ours = SDXLPipeline(b, embeddings=loaded)(prompt, steps=6, guidance=5.0, latents=lat, progress=False,
                                                 return_latents=True)
    _, plain = SDXLPipeline(b)("a photo of a", steps=6, guidance=5.0, latents=lat, progress=False,
                               return_latents=True)
    theirs = diffusers_run(diffusers_pipe(sdxl_dir, embedding=path, token="<zz-tok>"), prompt, lat, 6, 5.0,
                           output_type="latent")
    effect, gap = np.abs(ours - plain).mean(), np.abs(ours - theirs).mean()
    assert effect > 1e-3 and gap < 0.02 * effect, (gap, effect)
    # with SDXL's own eos_token_id 2, transformers pools text_encoder_2 at the new token's id (the
    # largest), not at the end of text: a different pooled embedding (zo_runtime/sdxl.py docstring)
    argmax = diffusers_run(diffusers_pipe(sdxl_dir, embedding=path, token="<zz-tok>", pool_at_eot=False), prompt,
                           lat, 6, 5.0, output_type="latent")
    assert np.abs(ours - argmax).mean() > 5 * gap


def test_micro_conditioning():
    # 24 x 20 (h x w) -> short side 20 resized to 16: 19 x 16, centre crop starts 2 rows down
    np.testing.assert_array_equal(micro_conditioning((24, 20), 16), [24, 20, 2, 0, 16, 16])
    np.testing.assert_array_equal(micro_conditioning((512, 1024), 512), [512, 1024, 0, 256, 512, 512])


def test_personalize_generate_cli(sdxl_int8w, tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(2):
        a = (np.random.default_rng(i).random((24, 20, 3)) * 255).astype(np.uint8)
        Image.fromarray(a).save(imgs / f"{i}.png")
    out, run = tmp_path / "tok.safetensors", tmp_path / "run"
    args = ["personalize", "--model", str(sdxl_int8w), "--images", str(imgs), "--token", "<zz-tok>", "--init", "dog",
            "--out", str(out), "--run-dir", str(run), "--steps", "4", "--checkpoint-every", "2"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    theta = load_sdxl_embeddings(out, DIMS)["<zz-tok>"]
    model = SDXLModel(Bundle.load(sdxl_int8w))
    init = model.init_row(model.tokenizers[0].single_token_id("dog"))
    assert theta.shape == (1, 80) and np.isfinite(theta).all()
    assert np.abs(theta[0, :32] - init[:32]).max() > 0 and np.abs(theta[0, 32:] - init[32:]).max() > 0
    r = CliRunner().invoke(cli, ["personalize", "--resume", str(run), "--steps", "6", "--out", str(tmp_path / "t6.safetensors")])
    assert r.exit_code == 0, r.output
    assert len((run / "log.jsonl").read_text().splitlines()) == 6
    r = CliRunner().invoke(cli, ["generate", "--model", str(sdxl_int8w), "--embedding", str(out),
                                 "a photo of <zz-tok>", "--steps", "3", "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "x.png").size == (16, 16)


def test_mismatched_family_one_line(sdxl_int8w, tmp_path):
    sd1 = tmp_path / "sd1.safetensors"
    save_embedding(sd1, "<zz-tok>", np.zeros((1, 32), np.float32))
    xl = tmp_path / "xl.safetensors"
    save_sdxl_embedding(xl, "<zz-tok>", np.zeros((1, 80), np.float32), DIMS)
    line = one_line_error(CliRunner().invoke(cli, ["generate", "--model", str(sdxl_int8w), "--embedding", str(sd1),
                                                   "a <zz-tok>", "--out", str(tmp_path / "a.png")]))
    assert "SD 1.x/2.x embedding" in line and "SDXL" in line
    line = one_line_error(CliRunner().invoke(cli, ["generate", "--model", "shapes", "--embedding", str(xl),
                                                   "a <zz-tok>", "--out", str(tmp_path / "b.png")]))
    assert "is an SDXL embedding" in line
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
    wrong = tmp_path / "wrong.safetensors"
    save_sdxl_embedding(wrong, "<zz-tok>", np.zeros((1, 768 + 1280), np.float32), (768, 1280))
    with pytest.raises(UserError, match="clip_l width is 32"):
        load_sdxl_embeddings(wrong, DIMS)


def test_convert_bad_sdxl_sources(sdxl_dir, tmp_path):
    import shutil
    src = tmp_path / "src"
    shutil.copytree(sdxl_dir, src)
    shutil.rmtree(src / "text_encoder_2")
    line = one_line_error(CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "out")]))
    assert "SDXL component folder text_encoder_2/ is missing" in line
    shutil.copytree(sdxl_dir / "text_encoder_2", src / "text_encoder_2")
    cfg = json.loads((src / "unet" / "config.json").read_text())
    (src / "unet" / "config.json").write_text(json.dumps({**cfg, "cross_attention_dim": 64}))
    line = one_line_error(CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "out")]))
    assert "cross_attention_dim 64" in line
    assert not (tmp_path / "out").exists()


def test_static_int8_calibrated(sdxl_dir, sdxl_export, tmp_path):
    """--weights int8 on SDXL: both text encoders and the UNet static QDQ, calibrated on SDXL feeds
    (pooled embedding and time_ids included); the VAE stays FP32."""
    from zo_edge.convert import convert_pipeline
    m = convert_pipeline(sdxl_dir, tmp_path / "int8", weights="int8", fuse=False, export_dir=sdxl_export,
                         calibration_samples=2, heldout_samples=2, heldout_per_band=1, data=SHAPES_WORLD)
    prec = {g: e["precision"] for g, e in m["graphs"].items()}
    assert prec == {"text_encoder": "int8", "text_encoder_2": "int8", "unet": "int8", "vae_encoder": "fp32",
                    "vae_decoder": "fp32"}
    assert m["quantization"]["graphs"]["unet"]["method"] == "static QDQ"
    assert all(0.99 < m["accuracy"][g]["cosine"] < 1.0 for g in ("text_encoder", "text_encoder_2", "unet"))
    out = SDXLPipeline(Bundle.load(tmp_path / "int8"))(PROMPT, steps=2, latents=start_latents(), progress=False)
    assert out.shape == (1, 16, 16, 3)


def test_consolidate_streams_external_data(tmp_path):
    """The exporter's one-file-per-tensor external data becomes one page-aligned model.onnx_data;
    the graph computes the same."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from zo_edge.convert.graphs import session
    from zo_edge.convert.sdxl import consolidate

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((16, 4)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    raw = tmp_path / "raw" / "model.onnx"
    raw.parent.mkdir()
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(raw),
                    save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(raw.parent.iterdir())) == 3
    files = consolidate(raw, tmp_path / "out" / "model.onnx")
    assert [f.name for f in files] == ["model.onnx", "model.onnx_data"] and not raw.parent.exists()
    x = rng.standard_normal((2, 8)).astype(np.float32)
    y = session(files[0]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ w1 @ w2, rtol=1e-5)
    offsets = [int(e.value) for t in onnx.load(str(files[0]), load_external_data=False).graph.initializer
               for e in t.external_data if e.key == "offset"]
    assert offsets == [0, 4096]


def test_export_leaves_autograd_on(sdxl_export):
    """The export runs without autograd but must not switch it off for the rest of the process."""
    import torch
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m["token_embedding_2"].update(path="../outside.npy"), "points outside the bundle"),
    (lambda m: m.update(embedding_dims={"clip_l": 32}), "embedding_dims"),
    (lambda m: m.update(embedding_dim=81), r"embedding_dim 81 is not clip_l \+ clip_g = 80"),
    (lambda m: m["token_embedding_2"].update(path="text_encoder_2/model.onnx_nope"), "not listed"),
])
def test_hostile_sdxl_manifest(sdxl_fp32, tmp_path, edit, needle):
    """The SDXL keys of a manifest are input like the rest: one UserError line, before use."""
    import shutil
    b = tmp_path / "b"
    shutil.copytree(sdxl_fp32, b)
    m = json.loads((b / "zo-edge.json").read_text())
    edit(m)
    (b / "zo-edge.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match=needle):
        SDXLModel(Bundle.load(b, verify=False))
