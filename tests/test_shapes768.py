"""shapes-768: the seeded token-table fill a trimmed bundle regenerates, the exact embedding of a
narrow text encoder into a wide one, and the from-scratch distillation step (tiny configs, no
training beyond a few steps)."""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from zo_edge.models import SHAPES768_BUNDLE
from zo_runtime.bundle import Bundle, fill_table, seeded_rows, trim_table
from zo_runtime.errors import UserError


def test_seeded_rows_are_pinned_and_clip_like():
    rows = seeded_rows(7, 4, 768, 0.02)
    assert rows.dtype == np.float32 and rows.shape == (4, 768)
    # pinned: bundles store only their trained rows and regenerate these at load time
    assert hashlib.sha256(rows.tobytes()).hexdigest()[:16] == "755c61de6cb9afaf"
    np.testing.assert_array_equal(seeded_rows(7, 2, 768, 0.02, start=2), rows[2:])
    big = seeded_rows(1, 512, 64, 0.02)
    assert abs(big.std() - 0.02) < 4e-4 and abs(big.mean()) < 4e-4
    assert not np.array_equal(big, seeded_rows(2, 512, 64, 0.02))


def test_trim_keeps_changed_rows_and_fill_rebuilds_bit_exact():
    fill = {"generator": "seeded_rows", "seed": 3, "std": 0.02}
    table = seeded_rows(3, 300, 16, 0.02)
    changed = [0, 5, 299]
    table[changed] = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
    table[7, 3] = np.nextafter(table[7, 3], np.float32(1))  # one ulp is a change
    ids, rows = trim_table(table, fill)
    assert ids.tolist() == [0, 5, 7, 299]
    rebuilt = fill_table(rows, ids, fill, [300, 16])
    assert rebuilt.view(np.uint32).tolist() == table.view(np.uint32).tolist()


@pytest.mark.slow
def test_trimmed_bundle_loads_the_full_table(tiny_sd1_dir, tmp_path):
    """A source declaring its fill converts to a bundle that stores only the other rows; the bundle's
    table is the source's, bit for bit; a broken fill entry is one line."""
    from safetensors.numpy import load_file, save_file

    from zo_edge.convert import convert_pipeline
    from zo_edge.models.calibration import SHAPES_WORLD

    src = tmp_path / "src"
    shutil.copytree(tiny_sd1_dir, src)
    weights = src / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    key = "text_model.embeddings.token_embedding.weight"
    vocab, dim = state[key].shape
    table = seeded_rows(11, vocab, dim, 0.02)
    keep = np.array([320, 49406, 49407])
    table[keep] = state[key][keep].astype(np.float32)
    state[key] = table.astype(state[key].dtype)
    save_file(state, weights)
    (src / "text_encoder" / "zo_edge_token_fill.json").write_text(
        json.dumps({"generator": "seeded_rows", "seed": 11, "std": 0.02}))
    (src / "text_encoder" / "zo_edge_vocabulary.json").write_text(json.dumps({"ids": [49407, 320, 49406, 5]}))
    out = tmp_path / "bundle"
    convert_pipeline(src, out, weights="int8w", data=SHAPES_WORLD)
    b = Bundle.load(out)
    emb = b.manifest["token_embedding"]
    assert emb["stored_rows"] == 3 and emb["shape"] == [vocab, dim]
    # the declared vocabulary goes into the manifest, sorted; without it a trimmed table's ids are it
    assert emb["vocabulary_ids"] == [5, 320, 49406, 49407] and b.vocabulary_ids.tolist() == [5, 320, 49406, 49407]
    del b.manifest["token_embedding"]["vocabulary_ids"]
    assert b.vocabulary_ids.tolist() == keep.tolist()
    assert not (out / "text_encoder" / "token_embedding.npy").exists()
    assert b.token_table.view(np.uint32).tolist() == table.view(np.uint32).tolist()
    assert not b.token_table.flags.writeable

    good = (out / "zo-edge.json").read_text()
    for edit, needle in ((lambda e: e["fill"].__setitem__("seed", "eleven"), "fill.seed"),
                         (lambda e: e["fill"].__setitem__("generator", "torch"), "generator"),
                         (lambda e: e.__setitem__("ids", "../../etc/passwd"), "ids"),
                         (lambda e: e.__setitem__("shape", [vocab]), "shape")):
        m = json.loads(good)
        edit(m["token_embedding"])
        (out / "zo-edge.json").write_text(json.dumps(m))
        with pytest.raises(UserError, match=needle):
            Bundle.load(out)


@pytest.mark.parametrize("text", ['{"ids": [1]}', '{"ids": [1, 1]}', '{"ids": [1, 99999999]}', '[1, 2]', '{"ids"'])
def test_a_bad_vocabulary_file_is_one_line(tmp_path, text):
    from zo_edge.convert.pipeline import read_vocabulary

    path = tmp_path / "zo_edge_vocabulary.json"
    path.write_text(text)
    with pytest.raises(UserError, match="zo_edge_vocabulary.json"):
        read_vocabulary(path, 49408)


def _teacher(tiny_sd1_dir):
    from zo_edge.models.train_shapes768 import Teacher
    return Teacher(tiny_sd1_dir)


