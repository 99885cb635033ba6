"""Lexical hybrid: BM25 against a loop reference, the fusion ends (w=0 dense, w=1 lexical), fusion math,
the large-corpus union regime, own-queries-only expansion, teacher helpers, save/load, bad input."""

from __future__ import annotations

import json
import logging

import bm25s
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mteb.types import PromptType
from reference import fuse_whole, ref_bm25, ref_bm25_matrix, ref_hybrid
from test_foundation import _run_search

from mteb_steer.beir import load_beir_split
from mteb_steer.encoder import passage_text
from mteb_steer.identity import steered_meta
from mteb_steer.search import SteerSearch
from mteb_steer.steering.banks import load_bank
from mteb_steer.steering import lexical
from mteb_steer.steering.lexical import (
    BM25_METHODS,
    DEFAULTS_CHOSEN_ON,
    FUSION_MODES,
    BM25Params,
    LexicalHybrid,
    LexicalIndex,
    LexicalWarning,
    count_terms,
    identical_id_mask,
    lexical_scores,
    tokenize,
)
from mteb_steer.steps import CorpusIndex, QueryBatch
from mteb_steer.tasks import resolve_task



@pytest.fixture(scope="module")
def scifact_rows(scifact_slice):
    """The shared real SciFact slice (~440 passages as the dense side joins them, 40 test queries)."""
    split = load_beir_split(scifact_slice, "test")
    return ([r["id"] for r in split.corpus], [passage_text(r["title"], r["text"]) for r in split.corpus],
            [q["id"] for q in split.queries], [q["text"] for q in split.queries])


@pytest.fixture(scope="module")
def arguana_rows(data_root):
    """30 real ArguAna queries WITH their own passage in the corpus (as in the full task) + 200 others."""
    split = load_beir_split(data_root / "arguana", "test")
    by_id = {r["id"]: r for r in split.corpus}
    queries = [q for q in split.queries if q["id"] in by_id][:30]
    own = {q["id"] for q in queries}
    rows = [by_id[q["id"]] for q in queries] + [r for r in split.corpus if r["id"] not in own][:200]
    rows = sorted(rows, key=lambda r: r["id"])  # own passages spread over the rows
    return ([r["id"] for r in rows], [passage_text(r["title"], r["text"]) for r in rows],
            [q["id"] for q in queries], [q["text"] for q in queries])


@pytest.fixture(scope="module")
def genq_bank(data_root):
    return load_bank(data_root / "arguana-genq")


def _dense(encoder, doc_texts, query_texts):
    docs = encoder.embed(doc_texts, PromptType.document)
    queries = encoder.embed(query_texts, PromptType.query)
    return torch.as_tensor(encoder.similarity(queries, docs)), docs, queries


def _fitted(rows, encoder, **kwargs):
    """(hybrid fitted on the rows, QueryBatch, CorpusIndex, dense score matrix)."""
    ids, texts, qids, qtexts = rows
    dense, docs, queries = _dense(encoder, texts, qtexts)
    index = CorpusIndex(ids=ids, texts=texts, embeddings=docs)
    hybrid = LexicalHybrid(**kwargs)
    hybrid.fit(index)
    return hybrid, QueryBatch(ids=qids, texts=qtexts, embeddings=queries), index, dense


@pytest.fixture(scope="module")
def scifact_setup(scifact_rows, encoder, tmp_path_factory):
    """The SciFact slice embedded once and its BM25 index saved once; `make(**kwargs)` reloads it."""
    index_dir = tmp_path_factory.mktemp("lexical_index")
    _, queries, index, dense = _fitted(scifact_rows, encoder, index_dir=index_dir)

    def make(**kwargs) -> LexicalHybrid:
        hybrid = LexicalHybrid(index_dir=index_dir, **kwargs)
        hybrid.fit(index)
        return hybrid

    return make, queries, index, dense


