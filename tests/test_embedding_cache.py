"""The base-embedding cache: memory-mapped reads, block-wise crash-safe writes that resume after a kill
(issue 15), float16 storage, and keys that separate backends, precisions and storage dtypes (issue 12)."""

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


def _write_blocks(cache: EmbeddingCache, vectors: np.ndarray, block: int, fail_after: int | None = None) -> list[int]:
    """Write `vectors` through `cache.writer` in blocks; raise after `fail_after` blocks. Returns the
    starts of the blocks this call wrote (what a resumed writer really did)."""
    written = []
    with cache.writer("k", len(vectors), vectors.shape[1]) as entry:
        for start in range(entry.done, len(vectors), block):
            if fail_after is not None and len(written) == fail_after:
                entry.array[start:start + block] = 7.0  # half a block: never committed, never trusted
                raise RuntimeError("encoder died")
            entry.array[start:start + block] = vectors[start:start + block]
            entry.commit(min(start + block, len(vectors)))
            written.append(start)
    return written


def test_interrupted_write_publishes_nothing_and_resumes_at_the_first_unfinished_block(tmp_path):
    cache = EmbeddingCache(tmp_path)
    vectors = np.random.default_rng(2).standard_normal((10, 4)).astype(np.float32)
    with pytest.raises(RuntimeError, match="encoder died"):
        _write_blocks(cache, vectors, block=3, fail_after=2)
    assert not cache.has("k") and cache.get("k") is None  # the partial file is never an entry
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.partial.json", "k.partial.npy"]  # lock released
    assert _write_blocks(cache, vectors, block=3) == [6, 9]  # blocks 0 and 3 are not written again
    np.testing.assert_array_equal(cache.get("k", rows=10), vectors)  # equals an uninterrupted write
    assert [p.name for p in tmp_path.iterdir()] == ["k.npy"]


def test_failure_before_any_block_leaves_nothing(tmp_path):
    cache = EmbeddingCache(tmp_path)
    with pytest.raises(RuntimeError, match="encoder died"):
        _write_blocks(cache, np.ones((10, 4), dtype=np.float32), block=3, fail_after=0)
    assert list(tmp_path.iterdir()) == []


def test_progress_for_another_shape_is_not_trusted(tmp_path):
    cache = EmbeddingCache(tmp_path)
    with pytest.raises(RuntimeError):
        _write_blocks(cache, np.ones((10, 4), dtype=np.float32), block=3, fail_after=2)
    with cache.writer("k", 10, 8) as entry:  # same key, other width: the 6 committed rows do not fit
        assert entry.done == 0
        entry.array[:] = 2.0
    np.testing.assert_array_equal(cache.get("k", rows=10), np.full((10, 8), 2.0, dtype=np.float32))


def test_concurrent_writer_of_one_key_writes_a_private_file(tmp_path):
    """While one writer owns a key, a second one (another descriptor, as another process would hold)
    neither resumes from nor writes into the owner's partial file."""
    cache = EmbeddingCache(tmp_path)
    with pytest.raises(RuntimeError):
        _write_blocks(cache, np.ones((10, 4), dtype=np.float32), block=3, fail_after=1)
    with cache.writer("k", 10, 4) as owner:
        assert owner.done == 3 and owner.path.name == "k.partial.npy"
        with cache.writer("k", 10, 4) as other:
            assert other.done == 0 and other.path.name == f"k.{os.getpid()}.tmp.npy"
            other.array[:] = 5.0
        owner.array[3:] = 1.0
        np.testing.assert_array_equal(np.asarray(owner.array), 1.0)  # untouched by the other writer
    np.testing.assert_array_equal(cache.get("k", rows=10), np.ones((10, 4), dtype=np.float32))  # last rename won
    assert [p.name for p in tmp_path.iterdir()] == ["k.npy"]


