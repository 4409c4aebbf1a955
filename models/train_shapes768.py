"""Recipe for ``shapes-768``: the shipped ``shapes`` model with a text encoder as wide as SD 1.x's
(d = 768), so zeroth-order estimators can be studied at the token width they meet on real models.

Nothing is trained on images: the shipped model's VAE and UNet are kept, its 64-wide text encoder is
replaced by a ``CLIPTextModel`` of width 768 (12 heads of 64, the real CLIP tokenizer) and each UNet
cross-attention ``to_k`` / ``to_v`` by a new 768-input map, and the new keys and values must equal
the old ones on the world's prompts (training captions as :mod:`zo_edge.models.train_shapes` builds
them, and the TI templates of :data:`zo_runtime.recipe.TEMPLATES` filled with world words), at every
cross-attention layer and all 77 positions. Two students:

``--student embed`` (default, the shipped model): the teacher *embedded exactly*. Its residual stream
x (width 64) lives in width 768 as Q T x: T repeats each coordinate 12 times, so a LayerNorm over 768
sees the mean and variance of the 64 (LayerNorm gains and biases are folded into the maps that read
after them), and Q is a random rotation fixing the all-ones vector, so gain-free LayerNorm commutes
with it and no coordinate of the 768 is special. Attention heads 0-3 hold the teacher's heads
(q scaled by sqrt(64/16) for the wider head); the 704 directions the teacher never uses are read
by random maps (``--off-scale`` x the teacher's read strength) into 8 new heads, the free dims of
the old ones, 512 new MLP units (``--intermediate`` 768) and the k/v maps. Those reads see zero on
every prompt of world words, so keys and values match to float32 rounding, while a learned token
is a genuinely 768-d input. Same depth as the teacher (3 layers). Measured (``seed`` 0, 1 thread,
2-core AMD EPYC shared with other jobs): relative RMS error of keys/values 2.6e-7 (mean over the 14
maps, worst 3.1e-7) on 597 held-out prompts, which include the 40 captions of the 8 held-out
subjects; wall time 66 s, all of it loading, the error check and writing.

``--student scratch``: a fresh encoder (CLIP-style init, ``--layers`` 1-2) and fresh maps distilled
by Adam on  mean over maps of ||W_new(E768(p)) - W_old(E64(p))||^2 / mean(W_old(E64(p))^2).  Measured
(``--student scratch --layers 1 --intermediate 1536 --steps 200``, batch 8, lr 2e-3; results in
docs/results/shapes768.json): relative RMS error 1.36 at init, 0.36 after 200 steps (worst map 0.43),
the loss still falling slowly (halving every ~70 steps at first, then slower): nowhere near the exact
construction within the 120-minute budget, so the embedding is the recipe.

The token table starts as CLIP-style random rows (std 0.02) from :func:`zo_runtime.bundle.seeded_rows`,
bit-exact on every platform; only the 54 rows of words the prompts use are set (from the teacher).
The others stay exactly as generated, so ``zo-edge convert`` stores the 54 rows alone and the runtime
regenerates the rest (``token_embedding.fill``, docs/bundle.md): the int8w bundle is 19.1 MB.

    python -m zo_edge.models.train_shapes768 --out work/shapes768-diffusers     # ~1 min
    zo-edge convert work/shapes768-diffusers models/shapes768/bundle --weights int8w

Teacher: the shipped diffusers source (``models/shapes/source``); ``--teacher`` names another.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zo_edge.models import SHAPES_SOURCE, world
from zo_edge.models.train_shapes import Clock, progress, train_caption
from zo_runtime.bundle import TOKEN_FILL_FILE, seeded_rows
from zo_runtime.recipe import TEMPLATES

FILL_FILE = TOKEN_FILL_FILE  # in the text_encoder folder: how the untrained rows were made
TABLE_SEED_OFFSET = 7  # the table's generator seed is --seed + this (its own stream)
ROW_STD = 0.02  # CLIP's initializer_range


def text_config(layers: int = 2, intermediate: int = 1536, width: int = 768, heads: int = 12) -> dict:
    return dict(vocab_size=49408, hidden_size=width, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=width)


# -- the prompts ----------------------------------------------------------------------------------

def _fillers(subject: world.Subject, bg: str) -> list[str]:
    """What stands in a TI template's slot: the init words (class noun, 'shape') and fuller phrases."""
    return [subject.shape, "shape", "object", f"{subject.colour} {subject.shape}", f"{subject.pattern} {subject.shape}",
            subject.words, f"{subject.words} on a {bg} background", f"{subject.shape} on a {bg} background"]


