"""zo-edge personalize end to end on a tiny converted bundle: runs, writes a loadable file,
reproduces bit for bit, resumes exactly, and refuses bad input with one line."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from zo_edge.cli.main import main as cli
from zo_edge.models import world
from zo_runtime.bundle import Bundle
from zo_runtime.embeddings import load_embeddings
from zo_runtime.errors import UserError
from zo_runtime.oracle import LossOracle
from zo_runtime.personalize import PersonalizeConfig, Trainer, resume


@pytest.fixture(scope="module")
def ref_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("refs")
    for i, im in enumerate(world.reference_images(world.Subject("star", "red", "striped"), n=3, size=24)):
        Image.fromarray(im).save(d / f"ref_{i}.png")
    return d


def make_cfg(bundle, images, tmp_path, **kw):
    base = dict(model=str(bundle), images=str(images), token="<zz-tok>", init="dog",
                out=str(tmp_path / "tok.safetensors"), run_dir=str(tmp_path / "run"), steps=12,
                checkpoint_every=4, recipe="zoodip", tau=4, nu=0.3, seed=3)
    base.update(kw)
    return PersonalizeConfig(**base)


def test_end_to_end_writes_loadable_embedding(tiny_bundle_int8, ref_images, tmp_path):
    res = Trainer(make_cfg(tiny_bundle_int8, ref_images, tmp_path)).train()
    emb = load_embeddings(res.out)
    dim = Bundle.load(tiny_bundle_int8).embedding_dim
    assert list(emb) == ["<zz-tok>"] and emb["<zz-tok>"].shape == (1, dim)
    np.testing.assert_array_equal(emb["<zz-tok>"], res.theta)
    lines = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 13))
    assert all(500 <= l["timestep"] < 900 for l in lines)
    assert lines[-1]["forward_passes"] == 12 * 3
    assert res.forward_passes == 36
    # SG switched on after τ = 4 tokens: some directions get projected out
    assert max(l["projected_dims"] for l in lines) > 0
    # θ moved away from the init word's row
    table = Bundle.load(tiny_bundle_int8).token_table
    assert not np.allclose(res.theta[0], table[1929])  # "dog</w>"


def test_preview_images(tiny_bundle_int8, ref_images, tmp_path):
    Trainer(make_cfg(tiny_bundle_int8, ref_images, tmp_path, steps=4, preview_every=2)).train()
    previews = sorted(p.name for p in (tmp_path / "run" / "previews").iterdir())
    assert previews == ["step_000002.png", "step_000004.png"]


def test_same_seed_same_embedding_bit_for_bit(tiny_bundle_int8, ref_images, tmp_path):
    a = Trainer(make_cfg(tiny_bundle_int8, ref_images, tmp_path / "a")).train().theta
    b = Trainer(make_cfg(tiny_bundle_int8, ref_images, tmp_path / "b")).train().theta
    c = Trainer(make_cfg(tiny_bundle_int8, ref_images, tmp_path / "c", seed=4)).train().theta
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


class Killed(Exception):
    pass


# every recipe and every lab piece with state of its own (SG, guided directions, schedules, Adam)
RECIPE_VARIANTS = [
    dict(recipe="zoodip"),
    dict(recipe="zo-edge"),
    dict(recipe="zo-edge", directions="guided", rank=3, antithetic=True, n=1),
    dict(recipe="zo-edge", directions="token-pca", rank=4, schedule="cosine", lr=2e-2),
    dict(recipe="zo-edge", directions="vocab-pca", rank=3),
    dict(recipe="zo-edge", directions="vocab-pca", rank=3, pca_alpha=0.5),
    dict(recipe="zo-edge", directions="token-pca", rank=3, subspace_steps=True, average=0.9),
    dict(recipe="zo-edge", directions="orthogonal", optimizer="sgd", lr=1.0),
    dict(recipe="zoodip", reference_scaling=True, adam_eps=1e-3, b1=0.8),
    dict(recipe="zo-edge", weight_decay=0.5, average=0.9),
    dict(recipe="zo-edge", directions="momentum", guided_beta=0.9, guided_alpha=0.3),
    dict(recipe="zo-edge", clip=1.5),
    dict(recipe="zo-edge", normalize=True, sg=True),
    dict(recipe="zo-edge", directions="sensitivity", rank=3, sketch=1, guided_alpha=0.2),
    dict(recipe="zo-edge", directions="sensitivity", rank=3, sketch=1, split=True, eigenbasis_steps=True),
    dict(recipe="zo-edge", directions="sensitivity", rank=4, n=2, sketch=1, axes=True),
    dict(recipe="zo-edge", directions="whitened", sketch=1, whiten_power=1.0, whiten_floor=0.5),
    dict(recipe="zo-edge", optimizer="sphere", lr=0.05),
]


@pytest.mark.parametrize("variant", RECIPE_VARIANTS, ids=lambda v: "+".join(f"{k}={x}" for k, x in v.items()))
def test_resume_after_kill_equals_uninterrupted(tiny_bundle_int8, ref_images, tmp_path, variant):
    full = Trainer(make_cfg(tiny_bundle_int8, ref_images, tmp_path / "full", num_vectors=2, **variant)).train().theta

    cfg = make_cfg(tiny_bundle_int8, ref_images, tmp_path / "cut", num_vectors=2, **variant)

    def kill(step, theta):
        if step == 10:  # after the checkpoint at step 8, before the one at 12
            raise Killed

    with pytest.raises(Killed):
        Trainer(cfg).train(callback=kill)
    assert not Path(cfg.out).exists()
    resumed = resume(cfg.run_dir).theta
    np.testing.assert_array_equal(resumed, full)
    steps = [json.loads(l)["step"] for l in (Path(cfg.run_dir) / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_resume_after_sigkill_of_cli_process(tiny_bundle_int8, ref_images, tmp_path):
    """A real kill -9 of the command mid-run, then --resume, matches an uninterrupted run."""
    args = ["--model", str(tiny_bundle_int8), "--images", str(ref_images), "--token", "<zz-tok>", "--init", "dog",
            "--steps", "60", "--checkpoint-every", "5", "--tau", "4", "--seed", "1"]
    ref = CliRunner().invoke(cli, ["personalize", *args, "--out", str(tmp_path / "ref.safetensors"),
                                   "--run-dir", str(tmp_path / "ref")])
    assert ref.exit_code == 0, ref.output
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "zo_edge.cli.main", "personalize", *args, "--out",
                             str(tmp_path / "k.safetensors"), "--run-dir", str(run_dir), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time
    deadline = time.time() + 120
    log = run_dir / "log.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 12:
            break
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    if (tmp_path / "k.safetensors").exists():
        pytest.skip("the run finished before it could be killed")
    res = CliRunner().invoke(cli, ["personalize", "--resume", str(run_dir)])
    assert res.exit_code == 0, res.output
    a = load_embeddings(tmp_path / "ref.safetensors")["<zz-tok>"]
    b = load_embeddings(tmp_path / "k.safetensors")["<zz-tok>"]
    np.testing.assert_array_equal(a, b)


def test_oracle_batched_equals_sequential(tiny_bundle_int8, ref_images):
    b = Bundle.load(tiny_bundle_int8)
    from zo_runtime.tokenizer import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(b.tokenizer_dir)
    ids, slots = tok.encode_prompt("a photo of a <x>", {"<x>": 1})
    rng = np.random.default_rng(0)
    thetas = rng.standard_normal((3, 1, b.embedding_dim)).astype(np.float32) * 0.02
    h = b.resolution // b.vae_scale_factor
    latent = rng.standard_normal((b.latent_channels, h, h)).astype(np.float32)
    noise = rng.standard_normal(latent.shape).astype(np.float32)
    on = LossOracle(b, "on").losses(thetas, ids, slots, latent, noise, 700)
    off = LossOracle(b, "off").losses(thetas, ids, slots, latent, noise, 700)
    assert on.shape == (3,)
    np.testing.assert_allclose(on, off, rtol=1e-5)
    assert len(set(on.round(12))) > 1  # θ changes the loss


def test_nan_loss_stops_with_checkpoint_intact(tiny_bundle_int8, ref_images, tmp_path, monkeypatch):
    cfg = make_cfg(tiny_bundle_int8, ref_images, tmp_path)
    trainer = Trainer(cfg)
    real = trainer.oracle.losses
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * np.nan if calls["n"] == 7 else out

    trainer.oracle.losses = flaky
    with pytest.raises(UserError, match="NaN|nan"):
        trainer.train()
    with np.load(Path(cfg.run_dir) / "checkpoint.npz") as z:
        assert int(z["step"]) == 4 and np.all(np.isfinite(z["theta"]))
    assert not Path(cfg.out).exists()


def cli_err(args):
    r = CliRunner().invoke(cli, ["personalize", *args])
    assert r.exit_code == 2
    msg = (r.output or "").strip().splitlines()
    return msg[-1] if msg else str(r.exception)


@pytest.fixture
def base_args(tiny_bundle_int8, ref_images, tmp_path):
    return ["--model", str(tiny_bundle_int8), "--images", str(ref_images), "--token", "<zz-tok>", "--init", "dog",
            "--out", str(tmp_path / "o.safetensors"), "--run-dir", str(tmp_path / "r"), "--steps", "2"]


def replace(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


@pytest.mark.parametrize("flag,value,needle", [
    ("--lr", "0", "learning rate"), ("--n", "0", "n >= 1"), ("--tau", "1", "tau"), ("--t-low", "900", "T_L"),
    ("--adam-eps", "-1", "eps"), ("--lr", "inf", "learning rate"), ("--b1", "1.0", "b1"),
    ("--rank", "-2", "--rank"),
    ("--guided-alpha", "0", "alpha"),
    ("--weight-decay", "-1", "weight decay"), ("--guided-beta", "1", "beta"), ("--average", "1.0", "averaging decay"),
    ("--clip", "-1", "clip"), ("--clip", "nan", "clip"),
    ("--token", "dog", "already a token"), ("--init", "zzzqqqxyzzy", "single token"),
])
def test_bad_flags_one_line(base_args, flag, value, needle):
    args = list(base_args)
    if flag in args:
        args = replace(args, flag, value)
    else:
        args += [flag, value]
    line = cli_err(args)
    assert line.startswith("zo-edge: error:") and needle in line


def test_bad_images(base_args, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images" in cli_err(replace(base_args, "--images", str(empty)))
    assert "does not exist" in cli_err(replace(base_args, "--images", str(tmp_path / "nope")))
    broken = tmp_path / "broken"
    broken.mkdir()
    good = np.zeros((32, 32, 3), np.uint8)
    Image.fromarray(good).save(broken / "a.png")
    data = (broken / "a.png").read_bytes()
    (broken / "b.png").write_bytes(data[: len(data) // 2])
    assert "cannot read image" in cli_err(replace(base_args, "--images", str(broken)))
    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(small / "s.png")
    assert "smaller than" in cli_err(replace(base_args, "--images", str(small)) + ["--no-upscale"])


def test_list_images_is_the_one_image_lister(tmp_path):
    """Reference images (personalize) and evaluation folders (zo_edge.eval.metrics) are listed by
    one function: image suffixes at the top level, sorted, dot-files (macOS ._x.jpg) left out."""
    from zo_edge.eval import metrics
    from zo_runtime.data import list_images

    assert metrics.list_images is list_images
    for name in ("b.JPG", "a.png", "._a.png", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.JPG"]
    with pytest.raises(UserError, match="references folder .* has no images"):
        list_images(tmp_path / "sub.png", "references")


def test_bad_bundle(base_args, tiny_bundle_int8, tmp_path):
    assert "zo-edge.json is missing" in cli_err(replace(base_args, "--model", str(tmp_path)))
    broken = tmp_path / "broken-bundle"
    shutil.copytree(tiny_bundle_int8, broken)
    with open(broken / "text_encoder" / "token_embedding.npy", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    assert "sha256" in cli_err(replace(base_args, "--model", str(broken)))


def test_existing_output_not_overwritten(base_args, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    assert "exists" in cli_err(base_args)
    assert out.read_bytes() == b"keep me"


RUNTIME_DEPENDENCIES = {"numpy", "onnxruntime", "PIL", "safetensors", "regex"}
OPTIONAL_PROVIDERS = {"onnxruntime_qnn"}   # zo-edge[qnn]: imported only when --provider qnn asks for it


def test_runtime_imports_no_torch():
    """zo_runtime is what an ORT application embeds: every module imports with the heavy packages
    (and the rest of zo-edge) made unimportable, and the evaluation harness is not in it."""
    code = ("import importlib, importlib.util, pkgutil, sys\n"
            "for name in ('torch', 'transformers', 'diffusers', 'optimum', 'onnx', 'zo_edge'):\n"
            "    sys.modules[name] = None  # any import of them fails\n"
            "import zo_runtime\n"
            "for m in pkgutil.walk_packages(zo_runtime.__path__, 'zo_runtime.'):\n"
            "    importlib.import_module(m.name)\n"
            "assert importlib.util.find_spec('zo_runtime.metrics') is None\n"
            "assert importlib.util.find_spec('zo_runtime.dreambooth') is None\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_runtime_imports_only_its_dependencies():
    """Every import statement in zo_runtime (lazy ones inside functions too) names the standard
    library, zo_runtime itself, or numpy / onnxruntime / pillow / safetensors / regex."""
    import ast

    import zo_runtime
    root = Path(zo_runtime.__file__).parent
    found = {}
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for n in names:
                found.setdefault(n.split(".")[0], set()).add(path.relative_to(root).as_posix())
    other = {n: sorted(f) for n, f in found.items()
             if n not in sys.stdlib_module_names and n not in RUNTIME_DEPENDENCIES | OPTIONAL_PROVIDERS
             and n != "zo_runtime"}
    assert not other, other
    assert found.get("onnxruntime_qnn", set()) <= {"providers.py"}
    assert not (root / "metrics.py").exists() and not (root / "dreambooth.py").exists()


def test_sg_history_wider_than_token_warns(tiny_bundle_int8, ref_images, tmp_path, capsys):
    """SG with tau >= d drops most of the space (README, shapes model); say so, and name the scaled tau."""
    from zo_runtime.recipe import sg_tau_for

    dim = Bundle.load(tiny_bundle_int8).embedding_dim
    Trainer(make_cfg(tiny_bundle_int8, ref_images, tmp_path, steps=1, tau=dim))  # zoodip: SG on
    assert f"--tau {sg_tau_for(dim)}" in capsys.readouterr().err
    Trainer(make_cfg(tiny_bundle_int8, ref_images, tmp_path, steps=1, tau=dim - 1, overwrite=True))
    assert "SG keeps" not in capsys.readouterr().err
    assert sg_tau_for(768) == 128 and sg_tau_for(64) == 11 and sg_tau_for(4) == 2


def test_recipes_resolve_and_record(tiny_bundle_int8, ref_images, tmp_path):
    """A field left at None takes the recipe's value; one given overrides it; the run's config.json
    records every resolved value, so a later change of a recipe's defaults cannot change a resume."""
    from zo_runtime.recipe import RECIPES

    cfg = make_cfg(tiny_bundle_int8, ref_images, tmp_path, recipe="zoodip", tau=None, nu=None, steps=2)
    r = cfg.resolved()
    assert (r.sg, r.tau, r.nu, r.n, r.mu, r.lr, r.puts) == (True, 128, 1e-3, 2, 1e-3, 5e-3, True)
    assert make_cfg(tiny_bundle_int8, ref_images, tmp_path, recipe="zoodip", lr=0.1).resolved().lr == 0.1
    Trainer(cfg).train()
    saved = json.loads((Path(cfg.run_dir) / "config.json").read_text())
    assert all(saved[k] == RECIPES["zoodip"][k] for k in RECIPES["zoodip"])
    assert PersonalizeConfig(model="m", images="i", token="<t>", init="x", out="o").recipe == "zo-edge"


