"""Atomic outputs: write beside the destination, then rename; refuse to overwrite without ``force``."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from qexport.errors import QexportError


def check_output_free(path: str | os.PathLike, force: bool) -> Path:
    """Fail early if ``path`` exists and ``force`` is not set.

    Args:
        path: the output file or folder.
        force: allow replacing an existing output.

    Returns:
        The output as a Path.
    """
    out = Path(path)
    if out.exists() and not force:
        raise QexportError(f"output {out} already exists; pass --force to overwrite it")
    return out


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``, on error it is removed.

    Args:
        path: the final folder.
        force: replace an existing folder.

    Returns:
        A context manager yielding the temporary folder to write into.
    """
    out = check_output_free(path, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success it is renamed to ``path``.

    Args:
        path: the final file.
        force: replace an existing file.

    Returns:
        A context manager yielding the temporary file path to write.
    """
    out = check_output_free(path, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if out.is_dir():
        shutil.rmtree(out)
    os.replace(tmp, out)


def write_text_atomic(path: str | os.PathLike, text: str, force: bool = True) -> None:
    """Write a small text file atomically.

    Args:
        path: destination file.
        text: content.
        force: replace an existing file.
    """
    with atomic_file(path, force=force) as tmp:
        tmp.write_text(text)


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes.

    Args:
        path: the file.

    Returns:
        Lowercase hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