def sample_prompt(rng: np.random.Generator) -> str:
    """Half training captions (train_shapes' distribution, 10 % empty), half TI templates with world words."""
    subject, bg = world.sample(rng)
    if rng.random() < 0.5:
        return train_caption(subject, bg, rng)
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    fillers = _fillers(subject, bg)
    return template.format(fillers[rng.integers(len(fillers))])


def vocabulary_prompts() -> list[str]:
    """Prompts that together use every word :func:`sample_prompt` can produce: the trained rows."""
    out = [""]
    for s, c, p in itertools.product(world.SHAPES, world.COLOURS, world.PATTERNS):
        for bg in world.BACKGROUNDS:
            subj = world.Subject(s, c, p)
            out.append(world.caption(subj, bg))
            out += [prefix + world.caption(subj, bg) for prefix in ("a photo of ", "a rendering of ", "an image of ")]
    out.append("a shape")
    out += [t.format(f) for t in TEMPLATES for f in ("shape", "object")]
    return out


def trained_ids(tokenizer) -> np.ndarray:
    ids = tokenizer(vocabulary_prompts(), padding="max_length", max_length=77, truncation=True,
                    return_tensors="np").input_ids
    return np.unique(ids).astype(np.int64)


# -- the models -----------------------------------------------------------------------------------

class PartlyTrainedTable(torch.nn.Module):
    """A token lookup whose rows ``ids`` are parameters and the rest a frozen table."""

    def __init__(self, table: np.ndarray, ids: np.ndarray):
        super().__init__()
        self.register_buffer("table", torch.from_numpy(np.ascontiguousarray(table)), persistent=False)
        remap = torch.full((table.shape[0],), -1, dtype=torch.long)
        remap[torch.from_numpy(ids)] = torch.arange(len(ids))
        self.register_buffer("remap", remap, persistent=False)
        self.rows = torch.nn.Parameter(torch.from_numpy(np.array(table[ids])))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        r = self.remap[ids]
        return torch.where((r >= 0)[..., None], self.rows[r.clamp(min=0)], self.table[ids])

    def full(self) -> torch.Tensor:
        t = self.table.clone()
        t[self.remap >= 0] = self.rows.detach()[self.remap[self.remap >= 0]]
        return t


def cross_attentions(unet) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in unet.named_modules() if n.endswith("attn2")]


