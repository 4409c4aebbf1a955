"""benchmarks/profile_personalize.py (issue 16's profile): the FLOP count it takes from the profiler's
shapes, and its tables from a results file. No training, no model: the script itself is run by hand."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prof():
    spec = importlib.util.spec_from_file_location("profile_personalize", ROOT / "benchmarks" / "profile_personalize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_node_flops_from_recorded_shapes(prof):
    # Conv 3x3, 320 -> 320 channels on a 32x32 map, batch 3: 2 * out numel * Cin * kh * kw
    assert prof.node_flops("Conv", [[3, 320, 32, 32], [320, 320, 3, 3], [320]], [[3, 320, 32, 32]]) == \
        2.0 * 3 * 320 * 32 * 32 * 320 * 9
    # MatMul [3, 1024, 320] x [320, 320]; MatMulNBits has packed weights: K comes from the activation
    assert prof.node_flops("MatMul", [[3, 1024, 320], [320, 320]], [[3, 1024, 320]]) == 2.0 * 3 * 1024 * 320 * 320
    assert prof.node_flops("MatMulNBits", [[3, 1024, 320], [320, 1, 320]], [[3, 1024, 320]]) == \
        2.0 * 3 * 1024 * 320 * 320
    # cross-attention: queries [3, 1024, 320] against 77 keys: QK^T and AV
    assert prof.node_flops("MultiHeadAttention", [[3, 1024, 320], [3, 77, 320], [3, 77, 320]], [[3, 1024, 320]]) == \
        4.0 * 3 * 1024 * 77 * 320
    assert prof.node_flops("Add", [[3, 4], [3, 4]], [[3, 4]]) == 0.0


def report(prof):
    row = {"config": "default", "resolution": 256, "batched": True, "s_per_iter": 9.0, "s_per_unet_pass": 2.8,
           "peak_rss_mb": 1900.0, "losses": [[1.0, 1.1, 0.9]],
           "phase_max_rss_mb": {p: 100.0 * i for i, p in enumerate(prof.PHASES, 1)}}
    other = dict(row, config="no-arena", peak_rss_mb=1700.0)
    seq = dict(row, config="seq", batched=False, losses=[[1.0, 1.1000001, 0.9]])
    r = {"gemm": {"threads": 2, "numpy": {"median": 60.0}, "ort_matmul": {"median": 55.0}},
         "rows": [row, other, seq],
         "ops": [{"resolution": 256, "batch": 3, "model_run_s": 8.1, "gflop_per_pass": 90.0,
                  "ops": [{"op": "Conv", "nodes": 3, "s_per_run": 5.0, "share": 0.6, "gflop_per_run": 200.0,
                           "gflop_per_s": 40.0}]}]}
    prof.attach_floor(r)
    prof.same_losses(r)
    return r


def test_floor_and_loss_check(prof):
    r = report(prof)
    assert r["floor"]["per_resolution"]["256"]["floor_s_per_pass"] == pytest.approx(1.5)
    assert r["rows"][0]["x_floor"] == pytest.approx(2.8 / 1.5)
    assert r["rows"][1]["losses_identical_to_default"] is True
    assert r["rows"][2]["losses_identical_to_default"] is False


def test_tables_render(prof):
    r = report(prof)
    configs = prof.table(r)
    assert "| 256 | no-arena | batched | 9.00 | 2.80 | 1.9 | 1,700 | -200 |" in configs and "bit-identical" in configs
    assert "| 256 | 3 | Conv | 3 | 5.000 | 60.0 % | 200.0 | 40.0 |" in prof.table(r, "ops")
    assert "| 256 | 90.0 | 60.0 / 55.0 (2) | 1.500 | 2.70 | 1.8 |" in prof.table(r, "floor")


def test_sessions_open_without_a_memory_pattern():
    """Issue 16's measured memory default (docs/results/profile_sd15.json): every session of a bundle opens
    with enable_mem_pattern off and the CPU arena on, through the one session-options helper."""
    from zo_edge.models import SHAPES_BUNDLE
    from zo_runtime.bundle import Bundle

    b = Bundle.load(SHAPES_BUNDLE, verify=False)
    for graph in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        opts = b.session_options(graph)
        assert opts.enable_mem_pattern is False and opts.enable_cpu_mem_arena is True
    b.session("unet")  # and a session opens with them


def test_external_copy_maps_and_computes_the_same(prof, tmp_path):
    """The external-unet configuration's copy: the large initializers in a data file beside the graph (which
    onnxruntime maps), and the UNet's output unchanged bit for bit."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from zo_edge.models import SHAPES_BUNDLE
    from zo_runtime.bundle import Bundle

    b = Bundle.load(SHAPES_BUNDLE, verify=False)
    src = b.root / b.graph("unet")["path"]
    copy = prof.external_copy(src, tmp_path / "ext")
    assert prof.external_copy(src, tmp_path / "ext") == copy  # made once
    model = onnx.load(str(copy), load_external_data=False)
    assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer) > 10
    assert (copy.parent / "model.onnx_data").is_file()
    rng = np.random.default_rng(0)
    h = b.resolution // b.vae_scale_factor
    feed = {"sample": rng.standard_normal((1, b.latent_channels, h, h)).astype(np.float32),
            "timestep": b.timestep_feed(500, 1),
            "encoder_hidden_states": rng.standard_normal((1, 77, b.embedding_dim)).astype(np.float32)}
    outs = [ort.InferenceSession(str(p), b.session_options("unet"), providers=["CPUExecutionProvider"])
            .run(None, feed)[0] for p in (src, copy)]
    assert np.array_equal(outs[0], outs[1])
