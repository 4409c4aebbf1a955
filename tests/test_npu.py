"""Portable and NPU bundles (convert --target portable|qnn) and plugin execution providers.

The QNN tests run on onnxruntime-qnn's HTP backend, which simulates Qualcomm's NPU on x86-64 Linux
(about 2 s per shapes-UNet forward here). They are skipped, with the reason, only where
onnxruntime-qnn is not installed (it has wheels for Python >= 3.11 on x86-64 Linux and Windows;
the test extras install it there).
"""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper
from PIL import Image

from zo_edge.cli.main import main as cli
from zo_edge.models import world
from zo_edge.models.calibration import SHAPES_WORLD
from zo_runtime import precision, providers
from zo_runtime.bundle import Bundle, FixedBatchSession
from zo_runtime.errors import UserError
from zo_runtime.oracle import LossOracle
from zo_runtime.recipe import DEFAULT_RECIPE, RECIPES
from zo_runtime.tokenizer import CLIPTokenizer

try:
    import onnxruntime_qnn  # noqa: F401
    HAVE_QNN = True
except ImportError:
    HAVE_QNN = False
needs_qnn = pytest.mark.skipif(not HAVE_QNN, reason="onnxruntime-qnn is not installed (pip install 'zo-edge[qnn]'; "
                                                    "wheels for Python >= 3.11 on x86-64 Linux and Windows)")
ROOT = Path(__file__).resolve().parent.parent
BAND = (RECIPES[DEFAULT_RECIPE]["t_low"], RECIPES[DEFAULT_RECIPE]["t_high"])  # the default recipe's timesteps
# The band the README tells NPU users to train at: PUTS's; A16W8 on the simulated HTP keeps no signal at
# the default recipe's [0, 500) (docs/results/lab/zo_signal_htp_lowt.json).
NPU_BAND = (RECIPES["zoodip"]["t_low"], RECIPES["zoodip"]["t_high"])
GRAPHS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


@pytest.fixture(scope="module")
def tiny_export20(tiny_sd1_dir, tmp_path_factory):
    from zo_edge.convert.export import export_onnx
    out = tmp_path_factory.mktemp("tiny_export20") / "onnx"
    export_onnx(tiny_sd1_dir, out, opset=20)
    return out


@pytest.fixture(scope="module")
def tiny_qnn(tiny_sd1_dir, tiny_export20, tmp_path_factory):
    from zo_edge.convert import convert_pipeline
    out = tmp_path_factory.mktemp("bundles") / "tiny_qnn"
    convert_pipeline(tiny_sd1_dir, out, target="qnn", export_dir=tiny_export20, data=SHAPES_WORLD)
    return out


@pytest.fixture(scope="module")
def tiny_qnn_fp16(tiny_sd1_dir, tiny_export20, tmp_path_factory):
    from zo_edge.convert import convert_pipeline
    out = tmp_path_factory.mktemp("bundles") / "tiny_qnn_fp16"
    convert_pipeline(tiny_sd1_dir, out, target="qnn", weights="fp16", export_dir=tiny_export20, data=SHAPES_WORLD)
    return out


@pytest.fixture(scope="module")
def tiny_portable(tiny_sd1_dir, tiny_export20, tmp_path_factory):
    from zo_edge.convert import convert_pipeline
    out = tmp_path_factory.mktemp("bundles") / "tiny_portable_fp32"
    convert_pipeline(tiny_sd1_dir, out, target="portable", weights="fp32", export_dir=tiny_export20, data=SHAPES_WORLD)
    return out


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    d = tmp_path_factory.mktemp("npu_refs")
    for i, im in enumerate(world.reference_images(world.Subject("star", "red", "striped"), n=2, size=32)):
        Image.fromarray(im).save(d / f"ref_{i}.png")
    return d


def graphs(bundle):
    return {g: onnx.load(str(Path(bundle) / g / "model.onnx")) for g in GRAPHS}


