"""Derive a weight-only bundle (int8w, int4w) from an FP32 bundle, without exporting or fusing again.

The FP32 convert of an SD1.5-sized UNet peaks at ~20 GB in the fusion stage; once that bundle
exists, ``requantize_bundle`` makes the ``int8w`` bundle (the one personalization wants) in a few
minutes at a few GB: each graph's constant weights become int8 per-channel behind DequantizeLinear
(``int4w``: the UNet's 4-bit in blocks of 32 inputs).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from zo_runtime.errors import UserError
from zo_runtime.manifest import inside, listed, read_bundle_manifest

from .manifest import GRAPH_ORDER, check_bundle_out, graph_entry, replace_dir, write_manifest


def _graph_files(m: dict) -> set[str]:
    """The files the graphs own (re-made by quantizing, not copied)."""
    own = set()
    for g in m["graphs"].values():
        own.add(g["path"])
        if "external_data" in g:
            own.add(g["external_data"])
    return own


def copy_listed(src: Path, m: dict, dst: Path, skip: set[str]) -> None:
    """Copy every file the manifest lists, except ``skip``, from ``src`` to the same relative path
    under ``dst``. Both ends are checked to stay inside their folders (manifest paths are input)."""
    for rel in m["files"]:
        if rel in skip:
            continue
        source = listed(src, m, rel, "files entry")
        target = inside(dst, rel, "files entry")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def requantize_bundle(src: str | Path, out: str | Path, overwrite: bool = False, progress=print,
                      weights: str = "int8w") -> dict:
    """A weight-only bundle (``int8w``; ``int4w``: the UNet at 4 bits) derived from an fp32 bundle."""
    from zo_runtime.bundle import WEIGHT_ONLY_BITS

    from .quantize import quantize_weight_only

    if weights not in WEIGHT_ONLY_BITS:
        raise UserError(f"requantize makes {' or '.join(WEIGHT_ONLY_BITS)}, not {weights!r}")

    src, out = Path(src), Path(out)
    m = read_bundle_manifest(src)
    q = m.get("quantization")
    if not isinstance(q, dict) or q.get("weights") != "fp32":
        raise UserError(f"{src} is not an fp32 bundle (weights {q.get('weights') if isinstance(q, dict) else None!r}); "
                        "requantize starts from `zo-edge convert --weights fp32`")
    unknown = [g for g in m["graphs"] if g not in GRAPH_ORDER]
    if unknown:
        raise UserError(f"{src}: unknown graph {unknown[0]!r} in the manifest; expected {', '.join(GRAPH_ORDER)}")
    check_bundle_out(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.zo-requant-", dir=out.parent))
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    t0 = time.time()
    try:
        copy_listed(src, m, tmp, skip=_graph_files(m))
        recipes, graphs = {}, {}
        for g in GRAPH_ORDER:
            if g not in m["graphs"]:
                continue
            (tmp / g).mkdir(exist_ok=True)
            bits = WEIGHT_ONLY_BITS[weights] if g == "unet" else 8
            progress(f"[quantize] {g} weight-only int{bits} ...")
            recipes[g] = quantize_weight_only(listed(src, m, m["graphs"][g]["path"], f"graph {g} path"),
                                              tmp / g / "model.onnx", bits=bits)
            extra = {k: v for k, v in m["graphs"][g].items() if k not in ("path", "precision", "inputs", "outputs",
                                                                           "external_data")}
            graphs[g] = graph_entry(tmp, g, f"int{bits}w", extra)
        new = json.loads(json.dumps(m))
        new["graphs"] = graphs
        new["quantization"] = {"weights": weights, "text_encoder_fp32": False, "fuse": q.get("fuse"),
                               "provider": q.get("provider"), "derived_from": str(src),
                               "calibration": None, "graphs": recipes}
        new["accuracy"] = {"note": f"derived from the FP32 bundle by requantize; weight-only {weights}"}
        new["build"] = {"seconds": round(time.time() - t0, 1), "stages": {"requantize": {}}}
        write_manifest(tmp, new)
        check_bundle_out(out, overwrite)
        replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"wrote {out}: weights {weights} in {time.time() - t0:.1f} s")
    return new
