"""zo_runtime.tokenizer against transformers' slow CLIPTokenizer (its no-ftfy path) on the real
CLIP vocabulary written by zo_edge.models.clip_vocab."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from zo_edge.models.clip_vocab import write_clip_tokenizer
from zo_runtime.errors import UserError
from zo_runtime.tokenizer import CLIPTokenizer

PROMPTS = [
    "",
    "a photo of a dog",
    "A PHOTO of a Dog, on the beach!!!",
    "hello, world. how's it going? it'll be fine; we're done: they've left & i'm here -- ok...",
    "1234567890 3.14159 1st 2nd 100% $5 #tag @user",
    "multiple     spaces\tand\ttabs\nand\nnewlines\r\n  leading and trailing   ",
    "café naïve résumé Ångström straße İstanbul",
    "日本語のテキスト 中文 한국어 emoji 😀🐕 ünïcödé",
    "don't DON'T o'clock rock'n'roll 'quoted' \"double\"",
    "curly ’apostrophe’ and “quotes” — dash … ellipsis",
    "zero\x00width\u200bspace and\u00a0nbsp and\u3000ideographic space, control\x07bell \ufffd",
    "<|endoftext|> in the middle <|startoftext|> and <|ENDOFTEXT|>",
    "brackets (a) [b] {c} <d> | e/f\\g ~h^i*j+k=l",
    "combining e\u0301 vs precomposed é",
    "!! SD2 pad quirk! hi!!! ! (!)",
    " ".join(f"word{i} token{i}" for i in range(120)),  # far over 77 tokens: truncated
    "a " * 80,
]


def _hf_tokenizer(folder):
    """transformers' CLIPTokenizer as it behaves without ftfy (ftfy is installed in the dev venv)."""
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    saved = sys.modules.get("ftfy", "absent")
    sys.modules["ftfy"] = None  # makes `import ftfy` raise ImportError
    try:
        tok = HFCLIPTokenizer.from_pretrained(folder)
    finally:
        if saved == "absent":
            del sys.modules["ftfy"]
        else:
            sys.modules["ftfy"] = saved
    assert tok.fix_text is None
    return tok


@pytest.fixture(scope="module")
def sd1_dir(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("tok_sd1"))


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory):
    d = write_clip_tokenizer(tmp_path_factory.mktemp("tok_sd2"))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = json.loads((d / name).read_text())
        cfg["pad_token"] = "!"
        (d / name).write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def tok(sd1_dir):
    return CLIPTokenizer.from_pretrained(sd1_dir)


@pytest.fixture(scope="module")
def hf(sd1_dir):
    return _hf_tokenizer(sd1_dir)


