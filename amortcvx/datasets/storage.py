"""On-disk format of a dataset folder: atomic writes, content hashes, the manifest and the chunk files.

A dataset folder holds::

    manifest.json          what the folder is (problem fingerprint, backend, settings, ...) and which chunks
                           are finished, with the SHA-256 of each chunk file and of its parameters
    chunk-00000.npz        instances [0, chunk_size), uncompressed numpy archive
    chunk-00001.npz        instances [chunk_size, 2 chunk_size), ...
    .lock                  advisory lock held while a generator writes into the folder

Every file is written to a hidden temporary file in the same folder, flushed, ``fsync``-ed and renamed over
the final name with ``os.replace`` (atomic on POSIX and Windows), and the folder is ``fsync``-ed after the
rename. A file under a final name is therefore always complete; a crash leaves at most a temporary file
(``.<name>.tmp-*``), which readers never look at and the next generator removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
TMP_MARK = ".tmp-"

# Indirection so tests can simulate a crash at the rename.
_replace = os.replace

# Arrays every chunk holds, besides the parameters ``param_<k>`` (k in the manifest's parameter order).
SOLUTION_KEYS = ("x", "y", "s")
RESULT_KEYS = ("status", "iterations", "objective", "setup_time", "solve_time")


class DatasetError(ValueError):
    """A dataset folder is inconsistent with what was asked (another problem, backend, settings or data)."""


def chunk_name(index: int) -> str:
    """File name of chunk ``index`` (``chunk-00003.npz``)."""
    return f"chunk-{index:05d}.npz"


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of the content of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def params_hash(params: Mapping[str, np.ndarray], names: Sequence[str]) -> str:
    """Hex SHA-256 of a parameter batch: for each name in ``names`` order, the name, shape and float64 bytes.

    Two batches hash equal iff they hold the same names, shapes and bit-identical float64 values.
    """
    h = hashlib.sha256()
    for name in names:
        arr = np.ascontiguousarray(params[name], dtype=np.float64)
        h.update(name.encode())
        h.update(repr(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------- atomic writes
def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``.

    Writes a temporary file next to ``path``, ``fsync``-s it, renames it over ``path`` with ``os.replace``
    and ``fsync``-s the folder. On an exception the temporary file is removed; after a hard crash (kill,
    power loss) it may remain, under a name readers ignore (``.<name>.tmp-<pid>-<random>``).
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete temporary files left by interrupted writes in ``folder``; returns the removed paths.

    Call it only while holding the folder's lock (see :func:`folder_lock`): then no live writer owns them.
    """
    removed = []
    for p in folder.iterdir():
        if p.name.startswith(".") and TMP_MARK in p.name and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``folder`` (``fcntl.flock`` on ``folder/.lock``).

    The operating system drops the lock when the holding process dies, so a crashed run never leaves a stale
    lock. On platforms without ``fcntl`` this is a no-op.

    Raises:
        RuntimeError: another process holds the lock (two generators must not write into one folder).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise RuntimeError(
                f"another process is generating into {folder} (it holds {folder / LOCK}); wait for it to "
                "finish or use another root / name") from exc
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- manifest
def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Atomically write ``manifest`` as ``folder/manifest.json``."""
    text = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False)
    atomic_write_bytes(folder / MANIFEST, (text + "\n").encode())


def read_manifest(folder: Path) -> dict[str, Any]:
    """Read ``folder/manifest.json``.

    Raises:
        FileNotFoundError: there is no manifest (the folder is not a dataset).
        DatasetError: the manifest is not valid JSON or lacks required keys.
    """
    path = Path(folder) / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: {folder} is not an amortcvx dataset folder") \
            from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc}); the folder is damaged") from exc
    required = ("format_version", "fingerprint", "backend", "form", "settings", "parameters", "n", "m",
                "num_instances", "chunk_size", "chunks")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise DatasetError(f"{path} lacks the key(s) {missing}; it was not written by amortcvx.datasets")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DatasetError(f"{path} has format_version {manifest['format_version']}; this amortcvx reads "
                           f"format_version {FORMAT_VERSION}")
    return manifest


# ---------------------------------------------------------------------- chunks
def encode_chunk(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Serialize a chunk (name -> array; no object arrays) as the bytes of an uncompressed ``.npz``."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def load_chunk(path: Path) -> dict[str, np.ndarray]:
    """Load every array of a chunk file (``allow_pickle=False``).

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetError: the file is not a readable ``.npz`` archive (truncated, overwritten, ...), naming it.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - BadZipFile, EOFError, ValueError, OSError, zlib.error, ...
        raise DatasetError(f"chunk file {path} is damaged or truncated and cannot be read "
                           f"({type(exc).__name__}: {exc}); rerun generate_dataset with the same inputs to "
                           "recompute it") from exc
