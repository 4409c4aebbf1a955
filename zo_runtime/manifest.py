"""zo-edge manifests, in one place: a model bundle's ``zo-edge.json`` and a metrics bundle's
``metrics.json`` (docs/bundle.md): their names and format versions (the writers in
``zo_edge.convert`` use the same constants), the one reader, and the rules every reader relies on.

A manifest is data from outside: every path it names is a relative path that must stay inside the
bundle folder (no absolute path, no ``..``, no symbolic link leading out), and every file that is
read must be listed in ``files`` with its sha256 and size. Anything else is one :class:`UserError`
line, before any file is opened.

Versions: a reader reads every format version up to its own :data:`FORMAT_VERSION` and refuses a
newer one (written by a newer zo-edge: upgrade); writers write :data:`FORMAT_VERSION`.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath

from .errors import UserError

FORMAT_VERSION = 1                  # the newest manifest format this zo-edge reads, and the one it writes
BUNDLE_MANIFEST = "zo-edge.json"    # a model bundle (zo-edge convert)
BUNDLE_FORMAT = "zo-edge-bundle"
METRICS_MANIFEST = "metrics.json"   # a metrics bundle (zo-edge convert-metrics)
METRICS_FORMAT = "zo-edge-metrics"
BUNDLE_REMEDY = "run `zo-edge convert` first"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
_INT_FIELDS = ("resolution", "vae_scale_factor", "embedding_dim")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(root: str | Path, name: str, fmt: str, what: str, remedy: str) -> dict:
    """Load ``root/name`` and check what every reader relies on: a JSON object of format ``fmt``, a
    ``format_version`` this zo-edge reads (1 to :data:`FORMAT_VERSION`), and a well-formed ``files``
    table whose paths stay inside ``root``."""
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"{what} {str(root)!r} does not exist ({remedy})")
    if not root.is_dir():
        raise UserError(f"{what} {str(root)!r} is not a folder")
    path = root / name
    if not path.is_file():
        raise UserError(f"{str(root)!r} is not a {what}: {name} is missing ({remedy})")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != fmt:
        raise UserError(f"{path} is not a {what} manifest (format is not {fmt!r})")
    version = m.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{path} has format_version {version!r}; a format version is a positive integer "
                        f"(this zo-edge reads up to {FORMAT_VERSION})")
    if version > FORMAT_VERSION:
        raise UserError(f"{path}: format version {version} is newer than this zo-edge understands "
                        f"({FORMAT_VERSION}); upgrade zo-edge")
    check_files_table(root, m.get("files"), path)
    return m


def read_bundle_manifest(bundle: str | Path) -> dict:
    """Load and check a model bundle's ``zo-edge.json``: :func:`read_manifest`, then
    :func:`check_bundle_manifest`. One UserError line when it is not a usable bundle."""
    root = Path(bundle).expanduser()
    m = read_manifest(root, BUNDLE_MANIFEST, BUNDLE_FORMAT, "zo-edge bundle", BUNDLE_REMEDY)
    check_bundle_manifest(root, m)
    return m


def check_bundle_manifest(root: Path, m: dict) -> None:
    """The fields of a model bundle's manifest that zo-edge reads, with their types, and every path
    the runtime opens: inside the bundle and listed in ``files``. One UserError line for the first
    problem."""
    where = f"{root / BUNDLE_MANIFEST}"
    if not isinstance(m.get("family"), str):
        raise UserError(f"{where} has no 'family' entry")
    for key in _INT_FIELDS:
        v = m.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"{where}: {key!r} must be a positive integer, got {v!r}")
    if not isinstance(m.get("vae_scaling_factor"), (int, float)) or isinstance(m["vae_scaling_factor"], bool):
        raise UserError(f"{where}: 'vae_scaling_factor' must be a number, got {m.get('vae_scaling_factor')!r}")
    ns = m.get("noise_schedule")
    steps = ns.get("num_train_timesteps") if isinstance(ns, dict) else None
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise UserError(f"{where}: 'noise_schedule' needs an integer 'num_train_timesteps'")
    graphs = m.get("graphs")
    if not isinstance(graphs, dict) or not all(isinstance(g, dict) for g in graphs.values()):
        raise UserError(f"{where}: 'graphs' must map graph names to entries")
    for name, g in graphs.items():
        listed(root, m, g.get("path"), f"{where}: graph {name} path")
        if "external_data" in g:
            listed(root, m, g["external_data"], f"{where}: graph {name} external_data")
        if not isinstance(g.get("inputs"), list) or not all(isinstance(i, dict) and "name" in i for i in g["inputs"]):
            raise UserError(f"{where}: graph {name} has no valid 'inputs' list")
    emb = m.get("token_embedding")
    listed(root, m, emb.get("path") if isinstance(emb, dict) else None, f"{where}: token_embedding path")
    if isinstance(emb, dict) and "fill" in emb:
        check_fill(root, m, emb, where)
    listed(root, m, m.get("scheduler_config"), f"{where}: scheduler_config")
    tok = inside(root, m.get("tokenizer", "tokenizer"), f"{where}: tokenizer folder")
    for fname in TOKENIZER_FILES:
        if (tok / fname).exists() or fname in ("vocab.json", "merges.txt"):
            listed(root, m, (PurePosixPath(m.get("tokenizer", "tokenizer")) / fname).as_posix(),
                   f"{where}: tokenizer file")


FILL_GENERATORS = ("seeded_rows",)  # zo_runtime.bundle.seeded_rows


def check_fill(root: Path, m: dict, emb: dict, where: str) -> None:
    """A trimmed token table: ``path`` holds the stored rows [K, D], ``ids`` their token ids [K],
    ``fill`` the generator of every other row, ``shape`` the full table's [vocab, D]."""
    fill, shape = emb["fill"], emb.get("shape")
    if not isinstance(fill, dict) or fill.get("generator") not in FILL_GENERATORS:
        raise UserError(f"{where}: token_embedding.fill needs a 'generator' in {', '.join(FILL_GENERATORS)}")
    seed, std = fill.get("seed"), fill.get("std")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UserError(f"{where}: token_embedding.fill.seed must be a non-negative integer, got {seed!r}")
    if not isinstance(std, (int, float)) or isinstance(std, bool) or not 0 < std < 1e3:
        raise UserError(f"{where}: token_embedding.fill.std must be a positive number, got {std!r}")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 24 for v in shape)):
        raise UserError(f"{where}: a trimmed token_embedding needs 'shape' [vocab, dim], got {shape!r}")
    listed(root, m, emb.get("ids"), f"{where}: token_embedding ids")


