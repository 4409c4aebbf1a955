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
    "version-zero": (_set("format_version", 0), "format_version"),
    "family-missing": (_drop("family"), "family"),
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


# -- 2. personalize: every flag checked before any work ---------------------------------------------------

def _out(name):
    return lambda tmp: ["--out", tmp / name]


PERSONALIZE_FLAGS = [  # (flag, value, words of the error line)
    ("--lr", "0", "learning rate"), ("--lr", "-1", "learning rate"), ("--lr", "inf", "learning rate"), ("--lr", "nan", "learning rate"),
    ("--lr", "-inf", "learning rate"), ("--lr", "1e38", "--lr"), ("--lr", "2", "--lr"), ("--adam-eps", "-1", "Adam eps"), ("--adam-eps", "0", "Adam eps"),
    ("--adam-eps", "nan", "Adam eps"), ("--adam-eps", "inf", "Adam eps"), ("--mu", "0", "mu"),
    ("--mu", "nan", "mu"), ("--mu", "inf", "mu"), ("--nu", "0", "nu"), ("--nu", "1", "nu"),
    ("--nu", "nan", "nu"), ("--steps", "0", "--steps"), ("--steps", "-5", "--steps"),
    ("--num-vectors", "0", "--num-vectors"), ("--num-vectors", "76", "77 tokens"),
    ("--num-vectors", "100", "77 tokens"), ("--num-vectors", "74", "does not fit"), ("--seed", "-1", "--seed"),
    ("--t-high", "1001", "--t-high 1001"), ("--t-high", "5000", "training timesteps"), ("--t-low", "-1", "T_L"),
    ("--t-low", "900", "T_L"), ("--resolution", "0", "--resolution"), ("--resolution", "-32", "--resolution"),
    ("--resolution", "12", "--resolution"), ("--resolution", "100000", "--resolution"), ("--tau", "1", "tau"),
    ("--n", "0", "n >= 1"), ("--checkpoint-every", "0", "--checkpoint-every"),
    ("--preview-every", "-1", "--preview-every"), ("--threads", "-1", "--threads"),
    ("--max-image-pixels", "0", "--max-image-pixels"), ("--provider", "nope", "not available"),
    ("--batch-candidates", "sometimes", "Invalid value"), ("--steps", "abc", "not a valid integer"),
    ("--lr", "abc", "not a valid float"), ("--bogus", "1", "No such option"), ("--token", "dog", "already a token"),
    ("--token", "<|endoftext|>", "already a token"), ("--init", "zzzqqqxyzzy", "single token"),
    ("--init", "a red", "single token"),
]


@pytest.mark.parametrize("flag,value,needle", PERSONALIZE_FLAGS, ids=[f"{f}={v}" for f, v, _ in PERSONALIZE_FLAGS])
def test_personalize_bad_flag(flag, value, needle, pristine, refs, tmp_path):
    args = personalize_args(pristine, tmp_path, refs)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    one_error(run(args), needle)
    assert not (tmp_path / "p.safetensors").exists() and not (tmp_path / "run").exists()


def _file(tmp, name="afile"):
    (tmp / name).write_text("x")
    return tmp / name


PERSONALIZE_PATHS = {  # name: (args to set, given tmp_path; words of the error line)
    "out-txt": (lambda t: ["--out", t / "x.txt"], "must end in .safetensors"),
    "out-pickle": (lambda t: ["--out", t / "x.bin"], "must end in .safetensors"),
    "out-no-suffix": (lambda t: ["--out", t / "x"], "must end in .safetensors"),
    "out-is-folder": (lambda t: (t / "d.safetensors").mkdir() or ["--out", t / "d.safetensors"], "is a folder"),
    "out-under-file": (lambda t: ["--out", _file(t) / "x.safetensors"], "cannot write"),
    "out-in-proc": (lambda t: ["--out", "/proc/zo-edge-hostile/x.safetensors"], "cannot write"),
    "out-exists": (lambda t: _file(t, "p.safetensors") and ["--out", t / "p.safetensors"], "exists"),
    "run-dir-is-file": (lambda t: ["--run-dir", _file(t)], "not a folder"),
    "images-missing": (lambda t: ["--images", t / "nope"], "does not exist"),
    "images-empty": (lambda t: (t / "empty").mkdir() or ["--images", t / "empty"], "no images"),
    "images-is-file": (lambda t: ["--images", _file(t)], "does not exist"),
    "captions-missing": (lambda t: ["--captions", t / "nope.txt"], "captions file"),
    "model-missing": (lambda t: ["--model", t / "nope"], "does not exist"),
    "model-is-file": (lambda t: ["--model", _file(t)], "not a folder"),
}

RESUME_ARGS = {  # the whole command line, given tmp_path
    "resume-missing": (lambda t: ["--resume", t / "nope"], "does not exist"),
    "resume-a-file": (lambda t: ["--resume", _file(t)], "does not exist"),
    "resume-empty-dir": (lambda t: (t / "e").mkdir() or ["--resume", t / "e"], "not a personalize run"),
    "resume-with-lr": (lambda t: ["--resume", t / "nope", "--lr", "1"], "--lr cannot change on --resume"),
    "resume-with-token": (lambda t: ["--resume", t / "nope", "--token", "<x>"], "--token cannot change"),
    "resume-with-model": (lambda t: ["--resume", t / "nope", "--model", "shapes"], "--model cannot change"),
}