# -- BM25 itself -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", BM25_METHODS)
@pytest.mark.parametrize(("k1", "b"), [(0.9, 0.4), (1.5, 0.75)])
def test_bm25_matches_loop_reference(scifact_rows, method, k1, b):
    ids, texts, _, qtexts = scifact_rows
    params = BM25Params(method=method, k1=k1, b=b)
    docs, queries = texts[:120], qtexts[:20]
    got = ref_bm25_matrix(LexicalIndex.build(ids[:120], docs, params), queries)
    expected = ref_bm25(tokenize(docs, params), tokenize(queries, params), method, k1, b, params.delta)
    assert (expected > 0).sum() > 100  # real matches, not an all-zero comparison
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("method", BM25_METHODS)
def test_chunked_build_stores_exactly_what_bm25s_index_stores(scifact_rows, arguana_rows, monkeypatch, method):
    """The flat-array builder (tokenising a few passages at a time) writes bm25s's own arrays, bit for bit."""
    monkeypatch.setattr(lexical, "TOKENIZE_CHUNK", 37)  # many chunks, a passage's terms first seen mid-corpus
    ids = scifact_rows[0] + arguana_rows[0]
    texts = scifact_rows[1] + arguana_rows[1] + [""]
    ids = [*ids, "empty"]
    params = BM25Params(method=method, k1=1.2, b=0.75)
    with pytest.warns(LexicalWarning, match="1 passage"):
        ours = LexicalIndex.build(ids, texts, params)
    tokens = tokenize(texts, params)
    vocab = {term: i for i, term in enumerate(sorted({t for doc in tokens for t in doc}))}
    reference = bm25s.BM25(method=method, k1=1.2, b=0.75, delta=params.delta, backend="numpy", csc_backend="scipy")
    reference.index(([[vocab[t] for t in doc] for doc in tokens], vocab), create_empty_token=False,
                    show_progress=False)
    assert ours.vocab == vocab
    retriever = ours.retriever  # what save() writes
    for key in ("data", "indices", "indptr"):
        np.testing.assert_array_equal(retriever.scores[key], reference.scores[key], err_msg=key)
    assert retriever.scores["data"].dtype == reference.scores["data"].dtype
    if reference.nonoccurrence_array is None:
        assert retriever.nonoccurrence_array is None
    else:
        np.testing.assert_array_equal(retriever.nonoccurrence_array, reference.nonoccurrence_array)
    ref = reference.scores  # the passage-major copy searched is bm25s's arrays transposed, entry for entry
    ref_doc_terms = sp.csr_matrix((ref["data"], ref["indices"], ref["indptr"]), shape=(len(vocab), len(ids))).T.tocsr()
    for got, want in ((ours.doc_terms.data, ref_doc_terms.data), (ours.doc_terms.indices, ref_doc_terms.indices),
                      (ours.doc_terms.indptr, ref_doc_terms.indptr)):
        np.testing.assert_array_equal(got, want)


def test_term_counts_never_hold_more_than_one_chunk_of_tokens(scifact_rows, monkeypatch):
    """Tokenisation runs chunk by chunk, so a corpus's token lists never exist all at once."""
    seen: list[int] = []
    real = lexical.tokenize

    def recording(texts, params):
        seen.append(len(texts))
        return real(texts, params)

    monkeypatch.setattr(lexical, "TOKENIZE_CHUNK", 50)
    monkeypatch.setattr(lexical, "tokenize", recording)
    texts = scifact_rows[1]
    counts = count_terms(texts, BM25Params())
    assert max(seen) == 50 and sum(seen) == len(texts)
    whole = tokenize(texts, BM25Params())
    assert counts.lengths.tolist() == [len(doc) for doc in whole]
    row = counts.counts[3]
    assert {term: row[0, i] for term, i in counts.vocab.items() if row[0, i]} == {
        t: float(whole[3].count(t)) for t in set(whole[3])}


def test_scores_equal_bm25s_own_retrieval(scifact_rows):
    """The batched sparse product ranks like bm25s's own per-query `retrieve`."""
    ids, texts, _, qtexts = scifact_rows
    index = LexicalIndex.build(ids, texts)
    ours = ref_bm25_matrix(index, qtexts)
    docs, scores = index.retriever.retrieve(tokenize(qtexts, index.params), k=10, show_progress=False)
    np.testing.assert_allclose(np.take_along_axis(ours, docs, axis=1), scores, rtol=1e-6)
    np.testing.assert_allclose(np.sort(ours, axis=1)[:, ::-1][:, :10], scores, rtol=1e-6)


def test_tokenize_stems_and_drops_stop_words():
    assert tokenize(["The runners are running, and THEY ran!"], BM25Params()) == [["runner", "run", "ran"]]
    assert tokenize(["", "the of and", "a"], BM25Params()) == [[], [], []]
    assert tokenize(["The runners"], BM25Params(stopwords=None, stemmer=None)) == [["the", "runners"]]


