"""Learned textual-inversion embeddings on disk: safetensors only, never unpickled.

Written (:func:`save_embedding`) in diffusers' textual-inversion format - one tensor whose key is
the placeholder, float32 ``[n_vectors, dim]``, metadata ``{"format": "pt"}`` - so
``pipe.load_textual_inversion(path)`` reads it as is (for n > 1 diffusers names the extra tokens
``<tok>_1``, ``<tok>_2``, ...).

Read (:func:`load_embeddings`):

* diffusers / ours: one tensor, key = placeholder; ``[dim]`` becomes ``[1, dim]``;
* Automatic1111 saved as safetensors: ``string_to_param.*`` (other A1111 keys ignored), or a
  single ``emb_params`` tensor; the placeholder is the metadata ``name`` if present, else the file
  stem (A1111 itself names an embedding after its file);
* SDXL (``clip_l`` + ``clip_g``): refused here (an SD 1.x/2.x model); SDXL bundles read them with
  :func:`zo_runtime.sdxl.load_sdxl_embeddings`;
* pickles / zip archives (``.bin``, ``.pt``, ``.ckpt``...): refused, with a one-line command that
  converts them on a machine that has torch.

bf16 tensors are widened to float32 here (numpy has no bfloat16).
"""
from __future__ import annotations

import json
import math
import os
import shlex
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .errors import UserError
from .outputs import write_atomic

__all__ = ["save_embedding", "load_embeddings", "PICKLE_SUFFIXES"]

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
_MAX_HEADER = 100 * 1024 * 1024
_NP_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}
_KNOWN_DIMS = "SD 1.x: 768, SD 2.x: 1024"


def _convert_hint(path: Path) -> str:
    src = str(path)
    dst = str(path.with_suffix(".safetensors"))
    return ("python -c \"import sys,torch,safetensors.torch as s; d=torch.load(sys.argv[1],map_location='cpu',"
            "weights_only=True); d={'emb_params':next(iter(d['string_to_param'].values()))} if 'string_to_param' in d "
            "else d; s.save_file({k:v.float().contiguous() for k,v in d.items() if torch.is_tensor(v)},sys.argv[2])\" "
            f"{shlex.quote(src)} {shlex.quote(dst)}")


def _refuse_pickle(path: Path, why: str):
    raise UserError(f"{path}: {why}; pickles are refused because loading one can run arbitrary code - "
                    f"convert it once, with torch, on a machine you trust: {_convert_hint(path)}")


# --- save --------------------------------------------------------------------------------------------

def save_embedding(path: str | Path, placeholder: str, vectors: np.ndarray,
                   extra_metadata: Mapping[str, object] | None = None, overwrite: bool = True) -> Path:
    """Write ``{placeholder: vectors}`` (float32 ``[n, dim]``; ``[dim]`` is taken as ``[1, dim]``)
    atomically: a temporary file in the same folder, then renamed into place (without
    ``overwrite`` an existing file is never replaced); mode 0644 less the umask. Metadata is
    ``extra_metadata`` (values that are not strings are stored as JSON) plus ``format: pt``.
    Returns the path."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"{path}: embeddings are saved as safetensors; use a .safetensors file name")
    if not isinstance(placeholder, str) or not placeholder or placeholder != placeholder.strip():
        raise UserError(f"placeholder {placeholder!r} must be a non-empty string without surrounding spaces")
    arr = np.asarray(vectors)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise UserError(f"embedding vectors must have shape [n_vectors, dim], got {list(np.shape(vectors))}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise UserError(f"embedding vectors must be floating point, got {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise UserError(f"refusing to save embedding {placeholder!r}: it contains NaN or infinite values")

    metadata: dict[str, str] = {}
    for k, v in (extra_metadata or {}).items():
        metadata[str(k)] = v if isinstance(v, str) else json.dumps(v)
    metadata["format"] = "pt"

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write embedding to {path}: {e.strerror or e}") from None
    return write_atomic(path, lambda tmp: save_file({placeholder: arr}, str(tmp), metadata=metadata), overwrite,
                        "embedding")


# --- load --------------------------------------------------------------------------------------------

def _read_header(path: Path) -> tuple[dict, dict[str, str], int]:
    """The safetensors header (tensor entries), its metadata, and the data offset; pickles and zips
    are recognized from their first bytes and refused."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if head[:4] == b"PK\x03\x04":
                _refuse_pickle(path, "this is a zip archive (a torch.save file)")
            if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
                _refuse_pickle(path, "this is a pickle file")
            if len(head) < 8:
                raise UserError(f"{path} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > min(_MAX_HEADER, size - 8):
                raise UserError(f"{path} is not a safetensors file (bad header length)")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"cannot read embedding file {path}: {e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"{path} is not a safetensors file (unreadable header)") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        metadata = {}
    return header, {str(k): str(v) for k, v in metadata.items()}, 8 + n


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_tensor(path: Path, f, info: dict, data_start: int, key: str) -> np.ndarray:
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape) \
            or not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise UserError(f"{path}: malformed safetensors entry for {key!r}")
    begin, end = offsets
    count = math.prod(shape)
    if dtype == "BF16":
        width, np_dtype = 2, None
    elif dtype in _NP_DTYPES:
        np_dtype = np.dtype(_NP_DTYPES[dtype]).newbyteorder("<")
        width = np_dtype.itemsize
    else:
        raise UserError(f"{path}: tensor {key!r} has dtype {dtype}; an embedding must be floating point")
    if end - begin != count * width or not 0 <= begin <= end:
        raise UserError(f"{path}: tensor {key!r} has inconsistent size in the safetensors header")
    if data_start + end > os.fstat(f.fileno()).st_size:
        raise UserError(f"{path}: file is truncated (tensor {key!r})")
    f.seek(data_start + begin)
    buf = f.read(end - begin)
    if len(buf) != end - begin:
        raise UserError(f"{path}: file is truncated (tensor {key!r})")
    if np_dtype is None:  # bfloat16: the high half of a float32
        arr = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        arr = np.frombuffer(buf, dtype=np_dtype)
    return arr.astype(np.float32).reshape(shape)


