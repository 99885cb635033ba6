"""Query fusion: the math against float64 loop references, its invariants, auto selection, real slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mteb.types import PromptType
from reference import fuse_whole, ref_fuse, ref_mrr_at_10, ref_softmax_weights

from mteb_steer.identity import steered_meta
from mteb_steer.steering.banks import BankError, load_bank
from mteb_steer.steering.fusion import (
    CorpusQueries,
    MultiVectorMax,
    QueryFusion,
    corpus_queries,
    fuse_mean,
    fuse_rotate,
    fuse_sum,
    hold_out_one,
    passage_similarity,
    pick_strength,
    reciprocal_ranks,
    similarity_weights,
    weighted_sums,
)
from mteb_steer.steps import CorpusIndex, QueryBatch

FUSERS = {"mean": fuse_mean, "sum": fuse_sum, "rotate": fuse_rotate}


def _random_corpus(seed: int, n_docs: int, dim: int, max_queries: int):
    """Unit float64 passages near their unit float32 queries (like real embeddings), some without queries."""
    rng = np.random.default_rng(seed)
    passages = rng.normal(size=(n_docs, dim))
    passages /= np.linalg.norm(passages, axis=1, keepdims=True)
    per_doc = [[] for _ in range(n_docs)]
    for i in range(n_docs):
        for _ in range(rng.integers(0, max_queries + 1)):
            q = passages[i] + rng.normal(scale=rng.uniform(0.1, 2.0), size=dim)
            per_doc[i].append(q / np.linalg.norm(q))
    owner = np.array([i for i in range(n_docs) for _ in per_doc[i]], dtype=np.int64)
    vectors = np.array([q for qs in per_doc for q in qs], dtype=np.float32).reshape(-1, dim)
    queries = CorpusQueries([f"q{j}" for j in range(len(owner))], owner, vectors)
    return passages, per_doc, queries


corpus_args = {"seed": st.integers(0, 2**31), "n_docs": st.integers(1, 12), "dim": st.integers(2, 9),
               "max_queries": st.integers(0, 4)}


@settings(max_examples=60, deadline=None)
@given(**corpus_args, method=st.sampled_from(sorted(FUSERS)), strength=st.floats(0.0, 1.0))
def test_fusion_matches_loop_reference(seed, n_docs, dim, max_queries, method, strength):
    passages, per_doc, queries = _random_corpus(seed, n_docs, dim, max_queries)
    sums, counts = weighted_sums(queries, np.ones(len(queries.owner)), n_docs)
    fused = FUSERS[method](passages, sums, counts, strength)
    expected = ref_fuse(method, passages, [[q.astype(np.float32) for q in qs] for qs in per_doc], strength)
    np.testing.assert_allclose(fused, expected, atol=1e-6)
    has = counts > 0
    np.testing.assert_allclose(np.linalg.norm(fused[has], axis=1), 1.0, atol=1e-9)
    np.testing.assert_array_equal(fused[~has], passages[~has])  # no queries: the vector is kept


@settings(max_examples=60, deadline=None)
@given(**corpus_args, method=st.sampled_from(sorted(FUSERS)))
def test_zero_strength_gives_the_passage(seed, n_docs, dim, max_queries, method):
    passages, _, queries = _random_corpus(seed, n_docs, dim, max_queries)
    sums, counts = weighted_sums(queries, np.ones(len(queries.owner)), n_docs)
    np.testing.assert_allclose(FUSERS[method](passages, sums, counts, 0.0), passages, atol=1e-6)


@settings(max_examples=80, deadline=None)
@given(**corpus_args, gamma=st.floats(0.0, 4.5))
def test_rotation_respects_chord_bound_and_never_passes_the_centroid(seed, n_docs, dim, max_queries, gamma):
    passages, _, queries = _random_corpus(seed, n_docs, dim, max_queries)
    sums, counts = weighted_sums(queries, np.ones(len(queries.owner)), n_docs)
    fused = fuse_rotate(passages, sums, counts, gamma)
    p = passages
    chord2 = ((fused - p) ** 2).sum(axis=1)
    assert np.all(chord2 <= gamma + 1e-9)
    has = counts > 0
    centroid = sums[has] / np.linalg.norm(sums[has], axis=1, keepdims=True)
    angle = lambda a, b: np.arccos(np.clip((a * b).sum(axis=1), -1, 1))
    moved, left = angle(p[has], fused[has]), angle(fused[has], centroid)
    np.testing.assert_allclose(moved + left, angle(p[has], centroid), atol=1e-6)  # on the arc p -> c
    # the step is the largest allowed: either the bound is tight or f reached c
    assert np.all((np.abs(chord2[has] - gamma) < 1e-6) | (left < 1e-6))


@settings(max_examples=40, deadline=None)
@given(**corpus_args, temperature=st.floats(0.01, 2.0))
def test_similarity_weights_match_reference(seed, n_docs, dim, max_queries, temperature):
    passages, per_doc, queries = _random_corpus(seed, n_docs, dim, max_queries)
    per_doc = [[q.astype(np.float32) for q in qs] for qs in per_doc]  # the vectors the step sees
    weights = similarity_weights(queries, passages, temperature)
    expected = [w for i, qs in enumerate(per_doc) if qs for w in ref_softmax_weights(passages[i], qs, temperature)]
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    sums, counts = weighted_sums(queries, weights, n_docs)
    per_doc_weights = [ref_softmax_weights(passages[i], qs, temperature) if qs else [] for i, qs in enumerate(per_doc)]
    np.testing.assert_allclose(fuse_mean(passages, sums, counts, 0.3),
                               ref_fuse("mean", passages, per_doc, 0.3, per_doc_weights), atol=1e-6)


def test_scale_multiplies_query_weights():
    passages, _, queries = _random_corpus(5, 7, 6, 3)
    twice = np.full(len(queries.owner), 2.0)
    fusion = QueryFusion({"d": ["q"]}, "sum", beta=0.1)
    np.testing.assert_allclose(fusion.fuse(passages, queries, 0.1, twice), fusion.fuse(passages, queries, 0.2))


def test_weights_favour_queries_that_match_their_passage():
    passages, _, queries = _random_corpus(3, 6, 8, 4)
    cos = (queries.vectors * passages[queries.owner]).sum(axis=1)
    weights = similarity_weights(queries, passages, 0.05)
    for doc in np.unique(queries.owner):
        mine = queries.owner == doc
        assert weights[mine].mean() == pytest.approx(1.0)
        assert np.argmax(weights[mine]) == np.argmax(cos[mine])


def test_hold_out_one_per_passage_with_two_or_more():
    owner = np.array([0, 0, 0, 2, 3, 3, 5, 3, 0], dtype=np.int64)
    masks = [hold_out_one(owner, 6, seed) for seed in range(20)]
    for mask in masks:
        assert sorted(owner[mask]) == [0, 3]  # passage 2 and 5 have one query, 1 and 4 none
    np.testing.assert_array_equal(hold_out_one(owner, 6, 7), hold_out_one(owner, 6, 7))
    assert len({m.tobytes() for m in masks}) > 1  # the seed matters


# -- real data -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def arguana_slice(data_root, encoder):
    """The first 60 ArguAna passages (real text, MiniLM vectors) and their published generated queries."""
    from mteb_steer.beir import load_beir_split
    from mteb_steer.encoder import passage_text

    corpus = load_beir_split(data_root / "arguana", "test").corpus[:60]
    ids = [row["id"] for row in corpus]
    texts = [passage_text(row["title"], row["text"]) for row in corpus]
    bank = load_bank(data_root / "arguana-genq")
    bank = {doc_id: bank[doc_id] for doc_id in ids[:48]}  # the last 12 passages have no queries
    index = CorpusIndex(ids=ids, texts=texts, embeddings=encoder.embed(texts, PromptType.document),
                        task_name="ArguAna-slice")
    return index, bank


def test_mrr_matches_reference(arguana_slice, encoder):
    index, bank = arguana_slice
    queries = corpus_queries(bank, index, encoder)  # the same batch steer_corpus embeds (cached after this)
    assert len(queries.owner) == sum(len(q) for q in bank.values())
    got = reciprocal_ranks(queries.vectors, queries.owner, index.embeddings, encoder).mean()
    expected = ref_mrr_at_10(list(queries.vectors), list(queries.owner), list(index.embeddings))
    assert got == pytest.approx(expected, abs=1e-9)
    assert 0.3 < got < 1.0


def test_steer_corpus_on_real_slice(arguana_slice, encoder, caplog):
    index, bank = arguana_slice
    fusion = QueryFusion(bank, "rotate", gamma=0.05)
    fused = fusion.steer_corpus(index, encoder)
    assert "covers only 48 of 60 passages of ArguAna-slice" in caplog.text  # partial banks are flagged
    assert fused.dtype == np.float32 and fused.shape == index.embeddings.shape
    np.testing.assert_allclose(np.linalg.norm(fused, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(fused[48:], index.embeddings[48:])
    assert np.all(((fused[:48] - index.embeddings[:48]) ** 2).sum(axis=1) <= 0.05 + 1e-5)
    assert np.all(((fused[:48] - index.embeddings[:48]) ** 2).sum(axis=1) > 1e-4)  # every passage moved


def test_auto_is_deterministic_and_helps_heldout_queries(arguana_slice, encoder):
    index, bank = arguana_slice
    runs = [QueryFusion(bank, "mean", rule="best") for _ in range(2)]
    fused = [f.steer_corpus(index, encoder) for f in runs]
    np.testing.assert_array_equal(fused[0], fused[1])
    selection = runs[0].selections["ArguAna-slice"]
    assert selection == runs[1].selections["ArguAna-slice"]
    assert selection.parameter == "alpha" and selection.grid[0] == 0.0
    assert selection.heldout_queries == 48  # one per passage with queries (all have 2 or 3)
    assert selection.chosen > 0 and max(selection.scores) > selection.scores[0]  # fusing helps held-out queries
    assert selection.scores[selection.grid.index(selection.chosen)] == max(selection.scores)
    assert all(0 < e < 0.1 for e in selection.std_errors)
    fixed = QueryFusion(bank, "mean", alpha=selection.chosen).steer_corpus(index, encoder)
    np.testing.assert_array_equal(fused[0], fixed)
    one_se = QueryFusion(bank, "mean")
    one_se.steer_corpus(index, encoder)
    conservative = one_se.selections["ArguAna-slice"]
    assert conservative.scores == selection.scores and conservative.chosen <= selection.chosen


def test_pick_strength_rules():
    grid = [0.0, 0.1, 0.2, 0.3]
    flat = np.array([0.5, 0.0, 1.0, 0.5])  # spread: std 0.408, n = 4 -> standard error 0.204
    ranks = [flat * 0.5, flat * 0.9, flat * 1.0 - 0.01, flat * 1.0]  # means 0.25, 0.45, 0.49, 0.5
    assert pick_strength(grid, ranks, "best") == 0.3
    assert pick_strength(grid, ranks, "one-se") == 0.1  # 0.45 >= 0.5 - 0.204 > 0.25
    assert pick_strength(grid, [r * 0 + 0.3 for r in ranks], "best") == 0.0  # ties: the smallest


def test_filter_drops_the_least_similar_queries(arguana_slice, encoder):
    index, bank = arguana_slice
    fusion = QueryFusion(bank, "mean", alpha=0.2, drop_fraction=0.25)
    every = corpus_queries(bank, index, encoder)
    kept = fusion.filter_queries(every, index.embeddings)
    sims = passage_similarity(every, index.embeddings)
    assert len(kept.owner) == pytest.approx(0.75 * len(every.owner), abs=1)
    assert passage_similarity(kept, index.embeddings).min() >= np.sort(sims)[len(sims) - len(kept.owner)] - 1e-12


def test_multivector_max_on_real_slice(arguana_slice, encoder):
    index, bank = arguana_slice
    step = MultiVectorMax(bank, encoder, margin=0.05)
    step.fit(index)
    query_texts = ["should animals be used in research", "is nuclear power safe"]
    q = encoder.embed(query_texts, PromptType.query)
    dense = torch.as_tensor(encoder.similarity(q, index.embeddings))
    got = fuse_whole(step, QueryBatch(["a", "b"], query_texts, q), dense, index)
    gen = np.asarray(encoder.similarity(q, step.queries_.vectors))
    for qi in range(2):
        for d in range(len(index.ids)):
            mine = gen[qi, step.queries_.owner == d]
            expected = max(float(dense[qi, d]), float(mine.max()) - 0.05 if mine.size else -np.inf)
            assert float(got[qi, d]) == pytest.approx(expected, abs=1e-6)


# -- configuration and bad input --------------------------------------------------------------------

def test_identity_separates_configurations(data_root, encoder):
    bank = {"d1": ["q one", "q two"], "d2": ["q three"]}
    configs = [QueryFusion(bank, "mean"), QueryFusion(bank, "mean", alpha=0.1), QueryFusion(bank, "sum", beta=0.1),
               QueryFusion(bank, "rotate", gamma=0.1), QueryFusion({**bank, "d3": ["x"]}, "mean", alpha=0.1),
               QueryFusion(bank, "mean", weighting="similarity"), QueryFusion(bank, "mean", drop_fraction=0.2),
               QueryFusion(bank, "mean", rule="best"), QueryFusion(bank, "mean", seed=1)]
    revisions = {steered_meta(encoder.base_meta, [c]).revision for c in configs}
    assert len(revisions) == len(configs)
    assert configs[0].tag == "fuse-mean-aauto" and configs[3].tag == "fuse-rotate-g0.1"
    assert QueryFusion(bank, "mean", rule="best").tag == "fuse-mean-aauto-best"
    assert configs[0].describe()["grid"] == [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5]
    assert "grid" not in configs[1].describe() and configs[1].training_datasets == set()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "median"}, "unknown fusion method 'median'"),
    ({"method": "mean", "beta": 0.1}, "fusion 'mean' takes alpha, not beta"),
    ({"method": "rotate", "alpha": 0.1, "beta": 0.2}, "takes gamma, not alpha, beta"),
    ({"method": "mean", "alpha": 1.5}, r"alpha is a mixing weight in \[0, 1\]"),
    ({"method": "sum", "beta": -0.1}, "beta must be a number >= 0 or 'auto'"),
    ({"method": "rotate", "gamma": "big"}, "gamma must be a number >= 0 or 'auto'"),
    ({"method": "mean", "grid": []}, "the auto grid must be non-empty"),
    ({"method": "mean", "weighting": "idf"}, "weighting must be 'uniform' or 'similarity'"),
    ({"method": "mean", "rule": "median"}, "rule must be 'one-se' or 'best'"),
    ({"method": "mean", "drop_fraction": 1.0}, r"drop_fraction must be in \[0, 1\)"),
])
def test_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QueryFusion({"d": ["q"]}, **kwargs)


def test_bad_banks(arguana_slice, encoder):
    index, _ = arguana_slice
    with pytest.raises(BankError, match="holds no queries"):
        QueryFusion({"d": []})
    with pytest.raises(BankError, match="shares no passage id with the corpus of ArguAna-slice"):
        QueryFusion({"scifact-4983": ["what is x"]}, "mean", alpha=0.1).steer_corpus(index, encoder)
    single = {doc_id: ["one query only"] for doc_id in index.ids[:5]}
    with pytest.raises(BankError, match="needs passages with >= 2 generated queries.*give alpha explicitly"):
        QueryFusion(single, "mean").steer_corpus(index, encoder)
