"""Write a CLIP tokenizer (vocab.json, merges.txt, configs) from the BPE file that ships in
``open_clip_torch`` (``bpe_simple_vocab_16e6.txt.gz``), so the shapes recipe (and the test
pipelines of :mod:`zo_edge.testing`) use the real 49,408-token CLIP vocabulary with no download.

The vocabulary order is CLIP's: the 256 byte tokens, their ``</w>`` forms, the 48,894 merges
joined, then ``<|startoftext|>`` and ``<|endoftext|>``.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from zo_runtime.tokenizer import bytes_to_unicode

N_MERGES = 49152 - 256 - 2


def find_bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip_torch is not installed; it ships the CLIP BPE vocabulary")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "bpe_simple_vocab_16e6.txt.gz"
        if p.exists():
            return p
    raise FileNotFoundError("bpe_simple_vocab_16e6.txt.gz not found inside open_clip")


def write_clip_tokenizer(out_dir: str | Path, bpe_path: str | Path | None = None, model_max_length: int = 77) -> Path:
    """Write a Hugging Face CLIPTokenizer folder to ``out_dir``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = gzip.open(bpe_path or find_bpe_file()).read().decode("utf-8")
    merges = [tuple(m.split()) for m in text.split("\n")[1:N_MERGES + 1]]
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "do_lower_case": True, "errors": "replace"}))
    return out
