"""Lexical evidence for a frozen dense model: a bm25s index fused with the dense scores.

Why: generated queries barely move a small dense model, yet on the lexical side (BM25 over
each passage plus its own generated queries, docT5query-style) they add evidence the dense
vectors miss. This module holds

- `BM25Params` / `LexicalIndex`: a bm25s index over the passage texts exactly as the dense side
  sees them (`CorpusIndex.texts`, title + " " + text), English stop words and PyStemmer
  stemming, optional expansion with each passage's OWN generated queries; save/load as plain
  files (bm25s arrays + `lexical.json` with params and fingerprint).
- `LexicalHybrid`: the `ScoreFusion` step (z-score, RRF or min-max weighted sum).
- `lexical_scores` / `lexical_top_k` / `identical_id_mask`: BM25 as a teacher for test-time
  refinement, never handing a query its own passage (mteb's `ignore_identical_ids`).

Fusion convention: fused = (1 - w) * norm(dense) + w * norm(lexical), w = lexical weight in
[0, 1]. w = 0 returns the dense scores untouched (exactly the dense ranking), w = 1 the raw BM25
scores (exactly the lexical ranking). Normalisation is per query over the whole corpus.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bm25s
import numpy as np
import scipy.sparse as sp
import Stemmer
import torch
from tqdm.auto import tqdm

from mteb_steer.identity import stable_hash
from mteb_steer.steering.banks import QueryBank, bank_fingerprint

if TYPE_CHECKING:
    from mteb_steer.steps import CorpusIndex, QueryBatch

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
_HASH_CHUNK = 10_000
_PROGRESS_MIN = 10_000  # show progress bars from this many texts on


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
                          show_progress=len(texts) >= _PROGRESS_MIN)


def expand_with_bank(ids: Sequence[str], texts: Sequence[str], bank: QueryBank) -> tuple[list[str], int]:
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
    out = [" ".join([text, *bank[doc_id]]) if bank.get(doc_id) else text
           for doc_id, text in zip(ids, texts, strict=True)]
    return out, hits


def corpus_fingerprint(ids: Sequence[str], texts: Sequence[str]) -> str:
    """Hash of the passage ids and texts (in order), chunked so big corpora never become one JSON blob."""
    parts = [stable_hash([list(ids[i:i + _HASH_CHUNK]), list(texts[i:i + _HASH_CHUNK])])
             for i in range(0, len(ids), _HASH_CHUNK)]
    return stable_hash([len(ids), parts])


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
    """A bm25s index over one corpus, rows in `ids` order (the CorpusIndex row order).

    Scores come from bm25s's eager term x document matrix: a query is a sparse bag of term
    counts (a repeated query term counts twice, as in bm25s's own `get_scores`), and its scores
    over the corpus are one sparse product, so a batch of queries is scored without Python loops.
    """

    def __init__(self, retriever: bm25s.BM25, params: BM25Params, ids: list[str], fingerprint: str,
                 n_expanded: int) -> None:
        self.retriever = retriever
        self.params = params
        self.ids = ids
        self.fingerprint = fingerprint
        self.n_expanded = n_expanded
        self.id_to_row = {doc_id: row for row, doc_id in enumerate(ids)}
        scores = retriever.scores
        self.n_docs = int(scores["num_docs"])
        if self.n_docs != len(ids):
            raise ValueError(f"bm25s index holds {self.n_docs} documents but {len(ids)} ids were given")
        self.vocab: dict[str, int] = retriever.vocab_dict
        # bm25s stores a CSC (n_docs x vocab): the same arrays are the CSR of its transpose.
        self.term_docs = sp.csr_matrix((scores["data"], scores["indices"], scores["indptr"]),
                                       shape=(len(self.vocab), self.n_docs))
        nonocc = retriever.nonoccurrence_array
        self.nonoccurrence = None if nonocc is None else np.asarray(nonocc, dtype=np.float32)

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def build(cls, ids: Sequence[str], texts: Sequence[str], params: BM25Params | None = None,
              bank: QueryBank | None = None, tokens: list[list[str]] | None = None) -> LexicalIndex:
        """Index passages (expanded with their own bank queries when `bank` is given).

        `tokens`: the (expanded) texts already tokenised with `params`' stop words and stemmer
        (`tokenize`), so a grid over k1 and b tokenises once. Passages without any index term get
        score 0 for every query (warned); a corpus with no term at all raises.
        """
        params = params or BM25Params()
        ids, texts = [str(i) for i in ids], list(texts)
        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
        if not ids:
            raise ValueError("cannot build a lexical index over an empty corpus")
        fingerprint = index_fingerprint(ids, texts, params, bank)
        n_expanded = 0
        if bank is not None:
            texts, n_expanded = expand_with_bank(ids, texts, bank)
        if tokens is None:
            tokens = tokenize(texts, params)
        elif len(tokens) != len(ids):
            raise ValueError(f"{len(tokens)} token lists for {len(ids)} passages")
        empty = np.array([not t for t in tokens])
        if empty.all():
            raise ValueError(f"none of the {len(ids)} passages has an index term: nothing to index")
        _warn_no_terms("passage(s)", ids, empty, "they get lexical score 0 for every query")
        vocab = {term: i for i, term in enumerate(sorted({t for doc in tokens for t in doc}))}
        token_ids = [[vocab[t] for t in doc] for doc in tokens]
        retriever = bm25s.BM25(method=params.method, k1=params.k1, b=params.b, delta=params.delta,
                               backend="numpy", csc_backend="scipy")
        retriever.index((token_ids, vocab), create_empty_token=False, show_progress=len(ids) >= _PROGRESS_MIN)
        retriever.vocab_dict = vocab
        return cls(retriever, params, ids, fingerprint, n_expanded)

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
        ids = json.loads((folder / _IDS_FILE).read_text())
        return cls(retriever, BM25Params(**meta["params"]), ids, meta["fingerprint"], meta["n_expanded"])

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

    def sparse_scores(self, query_matrix: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
        """BM25 as (sparse matched-term part (n_q, n_docs), per-query constant (n_q,)).

        The constant is non-zero only for BM25L/BM25+, whose score of an absent term is added to
        every document; score(q, d) = sparse[q, d] + constant[q].
        """
        matched = (query_matrix @ self.term_docs).tocsr()
        if self.nonoccurrence is None:
            constant = np.zeros(query_matrix.shape[0], dtype=np.float32)
        else:
            constant = np.asarray(query_matrix @ self.nonoccurrence, dtype=np.float32).ravel()
        return matched, constant

    def scores(self, query_texts: Sequence[str]) -> np.ndarray:
        """Full (n_queries, n_docs) float32 BM25 score matrix (small corpora, tests)."""
        matched, constant = self.sparse_scores(self.query_matrix(query_texts)[0])
        return matched.toarray() + constant[:, None]


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
    matched, constant = index.sparse_scores(index.query_matrix(query_texts)[0])
    q_idx = np.repeat(np.arange(rows.shape[0]), rows.shape[1])
    out = np.asarray(matched[q_idx, rows.ravel()], dtype=np.float32).reshape(rows.shape) + constant[:, None]
    if query_ids is not None:
        out[identical_id_mask(query_ids, rows, index.ids)] = -np.inf
    return out


def lexical_top_k(index: LexicalIndex, query_texts: Sequence[str], k: int,
                  query_ids: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k best rows by BM25, best first: (rows int64 (n_q, k), scores float32 (n_q, k)).

    With `query_ids`, a query's own passage is never among the rows. Equal scores keep the
    lower row first. Memory: one (n_queries, n_docs) float32 score matrix.
    """
    _check_queries(query_texts, query_ids)
    limit = index.n_docs - (query_ids is not None)
    if not 0 < k <= limit:
        raise ValueError(f"k must be in [1, {limit}], got {k}")
    scores = torch.from_numpy(index.scores(query_texts))
    if query_ids is not None:
        own = np.array([index.id_to_row.get(str(q), -1) for q in query_ids], dtype=np.int64)
        has = np.flatnonzero(own >= 0)
        scores[torch.from_numpy(has), torch.from_numpy(own[has])] = -torch.inf
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    return order.indices[:, :k].numpy(), order.values[:, :k].numpy()


# -- fusion ---------------------------------------------------------------------------------------
def _lexical_top(matched: sp.csr_matrix, depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the `depth` best matched passages (score > 0): (rows, cols, rank from 0), vectorised.

    Equal scores keep the lower column first.
    """
    rows = np.repeat(np.arange(matched.shape[0]), np.diff(matched.indptr))
    cols, data = matched.indices, matched.data
    keep = data > 0
    rows, cols, data = rows[keep], cols[keep], data[keep]
    order = np.lexsort((cols, -data, rows))
    rows, cols = rows[order], cols[order]
    counts = np.bincount(rows, minlength=matched.shape[0])
    rank = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    top = rank < depth
    return rows[top], cols[top], rank[top]


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


def _dense_stats(mode: str, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d64 = dense.double()
    mean, var = d64.mean(1), d64.var(1, unbiased=False)
    return _center_scale(mode, mean.numpy(), var.numpy(), d64.amin(1).numpy(), d64.amax(1).numpy())


def _lexical_stats(mode: str, matched: sp.csr_matrix, constant: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-query statistics over ALL passages from the sparse part (absent terms score 0)."""
    m64 = matched.astype(np.float64)
    n_docs = matched.shape[1]
    mean = np.asarray(m64.sum(axis=1)).ravel() / n_docs
    var = np.asarray(m64.multiply(m64).sum(axis=1)).ravel() / n_docs - mean ** 2
    low = m64.min(axis=1).toarray().ravel() + constant
    high = m64.max(axis=1).toarray().ravel() + constant
    return _center_scale(mode, mean + constant, var, low, high)


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
    - corpus <= `full_max_docs` passages: every passage gets its fused score; a new tensor is
      returned and `dense_scores` is not modified.
    - larger corpora: only the union of each query's dense top-`candidates` and BM25
      top-`candidates` gets its fused score (normalisation statistics stay exact over the whole
      corpus), every other passage gets a per-query floor below them; the result is written into
      `dense_scores` in place so no second (n_queries, n_docs) matrix exists. `candidates` must be
      >= the search's top_k (mteb: max(k_values) = 1000).
    Memory beyond `dense_scores` (and the full-regime output): queries are processed in chunks of
    max(1, work_mem_mb MiB // (32 bytes * n_docs)) rows, and the BM25 part of a chunk is sparse.

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
        work_mem_mb: working-memory budget per query chunk.
    """

    def __init__(self, weight: float | None = None, fusion: str | None = None, params: BM25Params | None = None,
                 bank: QueryBank | None = None, expand: bool = True, index_dir: str | Path | None = None,
                 candidates: int = 1000, full_max_docs: int = 200_000, rrf_k: int = 60,
                 work_mem_mb: int = 256) -> None:
        if weight is not None and not 0.0 <= weight <= 1.0:
            raise ValueError(f"lexical weight must be in [0, 1] (dense weight is 1 - w), got {weight}")
        if fusion is not None and fusion not in FUSION_MODES:
            raise ValueError(f"lexical fusion {fusion!r} unknown; choose one of {FUSION_MODES}")
        for name, value in (("candidates", candidates), ("rrf_k", rrf_k), ("work_mem_mb", work_mem_mb)):
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
        self.work_mem_mb = work_mem_mb
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

    def _check(self, queries: QueryBatch, dense_scores: torch.Tensor, index: CorpusIndex) -> LexicalIndex:
        if self.lexical is None:
            raise RuntimeError("LexicalHybrid.fit(index) must run before fuse()")
        if index.ids is not self._fitted_ids and list(index.ids) != self.lexical.ids:
            raise ValueError(f"fuse() got a corpus ({len(index.ids)} passages) other than the one fit() "
                             f"indexed ({self.lexical.n_docs} passages)")
        expected = (len(queries.texts), self.lexical.n_docs)
        if tuple(dense_scores.shape) != expected:
            raise ValueError(f"dense_scores has shape {tuple(dense_scores.shape)}, expected {expected} "
                             "(queries x indexed passages)")
        return self.lexical

    def fuse(self, queries: QueryBatch, dense_scores: torch.Tensor, index: CorpusIndex) -> torch.Tensor:
        """(n_queries, n_docs) fused scores; see the class docstring for the two regimes."""
        lexical = self._check(queries, dense_scores, index)
        query_matrix, no_terms = lexical.query_matrix(queries.texts)
        _warn_no_terms("query(ies)", queries.ids, no_terms,
                       "their lexical scores are 0 everywhere, so the hybrid ranks them by the dense "
                       "scores alone (with lexical weight 1 every passage ties at 0)")
        if self.weight == 0.0:
            return dense_scores
        n_queries, n_docs = dense_scores.shape
        union = n_docs > self.full_max_docs
        out = dense_scores if union else torch.empty((n_queries, n_docs), dtype=torch.float32)
        chunk = max(1, self.work_mem_mb * 2**20 // (32 * n_docs))
        for start in tqdm(range(0, n_queries, chunk), desc="lexical fusion", disable=n_queries <= chunk):
            rows = slice(start, start + chunk)
            matched, constant = lexical.sparse_scores(query_matrix[rows])
            dense = dense_scores[rows].float()
            if union:
                self._fuse_union(dense, matched, constant, out[rows])
            else:
                out[rows] = self._fuse_full(dense, matched, constant)
        return out

    def _fuse_full(self, dense: torch.Tensor, matched: sp.csr_matrix, constant: np.ndarray) -> torch.Tensor:
        w = self.weight
        if w == 1.0:
            return torch.from_numpy(matched.toarray() + constant[:, None])
        if self.fusion == "rrf":
            fused = torch.zeros_like(dense)
            depth = min(self.candidates, dense.shape[1])
            ranks = torch.arange(depth, dtype=torch.float32).expand(dense.shape[0], depth)
            fused.scatter_(1, torch.topk(dense, depth, dim=1).indices, (1 - w) / (self.rrf_k + 1 + ranks))
            l_rows, l_cols, l_rank = _lexical_top(matched, depth)
            fused[torch.from_numpy(l_rows), torch.from_numpy(l_cols)] += torch.from_numpy(
                (w / (self.rrf_k + 1 + l_rank)).astype(np.float32))
            return fused
        lex = torch.from_numpy(matched.toarray() + constant[:, None])
        return ((1 - w) * _normalise(dense, *_dense_stats(self.fusion, dense))
                + w * _normalise(lex, *_lexical_stats(self.fusion, matched, constant)))

    def _fuse_union(self, dense: torch.Tensor, matched: sp.csr_matrix, constant: np.ndarray,
                    out: torch.Tensor) -> None:
        """Fused scores on the union of dense and BM25 top-`candidates`, a floor elsewhere, into `out`."""
        w, (n_rows, n_docs) = self.weight, dense.shape
        depth = min(self.candidates, n_docs)
        d_cols = torch.topk(dense, depth, dim=1).indices.numpy()
        d_keys = (np.arange(n_rows)[:, None] * n_docs + d_cols).ravel()
        l_rows, l_cols, l_rank = _lexical_top(matched, depth)
        l_keys = l_rows.astype(np.int64) * n_docs + l_cols
        keys = np.unique(np.concatenate([d_keys, l_keys]))
        rows, cols = np.divmod(keys, n_docs)
        if self.fusion == "rrf" and w < 1.0:
            values = np.zeros(len(keys))
            values[np.searchsorted(keys, d_keys)] += (1 - w) / (self.rrf_k + 1 + np.tile(np.arange(depth), n_rows))
            values[np.searchsorted(keys, l_keys)] += w / (self.rrf_k + 1 + l_rank)
            fused = torch.from_numpy(values.astype(np.float32))
        else:
            lex = torch.from_numpy(np.asarray(matched[rows, cols], dtype=np.float32).ravel() + constant[rows])
            if w == 1.0:
                fused = lex
            else:
                t_rows, t_cols = torch.from_numpy(rows), torch.from_numpy(cols)
                d_center, d_scale = _dense_stats(self.fusion, dense)
                l_center, l_scale = _lexical_stats(self.fusion, matched, constant)
                fused = ((1 - w) * _normalise(dense[t_rows, t_cols], d_center[t_rows, 0], d_scale[t_rows, 0])
                         + w * _normalise(lex, l_center[t_rows, 0], l_scale[t_rows, 0]))
        starts = np.searchsorted(rows, np.arange(n_rows))
        floor = torch.from_numpy(np.minimum.reduceat(fused.numpy(), starts) - 1.0)
        out[:] = floor[:, None].to(out.dtype)
        out[torch.from_numpy(rows), torch.from_numpy(cols)] = fused.to(out.dtype)