# -- the two ends of the fusion ------------------------------------------------------------------
@pytest.mark.parametrize("fusion", FUSION_MODES)
def test_lexical_weight_zero_is_exactly_the_dense_ranking(encoder, scifact_slice, fusion):
    task = resolve_task(str(scifact_slice))
    plain = _run_search(SteerSearch(encoder), task)
    hybrid = _run_search(SteerSearch(encoder, score_fusion=LexicalHybrid(weight=0.0, fusion=fusion)), task)
    assert hybrid == plain


@pytest.mark.parametrize("fusion", FUSION_MODES)
def test_dense_weight_zero_is_exactly_the_lexical_ranking(encoder, scifact_slice, fusion):
    task = resolve_task(str(scifact_slice))
    model = SteerSearch(encoder, score_fusion=LexicalHybrid(weight=1.0, fusion=fusion))
    results = _run_search(model, task)
    data = task.dataset["default"][task.eval_splits[0]]
    lexical = model.score_fusion.lexical
    qids, qtexts = [str(i) for i in data["queries"]["id"]], list(data["queries"]["text"])
    docs, scores = lexical.retriever.retrieve(tokenize(qtexts, lexical.params), k=10, show_progress=False)
    for q, qid in enumerate(qids):
        ranked = sorted(results[qid].items(), key=lambda kv: -kv[1])[:10]
        np.testing.assert_allclose([s for _, s in ranked], scores[q], rtol=1e-6)
        distinct = [i for i in range(10) if np.sum(scores[q] == scores[q, i]) == 1]
        assert [ranked[i][0] for i in distinct] == [lexical.ids[docs[q, i]] for i in distinct]


