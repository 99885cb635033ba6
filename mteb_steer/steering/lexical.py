"""Lexical evidence for a frozen dense model: a bm25s index fused with the dense scores.

Why: generated queries barely move a small dense model, yet on the lexical side (BM25 over
each passage plus its own generated queries, docT5query-style) they add evidence the dense
vectors miss. This module holds

- `BM25Params` / `LexicalIndex`: a bm25s index over the passage texts exactly as the dense side
  sees them (`CorpusIndex.texts`, title + " " + text), English stop words and PyStemmer
  stemming, optional expansion with each passage's OWN generated queries; save/load as plain
  files (bm25s arrays + `lexical.json` with params and fingerprint).
- `LexicalHybrid`: the `ScoreFusion` step (z-score, RRF or min-max weighted sum), tile by tile.
- `lexical_scores` / `identical_id_mask`: BM25 as a teacher for test-time refinement, on the
  candidates only, never handing a query its own passage (mteb's `ignore_identical_ids`).

Fusion convention: fused = (1 - w) * norm(dense) + w * norm(lexical), w = lexical weight in
[0, 1]. w = 0 returns the dense scores untouched (exactly the dense ranking), w = 1 the raw BM25
scores (exactly the lexical ranking). Normalisation is per query over the whole corpus: its
statistics are accumulated in a first pass over the score tiles, so they are exact at any size
while no (queries x corpus) matrix, dense or lexical, ever exists.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bm25s
import numpy as np
import scipy.sparse as sp
import Stemmer
import torch
from tqdm.auto import tqdm

from mteb_steer.blocks import TopRows
from mteb_steer.identity import chunked_hash, stable_hash
from mteb_steer.steering.banks import QueryBank, bank_fingerprint
from mteb_steer.steering.bm25_build import TermCounts, bm25_scores, to_bm25s

if TYPE_CHECKING:
    from mteb_steer.steps import CorpusIndex, QueryBatch, Tile, TileFuser

logger = logging.getLogger(__name__)

BM25_METHODS = ("lucene", "robertson", "atire", "bm25l", "bm25+")
FUSION_MODES = ("zscore", "rrf", "minmax")
# Chosen once on the MS MARCO TREC-DL 2019/2020 pool with plain all-MiniLM-L6-v2
# (scripts/tune_lexical_weight.py); never on a reported task's labels.
DEFAULT_WEIGHT = 0.2  # zscore 0.2: best mean nDCG@10 over dl19+dl20 (0.6773; 0.3: 0.6683), BENCHMARKS.md
DEFAULT_FUSION = "zscore"
DEFAULTS_CHOSEN_ON = frozenset({"TRECDL2019", "TRECDL2020"})
INDEX_FORMAT = 1
_META_FILE = "lexical.json"
_IDS_FILE = "ids.json"
_PROGRESS_MIN = 10_000  # show progress bars from this many texts on
TOKENIZE_CHUNK = 100_000  # passages tokenised at once: only this many token lists exist at a time


class LexicalWarning(UserWarning):
    """Input the lexical side cannot use (empty query, stop words only, passage without terms)."""


@dataclass(frozen=True)
class BM25Params:
    """BM25 variant and tokenisation. Defaults: Lucene BM25 with k1=0.9, b=0.4 (the BEIR/Pyserini
    baseline setting), English stop words (bm25s "en" = Lucene's 33 words) and the Snowball English stemmer."""

    method: str = "lucene"
    k1: float = 0.9
    b: float = 0.4
    delta: float = 0.5  # BM25L / BM25+ only
    stopwords: str | None = "en"
    stemmer: str | None = "english"

    def __post_init__(self) -> None:
        if self.method not in BM25_METHODS:
            raise ValueError(f"BM25 method {self.method!r} unknown; choose one of {BM25_METHODS}")
        if not self.k1 > 0:
            raise ValueError(f"BM25 k1 must be > 0, got {self.k1}")
        if not 0 <= self.b <= 1:
            raise ValueError(f"BM25 b must be in [0, 1], got {self.b}")
        if self.delta < 0:
            raise ValueError(f"BM25 delta must be >= 0, got {self.delta}")
        if self.stemmer is not None and self.stemmer not in Stemmer.algorithms():
            raise ValueError(f"stemmer {self.stemmer!r} unknown; PyStemmer has {Stemmer.algorithms()}")


def tokenize(texts: Sequence[str], params: BM25Params) -> list[list[str]]:
    """Lower-cased word tokens (2+ word characters), stop words removed, then stemmed.

    Queries and passages go through this one function, so both sides share a vocabulary.
    """
    if not texts:
        return []
    stemmer = Stemmer.Stemmer(params.stemmer) if params.stemmer else None
    return bm25s.tokenize(list(texts), stopwords=params.stopwords, stemmer=stemmer, return_ids=False,
                          show_progress=False)


def count_terms(texts: Sequence[str], params: BM25Params) -> TermCounts:
    """Term counts of `texts` (tokenised as `tokenize` does), TOKENIZE_CHUNK passages at a time.

    One TermCounts serves every (k1, b) of a grid that shares stop words and stemmer.
    """
    starts = range(0, len(texts), TOKENIZE_CHUNK)
    chunks = (tokenize(texts[s:s + TOKENIZE_CHUNK], params)
              for s in tqdm(starts, desc="BM25 tokenise", unit="chunk", disable=len(texts) < _PROGRESS_MIN))
    return TermCounts.from_chunks(chunks)


class ExpandedTexts(Sequence[str]):
    """Each passage followed by its OWN generated queries, joined when read: tokenising in chunks
    then never holds a second, expanded copy of the whole corpus."""

    def __init__(self, ids: Sequence[str], texts: Sequence[str], bank: QueryBank) -> None:
        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
        self.ids, self.texts, self.bank = ids, texts, bank

    def __len__(self) -> int:
        return len(self.texts)

    def _one(self, i: int) -> str:
        queries = self.bank.get(self.ids[i])
        return " ".join([self.texts[i], *queries]) if queries else self.texts[i]

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._one(j) for j in range(*i.indices(len(self)))]
        return self._one(range(len(self))[i])

    def __iter__(self) -> Iterator[str]:
        return (self._one(i) for i in range(len(self)))


