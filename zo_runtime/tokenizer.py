"""A pure-Python CLIP BPE tokenizer that gives the same ids as transformers' slow ``CLIPTokenizer``
when ``ftfy`` is not installed (torch-free; needs only ``regex`` and ``numpy``).

What transformers does, and what this module repeats step by step:

1. Split the raw text on the *added* tokens (case-sensitive, leftmost-longest): the special tokens
   from the config (bos, eos, unk, pad, additional_special_tokens) and any ``added_tokens_decoder``
   / ``added_tokens.json`` entries. Each match becomes that token's id directly. Note the quirk
   this brings to SD 2.x tokenizers, whose pad token is ``"!"``: every ``"!"`` in a prompt is split
   out and encoded as id 0, not BPE-merged (``"hi!!"`` -> ``hi</w>, !, !``). We match it.
2. Every other chunk goes through BERT's ``BasicTokenizer(strip_accents=False,
   do_split_on_punc=False)`` - transformers' fallback when ftfy is absent: drop NUL, U+FFFD and
   control characters (category C*, except tab/newline/CR), turn whitespace into spaces, put spaces
   around CJK ideographs, NFC-normalize, split on whitespace, lowercase - then rejoin with one space.
3. Pre-tokenize with CLIP's regex, map each piece's UTF-8 bytes to the byte-level alphabet, and run
   BPE with the first 48,894 merges of ``merges.txt`` (the first line, ``#version``, skipped).

With ftfy installed transformers also runs ``ftfy.fix_text`` (curly quotes -> straight, ligatures,
full-width forms, mojibake...). Prompts that ftfy leaves unchanged (plain ASCII and most text)
tokenize identically either way.

Textual-inversion placeholders (``"<my-dog>"``) are never added to the vocabulary. ``encode_prompt``
splits them out like added tokens and stands :data:`STANDIN_TEXT`'s ordinary token id (``"*"``,
``*</w>`` = 265 in CLIP's vocabulary) in each of their slots; the runtime then writes the learned
vectors into ``inputs_embeds`` at those positions. The stand-in is never EOS/pad and is below the
EOS id, so the text encoder's pooling (first EOS, or argmax of ids) is unaffected.
"""
from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import regex

from .errors import UserError

__all__ = ["CLIPTokenizer", "STANDIN_TEXT", "DEFAULT_MAX_LENGTH"]

DEFAULT_MAX_LENGTH = 77
N_MERGES = 49152 - 256 - 2          # what transformers reads from merges.txt (after the header line)
STANDIN_TEXT = "*"                  # its (single, ordinary) token id fills the placeholder slots

_DEFAULT_SPECIALS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}

_PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable character table (the first 512 vocabulary entries are these)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


_BYTE_ENCODER = bytes_to_unicode()


# --- BERT BasicTokenizer(strip_accents=False, do_split_on_punc=False), lower-casing --------------

def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def basic_clean(text: str) -> str:
    """transformers' no-ftfy text cleaning: the BasicTokenizer words, lowercased, joined by spaces."""
    out = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        if _is_whitespace(ch):
            out.append(" ")
        elif _is_cjk(cp):
            out.append(" " + ch + " ")
        else:
            out.append(ch)
    text = unicodedata.normalize("NFC", "".join(out))
    return " ".join(w.lower() for w in text.split())


def _get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(a, b) for a, b in zip(word, word[1:])}


