"""The shipped diffusers source of the shapes model (rebuilt from its bundle) and the rebuild routine.

The shipped folder must load with diffusers, compute what the shipped bundle computes (per
component, same inputs), carry the bundle's tokenizer and token table, and run backprop textual
inversion. The rebuild routine is checked against ground truth on the tiny test pipelines: the
weights it recovers from a bundle are the weights the bundle was converted from (exactly for FP32
graphs with packed self-attention, within INT8 rounding for weight-only INT8 graphs)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from zo_edge.models import SHAPES_BUNDLE, SHAPES_SOURCE

COSINE = 0.9999


@pytest.fixture(scope="module")
def shipped():
    from zo_edge.convert.rebuild_source import load_source
    return load_source(SHAPES_SOURCE)


def test_shipped_source_is_a_diffusers_folder_of_the_shipped_bundle():
    from zo_edge.convert.source import inspect_source
    from zo_runtime.bundle import sha256_file
    info = inspect_source(SHAPES_SOURCE)
    bundle = json.loads((SHAPES_BUNDLE / "zo-edge.json").read_text())
    assert info.family == bundle["family"] == "sd1"
    assert info.resolution == bundle["resolution"] and info.embedding_dim == bundle["embedding_dim"]
    assert info.vae_scaling_factor == pytest.approx(bundle["vae_scaling_factor"], abs=0)
    assert info.noise_schedule == bundle["noise_schedule"]
    rec = json.loads((SHAPES_SOURCE / "zo_edge_source.json").read_text())
    # the pair must match: the record names the bundle files it was rebuilt from, and they are these
    for name, digest in rec["bundle_files_sha256"].items():
        assert sha256_file(SHAPES_BUNDLE / name) == digest, name
    assert set(rec["bundle_files_sha256"]) == {"zo-edge.json", *bundle["files"]}
    assert rec["dtype"] == "float16"
    assert all(p["cosine"] >= COSINE for p in rec["parity"].values())


def test_shipped_source_tokenizer_and_token_table_are_the_bundles(shipped):
    from transformers import CLIPTokenizer
    ours = CLIPTokenizer.from_pretrained(SHAPES_SOURCE / "tokenizer")
    theirs = CLIPTokenizer.from_pretrained(SHAPES_BUNDLE / "tokenizer")
    assert ours.get_vocab() == theirs.get_vocab()
    assert ours.bpe_ranks == theirs.bpe_ranks
    assert ours.model_max_length == theirs.model_max_length
    for text in ("a red striped star on a grass background", "a photo of <zo-subject>", "", "ring ring ring!"):
        assert ours(text).input_ids == theirs(text).input_ids
    table = np.load(SHAPES_BUNDLE / "text_encoder" / "token_embedding.npy")
    from safetensors.numpy import load_file
    saved = load_file(str(SHAPES_SOURCE / "text_encoder" / "model.safetensors"))
    stored = saved["text_model.embeddings.token_embedding.weight"]
    assert stored.dtype == np.float16
    np.testing.assert_array_equal(stored, table.astype(np.float16))  # the bundle's table, stored as fp16
    loaded = shipped["text_encoder"].get_input_embeddings().weight.detach().numpy()
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, table.astype(np.float16).astype(np.float32))


def test_shipped_source_matches_the_bundle_per_component(shipped):
    from zo_edge.convert.rebuild_source import parity
    par = parity(shipped, SHAPES_BUNDLE, seed=1, samples=2, unet_samples=4, threads=1)
    assert set(par) >= {"text_encoder", "unet", "vae_encoder", "vae_decoder"}
    for comp, r in par.items():
        assert r["cosine"] >= COSINE and r["worst_cosine"] >= COSINE, (comp, r)
        assert r["rel_l2"] < 5e-3, (comp, r)


def test_textual_inversion_runs_on_the_shipped_source():
    from zo_edge.eval.textual_inversion import textual_inversion
    from zo_edge.models import world
    subject = world.Subject("star", "red", "striped")
    images = np.stack(world.reference_images(subject, n=2, seed=0))
    res = textual_inversion(SHAPES_SOURCE, images, "<zo-subject>", "star", steps=3, seed=0, threads=1)
    assert res["theta"].shape == (1, 64) and res["theta"].dtype == np.float32
    assert np.all(np.isfinite(res["theta"])) and len(res["losses"]) == 3
    assert all(np.isfinite(res["losses"]))


def _table_adam_ti(source, images, init, steps, seed):
    """The reference: diffusers' textual_inversion example's way, Adam over the whole embedding table and
    every other row restored after each step (the same draws as textual_inversion, in the same order)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from zo_runtime.recipe import TEMPLATES
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tok = CLIPTokenizer.from_pretrained(f"{source}/tokenizer")
    text = CLIPTextModel.from_pretrained(f"{source}/text_encoder").eval()
    vae = AutoencoderKL.from_pretrained(f"{source}/vae").eval()
    unet = UNet2DConditionModel.from_pretrained(f"{source}/unet").eval()
    sched = DDPMScheduler.from_pretrained(f"{source}/scheduler")
    for m in (text, vae, unet):
        m.requires_grad_(False)
    init_id = tok.encode(init, add_special_tokens=False)[0]
    tok.add_tokens(["<t>"])
    new_id = tok.convert_tokens_to_ids("<t>")
    text.resize_token_embeddings(len(tok), mean_resizing=False)
    emb = text.get_input_embeddings()
    with torch.no_grad():
        emb.weight[new_id] = emb.weight[init_id]
    original = emb.weight.detach().clone()
    emb.weight.requires_grad_(True)
    opt = torch.optim.Adam([emb.weight], lr=5e-3)
    with torch.no_grad():
        x = torch.from_numpy(np.concatenate([images, images[:, :, ::-1]]).copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
        post = vae.encode(x).latent_dist
    for _ in range(steps):
        i = int(rng.integers(len(post.mean)))
        z = (post.mean[i] + post.std[i] * torch.from_numpy(rng.standard_normal(post.mean.shape[1:], dtype=np.float32)))
        z = z * vae.config.scaling_factor
        ids = tok(TEMPLATES[int(rng.integers(len(TEMPLATES)))].format("<t>"), padding="max_length",
                  max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        noise = torch.from_numpy(rng.standard_normal(z.shape, dtype=np.float32))[None]
        t = torch.tensor([int(rng.integers(0, sched.config.num_train_timesteps))])
        pred = unet(sched.add_noise(z[None], noise, t), t, encoder_hidden_states=text(ids)[0]).sample
        opt.zero_grad()
        torch.nn.functional.mse_loss(pred, noise).backward()
        opt.step()
        with torch.no_grad():
            keep = torch.arange(len(original)) != new_id
            emb.weight[keep] = original[keep]
    return emb.weight[[new_id]].detach().numpy()


def test_textual_inversion_learns_what_adam_over_the_whole_table_learns():
    """The TI baseline's Adam holds the new token's row only; diffusers' example holds the whole table and
    restores the other rows. Adam works element by element, so the two must agree bit for bit."""
    from zo_edge.eval.textual_inversion import textual_inversion
    from zo_edge.models import world
    subject = world.Subject("cross", "yellow", "striped")
    images = np.stack(world.reference_images(subject, n=2, seed=0))
    res = textual_inversion(SHAPES_SOURCE, images, "<t>", "cross", steps=5, seed=3, threads=1)
    np.testing.assert_array_equal(res["theta"], _table_adam_ti(SHAPES_SOURCE, images, "cross", 5, 3))


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["tiny_bundle_fp32", "tiny_bundle_int8w"])
def test_rebuild_recovers_the_weights_a_bundle_was_converted_from(fixture, request, tiny_sd1_dir):
    """FP32 bundle (fused UNet with packed Attention): exact; int8w (unpacked Q/K/V, DequantizeLinear):
    each value within half an INT8 step of its channel's (per-tensor bound used here) scale."""
    from zo_edge.convert.rebuild_source import configs_of, load_source, rebuild_models
    bundle = request.getfixturevalue(fixture)
    models, report = rebuild_models(bundle, configs_of(tiny_sd1_dir))
    original = load_source(tiny_sd1_dir)
    if fixture == "tiny_bundle_fp32":
        assert sum(r.get("zero_biases_checked", 0) for r in report["unet"]["graphs"].values()) > 0
    for comp in ("unet", "text_encoder", "vae"):
        want = original[comp].state_dict()
        got = models[comp].state_dict()
        assert set(got) == set(want)
        for name, w in want.items():
            w, g = w.numpy().astype(np.float64), got[name].numpy().astype(np.float64)
            if fixture == "tiny_bundle_fp32":
                np.testing.assert_allclose(g, w, rtol=0, atol=1e-7, err_msg=f"{comp}.{name}")
            else:
                step = np.abs(w).max() / 127.0
                assert np.abs(g - w).max() <= 0.5 * step * 1.001 + 1e-8, f"{comp}.{name}"


@pytest.mark.slow
def test_rebuild_writes_a_checked_folder(tmp_path, tiny_bundle_int8w, tiny_sd1_dir):
    from zo_edge.convert.rebuild_source import configs_of, main, rebuild_source
    from zo_edge.convert.source import inspect_source
    from zo_runtime.errors import UserError
    out = tmp_path / "src"
    rec = rebuild_source(tiny_bundle_int8w, out, configs=configs_of(tiny_sd1_dir), threads=1, log=lambda s: None)
    assert inspect_source(out).family == "sd1"
    on_disk = json.loads((out / "zo_edge_source.json").read_text())
    assert on_disk["parity"] == rec["parity"] and on_disk["dtype"] == "float16"
    assert all(p["cosine"] >= COSINE for p in rec["parity"].values()), rec["parity"]
    with pytest.raises(UserError, match="exists"):
        rebuild_source(tiny_bundle_int8w, out, configs=configs_of(tiny_sd1_dir))
    with pytest.raises(SystemExit):
        main([str(tiny_bundle_int8w), str(out), "--dtype", "bfloat16"])


@pytest.mark.slow
def test_rebuild_fails_loudly_when_the_architecture_does_not_fit(tiny_bundle_int8w, tiny_sd1_dir):
    from zo_edge.convert.rebuild_source import configs_of, rebuild_models
    from zo_runtime.errors import UserError
    cfg = configs_of(tiny_sd1_dir)
    cfg["text_encoder"]["num_hidden_layers"] += 1  # a layer the bundle does not have: no random weights
    with pytest.raises(UserError, match=r"not found in the bundle[\s\S]*layers\.\d+\.mlp\.fc1\.weight"):
        rebuild_models(tiny_bundle_int8w, cfg)
    cfg = configs_of(tiny_sd1_dir)
    cfg["text_encoder"]["num_hidden_layers"] -= 1  # fewer layers than the bundle: its weights fit nothing
    with pytest.raises(UserError, match="map to no parameter"):
        rebuild_models(tiny_bundle_int8w, cfg)


@pytest.mark.slow
def test_rebuild_refuses_static_int8_bundles(tiny_bundle_int8, tiny_sd1_dir):
    from zo_edge.convert.rebuild_source import configs_of, rebuild_models
    from zo_runtime.errors import UserError
    with pytest.raises(UserError, match="static QDQ"):
        rebuild_models(tiny_bundle_int8, configs_of(tiny_sd1_dir))
