"""The one reader of zo-edge manifests: a model bundle's ``zo-edge.json`` and a metrics bundle's
``metrics.json`` (docs/bundle.md).

A manifest is data from outside: every path it names is a relative path that must stay inside the
bundle folder (no absolute path, no ``..``, no symbolic link leading out), and every file that is
read must be listed in ``files`` with its sha256 and size. Anything else is one :class:`UserError`
line, before any file is opened.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath

from .errors import UserError

FORMAT_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(root: str | Path, name: str, fmt: str, what: str, remedy: str) -> dict:
    """Load ``root/name`` and check what every reader relies on: a JSON object of format ``fmt``,
    ``format_version`` 1, and a well-formed ``files`` table whose paths stay inside ``root``."""
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
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise UserError(f"{path}: format version {version} is newer than this zo-edge understands "
                        f"({FORMAT_VERSION}); upgrade zo-edge")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise UserError(f"{path} has format_version {version!r}; this zo-edge reads version {FORMAT_VERSION}")
    check_files_table(root, m.get("files"), path)
    return m


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
