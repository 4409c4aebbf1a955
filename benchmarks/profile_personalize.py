"""Where personalize's time and peak memory go, on a bundle (a script, not a test): issue 16's profile.

Three measurements, each configuration in a fresh process so that peaks do not mix:

  - phases: a real ``Trainer`` run (warm-up + timed iterations) with RSS sampled every 20 ms by a
    thread and attributed to the phase running at the time: load (manifest, sha256 check, tokenizer),
    vae_encode (VAE encoder session + encoding the references + its release), open_sessions (text
    encoder and UNet sessions), then per iteration text_encoder, unet and optimizer (the rest: RGE,
    Adam, noise, logging). Peak RSS is the kernel's VmHWM; RssAnon / RssFile say what is copied and
    what is mapped from disk.
  - ops: ORT's profiler (``SessionOptions.enable_profiling``) on the UNet alone, the feed personalize
    gives it (3 candidates batched, or 1), aggregated per operator type; the FLOPs of every Conv /
    MatMul / Gemm / attention node are counted from the shapes the profiler records, so the FLOPs per
    pass are those of the graph ORT runs.
  - floor: this CPU's FP32 GEMM throughput (NumPy's BLAS and an ORT MatMul, 2048^3, at the same
    thread count); UNet FLOPs per pass / GEMM FLOP/s = the best possible seconds per pass. Each
    configuration's seconds per UNet pass is reported as a multiple of it.

Configurations (``--configs``) change one thing against ``default`` (the runtime as shipped; since
issue 16 that disables the memory pattern, so ``no-mem-pattern`` equals it and ``mem-pattern`` is the old default):
``seq`` / ``batched`` candidates, ``no-arena`` (``enable_cpu_mem_arena = False`` on every session),
``no-mem-pattern`` (``enable_mem_pattern = False``), ``basic-opt`` (ORT's basic graph optimizations: int8w
MatMuls stay DequantizeLinear + FP32 MatMul instead of being fused into MatMulNBits at load), ``trim`` (``malloc_trim(0)`` after the VAE
encoder's release), ``keep-vae`` (the VAE encoder session is not released before training).
Every run records its per-step RGE losses: a setting that does not change arithmetic gives
bit-identical losses (the zeroth-order signal unchanged, exactly), which the report checks.

    python benchmarks/profile_personalize.py --bundle /work/sd15/int8w --resolutions 256,512 \\
        --threads 2 --iters 3 --out docs/results/profile_sd15.json

Times on a shared machine are contended: the file records the load average at start and end, and
the ratios between configurations of one run are what counts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from zo_runtime.sysinfo import cpu_model, source_commit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("load", "vae_encode", "open_sessions", "text_encoder", "unet", "optimizer")
CONFIGS = {  # name -> (changes to SessionOptions, other switches)
    "default": ({}, {}),
    "batched": ({}, {"batch_candidates": "on"}),
    "seq": ({}, {"batch_candidates": "off"}),
    "no-arena": ({"enable_cpu_mem_arena": False}, {}),
    "no-mem-pattern": ({"enable_mem_pattern": False}, {}),
    "mem-pattern": ({"enable_mem_pattern": True}, {}),  # the runtime's default before issue 16
    "no-arena-no-pattern": ({"enable_cpu_mem_arena": False, "enable_mem_pattern": False}, {}),
    # ORT's basic graph optimizations only: no DequantizeLinear -> MatMul fusion into MatMulNBits at load, so
    # an int8w MatMul runs as DequantizeLinear + FP32 MatMul (and no copy of the fused weights is made)
    "basic-opt": ({"graph_optimization_level": "ORT_ENABLE_BASIC"}, {}),
    "trim": ({}, {"trim": True}),
    "keep-vae": ({}, {"keep_vae": True}),
    # onnxruntime's CPU MultiHeadAttention runs as tiled (flash) attention, no N x N scores, unless this
    # variable is set when the session is created: the plain kernel, to measure what tiling is worth
    "no-flash": ({}, {"env": {"ORT_DISABLE_FLASH_ATTENTION": "1"}}),
    # the UNet's weights in an external data file, so that onnxruntime maps them from disk instead of
    # copying them (the bundle's own file is not changed; bundles converted since session 15 are this way)
    "external-unet": ({}, {"external_unet": True}),
}


# -- memory --------------------------------------------------------------------------------------
def proc_status() -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in MiB (Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[k] = int(v.split()[0]) / 1024
    except OSError:
        pass
    return out


class Phases:
    """The phase now running, its accumulated seconds, and the RSS a sampler thread saw during it."""

    def __init__(self, interval: float = 0.02):
        self.now = "start"
        self.seconds = defaultdict(float)
        self.max_rss = defaultdict(float)
        self.series = []  # (t, phase, rss MiB), every sample
        self.t0 = time.time()
        self.interval = interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.boundaries = []  # (phase, status at its end)

    def _sample(self):
        while not self.stop.is_set():
            rss = proc_status().get("VmRSS", 0.0)
            ph = self.now
            self.max_rss[ph] = max(self.max_rss[ph], rss)
            self.series.append((round(time.time() - self.t0, 3), ph, round(rss, 1)))
            self.stop.wait(self.interval)

    def run(self, name: str, fn, *a, **kw):
        prev, self.now = self.now, name
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            self.seconds[name] += time.perf_counter() - t
            st = proc_status()
            self.max_rss[name] = max(self.max_rss[name], st.get("VmRSS", 0.0))
            self.boundaries.append((name, st))
            self.now = prev

    def close(self):
        self.stop.set()
        self.thread.join()


def malloc_trim() -> bool:
    try:
        import ctypes
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def set_options(opts, changes: dict) -> None:
    """Apply a configuration's SessionOptions changes (an optimization level given by its enum name)."""
    import onnxruntime as ort

    for k, v in changes.items():
        setattr(opts, k, getattr(ort.GraphOptimizationLevel, v) if k == "graph_optimization_level" else v)