@pytest.mark.parametrize("flag,value", [("--recipe", "adamw"), ("--directions", "spiral"), ("--optimizer", "lion"),
                                        ("--schedule", "linear")])
def test_unknown_choices_refused_with_exit_2(base_args, flag, value):
    r = CliRunner().invoke(cli, ["personalize", *base_args, flag, value])
    assert r.exit_code == 2 and flag in r.output and value in r.output


def test_sphere_keeps_the_token_norm_and_refuses_what_it_cannot_run(tiny_bundle_int8, ref_images, tmp_path, base_args):
    """--optimizer sphere: the learned token keeps the init word's norm and has turned; an angle above 1 rad a
    step, or the step rule in a subspace's coordinates, is one line before the run."""
    res = Trainer(make_cfg(tiny_bundle_int8, ref_images, tmp_path, recipe="zo-edge", optimizer="sphere", lr=0.05,
                           steps=6)).train()
    init = Bundle.load(tiny_bundle_int8).token_table[1929]   # "dog</w>"
    assert np.linalg.norm(res.theta[0]) == pytest.approx(np.linalg.norm(init), rel=1e-5)
    assert not np.allclose(res.theta[0], init)
    assert "angle" in cli_err(base_args + ["--optimizer", "sphere", "--lr", "2"])
    assert "scale" in cli_err(base_args + ["--optimizer", "sphere", "--sphere-scale", "0"])
    assert "--subspace-steps" in cli_err(base_args + ["--optimizer", "sphere", "--directions", "vocab-pca",
                                                      "--subspace-steps"])


