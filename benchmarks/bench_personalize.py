"""Personalize speed and memory, side by side in one run (a script, not a test).

For each resolution: seconds per iteration, UNet forward passes per second and the peak RSS of the
whole process, each configuration in its own fresh process:
  - zo-edge personalize on the bundle (ORT, n = 2, batched and sequential candidates),
  - PyTorch FP32 backprop textual inversion (one step: forward + backward + Adam),
  - PyTorch FP32 forward-only step (n + 1 = 3 candidates batched, no_grad),
  - the reference method's own stack (``ref-quanto``, github ignoww/ZOODiP): diffusers in PyTorch with
    optimum-quanto qint8 weights on the text encoder, UNet and VAE, the 3 candidates one after another,
    each through the text encoder with the token's row perturbed, and the reference image VAE-encoded
    again every step (needs ``pip install optimum-quanto==0.2.7``; without it the row reports an error).

    python benchmarks/bench_personalize.py --bundle sd15-int8 --source sd15-random \
        --resolutions 256,512 --iters 4

Without --bundle/--source it builds the SD1.5-shaped random-weight pipeline and converts it
(several minutes, ~12 GB peak).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from zo_runtime.sysinfo import cpu_model


def _refs(folder: Path, res: int) -> Path:
    from PIL import Image

    from zo_edge.models import world

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(world.reference_images(world.Subject("star", "red", "striped"), n=4, size=res)):
        Image.fromarray(im).save(folder / f"{i}.png")
    return folder


def child_zo(args) -> dict:
    from zo_runtime.personalize import PersonalizeConfig, Trainer

    work = Path(tempfile.mkdtemp())
    cfg = PersonalizeConfig(model=args.bundle, images=str(_refs(work / "refs", args.res)), token="<bench>",
                            init="dog", out=str(work / "e.safetensors"), run_dir=str(work / "run"),
                            steps=args.warmup + args.iters, resolution=args.res,
                            batch_candidates=args.batch_candidates, checkpoint_every=10**6,
                            low_memory=args.low_memory, provider=args.provider)
    t_setup = time.time()
    trainer = Trainer(cfg)
    setup = time.time() - t_setup
    setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # VAE encoding included
    stamps = []
    trainer.train(callback=lambda s, th: stamps.append(time.time()))
    per = np.diff(stamps[args.warmup - 1:]) if args.warmup else np.diff([stamps[0]] + stamps)
    return {"setup_s": setup, "setup_peak_rss_mb": setup_peak, "s_per_iter": float(np.median(per)),
            "unet_passes_per_iter": trainer.rge.passes}


def child_torch(args, backprop: bool) -> dict:
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    src = Path(args.source)
    text = CLIPTextModel.from_pretrained(src / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(src / "unet").eval()
    for m in (text, unet):
        m.requires_grad_(False)
    emb = text.get_input_embeddings()
    h = args.res // 8
    ids = torch.randint(0, 49000, (1, 77))
    k = 1 if backprop else 3
    if backprop:
        emb.weight.requires_grad_(True)
        opt = torch.optim.AdamW([emb.weight], lr=5e-3)
    times = []
    for i in range(args.warmup + args.iters):
        t0 = time.time()
        x = torch.randn(k, 4, h, h)
        t = torch.tensor([700] * k)
        if backprop:
            out = unet(x, t, encoder_hidden_states=text(ids)[0]).sample
            loss = ((out - x) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            with torch.no_grad():
                hidden = text(ids.repeat(k, 1))[0]
                out = unet(x, t, encoder_hidden_states=hidden).sample
                ((out - x) ** 2).mean(dim=(1, 2, 3))
        times.append(time.time() - t0)
    return {"s_per_iter": float(np.median(times[args.warmup:])), "unet_passes_per_iter": k}


def child_ref(args) -> dict:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from optimum.quanto import freeze, qint8, quantize
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    src = Path(args.source)
    text = CLIPTextModel.from_pretrained(src / "text_encoder").eval()
    vae = AutoencoderKL.from_pretrained(src / "vae").eval()
    unet = UNet2DConditionModel.from_pretrained(src / "unet").eval()
    for m in (text, vae, unet):
        m.requires_grad_(False)
        quantize(m, weights=qint8)
        freeze(m)
    emb = text.get_input_embeddings()
    ids = torch.randint(0, 49000, (1, 77))
    row = int(ids[0, 5])
    theta = emb.weight[row].clone()
    image = torch.rand(1, 3, args.res, args.res) * 2 - 1
    times = []
    with torch.no_grad():
        for i in range(args.warmup + args.iters):
            t0 = time.time()
            z = vae.encode(image).latent_dist.sample() * vae.config.scaling_factor  # re-encoded every step
            noise = torch.randn_like(z)
            x, t = z + noise, torch.tensor([700])
            for k in range(3):  # the base point and n = 2 perturbed candidates, one after another
                emb.weight[row] = theta if k == 0 else theta + 1e-3 * torch.randn_like(theta)
                out = unet(x, t, encoder_hidden_states=text(ids)[0]).sample
                ((out - noise) ** 2).mean()
            times.append(time.time() - t0)
    return {"s_per_iter": float(np.median(times[args.warmup:])), "unet_passes_per_iter": 3}


def run_child(kind: str, args, extra: list[str], python: str | None = None) -> dict:
    cmd = [python or sys.executable, __file__, "--child", kind, "--res", str(args.res_now), "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--bundle", str(args.bundle), "--source", str(args.source)] + extra
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle")
    ap.add_argument("--source")
    ap.add_argument("--resolutions", default="256,512")
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma list of configs to skip: zo-batched,zo-seq,torch-ti,torch-fwd,ref-quanto")
    ap.add_argument("--child")
    ap.add_argument("--res", type=int)
    ap.add_argument("--batch-candidates", default="auto")
    ap.add_argument("--also", default="",
                    help="more bundles, each run as a candidates-batched zo-edge row: NAME=PATH,... (e.g. int4w=sd15-int4w)")
    ap.add_argument("--also-provider", default="",
                    help="the execution provider of --also rows: NAME=PROVIDER,... (e.g. ov=openvino; default cpu)")
    ap.add_argument("--also-python", default="",
                    help="the Python of --also rows: NAME=EXE,... (e.g. ov=/venv-openvino/bin/python, whose "
                         "onnxruntime build has the provider; that environment needs zo-edge installed)")
    ap.add_argument("--provider", default="cpu", help=argparse.SUPPRESS)  # a child's provider
    ap.add_argument("--low-memory", action="store_true",
                    help="also run every candidates-batched zo-edge bundle row with personalize --low-memory")
    ap.add_argument("--out")
    args = ap.parse_args()

    if args.child:
        r = (child_zo(args) if args.child == "zo" else child_ref(args) if args.child == "ref"
             else child_torch(args, backprop=args.child == "torch-ti"))
        r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(r))
        return

    if not args.bundle or not args.source:
        from zo_edge.convert import convert_pipeline
        from zo_edge.models.calibration import SHAPES_WORLD
        from zo_edge.testing import build_pipeline

        work = Path(tempfile.mkdtemp(prefix="zo-bench-"))
        print(f"building SD1.5-shaped random-weight pipeline and INT8 bundle in {work}", file=sys.stderr)
        args.source = str(build_pipeline(work / "sd15", family="sd1", size="sd15"))
        convert_pipeline(args.source, work / "sd15-int8", weights="int8", data=SHAPES_WORLD)
        args.bundle = str(work / "sd15-int8")

    skip = set(filter(None, args.skip.split(",")))
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    rows = []
    for res in [int(r) for r in args.resolutions.split(",")]:
        args.res_now = res
        configs = [("zo-batched", "zo", ["--batch-candidates", "on"]), ("zo-seq", "zo", ["--batch-candidates", "off"]),
                   ("torch-ti", "torch-ti", []), ("torch-fwd", "torch-fwd", []), ("ref-quanto", "ref", [])]
        providers = dict(item.split("=", 1) for item in filter(None, args.also_provider.split(",")))
        pythons = dict(item.split("=", 1) for item in filter(None, args.also_python.split(",")))
        for item in filter(None, args.also.split(",")):
            label, _, path = item.partition("=")
            configs.insert(1, (f"zo-batched-{label}", "zo", ["--batch-candidates", "on", "--bundle", path,
                                                              "--provider", providers.get(label, "cpu")]))
        if args.low_memory:
            zo = [c for c in configs if c[0].startswith("zo-batched")]
            at = max(i for i, c in enumerate(configs) if c[0].startswith("zo-batched")) + 1
            configs[at:at] = [(f"{name}+low-memory", kind, extra + ["--low-memory"]) for name, kind, extra in zo]
        for name, kind, extra in configs:
            if name in skip:
                continue
            print(f"{res} px {name} ...", file=sys.stderr, flush=True)
            label = name.removeprefix("zo-batched-").split("+")[0]
            r = run_child(kind, args, extra, pythons.get(label) if name.startswith("zo-batched-") else None)
            if "--provider" in extra:
                r["provider"] = extra[extra.index("--provider") + 1]
            r.update(config=name, resolution=res)
            if "s_per_iter" in r:
                r["unet_passes_per_s"] = r["unet_passes_per_iter"] / r["s_per_iter"]
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {cpu_model()}")
    print("| res | config | s/iter | UNet passes/s | peak RSS MB | vs torch-ti s/iter | vs torch-ti RSS |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = next((b for b in rows if b["config"] == "torch-ti" and b["resolution"] == r["resolution"]
                     and "s_per_iter" in b), None)
        if "error" in r:
            print(f"| {r['resolution']} | {r['config']} | error: {r['error']} | | | | |")
            continue
        ratio_t = f"{r['s_per_iter'] / base['s_per_iter']:.2f}x" if base else "-"
        ratio_m = f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x" if base else "-"
        print(f"| {r['resolution']} | {r['config']} | {r['s_per_iter']:.2f} | {r['unet_passes_per_s']:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {ratio_t} | {ratio_m} |")
    if args.out:
        from zo_runtime.sysinfo import source_commit
        report = {"benchmark": "bench_personalize", "commit": source_commit(), "bundle": args.bundle, "also": args.also,
                  "also_provider": args.also_provider, "also_python": args.also_python,
                  "source": args.source, "iters": args.iters, "warmup": args.warmup,
                  "threads": "onnxruntime and torch defaults (every core)",
                  "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                              "python": platform.python_version()},
                  "loadavg_start": loadavg_start, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                  "rows": rows}
        Path(args.out).write_text(json.dumps(report, indent=2))


def table(report: dict) -> str:
    """The README's table: per resolution and configuration, s/iter, UNet passes/s and peak RSS, with
    the ratios to PyTorch FP32 backprop TI's step at the same resolution."""
    rows = report["rows"] if isinstance(report, dict) else report
    lines = ["| px | configuration | s / iter | UNet passes / iter | peak RSS MB | time vs PyTorch TI | memory vs PyTorch TI |",
             "|---|---|---|---|---|---|---|"]
    names = {"zo-batched": "zo-edge, ORT int8w, candidates batched", "zo-seq": "zo-edge, ORT int8w, sequential",
             "torch-ti": "PyTorch FP32 backprop TI (fwd + bwd + Adam)", "torch-fwd": "PyTorch FP32 forward only, 3 candidates batched",
             "ref-quanto": "reference stack: PyTorch + optimum-quanto qint8, sequential, VAE every step"}
    for r in rows:
        if "error" in r:
            continue
        base = next((b for b in rows if b["config"] == "torch-ti" and b["resolution"] == r["resolution"]
                     and "s_per_iter" in b), None)
        config, _, low = r["config"].partition("+")
        name = names.get(config) or (f"zo-edge, ORT {config[len('zo-batched-'):]}, candidates batched"
                                     if config.startswith("zo-batched-") else config)
        if r.get("provider", "cpu") != "cpu":
            name += f", {r['provider']} provider"
        if low:
            name += ", --low-memory"
        lines.append(f"| {r['resolution']} | {name} | {r['s_per_iter']:.2f} | "
                     f"{r['unet_passes_per_iter']} | {r['peak_rss_mb']:,.0f} | "
                     + (f"{r['s_per_iter'] / base['s_per_iter']:.2f}x | {r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x |"
                        if base else "- | - |"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
