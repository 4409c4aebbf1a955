"""Derive a weight-only INT8 bundle from an FP32 bundle, without exporting or fusing again.

The FP32 convert of an SD1.5-sized UNet peaks at ~20 GB in the fusion stage; once that bundle
exists, ``requantize_bundle`` makes the ``int8w`` bundle (the one personalization wants) in a few
minutes at a few GB: each graph's constant weights become int8 per-channel behind DequantizeLinear.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from zo_runtime.errors import UserError

from .manifest import GRAPH_ORDER, check_bundle_out, graph_entry, read_manifest, replace_dir, write_manifest
from .quantize import quantize_weight_only_int8


def requantize_bundle(src: str | Path, out: str | Path, overwrite: bool = False, progress=print) -> dict:
    src, out = Path(src), Path(out)
    m = read_manifest(src)
    if m.get("quantization", {}).get("weights") != "fp32":
        raise UserError(f"{src} is not an fp32 bundle (weights {m.get('quantization', {}).get('weights')!r}); "
                        "requantize starts from `zo-edge convert --weights fp32`")
    check_bundle_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.zo-requant-", dir=out.parent))
    t0 = time.time()
    try:
        for sub in ("tokenizer", "scheduler"):
            shutil.copytree(src / sub, tmp / sub)
        recipes, graphs = {}, {}
        for g in GRAPH_ORDER:
            if g not in m["graphs"]:
                continue
            (tmp / g).mkdir()
            progress(f"[quantize] {g} weight-only int8 ...")
            recipes[g] = quantize_weight_only_int8(src / m["graphs"][g]["path"], tmp / g / "model.onnx")
            extra = {k: v for k, v in m["graphs"][g].items() if k not in ("path", "precision", "inputs", "outputs",
                                                                           "external_data")}
            graphs[g] = graph_entry(tmp, g, "int8w", extra)
        shutil.copyfile(src / m["token_embedding"]["path"], tmp / m["token_embedding"]["path"])
        new = json.loads(json.dumps(m))
        new["graphs"] = graphs
        new["quantization"] = {"weights": "int8w", "text_encoder_fp32": False, "fuse": m["quantization"].get("fuse"),
                               "provider": m["quantization"].get("provider"), "derived_from": str(src),
                               "calibration": None, "graphs": recipes}
        new["accuracy"] = {"note": "derived from the FP32 bundle by requantize; weight-only INT8 per channel"}
        new["build"] = {"seconds": round(time.time() - t0, 1), "stages": {"requantize": {}}}
        write_manifest(tmp, new)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"wrote {out}: weights int8w in {time.time() - t0:.1f} s")
    return new