def build_student(teacher_unet, tokenizer, cfg: dict, seed: int):
    """(student text encoder with a PartlyTrainedTable, new to_k/to_v maps per cross-attention, trained ids)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(**cfg))
    table = seeded_rows(seed + TABLE_SEED_OFFSET, cfg["vocab_size"], cfg["hidden_size"], ROW_STD)
    ids = trained_ids(tokenizer)
    text.text_model.embeddings.token_embedding = PartlyTrainedTable(table, ids)
    maps = torch.nn.ModuleDict()
    for name, attn in cross_attentions(teacher_unet):
        for kind in ("to_k", "to_v"):
            old = getattr(attn, kind)
            maps[f"{name}.{kind}".replace(".", "/")] = torch.nn.Linear(cfg["hidden_size"], old.out_features,
                                                                      bias=old.bias is not None)
    return text, maps, ids


# -- the exact construction (default) -------------------------------------------------------------

def rotation_fixing_ones(n: int, gen: torch.Generator) -> torch.Tensor:
    """A random orthogonal [n, n] Q with Q 1 = 1: LayerNorm without gain commutes with it."""
    o, _ = torch.linalg.qr(torch.randn(n - 1, n - 1, generator=gen, dtype=torch.float64))
    u = torch.full((n,), 1 / math.sqrt(n), dtype=torch.float64)
    e1 = torch.zeros(n, dtype=torch.float64)
    e1[0] = 1.0
    w = (u - e1) / torch.linalg.norm(u - e1)
    h = torch.eye(n, dtype=torch.float64) - 2 * torch.outer(w, w)  # Householder: h u = e1, h e1 = u
    inner = torch.eye(n, dtype=torch.float64)
    inner[1:, 1:] = o
    return h @ inner @ h


class Embedding:
    """The teacher's width-D residual stream inside width W = R * D: x -> E x = Q T x, T repeating each
    coordinate R times (so mean and variance over W equal those over D: LayerNorm is preserved), Q a
    random rotation fixing the all-ones vector (so LayerNorm without gain commutes with it).
    ``write(M)``: a map that adds M y to the teacher's stream, in the student's; ``read(M)``: a map
    that reads M x from the teacher's stream, from the student's; ``off``: the projector onto the
    W - D directions the teacher never uses (zero on every world prompt)."""

    def __init__(self, d: int, width: int, gen: torch.Generator):
        if width % d:
            raise ValueError(f"width {width} is not a multiple of the teacher's {d}")
        self.r = width // d
        tile = torch.zeros(width, d, dtype=torch.float64)
        tile[torch.arange(width), torch.arange(width) // self.r] = 1.0
        self.e = rotation_fixing_ones(width, gen) @ tile  # [W, D], e.T e = R I
        basis = self.e / math.sqrt(self.r)
        self.off = torch.eye(width, dtype=torch.float64) - basis @ basis.T

    def write(self, m: torch.Tensor) -> torch.Tensor:
        return self.e @ m.double()

    def read(self, m: torch.Tensor) -> torch.Tensor:
        return m.double() @ self.e.T / self.r


def embed_student(teacher: "Teacher", ids: np.ndarray, cfg: dict, seed: int, off_scale: float):
    """A CLIPTextModel of width cfg['hidden_size'] and depth = the teacher's, plus new k/v maps, that
    reproduce the teacher's keys and values exactly on every prompt made of the rows ``ids`` (they
    are the teacher's rows, embedded). Every other direction of the 768-d token space is read by
    random maps (std ``off_scale`` x the teacher's reads of that map, per entry) into new attention
    heads, new MLP units and the k/v maps, so a learned token is a genuinely 768-d input; those
    maps see zero on world prompts, so exactness holds. Other token rows: ``seeded_rows``.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    tt = teacher.text.text_model
    tc = teacher.text.config
    d, width, heads = tc.hidden_size, cfg["hidden_size"], cfg["num_attention_heads"]
    th, tdh, dh = tc.num_attention_heads, tc.hidden_size // tc.num_attention_heads, width // heads
    if cfg["num_hidden_layers"] != tc.num_hidden_layers or cfg["intermediate_size"] < tc.intermediate_size \
            or heads < th or dh < tdh:
        raise ValueError("the student must have the teacher's depth and at least its heads, head width and MLP")
    gen = torch.Generator().manual_seed(seed)
    em = Embedding(d, width, gen)

    def rand_reads(rows: int, like: torch.Tensor) -> torch.Tensor:
        """rows x W random reads of the off-teacher directions, entries scaled like ``like``'s."""
        scale = off_scale * float(like.double().pow(2).mean().sqrt())
        return torch.randn(rows, width, generator=gen, dtype=torch.float64) * scale @ em.off

    # teacher (head, dim) -> student feature index: head h's dims land in the first tdh dims of head h
    slot = torch.tensor([h * dh + j for h in range(th) for j in range(tdh)])
    free = torch.tensor(sorted(set(range(width)) - set(slot.tolist())))
    q_fix = math.sqrt(dh / tdh)  # the student scales q.k by dh^-0.5, the teacher by tdh^-0.5
    student = CLIPTextModel(CLIPTextConfig(**cfg))
    st = student.text_model
    sd = {}
    for i, (tl, sl) in enumerate(zip(tt.encoder.layers, st.encoder.layers)):
        pre = f"text_model.encoder.layers.{i}."
        g1, b1 = tl.layer_norm1.weight.double(), tl.layer_norm1.bias.double()
        for name, fix in (("q_proj", q_fix), ("k_proj", 1.0), ("v_proj", 1.0)):
            lin = getattr(tl.self_attn, name)
            w = torch.zeros(width, width, dtype=torch.float64)
            b = torch.zeros(width, dtype=torch.float64)
            w[slot] = em.read(lin.weight.double() * g1) * fix
            b[slot] = (lin.weight.double() @ b1 + lin.bias.double()) * fix
            w[free] = rand_reads(len(free), w[slot])
            sd[pre + f"self_attn.{name}.weight"], sd[pre + f"self_attn.{name}.bias"] = w, b
        o = tl.self_attn.out_proj
        wo = torch.zeros(d, width, dtype=torch.float64)
        wo[:, slot] = o.weight.double()
        wo[:, free] = torch.randn(d, len(free), generator=gen, dtype=torch.float64) * (
            off_scale * float(o.weight.double().pow(2).mean().sqrt()))
        sd[pre + "self_attn.out_proj.weight"] = em.write(wo)
        sd[pre + "self_attn.out_proj.bias"] = em.write(o.bias.double()[:, None])[:, 0]
        g2, b2 = tl.layer_norm2.weight.double(), tl.layer_norm2.bias.double()
        fc1, fc2 = tl.mlp.fc1, tl.mlp.fc2
        n_t, n_s = fc1.out_features, cfg["intermediate_size"]
        w1 = torch.zeros(n_s, width, dtype=torch.float64)
        c1 = torch.zeros(n_s, dtype=torch.float64)
        w1[:n_t] = em.read(fc1.weight.double() * g2)
        c1[:n_t] = fc1.weight.double() @ b2 + fc1.bias.double()
        w1[n_t:] = rand_reads(n_s - n_t, w1[:n_t])
        w2 = torch.zeros(d, n_s, dtype=torch.float64)
        w2[:, :n_t] = fc2.weight.double()
        w2[:, n_t:] = torch.randn(d, n_s - n_t, generator=gen, dtype=torch.float64) * (
            off_scale * float(fc2.weight.double().pow(2).mean().sqrt()))
        sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"] = w1, c1
        sd[pre + "mlp.fc2.weight"] = em.write(w2)
        sd[pre + "mlp.fc2.bias"] = em.write(fc2.bias.double()[:, None])[:, 0]
        for ln in ("layer_norm1", "layer_norm2"):  # gains and biases were folded into the reads
            sd[pre + f"{ln}.weight"], sd[pre + f"{ln}.bias"] = torch.ones(width), torch.zeros(width)
    gf, bf = tt.final_layer_norm.weight.double(), tt.final_layer_norm.bias.double()
    # final LayerNorm: gain 1, bias E(bf / gf); the k/v maps read diag(gf) x, so they see gf * n + bf
    sd["text_model.final_layer_norm.weight"] = torch.ones(width)
    sd["text_model.final_layer_norm.bias"] = em.write((bf / gf)[:, None])[:, 0]
    sd["text_model.embeddings.position_embedding.weight"] = em.write(
        tt.embeddings.position_embedding.weight.double().T).T
    table = torch.from_numpy(seeded_rows(seed + TABLE_SEED_OFFSET, cfg["vocab_size"], width, ROW_STD)).double()
    table[torch.from_numpy(ids)] = em.write(tt.embeddings.token_embedding.weight.double()[torch.from_numpy(ids)].T).T
    sd["text_model.embeddings.token_embedding.weight"] = table
    student.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    maps = torch.nn.ModuleDict()
    for key, lin in teacher.layers.items():
        new = torch.nn.Linear(width, lin.out_features, bias=False)
        w = em.read(lin.weight.double() * gf)
        w = w + rand_reads(lin.out_features, w)
        new.weight.data = w.float()
        maps[key] = new
    return student.eval(), maps


class Teacher:
    """The shipped model's text encoder and cross-attention k/v maps, frozen."""

    def __init__(self, source: Path):
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        self.text = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=torch.float32).eval()
        self.unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch.float32).eval()
        for m in (self.text, self.unet):
            m.requires_grad_(False)
        self.layers = {f"{n}.{k}".replace(".", "/"): getattr(a, k) for n, a in cross_attentions(self.unet)
                       for k in ("to_k", "to_v")}

    @torch.no_grad()
    def targets(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.text(ids)[0]
        return {k: lin(h) for k, lin in self.layers.items()}


def kv_loss(text, maps, teacher_out: dict, ids: torch.Tensor) -> torch.Tensor:
    """Mean over the k/v maps of the relative squared error of the student's keys/values."""
    h = text(ids)[0]
    losses = [F.mse_loss(maps[k](h), t) / t.pow(2).mean() for k, t in teacher_out.items()]
    return torch.stack(losses).mean()


def distill(teacher: Teacher, text, maps, tokenizer, steps: int, batch: int, lr: float, seed: int,
            log_every: int = 25) -> list[float]:
    """Adam on the student encoder (its trained rows included) and the new maps; warm-up then cosine to lr/20.
    Returns the smoothed loss at each logged step."""
    params = [p for p in itertools.chain(text.parameters(), maps.parameters()) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed + 1)
    warmup = max(1, min(100, steps // 10))
    t0, avg, history = time.time(), None, []
    for step in range(1, steps + 1):
        prompts = [sample_prompt(rng) for _ in range(batch)]
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        loss = kv_loss(text, maps, teacher.targets(ids), ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        cur = lr * min(1.0, step / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = cur
        opt.step()
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if step % log_every == 0 or step == steps:
            progress("distill k/v", step, steps, avg, t0)
            history.append(avg)
    return history


@torch.no_grad()
def evaluate(teacher: Teacher, text, maps, tokenizer, prompts: list[str], batch: int = 32) -> dict:
    """Relative RMS error of keys and values per layer (sqrt of sum sq err / sum sq target) on ``prompts``."""
    err: dict[str, float] = {}
    ref: dict[str, float] = {}
    for i in range(0, len(prompts), batch):
        ids = tokenizer(prompts[i:i + batch], padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        tgt = teacher.targets(ids)
        h = text(ids)[0]
        for k, t in tgt.items():
            err[k] = err.get(k, 0.0) + float((maps[k](h) - t).pow(2).sum())
            ref[k] = ref.get(k, 0.0) + float(t.pow(2).sum())
    per = {k: math.sqrt(err[k] / ref[k]) for k in err}
    return {"per_map": per, "mean": float(np.mean(list(per.values()))), "worst": float(max(per.values())),
            "prompts": len(prompts)}


def held_out_prompts(n: int, seed: int) -> list[str]:
    """Evaluation prompts: fresh draws of the training distribution plus the held-out subjects' captions
    (never in the distillation data) and bench quality's evaluation prompts with init words."""
    rng = np.random.default_rng(seed + 12345)
    out = [sample_prompt(rng) for _ in range(n)]
    for s, c, p in world.HELD_OUT:
        for bg in world.BACKGROUNDS:
            out.append(world.caption(world.Subject(s, c, p), bg))
    out += [f"a photo of a {w} on a {bg} background" for w in ("shape",) + world.SHAPES for bg in world.BACKGROUNDS]
    return out


# -- writing the model ----------------------------------------------------------------------------

def student_unet(teacher_unet, maps, width: int):
    """The teacher's UNet with cross_attention_dim = width and the new k/v maps."""
    from diffusers import UNet2DConditionModel

    config = dict(teacher_unet.config)
    config["cross_attention_dim"] = width
    unet = UNet2DConditionModel.from_config(config)
    state = {k: v for k, v in teacher_unet.state_dict().items()}
    for key, lin in maps.items():
        name = key.replace("/", ".")
        state[f"{name}.weight"] = lin.weight.detach().clone()
        if lin.bias is not None:
            state[f"{name}.bias"] = lin.bias.detach().clone()
    unet.load_state_dict(state, strict=True)
    return unet.eval()


def standard_text_encoder(text, cfg: dict):
    """The student as a plain CLIPTextModel (its full table in an nn.Embedding), for save_pretrained."""
    from transformers import CLIPTextConfig, CLIPTextModel

    plain = CLIPTextModel(CLIPTextConfig(**cfg))
    state = {k: v for k, v in text.state_dict().items() if "token_embedding" not in k}
    state["text_model.embeddings.token_embedding.weight"] = text.text_model.embeddings.token_embedding.full()
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="diffusers folder to write")
    ap.add_argument("--teacher", default=str(SHAPES_SOURCE), help="diffusers folder of the 64-wide shapes model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--student", choices=("embed", "scratch"), default="embed",
                    help="embed: the exact construction (no training); scratch: distil a fresh encoder")
    ap.add_argument("--layers", type=int, default=None, help="student layers [embed: the teacher's; scratch: 2]")
    ap.add_argument("--intermediate", type=int, default=768, help="student MLP width")
    ap.add_argument("--off-scale", type=float, default=1.0,
                    help="embed: strength of the random reads of the 704 new directions, x the teacher's reads")
    ap.add_argument("--steps", type=int, default=1500, help="scratch: distillation steps")
    ap.add_argument("--batch", type=int, default=8, help="scratch: prompts per step")
    ap.add_argument("--lr", type=float, default=2e-3, help="scratch: peak Adam rate")
    ap.add_argument("--eval-prompts", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    return ap


def main(argv=None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    for name in ("intermediate", "steps", "batch", "eval_prompts", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.layers is not None and args.layers < 1:
        ap.error("--layers must be at least 1")
    if not args.off_scale >= 0:
        ap.error("--off-scale must be >= 0")
    teacher_dir, out = Path(args.teacher), Path(args.out)
    if not (teacher_dir / "model_index.json").exists():
        ap.error(f"--teacher {teacher_dir} is not a diffusers folder (no model_index.json)")
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    clock = Clock()
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(teacher_dir / "tokenizer")
    teacher = Teacher(teacher_dir)
    depth = teacher.text.config.num_hidden_layers
    layers = args.layers or (depth if args.student == "embed" else 2)
    if args.student == "embed" and layers != depth:
        ap.error(f"--student embed keeps the teacher's depth ({depth} layers)")
    cfg = text_config(layers, args.intermediate)
    history: list[float] = []
    if args.student == "embed":
        ids = trained_ids(tokenizer)
        try:
            text, maps = embed_student(teacher, ids, cfg, args.seed, args.off_scale)
        except ValueError as e:
            ap.error(str(e))
        clock.stage(f"embedded the teacher: {layers} layers x 768, MLP {args.intermediate}, {len(ids)} token rows "
                    f"from the teacher; {len(maps)} k/v maps")
        before = None
    else:
        text, maps, ids = build_student(teacher.unet, tokenizer, cfg, args.seed)
        clock.stage(f"student: {layers} layers x 768, MLP {args.intermediate}, {len(ids)} trained token rows; "
                    f"{len(maps)} k/v maps")
        before = evaluate(teacher, text, maps, tokenizer, held_out_prompts(64, args.seed))["mean"]
        clock.stage(f"distill {args.steps} steps, batch {args.batch}")
        history = distill(teacher, text, maps, tokenizer, args.steps, args.batch, args.lr, args.seed)
        text = standard_text_encoder(text.eval(), cfg)
    clock.stage("k/v error on held-out prompts")
    after = evaluate(teacher, text, maps, tokenizer, held_out_prompts(args.eval_prompts, args.seed))
    print(f"  k/v relative RMS error: mean {after['mean']:.3g}, worst map {after['worst']:.3g} on "
          f"{after['prompts']} prompts" + (f" (at init {before:.3f})" if before is not None else ""), flush=True)
    seconds = time.time() - clock.t0

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    vae = AutoencoderKL.from_pretrained(teacher_dir, subfolder="vae", torch_dtype=torch.float32)
    scheduler = DDIMScheduler.from_pretrained(teacher_dir, subfolder="scheduler")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer,
                                   unet=student_unet(teacher.unet, maps, cfg["hidden_size"]), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out)
    (out / "text_encoder" / FILL_FILE).write_text(json.dumps({
        "generator": "seeded_rows", "seed": args.seed + TABLE_SEED_OFFSET, "std": ROW_STD,
        "teacher_rows": len(ids)}, indent=2))
    (out / "zo_edge_recipe.json").write_text(json.dumps({
        "recipe": "zo_edge.models.train_shapes768", "teacher": str(teacher_dir), "seed": args.seed,
        "student": args.student, "layers": layers, "intermediate": args.intermediate, "off_scale": args.off_scale,
        "steps": args.steps if args.student == "scratch" else 0, "batch": args.batch, "lr": args.lr,
        "threads": args.threads, "token_rows": len(ids), "kv_rel_rms_error": after,
        "kv_rel_rms_error_at_init": before, "loss_history": history, "seconds": round(seconds, 1)}, indent=2))
    clock.stage(f"done: {out}")


if __name__ == "__main__":
    main()
