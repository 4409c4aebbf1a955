"""Hostile input and faults (issue 13): every case ends in exit status 2 and exactly one
``zo-edge: error:`` line, or is handled correctly; no file outside its place is touched (a
sentinel folder beside every case is hashed before and after); earlier outputs and checkpoints stay
as they were.

The fixtures are built here: a private copy of the shipped shapes bundle (tampered per case),
reference renders of the shapes world, crafted PNG bombs, 16-bit and float images, damaged
safetensors files (and headers fuzzed with hypothesis), a filled disk (RLIMIT_FSIZE in a subprocess)
and concurrent writers.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from zo_edge.cli.main import main as cli
from zo_edge.models import SHAPES_BUNDLE, world
from zo_runtime.errors import UserError

TOKEN = "<hz-tok>"


# -- fixtures and helpers ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A private copy of the shipped bundle: cases hard-link its big files, never the repository's."""
    dst = tmp_path_factory.mktemp("pristine") / "bundle"
    shutil.copytree(SHAPES_BUNDLE, dst)
    return dst


@pytest.fixture
def bundle(pristine, tmp_path):
    """A bundle for one case: the manifest copied, the other files hard-linked (every tamper below
    replaces a file, never writes into one)."""
    dst = tmp_path / "bundle"
    shutil.copytree(pristine, dst, copy_function=os.link)
    replace_file(dst / "zo-edge.json", (pristine / "zo-edge.json").read_bytes())
    return dst


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    d = tmp_path_factory.mktemp("refs")
    for i, im in enumerate(world.reference_images(world.Subject("star", "red", "striped"), n=3, size=32)):
        Image.fromarray(im).save(d / f"ref_{i}.png")
    return d


@pytest.fixture(autouse=True)
def sentinel(tmp_path, pristine):
    """Files outside every case's intended place; hashed before and after the case."""
    s = tmp_path / "sentinel"
    (s / "sub").mkdir(parents=True)
    (s / "victim.bin").write_bytes(b"do not touch\n")
    (s / "sub" / "x").write_bytes(b"x")
    os.link(pristine / "unet" / "model.onnx", s / "victim.onnx")
    before = tree_digest(s)
    yield s
    assert tree_digest(s) == before, "a file outside the intended place was touched"


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
            h.update(oct(p.stat().st_mode).encode())
    return h.hexdigest()


def replace_file(path: Path, data: bytes) -> None:
    """New contents at ``path`` without writing into a hard-linked file."""
    if path.exists() or path.is_symlink():
        path.unlink()
    path.write_bytes(data)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(b: Path) -> dict:
    return json.loads((b / "zo-edge.json").read_text())


def write_manifest(b: Path, m) -> None:
    replace_file(b / "zo-edge.json", json.dumps(m).encode())


def edit(b: Path, fn) -> None:
    m = manifest(b)
    fn(m)
    write_manifest(b, m)


def relist(b: Path, rel: str) -> None:
    """Record the file's current sha256 and size in the manifest (a consistent, hostile bundle)."""
    p = b / rel
    edit(b, lambda m: m["files"].__setitem__(rel, {"sha256": sha(p), "bytes": p.stat().st_size}))


def run(args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


NOISE = ("warning:", "zo-edge: warning:", "personalize |", "denoise |", "references:")


def one_error(r, *needles) -> str:
    """Exit status 2 and exactly one ``zo-edge: error:`` line (warnings and progress aside)."""
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith(NOISE)]
    assert len(lines) == 1 and lines[0].startswith("zo-edge: error: "), r.stderr
    assert "Traceback" not in r.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def ok(r):
    assert r.exit_code == 0, (r.output, r.exception)
    return r


def info_args(b, tmp):
    return ["info", b, "--verify"]


def generate_args(b, tmp):
    return ["generate", "--model", b, "a red star", "--out", tmp / "g.png", "--steps", "1"]


def personalize_args(b, tmp, refs):
    return ["personalize", "--model", b, "--images", refs, "--token", TOKEN, "--init", "star",
            "--out", tmp / "p.safetensors", "--run-dir", tmp / "run", "--steps", "2"]


# -- 1. manifests: paths stay inside the bundle, every file listed and verified -----------------------------

def _unet_path(value):
    return lambda b, s: edit(b, lambda m: m["graphs"]["unet"].__setitem__("path", value))


def _list_outside(b, s):
    edit(b, lambda m: m["files"].__setitem__("../sentinel/victim.onnx", m["files"]["unet/model.onnx"]))


def _unet_outside_listed(b, s):
    _list_outside(b, s)
    _unet_path("../sentinel/victim.onnx")(b, s)


def _unet_symlink(b, s):
    (b / "unet" / "model.onnx").unlink()
    (b / "unet" / "model.onnx").symlink_to(s / "victim.onnx")


def _tokenizer_symlink(b, s):
    shutil.copytree(b / "tokenizer", s.parent / "tok-outside")
    shutil.rmtree(b / "tokenizer")
    (b / "tokenizer").symlink_to(s.parent / "tok-outside")