@pytest.mark.parametrize("case", sorted(RESUME_ARGS))
def test_resume_bad_args(case, tmp_path):
    make, needle = RESUME_ARGS[case]
    one_error(run(["personalize", *make(tmp_path)]), needle)


def _set_args(args, extra):
    args = list(args)
    for i in range(0, len(extra), 2):
        if extra[i] in args and extra[i] != "--resume":
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i:i + 2]
    return args


@pytest.mark.parametrize("case", sorted(PERSONALIZE_PATHS))
def test_personalize_bad_path(case, pristine, refs, tmp_path):
    make, needle = PERSONALIZE_PATHS[case]
    extra = make(tmp_path)
    before = (tmp_path / "p.safetensors").read_bytes() if (tmp_path / "p.safetensors").exists() else None
    one_error(run(_set_args(personalize_args(pristine, tmp_path, refs), extra)), needle)
    if before is not None:
        assert (tmp_path / "p.safetensors").read_bytes() == before


def test_personalize_missing_flags(tmp_path):
    one_error(run(["personalize", "--out", tmp_path / "x.safetensors"]), "missing --images, --token, --init")


# -- 3. images ---------------------------------------------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header that claims width x height greyscale pixels; a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_text_bomb() -> bytes:
    """A tiny PNG whose zTXt chunk inflates to 8 MB."""
    buf = __import__("io").BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="PNG")
    raw = buf.getvalue()
    ztxt = _chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(b"A" * 8_000_000, 9))
    return raw[:33] + ztxt + raw[33:]


def _png(arr, mode=None):
    def make(path: Path):
        Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return make


IMAGE_CASES = {  # name: (write one image file, extra flags, words of the error line)
    "bomb-10-gigapixels": (lambda p: p.write_bytes(png_bomb(100_000, 100_000)), [], "--max-image-pixels"),
    "bomb-200-MP": (lambda p: p.write_bytes(png_bomb(20_000, 10_000)), [], "179 MP"),
    "over-own-limit": (_png(np.zeros((40, 40, 3), np.uint8)), ["--max-image-pixels", "1000"], "1,000 pixels"),
    "text-chunk-bomb": (lambda p: p.write_bytes(png_text_bomb()), [], "cannot read image"),
    "truncated": (lambda p: (_png(np.zeros((40, 40, 3), np.uint8))(p), p.write_bytes(p.read_bytes()[:60])),
                  [], "cannot read image"),
    "empty-file": (lambda p: p.write_bytes(b""), [], "cannot read image"),
    "text-as-png": (lambda p: p.write_text("hello"), [], "cannot read image"),
    "header-only": (lambda p: p.write_bytes(png_bomb(64, 64)[:33]), [], "cannot read image"),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_personalize_bad_image(case, pristine, refs, tmp_path):
    make, flags, needle = IMAGE_CASES[case]
    folder = tmp_path / "imgs"
    shutil.copytree(refs, folder)
    make(folder / "zz.png")
    args = _set_args(personalize_args(pristine, tmp_path, refs), ["--images", folder, *flags])
    line = one_error(run(args), needle)
    assert "zz.png" in line or "ref_" in line
    assert not (tmp_path / "p.safetensors").exists()


def _grey16(value):
    return np.full((40, 40), value, np.uint16), None


GREY_CASES = {  # name: (write the image, expected 8-bit grey level)
    "16-bit-zero": (lambda p: Image.fromarray(np.zeros((40, 40), np.uint16)).save(p), 0),
    "16-bit-quarter": (lambda p: Image.fromarray(np.full((40, 40), 16384, np.uint16)).save(p), 64),
    "16-bit-half": (lambda p: Image.fromarray(np.full((40, 40), 32768, np.uint16)).save(p), 128),
    "16-bit-full": (lambda p: Image.fromarray(np.full((40, 40), 65535, np.uint16)).save(p), 255),
    "32-bit-int-half": (lambda p: Image.fromarray(np.full((40, 40), 32768, np.int32)).save(p.with_suffix(".tiff")),
                        128),
    "float-half": (lambda p: Image.fromarray(np.full((40, 40), 0.5, np.float32)).save(p.with_suffix(".tiff")), 128),
    "float-nan": (lambda p: Image.fromarray(np.full((40, 40), np.nan, np.float32)).save(p.with_suffix(".tiff")), 0),
    "8-bit-grey": (lambda p: Image.fromarray(np.full((40, 40), 100, np.uint8)).save(p), 100),
    "palette-transparent": (lambda p: Image.fromarray(np.full((40, 40), 0, np.uint8)).convert("P").save(
        p, transparency=0), 255),
    "grey-alpha-clear": (lambda p: Image.fromarray(np.zeros((40, 40, 2), np.uint8), mode="LA").save(p), 255),
    "cmyk-jpeg": (lambda p: Image.new("CMYK", (40, 40), (0, 0, 0, 0)).save(p.with_suffix(".jpg")), 255),
}


@pytest.mark.parametrize("case", sorted(GREY_CASES))
def test_image_modes_converted_by_range(case, tmp_path):
    """16-bit and float images keep their grey level (PIL's convert would clip 25-50 % grey to white)."""
    from zo_runtime.data import load_image

    make, level = GREY_CASES[case]
    make(tmp_path / "img.png")
    path = next(tmp_path.glob("img.*"))
    out = load_image(path, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - level).max() <= 1, (out.min(), out.max())


def test_16_bit_rgb_png(tmp_path):
    a = np.full((40, 40, 3), 0x8000, np.uint16)
    import io
    # PIL cannot write 48-bit PNG from an array; build it by hand
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(40))
    data = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 40, 40, 16, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))
    (tmp_path / "rgb48.png").write_bytes(data)
    from zo_runtime.data import load_image
    assert Image.open(io.BytesIO(data)).size == (40, 40)
    assert np.abs(load_image(tmp_path / "rgb48.png", 32).astype(int) - 128).max() <= 1