def _as_matrix(path: Path, name: str, arr: np.ndarray, expected_dim: int | None) -> np.ndarray:
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise UserError(f"{path}: embedding {name!r} has shape {list(arr.shape)}; expected [n_vectors, dim]")
    if expected_dim is not None and arr.shape[1] != int(expected_dim):
        raise UserError(f"{path}: embedding {name!r} has dimension {arr.shape[1]} but this model's text encoder "
                        f"expects {int(expected_dim)} ({_KNOWN_DIMS}); it was trained for another model family")
    if not np.isfinite(arr).all():
        raise UserError(f"{path}: embedding {name!r} contains NaN or infinite values")
    return np.ascontiguousarray(arr, dtype=np.float32)


def load_embeddings(path: str | Path, expected_dim: int | None = None) -> dict[str, np.ndarray]:
    """``{placeholder: float32 [n_vectors, dim]}`` from a safetensors embedding file (see the module
    docstring for the layouts). Bad files, pickles, SDXL embeddings and a ``dim`` other than
    ``expected_dim`` raise :class:`UserError`."""
    path = Path(path)
    if path.is_dir():
        inner = path / "learned_embeds.safetensors"   # a diffusers textual-inversion output folder
        if not inner.is_file():
            raise UserError(f"{path} is a folder without learned_embeds.safetensors; pass the embedding file")
        path = inner
    if not path.is_file():
        raise UserError(f"embedding file not found: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        _refuse_pickle(path, f"a {path.suffix} file is a pickle")
    header, metadata, data_start = _read_header(path)
    keys = list(header)
    if not keys:
        raise UserError(f"{path} holds no tensors")
    if {"clip_l", "clip_g"} <= set(keys):
        want = f" (width {int(expected_dim)})" if expected_dim is not None else ""
        raise UserError(f"{path} is an SDXL embedding (clip_l + clip_g tensors); this model takes SD 1.x/2.x "
                        f"embeddings{want}: use it with an SDXL bundle")

    stem_name = metadata.get("name") or path.stem
    params = [k for k in keys if k.startswith("string_to_param.")]
    if params:                                   # A1111, flattened into safetensors
        if len(params) != 1:
            raise UserError(f"{path}: A1111 embedding with {len(params)} string_to_param entries; expected one")
        picks = [(stem_name, params[0])]
    elif keys == ["emb_params"]:                 # A1111 single-tensor layout
        picks = [(stem_name, "emb_params")]
    elif len(keys) == 1:                         # diffusers / zo-edge
        picks = [(keys[0], keys[0])]
    else:
        shown = ", ".join(sorted(keys)[:5]) + (", ..." if len(keys) > 5 else "")
        raise UserError(f"{path}: not a textual-inversion embedding ({len(keys)} tensors: {shown}); expected one "
                        f"tensor named after the placeholder, or A1111's string_to_param / emb_params")

    out: dict[str, np.ndarray] = {}
    try:
        with open(path, "rb") as f:
            for name, key in picks:
                info = header[key]
                if not isinstance(info, dict):
                    raise UserError(f"{path}: malformed safetensors entry for {key!r}")
                out[name] = _as_matrix(path, name, _read_tensor(path, f, info, data_start, key), expected_dim)
    except OSError as e:
        raise UserError(f"cannot read embedding file {path}: {e}") from None
    return out
