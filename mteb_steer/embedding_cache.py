"""Disk cache of base-model embeddings, so a grid of steering configurations encodes a corpus once.

Key: model name + revision (which name the encoding backend and dtype too, see
`identity.encoding_meta`), prompt type, storage dtype and the exact list of texts (order
included). Files are plain `.npy` arrays, read back memory-mapped (copy-on-write: the file is
never changed), so a corpus larger than RAM can be searched block by block.

Writes go row block by row block into a temporary `.npy` (itself memory-mapped, so no second
full copy is held in RAM) that is renamed onto the final name only once complete: a killed run
leaves at most a `*.tmp.npy` that is never read. A final file that does not hold the expected
shape (truncated by other means) is treated as a miss and removed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

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

    @contextmanager
    def writer(self, key: str, rows: int, dim: int, storage: str = "float32") -> Iterator[np.ndarray]:
        """Yield a writable memory-mapped (rows, dim) array of dtype `storage`; publish it on success.

        Fill it block by block; when the `with` body ends without an exception the file is flushed
        and atomically renamed to its final name. On an exception (or a kill) the temporary file is
        removed or left as `*.tmp.npy`, never read back.
        """
        tmp = self.folder / f"{key}.{os.getpid()}.tmp.npy"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=check_storage_dtype(storage),
                                        shape=(rows, dim))
        try:
            yield out
            out.flush()
            del out
            with tmp.open("rb+") as fh:
                os.fsync(fh.fileno())
            tmp.replace(self._path(key))
        finally:
            tmp.unlink(missing_ok=True)

    def put(self, key: str, embeddings: np.ndarray, storage: str = "float32", block_rows: int = 65_536) -> None:
        """Store a whole array, converted to `storage` block by block (use the key made with the same storage)."""
        embeddings = np.asarray(embeddings)
        with self.writer(key, embeddings.shape[0], embeddings.shape[1], storage) as out:
            for start in range(0, embeddings.shape[0], block_rows):
                out[start:start + block_rows] = embeddings[start:start + block_rows]
