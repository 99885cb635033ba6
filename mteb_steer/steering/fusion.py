"""Fuse passage vectors with the embeddings of the queries generated for them (corpus steering).

An LLM (or docT5query) writes the queries a passage answers; the passage vector moves toward
them, so real queries phrased like those land closer. Generated queries are embedded as
queries (`PromptType.query`, base vectors, no query transforms), passages as documents.

With `p` the passage vector, `q_1..q_n` its query vectors and weights `w_i` (1 each, or from
query-passage similarity, always averaging 1 over a passage's queries):

- mean:   f = normalize((1 - alpha) * p + alpha * sum_i w_i q_i / n)
- sum:    f = normalize(p + beta * sum_i w_i q_i)                     (xQG4xDR)
- rotate: c = normalize(sum_i w_i q_i); move unit p along the great circle toward c by the
          angle phi = min(angle(p, c), arccos(1 - gamma / 2)), i.e. the largest step with
          ||f - p||^2 <= gamma and ||f|| = 1, never past c               (NUDGE-N, label-free)

A passage without queries keeps its vector unchanged. The strength (`alpha`/`beta`/`gamma`)
may be "auto": one generated query per passage (passages with >= 2) is held out, the rest are
fused at each grid value (for "sum" scaled by n/(n-1), the magnitude all n will have), and the
held-out queries retrieve from the whole fused corpus (MRR@10 of their own passage). Rule "one-se" (default) takes the smallest strength within one standard
error of the best MRR: held-out generated queries are exchangeable with the fused ones, so they
overstate what fusion does for real queries, and a smaller change to the base model is
preferred when the difference is not significant. Rule "best" takes the maximum. No task label
is ever read. At most AUTO_SAMPLE held-out queries (a seeded sample) are scored, so the check
costs O(AUTO_SAMPLE x corpus) per grid value whatever the corpus size; SciFact and ArguAna hold
fewer, so every one of theirs is used. The sample size is filed in `steer_fit.json`.

Memory: passages are fused block by block (FUSE_BLOCK passages, float64 inside a block only), and
the `auto` check scores the held-out queries against the fused corpus tile by tile
(`mteb_steer.blocks`), fusing each corpus block as it is scored: no float64 copy of all vectors,
no (queries x corpus) matrix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.sparse as sp
import torch
from mteb.types import PromptType
from tqdm.auto import tqdm

from mteb_steer.blocks import dense_tiles, gather_pairs, plan_blocks
from mteb_steer.steering.banks import BankError, QueryBank, bank_fingerprint, bank_stats
from mteb_steer.steps import CorpusIndex, QueryBatch, Tile, TileFuser

if TYPE_CHECKING:
    from mteb_steer.encoder import SteerEncoder

logger = logging.getLogger(__name__)

FusionMethod = Literal["mean", "sum", "rotate"]
Weighting = Literal["uniform", "similarity"]
Strength = float | Literal["auto"]
SelectionRule = Literal["one-se", "best"]

STRENGTH_NAME: dict[str, str] = {"mean": "alpha", "sum": "beta", "rotate": "gamma"}
DEFAULT_GRIDS: dict[str, tuple[float, ...]] = {
    "mean": (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5),
    "sum": (0.0, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3),
    "rotate": (0.0, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32),
}
PARTIAL_COVERAGE = 0.95  # below this share of passages with queries, fusion favours the covered ones
AUTO_SAMPLE = 10_000  # held-out queries scored by `auto` at most (seeded sample; SciFact/ArguAna have fewer)
FUSE_BLOCK = 50_000  # passages fused at once


def select_strength(method: str, given: dict[str, Strength | None]) -> Strength:
    """The one check of a fusion strength: `given` maps alpha/beta/gamma to a value or None.

    Only `method`'s own strength may be set (the others None); unset means "auto". Returns the
    strength; raises ValueError naming the option and its range. Used by `QueryFusion` and by
    `SteerConfig.validate`, so the CLI, benchmark.py and library callers get the same message.
    """
    if method not in STRENGTH_NAME:
        raise ValueError(f"unknown fusion method {method!r}; choose one of {sorted(STRENGTH_NAME)}")
    own = STRENGTH_NAME[method]
    stray = [name for name, value in given.items() if value is not None and name != own]
    if stray:
        raise ValueError(f"fusion {method!r} takes {own}, not {', '.join(stray)} (on the command line: "
                         f"--{', --'.join(stray)} does not apply to --fusion {method}; it takes --{own})")
    strength = "auto" if given.get(own) is None else given[own]
    if strength != "auto" and (isinstance(strength, str | bool) or not np.isfinite(strength) or strength < 0):
        raise ValueError(f"{own} must be a number >= 0 or 'auto', got {strength!r} (--{own} needs such a value)")
    if method == "mean" and strength != "auto" and strength > 1:
        raise ValueError(f"alpha is a mixing weight in [0, 1], got {strength} (--alpha needs a value in that range)")
    return strength


# -- the math, vectorised over all passages --------------------------------------------------------

def _normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def fuse_mean(passages: np.ndarray, query_sums: np.ndarray, counts: np.ndarray, alpha: float) -> np.ndarray:
    """normalize((1 - alpha) p + alpha * mean_i q_i) per row; rows with count 0 are returned as given.

    passages, query_sums: (n, d) (query_sums = sum_i w_i q_i); counts: (n,) number of queries.
    """
    has = counts > 0
    out = passages.astype(np.float64, copy=True)
    mean = query_sums[has] / counts[has, None]
    out[has] = _normalize((1.0 - alpha) * out[has] + alpha * mean)
    return out


def fuse_sum(passages: np.ndarray, query_sums: np.ndarray, counts: np.ndarray, beta: float) -> np.ndarray:
    """normalize(p + beta * sum_i q_i) per row; rows with count 0 are returned as given."""
    has = counts > 0
    out = passages.astype(np.float64, copy=True)
    out[has] = _normalize(out[has] + beta * query_sums[has])
    return out


def fuse_rotate(passages: np.ndarray, query_sums: np.ndarray, counts: np.ndarray, gamma: float) -> np.ndarray:
    """Rotate unit p toward c = normalize(sum_i q_i) by min(angle(p, c), arccos(1 - gamma/2)).

    The result is unit norm with ||f - p||^2 <= gamma (chord bound) and never passes c. Rows
    with count 0, or whose queries sum to zero or point exactly away from p, are returned as given.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0 (a squared distance), got {gamma}")
    p = _normalize(passages.astype(np.float64))
    sums = query_sums.astype(np.float64)
    c = _normalize(sums)
    cos_pc = np.clip(np.einsum("ij,ij->i", p, c), -1.0, 1.0)
    ortho = c - cos_pc[:, None] * p                        # component of c orthogonal to p
    ortho_norm = np.linalg.norm(ortho, axis=1)
    theta = np.arccos(cos_pc)
    phi = np.minimum(theta, np.arccos(np.clip(1.0 - gamma / 2.0, -1.0, 1.0)))
    moves = (counts > 0) & (np.linalg.norm(sums, axis=1) > 0) & (ortho_norm > 1e-12)
    out = passages.astype(np.float64, copy=True)
    u = ortho[moves] / ortho_norm[moves, None]
    out[moves] = np.cos(phi[moves])[:, None] * p[moves] + np.sin(phi[moves])[:, None] * u
    return out


