"""The shipped shapes probe (models/shapes/probe.onnx): loads torch-free and reads the world back."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, ImageFilter

from zo_edge.models import world
from zo_edge.models.probe import ATTRIBUTES, DEFAULT_PATH, FEATURE_DIM, LABELS, OUTPUTS, Probe

pytestmark = pytest.mark.skipif(not DEFAULT_PATH.is_file(), reason=f"{DEFAULT_PATH} not built")

# Evaluation seeds, disjoint from the probe's training seeds ([0, 2**30)).
SEED_LO, SEED_HI = 2**30, 2**31


@pytest.fixture(scope="module")
def probe() -> Probe:
    return Probe.load(threads=1)


@pytest.fixture(scope="module")
def fresh() -> tuple[np.ndarray, list[tuple[str, str, str, str]]]:
    """64 fresh renders: every held-out subject once, the rest random combinations."""
    rng = np.random.default_rng(20251127)
    combos = [(*h, world.BACKGROUNDS[i % len(world.BACKGROUNDS)]) for i, h in enumerate(world.HELD_OUT)]
    while len(combos) < 64:
        s, bg = world.sample(rng, held_out_ok=True)
        combos.append((s.shape, s.colour, s.pattern, bg))
    images = np.stack([world.render(*c, seed=int(rng.integers(SEED_LO, SEED_HI))) for c in combos])
    return images, combos


def _accuracy(pred: dict, combos) -> dict[str, float]:
    return {a: float(np.mean([p == c[k] for p, c in zip(pred[a], combos)])) for k, a in enumerate(ATTRIBUTES)}


def test_shipped_model_loads_with_onnxruntime():
    assert DEFAULT_PATH.stat().st_size < 2_000_000
    sess = ort.InferenceSession(str(DEFAULT_PATH), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "image" and inp.type == "tensor(float)"
    assert inp.shape[1:] == [3, 32, 32] and not isinstance(inp.shape[0], int)  # dynamic batch
    outs = {o.name: o.shape for o in sess.get_outputs()}
    assert set(outs) == set(OUTPUTS)
    for a in ATTRIBUTES:
        assert outs[f"{a}_logits"][1] == len(LABELS[a])
    assert outs["features"][1] == FEATURE_DIM
    for b in (1, 3):
        res = sess.run(None, {"image": np.random.default_rng(0).random((b, 3, 32, 32), np.float32)})
        assert all(r.shape[0] == b for r in res)


def test_metadata_matches_world():
    meta = json.loads(DEFAULT_PATH.with_suffix(".json").read_text())
    assert meta["labels"] == {a: list(LABELS[a]) for a in ATTRIBUTES}
    assert LABELS["shape"] == world.SHAPES and LABELS["colour"] == world.COLOURS
    assert LABELS["pattern"] == world.PATTERNS and LABELS["background"] == world.BACKGROUNDS
    for a in ATTRIBUTES:
        assert meta["accuracy"]["clean"][a] >= 0.99
        assert meta["accuracy"]["augmented"][a] >= 0.95


def test_recognises_fresh_renders(probe, fresh):
    images, combos = fresh
    acc = _accuracy(probe.predict(images), combos)
    assert all(v >= 0.95 for v in acc.values()), acc


def test_recognises_degraded_renders(probe, fresh):
    """Blur + noise + a brightness shift, done without torch: roughly what a small diffusion model gives."""
    images, combos = fresh
    rng = np.random.default_rng(1)
    degraded = []
    for img in images:
        blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(0.7)), np.float32)
        noisy = blurred * rng.uniform(0.9, 1.1) + rng.normal(0, 6, blurred.shape)
        degraded.append(np.clip(noisy, 0, 255).astype(np.uint8))
    acc = _accuracy(probe.predict(np.stack(degraded)), combos)
    assert all(v >= 0.9 for v in acc.values()), acc


def test_features_shape_and_norm(probe, fresh):
    images, _ = fresh
    feats = probe.predict(images)["features"]
    assert feats.shape == (len(images), FEATURE_DIM) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-4)


def test_features_group_by_subject(probe):
    """Same subject on other seeds/backgrounds is closer than a different subject."""
    a = probe.predict(world.reference_images(world.Subject("star", "red", "striped"), n=5, seed=11))["features"]
    b = probe.predict(world.reference_images(world.Subject("star", "red", "striped"), n=5, seed=12))["features"]
    c = probe.predict(world.reference_images(world.Subject("heart", "blue", "dotted"), n=5, seed=12))["features"]
    same = float((a @ b.T).mean())
    other = float((a @ c.T).mean())
    assert same > other + 0.1, (same, other)


def test_batch_of_one_and_many_agree(probe, fresh):
    images, _ = fresh
    many = probe.predict(images)
    for i in (0, 17, 63):
        one = probe.predict(images[i:i + 1])
        assert len(one["shape"]) == 1 and one["features"].shape == (1, FEATURE_DIM)
        for a in ATTRIBUTES:
            assert one[a][0] == many[a][i]
        np.testing.assert_allclose(one["features"][0], many["features"][i], atol=1e-5)
    single = probe.predict(images[5])  # a bare [H, W, 3] is a batch of one
    assert single["shape"] == [many["shape"][5]]
    as_list = probe.predict(list(images[:4]))
    assert as_list["colour"] == many["colour"][:4]
    chunked = probe.predict(images, batch_size=10)
    np.testing.assert_allclose(chunked["features"], many["features"], atol=1e-5)
    for a in ATTRIBUTES:
        probs = many["probs"][a]
        assert probs.shape == (len(images), len(LABELS[a]))
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_wrong_size_input_is_resized(probe, fresh):
    _, combos = fresh
    combos = combos[:16]
    big = np.stack([world.render(*c, seed=100 + i, size=64) for i, c in enumerate(combos)])
    assert big.shape == (16, 64, 64, 3)
    pred = probe.predict(big)
    assert pred["features"].shape == (16, FEATURE_DIM)
    acc = _accuracy(pred, combos)
    assert all(v >= 0.9 for v in acc.values()), acc
    # mixed sizes in one list
    mixed = [big[0], world.render(*combos[1], seed=7, size=48), world.render(*combos[2], seed=8)]
    out = probe.predict(mixed)
    assert len(out["shape"]) == 3 and out["features"].shape == (3, FEATURE_DIM)


def test_rejects_bad_input(probe):
    with pytest.raises(ValueError):
        probe.predict(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(ValueError):
        probe.predict([])
    with pytest.raises(FileNotFoundError):
        Probe.load(DEFAULT_PATH.with_name("missing.onnx"))


def test_import_does_not_pull_in_torch():
    code = ("import sys, zo_edge.models.probe as p; p.Probe.load(threads=1); "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