def test_rank_larger_than_the_token_is_refused(base_args):
    line = cli_err(base_args + ["--directions", "token-pca", "--rank", "100000"])
    assert line.startswith("zo-edge: error:") and "--rank" in line


def with_vocabulary(bundle: Path, dest: Path, ids) -> Path:
    """A copy of ``bundle`` whose manifest declares ``ids`` as the rows its model was trained on."""
    shutil.copytree(bundle, dest)
    m = json.loads((dest / "zo-edge.json").read_text())
    m["token_embedding"]["vocabulary_ids"] = ids
    (dest / "zo-edge.json").write_text(json.dumps(m))
    return dest


def test_vocab_pca_moves_the_token_only_within_its_vocabulary_subspace(tiny_bundle_int8, ref_images, tmp_path):
    """vocab-pca probes only along the top principal directions of the declared vocabulary rows, so
    every estimate lies in their span, and with ZO-SGD so does θ − θ₀ (not in token-pca's span of the
    whole table). ZO-Adam's per-coordinate scaling takes its steps out of the span."""
    from zo_runtime import optim
    ids = list(range(1000, 1040))
    bundle = with_vocabulary(tiny_bundle_int8, tmp_path / "b", ids)
    res = Trainer(make_cfg(bundle, ref_images, tmp_path, recipe="zo-edge", directions="vocab-pca", rank=4,
                           optimizer="sgd", lr=1.0, steps=6)).train()
    table = Bundle.load(bundle).token_table
    basis = optim.token_pca_basis(table, 4, rows=ids)
    move = (res.theta[0] - table[1929]).astype(np.float64)  # init "dog</w>"
    assert np.linalg.norm(move) > 0
    assert np.linalg.norm(move - basis.T @ (basis @ move)) < 1e-4 * np.linalg.norm(move)
    whole = optim.token_pca_basis(table, 4)
    assert np.linalg.norm(move - whole.T @ (whole @ move)) > 0.5 * np.linalg.norm(move)