def expand_with_bank(ids: Sequence[str], texts: Sequence[str], bank: QueryBank) -> tuple[ExpandedTexts, int]:
    """Each passage followed by its OWN generated queries (document expansion); (texts, n_expanded).

    Only `bank[doc_id]` is appended to passage `doc_id`; bank entries for ids outside the corpus
    are ignored. A bank sharing no id with the corpus is a wrong bank and raises.
    """
    hits = sum(1 for doc_id in ids if bank.get(doc_id))
    if hits == 0:
        raise ValueError(f"query bank ({len(bank)} entries) has no generated queries for any of the "
                         f"{len(ids)} corpus ids (e.g. {list(ids[:3])}): is it the bank of another corpus?")
    if hits < len(ids):
        logger.info("query bank covers %d of %d passages; the rest are indexed unexpanded", hits, len(ids))
    return ExpandedTexts(ids, texts, bank), hits


def corpus_fingerprint(ids: Sequence[str], texts: Sequence[str]) -> str:
    """Hash of the passage ids and texts (in order), chunked so big corpora never become one JSON blob."""
    return chunked_hash(len(ids), lambda start, stop: [list(ids[start:stop]), list(texts[start:stop])])


def index_fingerprint(ids: Sequence[str], texts: Sequence[str], params: BM25Params,
                      bank: QueryBank | None) -> str:
    """What a saved index was built from: corpus, expansion bank, BM25 params, bm25s version."""
    return stable_hash({"params": asdict(params), "bm25s": bm25s.__version__,
                        "corpus": corpus_fingerprint(ids, texts),
                        "bank": None if bank is None else bank_fingerprint(bank)})


def _warn_no_terms(what: str, ids: Sequence[str], empty: np.ndarray, consequence: str) -> None:
    if empty.any():
        examples = [ids[i] for i in np.flatnonzero(empty)[:5]]
        warnings.warn(f"{int(empty.sum())} {what} without any index term (empty, stop words only or unseen "
                      f"words), e.g. ids {examples}: {consequence}", LexicalWarning, stacklevel=3)


