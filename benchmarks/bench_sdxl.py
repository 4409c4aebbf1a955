"""SDXL at full size with random weights (the real stable-diffusion-xl-base-1.0 config): convert time
and peak RSS, personalize seconds per iteration and peak RSS (int8w bundle), and PyTorch FP32
backprop textual inversion on the same model - each stage in its own process, its whole process
tree's RSS sampled every 0.25 s by this driver, which kills a stage that passes --rss-limit-gb (or
leaves the machine under 1.5 GB available) and records how far it got. A script, not a test.

    python benchmarks/bench_sdxl.py --work /tmp/sdxl-bench --out docs/results/bench_sdxl.json \\
        --stages build,convert,zo512,torch512,zo1024 --budget-min 40

Wall times are as measured on whatever machine runs it (the results file says which, with the
thread counts, the commit and this command).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# -- the driver ------------------------------------------------------------------------------------

def _tree_rss(pid: int) -> int:
    import psutil
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_stage(stage: str, args, timeout_s: float) -> dict:
    import psutil

    cmd = [sys.executable, __file__, "--child", stage, "--work", str(args.work), "--iters", str(args.iters),
           "--size", args.size, "--weights", args.weights, *(["--no-fuse"] if args.no_fuse else []),
           *(["--low-memory"] if args.low_memory else []),
           *(["--export-dir", str(args.export_dir)] if args.export_dir else [])]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress: list[str] = []

    def tee():   # the child's progress lines: echoed, and the stage lines kept for the record
        for line in proc.stderr:
            sys.stderr.write(line)
            if line.startswith("[") and ("done in" in line or "parity" in line or line.rstrip().endswith("...")):
                progress.append(line.strip())

    reader = threading.Thread(target=tee, daemon=True)
    reader.start()
    peak, killed = [0], [None]
    stop = threading.Event()

    def watch():
        limit = args.rss_limit_gb * 2**30
        while not stop.wait(0.25):
            rss = _tree_rss(proc.pid)
            peak[0] = max(peak[0], rss)
            avail = psutil.virtual_memory().available
            if rss > limit or avail < 1.5 * 2**30:
                killed[0] = (f"killed by the driver at {rss / 2**30:.2f} GB RSS "
                             f"({'over the --rss-limit-gb ' + str(args.rss_limit_gb) if rss > limit else 'machine under 1.5 GB available'})")
                proc.kill()
                return
            if time.time() - t0 > timeout_s:
                killed[0] = f"stopped by the driver after {timeout_s:.0f} s (the benchmark's time budget)"
                proc.kill()
                return

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    out = proc.stdout.read()
    proc.wait()
    stop.set()
    th.join()
    reader.join()
    rec = {"stage": stage, "wall_s": round(time.time() - t0, 1), "peak_rss_mb_tree": round(peak[0] / 2**20, 1),
           "exit_status": proc.returncode, **({"weights": args.weights} if stage.startswith(("convert", "zo")) else {}),
           **({"low_memory": True} if stage.startswith("zo") and args.low_memory else {})}
    lines = [ln for ln in (out or "").splitlines() if ln.startswith("{")]
    if lines:
        rec.update(json.loads(lines[-1]))
    if progress:
        rec["progress"] = progress
    rec["command"] = " ".join(cmd[1:]).replace(str(ROOT) + "/", "")
    if killed[0]:
        rec["failed"] = killed[0]
    elif proc.returncode != 0:
        rec["failed"] = f"exit status {proc.returncode}"
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/sdxl-bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "bench_sdxl.json")
    ap.add_argument("--stages", default="build,convert,zo512,torch512,zo1024")
    ap.add_argument("--iters", type=int, default=2, help="personalize / TI iterations per stage (the first warms up)")
    ap.add_argument("--rss-limit-gb", type=float, default=19.0)
    ap.add_argument("--budget-min", type=float, default=40.0)
    ap.add_argument("--size", default="sdxl", choices=("sdxl", "tiny"), help="tiny: a smoke test of this script")
    ap.add_argument("--no-fuse", action="store_true", help="convert without the UNet fusions")
    ap.add_argument("--low-memory", action="store_true", help="personalize --low-memory in the zo stages")
    ap.add_argument("--weights", default="int8w", choices=("int8w", "int4w"),
                    help="the bundle convert makes and personalize trains on (work/bundle-WEIGHTS)")
    ap.add_argument("--export-dir", type=Path, default=None, help="convert from this earlier export")
    ap.add_argument("--append", action="store_true", help="add the stages to an existing --out file")
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child)(args)), flush=True)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    from zo_runtime.sysinfo import source_commit

    commit = source_commit()
    import psutil
    previous = json.loads(args.out.read_text()) if args.append and args.out.is_file() else None
    report = {"what": "SDXL-shaped random weights (stable-diffusion-xl-base-1.0 config): convert, personalize "
                      f"({args.weights} bundle, zoodip recipe: n=2 one-sided RGE, 3 UNet passes per iteration), PyTorch FP32 "
                      "backprop TI; one process per stage, RSS of its process tree sampled every 0.25 s",
              "machine": {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                          "platform": platform.platform(), "python": platform.python_version(),
                          "note": "wall times measured on a shared 2-core machine (other sessions' jobs running)"},
              "threads": {"ort_intra_op": "ORT default (all cores)", "torch": "torch default",
                          "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
              "commit": commit, "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "size": args.size, "rss_limit_gb": args.rss_limit_gb, "budget_min": args.budget_min, "stages": []}
    if previous:
        report["earlier_runs"] = [*previous.pop("earlier_runs", []), previous]
    t0 = time.time()
    for stage in args.stages.split(","):
        left = args.budget_min * 60 - (time.time() - t0)
        if left < 60:
            report["stages"].append({"stage": stage, "skipped": f"the {args.budget_min:.0f}-minute budget was spent"})
            continue
        print(f"[bench_sdxl] {stage} (budget left {left / 60:.1f} min)", file=sys.stderr, flush=True)
        rec = run_stage(stage, args, left)
        print(f"[bench_sdxl] {json.dumps(rec)}", file=sys.stderr, flush=True)
        report["stages"].append(rec)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")   # after every stage: a cut run keeps its figures
        if stage in ("build", "convert") and rec.get("failed"):
            break
    report["total_wall_s"] = round(time.time() - t0, 1)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


# -- stages (each in its own process) ------------------------------------------------------------------

def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_build(args) -> dict:
    from zo_edge.testing_sdxl import build_sdxl_pipeline

    src = args.work / "src"
    if (src / "model_index.json").is_file():
        return {"reused": str(src)}
    t = time.time()
    build_sdxl_pipeline(src, size=args.size, seed=0)
    import math

    from safetensors import safe_open
    params = {}
    for comp in ("unet", "text_encoder", "text_encoder_2", "vae"):
        n = 0
        for f in (src / comp).glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                n += sum(math.prod(h.get_slice(k).get_shape()) for k in h.keys())
        params[comp] = n
    return {"seconds": round(time.time() - t, 1), "parameters": params, "peak_rss_mb_self": round(_maxrss_mb(), 1)}


def child_convert(args) -> dict:
    from zo_edge.convert.sdxl import convert_sdxl
    from zo_edge.models.calibration import SHAPES_WORLD

    out = args.work / f"bundle-{args.weights}"
    t = time.time()
    m = convert_sdxl(args.work / "src", out, weights=args.weights, overwrite=True, verify_resolution=256,
                     heldout_samples=1, heldout_per_band=1, fuse=False if args.no_fuse else None,
                     export_dir=args.export_dir, data=SHAPES_WORLD,
                     progress=lambda line: print(line, file=sys.stderr, flush=True))
    sizes = {}
    for rel, e in m["files"].items():
        top = rel.split("/")[0]
        sizes[top] = sizes.get(top, 0) + e["bytes"]
    return {"seconds": round(time.time() - t, 1), "stages": m["build"]["stages"], "weights": args.weights,
            "fuse": m["quantization"]["fuse"], "verify": "held-out accuracy at 256 px, 1 sample, 1 per timestep band",
            "bundle_mb": {k: round(v / 2**20, 1) for k, v in sizes.items()},
            "accuracy_cosine": {g: a.get("cosine") for g, a in m["accuracy"].items()},
            "peak_rss_mb_self": round(_maxrss_mb(), 1)}


def _refs(folder: Path, res: int) -> Path:
    from PIL import Image

    from zo_edge.models import world

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(world.reference_images(world.Subject("star", "red", "striped"), n=4, size=res)):
        Image.fromarray(im).save(folder / f"{i}.png")
    return folder


def child_zo(args, res: int) -> dict:
    import shutil

    from zo_runtime.personalize import PersonalizeConfig, Trainer

    work = args.work / f"zo{res}"
    shutil.rmtree(work, ignore_errors=True)
    cfg = PersonalizeConfig(model=str(args.work / f"bundle-{args.weights}"), images=str(_refs(work / "refs", res)),
                            token="<bench>", init="dog", out=str(work / "e.safetensors"), run_dir=str(work / "run"),
                            steps=args.iters, resolution=res, recipe="zoodip", checkpoint_every=10**6,
                            low_memory=args.low_memory)
    t = time.time()
    trainer = Trainer(cfg)
    setup = time.time() - t
    setup_peak = _maxrss_mb()
    stamps = [time.time()]
    trainer.train(callback=lambda s, th: stamps.append(time.time()))
    per = [round(b - a, 1) for a, b in zip(stamps, stamps[1:])]
    return {"resolution": res, "trainer": type(trainer).__name__, "setup_s": round(setup, 1),
            "setup_peak_rss_mb_self": round(setup_peak, 1), "s_per_iter": per,
            "unet_passes_per_iter": trainer.oracle.forward_passes // max(1, len(per)),
            "batch_candidates": cfg.batch_candidates, "peak_rss_mb_self": round(_maxrss_mb(), 1)}


def child_torch(args, res: int) -> dict:
    """PyTorch FP32 backprop textual inversion on the same SDXL: a token row in both encoders'
    embedding tables trained by AdamW (as diffusers' textual_inversion_sdxl.py), one step = text
    encoders + UNet forward, backward, optimizer step."""
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    src = args.work / "src"
    torch.manual_seed(0)
    t = time.time()
    te1 = CLIPTextModel.from_pretrained(src / "text_encoder", dtype=torch.float32)
    te2 = CLIPTextModelWithProjection.from_pretrained(src / "text_encoder_2", dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(src / "unet", torch_dtype=torch.float32)
    load_s = time.time() - t
    for m in (te1, te2, unet):
        m.requires_grad_(False)
        m.train()
    embs = [te.get_input_embeddings() for te in (te1, te2)]
    for e in embs:
        e.weight.requires_grad_(True)
    opt = torch.optim.AdamW([e.weight for e in embs], lr=5e-3)
    ids = torch.randint(0, 49000, (1, 77))
    h = res // (8 if args.size == "sdxl" else 2)
    tids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32)
    times = []
    for _ in range(args.iters):
        t0 = time.time()
        h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
        o2 = te2(ids, output_hidden_states=True)
        hidden = torch.cat([h1, o2.hidden_states[-2]], dim=-1)
        x = torch.randn(1, 4, h, h)
        pred = unet(x, torch.tensor([700.0]), hidden, added_cond_kwargs={"text_embeds": o2.text_embeds,
                                                                         "time_ids": tids}).sample
        loss = F.mse_loss(pred, torch.randn_like(pred))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(round(time.time() - t0, 1))
    return {"resolution": res, "load_s": round(load_s, 1), "s_per_iter": times, "unet_passes_per_iter": 1,
            "torch_threads": torch.get_num_threads(), "peak_rss_mb_self": round(_maxrss_mb(), 1)}


def table(report: dict) -> str:
    """The results file as a Markdown table (benchmarks/readme_tables.py renders it; never typed)."""
    what = {"build": "build the random-weight SDXL folder (FP32 safetensors)"}
    lines = ["| run | stage | what | wall s | peak RSS MB (process tree) | s / iteration | UNet passes / iteration | outcome |",
             "|---|---|---|---|---|---|---|---|"]
    runs = [*report.get("earlier_runs", []), report]
    rows = [(k, r) for k, run in enumerate(runs, 1) for r in run["stages"]]
    for k, r in rows:
        st = r["stage"]
        weights = r.get("weights", "int8w")   # runs before --weights existed made int8w bundles
        if st.startswith("zo"):
            desc = (f"zo-edge personalize, {st[2:]} px, {weights} bundle" + (", --low-memory" if r.get("low_memory") else "")
                    + (f" (setup {r['setup_s']} s)" if "setup_s" in r else ""))
        elif st.startswith("torch"):
            desc = f"PyTorch FP32 backprop TI, {st[5:]} px" + (f" (load {r['load_s']} s)" if "load_s" in r else "")
        elif st == "convert" and "--no-fuse" in r.get("command", ""):
            reused = "--export-dir" in r.get("command", "")
            desc = f"zo-edge convert --weights {weights} --no-fuse" + (", export reused from run 1" if reused else ", export included")
        elif st == "convert":
            desc = f"zo-edge convert --weights {weights}"
        else:
            desc = what.get(st, st)
        per = ", ".join(str(x) for x in r.get("s_per_iter", [])) or "-"
        outcome = r.get("skipped") or r.get("failed") or "completed"
        peak = f"{r['peak_rss_mb_tree']:,.0f}" if "peak_rss_mb_tree" in r else "-"
        lines.append(f"| {k} | {st} | {desc} | {r.get('wall_s', '-')} | {peak} | {per} | "
                     f"{r.get('unet_passes_per_iter', '-')} | {outcome} |")
    return "\n".join(lines)


def convert_table(report: dict) -> str:
    """The convert stages' own lines (each step's wall time and peak RSS) as a Markdown table."""
    import re

    lines = ["| run | step | s | peak RSS MB |", "|---|---|---|---|"]
    for k, run in enumerate([*report.get("earlier_runs", []), report], 1):
        for r in run["stages"]:
            if r["stage"] != "convert":
                continue
            label = None
            for line in r.get("progress", []):
                m = re.match(r"\[(\w+)\] done in ([\d.]+) s \(peak RSS ([\d,]+) MB\)", line)
                if m:
                    lines.append(f"| {k} | {label or m.group(1)} | {m.group(2)} | {m.group(3)} |")
                    label = None
                elif line.endswith("..."):
                    label = line[:-3].strip()
            if r.get("failed"):
                lines.append(f"| {k} | {label or 'next step'} | - | - (the process tree was at "
                             f"{r['peak_rss_mb_tree']:,.0f} MB: {r['failed']}) |")
    return "\n".join(lines)


def _child(stage: str):
    """build | convert | zo<RES> | torch<RES>."""
    fixed = {"build": child_build, "convert": child_convert}
    if stage in fixed:
        return fixed[stage]
    for prefix, fn in (("zo", child_zo), ("torch", child_torch)):
        if stage.startswith(prefix) and stage[len(prefix):].isdigit():
            return lambda a: fn(a, int(stage[len(prefix):]))
    raise SystemExit(f"unknown stage {stage!r}")


if __name__ == "__main__":
    main()
