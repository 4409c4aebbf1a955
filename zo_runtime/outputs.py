"""Writing output files safely: checked before any long work, written to a temporary file next to
the target, and put in place in one step that never replaces a file it was not allowed to.

* :func:`check_output` - before the work: the folder exists (or is created) and is writable, the
  name has an allowed suffix, and an existing file is refused unless ``overwrite``;
* :func:`write_atomic` - after the work: ``write(tmp)`` then :func:`publish`; the temporary file is
  removed on any failure, so a full disk leaves the previous file as it was;
* :func:`write_text`, :func:`write_json`, :func:`write_npz` - :func:`write_atomic` for the usual kinds
  (run logs, configs, checkpoints, reports and manifests rewritten as work goes on: ``overwrite`` on);
* :func:`publish` - without ``overwrite`` a hard link, which fails if the name was taken meanwhile
  (two runs with the same ``--out``: the second is refused instead of replacing the first).
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import UserError


def _why(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def check_output(path: str | Path, suffixes: tuple[str, ...], overwrite: bool, what: str = "output") -> Path:
    """Refuse, with one line, an output that could not be written later: wrong suffix, an existing
    file without ``overwrite``, a folder in its place, or a folder that cannot be created or written."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{what} {str(path)!r} must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise UserError(f"{what} {str(path)!r} is a folder; give a file name")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise UserError(f"{what} {path} exists; pass --overwrite to replace it")
    check_writable_dir(path.parent, what)
    return path


def check_writable_dir(folder: str | Path, what: str = "output") -> Path:
    """Create ``folder`` if needed and prove a file can be created in it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".zo-edge-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write the {what} into {folder}: {_why(e)}") from None
    return folder


def publish(tmp: str | Path, path: str | Path, overwrite: bool, what: str = "output") -> None:
    """Move the finished temporary file ``tmp`` to ``path`` (same folder). Without ``overwrite`` an
    existing ``path`` - even one created a moment ago by another process - is never replaced."""
    tmp, path = Path(tmp), Path(path)
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise UserError(f"{what} {path} appeared while this command ran; refusing to replace it "
                        "(pass --overwrite)") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists() or path.is_symlink():   # a file system without hard links: check, then rename
            raise UserError(f"{what} {path} appeared while this command ran; refusing to replace it "
                            "(pass --overwrite)") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def write_atomic(path: str | Path, write: Callable[[Path], None], overwrite: bool, what: str = "output",
                 mode: int | None = 0o644) -> Path:
    """``write(tmp)`` into a temporary file beside ``path``, then :func:`publish` it. Any failure
    (ENOSPC, EFBIG, EACCES ...) is one UserError line; the temporary file is removed and a file
    already at ``path`` is left as it was. ``mode`` is applied less the umask (mkstemp makes 0600)."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise UserError(f"cannot write the {what} {path}: {_why(e)}") from None
    tmp = Path(name)
    try:
        write(tmp)
        if mode is not None:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, mode & ~umask)
        publish(tmp, path, overwrite, what)
    except OSError as e:
        raise UserError(f"cannot write the {what} {path}: {_why(e)}; nothing was replaced") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path: str | Path, text: str, overwrite: bool = True, what: str = "file") -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite, what)


def write_json(path: str | Path, obj, overwrite: bool = True, what: str = "file", default=None) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=default) + "\n", overwrite, what)


def write_npz(path: str | Path, overwrite: bool = True, what: str = "file", **arrays) -> Path:
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return write_atomic(path, write, overwrite, what)