def test_embedded_student_is_exact_and_reads_every_direction(tiny_sd1_dir):
    """The tiny teacher (width 32, 4 heads, 2 layers) inside width 96 (4 heads of 24): keys and values equal on world
    prompts; a token moved along a direction the teacher never uses still changes them."""
    from transformers import CLIPTokenizer

    from zo_edge.models import train_shapes768 as r

    torch.manual_seed(0)
    teacher = _teacher(tiny_sd1_dir)
    tok = CLIPTokenizer.from_pretrained(tiny_sd1_dir / "tokenizer")
    ids = r.trained_ids(tok)
    cfg = r.text_config(layers=2, intermediate=96, width=96, heads=4)
    student, maps = r.embed_student(teacher, ids, cfg, seed=0, off_scale=1.0)
    err = r.evaluate(teacher, student, maps, tok, r.held_out_prompts(16, 0))
    assert err["worst"] < 1e-5, err

    x = tok(["a photo of a star"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        table = student.text_model.embeddings.token_embedding.weight
        key = next(iter(maps))
        base = maps[key](student(x)[0])
        off = torch.randn(96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        em = r.Embedding(32, 96, torch.Generator().manual_seed(0))  # the same rotation as embed_student's
        off = (em.off @ off).float()
        star = int(x[0, 5])
        saved = table[star].clone()
        table[star] += 0.05 * off / off.norm()
        moved = maps[key](student(x)[0])
        table[star] = saved
    assert float((moved - base).abs().max()) > 1e-3


def test_embedded_student_refuses_a_shallower_student(tiny_sd1_dir):
    from zo_edge.models import train_shapes768 as r

    teacher = _teacher(tiny_sd1_dir)
    with pytest.raises(ValueError, match="depth"):
        r.embed_student(teacher, np.array([320]), r.text_config(layers=1, intermediate=96, width=96, heads=4), 0, 1.0)


def test_scratch_distillation_lowers_the_kv_error(tiny_sd1_dir):
    from transformers import CLIPTokenizer

    from zo_edge.models import train_shapes768 as r

    teacher = _teacher(tiny_sd1_dir)
    tok = CLIPTokenizer.from_pretrained(tiny_sd1_dir / "tokenizer")
    cfg = r.text_config(layers=1, intermediate=64, width=64, heads=2)
    text, maps, ids = r.build_student(teacher.unet, tok, cfg, seed=0)
    prompts = r.held_out_prompts(16, 0)
    before = r.evaluate(teacher, text, maps, tok, prompts)["mean"]
    history = r.distill(teacher, text, maps, tok, steps=40, batch=4, lr=3e-3, seed=0, log_every=10)
    after = r.evaluate(teacher, text.eval(), maps, tok, prompts)["mean"]
    assert history[-1] < history[0] and after < 0.8 * before, (before, after, history)
    plain = r.standard_text_encoder(text, cfg)  # the saved form gives the same outputs
    x = tok(prompts[:2], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(plain(x)[0], text(x)[0])
    # untrained rows stay exactly as generated (what lets a bundle store the trained rows alone)
    full = plain.text_model.embeddings.token_embedding.weight.detach().numpy()
    gen = seeded_rows(r.TABLE_SEED_OFFSET, full.shape[0], full.shape[1], r.ROW_STD)
    changed = np.flatnonzero((full != gen).any(axis=1))
    assert set(changed.tolist()) <= set(ids.tolist())


def test_recipe_bad_input_is_one_line(capsys):
    from zo_edge.models import train_shapes768 as r

    with pytest.raises(SystemExit) as e:
        r.main(["--out", "x", "--teacher", "/nonexistent"])
    assert e.value.code == 2
    assert "not a diffusers folder" in capsys.readouterr().err


needs_768 = pytest.mark.skipif(not (SHAPES768_BUNDLE / "zo-edge.json").exists(), reason="shapes-768 bundle not shipped")


@needs_768
def test_shipped_768_bundle_is_small_trimmed_and_follows_prompts():
    """The shipped shapes-768 bundle: int8w, under 30 MB because its token table stores only the
    teacher's rows; 768-wide tokens through the real CLIP tokenizer; it draws what 8 captions name
    (each attribute in at least 6 of 8, as the 64-wide model's test asks)."""
    from zo_edge.models import resolve_model
    from zo_edge.models.probe import Probe
    from zo_runtime.pipeline import Pipeline

    b = Bundle.load(resolve_model("shapes-768"))
    m = b.manifest
    assert m["quantization"]["weights"] == "int8w" and b.embedding_dim == 768
    assert sum(f["bytes"] for f in m["files"].values()) < 30 * 2 ** 20
    assert m["token_embedding"]["fill"]["generator"] == "seeded_rows"
    assert b.token_table.shape == (49408, 768)
    pipe = Pipeline(b)
    probe = Probe.load()
    cases = [("red", "circle", "sky", "striped"), ("blue", "square", "sand", "dotted"),
             ("yellow", "star", "night", "solid"), ("green", "triangle", "grey", "dotted"),
             ("white", "heart", "grass", "striped"), ("purple", "cross", "sand", "solid"),
             ("orange", "diamond", "grey", "dotted"), ("black", "ring", "sky", "striped")]
    prompts = [f"a {colour} {pattern} {shape} on a {bg} background" for colour, shape, bg, pattern in cases]
    images = np.concatenate([pipe(p, steps=20, seed=i, progress=False) for i, p in enumerate(prompts)])
    pred = probe.predict(images)
    for key, col in (("colour", 0), ("shape", 1), ("background", 2), ("pattern", 3)):
        hits = sum(got == case[col] for got, case in zip(pred[key], cases))
        assert hits >= 6, (key, list(zip(pred[key], cases)))
