"""zo-edge convert / info: tiny SD1 + SD2 pipelines -> bundles (docs/bundle.md)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from zo_edge.models.calibration import SHAPES_WORLD
from zo_runtime.errors import UserError

pytestmark = pytest.mark.slow

GRAPHS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
PROMPTS = ["a photo of a cat", "a red striped star on a grass background", "an astronaut riding a horse", ""]


def cli(*args):
    from zo_edge.cli.main import main
    return CliRunner().invoke(main, [str(a) for a in args])


def manifest(bundle) -> dict:
    return json.loads((Path(bundle) / "zo-edge.json").read_text())


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in Path(parent).iterdir() if "zo-convert" in p.name]


def tokenize(bundle, prompts=PROMPTS, max_length=77):
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(str(Path(bundle) / "tokenizer"))
    return np.asarray(tok(prompts, padding="max_length", max_length=max_length, truncation=True,
                          return_tensors="np").input_ids, np.int64)


def session(path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_bundle(bundle, batch=2):
    """Run all four graphs of a bundle end to end; returns the outputs."""
    m = manifest(bundle)
    b = Path(bundle)
    table = np.load(b / m["token_embedding"]["path"], mmap_mode="r")
    ids = tokenize(bundle, PROMPTS[:batch], m["max_length"])
    te = session(b / m["graphs"]["text_encoder"]["path"])
    feeds = {"inputs_embeds": np.ascontiguousarray(table[ids])}
    if any(i["name"] == "input_ids" for i in m["graphs"]["text_encoder"]["inputs"]):
        feeds["input_ids"] = ids
    hidden, pooled = te.run(["last_hidden_state", "pooler_output"], feeds)
    res, f, C = m["resolution"], m["vae_scale_factor"], m["latent_channels"]
    img = np.random.default_rng(0).uniform(-1, 1, (batch, 3, res, res)).astype(np.float32)
    params = session(b / m["graphs"]["vae_encoder"]["path"]).run(None, {"sample": img})[0]
    lat = params[:, :C] * m["vae_scaling_factor"]
    ts = next(i for i in m["graphs"]["unet"]["inputs"] if i["name"] == "timestep")
    t = np.array(600, ts["dtype"]) if ts["rank"] == 0 else np.full((batch,), 600, ts["dtype"])
    eps = session(b / m["graphs"]["unet"]["path"]).run(None, {"sample": lat.astype(np.float32), "timestep": t,
                                                             "encoder_hidden_states": hidden})[0]
    dec = session(b / m["graphs"]["vae_decoder"]["path"]).run(None, {"latent_sample": params[:, :C]})[0]
    assert hidden.shape == (batch, m["max_length"], m["embedding_dim"])
    assert pooled.shape == (batch, m["embedding_dim"])
    assert params.shape == (batch, 2 * C, res // f, res // f)
    assert eps.shape == (batch, C, res // f, res // f)
    assert dec.shape == (batch, 3, res, res)
    for a in (hidden, pooled, params, eps, dec):
        assert np.isfinite(a).all()
    return hidden, eps, dec


# ---------------------------------------------------------------- manifest and layout

def test_int8_bundle_layout_and_manifest(tiny_bundle_int8, tiny_sd1_dir):
    b = tiny_bundle_int8
    m = manifest(b)
    for rel in ["zo-edge.json", "text_encoder/model.onnx", "text_encoder/token_embedding.npy", "unet/model.onnx",
                "vae_encoder/model.onnx", "vae_decoder/model.onnx", "tokenizer/vocab.json", "tokenizer/merges.txt",
                "scheduler/scheduler_config.json"]:
        assert (b / rel).is_file(), rel
    assert m["format"] == "zo-edge-bundle" and m["format_version"] == 1
    assert m["created_by"].startswith("zo-edge ")
    assert m["family"] == "sd1" and m["prediction_type"] == "epsilon"
    assert m["source"]["pipeline_class"] == "StableDiffusionPipeline"
    assert m["resolution"] == 16 and m["vae_scale_factor"] == 2 and m["latent_channels"] == 4
    assert m["vae_scaling_factor"] == pytest.approx(0.18215)
    assert m["embedding_dim"] == 32 and m["max_length"] == 77
    ns = m["noise_schedule"]
    assert (ns["num_train_timesteps"], ns["beta_schedule"]) == (1000, "scaled_linear")
    assert ns["beta_start"] == pytest.approx(0.00085) and ns["beta_end"] == pytest.approx(0.012)
    assert m["token_embedding"] == {"path": "text_encoder/token_embedding.npy", "shape": [49408, 32],
                                    "dtype": "float32"}
    table = np.load(b / "text_encoder/token_embedding.npy", mmap_mode="r")
    assert table.dtype == np.float32 and table.shape == (49408, 32)
    assert m["tokenizer"] == "tokenizer" and m["scheduler_config"] == "scheduler/scheduler_config.json"
    assert json.loads((b / "scheduler/scheduler_config.json").read_text()) == \
        json.loads((tiny_sd1_dir / "scheduler/scheduler_config.json").read_text())
    q = m["quantization"]
    assert q["weights"] == "int8" and q["provider"] == "cpu" and isinstance(q["fuse"], bool)
    assert {g: m["graphs"][g]["precision"] for g in GRAPHS} == dict.fromkeys(GRAPHS, "int8")
    # recipe: only weight ops quantized, activation x activation MatMuls excluded
    unet_recipe = q["graphs"]["unet"]
    assert unet_recipe["op_types"] == ["Conv", "MatMul", "Gemm"]
    assert unet_recipe["excluded"]["activation_matmuls"] > 0 or q["fuse"]


def test_files_table_has_every_file_with_sha256(tiny_bundle_int8):
    b = tiny_bundle_int8
    m = manifest(b)
    on_disk = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()} - {"zo-edge.json"}
    assert set(m["files"]) == on_disk
    for rel, e in m["files"].items():
        data = (b / rel).read_bytes()
        assert e["bytes"] == len(data)
        assert e["sha256"] == hashlib.sha256(data).hexdigest()
    from zo_edge.convert.manifest import verify_files
    assert verify_files(b, m) == []


def test_graph_io_read_from_graphs(tiny_bundle_int8, tiny_bundle_fp32):
    for b in (tiny_bundle_int8, tiny_bundle_fp32):
        m = manifest(b)
        for g in GRAPHS:
            e = m["graphs"][g]
            assert e["path"] == f"{g}/model.onnx"
            model = onnx.load(str(b / e["path"]), load_external_data=False)
            inits = {t.name for t in model.graph.initializer}
            names = [v.name for v in model.graph.input if v.name not in inits]
            assert [i["name"] for i in e["inputs"]] == names
            assert [o["name"] for o in e["outputs"]] == [v.name for v in model.graph.output]
            for spec, v in zip(e["inputs"], [v for v in model.graph.input if v.name not in inits]):
                assert spec["rank"] == len(v.type.tensor_type.shape.dim)
                assert spec["dtype"] == onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
        ins = {i["name"]: i for i in m["graphs"]["unet"]["inputs"]}
        assert set(ins) == {"sample", "timestep", "encoder_hidden_states"}
        assert ins["sample"]["rank"] == 4 and ins["encoder_hidden_states"]["rank"] == 3
        assert (ins["timestep"]["dtype"], ins["timestep"]["rank"]) in {("float32", 0), ("int64", 1), ("float32", 1)}
        te = {i["name"]: i for i in m["graphs"]["text_encoder"]["inputs"]}
        assert te["inputs_embeds"]["dtype"] == "float32" and te["inputs_embeds"]["rank"] == 3
        assert te["inputs_embeds"]["shape"][-1] == 32
        assert [o["name"] for o in m["graphs"]["text_encoder"]["outputs"]] == ["last_hidden_state", "pooler_output"]
        assert [o["name"] for o in m["graphs"]["vae_encoder"]["outputs"]] == ["latent_parameters"]
        assert [i["name"] for i in m["graphs"]["vae_decoder"]["inputs"]] == ["latent_sample"]


# ---------------------------------------------------------------- text encoder surgery

def test_surgery_parity_fp32(tiny_sd1_export, tiny_bundle_fp32):
    """The rewritten FP32 graph fed table[ids] reproduces the export fed ids (<= 1e-5)."""
    b = tiny_bundle_fp32
    assert manifest(b)["graphs"]["text_encoder"]["precision"] == "fp32"
    ids = tokenize(b)
    table = np.load(b / "text_encoder/token_embedding.npy")
    ref = session(tiny_sd1_export / "text_encoder/model.onnx").run(["last_hidden_state", "pooler_output"],
                                                                     {"input_ids": ids})
    feeds = {"inputs_embeds": table[ids], "input_ids": ids}
    new = session(b / "text_encoder/model.onnx").run(["last_hidden_state", "pooler_output"], feeds)
    assert np.max(np.abs(ref[0] - new[0])) <= 1e-5
    assert np.max(np.abs(ref[1] - new[1])) <= 1e-5
    assert manifest(b)["text_encoder_surgery"]["parity_max_abs_diff"] <= 1e-5


def test_surgery_removes_table_and_gather(tiny_bundle_fp32, tiny_bundle_int8):
    for b in (tiny_bundle_fp32, tiny_bundle_int8):
        model = onnx.load(str(b / "text_encoder/model.onnx"))
        names = {t.name for t in model.graph.initializer}
        assert not any("token_embedding" in n for n in names)
        assert not any(tuple(t.dims) == (49408, 32) for t in model.graph.initializer)
        assert "inputs_embeds" in {v.name for v in model.graph.input}
        # pooling still reads the ids, so input_ids is kept, and the manifest says so
        m = manifest(b)
        kept = any(v.name == "input_ids" for v in model.graph.input)
        assert kept == m["text_encoder_surgery"]["input_ids_kept"]


def test_surgery_finds_renamed_table(tiny_sd1_export, tmp_path):
    """The token table is found by structure (rank-2 constant gathered by input_ids), not by name."""
    from zo_edge.convert.surgery import check_parity, rewrite_text_encoder
    model = onnx.load(str(tiny_sd1_export / "text_encoder/model.onnx"))
    old = "text_model.embeddings.token_embedding.weight"
    for t in model.graph.initializer:
        if t.name == old:
            t.name = "weight_17"
    for n in model.graph.node:
        for k, i in enumerate(n.input):
            if i == old:
                n.input[k] = "weight_17"
        if "token_embedding" in n.name:
            n.name = "gather_x"
    onnx.save(model, str(tmp_path / "renamed.onnx"))
    res = rewrite_text_encoder(tmp_path / "renamed.onnx", tmp_path / "te/model.onnx", tmp_path / "te/table.npy")
    assert res.table_name == "weight_17" and (res.vocab_size, res.dim) == (49408, 32)
    ids = np.array([[49406, 320, 1125, 539, 320, 2368] + [49407] * 71], np.int64)
    table = np.load(tmp_path / "te/table.npy")
    assert check_parity(tmp_path / "renamed.onnx", tmp_path / "te/model.onnx", table, ids) <= 1e-5


# ---------------------------------------------------------------- bundles run; accuracy

def test_fp32_bundle_runs_and_matches_export(tiny_bundle_fp32, tiny_sd1_export):
    hidden, eps, dec = run_bundle(tiny_bundle_fp32, batch=2)
    acc = manifest(tiny_bundle_fp32)["accuracy"]
    for g in GRAPHS:
        assert acc[g]["cosine"] > 0.99999 and acc[g]["rel_l2"] < 1e-4


def test_int8_bundle_runs(tiny_bundle_int8):
    run_bundle(tiny_bundle_int8, batch=3)
    model = onnx.load(str(tiny_bundle_int8 / "unet/model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_int8_activation_matmuls_stay_float(tiny_sd1_dir, tiny_sd1_export, tmp_path):
    """Unfused: attention's QK^T and attn.V MatMuls (no constant input) get no QDQ; weight MatMuls do."""
    from zo_edge.convert import convert_pipeline
    out = tmp_path / "unfused"
    m = convert_pipeline(tiny_sd1_dir, out, weights="int8", fuse=False, export_dir=tiny_sd1_export,
                         calibration_samples=2, heldout_samples=1, heldout_per_band=1, data=SHAPES_WORLD)
    assert m["quantization"]["fuse"] is False and m["graphs"]["unet"]["fused"] is False
    assert m["quantization"]["graphs"]["unet"]["excluded"]["activation_matmuls"] > 0
    model = onnx.load(str(out / "unet/model.onnx"))
    prod = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}

    def dq_of_const(name):
        s = prod.get(name)
        return s is not None and s.op_type == "DequantizeLinear" and s.input[0] in inits
    act, weight = 0, 0
    for n in model.graph.node:
        if n.op_type != "MatMul":
            continue
        if any(i in inits or dq_of_const(i) for i in n.input[:2]):
            weight += 1
            assert any(dq_of_const(i) for i in n.input[:2]), f"{n.name}: weight MatMul not quantized"
        else:
            act += 1
            assert all(prod.get(i) is None or prod[i].op_type != "DequantizeLinear" for i in n.input[:2]), n.name
    assert weight > 0 and act > 0