def test_subspace_steps_keep_an_adam_token_in_the_span(tiny_bundle_int8, ref_images, tmp_path):
    from zo_runtime import optim
    ids = list(range(1000, 1040))
    bundle = with_vocabulary(tiny_bundle_int8, tmp_path / "b", ids)
    res = Trainer(make_cfg(bundle, ref_images, tmp_path, recipe="zo-edge", directions="vocab-pca", rank=4,
                           subspace_steps=True, steps=6)).train()
    table = Bundle.load(bundle).token_table
    basis = optim.token_pca_basis(table, 4, rows=ids)
    move = (res.theta[0] - table[1929]).astype(np.float64)
    assert np.linalg.norm(move) > 0
    assert np.linalg.norm(move - basis.T @ (basis @ move)) < 1e-4 * np.linalg.norm(move)


def test_subspace_steps_without_a_subspace_are_refused(base_args):
    line = cli_err(base_args + ["--subspace-steps"])
    assert line.startswith("zo-edge: error:") and "--subspace-steps needs --directions" in line


def test_pca_alpha_out_of_range_or_with_subspace_steps_is_refused(base_args):
    for extra, words in ((["--pca-alpha", "1.0"], "alpha must be in [0, 1)"),
                         (["--pca-alpha", "-0.1"], "alpha must be in [0, 1)"),
                         (["--directions", "vocab-pca", "--subspace-steps", "--pca-alpha", "0.5"], "choose one")):
        line = cli_err(base_args + extra)
        assert line.startswith("zo-edge: error:") and words in line, line