FUSERS = {"mean": fuse_mean, "sum": fuse_sum, "rotate": fuse_rotate}


# -- generated queries of a corpus ------------------------------------------------------------------

@dataclass
class CorpusQueries:
    """The bank's queries for one corpus, flattened: query j belongs to corpus row `owner[j]`.

    `vectors` (n_queries, dim) float32 are the encoder's base query embeddings.
    """

    texts: list[str]
    owner: np.ndarray
    vectors: np.ndarray

    def subset(self, keep: np.ndarray) -> CorpusQueries:
        """The queries where boolean mask `keep` holds."""
        return CorpusQueries([t for t, k in zip(self.texts, keep, strict=True) if k], self.owner[keep],
                             self.vectors[keep])


def corpus_queries(bank: QueryBank, index: CorpusIndex, encoder: SteerEncoder) -> CorpusQueries:
    """Embed, in one batched call, the bank's queries of the passages in `index` (corpus row order).

    Bank passages absent from the corpus are ignored; a bank sharing no id with the corpus is an
    error raised before any embedding (it is almost surely the bank of another corpus).
    """
    rows = [(index.id_to_row[doc_id], queries) for doc_id, queries in bank.items() if doc_id in index.id_to_row]
    if not rows:
        raise BankError(f"the query bank ({len(bank)} passages, e.g. {list(bank)[:3]}) shares no passage id "
                        f"with the corpus of {index.task_name or 'this task'} (e.g. {index.ids[:3]})")
    rows.sort(key=lambda item: item[0])
    texts = [q for _, queries in rows for q in queries]
    owner = np.fromiter((row for row, queries in rows for _ in queries), dtype=np.int64, count=len(texts))
    covered = len({row for row, queries in rows if queries})
    logger.info("query bank: %d of %d corpus passages have queries (%d queries); %d bank passages not in corpus",
                covered, len(index.ids), len(texts), len(bank) - len(rows))
    if covered < PARTIAL_COVERAGE * len(index.ids):
        logger.warning("query bank covers only %d of %d passages of %s: fused passages move toward query space and "
                       "tend to outrank unfused ones, a harm the held-out 'auto' choice cannot see",
                       covered, len(index.ids), index.task_name or "the corpus")
    vectors = encoder.embed(texts, PromptType.query, apply_transforms=False, show_progress_bar=len(texts) > 1000)
    return CorpusQueries(texts=texts, owner=owner, vectors=np.asarray(vectors, dtype=np.float32))