class LexicalIndex:
    """A BM25 index over one corpus, rows in `ids` order (the CorpusIndex row order).

    Held as one passage-major (n_docs, vocab) CSR of BM25 scores (`doc_terms`): a query is a sparse
    bag of term counts (a repeated query term counts twice, as in bm25s's own `get_scores`), and its
    scores over a block of passages are one sparse product with the block's rows, so a batch of
    queries is scored without Python loops and one block at a time. Products add a query's terms in
    ascending term order, so every score is bit-identical to bm25s's term-major product. bm25s's own
    term-major copy is made only to save (`retriever`), which halves the index's memory while searching.
    """

    def __init__(self, doc_terms: sp.csr_matrix, vocab: dict[str, int], nonoccurrence: np.ndarray | None,
                 params: BM25Params, ids: list[str], fingerprint: str, n_expanded: int) -> None:
        self.doc_terms = doc_terms
        self.vocab = vocab
        self.params = params
        self.ids = ids
        self.fingerprint = fingerprint
        self.n_expanded = n_expanded
        self.id_to_row = {doc_id: row for row, doc_id in enumerate(ids)}
        self.n_docs = doc_terms.shape[0]
        if self.n_docs != len(ids):
            raise ValueError(f"BM25 index holds {self.n_docs} documents but {len(ids)} ids were given")
        self.nonoccurrence = None if nonoccurrence is None else np.asarray(nonoccurrence, dtype=np.float32)

    @property
    def term_docs(self) -> sp.csc_matrix:
        """(vocab, n_docs) view of the same scores (no copy)."""
        return self.doc_terms.T

    @property
    def retriever(self) -> bm25s.BM25:
        """A bm25s retriever with these scores (built on each call: bm25s's term-major copy)."""
        p = self.params
        return to_bm25s(self.doc_terms, self.vocab, self.nonoccurrence, p.method, p.k1, p.b, p.delta)

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def build(cls, ids: Sequence[str], texts: Sequence[str], params: BM25Params | None = None,
              bank: QueryBank | None = None, counts: TermCounts | None = None) -> LexicalIndex:
        """Index passages (expanded with their own bank queries when `bank` is given).

        `counts`: the (expanded) texts already counted with `params`' stop words and stemmer
        (`count_terms`), so a grid over k1 and b tokenises once. Passages without any index term get
        score 0 for every query (warned); a corpus with no term at all raises.
        """
        params = params or BM25Params()
        ids = [str(i) for i in ids]
        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
        if not ids:
            raise ValueError("cannot build a lexical index over an empty corpus")
        fingerprint = index_fingerprint(ids, texts, params, bank)
        n_expanded = 0
        if bank is not None:
            texts, n_expanded = expand_with_bank(ids, texts, bank)
        if counts is None:
            counts = count_terms(texts, params)
        elif len(counts.lengths) != len(ids):
            raise ValueError(f"term counts of {len(counts.lengths)} passages for {len(ids)} passages")
        empty = counts.lengths == 0
        if empty.all():
            raise ValueError(f"none of the {len(ids)} passages has an index term: nothing to index")
        _warn_no_terms("passage(s)", ids, empty, "they get lexical score 0 for every query")
        doc_terms, nonoccurrence = bm25_scores(counts, params.method, params.k1, params.b, params.delta)
        return cls(doc_terms, counts.vocab, nonoccurrence, params, ids, fingerprint, n_expanded)

    # -- persistence --------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the bm25s files plus `lexical.json` (params, fingerprint) and `ids.json`.

        Written to a sibling temporary folder first and renamed, so a crash never leaves a
        half-written index that a later run would load.
        """
        folder = Path(folder)
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.retriever.save(tmp, show_progress=False)
        meta = {"format": INDEX_FORMAT, "fingerprint": self.fingerprint, "params": asdict(self.params),
                "bm25s": bm25s.__version__, "n_docs": self.n_docs, "n_expanded": self.n_expanded}
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=1))
        (tmp / _IDS_FILE).write_text(json.dumps(self.ids))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> LexicalIndex:
        """Reload a saved index; scores are bit-identical to the saved one's."""
        folder = Path(folder)
        meta_path = folder / _META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{folder} is not a saved lexical index (no {_META_FILE})")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != INDEX_FORMAT:
            raise ValueError(f"{meta_path}: index format {meta.get('format')} != {INDEX_FORMAT}; rebuild it")
        retriever = bm25s.BM25.load(folder, show_progress=False)
        scores, vocab = retriever.scores, retriever.vocab_dict  # bm25s stores a CSC (n_docs x vocab)
        doc_terms = sp.csc_matrix((scores["data"], scores["indices"], scores["indptr"]),
                                  shape=(int(scores["num_docs"]), len(vocab))).tocsr()
        ids = json.loads((folder / _IDS_FILE).read_text())
        return cls(doc_terms, vocab, retriever.nonoccurrence_array, BM25Params(**meta["params"]), ids,
                   meta["fingerprint"], meta["n_expanded"])

    # -- scoring ------------------------------------------------------------------------------
    def query_matrix(self, query_texts: Sequence[str]) -> tuple[sp.csr_matrix, np.ndarray]:
        """(n_queries, vocab) float32 term counts, and a mask of queries with no index term."""
        token_ids = [[self.vocab[t] for t in doc if t in self.vocab] for doc in tokenize(query_texts, self.params)]
        lengths = np.array([len(t) for t in token_ids], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        indices = np.fromiter((t for doc in token_ids for t in doc), dtype=np.int64, count=int(indptr[-1]))
        matrix = sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr),
                               shape=(len(token_ids), len(self.vocab)))
        matrix.sum_duplicates()
        return matrix, lengths == 0

    def constant(self, query_matrix: sp.csr_matrix) -> np.ndarray:
        """Per-query float32 score every passage gets from absent terms (non-zero for BM25L/BM25+ only)."""
        if self.nonoccurrence is None:
            return np.zeros(query_matrix.shape[0], dtype=np.float32)
        return np.asarray(query_matrix @ self.nonoccurrence, dtype=np.float32).ravel()

    def matched_block(self, query_matrix: sp.csr_matrix, rows: slice) -> np.ndarray:
        """float32 (n_queries, len(rows)): the matched-term part of BM25 for the passages `rows`.

        score(q, d) = matched[q, d] + constant(q); passages matching no query term hold 0.
        """
        return np.asarray((self.doc_terms[rows] @ query_matrix.T).T.toarray(), dtype=np.float32)

    def pair_scores(self, query_matrix: sp.csr_matrix, query_idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """float32 BM25 of the (query_idx[i], rows[i]) pairs, from the distinct rows only."""
        unique, inverse = np.unique(rows, return_inverse=True)
        matched = (self.doc_terms[unique] @ query_matrix.T).tocsr()
        return np.asarray(matched[inverse, query_idx], dtype=np.float32).ravel() + self.constant(query_matrix)[query_idx]


def disk_bytes(folder: str | Path) -> int:
    """Total size of the files of a saved index."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# -- teacher helpers ------------------------------------------------------------------------------
def identical_id_mask(query_ids: Sequence[str], candidate_rows: np.ndarray, doc_ids: Sequence[str]) -> np.ndarray:
    """Boolean (n_queries, n_candidates): True where a candidate passage has its query's id."""
    doc_ids_arr = np.asarray(doc_ids, dtype=object)
    return doc_ids_arr[candidate_rows] == np.asarray(query_ids, dtype=object)[:, None]


def _check_queries(query_texts: Sequence[str], query_ids: Sequence[str] | None) -> None:
    if query_ids is not None and len(query_ids) != len(query_texts):
        raise ValueError(f"{len(query_ids)} query ids for {len(query_texts)} query texts")


def lexical_scores(index: LexicalIndex, query_texts: Sequence[str], candidate_rows: np.ndarray,
                   query_ids: Sequence[str] | None = None) -> np.ndarray:
    """BM25 teacher scores: float32 (n_queries, n_candidates), score of row candidate_rows[q, j] for query q.

    `candidate_rows`: int (n_queries, n_candidates) rows of the index (CorpusIndex row order).
    With `query_ids`, a candidate that IS the query's own passage gets -inf, so no teacher
    distribution ever puts mass on it (ArguAna: the query's passage dominates lexical scores).
    """
    rows = np.asarray(candidate_rows)
    _check_queries(query_texts, query_ids)
    if rows.ndim != 2 or rows.shape[0] != len(query_texts):
        raise ValueError(f"candidate_rows must be (n_queries={len(query_texts)}, n_candidates), got {rows.shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= index.n_docs):
        raise ValueError(f"candidate_rows must lie in [0, {index.n_docs}), got [{rows.min()}, {rows.max()}]")
    q_idx = np.repeat(np.arange(rows.shape[0]), rows.shape[1])
    out = index.pair_scores(index.query_matrix(query_texts)[0], q_idx, rows.ravel()).reshape(rows.shape)
    if query_ids is not None:
        out[identical_id_mask(query_ids, rows, index.ids)] = -np.inf
    return out


# -- fusion ---------------------------------------------------------------------------------------
def _lexical_top(rows: np.ndarray, cols: np.ndarray, data: np.ndarray, n_rows: int, depth: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the `depth` best entries with score > 0 of COO (rows, cols, data): (rows, cols, data, rank).

    Equal scores keep the lower column first (a total order, so merging the tops of corpus blocks
    gives exactly the top of the whole corpus).
    """
    keep = data > 0
    rows, cols, data = rows[keep], cols[keep], data[keep]
    order = np.lexsort((cols, -data, rows))
    rows, cols, data = rows[order], cols[order], data[order]
    counts = np.bincount(rows, minlength=n_rows)
    rank = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    top = rank < depth
    return rows[top], cols[top], data[top], rank[top]


def _center_scale(mode: str, mean: np.ndarray, var: np.ndarray, low: np.ndarray,
                  high: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (center, scale) as float32 (rows, 1): z-score (mean, std) or min-max (min, max - min)."""
    if mode == "zscore":
        center, scale = mean, np.sqrt(np.maximum(var, 0.0))
    else:
        center, scale = low, high - low
    return (torch.as_tensor(center, dtype=torch.float32).reshape(-1, 1),
            torch.as_tensor(scale, dtype=torch.float32).reshape(-1, 1))


def _normalise(values: torch.Tensor, center: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(values - center) / scale, and 0 where a row is constant (scale 0): it carries no ranking evidence."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(scale > 0, (values - center) / safe, torch.zeros_like(values))


class _DenseStats:
    """Per-query mean, population variance, min and max of the dense scores over every passage.

    Accumulated tile by tile in float64 (Chan et al.'s pairwise update), so the numbers match a
    float64 reduction over the whole row.
    """

    def __init__(self, n_queries: int, device: torch.device) -> None:
        self.count = torch.zeros(n_queries, dtype=torch.float64, device=device)
        self.mean = torch.zeros_like(self.count)
        self.m2 = torch.zeros_like(self.count)
        self.low = torch.full_like(self.count, torch.inf)
        self.high = torch.full_like(self.count, -torch.inf)

    def update(self, q_rows: slice, tile: torch.Tensor) -> None:
        t = tile.double()
        n_b = t.shape[1]
        mean_b = t.mean(1)
        m2_b = ((t - mean_b[:, None]) ** 2).sum(1)
        n_a = self.count[q_rows]
        total = n_a + n_b
        delta = mean_b - self.mean[q_rows]
        self.mean[q_rows] += delta * n_b / total
        self.m2[q_rows] += m2_b + delta ** 2 * n_a * n_b / total
        self.count[q_rows] = total
        self.low[q_rows] = torch.minimum(self.low[q_rows], t.amin(1))
        self.high[q_rows] = torch.maximum(self.high[q_rows], t.amax(1))

    def center_scale(self, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _center_scale(mode, self.mean.cpu().numpy(), (self.m2 / self.count).cpu().numpy(),
                             self.low.cpu().numpy(), self.high.cpu().numpy())


class _LexicalStats:
    """Per-query sum, sum of squares, min and max of the matched BM25 part over every passage (float64)."""

    def __init__(self, n_queries: int) -> None:
        self.count = np.zeros(n_queries)
        self.total = np.zeros(n_queries)
        self.squares = np.zeros(n_queries)
        self.low = np.full(n_queries, np.inf)
        self.high = np.full(n_queries, -np.inf)

    def update(self, q_rows: slice, matched: np.ndarray) -> None:
        m64 = matched.astype(np.float64)
        self.count[q_rows] += m64.shape[1]
        self.total[q_rows] += m64.sum(1)
        self.squares[q_rows] += (m64 * m64).sum(1)
        self.low[q_rows] = np.minimum(self.low[q_rows], m64.min(1))
        self.high[q_rows] = np.maximum(self.high[q_rows], m64.max(1))

    def center_scale(self, mode: str, constant: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.count
        return _center_scale(mode, mean + constant, self.squares / self.count - mean ** 2,
                             self.low + constant, self.high + constant)


class _LexicalTop:
    """Running top-`depth` matched passages (score > 0) per query, exact across corpus blocks."""

    def __init__(self, n_queries: int, depth: int) -> None:
        self.n_queries, self.depth = n_queries, depth
        self.rows = self.cols = np.zeros(0, dtype=np.int64)
        self.data = np.zeros(0, dtype=np.float32)
        self.rank = np.zeros(0, dtype=np.int64)

    def update(self, q_rows: slice, d_rows: slice, matched: np.ndarray) -> None:
        if matched.shape[1] > self.depth:  # only entries at or above each row's depth-th value can qualify
            # torch.topk, not np.partition: introselect degrades on the many tied zeros of a BM25 block
            # (measured: 20 s instead of 0.1 s for 300 queries x 50,000 passages)
            threshold = torch.topk(torch.from_numpy(matched), self.depth, dim=1, sorted=False).values.min(1).values
            keep = matched >= threshold.numpy()[:, None]
        else:
            keep = np.ones(matched.shape, dtype=bool)
        keep &= matched > 0
        r, c = np.nonzero(keep)
        rows = np.concatenate([self.rows, r + q_rows.start])
        cols = np.concatenate([self.cols, c + d_rows.start])
        data = np.concatenate([self.data, matched[r, c]])
        self.rows, self.cols, self.data, self.rank = _lexical_top(rows, cols, data, self.n_queries, self.depth)


class _Pairs:
    """Sparse (query, passage) -> value entries, read back tile by tile."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, values: torch.Tensor) -> None:
        order = np.argsort(cols, kind="stable")
        self.rows, self.cols, self.values = rows[order], cols[order], values[torch.from_numpy(order)]

    def in_tile(self, q_rows: slice, d_rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lo, hi = np.searchsorted(self.cols, [d_rows.start, d_rows.stop])
        pick = lo + np.flatnonzero((self.rows[lo:hi] >= q_rows.start) & (self.rows[lo:hi] < q_rows.stop))
        return (torch.from_numpy(self.rows[pick] - q_rows.start), torch.from_numpy(self.cols[pick] - d_rows.start),
                self.values[torch.from_numpy(pick)])


class LexicalHybrid:
    """`ScoreFusion` step: the dense scores plus BM25 over the passages (and their own generated queries).

    fused = (1 - w) * norm(dense) + w * norm(bm25), per query; norm is
    - "zscore": (s - mean) / std over the whole corpus,
    - "minmax": (s - min) / (max - min) over the whole corpus,
    - "rrf": 1 / (rrf_k + rank) within the top-`candidates` of each list (the BM25 list holds
      matched passages only), 0 outside it.
    A query whose lexical (or dense) scores are constant gets 0 from that side. w = 0 returns the
    dense scores untouched, w = 1 the raw BM25 scores, so both ends are exactly one ranking.

    Two regimes, the same fused score on every passage they both score:
    - corpus <= `full_max_docs` passages: every passage gets its fused score.
    - larger corpora: only the union of each query's dense top-`candidates` and BM25
      top-`candidates` gets its fused score, every other passage gets a per-query floor below
      them. `candidates` must be >= the search's top_k (mteb: max(k_values) = 1000).
    Normalisation statistics (and the RRF/union candidates) are exact over the whole corpus in
    both: they come from a first pass over the score tiles. Memory: a few score tiles (the search's
    plan) plus O(queries x candidates); the BM25 part of a tile is one sparse product.

    Args:
        weight: lexical weight w in [0, 1]; None = DEFAULT_WEIGHT (chosen on the TREC-DL pool).
        fusion: "zscore" | "rrf" | "minmax"; None = DEFAULT_FUSION (chosen on the TREC-DL pool).
        params: BM25 variant, k1, b, stop words, stemmer.
        bank: doc_id -> generated queries; with `expand`, each passage is indexed with its own.
        expand: use the bank for document expansion (the CLI's `--no-lexical-expand` sets False).
        index_dir: where built indexes are saved and found again (one folder per fingerprint).
        candidates: per-list depth for RRF and for the large-corpus union.
        full_max_docs: corpora above this size use the union regime.
        rrf_k: the RRF constant.
    """

    def __init__(self, weight: float | None = None, fusion: str | None = None, params: BM25Params | None = None,
                 bank: QueryBank | None = None, expand: bool = True, index_dir: str | Path | None = None,
                 candidates: int = 1000, full_max_docs: int = 200_000, rrf_k: int = 60) -> None:
        if weight is not None and not 0.0 <= weight <= 1.0:
            raise ValueError(f"lexical weight must be in [0, 1] (dense weight is 1 - w), got {weight}")
        if fusion is not None and fusion not in FUSION_MODES:
            raise ValueError(f"lexical fusion {fusion!r} unknown; choose one of {FUSION_MODES}")
        for name, value in (("candidates", candidates), ("rrf_k", rrf_k)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if full_max_docs < 0:
            raise ValueError(f"full_max_docs must be >= 0, got {full_max_docs}")
        self.weight = DEFAULT_WEIGHT if weight is None else float(weight)
        self.fusion = fusion or DEFAULT_FUSION
        self._uses_defaults = weight is None or fusion is None
        self.params = params or BM25Params()
        self.bank = bank if expand else None
        self._bank_fingerprint = None if self.bank is None else bank_fingerprint(self.bank)
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self.candidates = candidates
        self.full_max_docs = full_max_docs
        self.rrf_k = rrf_k
        self.tag = f"bm25{'x' if self.bank is not None else ''}-{self.fusion}{self.weight:g}"
        self.lexical: LexicalIndex | None = None
        self._fitted_ids: list[str] | None = None

    # -- Step identity --------------------------------------------------------------------------
    @property
    def training_datasets(self) -> set[str]:
        """The TREC-DL labels the default weight/fusion were chosen on, when a default is used."""
        return set(DEFAULTS_CHOSEN_ON) if self._uses_defaults else set()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "lexical-hybrid",
            "fusion": self.fusion,
            "weight": self.weight,
            "defaults_chosen_on": sorted(self.training_datasets),
            "bm25": asdict(self.params),
            "bm25s": bm25s.__version__,
            "expansion_bank": self._bank_fingerprint,
            "candidates": self.candidates,
            "full_max_docs": self.full_max_docs,
            "rrf_k": self.rrf_k,
        }

    # -- ScoreFusion ------------------------------------------------------------------------------
    def fit(self, index: CorpusIndex) -> None:
        """Build (or reload from `index_dir`) the BM25 index of this corpus."""
        folder = None
        if self.index_dir is not None:
            fingerprint = index_fingerprint(index.ids, index.texts, self.params, self.bank)
            folder = self.index_dir / f"bm25-{fingerprint}"
            if (folder / _META_FILE).exists():
                lexical = LexicalIndex.load(folder)
                if lexical.fingerprint == fingerprint:
                    logger.info("lexical index reloaded from %s", folder)
                    self.lexical, self._fitted_ids = lexical, index.ids
                    return
                logger.warning("%s holds another index (fingerprint %s); rebuilding", folder, lexical.fingerprint)
        self.lexical = LexicalIndex.build(index.ids, index.texts, self.params, self.bank)
        self._fitted_ids = index.ids
        if folder is not None:
            self.lexical.save(folder)

    def _check(self, index: CorpusIndex) -> LexicalIndex:
        if self.lexical is None:
            raise RuntimeError("LexicalHybrid.fit(index) must run before fuser()")
        if index.ids is not self._fitted_ids and list(index.ids) != self.lexical.ids:
            raise ValueError(f"fuser() got a corpus ({len(index.ids)} passages) other than the one fit() "
                             f"indexed ({self.lexical.n_docs} passages)")
        return self.lexical

    def fuser(self, queries: QueryBatch, index: CorpusIndex, dense_tiles: Callable[[], Iterator[Tile]]) -> TileFuser:
        """Per tile, the fused scores (see the class docstring); one first pass over `dense_tiles()` when
        the fusion needs corpus statistics or candidates (everything but w = 0 and full-regime w = 1)."""
        lexical = self._check(index)
        query_matrix, no_terms = lexical.query_matrix(queries.texts)
        _warn_no_terms("query(ies)", queries.ids, no_terms,
                       "their lexical scores are 0 everywhere, so the hybrid ranks them by the dense "
                       "scores alone (with lexical weight 1 every passage ties at 0)")
        w, n_queries, n_docs = self.weight, len(queries.ids), lexical.n_docs
        constant = lexical.constant(query_matrix)

        def bm25(q_rows: slice, d_rows: slice, device: torch.device) -> torch.Tensor:
            matched = lexical.matched_block(query_matrix[q_rows], d_rows)
            return torch.from_numpy(matched + constant[q_rows, None]).to(device)

        if w == 0.0:
            return lambda q_rows, d_rows, dense: dense
        union = n_docs > self.full_max_docs
        if w == 1.0 and not union:
            return lambda q_rows, d_rows, dense: bm25(q_rows, d_rows, dense.device)

        depth = min(self.candidates, n_docs)
        needs_top = union or (self.fusion == "rrf" and w < 1.0)
        dense_stats = lexical_stats = dense_top = lexical_top = None
        for q_rows, d_rows, dense in dense_tiles():  # the first pass: exact statistics and candidates
            matched = lexical.matched_block(query_matrix[q_rows], d_rows)
            if dense_stats is None:
                dense_stats, lexical_stats = _DenseStats(n_queries, dense.device), _LexicalStats(n_queries)
                if needs_top:
                    dense_top, lexical_top = TopRows(n_queries, depth, dense.device), _LexicalTop(n_queries, depth)
            dense_stats.update(q_rows, dense)
            lexical_stats.update(q_rows, matched)
            if needs_top:
                dense_top.push(q_rows, d_rows, dense)
                lexical_top.update(q_rows, d_rows, matched)
        if dense_stats is None:
            raise ValueError("the dense scores hold no tile: empty corpus or no queries")
        device = dense_stats.mean.device
        d_center = d_scale = l_center = l_scale = None
        if self.fusion != "rrf":
            d_center, d_scale = (t.to(device) for t in dense_stats.center_scale(self.fusion))
            l_center, l_scale = (t.to(device) for t in lexical_stats.center_scale(self.fusion, constant))

        rrf = None
        if self.fusion == "rrf" and w < 1.0:
            ranks = torch.arange(depth, dtype=torch.float32).expand(n_queries, depth)
            d_rows_all = dense_top.rows.cpu().numpy().ravel()
            rrf = _Pairs(np.concatenate([np.repeat(np.arange(n_queries), depth), lexical_top.rows]),
                         np.concatenate([d_rows_all, lexical_top.cols]),
                         torch.cat([((1 - w) / (self.rrf_k + 1 + ranks)).reshape(-1), torch.from_numpy(
                             (w / (self.rrf_k + 1 + lexical_top.rank)).astype(np.float32))]))
        candidates = floor = None
        if union:
            keys = np.unique(np.concatenate([
                np.repeat(np.arange(n_queries, dtype=np.int64), depth) * n_docs + dense_top.rows.cpu().numpy().ravel(),
                lexical_top.rows.astype(np.int64) * n_docs + lexical_top.cols]))
            rows, cols = np.divmod(keys, n_docs)
            candidates = _Pairs(rows, cols, torch.ones(len(keys), dtype=torch.bool))
            l_low = torch.as_tensor(lexical_stats.low + constant, dtype=torch.float32, device=device).reshape(-1, 1)
            if rrf is not None:  # every RRF score is >= 0
                lowest = torch.zeros((n_queries, 1), device=device)
            elif w == 1.0:
                lowest = l_low
            else:  # each query's smallest possible fused score
                d_low = dense_stats.low.to(torch.float32).reshape(-1, 1)
                lowest = (1 - w) * _normalise(d_low, d_center, d_scale) + w * _normalise(l_low, l_center, l_scale)
            floor = lowest - 1.0

        def fuse(q_rows: slice, d_rows: slice, dense: torch.Tensor) -> torch.Tensor:
            if rrf is not None:
                fused = torch.zeros_like(dense)
                r, c, v = rrf.in_tile(q_rows, d_rows)
                fused.index_put_((r.to(dense.device), c.to(dense.device)), v.to(dense.device), accumulate=True)
            elif w == 1.0:
                fused = bm25(q_rows, d_rows, dense.device)
            else:
                fused = ((1 - w) * _normalise(dense, d_center[q_rows], d_scale[q_rows])
                         + w * _normalise(bm25(q_rows, d_rows, dense.device), l_center[q_rows], l_scale[q_rows]))
            if candidates is None:
                return fused
            keep = torch.zeros(fused.shape, dtype=torch.bool, device=fused.device)
            r, c, _ = candidates.in_tile(q_rows, d_rows)
            keep[r.to(fused.device), c.to(fused.device)] = True
            return torch.where(keep, fused, floor[q_rows])

        return fuse
