"""Block-wise scoring equals the former full-matrix search (scores, order, ties), on real slices, with
blocks small enough that many are used; and no step ever allocates a (queries x corpus) array."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from mteb.types import PromptType

from mteb_steer.beir import load_beir_split
from mteb_steer.blocks import MtebTopK, TopRows, plan_blocks
from mteb_steer.encoder import passage_text
from mteb_steer.search import SteerSearch
from mteb_steer.steering.lexical import LexicalHybrid
from mteb_steer.steps import CorpusIndex, QueryBatch
from reference import ref_full_scores, ref_top_k_like_mteb

SMALL_BLOCKS = {"corpus_block": 37, "score_budget_bytes": 4 * 4 * 37 * 16}  # 37-passage blocks, 16 queries


def _setup(folder, encoder):
    split = load_beir_split(folder, "test")
    ids = [r["id"] for r in split.corpus]
    texts = [passage_text(r["title"], r["text"]) for r in split.corpus]
    index = CorpusIndex(ids=ids, texts=texts, embeddings=encoder.embed(texts, PromptType.document))
    qtexts = [q["text"] for q in split.queries]
    queries = QueryBatch([q["id"] for q in split.queries], qtexts, encoder.embed(qtexts, PromptType.query))
    return queries, index


@pytest.fixture(scope="module")
def scifact(scifact_slice, encoder):
    return _setup(scifact_slice, encoder)


@pytest.fixture(scope="module")
def arguana(arguana_slice, encoder):
    return _setup(arguana_slice, encoder)


def _assert_same_results(got, expected):
    assert list(got) == list(expected)
    for qid in expected:  # same documents in the same (heap) order, same scores
        assert list(got[qid]) == list(expected[qid]), qid
        np.testing.assert_allclose(list(got[qid].values()), list(expected[qid].values()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["scifact", "arguana"])
@pytest.mark.parametrize("top_k", [1, 10, 100])
def test_blockwise_search_equals_full_matrix(request, encoder, name, top_k):
    queries, index = request.getfixturevalue(name)
    model = SteerSearch(encoder, **SMALL_BLOCKS)
    expected = ref_top_k_like_mteb(ref_full_scores(model, queries, index), index.ids, queries.ids, top_k,
                                   chunk_size=SMALL_BLOCKS["corpus_block"])
    got = model.rank(queries, index, top_k)
    _assert_same_results(got, expected)
    # default blocks (mteb's 50,000-passage chunk: the whole slice in one block) agree as well
    full = ref_top_k_like_mteb(ref_full_scores(model, queries, index), index.ids, queries.ids, top_k)
    _assert_same_results(SteerSearch(encoder).rank(queries, index, top_k), full)


def test_ties_between_duplicate_passages_resolve_like_mteb(arguana, encoder):
    """ArguAna's duplicate passages have identical vectors: the tie order must be mteb's (heap on doc id)."""
    queries, index = arguana
    vectors = np.asarray(index.embeddings)
    _, first, counts = np.unique(vectors, axis=0, return_index=True, return_counts=True)
    assert (counts > 1).sum() >= 20  # the slice really holds duplicates
    got = SteerSearch(encoder, **SMALL_BLOCKS).rank(queries, index, 100)
    duplicated = {index.ids[i] for i in range(len(index.ids))
                  if counts[np.flatnonzero((vectors[first] == vectors[i]).all(1))[0]] > 1}
    hits = sum(len(duplicated & set(docs)) for docs in got.values())
    assert hits > 0  # duplicates were ranked, so their tie order was exercised by the equality tests


def test_ignore_identical_ids_after_blockwise_search(arguana, encoder):
    """mteb drops a query's own passage after search (ArguAna): the remaining lists are equal too."""
    queries, index = arguana
    own = set(queries.ids) & set(index.ids)
    assert own  # ArguAna queries are passages of the corpus
    got = SteerSearch(encoder, **SMALL_BLOCKS).rank(queries, index, 20)
    expected = ref_top_k_like_mteb(ref_full_scores(SteerSearch(encoder), queries, index), index.ids, queries.ids,
                                   20, chunk_size=SMALL_BLOCKS["corpus_block"])
    drop = {q: {d: s for d, s in docs.items() if d != q} for q, docs in expected.items()}
    _assert_same_results({q: {d: s for d, s in docs.items() if d != q} for q, docs in got.items()}, drop)
    assert any(q in got[q] for q in own)  # the own passage is found and returned, as mteb's wrapper does