def passage_similarity(queries: CorpusQueries, passages: np.ndarray) -> np.ndarray:
    """Cosine of each generated query with its own passage, shape (n_queries,) (float64, in blocks)."""
    out = np.empty(len(queries.owner))
    for start in range(0, len(out), FUSE_BLOCK):
        rows = slice(start, start + FUSE_BLOCK)
        q = _normalize(queries.vectors[rows].astype(np.float64))
        p = _normalize(np.asarray(passages[queries.owner[rows]], dtype=np.float64))
        out[rows] = np.einsum("ij,ij->i", q, p)
    return out


def similarity_weights(queries: CorpusQueries, passages: np.ndarray, temperature: float) -> np.ndarray:
    """Per-query weights softmax(cos(q_i, p) / temperature) within each passage, scaled to average 1.

    Queries that match their passage well count more; temperature -> inf gives uniform weights.
    """
    n_docs = passages.shape[0]
    logits = passage_similarity(queries, passages) / temperature
    peak = np.full(n_docs, -np.inf)
    np.maximum.at(peak, queries.owner, logits)
    raw = np.exp(logits - peak[queries.owner])
    totals = np.bincount(queries.owner, weights=raw, minlength=n_docs)
    counts = np.bincount(queries.owner, minlength=n_docs)
    return raw / totals[queries.owner] * counts[queries.owner]


