"""zo_runtime.embeddings: safetensors textual-inversion files in our/diffusers/A1111 layouts,
pickles refused, and our files loaded by diffusers' own load_textual_inversion."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import save_file

from zo_runtime.embeddings import load_embeddings, save_embedding
from zo_runtime.errors import UserError

RNG = np.random.default_rng(0)


def _vecs(n, dim=32):
    return RNG.standard_normal((n, dim)).astype(np.float32)


# --- our format ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 3])
def test_round_trip(tmp_path, n):
    v = _vecs(n, 768)
    p = save_embedding(tmp_path / "dog.safetensors", "<my-dog>", v, extra_metadata={"init": "dog", "steps": 500})
    got = load_embeddings(p, expected_dim=768)
    assert list(got) == ["<my-dog>"]
    assert got["<my-dog>"].dtype == np.float32 and got["<my-dog>"].shape == (n, 768)
    np.testing.assert_array_equal(got["<my-dog>"], v)
    assert [f.name for f in tmp_path.iterdir()] == ["dog.safetensors"]  # no temp file left behind


def test_saved_file_is_diffusers_format(tmp_path):
    from safetensors import safe_open

    p = save_embedding(tmp_path / "sub" / "x.safetensors", "<x>", _vecs(2), extra_metadata={"init": "cat", "lr": 0.1})
    with safe_open(p, framework="np") as f:
        assert list(f.keys()) == ["<x>"]
        assert f.get_tensor("<x>").dtype == np.float32
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["init"] == "cat" and json.loads(meta["lr"]) == 0.1


def test_save_overwrites_atomically(tmp_path):
    p = tmp_path / "e.safetensors"
    save_embedding(p, "<a>", _vecs(1))
    v = _vecs(2)
    save_embedding(p, "<a>", v)
    np.testing.assert_array_equal(load_embeddings(p)["<a>"], v)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["e.safetensors"]


@pytest.mark.parametrize("bad", [np.zeros((0, 4), np.float32), np.zeros((1, 2, 3), np.float32),
                                 np.array([[np.nan, 1.0]], np.float32), np.zeros((1, 4), np.int64)])
def test_save_rejects_bad_vectors(tmp_path, bad):
    with pytest.raises(UserError):
        save_embedding(tmp_path / "e.safetensors", "<a>", bad)


def test_save_rejects_pickle_name_and_empty_placeholder(tmp_path):
    with pytest.raises(UserError):
        save_embedding(tmp_path / "e.bin", "<a>", _vecs(1))
    with pytest.raises(UserError):
        save_embedding(tmp_path / "e.safetensors", "", _vecs(1))


# --- other layouts -------------------------------------------------------------------------------

def test_diffusers_1d_vector(tmp_path):
    v = _vecs(1)[0]
    save_file({"<tok>": v}, str(tmp_path / "learned_embeds.safetensors"))
    got = load_embeddings(tmp_path / "learned_embeds.safetensors")
    assert got["<tok>"].shape == (1, 32)
    np.testing.assert_array_equal(got["<tok>"][0], v)
    # a diffusers training output folder works too
    assert list(load_embeddings(tmp_path)) == ["<tok>"]


def test_float16_and_bfloat16(tmp_path):
    import torch
    import safetensors.torch

    v = _vecs(2)
    save_file({"<h>": v.astype(np.float16)}, str(tmp_path / "h.safetensors"))
    np.testing.assert_array_equal(load_embeddings(tmp_path / "h.safetensors")["<h>"], v.astype(np.float16).astype(np.float32))
    bf = torch.from_numpy(v).to(torch.bfloat16)
    safetensors.torch.save_file({"<b>": bf}, str(tmp_path / "b.safetensors"))
    np.testing.assert_array_equal(load_embeddings(tmp_path / "b.safetensors")["<b>"], bf.float().numpy())


def test_a1111_string_to_param(tmp_path):
    v = _vecs(4, 768)
    # A1111's safetensors export flattens its dict: string_to_param.* plus the token map
    tensors = {"string_to_param.*": v, "string_to_token.*": np.array([265], dtype=np.int64)}
    save_file(tensors, str(tmp_path / "StyleThing.safetensors"))
    got = load_embeddings(tmp_path / "StyleThing.safetensors", expected_dim=768)
    assert list(got) == ["StyleThing"]
    np.testing.assert_array_equal(got["StyleThing"], v)
    save_file(tensors, str(tmp_path / "named.safetensors"), metadata={"name": "my-style"})
    assert list(load_embeddings(tmp_path / "named.safetensors")) == ["my-style"]


def test_a1111_emb_params(tmp_path):
    v = _vecs(2, 1024)
    save_file({"emb_params": v}, str(tmp_path / "ugly-hands.safetensors"))
    got = load_embeddings(tmp_path / "ugly-hands.safetensors", expected_dim=1024)
    assert list(got) == ["ugly-hands"]
    np.testing.assert_array_equal(got["ugly-hands"], v)
    save_file({"emb_params": v}, str(tmp_path / "e2.safetensors"), metadata={"name": "neg"})
    assert list(load_embeddings(tmp_path / "e2.safetensors")) == ["neg"]


def test_sdxl_refused(tmp_path):
    save_file({"clip_l": _vecs(2, 768), "clip_g": _vecs(2, 1280)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(UserError, match="is an SDXL embedding.*use it with an SDXL bundle"):
        load_embeddings(tmp_path / "xl.safetensors")


def test_unknown_layout_refused(tmp_path):
    save_file({"a.weight": _vecs(2), "b.weight": _vecs(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="not a textual-inversion embedding"):
        load_embeddings(tmp_path / "model.safetensors")


def test_dimension_mismatch(tmp_path):
    p = save_embedding(tmp_path / "e.safetensors", "<e>", _vecs(1, 768))
    with pytest.raises(UserError) as err:
        load_embeddings(p, expected_dim=1024)
    msg = str(err.value)
    assert "768" in msg and "1024" in msg and "\n" not in msg


def test_missing_and_garbage(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_embeddings(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(UserError, match="not a safetensors file"):
        load_embeddings(tmp_path / "junk.safetensors")
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    with pytest.raises(UserError):
        load_embeddings(tmp_path / "short.safetensors")


# --- pickles -------------------------------------------------------------------------------------

def _hint_command(msg: str):
    m = re.search(r'python -c "(.+)" (\S+) (\S+)$', msg)
    assert m, msg
    return m.group(1), m.group(2).strip("'"), m.group(3).strip("'")


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt"])
def test_pickle_refused_by_name(tmp_path, suffix):
    import torch

    p = tmp_path / f"learned_embeds{suffix}"
    torch.save({"<tok>": torch.randn(1, 32)}, p)
    with pytest.raises(UserError) as err:
        load_embeddings(p)
    msg = str(err.value)
    assert "pickle" in msg and "\n" not in msg and "safetensors" in msg


def test_pickle_refused_by_content(tmp_path):
    """A torch.save zip and a raw pickle renamed to .safetensors are recognized and still refused."""
    import pickle

    import torch

    torch.save({"<tok>": torch.randn(1, 32)}, tmp_path / "zip.safetensors")
    (tmp_path / "raw.safetensors").write_bytes(pickle.dumps({"<tok>": [1.0, 2.0]}, protocol=4))
    for name in ("zip.safetensors", "raw.safetensors"):
        with pytest.raises(UserError, match="pickles are refused"):
            load_embeddings(tmp_path / name)


def test_conversion_hint_works(tmp_path, monkeypatch):
    """The one-liner in the refusal message converts both diffusers .bin and A1111 .pt files."""
    import torch

    v = torch.randn(2, 32)
    torch.save({"<tok>": v}, tmp_path / "learned_embeds.bin")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v.clone().requires_grad_(True)},
                "name": "style", "step": 1000, "sd_checkpoint": "abc", "sd_checkpoint_name": "v1-5"},
               tmp_path / "style.pt")
    for name, placeholder in [("learned_embeds.bin", "<tok>"), ("style.pt", "style")]:
        with pytest.raises(UserError) as err:
            load_embeddings(tmp_path / name)
        code, src, dst = _hint_command(str(err.value))
        monkeypatch.setattr(sys, "argv", ["-c", src, dst])
        exec(code, {})
        got = load_embeddings(dst, expected_dim=32)
        assert list(got) == [placeholder]
        np.testing.assert_array_equal(got[placeholder], v.numpy())


# --- diffusers reads what we write ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from zo_edge.models.clip_vocab import write_clip_tokenizer

    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path_factory.mktemp("tok")))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1, vocab_size=49408,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)).eval()
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2, attention_head_dim=2)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.slow
def test_diffusers_loads_our_file(tiny_pipe, tmp_path):
    from zo_edge.models.clip_vocab import write_clip_tokenizer
    from zo_runtime.tokenizer import CLIPTokenizer as RuntimeTokenizer

    pipe = tiny_pipe
    one, two = _vecs(1), _vecs(2)
    pipe.load_textual_inversion(str(save_embedding(tmp_path / "one.safetensors", "<one>", one)))
    pipe.load_textual_inversion(str(save_embedding(tmp_path / "two.safetensors", "<two>", two)))
    table = pipe.text_encoder.get_input_embeddings().weight.detach().numpy()
    ids = {t: pipe.tokenizer.convert_tokens_to_ids(t) for t in ("<one>", "<two>", "<two>_1")}
    assert min(ids.values()) >= 49408
    np.testing.assert_array_equal(table[ids["<one>"]], one[0])
    np.testing.assert_array_equal(table[ids["<two>"]], two[0])
    np.testing.assert_array_equal(table[ids["<two>_1"]], two[1])

    # and our prompt encoding puts the vectors where diffusers' expanded prompt has its new tokens
    prompt = "a photo of <two> next to <one>"
    expanded = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    want = pipe.tokenizer(expanded, padding="max_length", max_length=77, truncation=True).input_ids
    rt = RuntimeTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tok"))
    got, slots = rt.encode_prompt(prompt, {"<one>": 1, "<two>": 2})
    vectors = {"<one>": one, "<two>": two}
    ours = table[got.tolist()]
    for pos, name, k in slots:
        ours[pos] = vectors[name][k]
    np.testing.assert_array_equal(ours, table[want])


def test_runtime_import_is_torch_free():
    code = textwrap.dedent("""
        import sys
        import zo_runtime.embeddings, zo_runtime.tokenizer
        heavy = [m for m in ("torch", "transformers", "diffusers") if m in sys.modules]
        assert not heavy, heavy
    """)
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