def test_long_caption_does_not_fit(pristine, refs, tmp_path):
    caps = tmp_path / "caps.txt"
    caps.write_text("ref_0.png\t" + "a very " * 40 + "{}\n")
    one_error(run(personalize_args(pristine, tmp_path, refs) + ["--captions", caps]), "does not fit")


# -- 4. embedding files (generate --embedding) -------------------------------------------------------------

def st_file(path: Path, header, data: bytes = b"", n: int | None = None) -> Path:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return path


ZEROS = np.zeros(64, np.float32).tobytes()


def _tensor(name="<e>", shape=(1, 64), dtype="F32", data=None, offsets=None):
    data = np.zeros(shape, np.float32).tobytes() if data is None else data
    return {name: {"dtype": dtype, "shape": list(shape), "data_offsets": offsets or [0, len(data)]}}, data


def _save(name, vecs):
    def make(p: Path):
        from safetensors.numpy import save_file
        save_file({name: np.asarray(vecs, np.float32)}, str(p))
        return p
    return make


EMBEDDING_CASES = {  # name: (write the file at the given path (or return another path), words of the error line)
    "header-longer-than-file": (lambda p: st_file(p, {"a": 1}, n=10_000), "bad header length"),
    "header-length-zero": (lambda p: st_file(p, b"", n=0), "bad header length"),
    "too-short": (lambda p: p.write_bytes(b"\x01\x02\x03") and p, "too short"),
    "header-not-json": (lambda p: st_file(p, b"{nope"), "unreadable header"),
    "header-bad-utf8": (lambda p: st_file(p, b'{"\xff": 1}'), "unreadable header"),
    "header-list": (lambda p: st_file(p, b"[1, 2, 3]"), "unreadable header"),
    "no-tensors": (lambda p: st_file(p, {"__metadata__": {"a": "b"}}), "holds no tensors"),
    "entry-not-object": (lambda p: st_file(p, {"<e>": [1, 2]}), "malformed"),
    "offsets-strings": (lambda p: st_file(p, *_tensor(offsets=["0", "256"])), "malformed"),
    "offsets-three": (lambda p: st_file(p, *_tensor(offsets=[0, 128, 256])), "malformed"),
    "offsets-negative": (lambda p: st_file(p, *_tensor(offsets=[-256, 0])), "inconsistent size"),
    "offsets-past-end": (lambda p: st_file(p, *_tensor(offsets=[256, 512])), "truncated"),
    "shape-negative": (lambda p: st_file(p, *_tensor(shape=(-4, -64), data=ZEROS)), "malformed"),
    "shape-mismatch": (lambda p: st_file(p, *_tensor(shape=(2, 64), data=ZEROS)), "inconsistent size"),
    "shape-huge": (lambda p: st_file(p, *_tensor(shape=(2 ** 62, 2 ** 62), data=ZEROS)), "inconsistent size"),
    "dtype-int": (lambda p: st_file(p, *_tensor(dtype="I32")), "floating point"),
    "dtype-list": (lambda p: st_file(p, *_tensor(dtype=["F32"])), "malformed"),
    "values-nan": (_save("<e>", np.full((1, 64), np.nan)), "NaN"),
    "wrong-dim": (_save("<e>", np.zeros((1, 32))), "dimension 32"),
    "three-tensors": (lambda p: st_file(p, {**_tensor("a")[0], **_tensor("b")[0], **_tensor("c")[0]},
                                        np.zeros(64, np.float32).tobytes()), "not a textual-inversion"),
    "sdxl": (lambda p: st_file(p, {**_tensor("clip_l")[0], **_tensor("clip_g")[0]},
                               np.zeros(64, np.float32).tobytes()), "SDXL"),
    "placeholder-a-word": (_save("a", np.zeros((1, 64))), "word of the vocabulary"),
    "placeholder-star-word": (_save("star", np.zeros((1, 64))), "word of the vocabulary"),
    "placeholder-special": (_save("<|endoftext|>", np.zeros((1, 64))), "word of the vocabulary"),
    "placeholder-space": (_save("<my tok>", np.zeros((1, 64))), "without spaces"),
    "too-many-vectors": (_save("<e>", np.zeros((76, 64))), "at most 75"),
    "pickle-suffix": (lambda p: (p.with_suffix(".pt").write_bytes(b"\x80\x04K\x01."), p.with_suffix(".pt"))[1],
                      "pickle"),
    "zip-archive": (lambda p: p.write_bytes(b"PK\x03\x04" + b"\x00" * 40) and p, "zip archive"),
    "pickle-bytes": (lambda p: p.write_bytes(b"\x80\x04\x95" + b"\x00" * 40) and p, "pickle"),
    "folder-without-file": (lambda p: p.mkdir() or p, "learned_embeds.safetensors"),
    "missing": (lambda p: p, "not found"),
}