# -- convert --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["a16w8", "fp16"])
def test_qnn_bundle_is_standard_and_fixed(flavour, tiny_qnn, tiny_qnn_fp16):
    """A16W8 (the default): 16-bit QDQ calibrated on the model's data; fp16: the same graphs left float."""
    bundle = tiny_qnn if flavour == "a16w8" else tiny_qnn_fp16
    m = Bundle.load(bundle).manifest
    assert m["target"]["name"] == "qnn" and m["target"]["batch"] == 1 and m["target"]["fixed_shapes"]
    assert m["target"]["finite_masks"]["text_encoder"] == 1   # the CLIP causal mask
    assert m["quantization"]["weights"] == flavour and (m["quantization"]["calibration"] is None) == (flavour == "fp16")
    for g, model in graphs(bundle).items():
        entry = m["graphs"][g]
        assert entry["precision"] == flavour
        assert all(all(isinstance(d, int) for d in i["shape"]) for i in entry["inputs"]), (g, entry["inputs"])
        ops = {n.op_type for n in model.graph.node}
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), g
        assert "Erf" not in ops and ("QuantizeLinear" in ops) == (flavour == "a16w8"), g
        if flavour == "a16w8":
            q16 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.UINT16]
            assert q16, f"{g}: no 16-bit activation zero points"
        for t in model.graph.initializer:
            if t.data_type == onnx.TensorProto.FLOAT and 0 < np.prod(t.dims) <= 1 << 16:
                assert numpy_helper.to_array(t).min() > -1e30, (g, t.name)


@pytest.mark.slow
def test_portable_keeps_fp32_parity_with_standard_ops(tiny_portable, tiny_bundle_fp32):
    """Finite masks (-100) and ONNX Gelu change nothing that matters: the portable FP32 graphs give the
    CPU bundle's outputs."""
    for g, model in graphs(tiny_portable).items():
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), g
    p, c = Bundle.load(tiny_portable), Bundle.load(tiny_bundle_fp32)
    tok = CLIPTokenizer.from_pretrained(p.tokenizer_dir)
    ids, slots = tok.encode_prompt("a photo of a <x> on grass", {"<x>": 1})
    rng = np.random.default_rng(0)
    thetas = rng.standard_normal((3, 1, p.embedding_dim)).astype(np.float32) * 0.3
    lat, noise = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    lp = LossOracle(p, "on").losses(thetas, ids, slots, lat, noise, 600)
    lc = LossOracle(c, "on").losses(thetas, ids, slots, lat, noise, 600)
    np.testing.assert_allclose(lp, lc, rtol=1e-4)


def test_convert_refuses_bad_target_combinations(tiny_sd1_dir, tmp_path):
    def err(*args):
        r = CliRunner().invoke(cli, ["convert", str(tiny_sd1_dir), str(tmp_path / "o"), *args])
        assert r.exit_code == 2, r.output
        return r.output.strip().splitlines()[-1]
    assert "--weights 'int8' is not made for --target qnn" in err("--target", "qnn", "--weights", "int8")
    assert "--weights 'a16w8' is not made for --target cpu" in err("--weights", "a16w8")
    assert "standard ONNX ops only" in err("--target", "portable", "--fuse")
    assert "--batch" in err("--batch", "2")
    assert "does not go with --target qnn" in err("--target", "qnn", "--text-encoder-fp32")
    assert not (tmp_path / "o").exists()


# -- runtime: providers ------------------------------------------------------------------------------
def test_provider_specs_and_errors(tiny_bundle_int8, monkeypatch):
    s = providers.parse("qnn:backend_path=/x/libQnnHtp.so, htp_performance_mode=burst")
    assert s.name == "qnn" and s.options == {"backend_path": "/x/libQnnHtp.so", "htp_performance_mode": "burst"}
    with pytest.raises(UserError, match="KEY=VALUE"):
        providers.parse("qnn:backend_path")
    import onnxruntime as ort
    if "OpenVINOExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(UserError, match="onnxruntime-openvino"):
            Bundle.load(tiny_bundle_int8, provider="openvino")
    else:  # the OpenVINO build: a fused cpu bundle is refused before any session
        with pytest.raises(UserError, match="--target portable"):
            Bundle.load(tiny_bundle_int8, provider="openvino")
    monkeypatch.setattr(providers, "_qnn", lambda: None)
    with pytest.raises(UserError, match=r"zo-edge\[qnn\]"):
        Bundle.load(tiny_bundle_int8, provider="qnn")


def test_missing_provider_is_one_line_exit_2(tiny_bundle_int8, tmp_path, monkeypatch):
    monkeypatch.setattr(providers, "_qnn", lambda: None)
    r = CliRunner().invoke(cli, ["generate", "a star", "--model", str(tiny_bundle_int8), "--provider", "qnn",
                                 "--steps", "1", "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and r.output.startswith("zo-edge: error:") and "onnxruntime-qnn" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()


def test_fixed_batch_session_runs_any_batch(tmp_path):
    import onnxruntime as ort
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 2])
    t = helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 2])
    g = helper.make_graph([helper.make_node("Mul", ["x", "t"], ["y"])], "g", [x, t], [y])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    s = FixedBatchSession(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), 3, "g")
    a = np.arange(14, dtype=np.float32).reshape(7, 2)
    out = s.run(None, {"x": a, "t": np.array(2.0, np.float32)})[0]
    np.testing.assert_array_equal(out, 2 * a)
    with pytest.raises(UserError, match="fixed shapes"):
        s.run(None, {"x": np.zeros((3, 4), np.float32), "t": np.array(1.0, np.float32)})