def check_files_table(root: Path, files, path: Path) -> None:
    """``files`` must map relative paths inside ``root`` to ``{"sha256": hex, "bytes": n}``."""
    if not isinstance(files, dict) or not files:
        raise UserError(f"{path} lists no files (a 'files' table with sha256 sums is required)")
    for rel, meta in files.items():
        inside(root, rel, f"{path}: files entry")
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) \
                or not _SHA256.match(meta["sha256"]):
            raise UserError(f"{path}: files entry {rel!r} has no valid sha256")
        n = meta.get("bytes")
        if "bytes" in meta and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise UserError(f"{path}: files entry {rel!r} has an invalid size {n!r}")


def inside(root: Path, rel, what: str) -> Path:
    """``root/rel`` for a relative path that stays inside ``root`` once symbolic links are
    resolved; a UserError naming ``what`` otherwise."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise UserError(f"{what} {rel!r} is not a relative path")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or re.match(r"^[A-Za-z]:", rel):
        raise UserError(f"{what} {rel!r} points outside the bundle")
    base = Path(root).resolve()
    target = (base / pure).resolve()
    if target != base and base not in target.parents:
        raise UserError(f"{what} {rel!r} points outside the bundle (a symbolic link leads out)")
    return Path(root) / pure


def listed(root: Path, manifest: dict, rel, what: str) -> Path:
    """``root/rel`` for a path inside ``root`` that the manifest's ``files`` table lists (and so
    checks by sha256); a UserError otherwise."""
    path = inside(root, rel, what)
    if rel not in manifest["files"]:
        raise UserError(f"{what} {rel!r} is not listed in the manifest's files (no sha256 to check it against)")
    return path


def file_problems(root: Path, files: dict) -> list[str]:
    """files: {relative path: {"sha256": hex, "bytes": n}} -> one line per missing or damaged file."""
    bad = []
    for rel, meta in files.items():
        p = inside(root, rel, "files entry")
        if not p.is_file():
            bad.append(f"{rel}: missing")
            continue
        try:
            size = p.stat().st_size
            if "bytes" in meta and size != meta["bytes"]:
                bad.append(f"{rel}: {size} bytes, the manifest says {meta['bytes']}")
            elif sha256_file(p) != meta["sha256"]:
                bad.append(f"{rel}: fails its sha256 check")
        except OSError as e:
            bad.append(f"{rel}: cannot be read ({e.strerror or e})")
    return bad


def verify_files(root: Path, files: dict, what: str, remedy: str) -> None:
    """One UserError line for the first missing or damaged file."""
    bad = file_problems(root, files)
    if bad:
        raise UserError(f"{what} file {bad[0]}: it is damaged or incomplete; {remedy}")
