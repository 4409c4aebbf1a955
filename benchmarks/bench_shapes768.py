"""shapes-768 against shapes: cost of one text-encoder and one UNet pass (ONNX Runtime, the int8w
bundles, the batch of two candidates a zo-edge step runs), bundle sizes, and the recipe's record,
written with the prompt-following results into one results file (README table ``shapes768``).

    python benchmarks/bench_shapes768.py --model shapes-768 --source work/shapes768-diffusers \\
        --prompts prompts-768.json [--scratch work/shapes768-scratch] --out docs/results/shapes768.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def pass_costs(bundle_path: str, threads: int, repeats: int, batch: int = 2) -> dict:
    """Median seconds of one text-encoder run and one UNet run on ``batch`` inputs."""
    from zo_runtime.bundle import Bundle

    b = Bundle.load(bundle_path, threads=threads)
    text, unet = b.session("text_encoder"), b.session("unet")
    rng = np.random.default_rng(0)
    ids = np.full((batch, 77), 49407, np.int64)
    ids[:, 0], ids[:, 1:6] = 49406, 320
    embeds = np.asarray(b.token_table[ids], np.float32)
    feed_t = {"inputs_embeds": embeds}
    if "input_ids" in {i.name for i in text.get_inputs()}:
        feed_t["input_ids"] = ids
    hidden = text.run(["last_hidden_state"], feed_t)[0]
    h = b.resolution // b.vae_scale_factor
    feed_u = {"sample": rng.standard_normal((batch, b.latent_channels, h, h)).astype(np.float32),
              "timestep": b.timestep_feed(700, batch), "encoder_hidden_states": hidden}

    def median(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    t_text = median(lambda: text.run(["last_hidden_state"], feed_t))
    t_unet = median(lambda: unet.run(None, feed_u))
    size = sum(f["bytes"] for f in b.manifest["files"].values())
    return {"text_encoder_s": t_text, "unet_s": t_unet, "text_over_unet": t_text / t_unet, "batch": batch,
            "embedding_dim": b.embedding_dim, "bundle_bytes": size,
            "token_table": {k: v for k, v in b.manifest["token_embedding"].items() if k != "path"}}


def main(argv=None) -> int:
    from zo_edge.models import resolve_model
    from zo_edge.models.quality import machine_info

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes-768")
    ap.add_argument("--baseline", default="shapes")
    ap.add_argument("--source", required=True, help="the recipe's diffusers folder (its zo_edge_recipe.json)")
    ap.add_argument("--prompts", required=True, help="`zo-edge bench prompts --out` of --model")
    ap.add_argument("--scratch", help="a `train_shapes768 --student scratch` output, recorded beside the recipe's")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    recipe_file = Path(args.source) / "zo_edge_recipe.json"
    if not recipe_file.is_file():
        ap.error(f"--source {args.source} has no zo_edge_recipe.json (not built by train_shapes768)")
    recipe = json.loads(recipe_file.read_text())
    recipe.pop("loss_history", None)
    scratch = None
    if args.scratch:
        scratch_file = Path(args.scratch) / "zo_edge_recipe.json"
        if not scratch_file.is_file():
            ap.error(f"--scratch {args.scratch} has no zo_edge_recipe.json")
        scratch = json.loads(scratch_file.read_text())
    report = {
        "what": "shapes-768: the shapes model with a 768-wide text encoder (zo_edge.models.train_shapes768)",
        "machine": machine_info(), "threads": args.threads,
        "command": "python benchmarks/bench_shapes768.py " + " ".join(argv or __import__("sys").argv[1:]),
        "recipe": recipe,
        "scratch_distillation": scratch,
        "pass_cost": {name: pass_costs(resolve_model(m), args.threads, args.repeats)
                      for name, m in (("shapes-768", args.model), ("shapes", args.baseline))},
        "prompts": json.loads(Path(args.prompts).read_text()),
        "prompts_command": f"zo-edge bench prompts --model {args.model} --n 96 --out {args.prompts}",
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["pass_cost"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