@pytest.mark.parametrize("case", sorted(EMBEDDING_CASES))
def test_generate_bad_embedding(case, pristine, tmp_path):
    make, needle = EMBEDDING_CASES[case]
    path = make(tmp_path / "emb.safetensors") or tmp_path / "emb.safetensors"
    one_error(run(["generate", "--model", pristine, "--embedding", path, "a <e>", "--out", tmp_path / "g.png",
                   "--steps", "1"]), needle)
    assert not (tmp_path / "g.png").exists()


def test_same_placeholder_in_two_files(pristine, tmp_path):
    a, b = _save("<e>", np.zeros((1, 64)))(tmp_path / "a.safetensors"), _save("<e>", np.ones((1, 64)))(tmp_path / "b.st")
    one_error(run(["generate", "--model", pristine, "--embedding", a, "--embedding", b, "a <e>", "--out",
                   tmp_path / "g.png"]), "two embedding files")


@pytest.mark.parametrize("loaded", [0, 1])
def test_prompt_names_unknown_token(loaded, pristine, tmp_path):
    emb = ["--embedding", _save("<e>", np.zeros((1, 64)))(tmp_path / "e.safetensors")] if loaded else []
    one_error(run(["generate", "--model", pristine, *emb, "a photo of <other>", "--out", tmp_path / "g.png"]),
              "<other>", "no loaded embedding defines")
    assert not (tmp_path / "g.png").exists()


def _valid_embedding_bytes() -> bytes:
    from safetensors.numpy import save
    return save({"<e>": np.arange(64, dtype=np.float32)[None] / 64}, metadata={"format": "pt"})


def _check_loader(tmp_path, data: bytes) -> None:
    """Loading arbitrary bytes gives embeddings or one UserError line; never another exception."""
    from zo_runtime.embeddings import load_embeddings
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        out = load_embeddings(path, expected_dim=64)
    except UserError as e:
        assert "\n" not in str(e)
        return
    for vecs in out.values():
        assert vecs.dtype == np.float32 and vecs.ndim == 2 and np.isfinite(vecs).all()


def test_fuzzed_safetensors_headers(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    good = _valid_embedding_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8:8 + n])
    scalar = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=8))
    value = st.recursive(scalar, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c,
                                                                                        max_size=4), max_leaves=8)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(field=st.sampled_from(["dtype", "shape", "data_offsets", None]), new=value,
           length_delta=st.integers(-16, 16))
    def check(field, new, length_delta):
        h = json.loads(json.dumps(header))
        if field is None:
            h["<e>"] = new
        else:
            h["<e>"][field] = new
        raw = json.dumps(h).encode()
        _check_loader(tmp_path, struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + good[8 + n:])

    check()


def test_fuzzed_safetensors_bytes(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    good = _valid_embedding_bytes()

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(flips=st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)), min_size=1, max_size=6),
           cut=st.integers(0, len(good)))
    def check(flips, cut):
        data = bytearray(good)
        for i, b in flips:
            data[i] = b
        _check_loader(tmp_path, bytes(data[:max(cut, 1)]) if cut < 8 else bytes(data))

    check()


# -- 5. generate: settings and outputs checked before any work -----------------------------------------------

GENERATE_FLAGS = [
    ("--guidance", "inf", "--guidance"), ("--guidance", "nan", "--guidance"), ("--guidance", "-1", "--guidance"),
    ("--guidance", "1000", "--guidance"), ("--guidance", "x", "not a valid float"), ("--steps", "0", "--steps"),
    ("--steps", "5000", "--steps"), ("--seed", "-1", "--seed"), ("--height", "-8", "--height"),
    ("--height", "0", "--height"), ("--height", "12", "divisible by 8"), ("--height", "100000", "--height"),
    ("--width", "-16", "--width"), ("--images-per-prompt", "0", "--images-per-prompt"),
    ("--images-per-prompt", "1000", "--images-per-prompt"), ("--threads", "-1", "--threads"),
    ("--scheduler", "nope", "nope"), ("--provider", "nope", "not available"),
]


@pytest.mark.parametrize("flag,value,needle", GENERATE_FLAGS, ids=[f"{f}={v}" for f, v, _ in GENERATE_FLAGS])
def test_generate_bad_flag(flag, value, needle, pristine, tmp_path):
    args = generate_args(pristine, tmp_path)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    one_error(run(args), needle)
    assert not (tmp_path / "g.png").exists()


def _prompts(t, text: bytes):
    (t / "prompts.txt").write_bytes(text)
    return ["--prompts", t / "prompts.txt"]


