"""Disk cache of base-model embeddings, so a grid of steering configurations encodes a corpus once.

Key: model name + revision, prompt type and the exact list of texts (order included). A hit
returns the stored float32 array; a miss stores what was computed. Writes go to a temporary
file first, so a crash never leaves a truncated array behind.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

CACHE_ENV = "MTEB_STEER_EMBEDDING_CACHE"


def default_embedding_cache() -> str:
    """Where the benchmark and the evaluation scripts share base vectors: `$MTEB_STEER_EMBEDDING_CACHE`,
    else `~/.cache/mteb_steer/embeddings` (keys cover model, prompt type and texts, so any run may share it)."""
    return os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "mteb_steer" / "embeddings")


class EmbeddingCache:
    """A folder of `.npy` files, one per (model, prompt type, text list)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(model_id: str, prompt_type: str, texts: list[str]) -> str:
        digest = hashlib.sha256(f"{model_id}\x00{prompt_type}\x00{len(texts)}".encode())
        for text in texts:
            digest.update(text.encode())
            digest.update(b"\x00")
        return digest.hexdigest()[:24]

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.npy"

    def has(self, key: str) -> bool:
        return self._path(key).exists()

    def get(self, key: str) -> np.ndarray | None:
        path = self._path(key)
        return np.load(path) if path.exists() else None

    def put(self, key: str, embeddings: np.ndarray) -> None:
        tmp = self.folder / f"{key}.{os.getpid()}.tmp.npy"
        np.save(tmp, embeddings)
        tmp.replace(self._path(key))