# -- on the HTP simulator ---------------------------------------------------------------------------
@needs_qnn
@pytest.mark.slow
def test_every_node_runs_on_htp_with_fallback_disabled(tiny_qnn, tiny_bundle_int8):
    b = Bundle.load(tiny_qnn, provider="qnn")
    for g in GRAPHS:
        b.session(g)  # CPU fallback is disabled: a node HTP cannot take fails the load
    # and it is deterministic (one intra-op thread; with more the simulator is not): RGE needs that
    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((1, 4, 8, 8)).astype(np.float32), "timestep": np.array(700, np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, 32)).astype(np.float32) * 0.5}
    runs = [b.session("unet").run(None, feed)[0] for _ in range(3)]
    assert all(np.array_equal(runs[0], r) for r in runs[1:])
    # the same check refuses what HTP cannot run: a CPU bundle's graph (com.microsoft fusions, float)
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 4
    providers.configure(providers.parse("qnn"), so)
    with pytest.raises(Exception):
        ort.InferenceSession(str(Path(tiny_bundle_int8) / "unet" / "model.onnx"), so)
    with pytest.raises(UserError, match="--target qnn"):
        Bundle.load(tiny_bundle_int8, provider="qnn")


@needs_qnn
@pytest.mark.slow
def test_fp16_graphs_run_on_htp_in_half_precision(tiny_qnn_fp16, tiny_portable):
    """Float graphs run on HTP in its FP16 mode (with a SoC model: onnxruntime-qnn refuses the mode without one),
    which zo-edge turns on from the manifest. The outputs are the FP32 graphs' up to half-precision rounding,
    the same on every run."""
    b = Bundle.load(tiny_qnn_fp16, provider="qnn")
    for g in GRAPHS:
        b.session(g)  # CPU fallback disabled: a node HTP cannot take fails the load
    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((1, 4, 8, 8)).astype(np.float32), "timestep": np.array(300, np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, 32)).astype(np.float32) * 0.5}
    runs = [b.session("unet").run(None, feed)[0] for _ in range(2)]
    assert np.array_equal(runs[0], runs[1])
    ref = Bundle.load(tiny_portable).session("unet").run(None, feed)[0]
    rel = np.linalg.norm(runs[0] - ref) / np.linalg.norm(ref)
    assert 0 < rel < 2e-2, rel   # not bit-identical (so not FP32), close (so not garbage)
    seen = {}

    class Options:  # records what configure asks of a SessionOptions
        def add_session_config_entry(self, *a): pass
        def add_provider_for_devices(self, devices, opts): seen.update(opts)
    providers.configure(providers.parse("qnn:soc_model=57"), Options(), "fp16")
    assert seen["enable_htp_fp16_precision"] == "1" and seen["soc_model"] == "57"   # the user's SoC stands


@needs_qnn
@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["a16w8", "fp16"])
def test_personalize_and_generate_on_htp(flavour, tiny_qnn, tiny_qnn_fp16, refs, tmp_path):
    model = tiny_qnn if flavour == "a16w8" else tiny_qnn_fp16
    out = tmp_path / "tok.safetensors"
    r = CliRunner().invoke(cli, ["personalize", "--model", str(model), "--provider", "qnn", "--images", str(refs),
                                 "--token", "<npu-tok>", "--init", "star", "--out", str(out), "--run-dir",
                                 str(tmp_path / "run"), "--steps", "2", "--resolution", "16"])
    assert r.exit_code == 0, r.output
    mu = precision.recipe_for(flavour, "qnn", BAND)[0]
    assert f"mu {mu:g} for {flavour} on qnn" in r.output    # the precision's recipe, said
    assert json.loads((tmp_path / "run" / "config.json").read_text())["mu"] == mu
    from zo_runtime.embeddings import load_embeddings
    theta = load_embeddings(str(out))["<npu-tok>"]
    assert np.isfinite(theta).all()
    img = tmp_path / "x.png"
    r = CliRunner().invoke(cli, ["generate", "a photo of a <npu-tok>", "--model", str(model), "--provider", "qnn",
                                 "--embedding", str(out), "--steps", "2", "--out", str(img)])
    assert r.exit_code == 0, r.output
    assert Image.open(img).size == (16, 16)


