"""Disk cache of base-model embeddings, so a grid of steering configurations encodes a corpus once.

Key: model name + revision (which name the encoding backend and dtype too, see
`identity.encoding_meta`), prompt type, storage dtype and the exact list of texts (order
included). Files are plain `.npy` arrays, read back memory-mapped (copy-on-write: the file is
never changed), so a corpus larger than RAM can be searched block by block.

Writes go row block by row block into `<key>.partial.npy` (memory-mapped, so no second full
copy is held in RAM) and are published by one rename onto the final name only once complete, so
a partial file is never read as an entry. After each block the writer flushes its rows, then
records how many rows are done in `<key>.partial.json` (an atomic write): a run killed mid-corpus
leaves both behind, and a rerun with the same key continues from the first unfinished block
instead of encoding the corpus again. One writer per key holds `<key>.lock` (an advisory `flock`,
released by the kernel when its process dies, even by `kill -9`); a second concurrent writer
writes a private `<key>.<pid>.tmp.npy` instead, so neither corrupts the other. A final file that
does not hold the expected shape (truncated by other means) is treated as a miss and removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mteb_steer.files import write_atomic

try:
    import fcntl
except ImportError:  # no flock (Windows): every writer takes a private file, nothing resumes
    fcntl = None  # type: ignore[assignment]

CACHE_ENV = "MTEB_STEER_EMBEDDING_CACHE"
STORAGE_DTYPES = ("float32", "float16")

logger = logging.getLogger(__name__)


def default_embedding_cache() -> str:
    """Where the benchmark and the evaluation scripts share base vectors: `$MTEB_STEER_EMBEDDING_CACHE`,
    else `~/.cache/mteb_steer/embeddings` (keys cover model, prompt type and texts, so any run may share it)."""
    return os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "mteb_steer" / "embeddings")


def check_storage_dtype(storage: str) -> str:
    """Validate a storage dtype name early (before any model loads)."""
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"unknown embedding storage dtype {storage!r}: use one of {', '.join(STORAGE_DTYPES)}")
    return storage


class EmbeddingCache:
    """A folder of `.npy` files, one per (model, prompt type, storage dtype, text list).

    Storage dtype: "float32" (exact) or "float16" (half the disk and page cache; relative error
    below 1e-3 per component, see tests/test_embedding_cache.py). It is part of the key.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(model_id: str, prompt_type: str, texts: list[str], storage: str = "float32") -> str:
        """Content key. float32 storage keeps the historical key, so caches written before stay valid."""
        header = f"{model_id}\x00{prompt_type}\x00{len(texts)}"
        if check_storage_dtype(storage) != "float32":
            header += f"\x00storage={storage}"
        digest = hashlib.sha256(header.encode())
        for text in texts:
            digest.update(text.encode())
            digest.update(b"\x00")
        return digest.hexdigest()[:24]

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.npy"

    def has(self, key: str) -> bool:
        return self._path(key).exists()

    def get(self, key: str, rows: int | None = None) -> np.ndarray | None:
        """The stored array, memory-mapped copy-on-write (None on a miss).

        `rows`, when given, is the expected number of vectors: a file with another shape, or one
        numpy cannot map (truncated), is removed and reported as a miss rather than trusted.
        """
        path = self._path(key)
        if not path.exists():
            return None
        try:
            array = np.load(path, mmap_mode="c")
        except (ValueError, OSError, EOFError) as err:
            logger.warning("embedding cache file %s is unreadable (%s): ignored and removed", path, err)
            path.unlink(missing_ok=True)
            return None
        if array.ndim != 2 or (rows is not None and array.shape[0] != rows):
            logger.warning("embedding cache file %s has shape %s, expected (%s, dim): ignored and removed",
                           path, array.shape, rows)
            del array
            path.unlink(missing_ok=True)
            return None
        return array

    def written(self, key: str, rows: int) -> np.ndarray:
        """The entry a `writer` block just published (memory-mapped); an error if it is not there."""
        stored = self.get(key, rows=rows)
        if stored is None:
            raise RuntimeError(f"embedding cache {self.folder}: {key}.npy vanished right after writing")
        return stored

    @contextmanager
    def writer(self, key: str, rows: int, dim: int, storage: str = "float32") -> Iterator[PartialEntry]:
        """Yield a `PartialEntry` over a writable memory-mapped (rows, dim) array of dtype `storage`.

        Fill rows from `entry.done` on, block by block, calling `entry.commit(end)` after each block;
        when the `with` body ends without an exception the file is flushed and atomically renamed
        to its final name. On an exception (or a kill) the committed rows stay in the partial file
        for the next writer of this key; nothing is ever read back from it as an entry.
        """
        check_storage_dtype(storage)
        with _claimed(self.folder / f"{key}.lock") as owner:
            if owner:
                _remove_dead_private_files(self.folder, key)
                entry = PartialEntry(self.folder / f"{key}.partial.npy", self.folder / f"{key}.partial.json",
                                     rows, dim, storage)
            else:  # another live writer owns the resumable file: work privately, resume nothing
                logger.info("embedding cache %s: %s is being written by another process; writing a private copy",
                            self.folder, key)
                entry = PartialEntry(self.folder / f"{key}.{os.getpid()}.tmp.npy", None, rows, dim, storage)
            try:
                yield entry
                entry.publish(self._path(key))
            finally:
                entry.close()

    def put(self, key: str, embeddings: np.ndarray, storage: str = "float32", block_rows: int = 65_536) -> None:
        """Store a whole array, converted to `storage` block by block (use the key made with the same storage)."""
        embeddings = np.asarray(embeddings)
        rows = embeddings.shape[0]
        with self.writer(key, rows, embeddings.shape[1], storage) as entry:
            for start in range(entry.done, rows, block_rows):
                end = min(start + block_rows, rows)
                entry.array[start:end] = embeddings[start:end]
                entry.commit(end)