def test_attributes(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (49406, 49407, 49407)
    assert tok.max_length == 77
    assert tok.vocab_size == 49408
    assert tok.standin_id == tok.single_token_id("*")
    assert tok.standin_id not in (tok.bos_id, tok.eos_id, tok.pad_id) and tok.standin_id < tok.eos_id


@pytest.mark.parametrize("prompt", PROMPTS)
def test_matches_transformers_sd1(tok, hf, prompt):
    want = hf(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    ids, slots = tok.encode_prompt(prompt)
    assert ids.dtype == np.int64 and ids.shape == (77,)
    assert ids.tolist() == want
    assert slots == []
    assert tok.tokenize(prompt) == hf.tokenize(prompt)
    assert tok.encode(prompt) == hf(prompt).input_ids  # no padding, no truncation


def test_matches_transformers_sd2_pad(sd2_dir):
    hf2 = _hf_tokenizer(sd2_dir)
    tok2 = CLIPTokenizer.from_pretrained(sd2_dir)
    assert tok2.pad_id == hf2.pad_token_id == 0
    assert tok2.eos_id == 49407
    for prompt in PROMPTS:
        want = hf2(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert tok2.encode_prompt(prompt)[0].tolist() == want, prompt
    # the quirk we reproduce: "!" is an added (pad) token, split out and encoded as id 0
    assert tok2.encode("hi!!") == [49406, tok2.single_token_id("hi"), 0, 0, 49407]


def test_matches_saved_transformers_folder(tmp_path, hf):
    """A folder written by transformers' save_pretrained (added_tokens_decoder in the config)."""
    hf.save_pretrained(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    for prompt in PROMPTS[:6]:
        assert tok.encode_prompt(prompt)[0].tolist() == \
            hf(prompt, padding="max_length", max_length=77, truncation=True).input_ids


def test_same_as_ftfy_path_for_plain_text(tok, sd1_dir):
    pytest.importorskip("ftfy")
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    hf_ftfy = HFCLIPTokenizer.from_pretrained(sd1_dir)
    assert hf_ftfy.fix_text is not None
    for prompt in ["a photo of a dog", "A PHOTO of a Dog, on the beach!!!", "it's 3 o'clock   now", ""]:
        assert tok.encode_prompt(prompt)[0].tolist() == \
            hf_ftfy(prompt, padding="max_length", max_length=77, truncation=True).input_ids


def test_max_length_from_config(tmp_path):
    d = write_clip_tokenizer(tmp_path, model_max_length=16)
    tok = CLIPTokenizer.from_pretrained(d)
    assert tok.max_length == 16
    ids, _ = tok.encode_prompt("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen")
    assert ids.shape == (16,) and ids[0] == tok.bos_id and ids[-1] == tok.eos_id


def test_truncation_keeps_bos_eos(tok):
    ids, _ = tok.encode_prompt("dog " * 200)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert (ids[1:-1] == tok.single_token_id("dog")).all()


# --- placeholders --------------------------------------------------------------------------------

def test_placeholder_one_vector(tok):
    ids, slots = tok.encode_prompt("a photo of <my-dog> on the beach", {"<my-dog>": 1})
    assert slots == [(4, "<my-dog>", 0)]
    same, _ = tok.encode_prompt("a photo of * on the beach")
    assert ids.tolist() == same.tolist()
    assert ids[4] == tok.standin_id


def test_placeholder_three_vectors(tok):
    ids, slots = tok.encode_prompt("a photo of <my-dog> on the beach", {"<my-dog>": 3})
    assert slots == [(4, "<my-dog>", 0), (5, "<my-dog>", 1), (6, "<my-dog>", 2)]
    assert ids[4:7].tolist() == [tok.standin_id] * 3
    plain = tok.encode("a photo of on the beach")
    assert ids[:4].tolist() == plain[:4]
    assert ids[7:7 + len(plain) - 4].tolist() == plain[4:]


def test_two_placeholders_and_adjacency(tok):
    ph = {"<cat>": 1, "<my-dog>": 3}
    ids, slots = tok.encode_prompt("<my-dog>and<cat>, <my-dog>.", ph)
    # BOS | d0 d1 d2 | and | c0 | , | d0 d1 d2 | . | EOS
    assert slots == [(1, "<my-dog>", 0), (2, "<my-dog>", 1), (3, "<my-dog>", 2), (5, "<cat>", 0),
                     (7, "<my-dog>", 0), (8, "<my-dog>", 1), (9, "<my-dog>", 2)]
    assert ids[4] == tok.single_token_id("and")
    assert ids[10] == tok.single_token_id(".") and ids[11] == tok.eos_id


def test_longest_placeholder_first(tok):
    ids, slots = tok.encode_prompt("<cat> <cat>2", {"<cat>": 1, "<cat>2": 2})
    assert slots == [(1, "<cat>", 0), (2, "<cat>2", 0), (3, "<cat>2", 1)]


def test_placeholder_slots_truncated(tok):
    ids, slots = tok.encode_prompt("x " * 74 + "<p>", {"<p>": 3})
    assert slots == [(75, "<p>", 0)]
    assert ids[75] == tok.standin_id and ids[76] == tok.eos_id


def test_placeholders_match_diffusers_expansion(sd1_dir, tok):
    """diffusers adds <tok>, <tok>_1, <tok>_2 as tokens and rewrites the prompt; same positions."""
    hf = _hf_tokenizer(sd1_dir)
    hf.add_tokens(["<my-dog>", "<my-dog>_1", "<my-dog>_2", "<cat>"])
    prompt = "a <cat> sitting next to <my-dog>, oil painting!"
    converted = prompt.replace("<my-dog>", "<my-dog> <my-dog>_1 <my-dog>_2")
    want = hf(converted, padding="max_length", max_length=77, truncation=True).input_ids
    ids, slots = tok.encode_prompt(prompt, {"<my-dog>": 3, "<cat>": 1})
    added = {hf.convert_tokens_to_ids(t): t for t in ["<my-dog>", "<my-dog>_1", "<my-dog>_2", "<cat>"]}
    want_slots = [(i, added[t].split("_")[0], int(added[t].split("_")[1]) if "_" in added[t] else 0)
                  for i, t in enumerate(want) if t in added]
    assert slots == want_slots
    slot_pos = {p for p, _, _ in slots}
    assert [t for i, t in enumerate(ids.tolist()) if i not in slot_pos] == \
        [t for i, t in enumerate(want) if i not in slot_pos]


def test_batch_encode(tok):
    ids, slots = tok.batch_encode(["a <x> b", "nothing here", "<x><x>"], {"<x>": 2})
    assert ids.shape == (3, 77) and ids.dtype == np.int64
    assert slots == [[(2, "<x>", 0), (3, "<x>", 1)], [], [(1, "<x>", 0), (2, "<x>", 1), (3, "<x>", 0), (4, "<x>", 1)]]
    assert ids[1].tolist() == tok.encode_prompt("nothing here")[0].tolist()


@pytest.mark.parametrize("bad", [{"": 1}, {"<x>": 0}, {"<x>": 1.5}, {"<|endoftext|>": 1}, {" <x>": 1}])
def test_bad_placeholders(tok, bad):
    with pytest.raises(UserError):
        tok.encode_prompt("a <x>", bad)


# --- vocabulary checks ---------------------------------------------------------------------------

def test_single_token_id(tok, hf):
    assert tok.single_token_id("dog") == hf.convert_tokens_to_ids("dog</w>") == 1929
    assert tok.single_token_id("Dog") == 1929
    assert tok.single_token_id("corgification") is None  # several BPE pieces
    assert tok.single_token_id("a dog") is None
    assert tok.single_token_id("") is None
    assert tok.single_token_id("<|endoftext|>") is None  # special: not an init word


def test_is_in_vocab(tok):
    assert tok.is_in_vocab("dog")
    assert tok.is_in_vocab("dog</w>")
    assert tok.is_in_vocab("<|endoftext|>")
    assert not tok.is_in_vocab("<my-dog>")
    assert not tok.is_in_vocab("sks-corgification")
    assert not tok.is_in_vocab("")


def test_decode_like_transformers(tok, hf):
    for text in ["a photo of a dog, 42!", "日本語 café <|endoftext|> x"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False).startswith("<|startoftext|>")


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        CLIPTokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(UserError, match="vocab.json"):
        CLIPTokenizer.from_pretrained(tmp_path)


def test_runtime_import_is_torch_free():
    code = textwrap.dedent("""
        import sys
        import zo_runtime.tokenizer
        heavy = [m for m in ("torch", "transformers", "diffusers", "ftfy") if m in sys.modules]
        assert not heavy, heavy
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