GENERATE_PATHS = {  # name: (the command line after `generate --model M`, given tmp_path; error words)
    "out-gif": (lambda t: ["a star", "--out", t / "x.gif"], "must end in"),
    "out-no-suffix": (lambda t: ["a star", "--out", t / "x"], "must end in"),
    "out-exists": (lambda t: _file(t, "x.png") and ["a star", "--out", t / "x.png"], "exists"),
    "out-is-folder": (lambda t: (t / "d.png").mkdir() or ["a star", "--out", t / "d.png"], "is a folder"),
    "out-under-file": (lambda t: ["a star", "--out", _file(t) / "x.png"], "cannot write"),
    "out-in-proc": (lambda t: ["a star", "--out", "/proc/zo-edge-hostile/x.png"], "cannot write"),
    "out-dir-is-file": (lambda t: ["a star", "--out-dir", _file(t)], "not a folder"),
    "out-and-out-dir": (lambda t: ["a star", "--out", t / "x.png", "--out-dir", t / "d"], "not both"),
    "grid-exists": (lambda t: (t / "d").mkdir() or _file(t / "d", "grid.png") and
                    ["a star", "--out-dir", t / "d", "--grid"], "grid.png exists"),
    "image-exists": (lambda t: (t / "d").mkdir() or _file(t / "d", "000_0.png") and
                     ["a star", "--out-dir", t / "d"], "000_0.png exists"),
    "no-output": (lambda t: ["a star"], "give --out"),
    "no-prompt": (lambda t: ["--out", t / "x.png"], "give a PROMPT"),
    "prompts-missing": (lambda t: ["--prompts", t / "nope.txt", "--out-dir", t / "d"], "does not exist"),
    "prompts-empty": (lambda t: [*_prompts(t, b"\n  \n"), "--out-dir", t / "d"], "has no prompts"),
    "prompts-bad-utf8": (lambda t: [*_prompts(t, b"a \xff star\n"), "--out-dir", t / "d"], "not UTF-8"),
    "prompts-two-one-out": (lambda t: [*_prompts(t, b"a\nb\n"), "--out", t / "x.png"], "--out takes one prompt"),
}


@pytest.mark.parametrize("case", sorted(GENERATE_PATHS))
def test_generate_bad_path(case, pristine, tmp_path):
    make, needle = GENERATE_PATHS[case]
    existing = {p: p.read_bytes() for p in tmp_path.rglob("*.png") if p.is_file()}
    args = make(tmp_path)
    existing.update({p: p.read_bytes() for p in tmp_path.rglob("*.png") if p.is_file()})
    one_error(run(["generate", "--model", pristine, *args]), needle)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.png") if p.is_file()} == existing


MAGIC = {".png": b"\x89PNG", ".jpg": b"\xff\xd8\xff", ".jpeg": b"\xff\xd8\xff", ".webp": b"RIFF"}


@pytest.mark.parametrize("suffix", sorted(MAGIC))
def test_generate_writes_the_format_its_name_says(suffix, pristine, tmp_path):
    out = tmp_path / f"x{suffix}"
    ok(run(["generate", "--model", pristine, "a red star", "--out", out, "--steps", "1"]))
    assert out.read_bytes()[:len(MAGIC[suffix])] == MAGIC[suffix]
    assert Image.open(out).size == (32, 32)
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.parametrize("background,warned", [("beach", True), ("sky", False)])
def test_shapes_unknown_background_warns(background, warned, tmp_path):
    r = ok(run(["generate", f"a red star on a {background} background", "--out", tmp_path / "x.png", "--steps", "1"]))
    assert ("never saw a 'beach' background" in r.stderr) == warned


def test_grid_replaced_only_with_overwrite(pristine, tmp_path):
    d = tmp_path / "d"
    args = ["generate", "--model", pristine, "a red star", "--out-dir", d, "--grid", "--steps", "1"]
    ok(run(args))
    first = (d / "grid.png").read_bytes()
    one_error(run(args + ["--seed", "5"]), "exists")
    assert (d / "grid.png").read_bytes() == first
    ok(run(args + ["--seed", "5", "--overwrite"]))
    assert (d / "grid.png").read_bytes() != first


# -- 6. faults: full disk, torn logs, damaged checkpoints, non-finite training, kills ---------------------------

CLI_WITH_FILE_LIMIT = ("import resource, sys\n"
                       "limit = int(sys.argv.pop(1))\n"
                       "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))\n"
                       "from zo_edge.cli.main import main\n"
                       "main(sys.argv[1:], prog_name='zo-edge')\n")


def run_limited(limit: int, args, timeout=180):
    """The CLI in a subprocess whose files cannot grow past ``limit`` bytes (a full disk: EFBIG)."""
    return subprocess.run([sys.executable, "-c", CLI_WITH_FILE_LIMIT, str(limit), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "ZO_EDGE_THREADS": "1"})


def one_error_line(stderr: str, *needles) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(NOISE)]
    assert len(lines) == 1 and lines[0].startswith("zo-edge: error: "), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_full_disk_on_image_keeps_previous_file(pristine, tmp_path):
    out = tmp_path / "x.png"
    out.write_bytes(b"previous image")
    p = run_limited(1000, ["generate", "--model", pristine, "a red star", "--out", out, "--steps", "1", "--overwrite"])
    assert p.returncode == 2, p.stderr
    one_error_line(p.stderr, "File too large", "nothing was replaced")
    assert out.read_bytes() == b"previous image"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["sentinel", "x.png"]   # no temporary file left


