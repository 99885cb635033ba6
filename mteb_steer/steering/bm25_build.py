"""BM25 indexes built from flat arrays, so a corpus of millions of passages fits in memory.

Why: bm25s's own `index` takes the corpus as Python lists of token lists (a string object and a
pointer per token, about 60 bytes), projected at ~17 GiB for MS MARCO's 8.8M passages. Here each
chunk of tokenised passages is counted at once into passage-major (term, count) pairs, 8 bytes per
distinct passage-term pair, and BM25 is computed from those arrays with bm25s's own idf and
term-frequency functions, in the same operation order: every stored score is bit-identical to what
`bm25s.BM25.index` writes (tests/test_lexical.py compares the arrays for every BM25 variant).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import bm25s
import numpy as np
import scipy.sparse as sp
from bm25s.scoring import _build_idf_array, _build_nonoccurrence_array, _select_idf_scorer, _select_tfc_scorer

SCORE_BLOCK = 1 << 20  # passages per block of float64 score temporaries


@dataclass
class TermCounts:
    """A tokenised corpus as term frequencies: what every (k1, b) setting of one tokenisation shares.

    `counts` is (n_docs, vocabulary) float32 CSR with sorted columns; `vocab` maps each term to its
    column, terms in sorted order (the order LexicalIndex has always used); `lengths` holds each
    passage's token count, repeated tokens included (BM25's document length).
    """

    vocab: dict[str, int]
    counts: sp.csr_matrix
    lengths: np.ndarray

    @classmethod
    def from_chunks(cls, chunks: Iterable[list[list[str]]]) -> TermCounts:
        """Count tokenised passages chunk by chunk; only one chunk's token lists exist at a time."""
        first_seen: dict[str, int] = {}
        terms, counts, pairs, lengths = [], [], [], []
        for docs in chunks:
            doc_lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
            flat = np.fromiter((first_seen.setdefault(t, len(first_seen)) for d in docs for t in d),
                               dtype=np.int64, count=int(doc_lengths.sum()))
            doc = np.repeat(np.arange(len(docs), dtype=np.int64), doc_lengths)
            keys, tf = np.unique((doc << 32) | flat, return_counts=True)
            terms.append((keys & 0xFFFFFFFF).astype(np.int32))
            counts.append(tf.astype(np.float32))
            pairs.append(np.bincount(keys >> 32, minlength=len(docs)))
            lengths.append(doc_lengths)
        vocab = {term: i for i, term in enumerate(sorted(first_seen))}
        column = np.empty(len(first_seen), dtype=np.int32)
        column[np.fromiter(first_seen.values(), dtype=np.int64, count=len(first_seen))] = np.fromiter(
            (vocab[t] for t in first_seen), dtype=np.int32, count=len(first_seen))
        indices = column[np.concatenate(terms)]
        del terms
        indptr = np.concatenate([[0], np.cumsum(np.concatenate(pairs))])
        lengths_all = np.concatenate(lengths)
        matrix = sp.csr_matrix((np.concatenate(counts), indices, indptr), shape=(len(lengths_all), len(vocab)))
        matrix.has_sorted_indices = False  # columns were first-seen ids inside each passage
        matrix.sort_indices()
        return cls(vocab, matrix, lengths_all)


def _bm25s(method: str, k1: float, b: float, delta: float) -> bm25s.BM25:
    return bm25s.BM25(method=method, k1=k1, b=b, delta=delta, backend="numpy", csc_backend="scipy")


def bm25_scores(counts: TermCounts, method: str, k1: float, b: float, delta: float
                ) -> tuple[sp.csr_matrix, np.ndarray | None]:
    """BM25 of every passage-term pair, passage-major ((n_docs, vocab) float32 CSR), and bm25s's
    non-occurrence array (BM25L / BM25+ only, else None).

    `to_bm25s` of the result stores the same arrays as `bm25s.BM25(...).index((token_ids, vocab))`.
    """
    config = _bm25s(method, k1, b, delta)
    tf = counts.counts
    n_docs = tf.shape[0]
    avg_doc_len = counts.lengths.mean()
    doc_frequencies = dict(enumerate(np.bincount(tf.indices, minlength=tf.shape[1]).tolist()))
    idf_fn = _select_idf_scorer(config.idf_method)
    tfc_fn = _select_tfc_scorer(config.method)
    nonocc = None
    if config.method in config.methods_requiring_nonoccurrence:
        nonocc = _build_nonoccurrence_array(doc_frequencies, n_docs, idf_fn, tfc_fn, l_d=avg_doc_len,
                                            l_avg=avg_doc_len, k1=k1, b=b, delta=delta, dtype=config.dtype)
    idf = _build_idf_array(doc_frequencies, n_docs, idf_fn, dtype=config.dtype)
    del doc_frequencies
    data = np.empty(tf.nnz, dtype=config.dtype)
    for start in range(0, n_docs, SCORE_BLOCK):
        stop = min(start + SCORE_BLOCK, n_docs)
        lo, hi = int(tf.indptr[start]), int(tf.indptr[stop])
        columns = tf.indices[lo:hi]
        l_d = np.repeat(counts.lengths[start:stop], np.diff(tf.indptr[start:stop + 1]))
        scores = idf[columns] * tfc_fn(tf_array=tf.data[lo:hi], l_d=l_d, l_avg=avg_doc_len, k1=k1, b=b, delta=delta)
        if nonocc is not None:
            scores -= nonocc[columns]
        data[lo:hi] = scores
    doc_terms = sp.csr_matrix((data, tf.indices, tf.indptr), shape=tf.shape)
    doc_terms.has_sorted_indices = True
    return doc_terms, nonocc


def to_bm25s(doc_terms: sp.csr_matrix, vocab: dict[str, int], nonoccurrence: np.ndarray | None, method: str,
             k1: float, b: float, delta: float) -> bm25s.BM25:
    """A bm25s retriever holding these scores in its own term-major layout (a copy: for saving)."""
    retriever = _bm25s(method, k1, b, delta)
    term_major = doc_terms.tocsc()
    retriever.scores = {"data": term_major.data, "indices": term_major.indices, "indptr": term_major.indptr,
                        "num_docs": doc_terms.shape[0]}
    retriever.nonoccurrence_array = nonoccurrence
    retriever.vocab_dict = vocab
    retriever.unique_token_ids_set = set(vocab.values())
    return retriever