@pytest.fixture(scope="module")
def shapes_qnn(tmp_path_factory):
    from zo_edge.convert import convert_pipeline
    out = tmp_path_factory.mktemp("bundles") / "shapes_qnn"
    convert_pipeline(ROOT / "models" / "shapes" / "source", out, target="qnn", calibration_samples=8, data=SHAPES_WORLD)
    return out


def _directional(shapes_qnn, mu=0.05, draws=12, band=NPU_BAND):
    htp, cpu = Bundle.load(shapes_qnn, provider="qnn"), Bundle.load(ROOT / "models" / "shapes" / "bundle")
    tok = CLIPTokenizer.from_pretrained(cpu.tokenizer_dir)
    ids, slots = tok.encode_prompt("a photo of a <x>", {"<x>": 1})
    theta = np.asarray(cpu.token_table[tok.single_token_id("star")], np.float32)[None]
    oh, oc = LossOracle(htp, "on"), LossOracle(cpu, "on")
    rng = np.random.default_rng(0)
    d_h, d_c, kept = [], [], []
    for _ in range(draws):
        lat = rng.standard_normal((4, 16, 16)).astype(np.float32)
        noise = rng.standard_normal(lat.shape).astype(np.float32)
        t = int(rng.integers(band[0], band[1]))
        z = rng.standard_normal(theta.shape).astype(np.float32)
        cands = np.stack([theta, theta + mu * z])
        lh, lc = oh.losses(cands, ids, slots, lat, noise, t), oc.losses(cands, ids, slots, lat, noise, t)
        d_h.append((lh[1] - lh[0]) / mu)
        d_c.append((lc[1] - lc[0]) / mu)
        kept.append((lat, noise, t, z))
    return oh, oc, ids, slots, theta, np.array(d_h), np.array(d_c), kept


@pytest.fixture(scope="module")
def htp_vs_cpu(shapes_qnn):
    return _directional(shapes_qnn)


@needs_qnn
@pytest.mark.slow
def test_htp_descent_step_lowers_the_loss_as_on_the_cpu(htp_vs_cpu):
    """On the shapes model, a descent step along the CPU's gradient estimate (the shipped int8w bundle on
    the CPU provider) lowers the loss on the HTP (A16W8, simulated, deterministic with one thread) by a
    like amount, judged on the same draws."""
    oh, oc, ids, slots, theta, d_h, d_c, draws = htp_vs_cpu
    g = sum(d * z for d, (_, _, _, z) in zip(d_c, draws)) / len(draws)
    step = theta - 0.05 * g / np.abs(g).max()
    dh = np.mean([np.diff(oh.losses(np.stack([theta, step]), ids, slots, a, b, t))[0] for a, b, t, _ in draws])
    dc = np.mean([np.diff(oc.losses(np.stack([theta, step]), ids, slots, a, b, t))[0] for a, b, t, _ in draws])
    assert dc < 0 and dh < 0, (dh, dc)
    assert 0.5 < dh / dc < 2, (dh, dc)


@needs_qnn
@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured limitation: the simulated HTP's A16W8 loss differences are noisy "
                                       "(README signal table: 0.70 vs FP32 at mu 3e-2 over 96 draws; here, init "
                                       "'star', 12 draws at mu 5e-2: about 0.2). Passing means the HTP got better: "
                                       "update the table and this test.")
def test_htp_directional_derivatives_follow_the_cpu(htp_vs_cpu):
    _, _, _, _, _, d_h, d_c, _ = htp_vs_cpu
    assert np.corrcoef(d_h, d_c)[0, 1] > 0.8, (d_h, d_c)


@pytest.fixture(scope="module")
def shapes_qnn_fp16(tmp_path_factory):
    from zo_edge.convert import convert_pipeline
    out = tmp_path_factory.mktemp("bundles") / "shapes_qnn_fp16"
    convert_pipeline(ROOT / "models" / "shapes" / "source", out, target="qnn", weights="fp16", data=SHAPES_WORLD)
    return out


@needs_qnn
@pytest.mark.slow
def test_htp_fp16_directional_derivatives_follow_the_cpu(shapes_qnn_fp16):
    """The HTP's FP16 mode keeps what A16W8 loses (README signal table: 0.98 at mu 3e-2 over 96 draws): here,
    12 draws at that mu, the HTP's directional derivatives follow the CPU's int8w bundle's. (Personalize takes
    mu 1e-2 for it, 0.88 over 96 draws: too few draws here to test a correlation that far below 1.)"""
    *_, d_h, d_c, _ = _directional(shapes_qnn_fp16, mu=3e-2, band=BAND)
    assert np.corrcoef(d_h, d_c)[0, 1] > 0.9, (d_h, d_c)