def _token_content(value) -> str | None:
    """A special-token entry of a config: a string or an AddedToken dict ({"content": ...})."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise UserError(f"tokenizer config: cannot read special token {value!r}")


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read tokenizer {what} {path}: {e}") from None


class CLIPTokenizer:
    """CLIP byte-level BPE. Build it with :meth:`from_pretrained` (a tokenizer folder) or directly
    from a vocab dict and a merges list."""

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]], *,
                 bos_token: str = "<|startoftext|>", eos_token: str = "<|endoftext|>",
                 unk_token: str = "<|endoftext|>", pad_token: str = "<|endoftext|>",
                 additional_special_tokens: Iterable[str] = (),
                 added_tokens: Mapping[str, int] | None = None,
                 max_length: int = DEFAULT_MAX_LENGTH):
        self.encoder = dict(encoder)
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.bpe_ranks = {tuple(m): i for i, m in enumerate(merges)}
        self.max_length = int(max_length)
        if self.max_length < 2:
            raise UserError(f"tokenizer max_length must be at least 2 (BOS and EOS), got {self.max_length}")
        self.cache: dict[str, str] = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}

        # Added tokens, split out of the text before BPE: explicit ones first, then the special tokens.
        self.added_tokens: dict[str, int] = dict(added_tokens or {})
        specials = {"bos": bos_token, "eos": eos_token, "unk": unk_token, "pad": pad_token}
        special_ids = set()
        for name, tok in [*specials.items(), *(("additional", t) for t in additional_special_tokens)]:
            if tok not in self.added_tokens:
                if tok not in self.encoder:
                    raise UserError(f"tokenizer: {name} token {tok!r} is not in the vocabulary")
                self.added_tokens[tok] = self.encoder[tok]
            special_ids.add(self.added_tokens[tok])
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.bos_id = self.added_tokens[bos_token]
        self.eos_id = self.added_tokens[eos_token]
        self.unk_id = self.added_tokens[unk_token]
        self.pad_id = self.added_tokens[pad_token]
        self.special_ids = frozenset(special_ids)  # bos/eos/unk/pad/additional (not other added tokens)
        self._added_re = self._split_regex(self.added_tokens)

        standin = self._tokens_to_ids(self.tokenize(STANDIN_TEXT))
        added_ids = set(self.added_tokens.values())
        if len(standin) == 1 and standin[0] in self.decoder and standin[0] not in added_ids and standin[0] < self.eos_id:
            self.standin_id = standin[0]
        else:  # an unusual vocabulary: the lowest ordinary id
            self.standin_id = min(i for i in self.decoder if i not in added_ids)

    # --- construction ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "CLIPTokenizer":
        """Read a Hugging Face CLIP tokenizer folder: vocab.json, merges.txt and, if present,
        tokenizer_config.json, special_tokens_map.json and added_tokens.json (same precedence as
        transformers: special_tokens_map.json overrides the config unless the config carries
        ``added_tokens_decoder``)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"tokenizer folder not found: {folder}")
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        for p in (vocab_path, merges_path):
            if not p.is_file():
                raise UserError(f"tokenizer folder {folder} has no {p.name}")
        encoder = _read_json(vocab_path, "vocabulary")
        if not isinstance(encoder, dict) or not all(isinstance(v, int) for v in encoder.values()):
            raise UserError(f"{vocab_path} is not a token -> id mapping")
        try:
            lines = merges_path.read_text(encoding="utf-8").strip().split("\n")[1:N_MERGES + 1]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {merges_path}: {e}") from None
        merges = [tuple(line.split()) for line in lines]

        config = _read_json(folder / "tokenizer_config.json", "config") if (folder / "tokenizer_config.json").is_file() else {}
        if not isinstance(config, dict):
            raise UserError(f"{folder / 'tokenizer_config.json'} is not a JSON object")
        kw = {k: config.get(k) for k in (*_DEFAULT_SPECIALS, "additional_special_tokens")}
        added: dict[str, int] = {}
        if "added_tokens_decoder" in config:
            for idx, tok in (config["added_tokens_decoder"] or {}).items():
                added[_token_content(tok)] = int(idx)
        else:
            stm_path = folder / "special_tokens_map.json"
            if stm_path.is_file():
                stm = _read_json(stm_path, "special tokens map")
                for k in kw:
                    if k in stm:
                        kw[k] = stm[k]
            at_path = folder / "added_tokens.json"
            if at_path.is_file():
                added.update({str(k): int(v) for k, v in _read_json(at_path, "added tokens").items()})

        specials = {k: _token_content(kw[k]) or default for k, default in _DEFAULT_SPECIALS.items()}
        extra = [_token_content(t) for t in (kw["additional_special_tokens"] or [])]
        max_length = config.get("model_max_length", DEFAULT_MAX_LENGTH)
        if not isinstance(max_length, (int, float)) or not 2 <= max_length <= 1_000_000:
            max_length = DEFAULT_MAX_LENGTH  # transformers' "unset" is VERY_LARGE_INTEGER
        return cls(encoder, merges, **specials, additional_special_tokens=extra, added_tokens=added,
                   max_length=int(max_length))

    @property
    def vocab_size(self) -> int:
        """Size of vocab.json (added tokens beyond it are not counted, as in transformers)."""
        return len(self.encoder)

    # --- tokenization ----------------------------------------------------------------------------

    @staticmethod
    def _split_regex(strings: Iterable[str]):
        alts = sorted({s for s in strings if s}, key=lambda s: (-len(s), s))
        return regex.compile("|".join(regex.escape(s) for s in alts)) if alts else None

    def bpe(self, token: str) -> str:
        """BPE of one pre-token (already byte-encoded); returns space-separated sub-tokens."""
        cached = self.cache.get(token)
        if cached is not None:
            return cached
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _get_pairs(word)
        if not pairs:
            return token + "</w>"
        ranks = self.bpe_ranks
        while True:
            bigram = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if bigram not in ranks:
                break
            first, second = bigram
            new_word: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = _get_pairs(word)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def _bpe_chunk(self, text: str) -> list[str]:
        """transformers' ``_tokenize``: a chunk that holds no added token."""
        tokens: list[str] = []
        for piece in _PAT.findall(basic_clean(text)):
            piece = "".join(_BYTE_ENCODER[b] for b in piece.encode("utf-8"))
            tokens.extend(self.bpe(piece).split(" "))
        return tokens

    def _split(self, text: str, pattern) -> list[tuple[str, bool]]:
        """[(chunk, is_match)] with empty chunks dropped."""
        if pattern is None:
            return [(text, False)] if text else []
        out, pos = [], 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                out.append((text[pos:m.start()], False))
            out.append((m.group(), True))
            pos = m.end()
        if pos < len(text):
            out.append((text[pos:], False))
        return out

    def tokenize(self, text: str) -> list[str]:
        """The token strings of ``text`` (no BOS/EOS)."""
        if not isinstance(text, str):
            raise UserError(f"prompt must be a string, got {type(text).__name__}")
        tokens: list[str] = []
        for chunk, is_added in self._split(text, self._added_re):
            if is_added:
                tokens.append(chunk)
            else:
                tokens.extend(self._bpe_chunk(chunk))
        return tokens

    def _tokens_to_ids(self, tokens: list[str]) -> list[int]:
        added, enc, unk = self.added_tokens, self.encoder, self.unk_id
        return [added[t] if t in added else enc.get(t, unk) for t in tokens]

    def encode(self, text: str) -> list[int]:
        """``[BOS] + ids + [EOS]``; no padding, no truncation."""
        return [self.bos_id, *self._tokens_to_ids(self.tokenize(text)), self.eos_id]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids back to text (for messages and debugging), as transformers' ``decode``."""
        byte_decoder = {v: k for k, v in _BYTE_ENCODER.items()}
        id_to_added = {j: t for t, j in self.added_tokens.items()}
        out = bytearray()
        for i in ids:
            i = int(i)
            if i in id_to_added:
                if not (skip_special_tokens and i in self.special_ids):
                    out += (id_to_added[i] + " ").encode("utf-8")
                continue
            out += bytearray(byte_decoder[c] for c in self.decoder.get(i, "") if c in byte_decoder)
        return out.decode("utf-8", "replace").replace("</w>", " ").strip()

    # --- placeholders ----------------------------------------------------------------------------

    def _check_placeholders(self, placeholders: Mapping[str, int] | None) -> dict[str, int]:
        if not placeholders:
            return {}
        out = {}
        for name, n in placeholders.items():
            if not isinstance(name, str) or not name or name != name.strip():
                raise UserError(f"placeholder {name!r} must be a non-empty string without surrounding spaces")
            if name in self.added_tokens:
                raise UserError(f"placeholder {name!r} is a special token of the tokenizer")
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise UserError(f"placeholder {name!r}: number of vectors must be a positive integer, got {n!r}")
            out[name] = int(n)
        return out

    def encode_prompt(self, text: str, placeholders: Mapping[str, int] | None = None
                      ) -> tuple[np.ndarray, list[tuple[int, str, int]]]:
        """Encode one prompt for the text encoder.

        ``placeholders`` maps each placeholder string to its number of vectors. The text is split on
        placeholders and added tokens together (longest first, like transformers' added-token trie,
        so ``"<dog>"`` is found even inside ``"a<dog>."``); a placeholder with n vectors fills n
        positions with :attr:`standin_id`. Returns ``(ids, slots)``: ``ids`` int64
        ``[max_length]`` = BOS, tokens truncated to ``max_length - 2``, EOS, pad; ``slots`` =
        ``[(position, placeholder, vector_index), ...]`` in position order, only for slots that
        survived truncation.
        """
        if not isinstance(text, str):
            raise UserError(f"prompt must be a string, got {type(text).__name__}")
        ph = self._check_placeholders(placeholders)
        pattern = self._split_regex([*ph, *self.added_tokens]) if ph else self._added_re
        ids: list[int] = []
        marks: list[tuple[int, str, int]] = []   # (index into ids, placeholder, k)
        for chunk, matched in self._split(text, pattern):
            if matched and chunk in ph:
                for k in range(ph[chunk]):
                    marks.append((len(ids), chunk, k))
                    ids.append(self.standin_id)
            elif matched:
                ids.append(self.added_tokens[chunk])
            else:
                ids.extend(self._tokens_to_ids(self._bpe_chunk(chunk)))
        keep = self.max_length - 2
        ids = ids[:keep]
        out = np.full(self.max_length, self.pad_id, dtype=np.int64)
        out[0] = self.bos_id
        out[1:1 + len(ids)] = ids
        out[1 + len(ids)] = self.eos_id
        slots = [(i + 1, name, k) for i, name, k in marks if i < keep]
        return out, slots

    def batch_encode(self, texts: Iterable[str], placeholders: Mapping[str, int] | None = None
                     ) -> tuple[np.ndarray, list[list[tuple[int, str, int]]]]:
        """:meth:`encode_prompt` for each text: ids int64 ``[B, max_length]`` and the slots per text."""
        if isinstance(texts, str):
            texts = [texts]
        rows, slots = [], []
        for t in texts:
            r, s = self.encode_prompt(t, placeholders)
            rows.append(r)
            slots.append(s)
        if not rows:
            return np.zeros((0, self.max_length), dtype=np.int64), []
        return np.stack(rows), slots

    # --- vocabulary checks -----------------------------------------------------------------------

    def single_token_id(self, word: str) -> int | None:
        """The id of ``word`` if it encodes to exactly one ordinary (non-special) token, else None.
        Used to validate an ``--init`` word: ``"dog"`` -> 1929; ``"corgification"`` -> None."""
        if not isinstance(word, str):
            return None
        ids = self._tokens_to_ids(self.tokenize(word))
        if len(ids) != 1 or ids[0] in self.special_ids:
            return None
        return ids[0]

    def is_in_vocab(self, text: str) -> bool:
        """True if ``text`` would clash with the vocabulary as a placeholder name: it tokenizes to a
        single existing token (``"dog"``), is an added/special token, or is itself a raw vocabulary
        entry (``"dog</w>"``, ``"ing"`` - what diffusers' ``load_textual_inversion`` refuses)."""
        if not isinstance(text, str) or not text:
            return False
        if text in self.encoder or text in self.added_tokens:
            return True
        toks = self.tokenize(text)
        return len(toks) == 1 and (toks[0] in self.encoder or toks[0] in self.added_tokens)