def test_vocab_pca_rank_above_the_vocabulary_is_refused(tiny_bundle_int8, ref_images, tmp_path):
    bundle = with_vocabulary(tiny_bundle_int8, tmp_path / "b", [5, 6, 7, 8, 9])
    args = ["--model", str(bundle), "--images", str(ref_images), "--token", "<zz-tok>", "--init", "dog",
            "--out", str(tmp_path / "o.safetensors"), "--run-dir", str(tmp_path / "r"), "--steps", "2"]
    line = cli_err(args + ["--directions", "vocab-pca", "--rank", "5"])
    assert line.startswith("zo-edge: error:") and "--rank" in line and "5 rows analysed" in line
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("ids", [[3], [1, 1, 2], [0, 10 ** 9], "all", [1.5, 2]])
def test_bad_vocabulary_in_a_manifest_gives_one_line(tiny_bundle_int8, tmp_path, ids):
    bundle = with_vocabulary(tiny_bundle_int8, tmp_path / "b", ids)
    with pytest.raises(UserError, match="vocabulary_ids"):
        Bundle.load(bundle).vocabulary_ids


def test_averaging_recipe_writes_the_average_of_its_iterates(tiny_bundle_int8, ref_images, tmp_path):
    """With --average the written token is the iterates' moving average (what the callback saw last),
    not the last iterate, which the checkpoint keeps to go on from."""
    seen = {}
    cfg = make_cfg(tiny_bundle_int8, ref_images, tmp_path, recipe="zo-edge", average=0.5, lr=0.1)
    res = Trainer(cfg).train(callback=lambda step, theta: seen.update(last=np.array(theta)))
    written = load_embeddings(res.out)["<zz-tok>"]
    with np.load(Path(cfg.run_dir) / "checkpoint.npz") as z:
        last_iterate = z["theta"]
    np.testing.assert_array_equal(written, seen["last"])
    np.testing.assert_array_equal(res.theta, written)
    assert not np.allclose(written, last_iterate)