def _unlisted_graph(b, s):
    shutil.copyfile(b / "unet" / "model.onnx", b / "unet" / "other.onnx")
    _unet_path("unet/other.onnx")(b, s)


def _unlisted_tokenizer_file(b, s):
    (b / "tokenizer" / "added_tokens.json").write_text('{"<hz>": 49408}')


def _set(key, value):
    return lambda b, s: edit(b, lambda m: m.__setitem__(key, value))


def _drop(key):
    return lambda b, s: edit(b, lambda m: m.pop(key))


def _raw_manifest(data: bytes):
    return lambda b, s: replace_file(b / "zo-edge.json", data)


def _file_meta(rel, meta):
    return lambda b, s: edit(b, lambda m: m["files"].__setitem__(rel, meta))


def _tamper_bytes(rel):
    def f(b, s):
        data = bytearray((b / rel).read_bytes())
        data[len(data) // 2] ^= 0xFF
        replace_file(b / rel, bytes(data))
    return f


def _truncate(rel):
    return lambda b, s: replace_file(b / rel, (b / rel).read_bytes()[:-100])


def _remove(rel):
    return lambda b, s: (b / rel).unlink()


def _manifest_dir(b, s):
    (b / "zo-edge.json").unlink()
    (b / "zo-edge.json").mkdir()


def _graph_field(graph, key, value):
    return lambda b, s: edit(b, lambda m: m["graphs"][graph].__setitem__(key, value))


LOAD_CASES = {  # name: (tamper(bundle, sentinel), words of the error line)
    "unet-absolute": (_unet_path("/etc/passwd"), "outside the bundle"),
    "unet-dotdot": (_unet_path("../sentinel/victim.onnx"), "outside the bundle"),
    "unet-inner-dotdot": (_unet_path("unet/../../sentinel/victim.onnx"), "outside the bundle"),
    "unet-dotdot-listed": (_unet_outside_listed, "outside the bundle"),
    "unet-symlink-out": (_unet_symlink, "symbolic link"),
    "unet-unlisted": (_unlisted_graph, "not listed"),
    "unet-path-number": (_unet_path(7), "not a relative path"),
    "unet-path-empty": (_unet_path(""), "not a relative path"),
    "unet-path-backslash": (_unet_path("..\\..\\sentinel\\victim.onnx"), "not a relative path"),
    "unet-path-drive": (_unet_path("C:/x/model.onnx"), "outside the bundle"),
    "unet-path-nul": (_unet_path("unet/model.onnx\x00.txt"), "not a relative path"),
    "external-data-out": (_graph_field("unet", "external_data", "../sentinel/victim.bin"), "outside the bundle"),
    "files-entry-out": (_list_outside, "outside the bundle"),
    "files-entry-absolute": (_file_meta("/etc/hostname", {"sha256": "0" * 64, "bytes": 1}), "outside the bundle"),
    "token-table-absolute": (lambda b, s: edit(b, lambda m: m["token_embedding"].__setitem__("path", "/etc/passwd")),
                             "outside the bundle"),
    "token-table-dotdot": (lambda b, s: edit(b, lambda m: m["token_embedding"].__setitem__("path", "../../x")),
                           "outside the bundle"),
    "token-table-missing-key": (_drop("token_embedding"), "token_embedding"),
    "scheduler-dotdot": (_set("scheduler_config", "../sentinel/victim.bin"), "outside the bundle"),
    "scheduler-unlisted": (_set("scheduler_config", "zo-edge.json"), "not listed"),
    "tokenizer-dotdot": (_set("tokenizer", "../sentinel"), "outside the bundle"),
    "tokenizer-symlink-out": (_tokenizer_symlink, "symbolic link"),
    "tokenizer-unlisted-file": (_unlisted_tokenizer_file, "not listed"),
    "no-files-key": (_drop("files"), "lists no files"),
    "files-empty": (_set("files", {}), "lists no files"),
    "files-list": (_set("files", ["unet/model.onnx"]), "lists no files"),
    "files-bad-sha": (_file_meta("unet/model.onnx", {"sha256": "xyz", "bytes": 1}), "sha256"),
    "files-meta-string": (_file_meta("unet/model.onnx", "abc"), "sha256"),
    "files-negative-bytes": (lambda b, s: edit(b, lambda m: m["files"]["unet/model.onnx"].__setitem__("bytes", -1)),
                             "invalid size"),
    "version-newer": (_set("format_version", 2), "upgrade"),
    "version-string": (_set("format_version", "1"), "format_version"),
    "version-bool": (_set("format_version", True), "format_version"),
    "version-missing": (_drop("format_version"), "format_version"),
    "format-wrong": (_set("format", "zo-edge-metrics"), "format"),
    "not-json": (_raw_manifest(b"{not json"), "not valid JSON"),
    "bad-utf8": (_raw_manifest(b'{"format": "\xff\xfe"}'), "not valid JSON"),
    "json-list": (_raw_manifest(b"[1, 2]"), "not a"),
    "json-empty": (_raw_manifest(b""), "not valid JSON"),
    "manifest-is-dir": (_manifest_dir, "zo-edge.json is missing"),
    "manifest-missing": (lambda b, s: (b / "zo-edge.json").unlink(), "zo-edge.json is missing"),
    "dim-string": (_set("embedding_dim", "64"), "embedding_dim"),
    "resolution-negative": (_set("resolution", -32), "resolution"),
    "resolution-missing": (_drop("resolution"), "resolution"),
    "scaling-string": (_set("vae_scaling_factor", "x"), "vae_scaling_factor"),
    "schedule-missing": (_drop("noise_schedule"), "noise_schedule"),
    "graphs-list": (_set("graphs", []), "graphs"),
    "graph-string": (lambda b, s: edit(b, lambda m: m["graphs"].__setitem__("unet", "unet/model.onnx")), "graphs"),
    "graph-no-inputs": (lambda b, s: edit(b, lambda m: m["graphs"]["unet"].pop("inputs")), "inputs"),
    "file-tampered": (_tamper_bytes("unet/model.onnx"), "sha256"),
    "file-truncated": (_truncate("text_encoder/token_embedding.npy"), "bytes"),
    "file-missing": (_remove("vae_decoder/model.onnx"), "missing"),
}


@pytest.mark.parametrize("command", ["info", "generate", "personalize"])
@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_tampered_bundle_refused(case, command, bundle, sentinel, refs, tmp_path):
    tamper, needle = LOAD_CASES[case]
    tamper(bundle, sentinel)
    args = personalize_args(bundle, tmp_path, refs) if command == "personalize" else \
        {"info": info_args, "generate": generate_args}[command](bundle, tmp_path)
    one_error(run(args), needle)
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "p.safetensors").exists()