class PartialEntry:
    """A cache entry being written: `array` (memory-mapped, rows x dim) and `done`, the rows that an
    earlier, interrupted writer of the same key already committed (0 for a fresh or private file).

    `progress` is the record of committed rows (None: a private file that is never resumed). It is
    trusted only when it names this exact shape and dtype and the file maps with them; otherwise
    the file starts afresh, so a stale or foreign partial file can cost work but never give wrong rows.
    """

    def __init__(self, path: Path, progress: Path | None, rows: int, dim: int, storage: str) -> None:
        self.path, self.progress = path, progress
        self._shape = {"rows": rows, "dim": dim, "dtype": storage}
        self.done = 0
        self.array = self._resume() if progress is not None else None
        if self.array is None:
            if progress is not None:  # a record left for another shape must not vouch for this new file
                progress.unlink(missing_ok=True)
            self.array = np.lib.format.open_memmap(path, mode="w+", dtype=storage, shape=(rows, dim))
        elif self.done:
            logger.info("embedding cache: resuming %s at row %d of %d (an interrupted run's blocks are kept)",
                        path.name, self.done, rows)

    def _resume(self) -> np.ndarray | None:
        try:
            record = json.loads(self.progress.read_text())
            done = int(record.pop("done"))
            if record != self._shape or not 0 <= done <= self._shape["rows"]:
                return None
            array = np.lib.format.open_memmap(self.path, mode="r+")
        except (OSError, ValueError, KeyError, TypeError, EOFError):  # absent, torn or foreign: start afresh
            return None
        if array.shape != (self._shape["rows"], self._shape["dim"]) or array.dtype != self._shape["dtype"]:
            return None
        self.done = done
        return array

    def commit(self, done: int) -> None:
        """Rows [0, done) are written: flush them to the file, then (only then) record the count."""
        self.array.flush()
        if self.progress is not None:
            write_atomic(self.progress, json.dumps({**self._shape, "done": done}))

    def publish(self, target: Path) -> None:
        """Make the complete file the entry: flush, fsync, rename; the progress record goes with it."""
        self.array.flush()
        self.array = None  # unmap before the rename
        with self.path.open("rb+") as fh:
            os.fsync(fh.fileno())
        self.path.replace(target)
        if self.progress is not None:
            self.progress.unlink(missing_ok=True)

    def close(self) -> None:
        """Unmap; a private file, or one with nothing committed, is removed (nothing to resume)."""
        self.array = None
        committed = self.progress is not None and self.progress.exists()
        if not committed:
            self.path.unlink(missing_ok=True)


def _remove_dead_private_files(folder: Path, key: str) -> None:
    """Delete `<key>.<pid>.tmp.npy` files whose writer process is gone (killed mid-write): nothing reads
    them, so they would only fill the disk. A live pid's file is kept (that writer may still publish it)."""
    for path in folder.glob(f"{key}.*.tmp.npy"):
        pid = path.name[len(key) + 1: -len(".tmp.npy")]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            logger.info("embedding cache %s: removing %s, left by a writer that is gone", folder, path.name)
            path.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            continue


@contextmanager
def _claimed(path: Path) -> Iterator[bool]:
    """Hold an exclusive, non-blocking `flock` on `path` (created if absent); yields False when another
    live process holds it (or flock is unavailable).

    The kernel drops the lock when its holder dies, so a killed writer never blocks its rerun. The
    holder unlinks the file before closing it; a process that locked that unlinked file meanwhile
    sees another inode at `path` and backs off, so two processes never both own the key.
    """
    fd = None
    if fcntl is not None:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                raise FileNotFoundError(path)
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            fd = None
    try:
        yield fd is not None
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)
            os.close(fd)