def test_owner_removes_private_files_of_dead_writers_only(tmp_path):
    """A second writer killed mid-write leaves `<key>.<pid>.tmp.npy`; the next owner of the key deletes
    it, but keeps the file of a live process (it may still publish)."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    dead, live = tmp_path / f"k.{gone}.tmp.npy", tmp_path / f"k.{os.getpid()}.tmp.npy"
    for path in (dead, live):
        np.save(path, np.zeros((2, 2), dtype=np.float32))
    other_key = tmp_path / f"other.{gone}.tmp.npy"
    np.save(other_key, np.zeros((2, 2), dtype=np.float32))
    EmbeddingCache(tmp_path).put("k", np.ones((10, 4), dtype=np.float32))
    assert not dead.exists() and live.exists() and other_key.exists()


def test_killed_write_is_never_read_back_and_resumes(tmp_path):
    """A process killed (SIGKILL, no cleanup) mid-block leaves no valid entry; the next writer keeps
    exactly the committed rows and rewrites the rest."""
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        from mteb_steer.embedding_cache import EmbeddingCache
        cache = EmbeddingCache({str(tmp_path)!r})
        with cache.writer("k", 1000, 8) as entry:
            entry.array[:400] = 1.0
            entry.commit(400)
            entry.array[400:500] = 9.0  # written, flushed, but not committed
            entry.array.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.lock", "k.partial.json", "k.partial.npy"]
    cache = EmbeddingCache(tmp_path)
    assert not cache.has("k") and cache.get("k", rows=1000) is None
    with cache.writer("k", 1000, 8) as entry:  # the dead writer's lock does not block its rerun
        assert entry.done == 400
        entry.array[400:] = 2.0
    back = cache.get("k", rows=1000)
    np.testing.assert_array_equal(back[:400], 1.0)
    np.testing.assert_array_equal(back[400:], 2.0)


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


# -- the encoder drives the writer: a resumed corpus pass encodes only the unfinished blocks ------
@pytest.fixture(scope="module")
def passages(data_root) -> list[str]:
    """Ten real SciFact passages (title + text, as mteb joins them)."""
    from itertools import islice

    from mteb_steer.beir import find_file, read_jsonl
    from mteb_steer.encoder import passage_text

    return [passage_text(r.get("title"), r["text"]) for r in islice(read_jsonl(find_file(data_root / "scifact",
                                                                                         "corpus")), 10)]


def _counting_encoder(encoder, folder, monkeypatch, fail_on_call: int | None = None) -> list[int]:
    """Point the session encoder at the cache `folder` and record how many texts each model call gets
    (raising on call `fail_on_call`, as a dying encoder would); returns the record."""
    monkeypatch.setattr(encoder, "cache", EmbeddingCache(folder))
    calls: list[int] = []
    original = type(encoder.model).encode_document.__get__(encoder.model)  # the model's own, not a wrapper

    def encode_document(texts, **kwargs):
        if fail_on_call is not None and len(calls) + 1 == fail_on_call:
            raise RuntimeError("encoder died")
        calls.append(len(texts))
        return original(texts, **kwargs)

    monkeypatch.setattr(encoder.model, "encode_document", encode_document)
    return calls


def test_interrupted_corpus_encoding_resumes_without_encoding_a_text_twice(encoder, passages, tmp_path,
                                                                           monkeypatch):
    import mteb_steer.encoder as encoder_module

    monkeypatch.setattr(encoder_module, "ENCODE_CHUNK", 4)  # 10 passages: blocks of 4, 4, 2
    died = _counting_encoder(encoder, tmp_path / "cache", monkeypatch, fail_on_call=3)
    with pytest.raises(RuntimeError, match="encoder died"):
        encoder.embed(passages, None)
    assert died == [4, 4] and encoder.cache.get(encoder.cache_key(encoder.base_meta, "document", passages)) is None
    calls = _counting_encoder(encoder, tmp_path / "cache", monkeypatch)
    resumed = encoder.embed(passages, None)
    assert calls == [2]  # only the unfinished block reaches the model
    whole = _counting_encoder(encoder, tmp_path / "uninterrupted", monkeypatch)
    np.testing.assert_array_equal(resumed, encoder.embed(passages, None))  # same blocks, same vectors
    assert whole == [4, 4, 2]


@pytest.mark.slow  # a second process loads torch and the model: about 20 s idle, minutes on a busy machine
def test_kill_9_during_corpus_encoding_then_the_rerun_encodes_only_the_rest(encoder, passages, tmp_path,
                                                                           monkeypatch):
    """A real `kill -9` of a process encoding real passages with the real model, during its third block."""
    import json

    import mteb_steer.encoder as encoder_module

    (tmp_path / "passages.json").write_text(json.dumps(passages))
    script = textwrap.dedent(f"""
        import json, os, signal
        import mteb_steer.encoder as encoder_module
        from mteb_steer.encoder import SteerEncoder
        encoder_module.ENCODE_CHUNK = 4
        model = SteerEncoder(device="cpu", cache_dir={str(tmp_path / "cache")!r})
        original, calls = model.model.encode_document, []
        def encode_document(texts, **kwargs):
            calls.append(len(texts))
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(texts, **kwargs)
        model.model.encode_document = encode_document
        model.embed(json.load(open({str(tmp_path / "passages.json")!r})), None)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == -signal.SIGKILL
    monkeypatch.setattr(encoder_module, "ENCODE_CHUNK", 4)
    calls = _counting_encoder(encoder, tmp_path / "cache", monkeypatch)
    resumed = encoder.embed(passages, None)
    assert calls == [2]
    _counting_encoder(encoder, tmp_path / "uninterrupted", monkeypatch)
    np.testing.assert_array_equal(resumed, encoder.embed(passages, None))


# -- the CLI: on by default, off with --no-embedding-cache, never filed --------------------------
def test_cli_keeps_vectors_in_the_default_cache_and_never_files_its_folder(data_root, tmp_path, monkeypatch):
    import json

    from mteb_steer.beir import write_beir_slice
    from mteb_steer.cli import main
    from mteb_steer.embedding_cache import CACHE_ENV

    task = write_beir_slice(data_root / "scifact", tmp_path / "tiny", "test", 2, 10)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "off"))
    assert main(["evaluate", "-t", str(task), "--output-folder", str(tmp_path / "o1"), "--no-embedding-cache"]) == 0
    assert not (tmp_path / "off").exists()  # nothing read or written
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    default = tmp_path / "home" / ".cache" / "mteb_steer" / "embeddings"
    assert main(["evaluate", "-t", str(task), "--output-folder", str(tmp_path / "o2"), "--lexical", "bm25"]) == 0
    assert len(list(default.glob("*.npy"))) == 2  # corpus and queries: no flag and no variable needed
    [config] = (tmp_path / "o2").rglob("steer_config.json")
    [meta] = (tmp_path / "o2").rglob("model_meta.json")
    for filed in (config, meta):
        assert "embedding_cache" not in filed.read_text() and str(default) not in filed.read_text()
    assert json.loads(config.read_text())["config"]["lexical"] == "bm25"  # the configuration itself is filed
