"""Atomic writes: a checkpoint on disk is always either the old one or the new one, never a mix.

Everything is first written under a hidden temporary name next to its destination (so on the
same filesystem), flushed to disk with fsync, and only then renamed into place. A failure while
writing (an exception, a full disk) removes the temporary copy and leaves the destination as it
was.

A directory cannot be swapped in one system call, so :func:`atomic_directory` does it in two
renames: the old directory goes aside, the new one takes its name, then the old one is deleted.
Only a crash of the process between those two renames leaves no directory under the final name;
the previous checkpoint is then the sibling ``.<name>.tmp-<random>-old``, which
:func:`restore_interrupted` (called before every write and by the checkpoint readers) renames
back. One process writes a given checkpoint directory at a time.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cudablocks.errors import CheckpointError

__all__ = ["atomic_directory", "atomic_write_bytes", "atomic_write_text", "restore_interrupted"]


def _temporary_sibling(path: Path) -> Path:
    """A hidden, unused name in ``path``'s directory. Created with the process umask (unlike
    tempfile's private 0700/0600 modes), so a checkpoint gets the permissions of any other file."""
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")


def _fsync_directory(path: Path) -> None:
    """Makes the entries of ``path`` (new names, renames) durable. Windows cannot open a directory."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_directory(Path(directory))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def restore_interrupted(final: str | os.PathLike[str]) -> None:
    """Undoes a crash between the two renames of :func:`atomic_directory`: when ``final`` is
    missing and its previous version sits aside, that version takes its name back."""
    final = Path(final)
    if final.exists() or not final.parent.is_dir():
        return
    aside = sorted(final.parent.glob(f".{final.name}.tmp-*-old"), key=lambda p: p.stat().st_mtime)
    if aside:
        try:
            os.rename(aside[-1], final)
        except OSError as e:
            raise CheckpointError(f"{final} is missing and restoring it from {aside[-1]} failed: {e}") from e


@contextmanager
def atomic_directory(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a new empty directory to fill; on normal exit it replaces ``final``.

    The directory sits next to ``final`` (same filesystem). When the ``with`` body raises, the
    temporary directory is removed and ``final`` is left untouched. A filesystem failure (writing
    in the body, or the final renames) raises :class:`CheckpointError` naming ``final``, after
    restoring the previous ``final`` if one existed.
    """
    final = Path(final)
    restore_interrupted(final)
    if final.exists() and not final.is_dir():
        raise CheckpointError(f"cannot write a checkpoint directory at {final}: a file of that name exists")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary_sibling(final)
        tmp.mkdir()
    except OSError as e:
        raise CheckpointError(f"cannot create a checkpoint directory next to {final}: {e}") from e
    try:
        yield tmp
        _fsync_tree(tmp)
    except OSError as e:
        _remove(tmp)
        raise CheckpointError(f"writing checkpoint {final} failed, the previous one is kept: {e}") from e
    except BaseException:
        _remove(tmp)
        raise
    _swap_in(tmp, final)


def _swap_in(tmp: Path, final: Path) -> None:
    """Renames the finished directory ``tmp`` to ``final``, keeping the old ``final`` until it has."""
    old = tmp.with_name(f"{tmp.name}-old") if final.exists() else None
    try:
        if old is not None:
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:
            if old is not None:
                os.rename(old, final)
            raise
    except OSError as e:
        _remove(tmp)
        raise CheckpointError(f"replacing checkpoint {final} failed, the previous one is kept: {e}") from e
    if old is not None:
        _remove(old)
    try:
        _fsync_directory(final.parent)
    except OSError as e:
        raise CheckpointError(f"checkpoint {final} was written, but syncing {final.parent} failed: {e}") from e


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file, fsync and ``os.replace``.

    On failure the temporary file is removed and ``path`` keeps its previous content (or stays
    absent); a filesystem failure raises :class:`CheckpointError` naming ``path``.
    """
    path = Path(path)
    tmp = _temporary_sibling(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"writing {path} failed, its previous content is kept: {e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded with ``encoding``."""
    atomic_write_bytes(path, text.encode(encoding))