def _listed_garbage(rel, data=b"\x00garbage" * 64):
    def f(b, s):
        replace_file(b / rel, data)
        relist(b, rel)
    return f


def _npy(array):
    def f(b, s):
        rel = "text_encoder/token_embedding.npy"
        (b / rel).unlink()
        np.save(b / rel, array)
        relist(b, rel)
    return f


RUNTIME_CASES = {  # consistent manifests (info --verify passes) whose files are unusable
    "unet-garbage": (_listed_garbage("unet/model.onnx"), "onnxruntime cannot load", ("generate", "personalize")),
    "text-encoder-garbage": (_listed_garbage("text_encoder/model.onnx"), "onnxruntime cannot load",
                             ("generate", "personalize")),
    "vae-encoder-garbage": (_listed_garbage("vae_encoder/model.onnx"), "onnxruntime cannot load", ("personalize",)),
    "token-table-garbage": (_listed_garbage("text_encoder/token_embedding.npy"), "token table",
                            ("generate", "personalize")),
    "token-table-shape": (_npy(np.zeros((10, 3), np.float32)), "token table", ("generate", "personalize")),
    "token-table-ints": (_npy(np.zeros((49408, 64), np.int8)), "token table", ("generate", "personalize")),
    "scheduler-not-json": (_listed_garbage("scheduler/scheduler_config.json"), "scheduler config", ("generate",)),
    "scheduler-list": (_listed_garbage("scheduler/scheduler_config.json", b"[1]"), "JSON object", ("generate",)),
    "vocab-not-json": (_listed_garbage("tokenizer/vocab.json"), "tokenizer", ("generate", "personalize")),
}


@pytest.mark.parametrize("command", ["info", "generate", "personalize"])
@pytest.mark.parametrize("case", sorted(RUNTIME_CASES))
def test_unusable_listed_file(case, command, bundle, sentinel, refs, tmp_path):
    tamper, needle, fails = RUNTIME_CASES[case]
    tamper(bundle, sentinel)
    if command == "info":
        ok(run(info_args(bundle, tmp_path)))          # consistent: verified, and said so
        return
    args = personalize_args(bundle, tmp_path, refs) if command == "personalize" else generate_args(bundle, tmp_path)
    r = run(args)
    if command in fails:
        one_error(r, needle)
        assert not (tmp_path / "g.png").exists() and not (tmp_path / "p.safetensors").exists()
    else:
        ok(r)


def test_info_survives_odd_fields(bundle):
    """`info` only prints: fields of the wrong type read as unknown, not as a crash."""
    edit(bundle, lambda m: m.update(source=5, accuracy=[1, 2], quantization="x", noise_schedule={
        "num_train_timesteps": 1000}))
    assert "family" in ok(run(["info", bundle])).output


def test_symlinked_bundle_root_is_fine(bundle, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(bundle)
    assert "verified 10 files" in ok(run(["info", link, "--verify"])).output


def test_info_without_onnx_and_shapes_words():
    """A runtime-only install has no onnx: `zo-edge info shapes` still describes the embedded model."""
    code = ("import sys; sys.modules['onnx'] = None\n"
            "from zo_edge.cli.main import main\n"
            "main(['info', 'shapes', '--verify'])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "verified 10 files" in p.stdout and "backgrounds grey, sand, sky, grass, night" in p.stdout


@pytest.mark.parametrize("target", ["missing", "file"])
def test_info_not_a_bundle(tmp_path, target):
    path = tmp_path / "x"
    if target == "file":
        path.write_text("x")
    one_error(run(["info", path]), "x")
