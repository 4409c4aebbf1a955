"""The zeroth-order signal survives weight-only INT8: directional differences [L(θ+μz) − L(θ)]/μ on
an int8w bundle track the FP32 bundle's, and scale linearly in μ (a smooth loss)."""
import numpy as np

from zo_runtime.bundle import Bundle
from zo_runtime.oracle import LossOracle
from zo_runtime.tokenizer import CLIPTokenizer


def directional(path, trials=12, seed=0):
    b = Bundle.load(path)
    tok = CLIPTokenizer.from_pretrained(b.tokenizer_dir)
    ids, slots = tok.encode_prompt("a photo of a <x>", {"<x>": 1})
    theta = np.asarray(b.token_table[tok.single_token_id("dog")], np.float32)[None]
    oracle = LossOracle(b, "on")
    h = b.resolution // b.vae_scale_factor
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(trials):
        lat = rng.standard_normal((b.latent_channels, h, h)).astype(np.float32)
        noise = rng.standard_normal(lat.shape).astype(np.float32)
        z = rng.standard_normal(theta.shape).astype(np.float32)
        L = oracle.losses(np.stack([theta, theta + 1e-3 * z, theta + 2e-3 * z]), ids, slots, lat, noise,
                          int(rng.integers(500, 900)))
        out.append([(L[1] - L[0]) / 1e-3, (L[2] - L[0]) / 2e-3])
    return np.array(out)


def test_weight_only_int8_keeps_the_zo_signal(tiny_bundle_fp32, tiny_bundle_int8w):
    ref = directional(tiny_bundle_fp32)
    got = directional(tiny_bundle_int8w)
    assert np.corrcoef(ref[:, 0], ref[:, 1])[0, 1] > 0.99          # FP32: smooth at μ = 1e-3
    assert np.corrcoef(got[:, 0], got[:, 1])[0, 1] > 0.99          # int8w: smooth too
    assert np.corrcoef(got[:, 0], ref[:, 0])[0, 1] > 0.95          # and it follows FP32's derivative
    m = Bundle.load(tiny_bundle_int8w).manifest
    assert {g["precision"] for g in m["graphs"].values()} == {"int8w"}


def test_requantize_fp32_bundle_to_int8w(tiny_bundle_fp32, tmp_path):
    from click.testing import CliRunner

    from zo_edge.cli.main import main

    out = tmp_path / "rq"
    r = CliRunner().invoke(main, ["requantize", str(tiny_bundle_fp32), str(out)])
    assert r.exit_code == 0, r.output
    b = Bundle.load(out)  # sha256 of every file
    assert {g["precision"] for g in b.manifest["graphs"].values()} == {"int8w"}
    ref, got = directional(tiny_bundle_fp32), directional(out)
    assert np.corrcoef(got[:, 0], ref[:, 0])[0, 1] > 0.95
    r = CliRunner().invoke(main, ["requantize", str(out), str(tmp_path / "again")])
    assert r.exit_code == 2 and "not an fp32 bundle" in r.output
    r = CliRunner().invoke(main, ["requantize", str(tiny_bundle_fp32), str(out)])
    assert r.exit_code == 2 and "exists" in r.output
    mine = tmp_path / "my-files"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    r = CliRunner().invoke(main, ["requantize", str(tiny_bundle_fp32), str(mine), "--overwrite"])
    assert r.exit_code == 2 and "not a zo-edge bundle" in r.output and (mine / "notes.txt").exists()


def test_weight_only_int4_keeps_a_smooth_signal(tiny_bundle_fp32, tmp_path):
    """int4w (the UNet's weights 4-bit in blocks of 32): still a smooth loss of θ, near FP32's derivative."""
    import onnx
    import onnxruntime as ort

    from zo_edge.convert.requantize import requantize_bundle

    out = tmp_path / "int4w"
    requantize_bundle(tiny_bundle_fp32, out, weights="int4w", progress=lambda m: None)
    m = Bundle.load(out).manifest
    assert m["graphs"]["unet"]["precision"] == "int4w" and m["quantization"]["weights"] == "int4w"
    assert {m["graphs"][g]["precision"] for g in ("text_encoder", "vae_encoder", "vae_decoder")} == {"int8w"}
    unet = onnx.load(str(out / "unet" / "model.onnx"))
    int4 = {t.name for t in unet.graph.initializer if t.data_type == onnx.TensorProto.INT4}
    dq4 = [n for n in unet.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int4]
    assert dq4 and all(a.i == 32 for n in dq4 for a in n.attribute if a.name == "block_size")
    assert m["quantization"]["graphs"]["unet"]["weights_int4"] == len(dq4)
    # onnxruntime fuses the 4-bit MatMuls into MatMulNBits under the weight-only session options
    so = Bundle.load(out).session_options("unet")
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(out / "unet" / "model.onnx"), so, providers=["CPUExecutionProvider"])
    assert any(n.op_type == "MatMulNBits" for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    ref, got = directional(tiny_bundle_fp32), directional(out)
    assert np.corrcoef(got[:, 0], got[:, 1])[0, 1] > 0.99          # smooth at μ = 1e-3
    assert np.corrcoef(got[:, 0], ref[:, 0])[0, 1] > 0.75  # a nearby model: 0.87 on this tiny random UNet
