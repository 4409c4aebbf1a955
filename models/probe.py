"""The probe: a small CNN that reads the shapes world back out of an image.

It predicts the four attributes :mod:`zo_edge.models.world` renders from (shape, colour, pattern,
background) and yields an L2-normalised 128-d feature vector. In the personalization benchmark it
plays the part CLIP and DINO play in the paper: subject fidelity (attribute accuracy on the
subject's shape/colour/pattern), feature similarity (cosine of ``features``) and prompt fidelity
(the background the prompt asked for).

It is trained on the world's ground truth over *all* combinations, the held-out subjects included
(it is a measuring instrument, not a generator), with augmentations that mimic a small diffusion
model's output: blur, additive and low-frequency noise, colour/brightness/contrast/saturation
jitter, small affine jitter, downsample-upsample.

Runtime (NumPy + onnxruntime + Pillow, no torch)::

    >>> from zo_edge.models.probe import Probe
    >>> probe = Probe.load()                                  # models/shapes/probe.onnx
    >>> out = probe.predict(images)                           # uint8 [B, H, W, 3] or a list
    >>> out["shape"], out["colour"], out["pattern"], out["background"], out["features"].shape
    (['star', ...], ['red', ...], ['striped', ...], ['grass', ...], (B, 128))

Training + export (PyTorch; the ``convert`` extra)::

    python -m zo_edge.models.probe --out models/shapes/probe.onnx [--steps N]

writes ``probe.onnx`` (opset 17, dynamic batch; input ``image`` float32 [B, 3, 32, 32] RGB in
[0, 1]; outputs ``shape_logits`` [B, 8], ``colour_logits`` [B, 8], ``pattern_logits`` [B, 3],
``background_logits`` [B, 5], ``features`` [B, 128]) and ``probe.json`` beside it (label orders,
recipe, measured accuracies).
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort
from PIL import Image

from zo_edge.models import world

RESOLUTION = 32
FEATURE_DIM = 128
ATTRIBUTES = ("shape", "colour", "pattern", "background")
LABELS: dict[str, tuple[str, ...]] = {
    "shape": world.SHAPES, "colour": world.COLOURS, "pattern": world.PATTERNS, "background": world.BACKGROUNDS,
}
OUTPUTS = tuple(f"{a}_logits" for a in ATTRIBUTES) + ("features",)
DEFAULT_PATH = Path(__file__).parent / "shapes" / "probe.onnx"

# Training seeds come from [0, 2**30), evaluation seeds from [2**30, 2**31): never the same render.
_TRAIN_SEEDS = (0, 2**30)
_TEST_SEEDS = (2**30, 2**31)

RECIPE = dict(
    seed=0, steps=1000, batch=64, lr=3e-3, weight_decay=5e-4, warmup=0.05, per_combo=16,
    channels=(32, 64, 128, 128), threads=1,
    augment=dict(
        hflip=0.5,
        affine=dict(p=0.5, shift_px=1.5, scale=(0.93, 1.07), rot_deg=6),
        colour=dict(p=0.8, brightness=(0.85, 1.15), gain=(0.94, 1.06), contrast=(0.8, 1.2),
                    saturation=(0.8, 1.15)),
        blur=dict(p=0.7, sigma=(0.0, 1.0)),
        down_up=dict(p=0.25, sizes=(16, 20, 24)),
        noise=dict(p=0.7, std=(0.0, 0.04), lowfreq_std=(0.0, 0.03)),
    ),
)
# The "augmented" evaluation: blur, colour jitter and noise always on, the rest as in training.
TEST_AUGMENT_P = dict(colour=1.0, blur=1.0, noise=1.0)


# ----------------------------------------------------------------------------------------------
# Runtime (no torch)
# ----------------------------------------------------------------------------------------------

def _as_batch(images) -> np.ndarray:
    """uint8 [B, H, W, 3] / list of [H, W, 3] (any sizes, uint8 or float in [0, 1], PIL images) ->
    float32 [B, 3, 32, 32] in [0, 1]."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = images[None]
    if isinstance(images, np.ndarray) and images.ndim != 4:
        raise ValueError(f"expected images [B, H, W, 3] or [H, W, 3], got shape {images.shape}")
    out = []
    for img in images:
        a = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] not in (3, 4):
            raise ValueError(f"expected an RGB image [H, W, 3], got shape {a.shape}")
        a = a[..., :3]
        if a.dtype != np.uint8:
            a = np.clip(np.asarray(a, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        if a.shape[:2] != (RESOLUTION, RESOLUTION):
            a = np.asarray(Image.fromarray(a).resize((RESOLUTION, RESOLUTION), Image.BILINEAR))
        out.append(a)
    if not out:
        raise ValueError("no images")
    batch = np.stack(out).astype(np.float32) / 255.0
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class Probe:
    """The shipped probe on onnxruntime. ``predict`` gives attribute names and features."""

    def __init__(self, session: ort.InferenceSession, labels: dict[str, Sequence[str]] | None = None,
                 meta: dict | None = None) -> None:
        self.session = session
        self.labels = {a: tuple(labels[a]) if labels else LABELS[a] for a in ATTRIBUTES}
        self.meta = meta or {}
        self.input_name = session.get_inputs()[0].name
        names = [o.name for o in session.get_outputs()]
        missing = [n for n in OUTPUTS if n not in names]
        if missing:
            raise ValueError(f"probe model lacks outputs {missing}; has {names}")

    @classmethod
    def load(cls, path: str | Path | None = None, threads: int | None = None) -> "Probe":
        path = Path(path) if path is not None else DEFAULT_PATH
        if not path.is_file():
            raise FileNotFoundError(f"probe model not found: {path} "
                                    f"(train it: python -m zo_edge.models.probe --out {path})")
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        return cls(session, meta.get("labels"), meta)

    def run(self, images, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Raw outputs: ``{shape,colour,pattern,background}_logits`` and ``features``."""
        x = _as_batch(images)
        parts = [self.session.run(list(OUTPUTS), {self.input_name: x[i:i + batch_size]})
                 for i in range(0, len(x), batch_size)]
        return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(OUTPUTS)}

    def predict(self, images, batch_size: int = 256) -> dict:
        """images: uint8 [B, H, W, 3] or a list of [H, W, 3] (resized to 32 px, PIL bilinear).

        Returns ``shape``, ``colour``, ``pattern``, ``background``: lists of names; ``features``:
        float32 [B, 128], L2-normalised; ``probs``: {attribute: float32 [B, n_classes]}.
        """
        raw = self.run(images, batch_size)
        out: dict = {}
        probs = {}
        for a in ATTRIBUTES:
            logits = raw[f"{a}_logits"]
            out[a] = [self.labels[a][i] for i in logits.argmax(axis=1)]
            probs[a] = _softmax(logits.astype(np.float32))
        out["features"] = raw["features"].astype(np.float32)
        out["probs"] = probs
        return out

    def features(self, images) -> np.ndarray:
        return self.run(images)["features"]


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def all_combos() -> list[tuple[str, str, str, str]]:
    """Every (shape, colour, pattern, background), the held-out subjects included."""
    return list(itertools.product(world.SHAPES, world.COLOURS, world.PATTERNS, world.BACKGROUNDS))


def label_indices(combo: tuple[str, str, str, str]) -> tuple[int, int, int, int]:
    return tuple(LABELS[a].index(v) for a, v in zip(ATTRIBUTES, combo))


def render_set(per_combo: int, seed: int, seed_range: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """per_combo renders of every combination with random seeds: uint8 [N, 32, 32, 3], int64 [N, 4]."""
    rng = np.random.default_rng(seed)
    combos = all_combos()
    n = len(combos) * per_combo
    images = np.empty((n, RESOLUTION, RESOLUTION, 3), np.uint8)
    labels = np.empty((n, 4), np.int64)
    i = 0
    for combo in combos:
        for s in rng.integers(*seed_range, size=per_combo):
            images[i] = world.render(*combo, seed=int(s), size=RESOLUTION)
            labels[i] = label_indices(combo)
            i += 1
    return images, labels


def augment(x, g, cfg: dict | None = None, p_override: dict | None = None):
    """Diffusion-like corruptions on float [B, 3, 32, 32] in [0, 1]; ``g`` a torch.Generator."""
    import torch
    import torch.nn.functional as F

    cfg = cfg or RECIPE["augment"]
    p_override = p_override or {}
    B = x.shape[0]

    def U(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    def on(name):
        p = p_override.get(name, cfg[name]["p"] if isinstance(cfg[name], dict) else cfg[name])
        return (torch.rand(B, generator=g) < p).float().view(B, 1, 1, 1)

    m = on("hflip")
    x = m * x.flip(3) + (1 - m) * x

    a = cfg["affine"]
    m = on("affine")
    ang = torch.deg2rad(U(-a["rot_deg"], a["rot_deg"], B))
    sc = U(*a["scale"], B)
    shift = U(-a["shift_px"], a["shift_px"], B, 2) * (2.0 / x.shape[-1])
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(ang) / sc, -torch.sin(ang) / sc
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(ang) / sc, torch.cos(ang) / sc
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = m * y + (1 - m) * x

    c = cfg["colour"]
    m = on("colour")
    y = x * U(*c["brightness"], B, 1, 1, 1) * U(*c["gain"], B, 3, 1, 1)
    grey = y.mean(dim=1, keepdim=True)
    y = grey + (y - grey) * U(*c["saturation"], B, 1, 1, 1)
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = mean + (y - mean) * U(*c["contrast"], B, 1, 1, 1)
    x = m * y.clamp(0, 1) + (1 - m) * x

    b = cfg["blur"]
    m = on("blur")
    sigma = U(*b["sigma"], B).clamp_min(1e-3)
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-0.5 * (r[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)  # [B*3, 5]
    y = x.reshape(1, B * 3, *x.shape[-2:])
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), k.view(B * 3, 1, 1, 5), groups=B * 3)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), k.view(B * 3, 1, 5, 1), groups=B * 3)
    x = m * y.view_as(x) + (1 - m) * x

    d = cfg["down_up"]
    m = on("down_up")
    size = int(d["sizes"][int(torch.randint(len(d["sizes"]), (1,), generator=g))])
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
    x = m * y + (1 - m) * x

    n = cfg["noise"]
    m = on("noise")
    white = torch.randn(x.shape, generator=g) * U(*n["std"], B, 1, 1, 1)
    low = torch.randn(B, 3, 8, 8, generator=g) * U(*n["lowfreq_std"], B, 1, 1, 1)
    low = F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)
    x = x + m * (white + low)
    return x.clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

def build_model(channels: Sequence[int] = RECIPE["channels"]):
    import torch.nn as nn
    import torch.nn.functional as F

    class ProbeNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers, cin = [], 3
            for cout in channels:
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                           nn.ReLU(inplace=True), nn.MaxPool2d(2)]
                cin = cout
            self.body = nn.Sequential(*layers)
            self.embed = nn.Linear(cin, FEATURE_DIM)
            self.heads = nn.ModuleList(nn.Linear(FEATURE_DIM, len(LABELS[a])) for a in ATTRIBUTES)

        def forward(self, image):  # image: [B, 3, 32, 32] RGB in [0, 1]
            h = self.body((image - 0.5) * 4.0).mean(dim=(2, 3))
            f = self.embed(h)
            logits = [head(F.relu(f)) for head in self.heads]
            return (*logits, F.normalize(f, dim=1))

    return ProbeNet()


def _to_tensor(images: np.ndarray):
    import torch
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def _accuracy(model, x, labels: np.ndarray, batch: int = 480) -> dict[str, float]:
    import torch
    model.eval()
    preds = [[] for _ in ATTRIBUTES]
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = model(x[i:i + batch])
            for k in range(len(ATTRIBUTES)):
                preds[k].append(out[k].argmax(1).numpy())
    return {a: float((np.concatenate(preds[k]) == labels[:, k]).mean()) for k, a in enumerate(ATTRIBUTES)}


def train(steps: int, seed: int = 0, batch: int = RECIPE["batch"], per_combo: int = RECIPE["per_combo"],
          lr: float = RECIPE["lr"], log=print):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    images, labels = render_set(per_combo, seed, _TRAIN_SEEDS)
    log(f"[{time.time() - t0:6.1f}s] rendered {len(images)} training images ({per_combo} per combination)")
    x_all, y_all = _to_tensor(images), torch.from_numpy(labels)

    model = build_model()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": RECIPE["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    warm = max(1, int(RECIPE["warmup"] * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed + 1)
    model.train()
    avg_loss, avg_acc = None, None
    for step in range(1, steps + 1):
        idx = torch.randint(len(x_all), (batch,), generator=g)
        x, y = augment(x_all[idx], g), y_all[idx]
        out = model(x)
        losses = [F.cross_entropy(out[k], y[:, k]) for k in range(len(ATTRIBUTES))]
        loss = sum(losses)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        acc = np.array([(out[k].argmax(1) == y[:, k]).float().mean().item() for k in range(len(ATTRIBUTES))])
        avg_loss = loss.item() if avg_loss is None else 0.95 * avg_loss + 0.05 * loss.item()
        avg_acc = acc if avg_acc is None else 0.95 * avg_acc + 0.05 * acc
        if step % 50 == 0 or step == steps:
            log(f"[{time.time() - t0:6.1f}s] step {step}/{steps} loss {avg_loss:.4f} train acc "
                + " ".join(f"{a} {v:.3f}" for a, v in zip(ATTRIBUTES, avg_acc)))
    model.eval()
    return model, time.time() - t0


def export_onnx(model, out: Path) -> None:
    import warnings

    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(2, 3, RESOLUTION, RESOLUTION),), str(out), dynamo=False,
                          opset_version=17, input_names=["image"], output_names=list(OUTPUTS),
                          dynamic_axes={n: {0: "batch"} for n in ("image",) + OUTPUTS}, do_constant_folding=True)
    import onnx
    m = onnx.load(str(out))
    onnx.checker.check_model(m)
    m.doc_string = ("zo-edge shapes probe: image float32 [B,3,32,32] RGB in [0,1] -> shape/colour/pattern/"
                    "background logits + L2-normalised 128-d features")
    onnx.save(m, str(out))


def evaluate(model, onnx_path: Path, seed: int, per_combo: int = 1, log=print) -> dict:
    """Accuracy per attribute on fresh renders of every combination: clean, augmented, the held-out
    subjects alone, and the exported ONNX model on the clean set (through :class:`Probe`)."""
    import torch

    images, labels = render_set(per_combo, seed + 12345, _TEST_SEEDS)
    x = _to_tensor(images)
    g = torch.Generator().manual_seed(seed + 777)
    x_aug = augment(x, g, p_override=TEST_AUGMENT_P)
    held = np.array([world.is_held_out(LABELS["shape"][s], LABELS["colour"][c], LABELS["pattern"][p])
                     for s, c, p, _ in labels])
    res = {
        "n_test": int(len(images)), "n_held_out_subject_test": int(held.sum()),
        "clean": _accuracy(model, x, labels),
        "augmented": _accuracy(model, x_aug, labels),
        "held_out_subjects_clean": _accuracy(model, x[torch.from_numpy(held)], labels[held]),
        "held_out_subjects_augmented": _accuracy(model, x_aug[torch.from_numpy(held)], labels[held]),
    }
    probe = Probe.load(onnx_path, threads=1)
    pred = probe.predict(images)
    res["onnx_clean"] = {a: float(np.mean([LABELS[a].index(v) for v in pred[a]] == labels[:, k]))
                         for k, a in enumerate(ATTRIBUTES)}
    with torch.no_grad():
        ref = model(x[:64])[-1].numpy()
    res["onnx_max_feature_diff"] = float(np.abs(pred["features"][:64] - ref).max())
    for name in ("clean", "augmented", "held_out_subjects_clean", "held_out_subjects_augmented", "onnx_clean"):
        log(f"  {name:30s} " + " ".join(f"{a} {res[name][a]:.4f}" for a in ATTRIBUTES))
    log(f"  onnx vs torch max |feature diff| {res['onnx_max_feature_diff']:.2e}")
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Train the shapes probe and export it to ONNX.")
    ap.add_argument("--out", type=Path, default=DEFAULT_PATH, help="probe.onnx to write (probe.json beside it)")
    ap.add_argument("--steps", type=int, default=RECIPE["steps"])
    ap.add_argument("--seed", type=int, default=RECIPE["seed"])
    ap.add_argument("--batch", type=int, default=RECIPE["batch"])
    ap.add_argument("--per-combo", type=int, default=RECIPE["per_combo"],
                    help="training renders per (shape, colour, pattern, background)")
    ap.add_argument("--threads", type=int, default=RECIPE["threads"])
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, train_s = train(args.steps, args.seed, args.batch, args.per_combo)
    export_onnx(model, args.out)
    print(f"[{time.time() - t0:6.1f}s] exported {args.out} ({args.out.stat().st_size / 1e6:.2f} MB); evaluating")
    acc = evaluate(model, args.out, args.seed)
    recipe = dict(RECIPE, steps=args.steps, seed=args.seed, batch=args.batch, per_combo=args.per_combo,
                  threads=args.threads, train_images=len(all_combos()) * args.per_combo,
                  train_seed_range=list(_TRAIN_SEEDS), test_seed_range=list(_TEST_SEEDS),
                  test_augment_p=TEST_AUGMENT_P, torch=torch.__version__)
    meta = {
        "model": "zo_edge.models.probe",
        "input": {"name": "image", "shape": ["batch", 3, RESOLUTION, RESOLUTION], "dtype": "float32",
                  "range": [0.0, 1.0], "channels": "RGB"},
        "outputs": {**{f"{a}_logits": ["batch", len(LABELS[a])] for a in ATTRIBUTES},
                    "features": ["batch", FEATURE_DIM]},
        "features_normalised": True,
        "labels": {a: list(LABELS[a]) for a in ATTRIBUTES},
        "held_out": [list(h) for h in world.HELD_OUT],
        "accuracy": acc,
        "recipe": recipe,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t0, 1),
        "onnx_bytes": args.out.stat().st_size,
        "onnx_sha256": hashlib.sha256(args.out.read_bytes()).hexdigest(),
    }
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"[{time.time() - t0:6.1f}s] wrote {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