def test_int8_fused_unet_quantizes_attention_projections(tiny_bundle_int8):
    """Fused (the default): self-attention is MultiHeadAttention fed by quantized Q/K/V MatMuls."""
    m = manifest(tiny_bundle_int8)
    assert m["quantization"]["fuse"] is True
    assert m["graphs"]["unet"]["fusions"]["unpacked_self_attention"] > 0
    model = onnx.load(str(tiny_bundle_int8 / "unet/model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "MultiHeadAttention" in ops and "Attention" not in ops
    for bad in ("GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "NhwcConv", "BiasAdd"):
        assert bad not in ops
    prod = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    mha = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    for n in mha:
        q = prod[n.input[0]]
        while q.op_type in ("DequantizeLinear", "QuantizeLinear"):  # an output QDQ pair may sit between
            q = prod[q.input[0]]
        assert q.op_type == "MatMul"
        assert any(prod.get(i) is not None and prod[i].op_type == "DequantizeLinear" and prod[i].input[0] in inits
                   for i in q.input), "Q projection not INT8"


def test_accuracy_report(tiny_bundle_int8):
    acc = manifest(tiny_bundle_int8)["accuracy"]
    assert set(acc) == set(GRAPHS)
    for g in GRAPHS:
        assert 0.5 < acc[g]["cosine"] <= 1.0 + 1e-9
        assert 0.0 <= acc[g]["rel_l2"] < 1.0
        assert acc[g]["samples"] >= 1
    bands = acc["unet"]["bands"]
    assert list(bands) == ["0-250", "250-500", "500-900", "900-1000"]
    for b in bands.values():
        assert {"cosine", "rel_l2", "samples"} <= set(b)
    # the reduced-range recipe keeps the tiny UNet close to FP32
    assert acc["unet"]["cosine"] > 0.98 and acc["text_encoder"]["cosine"] > 0.99


def test_info_command(tiny_bundle_int8):
    r = cli("info", tiny_bundle_int8, "--verify")
    assert r.exit_code == 0, r.output
    for word in ("sd1", "int8", "unet", "inputs_embeds", "accuracy", "500-900", "verified"):
        assert word in r.output
    r = cli("info", tiny_bundle_int8, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["family"] == "sd1"


def test_int4_bundle(tiny_sd1_dir, tiny_sd1_export, tmp_path):
    pytest.importorskip("onnx_ir", reason="onnxruntime's MatMulNBits quantizer needs onnx-ir")
    from zo_edge.convert import convert_pipeline
    out = tmp_path / "int4"
    m = convert_pipeline(tiny_sd1_dir, out, weights="int4", export_dir=tiny_sd1_export, calibration_samples=4,
                         data=SHAPES_WORLD)
    assert m["graphs"]["unet"]["precision"] == "int4"
    assert m["quantization"]["weights"] == "int4"
    unet_ops = {n.op_type for n in onnx.load(str(out / "unet/model.onnx")).graph.node}
    assert "MatMulNBits" in unet_ops
    assert m["quantization"]["graphs"]["unet"]["matmul"]["matmul_nbits"] > 0
    run_bundle(out, batch=1)
    assert m["accuracy"]["unet"]["cosine"] > 0.95


# ---------------------------------------------------------------- SD2 and the CLI path (real export)

def test_sd2_convert_cli(tiny_sd2_dir, tmp_path):
    out = tmp_path / "sd2.zo"
    r = cli("convert", tiny_sd2_dir, out, "--text-encoder-fp32", "--calibration-samples", "2")
    assert r.exit_code == 0, r.output
    for stage in ("[export]", "[rewrite]", "[calibrate]", "[quantize]", "[verify]"):
        assert stage in r.output
    assert "accuracy" in r.output
    m = manifest(out)
    assert m["family"] == "sd2" and m["prediction_type"] == "v_prediction"
    assert m["graphs"]["text_encoder"]["precision"] == "fp32"
    assert m["graphs"]["unet"]["precision"] == "int8"
    assert m["quantization"]["text_encoder_fp32"] is True
    assert m["accuracy"]["text_encoder"].get("identical") is True
    assert m["text_encoder_surgery"]["parity_max_abs_diff"] <= 1e-5
    assert leftovers(tmp_path) == []
    run_bundle(out, batch=2)


# ---------------------------------------------------------------- bad input

def _fake_source(tmp_path, src, drop=None, edit=None):
    """A copy of the tiny pipeline's configs (weights as empty files) with one thing changed."""
    dst = tmp_path / "fake"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    for comp in ("unet", "vae"):
        (dst / comp / "diffusion_pytorch_model.safetensors").touch()
    (dst / "text_encoder" / "model.safetensors").touch()
    if drop:
        shutil.rmtree(dst / drop)
    if edit:
        path, fn = edit
        p = dst / path
        p.write_text(json.dumps(fn(json.loads(p.read_text()))))
    return dst


def _one_line_error(r):
    assert r.exit_code == 2
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.output
    assert "error" in lines[0]
    assert "Traceback" not in r.output
    return lines[0]


def test_bad_inputs_one_line_errors(tiny_sd1_dir, tmp_path):
    out = tmp_path / "out"
    assert "does not exist" in _one_line_error(cli("convert", tmp_path / "nope", out))
    (tmp_path / "empty").mkdir()
    assert "model_index.json" in _one_line_error(cli("convert", tmp_path / "empty", out))
    src = _fake_source(tmp_path, tiny_sd1_dir, drop="vae")
    assert "vae" in _one_line_error(cli("convert", src, out))
    shutil.rmtree(src)
    src = _fake_source(tmp_path, tiny_sd1_dir, edit=("model_index.json",
                                                     lambda d: {k: v for k, v in d.items() if k != "unet"}))
    assert "unet" in _one_line_error(cli("convert", src, out))
    shutil.rmtree(src)
    src = _fake_source(tmp_path, tiny_sd1_dir, edit=("text_encoder/config.json", lambda d: {**d, "hidden_size": 48}))
    assert "unknown model family" in _one_line_error(cli("convert", src, out))
    shutil.rmtree(src)
    src = _fake_source(tmp_path, tiny_sd1_dir, edit=("model_index.json",
                                                     lambda d: {**d, "text_encoder": ["transformers", "T5EncoderModel"]}))
    assert "unknown model family" in _one_line_error(cli("convert", src, out))
    shutil.rmtree(src)
    src = _fake_source(tmp_path, tiny_sd1_dir, edit=("model_index.json",
                                                     lambda d: {**d, "_class_name": "StableDiffusionXLPipeline",
                                                                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    assert "SDXL" in _one_line_error(cli("convert", src, out))
    r = cli("convert", tiny_sd1_dir, out, "--weights", "int3")
    assert r.exit_code == 2
    assert "not a zo-edge bundle" in _one_line_error(cli("info", tmp_path / "empty"))
    assert "does not exist" in _one_line_error(cli("info", tmp_path / "nope"))
    assert not out.exists() and leftovers(tmp_path) == []


def test_family_detection(tiny_sd1_dir, tiny_sd2_dir, tmp_path):
    from zo_edge.convert.source import inspect_source
    assert inspect_source(tiny_sd1_dir).family == "sd1"
    assert inspect_source(tiny_sd2_dir).family == "sd2"
    src = _fake_source(tmp_path, tiny_sd1_dir, edit=("unet/config.json", lambda d: {**d, "in_channels": 9}))
    with pytest.raises(UserError, match="inpainting"):
        inspect_source(src)


def test_existing_out_not_overwritten_without_flag(tiny_bundle_int8, tiny_sd1_dir, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_int8, out)
    before = (out / "zo-edge.json").read_bytes()
    line = _one_line_error(cli("convert", tiny_sd1_dir, out, "--weights", "fp32"))
    assert "--overwrite" in line
    assert (out / "zo-edge.json").read_bytes() == before
    # a folder that is not a bundle is never replaced, even with --overwrite
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert "not a zo-edge bundle" in _one_line_error(cli("convert", tiny_sd1_dir, other, "--overwrite"))
    assert (other / "notes.txt").read_text() == "keep me"


def test_overwrite_replaces_only_at_the_end(tiny_bundle_int8, tiny_sd1_dir, tiny_sd1_export, tmp_path, monkeypatch):
    from zo_edge.convert import convert_pipeline, pipeline
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_int8, out)
    before = (out / "zo-edge.json").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("simulated failure in verify")
    monkeypatch.setattr(pipeline.acc_mod, "graph_accuracy", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        convert_pipeline(tiny_sd1_dir, out, weights="fp32", fuse=True, overwrite=True, export_dir=tiny_sd1_export,
                         data=SHAPES_WORLD)
    assert (out / "zo-edge.json").read_bytes() == before  # old bundle intact
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    m = convert_pipeline(tiny_sd1_dir, out, weights="fp32", fuse=False, overwrite=True, export_dir=tiny_sd1_export,
                         data=SHAPES_WORLD)
    assert manifest(out)["quantization"]["weights"] == "fp32" == m["quantization"]["weights"]
    assert leftovers(tmp_path) == []
    from zo_edge.convert.manifest import verify_files
    assert verify_files(out, m) == []


def test_calibration_runs_on_the_data_it_is_given(tiny_sd1_dir, tiny_sd1_export, tmp_path):
    """convert knows no data of its own: calibration and the held-out check ask the caller's data
    for prompts and images, and the manifest records the data's own description."""
    from zo_edge.convert import convert_pipeline

    class Recorded:
        description = {"text_encoder": "my prompts", "vae_encoder": "my images"}
        calls = []

        def prompts(self, n, seed, held_out):
            self.calls.append(("prompts", n, held_out))
            return SHAPES_WORLD.prompts(n, seed, held_out)

        def images(self, n, size, seed, held_out):
            self.calls.append(("images", n, held_out))
            return SHAPES_WORLD.images(n, size, seed, held_out)

    data = Recorded()
    m = convert_pipeline(tiny_sd1_dir, tmp_path / "b", weights="int8", fuse=False, export_dir=tiny_sd1_export,
                         calibration_samples=2, heldout_samples=1, heldout_per_band=1, data=data)
    assert data.calls == [("prompts", 2, False), ("images", 2, False), ("prompts", 2, True), ("images", 1, True)]
    cal = m["quantization"]["calibration"]
    assert cal["text_encoder"] == "my prompts" and cal["vae_encoder"] == "my images"


def test_interrupted_convert_leaves_no_bundle(tiny_sd1_dir, tiny_sd1_export, tmp_path, monkeypatch):
    from zo_edge.convert import convert_pipeline, pipeline

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "quantize_int8", interrupt)
    out = tmp_path / "bundle"
    with pytest.raises(KeyboardInterrupt):
        convert_pipeline(tiny_sd1_dir, out, weights="int8", export_dir=tiny_sd1_export, data=SHAPES_WORLD)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_timestep_feed_follows_graph():
    """One timestep_feed (zo_runtime.bundle) for the runtime and calibration alike."""
    from zo_runtime.bundle import timestep_feed
    f = timestep_feed([{"name": "sample", "dtype": "float32", "rank": 4},
                       {"name": "timestep", "dtype": "float32", "rank": 0}], 500, 3)
    assert f.shape == () and f.dtype == np.float32
    f = timestep_feed([{"name": "timestep", "dtype": "int64", "rank": 1}], 500, 3)
    assert f.shape == (3,) and f.dtype == np.int64 and (f == 500).all()
    f = timestep_feed([{"name": "sample", "dtype": "float32", "rank": 4}], 500, 3)  # undeclared: float scalar
    assert f.shape == () and f.dtype == np.float32


def test_external_data_path(tiny_sd1_dir, tiny_sd1_export, tmp_path, monkeypatch):
    """Graphs over the external-data threshold (2 GB for real; 1 MB here) are saved as
    model.onnx + model.onnx_data, listed in the manifest, and still run."""
    from zo_edge.convert import convert_pipeline, graphs
    monkeypatch.setattr(graphs, "EXTERNAL_DATA_THRESHOLD", 1_000_000)
    out = tmp_path / "ext"
    m = convert_pipeline(tiny_sd1_dir, out, weights="int8", fuse=True, export_dir=tiny_sd1_export,
                         calibration_samples=2, heldout_samples=1, heldout_per_band=1, data=SHAPES_WORLD)
    assert (out / "unet/model.onnx_data").is_file()
    assert m["graphs"]["unet"]["external_data"] == "unet/model.onnx_data"
    assert "unet/model.onnx_data" in m["files"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".data")]
    run_bundle(out, batch=1)
    assert m["accuracy"]["unet"]["cosine"] > 0.98


def test_weight_only_4bit_blocks_match_their_dequantized_weights(tmp_path):
    """quantize_weight_only(bits=4): int4 in blocks of 32 inputs along each weight's input axis (Conv 1,
    MatMul 0), exact against the dequantized weights; a weight whose input width is not a multiple of
    32 keeps int8 per channel."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from zo_edge.convert.quantize import quantize_weight_only

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((48, 64, 3, 3)).astype(np.float32)      # Conv, 64 inputs: 4-bit
    w2 = rng.standard_normal((48, 8, 3, 3)).astype(np.float32) * 0   # 8 inputs, all zero: int8 fallback
    w2[:, :, 1, 1] = rng.standard_normal((48, 8))
    w3 = rng.standard_normal((48, 96)).astype(np.float32)            # MatMul, K = 48: int8 fallback
    w4 = rng.standard_normal((96, 40)).astype(np.float32)            # MatMul, K = 96: 4-bit
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x8", "w2"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("MatMul", ["v", "w3"], ["c"]), helper.make_node("MatMul", ["c", "w4"], ["d"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 6, 6]),
                                       helper.make_tensor_value_info("x8", TensorProto.FLOAT, [1, 8, 6, 6]),
                                       helper.make_tensor_value_info("v", TensorProto.FLOAT, [3, 48])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in "abd"],
                          [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"), (w4, "w4"))])
    src = tmp_path / "src.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(src))
    rec = quantize_weight_only(src, tmp_path / "q.onnx", bits=4)
    assert (rec["weights_int4"], rec["weights_int8_per_channel"]) == (2, 2)
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert {o.version for o in q.opset_import if o.domain == ""} == {21} and q.ir_version >= 10
    # the dequantized weights, read back with onnxruntime itself
    dq = {n.output[0]: n for n in q.graph.node if n.op_type == "DequantizeLinear"}
    probe = helper.make_model(helper.make_graph(list(dq.values()), "p", [], [
        helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in dq], list(q.graph.initializer)),
        opset_imports=[helper.make_opsetid("", 21)])
    probe.ir_version = 10
    wd = dict(zip(dq, ort.InferenceSession(probe.SerializeToString()).run(None, {})))
    for name, w, block_axis in (("w1", w1, 1), ("w4", w4, 0)):
        d = wd[name + "_w4_dq"]
        blocks = np.moveaxis(w, block_axis, 0).reshape(w.shape[block_axis] // 32, 32, -1)
        err = np.abs(np.moveaxis(d, block_axis, 0).reshape(blocks.shape) - blocks).max(axis=1)
        assert np.all(err <= np.abs(blocks).max(axis=1) / 14 + 1e-6)   # half a step of max/7 per block
    for name, w in (("w2", w2), ("w3", w3)):
        d = wd[name + "_w8_dq"]
        assert np.abs(d - w).max() <= np.abs(w).max() / 254 + 1e-6
    feeds = {"x": rng.standard_normal((1, 64, 6, 6)).astype(np.float32),
             "x8": rng.standard_normal((1, 8, 6, 6)).astype(np.float32),
             "v": rng.standard_normal((3, 48)).astype(np.float32)}
    got = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, feeds)
    ref = ort.InferenceSession(str(src)).run(None, feeds)
    for a, b in zip(got, ref):
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.15


def _external_copy(src, dst):
    """``src`` saved again with every weight of 1 KB or more in ``model.onnx_data`` (as Optimum writes SD1.5)."""
    from zo_edge.convert.graphs import save_model
    save_model(onnx.load(str(src)), dst, external=True)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL
               for t in onnx.load(str(dst), load_external_data=False).graph.initializer)
    return dst


def _same_weights(a, b):
    ma, mb = onnx.load(str(a)), onnx.load(str(b))
    wa = {t.name: onnx.numpy_helper.to_array(t) for t in ma.graph.initializer}
    wb = {t.name: onnx.numpy_helper.to_array(t) for t in mb.graph.initializer}
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    assert [(n.op_type, list(n.input)) for n in ma.graph.node] == [(n.op_type, list(n.input)) for n in mb.graph.node]


def test_fusion_and_weight_only_keep_weights_on_disk(tiny_sd1_export, tmp_path):
    """Fusion and weight-only quantization read a graph's external weights one tensor at a time
    (graphs.load_lazy / tensor_array) and stream them into the new file: the result is the same graph
    with the same weights, bit for bit, as from the graph held in memory whole."""
    from zo_edge.convert.optimize import fuse_unet
    from zo_edge.convert.quantize import quantize_weight_only
    inline = tiny_sd1_export / "unet" / "model.onnx"
    ext = _external_copy(inline, tmp_path / "ext" / "model.onnx")
    counts_a = fuse_unet(inline, tmp_path / "fa" / "model.onnx", unpack=True)
    counts_b = fuse_unet(ext, tmp_path / "fb" / "model.onnx", unpack=True)
    assert counts_a == counts_b and counts_a["unpacked_self_attention"] > 0
    _same_weights(tmp_path / "fa" / "model.onnx", tmp_path / "fb" / "model.onnx")
    # a graph over 2 GB is saved by streaming its weights from file to file
    from zo_edge.convert.graphs import load_lazy, save_model
    files = save_model(load_lazy(ext), tmp_path / "streamed" / "model.onnx", external=True, base_dir=ext.parent)
    assert [f.name for f in files] == ["model.onnx", "model.onnx_data"]
    _same_weights(inline, files[0])
    from zo_edge.convert.graphs import copy_graph
    copy_graph(ext, tmp_path / "copied" / "model.onnx")  # streamed the same way
    assert (tmp_path / "copied" / "model.onnx_data").is_file()
    _same_weights(inline, tmp_path / "copied" / "model.onnx")
    for bits in (8, 4):
        qa = quantize_weight_only(tmp_path / "fa" / "model.onnx", tmp_path / f"qa{bits}" / "model.onnx", bits=bits)
        qb = quantize_weight_only(tmp_path / "fb" / "model.onnx", tmp_path / f"qb{bits}" / "model.onnx", bits=bits)
        assert qa == qb
        _same_weights(tmp_path / f"qa{bits}" / "model.onnx", tmp_path / f"qb{bits}" / "model.onnx")


def test_streamed_save_refuses_weights_outside_their_folder(tmp_path):
    """A graph whose external data points outside its folder (../) is refused, not followed."""
    from onnx import TensorProto, helper

    from zo_edge.convert.graphs import save_model
    (tmp_path / "secret").write_bytes(b"\0" * 4096)
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1024], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "../secret"), ("offset", "0"), ("length", "4096")):
        e = t.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1024])], [t])
    (tmp_path / "m").mkdir()
    with pytest.raises(ValueError, match="outside"):
        save_model(helper.make_model(g), tmp_path / "out" / "model.onnx", base_dir=tmp_path / "m")


def test_minmax_ranges_match_onnxruntimes_calibrator(tiny_sd1_export, tmp_path):
    """quantize_int8 calibrates with its weights on disk (quantize.minmax_ranges); the ranges are the
    ones onnxruntime's MinMaxCalibrater computes for quantize_static: same tensors, same values."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    from zo_edge.convert.calibrate import FeedsReader
    from zo_edge.convert.quantize import WEIGHT_OPS, minmax_ranges, preprocess
    src = tmp_path / "ext" / "model.onnx"
    _external_copy(tiny_sd1_export / "unet" / "model.onnx", src)
    pre = tmp_path / "pre" / "model.onnx"
    assert preprocess(src, pre) == "shapes-only"
    rng = np.random.default_rng(0)
    feeds = [{"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
              "timestep": np.array(t, np.float32),
              "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)} for t in (10, 500, 900)]
    ours = minmax_ranges(pre, feeds)
    cal = create_calibrator(pre, list(WEIGHT_OPS), augmented_model_path=str(tmp_path / "aug.onnx"),
                            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)
    cal.collect_data(FeedsReader(feeds))
    theirs = cal.compute_data().data
    assert set(ours) == set(theirs) and len(ours) > 10
    for k, (lo, hi) in ours.items():
        np.testing.assert_array_equal(lo, theirs[k].range_value[0], err_msg=k)
        np.testing.assert_array_equal(hi, theirs[k].range_value[1], err_msg=k)


def test_weight_only_graphs_over_the_threshold_map_their_weights(tiny_sd1_dir, tiny_sd1_export, tiny_bundle_int8w,
                                                                 tmp_path, monkeypatch):
    """A weight-only graph whose weights pass graphs.MAPPED_WEIGHTS_THRESHOLD is written with an external data
    file (onnxruntime maps it instead of copying it; the SD1.5-sized graphs are over it, the tiny ones here
    and the shipped models under it): the manifest lists and verifies the data files, and the graphs compute
    what the single-file bundle's do, bit for bit."""
    import numpy as np

    from zo_edge.convert import convert_pipeline, graphs
    from zo_edge.models.calibration import SHAPES_WORLD
    from zo_runtime.bundle import Bundle

    monkeypatch.setattr(graphs, "MAPPED_WEIGHTS_THRESHOLD", 0)
    out = tmp_path / "mapped"
    convert_pipeline(tiny_sd1_dir, out, weights="int8w", export_dir=tiny_sd1_export, data=SHAPES_WORLD)
    mapped, single = Bundle.load(out), Bundle.load(tiny_bundle_int8w)
    rng = np.random.default_rng(0)
    for g in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        entry = mapped.graph(g)
        assert entry["external_data"] == f"{g}/model.onnx_data" and entry["external_data"] in mapped.manifest["files"]
        # readable by whoever can read the graph (onnx's own writer makes the data file owner-only)
        assert (out / entry["external_data"]).stat().st_mode & 0o777 == (out / entry["path"]).stat().st_mode & 0o777
        assert "external_data" not in single.graph(g)
        sa, sb = mapped.session(g), single.session(g)
        feed = {}
        for i in sa.get_inputs():
            shape = [d if isinstance(d, int) else (77 if "sequence" in str(d) else 1) for d in i.shape]
            if i.type == "tensor(int64)":
                feed[i.name] = rng.integers(0, 100, shape).astype(np.int64)
            elif g == "unet" and i.name == "timestep":
                feed[i.name] = mapped.timestep_feed(500, 1)
            else:
                if g == "unet" and i.name == "sample":
                    shape = [1, mapped.latent_channels, 8, 8]
                elif g == "vae_encoder":
                    shape = [1, 3, 64, 64]
                elif g == "vae_decoder":
                    shape = [1, mapped.latent_channels, 8, 8]
                feed[i.name] = rng.standard_normal(shape).astype(np.float32)
        assert np.array_equal(sa.run(None, feed)[0], sb.run(None, feed)[0]), g