# -- fusion math ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", FUSION_MODES)
@pytest.mark.parametrize("weight", [0.2, 0.5, 0.9])
def test_fusion_matches_loop_reference(scifact_setup, fusion, weight):
    make, queries, index, dense = scifact_setup
    hybrid = make(weight=weight, fusion=fusion, candidates=40)
    before = dense.clone()
    fused = fuse_whole(hybrid, queries, dense, index)
    lexical = ref_bm25_matrix(hybrid.lexical, queries.texts)
    expected = ref_hybrid(dense.double().numpy()[:8], lexical[:8].astype(np.float64), fusion, weight,
                          depth=40, rrf_k=60)
    np.testing.assert_allclose(fused[:8].numpy(), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(dense, before)  # the fusion never writes into the dense scores


@settings(max_examples=15, deadline=None)
@given(fusion=st.sampled_from(FUSION_MODES), weight=st.floats(0.05, 0.95), candidates=st.integers(20, 120))
def test_union_regime_equals_full_regime_on_its_candidates(scifact_setup, fusion, weight, candidates):
    make, queries, index, dense = scifact_setup
    expected = fuse_whole(make(weight=weight, fusion=fusion, candidates=candidates), queries, dense, index)
    union = make(weight=weight, fusion=fusion, candidates=candidates, full_max_docs=0)
    got = fuse_whole(union, queries, dense.clone(), index)
    floor = got.min(dim=1, keepdim=True).values
    scored = got > floor
    assert (scored.sum(1) >= candidates).all()
    np.testing.assert_allclose(got[scored].numpy(), expected[scored].numpy(), rtol=1e-5, atol=1e-6)
    # the union regime ranks exactly as the full regime does among its candidates; a passage outside
    # both top-N lists can reach the full regime's top 10 (the documented approximation), never the union's
    restricted = expected.masked_fill(~scored, float("-inf"))
    assert torch.equal(torch.topk(got, 10).indices.sort(1).values, torch.topk(restricted, 10).indices.sort(1).values)


# -- expansion -------------------------------------------------------------------------------------
def test_expansion_uses_only_the_passages_own_queries(arguana_rows, genq_bank):
    ids, texts, _, _ = arguana_rows
    params = BM25Params()
    index = LexicalIndex.build(ids, texts, params, bank=genq_bank)
    assert index.n_expanded == sum(1 for d in ids if genq_bank.get(d)) > 150
    inverse = {i: t for t, i in index.vocab.items()}
    by_doc = index.term_docs.T.tocsr()
    own_terms = tokenize([" ".join([t, *genq_bank.get(d, [])]) for d, t in zip(ids, texts)], params)
    for row, terms in enumerate(own_terms):
        indexed = {inverse[t] for t in by_doc.indices[by_doc.indptr[row]:by_doc.indptr[row + 1]]}
        assert indexed == set(terms)
    plain = LexicalIndex.build(ids, texts, params)
    assert plain.fingerprint != index.fingerprint
    unexpanded = LexicalHybrid(bank=genq_bank, expand=False)
    assert unexpanded.bank is None and unexpanded.tag == LexicalHybrid().tag


def test_expanded_texts_are_joined_per_chunk_not_copied_whole(arguana_rows, genq_bank, monkeypatch):
    """Expansion hands the tokeniser one chunk of joined texts at a time; reads equal the eager join."""
    ids, texts, _, _ = arguana_rows
    expanded, hits = lexical.expand_with_bank(ids, texts, genq_bank)
    eager = [" ".join([t, *genq_bank.get(d, [])]) for d, t in zip(ids, texts, strict=True)]
    assert hits > 150 and not isinstance(expanded, list)
    assert list(expanded) == eager and expanded[5:9] == eager[5:9] and expanded[-1] == eager[-1]
    seen: list[list[str]] = []
    real = lexical.tokenize

    def recording(chunk, params):
        seen.append(chunk)
        return real(chunk, params)

    monkeypatch.setattr(lexical, "TOKENIZE_CHUNK", 40)
    monkeypatch.setattr(lexical, "tokenize", recording)
    index = LexicalIndex.build(ids, texts, BM25Params(), bank=genq_bank)
    assert max(len(chunk) for chunk in seen) == 40 and [t for chunk in seen for t in chunk] == eager
    assert index.n_expanded == hits


def test_bank_of_another_corpus_is_rejected(scifact_rows, genq_bank):
    ids, texts, _, _ = scifact_rows
    with pytest.raises(ValueError, match="no generated queries for any"):
        LexicalIndex.build(ids, texts, bank=genq_bank)


# -- teacher helpers ---------------------------------------------------------------------------------
def test_teacher_never_returns_a_querys_own_passage(arguana_rows):
    ids, texts, qids, qtexts = arguana_rows
    index = LexicalIndex.build(ids, texts)
    full = ref_bm25_matrix(index, qtexts)
    own = np.array([ids.index(q) for q in qids])
    assert (full.argmax(1) == own).mean() > 0.8  # why exclusion matters: the own passage dominates BM25
    others = full.copy()
    others[np.arange(len(own)), own] = -np.inf
    rows = np.argsort(-others, axis=1, kind="stable")[:, :20]
    scores = np.take_along_axis(full, rows, axis=1)
    candidates = np.concatenate([own[:, None], rows[:, :5]], axis=1)
    teacher = lexical_scores(index, qtexts, candidates, query_ids=qids)
    assert np.isneginf(teacher[:, 0]).all() and np.isfinite(teacher[:, 1:]).all()
    np.testing.assert_allclose(teacher[:, 1:], scores[:, :5])
    np.testing.assert_allclose(lexical_scores(index, qtexts, candidates), np.take_along_axis(full, candidates, 1))
    assert identical_id_mask(qids, candidates, ids)[:, 0].all()


def test_teacher_rejects_bad_candidates(arguana_rows):
    ids, texts, qids, qtexts = arguana_rows
    index = LexicalIndex.build(ids, texts)
    with pytest.raises(ValueError, match="candidate_rows must lie in"):
        lexical_scores(index, qtexts, np.full((len(qtexts), 2), len(ids)))
    with pytest.raises(ValueError, match="candidate_rows must be"):
        lexical_scores(index, qtexts, np.zeros(len(qtexts), dtype=int))
    with pytest.raises(ValueError, match="query ids for"):
        lexical_scores(index, qtexts, np.zeros((len(qtexts), 2), dtype=int), query_ids=qids[:-1])


# -- persistence ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lucene", "bm25+"])
def test_save_load_gives_identical_scores(tmp_path, arguana_rows, genq_bank, method):
    ids, texts, _, qtexts = arguana_rows
    index = LexicalIndex.build(ids, texts, BM25Params(method=method), bank=genq_bank)
    index.save(tmp_path / "idx")
    loaded = LexicalIndex.load(tmp_path / "idx")
    assert np.array_equal(ref_bm25_matrix(loaded, qtexts), ref_bm25_matrix(index, qtexts))
    assert (loaded.fingerprint, loaded.ids, loaded.params) == (index.fingerprint, index.ids, index.params)
    assert json.loads((tmp_path / "idx" / "lexical.json").read_text())["n_expanded"] == index.n_expanded


def test_hybrid_reloads_its_saved_index(tmp_path, scifact_setup, caplog):
    _, queries, index, dense = scifact_setup
    first = LexicalHybrid(index_dir=tmp_path)
    first.fit(index)
    saved = list(tmp_path.iterdir())
    assert len(saved) == 1 and saved[0].name == f"bm25-{first.lexical.fingerprint}"
    second = LexicalHybrid(index_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="mteb_steer.steering.lexical"):
        second.fit(index)
    assert "reloaded" in caplog.text
    assert torch.equal(fuse_whole(second, queries, dense, index), fuse_whole(first, queries, dense, index))
    with pytest.raises(FileNotFoundError, match="not a saved lexical index"):
        LexicalIndex.load(tmp_path)


# -- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", FUSION_MODES)
def test_queries_without_terms_fall_back_to_the_dense_ranking(encoder, scifact_setup, fusion):
    make, queries, index, _ = scifact_setup
    hybrid = make(weight=0.5, fusion=fusion)
    bad = ["", "the of and was", "zzqxv qqwrt"]  # empty, stop words only, unseen words
    texts = bad + queries.texts[:2]
    batch = QueryBatch(ids=[f"bad{i}" for i in range(len(texts))], texts=texts,
                       embeddings=encoder.embed(texts, PromptType.query))
    dense_bad = torch.as_tensor(encoder.similarity(batch.embeddings, index.embeddings))
    with pytest.warns(LexicalWarning, match=r"3 query\(ies\) without any index term.*bad0"):
        fused = fuse_whole(hybrid, batch, dense_bad, index)
    assert torch.isfinite(fused).all()
    for q in range(3):
        assert torch.equal(torch.topk(fused[q], 10).indices, torch.topk(dense_bad[q], 10).indices)


def test_passages_without_terms_score_zero_and_search_runs(scifact_setup):
    _, queries, index, dense = scifact_setup
    texts = ["", "the and of", *index.texts[2:]]
    with pytest.warns(LexicalWarning, match=r"2 passage\(s\) without any index term"):
        lexical = LexicalIndex.build(index.ids, texts)
    assert not ref_bm25_matrix(lexical, queries.texts)[:, :2].any()
    with pytest.raises(ValueError, match="none of the 2 passages has an index term"):
        LexicalIndex.build(index.ids[:2], ["", "?!"])
    blanked = CorpusIndex(ids=index.ids, texts=texts, embeddings=index.embeddings)
    hybrid = LexicalHybrid()
    with pytest.warns(LexicalWarning, match="passage"):
        hybrid.fit(blanked)
    assert torch.isfinite(fuse_whole(hybrid, queries, dense, blanked)).all()


def test_bad_configuration_and_calls_are_named(scifact_setup):
    with pytest.raises(ValueError, match="lexical weight must be in"):
        LexicalHybrid(weight=1.5)
    with pytest.raises(ValueError, match="lexical fusion 'sum' unknown"):
        LexicalHybrid(fusion="sum")
    with pytest.raises(ValueError, match="BM25 method 'bm26'"):
        BM25Params(method="bm26")
    with pytest.raises(ValueError, match="BM25 b must be in"):
        BM25Params(b=2.0)
    make, queries, index, dense = scifact_setup
    hybrid = make()
    with pytest.raises(RuntimeError, match="fit"):
        fuse_whole(LexicalHybrid(), queries, dense, index)
    other = CorpusIndex(ids=index.ids[:10], texts=index.texts[:10], embeddings=index.embeddings[:10])
    with pytest.raises(ValueError, match="other than the one fit"):
        fuse_whole(hybrid, queries, dense[:, :10], other)


# -- identity ------------------------------------------------------------------------------------------
def test_identity_says_what_was_chosen_on_which_labels(genq_bank, encoder):
    default = LexicalHybrid()
    assert default.training_datasets == set(DEFAULTS_CHOSEN_ON)
    assert LexicalHybrid(weight=0.4, fusion="rrf").training_datasets == set()
    expanded = LexicalHybrid(weight=0.4, fusion="rrf", bank=genq_bank)
    assert expanded.tag == "bm25x-rrf0.4" and LexicalHybrid(weight=0.4, fusion="rrf").tag == "bm25-rrf0.4"
    assert expanded.describe()["expansion_bank"] is not None
    json.dumps(expanded.describe())
    metas = {steered_meta(encoder.base_meta, [h]).revision
             for h in (default, expanded, LexicalHybrid(weight=0.4, fusion="rrf"),
                       LexicalHybrid(params=BM25Params(k1=1.2)))}
    assert len(metas) == 4