def weighted_sums(queries: CorpusQueries, weights: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """(sum_i w_i q_i per passage (n_docs, d) float64, number of queries per passage (n_docs,)).

    Called per passage block (`QueryFusion.fuse_rows`), so the float64 arrays are block-sized.
    """
    n = len(queries.owner)
    incidence = sp.csr_matrix((weights, (queries.owner, np.arange(n))), shape=(n_docs, n))
    sums = np.asarray(incidence @ queries.vectors.astype(np.float64))
    return sums, np.bincount(queries.owner, minlength=n_docs)


def hold_out_one(owner: np.ndarray, n_docs: int, seed: int) -> np.ndarray:
    """Boolean mask over queries: one query, chosen at random (seeded), of every passage with >= 2."""
    counts = np.bincount(owner, minlength=n_docs)
    order = np.argsort(owner, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    eligible = np.flatnonzero(counts >= 2)
    picks = np.random.default_rng(seed).integers(0, counts[eligible])
    mask = np.zeros(len(owner), dtype=bool)
    mask[order[starts[eligible] + picks]] = True
    return mask


def reciprocal_ranks(queries: np.ndarray, targets: np.ndarray, corpus: Any, encoder: SteerEncoder) -> np.ndarray:
    """Per query, 1 / (rank + 1) of its target corpus row if ranked in the top 10, else 0 (ties favour it).

    rank = number of corpus rows scoring strictly higher (encoder similarity); shape (n_queries,) float64.
    `corpus` is any array of rows (or a `FusedCorpus`), scored tile by tile: one pass reads each
    query's own score, a second counts the rows above it.
    """
    plan = plan_blocks(len(queries), len(corpus), what="held-out ranks")
    vectors = torch.as_tensor(np.asarray(queries), dtype=torch.float32, device=encoder.model.device)
    targets = np.asarray(targets, dtype=np.int64)
    own = gather_pairs(dense_tiles(encoder.similarity, vectors, corpus, plan), np.arange(len(targets)), targets)
    own_t = torch.as_tensor(own, device=vectors.device)
    above = torch.zeros(len(targets), dtype=torch.float64, device=vectors.device)
    for q_rows, _, scores in dense_tiles(encoder.similarity, vectors, corpus, plan):
        above[q_rows] += (scores > own_t[q_rows, None]).sum(1).double()
    return ((above < 10) / (above + 1.0)).cpu().numpy()


class FusedCorpus:
    """The passages fused at one strength, computed block by block when rows are read (`corpus[rows]`)."""

    def __init__(self, fusion: QueryFusion, passages: Any, queries: CorpusQueries, strength: float,
                 scale: np.ndarray | None = None) -> None:
        self.fusion, self.passages, self.queries, self.strength, self.scale = fusion, passages, queries, strength, scale

    def __len__(self) -> int:
        return len(self.passages)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.fusion.fuse_rows(self.passages, self.queries, self.strength, rows, self.scale).astype(np.float32)


@dataclass
class AutoSelection:
    """What "auto" chose on one corpus: the grid, held-out MRR@10 (and its standard error) per value, the winner."""

    parameter: str
    rule: str
    grid: list[float]
    scores: list[float]
    std_errors: list[float]
    chosen: float
    heldout_queries: int  # scored: all held-out queries, or a seeded sample of AUTO_SAMPLE of them
    heldout_available: int = 0  # held out (one per passage with >= 2 queries)
    sample_size: int = AUTO_SAMPLE

    def table(self) -> str:
        return "  ".join(f"{self.parameter}={v:g}:{s:.4f}±{e:.4f}"
                         for v, s, e in zip(self.grid, self.scores, self.std_errors, strict=True))


def pick_strength(grid: Sequence[float], ranks: Sequence[np.ndarray], rule: SelectionRule) -> float:
    """The grid value chosen from per-query reciprocal ranks at each value (grid ascending).

    "best": the highest mean (first on ties); "one-se": the smallest value whose mean is at least
    the best mean minus the best value's standard error (std / sqrt(n)).
    """
    means = np.array([r.mean() for r in ranks])
    best = int(np.argmax(means))
    if rule == "best":
        return float(grid[best])
    floor = means[best] - ranks[best].std(ddof=1) / np.sqrt(len(ranks[best])) if len(ranks[best]) > 1 else means[best]
    return float(grid[int(np.flatnonzero(means >= floor)[0])])


# -- the corpus step ---------------------------------------------------------------------------------

class QueryFusion:
    """CorpusStep: fuse each passage vector with its generated queries (see the module docstring).

    Args:
        bank: doc_id -> generated queries (see `mteb_steer.steering.banks`).
        method: "mean", "sum" or "rotate".
        alpha / beta / gamma: the strength of "mean" / "sum" / "rotate" (only the method's own may be
            given); a float, or "auto" (the default) for the label-free held-out selection.
        grid: values tried by "auto" (default: DEFAULT_GRIDS[method]); sorted ascending.
        rule: how "auto" picks from the held-out MRR@10 per value: "one-se" (default) or "best".
        seed: which query per passage "auto" holds out.
        weighting: "uniform", or "similarity" (softmax of query-passage cosine / temperature).
        temperature: softmax temperature of the "similarity" weighting.
        drop_fraction: Doc2Query-- style filter: drop this fraction of all generated queries, those
            least similar to their own passage, before fusing (0 keeps all).
    """

    def __init__(self, bank: QueryBank, method: FusionMethod = "mean", *, alpha: Strength | None = None,
                 beta: Strength | None = None, gamma: Strength | None = None, grid: Sequence[float] | None = None,
                 rule: SelectionRule = "one-se", seed: int = 0, weighting: Weighting = "uniform", temperature: float = 0.05,
                 drop_fraction: float = 0.0) -> None:
        if method not in FUSERS:
            raise ValueError(f"unknown fusion method {method!r}; choose one of {sorted(FUSERS)}")
        own = STRENGTH_NAME[method]
        strength = select_strength(method, {"alpha": alpha, "beta": beta, "gamma": gamma})
        self.grid = sorted(float(v) for v in (grid if grid is not None else DEFAULT_GRIDS[method]))
        if not self.grid or any(v < 0 for v in self.grid):
            raise ValueError(f"the auto grid must be non-empty values >= 0, got {self.grid}")
        if rule not in ("one-se", "best"):
            raise ValueError(f"rule must be 'one-se' or 'best', got {rule!r}")
        if weighting not in ("uniform", "similarity"):
            raise ValueError(f"weighting must be 'uniform' or 'similarity', got {weighting!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= drop_fraction < 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1), got {drop_fraction}")
        if not bank or bank_stats(bank)["queries"] == 0:
            raise BankError("the query bank holds no queries")
        self.bank = bank
        self.method = method
        self.parameter = own
        self.strength: Strength = strength
        self.seed = seed
        self.rule = rule
        self.weighting = weighting
        self.temperature = temperature
        self.drop_fraction = drop_fraction
        self.fingerprint = bank_fingerprint(bank)
        self.selections: dict[str, AutoSelection] = {}

    @property
    def tag(self) -> str:
        value = ("auto" + ("-best" if self.rule == "best" else "")) if self.strength == "auto" else f"{self.strength:g}"
        extra = ("-simw" if self.weighting == "similarity" else "") + (
            f"-drop{self.drop_fraction:g}" if self.drop_fraction else "")
        return f"fuse-{self.method}-{self.parameter[0]}{value}{extra}"

    def describe(self) -> dict[str, Any]:
        config: dict[str, Any] = {"method": self.method, self.parameter: self.strength, "bank": self.fingerprint,
                                  **{f"bank_{k}": v for k, v in bank_stats(self.bank).items()},
                                  "weighting": self.weighting, "drop_fraction": self.drop_fraction}
        if self.weighting == "similarity":
            config["temperature"] = self.temperature
        if self.strength == "auto":
            config.update(grid=self.grid, seed=self.seed, rule=self.rule, selection="heldout-generated-query MRR@10")
        return config

    @property
    def training_datasets(self) -> set[str]:
        return set()

    def fuse(self, passages: Any, queries: CorpusQueries, strength: float,
             scale: np.ndarray | None = None) -> np.ndarray:
        """Fused (n_docs, d) float32 vectors of `passages` with `queries` at one strength, block by block.

        `scale` (n_queries,) multiplies the query weights (held-out selection uses it for "sum").
        """
        out = np.empty((len(passages), passages.shape[1]), dtype=np.float32)
        for start in range(0, len(out), FUSE_BLOCK):
            rows = slice(start, min(start + FUSE_BLOCK, len(out)))
            out[rows] = self.fuse_rows(passages, queries, strength, rows, scale)
        return out

    def fuse_rows(self, passages: Any, queries: CorpusQueries, strength: float, rows: slice,
                  scale: np.ndarray | None = None) -> np.ndarray:
        """Fused float64 vectors of the passages `rows` (`queries.owner` is sorted, so theirs are contiguous)."""
        lo, hi = np.searchsorted(queries.owner, [rows.start, rows.stop])
        block = CorpusQueries(queries.texts[lo:hi], queries.owner[lo:hi] - rows.start, queries.vectors[lo:hi])
        p = np.asarray(passages[rows], dtype=np.float64)
        weights = (similarity_weights(block, p, self.temperature) if self.weighting == "similarity"
                   else np.ones(hi - lo))
        if scale is not None:
            weights = weights * scale[lo:hi]
        sums, counts = weighted_sums(block, weights, p.shape[0])
        return FUSERS[self.method](p, sums, counts, strength)

    def filter_queries(self, queries: CorpusQueries, passages: np.ndarray) -> CorpusQueries:
        """Drop the `drop_fraction` of queries least similar to their passage (Doc2Query--)."""
        if not self.drop_fraction:
            return queries
        sims = passage_similarity(queries, passages)
        keep = sims > np.quantile(sims, self.drop_fraction)
        logger.info("query filter: kept %d of %d generated queries (cos to passage > %.3f)",
                    keep.sum(), len(keep), np.quantile(sims, self.drop_fraction))
        return queries.subset(keep)

    def select(self, passages: np.ndarray, queries: CorpusQueries, encoder: SteerEncoder,
               task_name: str = "") -> AutoSelection:
        """Label-free choice of the strength: held-out generated queries retrieving their own passage.

        For "sum" the remaining n-1 queries of a passage are scaled by n/(n-1), so the fused vector
        has the magnitude it will have with all n queries (mean and rotate do not depend on n).
        """
        held = hold_out_one(queries.owner, passages.shape[0], self.seed)
        if not held.any():
            raise BankError(f"{self.parameter}='auto' needs passages with >= 2 generated queries; "
                            f"{task_name or 'this corpus'} has none (give {self.parameter} explicitly)")
        rest, probe = queries.subset(~held), queries.subset(held)
        scale = None
        if self.method == "sum":
            n_docs = passages.shape[0]
            scale = (np.bincount(queries.owner, minlength=n_docs) / np.bincount(rest.owner, minlength=n_docs))[rest.owner]
        available = int(probe.owner.size)
        if available > AUTO_SAMPLE:
            keep = np.zeros(available, dtype=bool)
            keep[np.random.default_rng(self.seed).choice(available, AUTO_SAMPLE, replace=False)] = True
            probe = probe.subset(keep)
        ranks = [reciprocal_ranks(probe.vectors, probe.owner, FusedCorpus(self, passages, rest, value, scale), encoder)
                 for value in tqdm(self.grid, desc=f"{self.parameter}=auto", leave=False)]
        selection = AutoSelection(self.parameter, self.rule, list(self.grid), [float(r.mean()) for r in ranks],
                                  [float(r.std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else 0.0 for r in ranks],
                                  pick_strength(self.grid, ranks, self.rule), int(probe.owner.size), available)
        logger.info("%s auto (%s, %d held-out queries, rule %s): %s -> %s=%g", self.tag, task_name,
                    selection.heldout_queries, self.rule, selection.table(), self.parameter, selection.chosen)
        return selection

    def fit_report(self, task_name: str) -> dict[str, Any]:
        """The `auto` selection made on `task_name` (grid, held-out MRR@10 per value, chosen); {} for a fixed strength."""
        selection = self.selections.get(task_name)
        return asdict(selection) if selection else {}

    def steer_corpus(self, index: CorpusIndex, encoder: SteerEncoder) -> np.ndarray:
        """The fused document vectors, float32 (n_docs, dim), in index row order."""
        queries = self.filter_queries(corpus_queries(self.bank, index, encoder), index.embeddings)
        strength = self.strength
        if strength == "auto":
            selection = self.select(index.embeddings, queries, encoder, index.task_name)
            self.selections[index.task_name] = selection
            strength = selection.chosen
        return self.fuse(index.embeddings, queries, float(strength))


class MultiVectorMax:
    """ScoreFusion: a passage is also represented by its generated queries; score = max over them.

    score(query, d) = max(dense(query, p_d), max_i sim(query, q_{d,i}) - margin). The generated
    queries are embedded at `fit` (base query vectors, as in QueryFusion). `margin` >= 0 handicaps
    query-to-query matches, which are easier than query-to-passage ones.
    """

    def __init__(self, bank: QueryBank, encoder: SteerEncoder, *, margin: float = 0.0) -> None:
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.bank = bank
        self.encoder = encoder
        self.margin = margin
        self.fingerprint = bank_fingerprint(bank)
        self.queries_: CorpusQueries | None = None

    @property
    def tag(self) -> str:
        return f"maxsim-m{self.margin:g}"

    def describe(self) -> dict[str, Any]:
        return {"method": "multi-vector max", "margin": self.margin, "bank": self.fingerprint,
                **{f"bank_{k}": v for k, v in bank_stats(self.bank).items()}}

    @property
    def training_datasets(self) -> set[str]:
        return set()

    def fit(self, index: CorpusIndex) -> None:
        self.queries_ = corpus_queries(self.bank, index, self.encoder)

    def fuser(self, queries: QueryBatch, index: CorpusIndex, dense_tiles: Callable[[], Iterator[Tile]]) -> TileFuser:
        """Per tile: elementwise max of dense and best-generated-query similarity (no first pass needed)."""
        if self.queries_ is None:
            raise ValueError("MultiVectorMax.fit(index) must run before fuser()")
        owner = self.queries_.owner  # sorted by corpus row (corpus_queries)

        def fuse(q_rows: slice, d_rows: slice, dense: torch.Tensor) -> torch.Tensor:
            lo, hi = np.searchsorted(owner, [d_rows.start, d_rows.stop])
            if lo == hi:
                return dense
            generated = torch.as_tensor(self.queries_.vectors[lo:hi], device=dense.device)
            gen = torch.as_tensor(self.encoder.similarity(
                torch.as_tensor(queries.embeddings[q_rows], device=dense.device), generated)) - self.margin
            rows = torch.as_tensor(owner[lo:hi] - d_rows.start, device=dense.device).expand(gen.shape[0], -1)
            return dense.clone().scatter_reduce_(1, rows, gen.to(dense.dtype), reduce="amax", include_self=True)

        return fuse