def test_full_disk_during_training_then_resume(pristine, refs, tmp_path):
    args = personalize_args(pristine, tmp_path, refs)
    args = _set_args(args, ["--steps", "60", "--checkpoint-every", "10", "--no-sg"])
    p = run_limited(4096, args)
    assert p.returncode == 2, p.stderr
    one_error_line(p.stderr, "cannot write", "is intact")
    with np.load(tmp_path / "run" / "checkpoint.npz") as z:
        step = int(z["step"])
        assert step >= 10 and np.isfinite(z["theta"]).all()
    assert not (tmp_path / "p.safetensors").exists()
    ok(run(["personalize", "--resume", tmp_path / "run"]))
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61))
    assert not list((tmp_path / "run").glob("*.tmp"))


def _cfg(pristine, refs, tmp, **kw):
    from zo_runtime.personalize import PersonalizeConfig
    base = dict(model=str(pristine), images=str(refs), token=TOKEN, init="star", out=str(tmp / "p.safetensors"),
                run_dir=str(tmp / "run"), steps=8, checkpoint_every=2, tau=8, seed=1)
    base.update(kw)
    return PersonalizeConfig(**base)


class Killed(Exception):
    pass


def _kill_at(n):
    def callback(step, theta):
        if step == n:
            raise Killed
    return callback


@pytest.fixture(scope="module")
def done_run(pristine, refs, tmp_path_factory):
    """A finished run (8 steps, checkpoints every 2) and its embedding; cases copy it."""
    from zo_runtime.personalize import Trainer
    tmp = tmp_path_factory.mktemp("done")
    Trainer(_cfg(pristine, refs, tmp)).train()
    return tmp


@pytest.fixture
def run_copy(done_run, tmp_path):
    shutil.copytree(done_run / "run", tmp_path / "run")
    shutil.copyfile(done_run / "p.safetensors", tmp_path / "p.safetensors")
    return tmp_path / "run"


@pytest.mark.parametrize("target,nth", [("config.json", 1), ("log.jsonl", 1), ("checkpoint.npz", 1),
                                        ("checkpoint.npz", 3), ("config.json", 2), ("p.safetensors", 1)])
def test_crash_during_each_write(target, nth, done_run, pristine, refs, tmp_path, monkeypatch):
    """A crash at any write (the nth of that file) loses nothing: resume (or, before the first
    checkpoint, the same command again) ends with the token of an uninterrupted run, bit for bit."""
    from zo_runtime import outputs
    from zo_runtime.embeddings import load_embeddings
    from zo_runtime.personalize import Trainer, resume

    real, seen = outputs.publish, {"n": 0}

    def crashing(tmp, path, overwrite, what="output"):
        if Path(path).name == target:
            seen["n"] += 1
            if seen["n"] == nth:
                raise Killed
        return real(tmp, path, overwrite, what)

    monkeypatch.setattr(outputs, "publish", crashing)
    cfg = _cfg(pristine, refs, tmp_path)
    if target == "config.json" and nth == 2:   # the second config write is the resume's
        with pytest.raises(Killed):
            _crash_then_resume(cfg)
    else:
        with pytest.raises(Killed):
            Trainer(cfg).train()
    monkeypatch.setattr(outputs, "publish", real)
    run_dir = Path(cfg.run_dir)
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    if (run_dir / "checkpoint.npz").is_file():
        resume(run_dir)
    else:
        Trainer(cfg).train()
    np.testing.assert_array_equal(load_embeddings(cfg.out)[TOKEN], load_embeddings(done_run / "p.safetensors")[TOKEN])


def _crash_then_resume(cfg):
    from zo_runtime.personalize import Trainer, resume
    try:
        Trainer(cfg).train(callback=_kill_at(5))
    except Killed:
        pass
    resume(cfg.run_dir)


def test_torn_log_line_dropped_on_resume(pristine, refs, tmp_path):
    from zo_runtime.personalize import Trainer
    cfg = _cfg(pristine, refs, tmp_path)
    with pytest.raises(Killed):
        Trainer(cfg).train(callback=_kill_at(6))
    with open(tmp_path / "run" / "log.jsonl", "ab") as f:
        f.write(b'{"step": 7, "lo')          # a write cut short by a kill or a full disk
    ok(run(["personalize", "--resume", tmp_path / "run"]))
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 9))


def _rewrite_checkpoint(**changes):
    def f(path: Path):
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        arrays.update(changes)
        for k in [k for k, v in changes.items() if v is None]:
            arrays.pop(k)
        path.unlink()
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
    return f


CHECKPOINT_CASES = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:300]),
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(b"\x00garbage" * 100),
    "theta-shape": _rewrite_checkpoint(theta=np.zeros((3, 3), np.float32)),
    "theta-nan": _rewrite_checkpoint(theta=np.full((1, 64), np.nan, np.float32)),
    "no-rng": _rewrite_checkpoint(rng=None),
    "rng-garbage": _rewrite_checkpoint(rng=np.array("{not json")),
    "step-past-end": _rewrite_checkpoint(step=np.int64(100)),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_damaged_checkpoint_on_resume(case, run_copy, tmp_path):
    ckpt = run_copy / "checkpoint.npz"
    CHECKPOINT_CASES[case](ckpt)
    before = tree_digest(run_copy)
    one_error(run(["personalize", "--resume", run_copy, "--out", tmp_path / "new.safetensors"]), "checkpoint")
    assert tree_digest(run_copy) == before
    assert not (tmp_path / "new.safetensors").exists()


