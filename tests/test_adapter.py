"""Linear query adapter: identity, training on a real SciFact train slice, persistence, export, guards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mteb.types import PromptType
from reference import ref_adapter_loss

from mteb_steer.encoder import SteerEncoder
from mteb_steer.identity import steered_meta
from mteb_steer.steering.adapter import (
    LOSSES,
    AdapterTrainConfig,
    PairSet,
    QueryAdapter,
    adapter_loss,
    export_sentence_transformer,
    holdout_mask,
    pairs_from_bank,
    pairs_from_split,
    positive_table,
    split_groups,
    train_adapter,
    training_pairs,
)
from mteb_steer.steering.fusion import reciprocal_ranks

N_QUERIES = 120  # SciFact train queries in the slice
N_DISTRACTORS = 100  # other SciFact passages, as negatives and competition
SNIPPET_WORDS = 32  # passages cut to their first words: same data, seconds to embed on 2 cores
FAST = AdapterTrainConfig(epochs=8, patience=8, batch_size=32, random_negatives=32, lr=2e-3)


@pytest.fixture(scope="module")
def scifact_train(data_root) -> PairSet:
    return pairs_from_split(data_root / "scifact", "train")


@pytest.fixture(scope="module")
def train_slice(scifact_train: PairSet) -> PairSet:
    """The first N_QUERIES SciFact train queries, their relevant passages and N_DISTRACTORS others."""
    full = scifact_train
    keep = set(sorted(set(full.groups), key=int)[:N_QUERIES])
    pairs = [i for i, g in enumerate(full.groups) if g in keep]
    positives = set(full.positives[pairs].tolist())
    rows = sorted(positives | set([r for r in range(len(full.corpus_texts)) if r not in positives][:N_DISTRACTORS]))
    new_row = {r: i for i, r in enumerate(rows)}
    return PairSet(queries=[full.queries[i] for i in pairs],
                   positives=np.array([new_row[r] for r in full.positives[pairs].tolist()]),
                   groups=[full.groups[i] for i in pairs],
                   corpus_texts=[" ".join(full.corpus_texts[r].split()[:SNIPPET_WORDS]) for r in rows],
                   name=full.name, training_datasets=full.training_datasets)


@pytest.fixture(scope="module")
def trained(encoder, train_slice):
    return train_adapter(encoder, train_slice, FAST, show_progress_bar=False)


def _base_queries(encoder: SteerEncoder, data: PairSet) -> np.ndarray:
    """Base vectors of the pair queries, embedded as `train_adapter` embeds them (the cache hits)."""
    return encoder.embed(data.queries, PromptType.query, apply_transforms=False)


def _pair_mrr(encoder: SteerEncoder, data: PairSet, adapter: QueryAdapter | None) -> float:
    queries = _base_queries(encoder, data)
    if adapter is not None:
        queries = adapter.transform_queries(queries)
    corpus = encoder.embed(data.corpus_texts, PromptType.document)
    return float(reciprocal_ranks(queries, data.positives, corpus, encoder).mean())


# -- the map ----------------------------------------------------------------------------------------
def test_identity_adapters_equal_plain_encoder_exactly(encoder, train_slice):
    identities = [QueryAdapter(384, rank=rank, bias=bias) for rank in (None, 8) for bias in (True, False)]
    adapted = SteerEncoder(device="cpu", query_transforms=identities, cache_dir=encoder.cache.folder)
    texts = train_slice.queries
    plain = encoder.embed(texts, PromptType.query)
    out = adapted.embed(texts, PromptType.query)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, plain)
    assert adapted.mteb_model_meta.name.endswith("-adapter-identity+adapter-identity+adapter-identity+adapter-identity")
    assert adapted.mteb_model_meta.revision != encoder.mteb_model_meta.revision


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rank=st.sampled_from([None, 1, 3]), bias=st.booleans(),
       log_norms=st.lists(st.floats(-3, 3), min_size=1, max_size=6))
def test_output_keeps_input_norm_and_matches_weight_matrix(seed, rank, bias, log_norms):
    torch.manual_seed(seed)
    adapter = QueryAdapter(6, rank=rank, bias=bias, seed=seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = np.random.default_rng(seed).normal(size=(len(log_norms), 6))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True) * np.exp(log_norms)[:, None]).astype(np.float32)
    y = adapter.transform_queries(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)
    weight, offset = adapter.weight_matrix()
    linear = x.astype(np.float64) @ weight.double().numpy().T + (0 if offset is None else offset.double().numpy())
    expected = linear / np.linalg.norm(linear, axis=1, keepdims=True) * np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_transform_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"shape \(n, 384\)"):
        QueryAdapter(384).transform_queries(np.zeros((2, 768), dtype=np.float32))
    with pytest.raises(ValueError, match="rank"):
        QueryAdapter(16, rank=17)


@pytest.mark.parametrize("loss", LOSSES)
def test_batched_loss_matches_loop_reference(loss):
    rng = np.random.default_rng(3)
    queries, candidates = rng.normal(size=(5, 4)), rng.normal(size=(9, 4))
    excluded = rng.random((5, 9)) < 0.3
    excluded[np.arange(5), np.arange(5)] = False
    got = adapter_loss(torch.tensor(queries), torch.tensor(candidates), torch.tensor(excluded), loss,
                       scale=7.0, margin=0.3)
    want = ref_adapter_loss(queries.tolist(), candidates.tolist(), excluded.tolist(), loss, 7.0, 0.3)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_holdout_never_splits_a_query_or_a_passage(scifact_train):
    by_query = holdout_mask(scifact_train, AdapterTrainConfig())
    groups = np.array(scifact_train.groups)
    assert not set(groups[by_query]) & set(groups[~by_query])
    assert 0.05 < by_query.mean() < 0.15
    by_passage = holdout_mask(scifact_train, AdapterTrainConfig(holdout="passage"))
    positives = scifact_train.positives
    assert not set(positives[by_passage]) & set(positives[~by_passage])
    assert set(groups[by_query]) != set(groups[by_passage])


def test_positive_table_excludes_every_positive_of_the_same_query():
    table = positive_table(np.array([4, 7, 4, 2]), ["q1", "q1", "q2", "q3"])
    assert table.tolist() == [[4, 7], [4, 7], [4, -1], [2, -1]]
    held = split_groups(["a", "a", "b", "c", "d"], 0.5, seed=1)
    assert held[0] == held[1] and 0 < held.sum() < 5


# -- training ---------------------------------------------------------------------------------------
def test_trained_adapter_improves_training_pair_retrieval(encoder, train_slice, trained):
    adapter, history = trained
    before, after = _pair_mrr(encoder, train_slice, None), _pair_mrr(encoder, train_slice, adapter)
    assert after > before + 0.05, (before, after)
    assert history.best_epoch >= 1
    assert history.epochs[history.best_epoch]["val_mrr_at_10"] > history.epochs[0]["val_mrr_at_10"]
    assert history.n_val_pairs > 0 and history.n_train_pairs + history.n_val_pairs == len(train_slice.queries)
    assert adapter.tag == "adapter-scifact-train"
    assert adapter.training_datasets == {"SciFact"}
    assert "SciFact" in steered_meta(encoder.base_meta, [adapter]).training_datasets


@pytest.mark.parametrize("loss", ["triplet", "mse"])
def test_other_losses_train_and_training_is_deterministic(encoder, train_slice, loss):
    config = AdapterTrainConfig(loss=loss, rank=16, epochs=3, patience=3, batch_size=32, random_negatives=16)
    first, h1 = train_adapter(encoder, train_slice, config, show_progress_bar=False)
    second, h2 = train_adapter(encoder, train_slice, config, show_progress_bar=False)
    assert h1.epochs[1:] == h2.epochs[1:] and h1.epochs[1]["train_loss"] > 0
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert first.describe() == second.describe()
    assert len(h1.epochs) == 4 and all(np.isfinite(e["val_mrr_at_10"]) for e in h1.epochs)


def test_bad_training_config_fails_before_any_work():
    with pytest.raises(ValueError, match="unknown adapter loss"):
        AdapterTrainConfig(loss="cosine")
    with pytest.raises(ValueError, match="val_fraction"):
        AdapterTrainConfig(val_fraction=1.0)


# -- persistence and export -------------------------------------------------------------------------
def test_save_load_gives_identical_vectors_and_identity(encoder, train_slice, trained, tmp_path):
    adapter = trained[0]
    adapter.save(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    assert set(json.loads((tmp_path / "a" / "adapter_config.json").read_text())) == set(QueryAdapter.config_keys)
    loaded = QueryAdapter.load(tmp_path / "a", expect_base=encoder.base_meta)
    base = _base_queries(encoder, train_slice)
    np.testing.assert_array_equal(loaded.transform_queries(base), adapter.transform_queries(base))
    assert loaded.describe() == adapter.describe()
    assert loaded.describe()["fingerprint"] != QueryAdapter(384, data=adapter.data).describe()["fingerprint"]
    other = encoder.base_meta.model_copy(update={"name": "someone/else"})
    with pytest.raises(ValueError, match="trained for"):
        QueryAdapter.load(tmp_path / "a", expect_base=other)
    with pytest.raises(FileNotFoundError, match=r"missing adapter_config\.json"):
        QueryAdapter.load(tmp_path)


def test_exported_sentence_transformer_reproduces_the_adapter(encoder, train_slice, trained, tmp_path):
    from sentence_transformers import SentenceTransformer

    adapter = trained[0]
    export_sentence_transformer(encoder, adapter, tmp_path / "st")
    shipped = SentenceTransformer(str(tmp_path / "st"), device="cpu", local_files_only=True)
    queries = train_slice.queries[:32]
    base = _base_queries(encoder, train_slice)[:32]
    got = shipped.encode_query(queries, convert_to_numpy=True)
    np.testing.assert_allclose(got, adapter.transform_queries(base), atol=2e-6)
    assert np.abs(got - base).max() > 1e-3  # the adapter really acts
    docs = encoder.embed(train_slice.corpus_texts, PromptType.document)[:16]
    np.testing.assert_allclose(shipped.encode_document(train_slice.corpus_texts[:16], convert_to_numpy=True),
                               docs, atol=1e-6)


# -- data sources and guards ------------------------------------------------------------------------
def test_eval_split_is_refused(data_root):
    for data, split in [(data_root / "scifact", "test"), ("SciFact", "test"), ("ArguAna", "test"),
                        ("TRECDLPool", "dl19")]:
        with pytest.raises(ValueError, match="evaluation split"):
            pairs_from_split(data, split, data_root)
    with pytest.raises(ValueError, match="--query-bank"):
        training_pairs()


def test_labelled_pairs_are_the_train_qrels(scifact_train, data_root):
    assert len(scifact_train.queries) == 919 and len(set(scifact_train.groups)) == 809
    assert scifact_train.training_datasets == {"SciFact"} and scifact_train.name == "scifact-train"
    assert pairs_from_split("SciFact", "train", data_root).fingerprint() == scifact_train.fingerprint()


def test_generated_query_pairs_name_the_corpus_and_no_labels(encoder, data_root, tmp_path):
    pairs = training_pairs(query_bank=data_root / "arguana-genq")
    assert pairs.name == "genq-arguana" and pairs.training_datasets == frozenset()
    assert len(pairs.queries) == 25_844 and len(pairs.corpus_texts) == 8_674
    assert np.all(np.diff(pairs.positives) >= 0)  # corpus row order, as query fusion embeds the bank
    adapter = QueryAdapter(384, data=pairs.name, training_datasets=pairs.training_datasets)
    meta = steered_meta(encoder.base_meta, [adapter])
    assert meta.name.endswith("-adapter-genq-arguana")
    assert meta.training_datasets == encoder.base_meta.training_datasets
    corpus = [{"id": "d1", "title": "", "text": "a passage"}]
    with pytest.raises(ValueError, match="absent from the corpus"):
        pairs_from_bank({"d2": ["a query"]}, corpus, "tiny")
    (tmp_path / "bank.jsonl").write_text('{"id": "d1", "queries": ["q"]}\n')
    with pytest.raises(ValueError, match="also give --data"):
        training_pairs(query_bank=tmp_path / "bank.jsonl")
