"""zo-edge evaluate: metric models exported to ONNX (convert-metrics), torch-free preprocessing and
features that match transformers, the metric definitions, the evaluate command, and the DreamBooth
protocol driver. Tiny random-weight CLIP and DINOv2 models; no downloads."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from zo_edge.eval import dreambooth as db
from zo_edge.eval import metrics as M
from zo_runtime.errors import UserError

REPO = Path(__file__).resolve().parents[1]


# -- tiny models --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch = pytest.importorskip("torch")
    tr = pytest.importorskip("transformers")
    from zo_edge.models.clip_vocab import write_clip_tokenizer

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("metric_models")
    torch.manual_seed(0)
    cfg = tr.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16)
    tr.CLIPModel(cfg).eval().save_pretrained(root / "clip")
    tr.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    write_clip_tokenizer(root / "clip")

    # facebook/dinov2-base: BitImageProcessor, shortest edge 256, crop 224, bicubic, ImageNet mean/std;
    # the model's config says image_size 518, so its position embeddings are interpolated to the
    # crop. Scaled down: shortest edge 36, crop 32, config image_size 40 (still interpolated).
    dcfg = tr.Dinov2Config(image_size=40, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           mlp_ratio=2)
    tr.Dinov2Model(dcfg).eval().save_pretrained(root / "dino")
    tr.BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, resample=3,
                         do_center_crop=True, do_convert_rgb=True, image_mean=[0.485, 0.456, 0.406],
                         image_std=[0.229, 0.224, 0.225]).save_pretrained(root / "dino")
    return root


@pytest.fixture(scope="module")
def bundle_dir(models):
    from click.testing import CliRunner
    from zo_edge.cli.main import main

    out = models / "metrics"
    r = CliRunner().invoke(main, ["convert-metrics", "--clip", str(models / "clip"), "--dino", str(models / "dino"),
                                  str(out)])
    assert r.exit_code == 0, r.output
    return out


def _images(seed=0):
    rng = np.random.default_rng(seed)
    noise = lambda h, w, c=3: rng.integers(0, 256, (h, w, c), dtype=np.uint8)  # noqa: E731
    grad = np.stack([*np.meshgrid(np.linspace(0, 255, 64), np.linspace(0, 255, 40)), np.full((40, 64), 99.0)], -1)
    return [
        Image.fromarray(noise(50, 40)),
        Image.fromarray(grad.astype(np.uint8)),
        Image.fromarray(noise(33, 33, 4), "RGBA"),
        Image.fromarray(noise(64, 48)[..., 0], "L"),
        Image.fromarray(noise(21, 77)).convert("P"),
        Image.fromarray(noise(32, 32)),
    ]


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# -- the exported bundle --------------------------------------------------------------------------

def test_manifest(bundle_dir, models):
    m = json.loads((bundle_dir / "metrics.json").read_text())
    assert m["format"] == "zo-edge-metrics" and m["opset"] == 17
    pre = m["clip"]["preprocess"]
    assert pre["resize"] == {"shortest_edge": 32} and pre["center_crop"] == {"height": 32, "width": 32}
    assert pre["resample_name"] == "bicubic" and pre["input_size"] == [32, 32]
    assert pre["normalize"]["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    dpre = m["dino"]["preprocess"]
    assert dpre["processor_class"] == "BitImageProcessor" and dpre["resize"] == {"shortest_edge": 36}
    assert dpre["normalize"]["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert m["clip"]["max_length"] == 77 and m["clip"]["embedding_dim"] == 16 and m["dino"]["embedding_dim"] == 32
    for rel in ("clip/image_encoder.onnx", "clip/text_encoder.onnx", "clip/tokenizer/vocab.json", "dino/model.onnx"):
        assert rel in m["files"] and len(m["files"][rel]["sha256"]) == 64
    assert m["clip"]["check"]["image"]["min_cosine"] > 0.9999
    # Built in a temporary sibling, renamed: nothing left over.
    assert [p.name for p in models.iterdir() if p.name.startswith(".")] == []
    import onnx
    g = onnx.load(str(bundle_dir / "dino/model.onnx"), load_external_data=False)
    assert g.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_preprocessing_matches_transformers(models, bundle_dir):
    from transformers import BitImageProcessor, CLIPImageProcessor
    from transformers.image_transforms import center_crop

    b = M.MetricsBundle.load(bundle_dir)
    imgs = _images()
    for key, cls in (("clip", CLIPImageProcessor), ("dino", BitImageProcessor)):
        ref = cls.from_pretrained(models / key)(images=imgs, return_tensors="np")["pixel_values"]
        ours = b.preprocess(key, imgs)
        assert ours.dtype == np.float32 and ours.shape == ref.shape == (len(imgs), 3, 32, 32)
        assert np.abs(ours - ref).max() < 1e-5
    # uint8 arrays go through the same path as PIL images
    arr = np.asarray(imgs[0])
    assert np.array_equal(b.preprocess("clip", [arr]), b.preprocess("clip", [imgs[0]]))
    # centre crop of an image smaller than the crop: zero padding, as transformers does
    a = np.random.default_rng(1).integers(0, 255, (5, 8, 3)).astype(np.uint8)
    for ch, cw in ((7, 6), (4, 11), (9, 9), (3, 3)):
        assert np.array_equal(M._center_crop(a, ch, cw), center_crop(a, (ch, cw)))


def test_features_match_pytorch(models, bundle_dir):
    import torch
    import transformers as tr

    b = M.MetricsBundle.load(bundle_dir)
    imgs = _images()
    clip = tr.CLIPModel.from_pretrained(models / "clip").eval()
    px = tr.CLIPImageProcessor.from_pretrained(models / "clip")(images=imgs, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = _unit(clip.get_image_features(pixel_values=px).numpy())
    ours = b.clip_image(imgs, batch_size=4)   # two batches
    assert ours.shape == (len(imgs), 16) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 1e-4

    texts = ["a photo of a dog", "A RED Cube-shaped TEAPOT, on the beach!!", "dog",
             " ".join(["a very long prompt about a dog"] * 20)]          # truncated at 77 tokens
    tok = tr.CLIPTokenizer.from_pretrained(models / "clip")
    enc = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ours_ids, _ = b.tokenizer.batch_encode(texts)
    assert np.array_equal(ours_ids, enc["input_ids"].numpy())
    with torch.no_grad():
        tref = _unit(clip.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).numpy())
    tours = b.clip_text(texts)
    assert tours.shape == (4, 16) and np.abs(tours - tref).max() < 1e-4

    dino = tr.Dinov2Model.from_pretrained(models / "dino").eval()
    px = tr.BitImageProcessor.from_pretrained(models / "dino")(images=imgs, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        dref = _unit(dino(pixel_values=px).last_hidden_state[:, 0].numpy())
    dours = b.dino(imgs)
    assert dours.shape == (len(imgs), 32) and np.abs(dours - dref).max() < 1e-4
    assert np.allclose(np.linalg.norm(dours, axis=1), 1, atol=1e-5)


def test_runtime_is_torch_free(bundle_dir, tmp_path):
    Image.fromarray(np.full((40, 30, 3), 120, np.uint8)).save(tmp_path / "a.png")
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers'):\n"
        "    sys.modules[name] = None  # any import of them fails\n"
        "import zo_edge.eval.metrics as m, zo_edge.eval.dreambooth\n"
        f"b = m.MetricsBundle.load({str(bundle_dir)!r})\n"
        f"x = b.clip_image([{str(tmp_path / 'a.png')!r}]); t = b.clip_text(['a dog']); d = b.dino([{str(tmp_path / 'a.png')!r}])\n"
        "assert x.shape == (1, 16) and t.shape == (1, 16) and d.shape == (1, 32)\n"
        "print('ok')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    r = subprocess.run([sys.executable, "-c", "import sys, zo_edge.eval.metrics, zo_edge.eval.dreambooth; "
                        "print(sorted(k for k in ('torch', 'transformers') if k in sys.modules))"],
                       capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_damaged_bundle(bundle_dir, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(bundle_dir, copy)
    with open(copy / "dino/model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(UserError, match="sha256"):
        M.MetricsBundle.load(copy)
    with pytest.raises(UserError, match="convert-metrics"):
        M.MetricsBundle.load(tmp_path / "nope")


# -- metric definitions ------------------------------------------------------------------------------

def test_metric_definitions():
    e = np.eye(4, dtype=np.float32)
    assert M.clip_i(e[:1], e[:1]) == pytest.approx(1.0)
    assert M.clip_i(e[:1], e[1:2]) == pytest.approx(0.0)
    assert M.clip_i(e[:1], e[:2]) == pytest.approx(0.5)
    assert M.clip_i(3 * e[:2], np.stack([e[0], e[0] + e[1]])) == pytest.approx((1 + 0 + 2 * 2 ** -0.5) / 4)
    assert M.dino(e[:2], e[:2]) == pytest.approx(0.5)
    assert M.dino(e[:1], -5 * e[:1]) == pytest.approx(-1.0)
    # CLIP-T pairs each image with its own prompt only
    assert M.clip_t(e[:2], e[:2]) == pytest.approx(1.0)
    assert M.clip_t(e[:2], np.stack([e[0], e[0]])) == pytest.approx(0.5)
    assert M.clip_t(e[:2], 2 * e[:1]) == pytest.approx(0.5)      # one prompt for all
    # DINO-inter: ordered pairs i != j within a prompt, then the mean over prompts
    g1 = np.stack([e[0], e[0], e[1]])           # (1 + 1 + 0 * 4) / 6
    g2 = np.stack([e[2], -e[2]])                # -1
    g3 = e[3:4]                                 # one image: skipped
    assert M.dino_inter([g1, g2, g3]) == pytest.approx((1 / 3 - 1) / 2)
    assert M.dino_inter([np.stack([e[1]] * 5)]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        M.dino_inter([g3])
    with pytest.raises(ValueError):
        M.clip_i(e[:1, :3], e[:1])
    with pytest.raises(ValueError):
        M.clip_t(e[:3], e[:2])
    with pytest.raises(ValueError):
        M.clip_i(np.zeros((0, 4)), e)


def test_prompt_for_clip_t():
    f = M.prompt_for_clip_t
    assert f("a photo of <my-dog>", "<my-dog>", "dog") == "a photo of dog"
    assert f("a <my-dog> dog in the jungle", "<my-dog>", "dog") == "a dog in the jungle"
    assert f("a red <my-dog>  on the beach", "<my-dog>", "dog") == "a red dog on the beach"
    assert f("a <s> stuffed animal on a mirror", "<s>", "stuffed animal") == "a stuffed animal on a mirror"
    assert f("<my-dog> dogs and a <my-dog>", "<my-dog>", "dog") == "dog dogs and a dog"
    assert f("a photo of <my-dog>", None, None) == "a photo of <my-dog>"
    with pytest.raises(ValueError):
        f("a photo of <my-dog>", "<my-dog>", None)


# -- evaluate ------------------------------------------------------------------------------------

def _save(img: Image.Image, path: Path, prompt: str | None = None):
    info = None
    if prompt is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("prompt", prompt)
    img.save(path, pnginfo=info)


@pytest.fixture()
def subject(tmp_path):
    rng = np.random.default_rng(3)
    refs, gen = tmp_path / "refs", tmp_path / "gen"
    refs.mkdir()
    gen.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(refs / f"{i:02d}.jpg")
    prompts = ["a photo of <my-dog>", "a <my-dog> dog on the beach"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    for p in range(2):
        for k in range(3):
            _save(Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)), gen / f"img{p}{k}.png", prompts[p])
    return tmp_path, prompts


def test_evaluate(bundle_dir, subject):
    root, prompts = subject
    res = M.evaluate(bundle_dir, root / "refs", root / "gen", root / "prompts.txt", "<my-dog>", "dog")
    b = M.MetricsBundle.load(bundle_dir)
    refs = sorted((root / "refs").iterdir())
    gens = sorted((root / "gen").iterdir())
    rc, gc = b.clip_image(refs), b.clip_image(gens)
    txt = b.clip_text(["a photo of dog", "a dog on the beach"])
    rd, gd = b.dino(refs), b.dino(gens)
    assert res["clip_i"] == pytest.approx(M.clip_i(rc, gc), abs=1e-6)
    assert res["clip_t"] == pytest.approx(M.clip_t(gc, txt[[0, 0, 0, 1, 1, 1]]), abs=1e-6)
    assert res["dino"] == pytest.approx(M.dino(rd, gd), abs=1e-6)
    assert res["dino_inter"] == pytest.approx(M.dino_inter([gd[:3], gd[3:]]), abs=1e-6)
    assert res["n_references"] == 3 and res["n_generated"] == 6 and res["images_per_prompt"] == [3, 3]
    assert [r["clip_t_text"] for r in res["per_prompt"]] == ["a photo of dog", "a dog on the beach"]
    assert res["warnings"] == []
    json.dumps(res)

    # Fallback: no metadata, names {prompt_index:03d}_{k}.png
    gen2 = root / "gen2"
    gen2.mkdir()
    for i, g in enumerate(gens):
        Image.open(g).save(gen2 / f"{i // 3:03d}_{i % 3}.png")
    assert M.png_prompt(gen2 / "000_0.png") is None
    res2 = M.evaluate(bundle_dir, root / "refs", gen2, root / "prompts.txt", "<my-dog>", "dog")
    for k in ("clip_i", "clip_t", "dino", "dino_inter"):
        assert res2[k] == pytest.approx(res[k], abs=1e-6)


def test_assign_generated_errors(subject):
    root, prompts = subject
    _save(Image.new("RGB", (8, 8)), root / "gen" / "stray.png", "a cat")
    with pytest.raises(UserError, match="not in the prompts file"):
        M.assign_generated(root / "gen", prompts)
    (root / "gen" / "stray.png").unlink()
    Image.new("RGB", (8, 8)).save(root / "gen" / "noname.png")
    with pytest.raises(UserError, match="cannot tell which prompt"):
        M.assign_generated(root / "gen", prompts)
    (root / "gen" / "noname.png").rename(root / "gen" / "007_0.png")
    with pytest.raises(UserError, match="names prompt 7"):
        M.assign_generated(root / "gen", prompts)
    (root / "gen" / "007_0.png").unlink()
    with pytest.raises(UserError, match="1 of 3 prompts have no generated images"):
        M.assign_generated(root / "gen", prompts + ["a <my-dog> in the snow"])
    # a prompt listed twice: the file name tells which
    dup = prompts + [prompts[0]]
    d = root / "dup"
    d.mkdir()
    for name, p in (("000_0.png", 0), ("001_0.png", 1), ("002_0.png", 0), ("002_1.png", 0)):
        _save(Image.new("RGB", (8, 8)), d / name, prompts[p])
    assert [len(g) for g in M.assign_generated(d, dup)] == [1, 1, 2]
    _save(Image.new("RGB", (8, 8)), d / "zz.png", prompts[0])
    with pytest.raises(UserError, match="listed 2 times"):
        M.assign_generated(d, dup)
    # generate --grid writes grid.png (no metadata): left out
    Image.new("RGB", (8, 8)).save(root / "gen" / "grid.png")
    skipped = []
    assert [len(g) for g in M.assign_generated(root / "gen", prompts, skipped)] == [3, 3]
    assert skipped == ["grid.png"]
    (root / "lines.txt").write_text("  # not a comment \n\n a  b\n")
    assert M.read_prompts(root / "lines.txt") == ["# not a comment", "a  b"]
    (root / "p.json").write_text(json.dumps(prompts))
    assert M.read_prompts(root / "p.json") == prompts


# -- the CLI ---------------------------------------------------------------------------------------

def _cli(args):
    from click.testing import CliRunner
    from zo_edge.cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _one_error_line(r):
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zo-edge: error: "), r.output
    return lines[0]


def test_cli_evaluate(bundle_dir, subject):
    root, _ = subject
    base = ["evaluate", "--metrics", bundle_dir, "--references", root / "refs", "--generated", root / "gen",
            "--prompts", root / "prompts.txt"]
    r = _cli(base + ["--placeholder", "<my-dog>", "--class-word", "dog", "--out", root / "out/scores.json"])
    assert r.exit_code == 0, r.output
    assert "CLIP-I" in r.stdout and "DINO-inter" in r.stdout
    scores = json.loads((root / "out/scores.json").read_text())
    assert set(("clip_i", "clip_t", "dino", "dino_inter")) <= set(scores)

    # bad inputs: one line, non-zero
    (root / "empty").mkdir()
    cases = [
        (["evaluate", "--metrics", root / "nope", *base[3:]], "convert-metrics"),
        (base[:4] + [root / "empty"] + base[5:], "references folder"),
        (base[:6] + [root / "empty"] + base[7:], "generated images folder"),
        (base[:8] + [root / "missing.txt"], "does not exist"),
        (base + ["--placeholder", "<my-dog>"], "--class-word"),
    ]
    (root / "three.txt").write_text("a photo of <my-dog>\na <my-dog> dog on the beach\na <my-dog> in the snow\n")
    cases.append((base[:8] + [root / "three.txt"], "no generated images"))
    for args, needle in cases:
        line = _one_error_line(_cli(args))
        assert needle in line, line


def test_cli_convert_metrics_errors(models, tmp_path):
    line = _one_error_line(_cli(["convert-metrics", "--clip", tmp_path / "nope", tmp_path / "out"]))
    assert "does not exist" in line
    line = _one_error_line(_cli(["convert-metrics", "--clip", models / "dino", tmp_path / "out"]))
    assert "not a CLIP model" in line
    line = _one_error_line(_cli(["convert-metrics", "--dino", models / "clip", tmp_path / "out"]))
    assert "not a DINOv2 model" in line
    (tmp_path / "out").mkdir()
    (tmp_path / "out/x").write_text("x")
    line = _one_error_line(_cli(["convert-metrics", "--dino", models / "dino", tmp_path / "out"]))
    assert "--overwrite" in line
    line = _one_error_line(_cli(["convert-metrics", tmp_path / "out2"]))
    assert "--clip" in line
    assert not (tmp_path / "out2").exists()


# -- DreamBooth protocol -----------------------------------------------------------------------------

OFFICIAL_SAMPLE = """Classes
subject_name,class
backpack,backpack
cat2,cat
dog,dog