CONFIG_CASES = {
    "garbage": (b"{nope", "damaged"),
    "bad-utf8": (b'{"lr": "\xff"}', "damaged"),
    "list": (b"[1, 2]", "damaged"),
    "lr-string": (lambda d: d.update(lr="0.1"), "wrong type"),
    "steps-float": (lambda d: d.update(steps=1.5), "wrong type"),
    "flag-number": (lambda d: d.update(sg=1), "wrong type"),
    "templates-bad": (lambda d: d.update(templates=[1, 2]), "template"),
    "no-token": (lambda d: d.pop("token"), "damaged"),
    "lr-negative": (lambda d: d.update(lr=-1.0), "learning rate"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_damaged_config_on_resume(case, run_copy, tmp_path):
    change, needle = CONFIG_CASES[case]
    path = run_copy / "config.json"
    if isinstance(change, bytes):
        path.write_bytes(change)
    else:
        d = json.loads(path.read_text())
        change(d)
        path.write_text(json.dumps(d))
    before = tree_digest(run_copy)
    one_error(run(["personalize", "--resume", run_copy, "--out", tmp_path / "new.safetensors"]), needle)
    assert tree_digest(run_copy) == before


def test_resume_of_finished_run_never_replaces_output(run_copy, tmp_path):
    out = tmp_path / "p.safetensors"
    first = out.read_bytes()
    one_error(run(["personalize", "--resume", run_copy]), "exists", "--overwrite")
    assert out.read_bytes() == first
    from zo_runtime.embeddings import load_embeddings
    ok(run(["personalize", "--resume", run_copy, "--out", tmp_path / "again.safetensors"]))
    token = load_embeddings(out)[TOKEN]
    np.testing.assert_array_equal(load_embeddings(tmp_path / "again.safetensors")[TOKEN], token)  # bit for bit
    ok(run(["personalize", "--resume", run_copy, "--overwrite"]))
    np.testing.assert_array_equal(load_embeddings(out)[TOKEN], token)


def test_resume_extends_a_finished_run(run_copy, tmp_path):
    ok(run(["personalize", "--resume", run_copy, "--steps", "10", "--out", tmp_path / "ten.safetensors"]))
    steps = [json.loads(line)["step"] for line in (run_copy / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
    assert json.loads((run_copy / "config.json").read_text())["steps"] == 10


def test_stale_temp_files_removed_on_resume(run_copy, tmp_path):
    for name in (".checkpoint.npz.abc123.tmp", "checkpoint.npz.tmp.npz", ".log.jsonl.x.tmp"):
        (run_copy / name).write_bytes(b"left by a kill")
    ok(run(["personalize", "--resume", run_copy, "--steps", "9", "--out", tmp_path / "n.safetensors"]))
    assert sorted(p.name for p in run_copy.iterdir() if p.name != ".lock") == ["checkpoint.npz", "config.json",
                                                                               "log.jsonl"]


def test_embedding_file_mode_follows_umask(done_run):
    assert (done_run / "p.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_killed_before_first_checkpoint(pristine, refs, tmp_path):
    """A kill between config.json and the step-0 checkpoint: --resume says what to do; a new run works."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    one_error(run(["personalize", "--resume", run_dir]), "stopped before its first")
    ok(run(personalize_args(pristine, tmp_path, refs)))


def test_nan_loss_keeps_the_checkpoint_whose_loss_was_seen(pristine, refs, tmp_path):
    """The loss of θ_k is seen at step k + 1: with NaN at step 7, the checkpoint is step 4 (not 6, unseen)."""
    from zo_runtime.personalize import Trainer
    trainer = Trainer(_cfg(pristine, refs, tmp_path, checkpoint_every=2))
    real, calls = trainer.oracle.losses, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        return real(*a, **k) * (np.nan if calls["n"] == 7 else 1)

    trainer.oracle.losses = flaky
    with pytest.raises(UserError, match="step 4"):
        trainer.train()
    with np.load(tmp_path / "run" / "checkpoint.npz") as z:
        assert int(z["step"]) == 4


# -- 7. overwrite protection under concurrency ------------------------------------------------------------------

def test_run_dir_in_use(pristine, refs, tmp_path):
    from zo_runtime.personalize import RunLock
    (tmp_path / "run").mkdir()
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    try:
        one_error(run(personalize_args(pristine, tmp_path, refs)), "in use")
    finally:
        lock.release()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]


def test_default_run_dir_not_shared(pristine, refs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["personalize", "--model", pristine, "--images", refs, "--token", TOKEN, "--init", "star", "--steps", "2"]
    ok(run(base + ["--out", "a.safetensors"]))
    run_dir = tmp_path / "runs" / "hz-tok"
    before = tree_digest(run_dir)
    one_error(run(base + ["--out", "b.safetensors"]), "already holds a run")
    assert tree_digest(run_dir) == before and not (tmp_path / "b.safetensors").exists()


def test_output_that_appears_during_training(pristine, refs, tmp_path):
    from zo_runtime.personalize import Trainer, resume
    cfg = _cfg(pristine, refs, tmp_path, steps=3)

    def other_process(step, theta):
        if step == 1:
            Path(cfg.out).write_bytes(b"someone else's file")

    with pytest.raises(UserError, match="appeared"):
        Trainer(cfg).train(callback=other_process)
    assert Path(cfg.out).read_bytes() == b"someone else's file"
    res = resume(cfg.run_dir, out=str(tmp_path / "mine.safetensors"))
    assert Path(res.out).is_file() and Path(cfg.out).read_bytes() == b"someone else's file"


def test_publish_never_replaces_without_overwrite(tmp_path):
    from zo_runtime.embeddings import save_embedding
    path = tmp_path / "e.safetensors"
    path.write_bytes(b"first")
    with pytest.raises(UserError, match="appeared"):
        save_embedding(path, "<e>", np.zeros((1, 8), np.float32), overwrite=False)
    assert path.read_bytes() == b"first" and sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors",
                                                                                            "sentinel"]


def _spawn(args):
    return subprocess.Popen([sys.executable, "-m", "zo_edge.cli.main", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "ZO_EDGE_THREADS": "1"})


def test_two_generates_same_out(pristine, tmp_path):
    out = tmp_path / "x.png"
    procs = [_spawn(["generate", "--model", pristine, "a red star", "--out", out, "--steps", "3", "--seed", str(i)])
             for i in range(2)]
    results = [(p.wait(timeout=180), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    line = one_error_line(next(err for code, err in results if code == 2))
    assert "exists" in line or "appeared" in line
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_two_runs_same_run_dir(pristine, refs, tmp_path):
    procs = [_spawn(_set_args(personalize_args(pristine, tmp_path, refs),
                              ["--out", tmp_path / f"p{i}.safetensors", "--steps", "30"])) for i in range(2)]
    results = [(p.wait(timeout=240), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    line = one_error_line(next(err for code, err in results if code == 2))
    assert "in use" in line or "already holds a run" in line
    winner = next(i for i, (code, _) in enumerate(results) if code == 0)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["out"].endswith(f"p{winner}.safetensors")


# -- 8. requantize and convert write only inside their output ------------------------------------------------------

def _as_fp32(b):
    edit(b, lambda m: m["quantization"].__setitem__("weights", "fp32"))


REQUANTIZE_CASES = {
    "token-table-traversal": (lambda b, s: (_as_fp32(b), edit(b, lambda m: m["token_embedding"].__setitem__(
        "path", "../../x"))), "outside the bundle"),
    "files-entry-traversal": (lambda b, s: (_as_fp32(b), _list_outside(b, s)), "outside the bundle"),
    "tokenizer-symlink": (lambda b, s: (_as_fp32(b), _tokenizer_symlink(b, s)), "symbolic link"),
    "not-fp32": (lambda b, s: None, "not an fp32 bundle"),
    "unknown-graph": (lambda b, s: (_as_fp32(b), edit(b, lambda m: m["graphs"].__setitem__(
        "../../evil", m["graphs"]["unet"]))), "unknown graph"),
}


@pytest.mark.parametrize("case", sorted(REQUANTIZE_CASES))
def test_requantize_refuses(case, bundle, sentinel, tmp_path):
    tamper, needle = REQUANTIZE_CASES[case]
    tamper(bundle, sentinel)
    before = sorted(p.name for p in tmp_path.iterdir())
    one_error(run(["requantize", bundle, tmp_path / "out"]), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before       # no output, no temporary folder


def test_requantize_over_a_user_folder(bundle, tmp_path):
    _as_fp32(bundle)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    one_error(run(["requantize", bundle, tmp_path / "mine", "--overwrite"]), "not a zo-edge bundle")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_requantize_copies_only_listed_files(bundle, tmp_path):
    _as_fp32(bundle)
    (bundle / "tokenizer" / "unlisted-extra.txt").write_text("not part of the bundle")
    ok(run(["requantize", bundle, tmp_path / "out"]))
    assert not (tmp_path / "out" / "tokenizer" / "unlisted-extra.txt").exists()
    assert "verified 10 files" in ok(run(["info", tmp_path / "out", "--verify"])).output


def test_demo_out_dir_is_a_file(tmp_path):
    one_error(run(["demo", "--out-dir", _file(tmp_path)]), "afile")


# -- 9. the top-level handler: expected failures one line, bugs one line unless asked -----------------------------

def test_bug_is_one_line_without_traceback(pristine, tmp_path, monkeypatch):
    from zo_runtime import pipeline

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(pipeline.Pipeline, "__init__", boom)
    args = ["generate", "--model", pristine, "a star", "--out", tmp_path / "x.png"]
    r = run(args)
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "internal error: RuntimeError: boom" in lines[0] and "--debug" in lines[0]
    assert isinstance(run(args, env={"ZO_EDGE_DEBUG": "1"}).exception, RuntimeError)
    assert isinstance(run(["--debug", *args]).exception, RuntimeError)


@pytest.mark.parametrize("args,needle", [
    (["nosuchcommand"], "No such command"),
    (["generate", "--steps"], "requires an argument"),
    (["info", "a", "b"], "unexpected extra argument"),
])
def test_usage_errors_one_line(args, needle):
    one_error(run(args), needle)