def test_low_memory_turns_the_arena_off_and_changes_no_arithmetic(tiny_bundle_int8, ref_images, tmp_path):
    assert Bundle.load(tiny_bundle_int8, low_memory=True).session_options("unet").enable_cpu_mem_arena is False
    assert Bundle.load(tiny_bundle_int8).session_options("unet").enable_cpu_mem_arena is True
    plain = Trainer(make_cfg(tiny_bundle_int8, ref_images, tmp_path / "a", steps=4)).train()
    low = Trainer(make_cfg(tiny_bundle_int8, ref_images, tmp_path / "b", steps=4, low_memory=True)).train()
    assert np.array_equal(load_embeddings(plain.out)["<zz-tok>"], load_embeddings(low.out)["<zz-tok>"])
    # a run setting, not part of the run: --resume may turn it on
    r = CliRunner().invoke(cli, ["personalize", "--resume", str(tmp_path / "a" / "run"), "--steps", "6",
                                 "--low-memory", "--out", str(tmp_path / "longer.safetensors")])
    assert r.exit_code == 0, r.output


def test_sensitivity_flags_are_validated_up_front(base_args, tmp_path):
    for extra, words in ((["--directions", "sensitivity", "--sketch", "0"], "--sketch must be >= 1"),
                         (["--split"], "--split needs --directions sensitivity"),
                         (["--eigenbasis-steps"], "--eigenbasis-steps needs --directions sensitivity"),
                         (["--directions", "sensitivity", "--split", "--n", "1"], "--split needs n >= 2"),
                         (["--axes"], "--axes needs --directions sensitivity"),
                         (["--directions", "whitened", "--whiten-power", "0"], "power > 0"),
                         (["--directions", "whitened", "--whiten-floor", "-1"], "floor > 0"),
                         (["--directions", "sensitivity", "--axes", "--rank", "2", "--n", "3"], "n <= rank"),
                         (["--directions", "sensitivity", "--axes", "--split"], "split or axes, not both"),
                         (["--directions", "sensitivity", "--guided-alpha", "0"], "alpha <= 1"),
                         (["--directions", "sensitivity", "--rank", "100000"], "--rank for sensitivity")):
        line = cli_err(base_args + extra)
        assert line.startswith("zo-edge: error:") and words in line, (extra, line)


def test_sensitivity_sketch_passes_are_counted_and_its_basis_is_the_jacobians(tiny_bundle_int8, ref_images, tmp_path):
    """The sketch spends sketch × (V·d + 1) passes before the first step; its basis is orthonormal and
    the probes it guides put most of their energy in its leading rows."""
    cfg = make_cfg(tiny_bundle_int8, ref_images, tmp_path, recipe="zo-edge", directions="sensitivity", rank=2,
                   sketch=1, guided_alpha=0.2, steps=3)
    trainer = Trainer(cfg)
    size = trainer.bundle.embedding_dim
    res = trainer.train()
    assert res.forward_passes == (size + 1) + 3 * 3
    ckpt = np.load(Path(cfg.run_dir) / "checkpoint.npz")
    basis = next(ckpt[k] for k in ckpt.files if k.endswith("basis")).astype(np.float64)
    np.testing.assert_allclose(basis @ basis.T, np.eye(size), atol=1e-4)