def apply_config(name: str):
    """Patch the runtime's one session-options helper with the configuration's changes."""
    from zo_runtime.bundle import Bundle

    changes, _ = CONFIGS[name]
    if changes:
        original = Bundle.session_options

        def session_options(self, graph):
            opts = original(self, graph)
            set_options(opts, changes)
            return opts
        Bundle.session_options = session_options


def _refs(folder: Path, res: int) -> Path:
    from PIL import Image

    from zo_edge.models import world

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(world.reference_images(world.Subject("star", "red", "striped"), n=4, size=res)):
        Image.fromarray(im).save(folder / f"{i}.png")
    return folder


def external_copy(src: Path, out_dir: Path) -> Path:
    """``src`` saved again as the converter saves a graph over graphs.MAPPED_WEIGHTS_THRESHOLD: its weights
    in ``model.onnx_data`` beside it (cached: made once per source file). Offsets need no alignment:
    onnxruntime mapped the SD1.5-shaped UNet's weights alike at 1-, 4 KiB- and 64 KiB-aligned offsets."""
    from zo_edge.convert.graphs import load_lazy, save_model

    dst = out_dir / src.name
    if not dst.exists():
        save_model(load_lazy(src), dst, external=True, base_dir=src.parent)
    return dst


def use_external_unet(bundle_dir: str, copy: str) -> None:
    """Open ``copy`` wherever the runtime opens the bundle's UNet graph (this process only)."""
    import onnxruntime as ort

    manifest = json.loads((Path(bundle_dir) / "zo-edge.json").read_text())
    unet = str(Path(bundle_dir) / manifest["graphs"]["unet"]["path"])
    original = ort.InferenceSession

    def session(path, *a, **k):
        return original(copy if str(path) == unet else path, *a, **k)
    ort.InferenceSession = session