Prompts

Object Prompts
prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} in the snow'.format(unique_token, class_token),
'a cube shaped {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts
prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
]
"""


def test_dreambooth_prompts_and_parsing(tmp_path):
    assert len(db.OBJECT_PROMPTS) == 25 and len(db.LIVE_PROMPTS) == 25
    assert len(set(db.OBJECT_PROMPTS)) == 25 and len(set(db.LIVE_PROMPTS)) == 25
    assert all("{0} {1}" in t for t in db.OBJECT_PROMPTS + db.LIVE_PROMPTS)
    assert db.OBJECT_PROMPTS[:10] == db.LIVE_PROMPTS[:10] and db.OBJECT_PROMPTS[-5:] == db.LIVE_PROMPTS[-5:]
    assert len(db.DREAMBOOTH_CLASSES) == 30
    assert sum(v in db.LIVE_CLASSES for v in db.DREAMBOOTH_CLASSES.values()) == 9
    dog = db.Subject("dog", "dog", True)
    ps = db.subject_prompts(dog, "<dog>")
    assert ps[0] == "a <dog> dog in the jungle" and ps[10] == "a <dog> dog wearing a red hat"
    assert db.subject_prompts(dog, "<dog>", include_class_word=False)[20] == "a red <dog>"
    assert db.subject_prompts(db.Subject("can", "can", False), "<c>")[10] == "a <c> can with a wheat field in the background"

    (tmp_path / "prompts_and_classes.txt").write_text(OFFICIAL_SAMPLE)
    classes, templates = db.parse_prompts_and_classes(tmp_path / "prompts_and_classes.txt")
    assert classes == {"backpack": ("backpack", None), "cat2": ("cat", None), "dog": ("dog", None)}
    assert templates["object"] == ["a {0} {1} in the jungle", "a {0} {1} in the snow", "a cube shaped {0} {1}"]
    assert templates["live"] == ["a {0} {1} in the jungle", "a {0} {1} wearing a red hat"]

    assert db.parse_class_mapping(["toy1=toy", "rex=dog:live", "b = stuffed animal:object"]) == {
        "toy1": ("toy", None), "rex": ("dog", True), "b": ("stuffed animal", False)}
    with pytest.raises(UserError):
        db.parse_class_mapping(["nonsense"])


def _dataset(root: Path, with_file=True) -> Path:
    ds = root / "dataset"
    rng = np.random.default_rng(5)
    for name in ("backpack", "dog", "cat2"):
        (ds / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(ds / name / f"{i:02d}.jpg")
    if with_file:
        (ds / "prompts_and_classes.txt").write_text(OFFICIAL_SAMPLE.split("\nPrompts")[0])
    return ds


def test_load_subjects(tmp_path):
    ds = _dataset(tmp_path)
    subs, templates = db.load_subjects(ds)
    assert [(s.name, s.class_word, s.kind) for s in subs] == [("backpack", "backpack", "object"),
                                                              ("cat2", "cat", "live"), ("dog", "dog", "live")]
    assert templates == {} and len(subs[0].images()) == 2
    subs, _ = db.load_subjects(ds, classes={"dog": ("puppy", False)}, names=["dog"])
    assert subs == [db.Subject("dog", "puppy", False, ds / "dog")]
    ds2 = _dataset(tmp_path / "b", with_file=False)       # official names: the built-in list
    assert [(s.class_word, s.live) for s in db.load_subjects(ds2)[0]] == [("backpack", False), ("cat", True),
                                                                          ("dog", True)]
    (ds2 / "dog").rename(ds2 / "rex")
    with pytest.raises(UserError, match="no class word for subject.s. rex"):
        db.load_subjects(ds2)
    assert db.load_subjects(ds2, classes=db.parse_class_mapping(["rex=dog"]), names=["rex"])[0][0].live
    with pytest.raises(UserError, match="no image folder"):
        db.load_subjects(ds, names=["teapot"])


class Fakes:
    def __init__(self, fail=()):
        self.calls = {"personalize": [], "generate": [], "evaluate": []}
        self.fail = set(fail)

    def personalize(self, subject, placeholder, work_dir):
        self.calls["personalize"].append(subject.name)
        assert work_dir.is_dir() and placeholder == f"<{subject.name}>"
        if subject.name in self.fail:
            raise RuntimeError("boom")
        return {"vector": subject.name}

    def generate(self, subject, learned, prompts, n, out_dir):
        self.calls["generate"].append(subject.name)
        assert learned == {"vector": subject.name} and len(prompts) == 25 and out_dir.is_dir()
        assert not any(out_dir.iterdir())
        for i, p in enumerate(prompts):
            for k in range(n):
                _save(Image.new("RGB", (8, 8), (i * 9, k * 40, 7)), out_dir / f"{i:03d}_{k}.png", p)

    def evaluate(self, references_dir, generated_dir, prompts_file, placeholder=None, class_word=None):
        self.calls["evaluate"].append(Path(references_dir).name)
        assert len(list(Path(generated_dir).iterdir())) == 25 * 2
        x = {"backpack": 0.1, "dog": 0.2, "cat2": 0.3}[Path(references_dir).name]
        return {"clip_i": 0.5 + x, "clip_t": 0.25 + x / 10, "dino": 0.4 + x, "dino_inter": np.float32(0.7)}


def test_run_dreambooth_resume(tmp_path):
    ds = _dataset(tmp_path)
    out = tmp_path / "bench"
    f = Fakes()
    run = functools.partial(db.run_dreambooth, None, ds, out, images_per_prompt=2, method="zo-edge int8",
                            log=lambda m: None)
    s = run(f.personalize, f.generate, f.evaluate)
    assert f.calls["personalize"] == ["backpack", "cat2", "dog"]
    assert s["n_subjects"] == 3
    assert s["overall"]["clip_i"]["mean"] == pytest.approx(0.7)
    assert s["overall"]["clip_i"]["std"] == pytest.approx(np.std([0.6, 0.7, 0.8], ddof=1))
    assert s["live"]["n_subjects"] == 2 and s["object"]["clip_i"]["mean"] == pytest.approx(0.6)
    r = json.loads((out / "dog/result.json").read_text())
    assert r["status"] == "done" and r["kind"] == "live" and r["metrics"]["dino_inter"] == pytest.approx(0.7)
    assert (out / "dog/prompts.txt").read_text().splitlines()[0] == "a <dog> dog in the jungle"
    assert json.loads((out / "summary.json").read_text())["n_subjects"] == 3
    table = db.format_table(s)
    lines = table.splitlines()
    assert lines[0] == "| Method | CLIP-I | CLIP-T | DINO | DINO-inter |"
    assert lines[2].startswith("| zo-edge int8 | 0.700 ± 0.100 | 0.270 ± 0.010 | 0.600 ± 0.100 | 0.700 ± 0.000")
    assert (out / "summary.md").read_text().startswith(table)
    assert not list(out.rglob(".*.tmp"))

    # resume: everything done -> nothing runs, same summary
    f2 = Fakes()
    s2 = run(f2.personalize, f2.generate, f2.evaluate)
    assert f2.calls == {"personalize": [], "generate": [], "evaluate": []}
    assert s2["overall"] == s["overall"]
    # one subject's result lost (e.g. killed mid-way, with stray images left): only it runs again
    (out / "cat2/result.json").unlink()
    (out / "cat2/generated/stale.png").write_bytes(b"junk")
    f3 = Fakes()
    run(f3.personalize, f3.generate, f3.evaluate)
    assert f3.calls["personalize"] == ["cat2"] and f3.calls["evaluate"] == ["cat2"]
    # a different protocol setting invalidates every subject
    f4 = Fakes()
    db.run_dreambooth(["dog"], ds, out, f4.personalize, f4.generate, f4.evaluate, images_per_prompt=2,
                      method="other", log=lambda m: None)
    assert f4.calls["personalize"] == ["dog"]


def test_run_dreambooth_keep_going(tmp_path):
    ds = _dataset(tmp_path)
    out = tmp_path / "bench"
    f = Fakes(fail={"cat2"})
    with pytest.raises(RuntimeError):
        db.run_dreambooth(None, ds, out, f.personalize, f.generate, f.evaluate, images_per_prompt=2,
                          log=lambda m: None)
    f = Fakes(fail={"cat2"})
    s = db.run_dreambooth(None, ds, out, f.personalize, f.generate, f.evaluate, images_per_prompt=2,
                          keep_going=True, log=lambda m: None)
    assert s["n_subjects"] == 2 and [x["subject"] for x in s["failed"]] == ["cat2"]
    assert f.calls["personalize"] == ["cat2", "dog"]       # backpack was done by the first run
    f = Fakes()
    s = db.run_dreambooth(None, ds, out, f.personalize, f.generate, f.evaluate, images_per_prompt=2,
                          log=lambda m: None)
    assert f.calls["personalize"] == ["cat2"] and s["n_subjects"] == 3 and s["failed"] == []


def test_run_dreambooth_with_real_metrics(tmp_path, bundle_dir):
    ds = _dataset(tmp_path)
    rng = np.random.default_rng(0)

    def generate(subject, learned, prompts, n, out_dir):
        for i, p in enumerate(prompts[:25]):
            for k in range(n):
                _save(Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)), out_dir / f"x{i}_{k}.png", p)

    bundle = M.MetricsBundle.load(bundle_dir)
    s = db.run_dreambooth(["dog"], ds, tmp_path / "bench", lambda *a: None, generate,
                          functools.partial(M.evaluate, bundle), images_per_prompt=2, log=lambda m: None)
    r = s["subjects"][0]
    assert all(-1 <= r[m] <= 1 for m in ("clip_i", "clip_t", "dino", "dino_inter"))
    ev = json.loads((tmp_path / "bench/dog/result.json").read_text())["evaluation"]
    assert ev["per_prompt"][0]["clip_t_text"] == "a dog in the jungle" and ev["n_generated"] == 50


def test_cli_bench_dreambooth_end_to_end(tmp_path, bundle_dir, tiny_bundle_int8):
    """The real wiring: personalize -> generate -> evaluate on a tiny bundle, then a resumed rerun."""
    from click.testing import CliRunner
    from zo_edge.cli.main import main

    ds = _dataset(tmp_path)
    args = ["bench", "dreambooth", "--model", str(tiny_bundle_int8), "--metrics", str(bundle_dir), "--dataset", str(ds),
            "--subjects", "dog", "--steps", "3", "--images-per-prompt", "2", "--gen-steps", "2",
            "--out", str(tmp_path / "run")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "run" / "dog" / "result.json").read_text())
    for key in ("clip_i", "clip_t", "dino", "dino_inter"):
        assert np.isfinite(result["metrics"][key])
    assert len(list((tmp_path / "run" / "dog" / "generated").glob("*.png"))) == 25 * 2
    r2 = CliRunner().invoke(main, args)
    assert r2.exit_code == 0 and "CLIP-I" in r2.output