@pytest.mark.parametrize("fusion", ["zscore", "minmax", "rrf"])
@pytest.mark.parametrize("weight", [0.0, 0.2, 1.0])
def test_blockwise_hybrid_equals_full_matrix_fusion(scifact, encoder, fusion, weight):
    queries, index = scifact
    hybrid = LexicalHybrid(weight, fusion, candidates=50)
    hybrid.fit(index)
    model = SteerSearch(encoder, score_fusion=hybrid, **SMALL_BLOCKS)
    full = ref_full_scores(model, queries, index)
    expected = ref_top_k_like_mteb(full, index.ids, queries.ids, 30, chunk_size=SMALL_BLOCKS["corpus_block"])
    _assert_same_results(model.rank(queries, index, 30), expected)
    tiles = torch.zeros_like(full)
    for q_rows, d_rows, scores in model.score_tiles(queries, index):
        tiles[q_rows, d_rows] = scores
    np.testing.assert_allclose(tiles.numpy(), full.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fusion", ["zscore", "rrf"])
def test_union_regime_equals_full_regime_on_its_candidates(scifact, encoder, fusion):
    """Above `full_max_docs` only each query's dense and BM25 top candidates keep their fused score, the
    rest get a floor below them all."""
    queries, index = scifact
    scores = {}
    for name, max_docs in (("full", 200_000), ("union", 0)):
        step = LexicalHybrid(0.3, fusion, candidates=40, full_max_docs=max_docs)
        step.fit(index)
        scores[name] = torch.zeros((len(queries.ids), len(index.ids)))
        for q_rows, d_rows, tile in SteerSearch(encoder, score_fusion=step, **SMALL_BLOCKS).score_tiles(queries, index):
            scores[name][q_rows, d_rows] = tile
    same = scores["union"] == scores["full"]
    assert (same.sum(1) >= 40).all()  # at least the dense top 40 of every query
    lowest_kept = torch.where(same, scores["union"], torch.inf).amin(1)
    assert (torch.where(same, -torch.inf, scores["union"]).amax(1) < lowest_kept).all()


def test_running_top_rows_equals_full_topk():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand((13, 500), generator=g)
    top = TopRows(13, 25, "cpu")
    for q_rows, d_rows in plan_blocks(13, 500, corpus_block=61, budget_bytes=16 * 61 * 4 * 4).tiles():
        top.push(q_rows, d_rows, scores[q_rows, d_rows])
    values, rows = torch.topk(scores, 25, dim=1)
    assert torch.equal(top.rows, rows) and torch.equal(top.values, values)


def test_mteb_top_k_needs_whole_blocks_and_k():
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        MtebTopK(["q"], ["d"], 0)


def test_memory_plan_is_logged_for_large_corpora(caplog):
    with caplog.at_level(logging.INFO, logger="mteb_steer.blocks"):
        plan = plan_blocks(1000, 8_800_000, what="search MSMARCO")
    assert plan.corpus_block == 50_000 and plan.query_block * plan.corpus_block * 4 * 4 <= 256 * 2**20
    assert plan.query_block % 16 == 0
    assert "search MSMARCO: 1000 queries x 8800000 passages in tiles of" in caplog.text
    assert "MiB of float32 scores per tile" in caplog.text


# -- bounded memory ----------------------------------------------------------------------------------------
N_DOCS, N_QUERIES = 60_000, 1_000  # one (queries x corpus) float32 array: 229 MiB


def _peak_rss_mib() -> float:
    """Peak resident memory since the last `_reset_peak()` (Linux VmHWM), MiB."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def test_no_step_allocates_a_queries_x_corpus_array(tmp_path, encoder):
    """Plain and hybrid search over a float16 corpus: the resident peak during search stays far
    below the size of one (queries x corpus) float32 array (the former path held two: dense and fused)."""
    dim = encoder.model.get_sentence_embedding_dimension()
    rng = np.random.default_rng(0)
    corpus = np.lib.format.open_memmap(tmp_path / "corpus.npy", mode="w+", dtype=np.float16, shape=(N_DOCS, dim))
    for start in range(0, N_DOCS, 20_000):  # written in chunks, as a big corpus would be
        block = rng.standard_normal((20_000, dim)).astype(np.float32)
        corpus[start:start + 20_000] = block / np.linalg.norm(block, axis=1, keepdims=True)
    corpus.flush()
    del corpus
    words = [f"w{i}" for i in range(300)]
    texts = [" ".join(rng.choice(words, 6)) for _ in range(N_DOCS)]
    # float16 in RAM (resident before the measurement; a memmap's file pages would count as they are read)
    index = CorpusIndex([str(i) for i in range(N_DOCS)], texts, np.load(tmp_path / "corpus.npy"))
    qtexts = [" ".join(rng.choice(words, 3)) for _ in range(N_QUERIES)]
    queries = QueryBatch([f"q{i}" for i in range(N_QUERIES)], qtexts,
                         rng.standard_normal((N_QUERIES, dim)).astype(np.float32))
    hybrid = LexicalHybrid(0.2, "zscore", full_max_docs=10**9)
    hybrid.fit(index)
    full_matrix_mib = 4 * N_QUERIES * N_DOCS / 2**20
    for fusion in (None, hybrid):
        model = SteerSearch(encoder, score_fusion=fusion, score_budget_bytes=4 * 2**20, corpus_block=10_000)
        few = QueryBatch(queries.ids[:16], queries.texts[:16], queries.embeddings[:16])
        model.rank(few, index, 10)  # warm-up: BLAS workspaces and lazy imports are not per-query memory
        _reset_peak()
        before = _peak_rss_mib()
        results = model.rank(queries, index, 10)
        grew = _peak_rss_mib() - before
        assert len(results) == N_QUERIES and all(len(r) == 10 for r in results.values())
        print(f"fusion {fusion}: resident peak grew by {grew:.1f} MiB")
        assert grew < full_matrix_mib / 3, f"search (fusion {fusion}) grew the resident peak by {grew:.0f} MiB; " \
                                           f"one (queries x corpus) array is {full_matrix_mib:.0f} MiB"
