"""The base-embedding cache: memory-mapped reads, block-wise crash-safe writes, float16 storage,
and keys that separate backends, precisions and storage dtypes (issue 12)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mteb_steer.embedding_cache import EmbeddingCache

TEXTS = ["first passage", "second passage"]


def test_float32_key_is_the_historical_one():
    # pinned from the cache code before issue 12: existing caches of torch float32 vectors stay valid
    assert EmbeddingCache.key("sentence-transformers/all-MiniLM-L6-v2@abc", "document", TEXTS) == "ea542da95bf34855468182e6"
    assert EmbeddingCache.key("m@r", "document", TEXTS, "float16") != EmbeddingCache.key("m@r", "document", TEXTS)
    with pytest.raises(ValueError, match="bfloat16"):
        EmbeddingCache.key("m@r", "document", TEXTS, "bfloat16")


def test_read_back_is_a_memory_map_with_equal_vectors(tmp_path):
    cache = EmbeddingCache(tmp_path)
    vectors = np.random.default_rng(0).standard_normal((1000, 16)).astype(np.float32)
    cache.put("k", vectors, block_rows=128)  # several blocks
    back = cache.get("k", rows=1000)
    assert isinstance(back, np.memmap)
    np.testing.assert_array_equal(back, vectors)
    back[0] = 0  # copy-on-write: the file is never changed by a reader
    np.testing.assert_array_equal(cache.get("k"), vectors)


def test_float16_storage_round_trips_within_tolerance(tmp_path):
    cache = EmbeddingCache(tmp_path)
    vectors = np.random.default_rng(1).standard_normal((300, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cache.put("k16", vectors, storage="float16")
    back = cache.get("k16")
    assert back.dtype == np.float16
    assert (tmp_path / "k16.npy").stat().st_size < vectors.nbytes * 0.55
    np.testing.assert_allclose(back.astype(np.float32), vectors, rtol=1e-3, atol=1e-4)
    back32 = back.astype(np.float32)
    cosine = np.sum(back32 * vectors, axis=1) / np.linalg.norm(back32, axis=1)
    assert cosine.min() > 0.99999


def test_failed_write_publishes_nothing(tmp_path):
    cache = EmbeddingCache(tmp_path)
    with pytest.raises(RuntimeError, match="encoder died"):
        with cache.writer("k", 10, 4) as out:
            out[:5] = 1.0
            raise RuntimeError("encoder died")
    assert not cache.has("k") and cache.get("k") is None
    assert list(tmp_path.iterdir()) == []


def test_killed_write_is_never_read_back(tmp_path):
    """A process killed (SIGKILL, no cleanup) halfway through writing leaves no valid cache entry."""
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        from mteb_steer.embedding_cache import EmbeddingCache
        cache = EmbeddingCache({str(tmp_path)!r})
        with cache.writer("k", 1000, 8) as out:
            out[:500] = 1.0
            out.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert leftovers and all(name.endswith(".tmp.npy") for name in leftovers)  # the half file is a temp file
    cache = EmbeddingCache(tmp_path)
    assert not cache.has("k") and cache.get("k", rows=1000) is None


def test_truncated_or_misshapen_file_is_a_miss(tmp_path):
    cache = EmbeddingCache(tmp_path)
    cache.put("k", np.ones((100, 8), dtype=np.float32))
    path = tmp_path / "k.npy"
    with path.open("rb+") as fh:
        fh.truncate(path.stat().st_size // 2)
    assert cache.get("k", rows=100) is None
    assert not path.exists()  # removed, so the next run re-encodes
    cache.put("k", np.ones((100, 8), dtype=np.float32))
    assert cache.get("k", rows=99) is None  # not the expected number of vectors