def child_phases(args) -> dict:
    from zo_runtime.personalize import PersonalizeConfig, Trainer

    changes, switches = CONFIGS[args.config]
    apply_config(args.config)
    os.environ.update(switches.get("env", {}))
    if switches.get("external_unet"):
        use_external_unet(args.bundle, args.external_unet)
    work = Path(tempfile.mkdtemp(prefix="zo-profile-"))
    refs = _refs(work / "refs", args.res)
    status0 = proc_status()
    ph = Phases()
    cfg = PersonalizeConfig(model=args.bundle, images=str(refs), token="<prof>", init="dog",
                            out=str(work / "e.safetensors"), run_dir=str(work / "run"),
                            steps=args.warmup + args.iters, resolution=args.res, threads=args.threads,
                            batch_candidates=switches.get("batch_candidates", "auto"), checkpoint_every=10**6)
    trainer = Trainer.__new__(Trainer, cfg)
    # Trainer.__init__, phase by phase
    cfg.validate()
    trainer.given, trainer.cfg, trainer.resuming = cfg, cfg.resolved(), False
    trainer.run_dir = Path(trainer.cfg.run_dir)
    trainer.last_checkpoint = None

    def load():
        trainer.check_outputs()
        trainer.load_model()
        trainer.check_words()
        trainer.check_against_model()
    ph.run("load", load)
    if switches.get("keep_vae"):
        trainer.bundle.release = lambda name: None
    ph.run("vae_encode", trainer.load_data)
    trim_after_vae = malloc_trim() if switches.get("trim") else None
    ph.run("open_sessions", trainer.build_optimizer)
    oracle = trainer.oracle
    enc, pred, losses_fn = oracle.encode_text, oracle.predict, oracle.losses
    oracle.encode_text = lambda *a, **k: ph.run("text_encoder", enc, *a, **k)
    oracle.predict = lambda *a, **k: ph.run("unet", pred, *a, **k)
    losses, stamps, passes = [], [], []

    def record(*a, **k):
        out = losses_fn(*a, **k)
        losses.append([float(x) for x in out])
        return out
    oracle.losses = record
    ph.now = "optimizer"
    step_seconds = {n: [] for n in ("text_encoder", "unet", "optimizer")}
    last = {n: 0.0 for n in ("text_encoder", "unet")}
    t_train = time.perf_counter()

    def callback(step, theta):
        now = time.perf_counter()
        ph.max_rss["optimizer"] = max(ph.max_rss["optimizer"], proc_status().get("VmRSS", 0.0))
        stamps.append(now)
        passes.append(oracle.forward_passes)
        total = now - (stamps[-2] if len(stamps) > 1 else t_train)
        spent = 0.0
        for n in ("text_encoder", "unet"):
            d = ph.seconds[n] - last[n]
            last[n] = ph.seconds[n]
            step_seconds[n].append(d)
            spent += d
        step_seconds["optimizer"].append(total - spent)
    trainer.train(callback=callback)
    ph.seconds["optimizer"] = float(sum(step_seconds["optimizer"]))
    ph.close()
    w = args.warmup
    timed = {n: float(np.median(v[w:])) for n, v in step_seconds.items()}
    per_iter = np.diff(stamps[w - 1:]) if w else np.diff([t_train] + stamps)
    k = passes[-1] // len(passes)
    st = proc_status()
    series = ph.series[::max(1, len(ph.series) // 400)]  # at most ~400 points in the file
    return {
        "config": args.config, "resolution": args.res, "threads": args.threads,
        "session_options": {k2: v for k2, v in changes.items()}, "switches": switches,
        "batched": bool(oracle.batched((args.res // 8, args.res // 8))),
        "unet_passes_per_iter": int(k), "s_per_iter": float(np.median(per_iter)),
        "s_per_unet_pass": timed["unet"] / k, "iter_breakdown_s": timed,
        "phase_seconds": {p: round(ph.seconds.get(p, 0.0), 3) for p in PHASES},
        "phase_max_rss_mb": {p: round(ph.max_rss.get(p, 0.0), 1) for p in PHASES},
        "phase_end_status_mb": {p: {k2: round(v, 1) for k2, v in s.items()} for p, s in ph.boundaries
                                if p in ("load", "vae_encode", "open_sessions")},
        "malloc_trim_released": trim_after_vae,
        "status_start_mb": status0, "status_end_mb": st, "peak_rss_mb": st.get("VmHWM", 0.0),
        "losses": losses, "rss_series": series,
    }


# -- ORT profiler on the UNet ----------------------------------------------------------------------
def _numel(shape) -> int:
    return int(np.prod(shape)) if shape else 1


def node_flops(op: str, ins: list, outs: list) -> float:
    """FLOPs (2 per multiply-add) of one node from the shapes the profiler recorded."""
    if not outs or not ins:
        return 0.0
    out = _numel(outs[0])
    if op in ("Conv", "FusedConv", "QLinearConv", "ConvInteger", "NhwcFusedConv") and len(ins) > 1 and len(ins[1]) >= 3:
        return 2.0 * out * _numel(ins[1][1:])
    if op in ("MatMul", "FusedMatMul", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "Gemm",
              "MatMulIntegerToFloat", "QLinearMatMul") and ins[0]:
        return 2.0 * out * ins[0][-1]
    if op in ("MultiHeadAttention", "Attention") and len(ins) >= 2 and len(ins[0]) == 3:
        b, s, d = ins[0]
        if op == "Attention":  # input [B,S,Din], weights [Din, 3D]: projections + QK^T + AV
            dd = ins[1][-1] // 3
            return 2.0 * b * s * ins[0][-1] * ins[1][-1] + 4.0 * b * s * s * dd
        kv = ins[1][1] if len(ins[1]) == 3 else s
        return 4.0 * b * s * kv * d
    return 0.0


def _shapes(entries) -> list:
    return [list(next(iter(e.values()))) for e in entries or []]


def child_ops(args) -> dict:
    import onnxruntime as ort

    from zo_runtime.bundle import Bundle

    apply_config(args.config)
    bundle = Bundle.load(args.bundle, threads=args.threads, verify=False)
    original = Bundle.session_options
    prefix = str(Path(tempfile.mkdtemp(prefix="zo-ortprof-")) / "unet")

    def with_profiling(self, graph):
        opts = original(self, graph)
        opts.enable_profiling = True
        opts.profile_file_prefix = prefix
        return opts
    Bundle.session_options = with_profiling
    sess = bundle.session("unet")
    k = args.batch
    h = args.res // 8
    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((k, 4, h, h)).astype(np.float32),
            "timestep": bundle.timestep_feed(700, k),
            "encoder_hidden_states": rng.standard_normal((k, 77, bundle.embedding_dim)).astype(np.float32)}
    run_s = []
    for _ in range(args.warmup + args.iters):
        t = time.perf_counter()
        sess.run(None, feed)
        run_s.append(time.perf_counter() - t)
    path = sess.end_profiling()
    events = json.loads(Path(path).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    timed = runs[args.warmup:]
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in timed]
    per_op = defaultdict(lambda: {"us": 0.0, "nodes": set(), "flops": 0.0})
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not any(a <= e["ts"] <= b for a, b in windows):
            continue
        a = e.get("args", {})
        op = a.get("op_name", "?")
        r = per_op[op]
        r["us"] += e["dur"]
        r["nodes"].add(e["name"])
        r["flops"] += node_flops(op, _shapes(a.get("input_type_shape")), _shapes(a.get("output_type_shape")))
    n = len(timed)
    model_run_s = float(np.median([e["dur"] for e in timed])) / 1e6
    kernel_s = sum(r["us"] for r in per_op.values()) / 1e6 / n
    rows = []
    for op, r in sorted(per_op.items(), key=lambda kv: -kv[1]["us"]):
        s = r["us"] / 1e6 / n
        f = r["flops"] / n
        rows.append({"op": op, "nodes": len(r["nodes"]), "s_per_run": s, "share": s / kernel_s,
                     "gflop_per_run": f / 1e9, "gflop_per_s": (f / 1e9 / s) if f else None})
    flops_run = sum(r["flops"] for r in per_op.values()) / n
    Path(path).unlink(missing_ok=True)
    return {"config": args.config, "resolution": args.res, "threads": args.threads, "batch": k,
            "ort_version": ort.__version__, "model_run_s": model_run_s, "kernel_s": kernel_s,
            "wall_run_s_median": float(np.median(run_s[args.warmup:])),
            "gflop_per_run": flops_run / 1e9, "gflop_per_pass": flops_run / 1e9 / k, "ops": rows}


# -- paired timing ----------------------------------------------------------------------------------
def child_ab(args) -> dict:
    """The UNet under several configurations' session options in one process, runs alternated round by
    round, so that a shared machine's load falls on all of them alike: per configuration the median s per
    run and the median of its per-round ratio to the first configuration."""
    from zo_runtime.bundle import Bundle

    names = args.ab.split(",")
    bundle = Bundle.load(args.bundle, threads=args.threads, verify=False)
    sessions = {}
    import onnxruntime as ort
    for name in names:
        opts = bundle.session_options("unet")
        changes, switches = CONFIGS[name]
        set_options(opts, changes)
        env = switches.get("env", {})
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # read by the kernels when the session creates them
        path = args.external_unet if switches.get("external_unet") else str(bundle.root / bundle.graph("unet")["path"])
        sessions[name] = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    k, h = args.batch, args.res // 8
    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((k, 4, h, h)).astype(np.float32),
            "timestep": bundle.timestep_feed(700, k),
            "encoder_hidden_states": rng.standard_normal((k, 77, bundle.embedding_dim)).astype(np.float32)}
    times = {n: [] for n in names}
    outs = {}
    for rnd in range(args.warmup + args.iters):
        for n in (names if rnd % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            outs[n] = sessions[n].run(None, feed)[0]
            if rnd >= args.warmup:
                times[n].append(time.perf_counter() - t)
    base = np.array(times[names[0]])
    return {"resolution": args.res, "batch": k, "threads": args.threads, "rounds": args.iters,
            "configs": {n: {"s_per_run_median": float(np.median(v)),
                            "ratio_to_first_median": float(np.median(np.array(v) / base)),
                            "output_identical_to_first": bool(np.array_equal(outs[n], outs[names[0]])),
                            "output_max_rel_diff_to_first": float(np.abs(outs[n] - outs[names[0]]).max()
                                                                  / max(np.abs(outs[names[0]]).max(), 1e-30))}
                        for n, v in times.items()}}


# -- the compute floor -------------------------------------------------------------------------------
def child_gemm(args) -> dict:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    n = args.gemm_n
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flop = 2.0 * n ** 3

    def rates(fn, reps):
        fn()
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            out.append(flop / (time.perf_counter() - t) / 1e9)
        return {"median": float(np.median(out)), "best": float(np.max(out))}
    res = {"n": n, "threads": args.threads, "numpy": rates(lambda: a @ b, args.gemm_reps)}
    g = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "mm",
                          [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
                          [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])],
                          [helper.make_tensor("B", TensorProto.FLOAT, [n, n], b.tobytes(), raw=True)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    res["ort_matmul"] = rates(lambda: sess.run(None, {"A": a}), args.gemm_reps)
    return res


# -- driver ------------------------------------------------------------------------------------------
def run_child(kind: str, args, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--bundle", str(args.bundle), "--threads", str(args.threads),
           "--iters", str(kw.pop("iters", args.iters)), "--warmup", str(args.warmup),
           "--gemm-n", str(args.gemm_n), "--gemm-reps", str(args.gemm_reps), "--external-unet", args.external_unet]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    t = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1], **kw}
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["wall_s"] = round(time.time() - t, 1)
    return r


def machine() -> dict:
    mem = 0
    try:
        mem = int(next(ln.split()[1] for ln in open("/proc/meminfo") if ln.startswith("MemTotal"))) / 2 ** 20
    except (OSError, StopIteration):
        pass
    return {"arch": platform.machine(), "cpu": cpu_model(), "cores": os.cpu_count(), "mem_gib": round(mem, 1),
            "python": platform.python_version()}


def attach_floor(report: dict) -> None:
    """s per UNet pass as a multiple of the compute floor, for every phases row."""
    g = report.get("gemm", {})
    if "numpy" not in g:
        return
    report["floor"] = {"per_resolution": {}}
    for o in report["ops"]:
        if "gflop_per_pass" not in o:
            continue
        g = o.setdefault("gemm", g)  # the GEMM measured in the run that profiled this resolution
        peak = max(g["numpy"]["median"], g["ort_matmul"]["median"])  # GFLOP/s, same threads, same contention
        fl = {"gflop_per_pass": o["gflop_per_pass"], "gemm_gflop_per_s": peak,
              "floor_s_per_pass": o["gflop_per_pass"] / peak}
        report["floor"]["per_resolution"][str(o["resolution"])] = fl
    for r in report["rows"]:
        fl = report["floor"]["per_resolution"].get(str(r.get("resolution")))
        if fl and "s_per_unet_pass" in r:
            r["x_floor"] = r["s_per_unet_pass"] / fl["floor_s_per_pass"]
    for o in report["ops"]:
        fl = report["floor"]["per_resolution"].get(str(o.get("resolution")))
        if fl and "model_run_s" in o and o.get("config", "default") == "default":
            o["x_floor"] = o["model_run_s"] / o["batch"] / fl["floor_s_per_pass"]


def same_losses(report: dict) -> None:
    """For every row, whether its per-step losses equal its resolution's default run's bit for bit, and the
    largest relative difference of its directional differences L_i - L_0 otherwise."""
    for r in report["rows"]:
        base = next((b for b in report["rows"] if b.get("resolution") == r.get("resolution")
                     and b.get("config") == "default" and "losses" in b), None)
        if not base or "losses" not in r or r is base:
            continue
        a, b = np.array(r["losses"]), np.array(base["losses"])
        if a.shape != b.shape:
            continue
        r["losses_identical_to_default"] = bool(np.array_equal(a, b))
        da, db = a[:, 1:] - a[:, :1], b[:, 1:] - b[:, :1]
        r["max_rel_diff_of_loss_differences"] = float(np.max(np.abs(da - db)) / max(np.max(np.abs(db)), 1e-30))


def print_report(report: dict) -> None:
    print(f"machine: {report['machine']}; threads {report['threads']}; commit {report['commit']}; load average "
          f"start {report['loadavg_start']} end {report['loadavg_end']} (times contended)")
    if "floor" in report:
        print(f"FP32 GEMM: numpy {report['gemm']['numpy']['median']:.1f} GFLOP/s, ORT MatMul "
              f"{report['gemm']['ort_matmul']['median']:.1f} GFLOP/s (median, {report['threads']} threads)")
    for o in report["ops"]:
        if "ops" not in o:
            print(f"ops {o}")
            continue
        print(f"\nUNet, {o['resolution']} px, batch {o['batch']}: {o['model_run_s']:.2f} s per run, "
              f"{o['gflop_per_pass']:.1f} GFLOP per pass" + (f", {o['x_floor']:.2f}x the floor" if "x_floor" in o else ""))
        print("| op type | nodes | s / run | share | GFLOP / run | GFLOP/s |")
        for r in o["ops"][:14]:
            gf = f"{r['gflop_per_s']:.1f}" if r["gflop_per_s"] else "-"
            print(f"| {r['op']} | {r['nodes']} | {r['s_per_run']:.3f} | {100 * r['share']:.1f} % | "
                  f"{r['gflop_per_run']:.1f} | {gf} |")
    print()
    print(print_rows(report))


def print_rows(report: dict) -> str:
    lines = ["| px | config | s/iter | s/UNet pass | x floor | peak RSS MB | load | vae_encode | open | training max | "
             "same losses |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r.get('res')} | {r.get('config')} | error: {r['error']} |||||||||")
            continue
        m = r["phase_max_rss_mb"]
        train = max(m["text_encoder"], m["unet"], m["optimizer"])
        same = r.get("losses_identical_to_default")
        same = "(base)" if r["config"] == "default" else ("yes" if same else
                                                         f"no ({r.get('max_rel_diff_of_loss_differences', 0):.1e})")
        lines.append(f"| {r['resolution']} | {r['config']} | {r['s_per_iter']:.2f} | {r['s_per_unet_pass']:.2f} | "
                     f"{r.get('x_floor', float('nan')):.2f} | {r['peak_rss_mb']:.0f} | {m['load']:.0f} | "
                     f"{m['vae_encode']:.0f} | {m['open_sessions']:.0f} | {train:.0f} | {same} |")
    return "\n".join(lines)


def table(report: dict, arg: str | None = None) -> str:
    """README tables of a results file: ``configs`` (default) each configuration's time, floor multiple and
    memory per phase; ``ops`` the UNet's time per operator type; ``floor`` the compute floor."""
    if arg == "ops":
        lines = ["| px | UNet batch | op type | nodes | s / run | share of kernel time | GFLOP / run | GFLOP/s |",
                 "|---|---|---|---|---|---|---|---|"]
        for o in report["ops"]:
            if "ops" not in o:
                continue
            top, rest = o["ops"][:8], o["ops"][8:]
            for r in top:
                gf = f"{r['gflop_per_s']:.1f}" if r["gflop_per_s"] else "-"
                lines.append(f"| {o['resolution']} | {o['batch']} | {r['op']} | {r['nodes']} | {r['s_per_run']:.3f} | "
                             f"{100 * r['share']:.1f} % | {r['gflop_per_run']:.1f} | {gf} |")
            if rest:
                lines.append(f"| {o['resolution']} | {o['batch']} | {len(rest)} other types | "
                             f"{sum(r['nodes'] for r in rest)} | {sum(r['s_per_run'] for r in rest):.3f} | "
                             f"{100 * sum(r['share'] for r in rest):.1f} % | - | - |")
        return "\n".join(lines)
    if arg == "floor":
        lines = ["| px | UNet GFLOP per pass | FP32 GEMM GFLOP/s (numpy / ORT MatMul, threads) | floor s / pass | "
                 "profiled UNet s / pass | x floor |", "|---|---|---|---|---|---|"]
        for o in report["ops"]:
            fl = report.get("floor", {}).get("per_resolution", {}).get(str(o.get("resolution")))
            if not fl or "model_run_s" not in o:
                continue
            g = o.get("gemm", report["gemm"])
            lines.append(f"| {o['resolution']} | {fl['gflop_per_pass']:.1f} | {g['numpy']['median']:.1f} / "
                         f"{g['ort_matmul']['median']:.1f} ({g['threads']}) | {fl['floor_s_per_pass']:.3f} | "
                         f"{o['model_run_s'] / o['batch']:.2f} | {o['x_floor']:.1f} |")
        return "\n".join(lines)
    if arg == "paired":
        lines = ["| px | UNet batch | configuration | UNet s / run (median) | vs default (median of paired ratios) | "
                 "output vs default |", "|---|---|---|---|---|---|"]
        for p in sorted(report.get("paired", []), key=lambda p: p["resolution"]):
            for name, c in p["configs"].items():
                lines.append(f"| {p['resolution']} | {p['batch']} | {name} | {c['s_per_run_median']:.2f} | "
                             f"{c['ratio_to_first_median']:.3f} ({p['rounds']} rounds) | "
                             f"{'bit-identical' if c['output_identical_to_first'] else 'differs'} |")
        return "\n".join(lines)
    lines = ["| px | configuration | candidates | s / iter | s / UNet pass | x floor | peak RSS MB | vs default MB | "
             "RSS max MB: load / VAE encode / sessions / training | losses vs default |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = list(CONFIGS)
    rows = sorted((r for r in report["rows"] if "error" not in r),
                  key=lambda r: (r["resolution"], order.index(r["config"]) if r["config"] in order else len(order)))
    for r in rows:
        base = next((b for b in rows if b["resolution"] == r["resolution"] and b["config"] == "default"), None)
        delta = f"{r['peak_rss_mb'] - base['peak_rss_mb']:+,.0f}" if base and base is not r else "-"
        m = r["phase_max_rss_mb"]
        train = max(m["text_encoder"], m["unet"], m["optimizer"])
        if r["config"] == "default":
            same = "-"
        elif r.get("losses_identical_to_default"):
            same = "bit-identical"
        else:
            same = f"differ (max rel. {r.get('max_rel_diff_of_loss_differences', float('nan')):.0e})"
        lines.append(f"| {r['resolution']} | {r['config']} | {'batched' if r['batched'] else 'sequential'} | "
                     f"{r['s_per_iter']:.2f} | {r['s_per_unet_pass']:.2f} | {r.get('x_floor', float('nan')):.1f} | "
                     f"{r['peak_rss_mb']:,.0f} | {delta} | {m['load']:,.0f} / {m['vae_encode']:,.0f} / {m['open_sessions']:,.0f} / "
                     f"{train:,.0f} | {same} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--resolutions", default="256")
    ap.add_argument("--configs", default="default,seq,no-arena,no-mem-pattern,trim",
                    help=f"comma list of {','.join(CONFIGS)}; RES:NAME runs NAME at RES only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--op-iters", type=int, default=2, help="profiled UNet runs after the warm-up")
    ap.add_argument("--gemm-n", type=int, default=2048)
    ap.add_argument("--gemm-reps", type=int, default=10)
    ap.add_argument("--skip-ops", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--merge", action="store_true", help="add this run's rows to --out instead of replacing it")
    ap.add_argument("--child")
    ap.add_argument("--config", default="default")
    ap.add_argument("--res", type=int)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ab", default="", help="paired UNet timing of these configurations (session options only), "
                    "in one process, alternated; e.g. default,no-mem-pattern,no-arena")
    ap.add_argument("--ab-rounds", type=int, default=5)
    ap.add_argument("--external-unet", default="", help="the external-data copy of the UNet (made by the driver)")
    ap.add_argument("--external-dir", default=os.path.join(tempfile.gettempdir(), "zo-profile-external"),
                    help="where the external-unet configuration's copy of the UNet is written (once)")
    args = ap.parse_args()

    if args.child:
        fn = {"phases": child_phases, "ops": child_ops, "gemm": child_gemm, "ab": child_ab}[args.child]
        print(json.dumps(fn(args)))
        return

    report = {"machine": machine(), "threads": args.threads, "commit": source_commit(), "bundle": str(args.bundle),
              "loadavg_start": [round(x, 2) for x in os.getloadavg()], "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "iters": args.iters, "warmup": args.warmup, "contended": True, "rows": [], "ops": []}
    try:
        import onnxruntime
        report["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    manifest = json.loads((Path(args.bundle) / "zo-edge.json").read_text())
    report["unet_precision"] = manifest["graphs"]["unet"].get("precision")
    wanted = [spec.rpartition(":")[2] for spec in filter(None, (args.configs + "," + args.ab).split(","))]
    if any(CONFIGS[n][1].get("external_unet") for n in wanted):
        src = Path(args.bundle) / manifest["graphs"]["unet"]["path"]
        st = src.resolve().stat()
        key = hashlib.sha256(f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        args.external_unet = str(external_copy(src, Path(args.external_dir) / key))
        report["external_unet"] = args.external_unet
    print("gemm ...", file=sys.stderr, flush=True)
    report["gemm"] = run_child("gemm", args)
    print(json.dumps(report["gemm"]), file=sys.stderr, flush=True)
    resolutions = [int(r) for r in args.resolutions.split(",")]
    for res in resolutions:
        if not args.skip_ops:
            batch = 3 if res * res <= 256 * 256 else 1  # what LossOracle's auto mode feeds the UNet
            print(f"{res} px ops (batch {batch}) ...", file=sys.stderr, flush=True)
            o = run_child("ops", args, res=res, batch=batch, iters=args.op_iters)
            o.setdefault("resolution", res)
            o["gemm"] = report["gemm"]
            report["ops"].append(o)
            print(json.dumps({k: v for k, v in o.items() if k != "ops"}), file=sys.stderr, flush=True)
        if args.ab:
            batch = 3 if res * res <= 256 * 256 else 1
            print(f"{res} px paired UNet timing {args.ab} ...", file=sys.stderr, flush=True)
            a = run_child("ab", args, res=res, batch=batch, ab=args.ab, iters=args.ab_rounds)
            a.setdefault("resolution", res)
            report.setdefault("paired", []).append(a)
            print(json.dumps(a), file=sys.stderr, flush=True)
        for spec in filter(None, args.configs.split(",")):
            at, _, name = spec.rpartition(":")
            if at and int(at) != res:
                continue
            print(f"{res} px {name} ...", file=sys.stderr, flush=True)
            r = run_child("phases", args, res=res, config=name)
            r.setdefault("resolution", res)
            r.setdefault("config", name)
            report["rows"].append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("losses", "rss_series")}), file=sys.stderr,
                  flush=True)
    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.out and args.merge and Path(args.out).exists():
        old = json.loads(Path(args.out).read_text())
        keys = {(r.get("resolution"), r.get("config")) for r in report["rows"]}
        report["rows"] = [r for r in old["rows"] if (r.get("resolution"), r.get("config")) not in keys] + report["rows"]
        pkeys = {p.get("resolution") for p in report.get("paired", [])}
        report["paired"] = [p for p in old.get("paired", []) if p.get("resolution") not in pkeys] + report.get("paired", [])
        okeys = {o.get("resolution") for o in report["ops"]}
        report["ops"] = [o for o in old["ops"] if o.get("resolution") not in okeys] + report["ops"]
        report["runs"] = old.get("runs", []) + [{k: old.get(k) for k in ("started", "loadavg_start", "loadavg_end",
                                                                         "commit")}]
    attach_floor(report)
    same_losses(report)
    print_report(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
