"""Encoding backends and precisions (issue 12): identities and cache keys that keep vectors of
different precision apart, early rejection of combinations that cannot run, streamed cache writes,
and ONNX / OpenVINO vectors close to torch's."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from mteb_steer.backbone import plain_meta
from mteb_steer.embedding_cache import EmbeddingCache
from mteb_steer.encoder import SteerEncoder
from mteb_steer.encoding import Encoding
from mteb_steer.identity import encoding_meta, steered_meta

TEXTS = ["Aspirin reduces the risk of heart attack.", "The Eiffel Tower is in Paris.",
         "Vitamin D deficiency is common in northern countries.", "How do vaccines work?"]
ENCODINGS = [Encoding(), Encoding(dtype="float16"), Encoding(dtype="bfloat16"), Encoding("onnx"),
             Encoding("onnx", "int8"), Encoding("openvino"), Encoding("openvino", "int8"), Encoding(storage="float16")]


def test_default_encoding_keeps_the_identity_and_the_cache_key():
    base = plain_meta("sentence-transformers/all-MiniLM-L6-v2", "abc")
    assert encoding_meta(base, Encoding()) is base
    assert SteerEncoder.cache_key(base, "document", TEXTS) == EmbeddingCache.key(
        "sentence-transformers/all-MiniLM-L6-v2@abc", "document", TEXTS)


def test_every_encoding_has_its_own_identity_and_cache_key():
    base = plain_meta("sentence-transformers/all-MiniLM-L6-v2", "abc")
    metas = [encoding_meta(base, e) for e in ENCODINGS]
    assert len({(m.name, m.revision) for m in metas}) == len(ENCODINGS)
    assert metas[4].name == "mteb-steer/all-MiniLM-L6-v2-onnx-int8" and metas[4].adapted_from == base.name
    assert metas[4].loader_kwargs["encoding"]["quantization"] == "onnxruntime-dynamic-qint8-per-channel"
    keys = {SteerEncoder.cache_key(m, "document", TEXTS, e.storage) for m, e in zip(metas, ENCODINGS, strict=True)}
    assert len(keys) == len(ENCODINGS)
    # steered variants built on them stay apart too (their revision hashes the encoding's revision)
    assert len({steered_meta(m, []).revision for m in metas}) == len(ENCODINGS)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"backend": "tensorrt"}, "unknown backend 'tensorrt'"),
    ({"backend": "onnx", "dtype": "float16"}, "dtype 'float16' is not available with backend 'onnx'"),
    ({"dtype": "int8"}, "dtype 'int8' is not available with backend 'torch'"),
    ({"embedding_storage": "int8"}, "unknown embedding storage dtype 'int8'"),
    ({"device": "cpu", "dtype": "float16"}, "--dtype float16 needs a GPU"),
    ({"device": "cpu", "backend": "onnx", "dtype": "int8", "embedding_storage": "float64"}, "storage dtype 'float64'"),
])
def test_bad_encodings_fail_before_anything_loads(kwargs, match):
    from mteb_steer.pipeline import SteerConfig, build_encoder

    # a model path that does not exist: the encoding error must come first
    with pytest.raises(ValueError, match=match):
        build_encoder(SteerConfig(model="/nonexistent/model", **kwargs))


def test_cli_rejects_unknown_backend_and_dtype(capsys):
    from mteb_steer.cli import build_parser

    for flag, value in (("--backend", "tensorrt"), ("--dtype", "float64")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["evaluate", "-t", "SciFact", flag, value])
        assert "invalid choice" in capsys.readouterr().err
    args = build_parser().parse_args(["evaluate", "--backend", "onnx", "--dtype", "int8"])
    assert (args.backend, args.dtype, args.embedding_storage) == ("onnx", "int8", "float32")


def test_benchmark_runs_the_encoding_backends_script(capfd):
    import benchmark

    assert benchmark.main(["--encoding-backends", "--help"]) == 0
    assert "Encoding throughput and nDCG@10 of each CPU backend" in capfd.readouterr().out


def test_float16_storage_rounds_documents_whether_cached_or_not(encoder, tmp_path):
    half = SteerEncoder(backbone=encoder.backbone, device="cpu", cache_dir=tmp_path, embedding_storage="float16")
    plain = encoder.embed(TEXTS, None)
    fresh = half.embed(TEXTS, None)
    cached = half.embed(TEXTS, None, upcast=False)
    assert fresh.dtype == np.float32 and cached.dtype == np.float16 and isinstance(cached, np.memmap)
    np.testing.assert_array_equal(fresh, plain.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(cached.astype(np.float32), fresh)
    uncached = SteerEncoder(backbone=encoder.backbone, device="cpu", embedding_storage="float16")
    np.testing.assert_array_equal(uncached.embed(TEXTS, None), fresh)
    assert half.base_meta.name.endswith("-float16-store") and half.base_meta.name != encoder.base_meta.name


def test_corpus_streams_into_the_cache_in_blocks(encoder, tmp_path, monkeypatch):
    import mteb_steer.encoder as encoder_module

    monkeypatch.setattr(encoder_module, "ENCODE_CHUNK", 3)  # 4 texts -> blocks of 3 and 1
    calls = []
    streamed = SteerEncoder(backbone=encoder.backbone, device="cpu", cache_dir=tmp_path)
    original = streamed.model.encode_document
    monkeypatch.setattr(streamed.model, "encode_document", lambda texts, **kw: calls.append(len(texts)) or
                        original(texts, **kw))
    vectors = streamed.embed(TEXTS, None)
    assert calls == [3, 1]
    assert isinstance(vectors, np.memmap)
    np.testing.assert_allclose(vectors, encoder.embed(TEXTS, None), atol=1e-5)
    assert streamed.embed(TEXTS, None).shape == (4, 384) and calls == [3, 1]  # second call: a cache hit


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _close_to_torch(encoder, backend: str, dtype: str, min_cosine: float) -> None:
    other = SteerEncoder(backbone=encoder.backbone, backend=backend, dtype=dtype)  # exported once per machine
    assert other.encoding == Encoding(backend, dtype)
    assert _cosines(other.embed(TEXTS, None), encoder.embed(TEXTS, None)).min() > min_cosine


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs the onnx extra")
@pytest.mark.parametrize(("dtype", "min_cosine"), [("float32", 0.99999), ("int8", 0.98)])
def test_onnx_encodes_close_to_torch(encoder, dtype, min_cosine):
    _close_to_torch(encoder, "onnx", dtype, min_cosine)  # export ~10 s the first time, then ~2 s


@pytest.mark.slow  # the int8 export calibrates with NNCF: ~45 s the first time on 2 cores
@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="needs the openvino extra")
@pytest.mark.parametrize(("dtype", "min_cosine"), [("float32", 0.99999), ("int8", 0.98)])
def test_openvino_encodes_close_to_torch(encoder, dtype, min_cosine):
    _close_to_torch(encoder, "openvino", dtype, min_cosine)
