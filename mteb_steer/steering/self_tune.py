"""Self-tuning per corpus (`--self-tune`): each corpus chooses its BM25 (k1, b) and lexical weight from
pseudo-queries, with no label.

Why: one fixed BM25 setting cannot fit every corpus (long argumentative passages want stronger
length normalisation than MS MARCO's short ones), and the lexical weight that suits one dense
model and corpus does not suit another. Labels are what a new corpus lacks, so the choice is made
from pseudo-queries whose only relevant passage is known by construction:

- **with a query bank**: one generated query of each of `sample_size` sampled passages (seeded;
  passages with >= 2 queries first) is held out of EVERYTHING it tunes: `split_bank` removes it
  from the bank before fusion and lexical expansion see the bank;
- **without a bank**: one sentence of each sampled passage (seeded, among passages with >= 2
  sentences) becomes the pseudo-query, and is removed from that passage's text in the tuning
  indexes, dense and lexical (`cut_sentence_probes`; the BM25 tuning index loses one sentence of
  every such passage, so relevant passages are not shorter than their competitors); the real index
  keeps the full text.

Pseudo-queries are easier than real ones (they share words with their passage). The rule corrects
for it three ways: the pseudo-query is removed from what its passage is indexed with (above);
settings are compared by a rank-based criterion, single-relevant nDCG@10 of the own passage
(rank = passages scoring strictly higher); and the fixed configuration (k1=0.9, b=0.4, weight
DEFAULT_WEIGHT) is kept unless a grid setting beats it by more than one paired standard error:
among the settings within one paired standard error of the best, the one nearest the reference
is chosen. Steps run in pipeline order: (k1, b) by BM25 alone, then the weight by the hybrid with
the chosen (k1, b) over the (possibly fused) document vectors. The corpus-fusion strength is the
fusion step's own `auto` choice over the bank with the pseudo-queries removed (same one-SE rule,
reference 0). Memory: pseudo-queries are scored in chunks of at most `work_mem_mb` MiB of
(chunk, n_docs) scores; never a queries x corpus array. No qrels are read: only the corpus.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from mteb.types import PromptType
from tqdm.auto import tqdm

from mteb_steer.blocks import CORPUS_BLOCK, BlockPlan, dense_tiles
from mteb_steer.steering.banks import BankError, QueryBank
from mteb_steer.steering.bm25_build import TermCounts
from mteb_steer.steering.lexical import (
    DEFAULT_WEIGHT,
    BM25Params,
    LexicalHybrid,
    LexicalIndex,
    _DenseStats,
    _LexicalStats,
    _normalise,
    count_terms,
    expand_with_bank,
)

if TYPE_CHECKING:
    from mteb_steer.encoder import SteerEncoder
    from mteb_steer.steps import CorpusIndex

logger = logging.getLogger(__name__)

SAMPLE_SIZE = 500
SEED = 0
K1_GRID = (0.6, 0.9, 1.2, 1.5)
B_GRID = (0.4, 0.6, 0.75, 0.9)
WEIGHT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
REFERENCE_PARAMS = BM25Params()  # k1=0.9, b=0.4: the fixed configuration
MIN_SENTENCE_WORDS = 5
RULE = "nearest-reference-within-1se"
CRITERION = "pseudo-query nDCG@10 (own passage only relevant)"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


# -- pseudo-queries ----------------------------------------------------------------------------------

@dataclass
class Probes:
    """Pseudo-queries: `texts[i]`'s only relevant passage is corpus row `rows[i]`.

    `tuning_texts` are the corpus texts the tuning index sees (None: the corpus texts as they are);
    `cut_rows` are the rows whose text differs there (their pseudo-query removed).
    """

    texts: list[str]
    rows: np.ndarray
    source: str
    tuning_texts: list[str] | None = None
    cut_rows: np.ndarray | None = None


def split_bank(bank: QueryBank, sample_size: int = SAMPLE_SIZE, seed: int = SEED
               ) -> tuple[QueryBank, dict[str, str]]:
    """(the bank without the held-out queries, {doc_id: held-out query}): one query of each of
    `sample_size` sampled passages, those with >= 2 queries first (they keep some expansion)."""
    if sample_size < 1:
        raise ValueError(f"self-tune sample size must be >= 1, got {sample_size}")
    rng = np.random.default_rng(seed)
    ids = sorted(doc_id for doc_id, queries in bank.items() if queries)
    if not ids:
        raise BankError("the query bank holds no queries: nothing to hold out for self-tuning")
    many = [i for i in ids if len(bank[i]) >= 2]
    single = [i for i in ids if len(bank[i]) == 1]
    chosen = list(rng.permutation(np.array(many, dtype=object)))[:sample_size]
    if len(chosen) < sample_size:
        chosen += list(rng.permutation(np.array(single, dtype=object)))[:sample_size - len(chosen)]
    held: dict[str, str] = {}
    kept = {doc_id: list(queries) for doc_id, queries in bank.items()}
    for doc_id in sorted(chosen):
        pick = int(rng.integers(len(bank[doc_id])))
        held[doc_id] = kept[doc_id].pop(pick)
    return kept, held


def bank_probes(held: dict[str, str], index: CorpusIndex) -> Probes:
    """The held-out generated queries whose passage is in this corpus."""
    pairs = [(index.id_to_row[doc_id], query) for doc_id, query in sorted(held.items()) if doc_id in index.id_to_row]
    if not pairs:
        raise BankError(f"none of the {len(held)} held-out generated queries belongs to a passage of "
                        f"{index.task_name or 'this corpus'}: is the bank another corpus's?")
    return Probes([q for _, q in pairs], np.array([r for r, _ in pairs], dtype=np.int64), "held-out generated query")


def sentences(text: str) -> list[str]:
    """Split on sentence ends (., !, ? followed by space and a capital, digit, quote or bracket)."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def cut_sentence_probes(texts: Sequence[str], sample_size: int = SAMPLE_SIZE, seed: int = SEED) -> Probes:
    """Pseudo-queries cut from the passages: one sentence (>= MIN_SENTENCE_WORDS words) of each of
    `sample_size` sampled passages with >= 2 sentences.

    `tuning_texts` lose one such sentence in EVERY eligible passage (the pseudo-query, for the
    sampled ones): cutting only the sampled passages would make exactly the relevant passages
    shorter than their competitors, and BM25's length normalisation (b) would be rewarded for it.
    `cut_rows` are the sampled rows (the dense side re-embeds only those).
    """
    if sample_size < 1:
        raise ValueError(f"self-tune sample size must be >= 1, got {sample_size}")
    rng = np.random.default_rng(seed)
    tuning = list(texts)
    cut: dict[int, str] = {}
    for row, text in enumerate(texts):
        parts = sentences(text)
        usable = [i for i, s in enumerate(parts) if len(s.split()) >= MIN_SENTENCE_WORDS]
        if len(parts) < 2 or not usable:
            continue
        pick = usable[int(rng.integers(len(usable)))]
        cut[row] = parts[pick]
        tuning[row] = " ".join(parts[:pick] + parts[pick + 1:])
    if not cut:
        raise ValueError(f"self-tuning found no passage with two sentences of >= {MIN_SENTENCE_WORDS} words "
                         f"among {len(texts)} passages to cut pseudo-queries from; give a --query-bank")
    eligible = np.array(sorted(cut), dtype=np.int64)
    rows = np.sort(rng.choice(eligible, size=min(sample_size, len(eligible)), replace=False))
    return Probes([cut[int(r)] for r in rows], rows, "passage sentence", tuning, rows)


def cut_vectors(probes: Probes, tuning_texts: Sequence[str], encoder: SteerEncoder
                ) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows, vectors) of the sampled passages re-embedded without their cut sentence: the dense side
    must not see the pseudo-query in its own passage either. None when nothing was cut."""
    if probes.cut_rows is None:
        return None
    return probes.cut_rows, encoder.embed([tuning_texts[r] for r in probes.cut_rows], PromptType.document)


# -- criterion and rule ----------------------------------------------------------------------------

def ndcg_at_10(ranks: np.ndarray) -> np.ndarray:
    """Single-relevant nDCG@10 per query from its own passage's 0-based rank."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0)


def probe_ranks(probes: Probes, n_docs: int, weights: Sequence[float], *, lexical: LexicalIndex | None = None,
                query_vectors: np.ndarray | None = None, doc_vectors: np.ndarray | None = None,
                encoder: SteerEncoder | None = None, fusion: str = "zscore", work_mem_mb: int = 256,
                doc_overrides: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """(len(weights), n_probes) 0-based rank of each pseudo-query's own passage, per lexical weight.

    Score = (1 - w) * norm(dense) + w * norm(bm25) as LexicalHybrid fuses ("zscore"/"minmax"), w = 1
    being BM25 alone (needs only `lexical`), w = 0 dense alone. Probes are scored in chunks so
    that a chunk's score matrices stay within `work_mem_mb`. `doc_overrides` (rows, vectors) stand in
    for those passages' corpus vectors (re-embedded without their cut sentence), so the corpus matrix,
    possibly memory-mapped, is read block by block and never copied.
    """
    if fusion not in ("zscore", "minmax"):
        raise ValueError(f"self-tuning scores the z-score or min-max hybrid, not {fusion!r}")
    dense_needed = any(w < 1.0 for w in weights)
    if dense_needed and (query_vectors is None or doc_vectors is None or encoder is None):
        raise ValueError("lexical weights below 1 need query_vectors, doc_vectors and the encoder")
    lexical_needed = any(w > 0.0 for w in weights)
    if lexical_needed and lexical is None:
        raise ValueError("lexical weights above 0 need the lexical index")
    out = np.empty((len(weights), len(probes.texts)), dtype=np.int64)
    chunk = max(1, work_mem_mb * 2**20 // (16 * n_docs))
    for start in range(0, len(probes.texts), chunk):
        stop = min(start + chunk, len(probes.texts))
        own = torch.from_numpy(probes.rows[start:stop])
        pick = torch.arange(stop - start)
        dense = lex = None
        if dense_needed:
            raw = _dense_rows(encoder, query_vectors[start:stop], doc_vectors, doc_overrides)
            stats = _DenseStats(stop - start, raw.device)
            stats.update(slice(0, stop - start), raw)
            dense = _normalise(raw, *stats.center_scale(fusion))
        if lexical_needed:
            query_matrix = lexical.query_matrix(probes.texts[start:stop])[0]
            matched, constant = lexical.matched_block(query_matrix, slice(0, n_docs)), lexical.constant(query_matrix)
            lex_stats = _LexicalStats(stop - start)
            lex_stats.update(slice(0, stop - start), matched)
            lex = _normalise(torch.from_numpy(matched + constant[:, None]), *lex_stats.center_scale(fusion, constant))
        for k, w in enumerate(weights):
            fused = dense if w == 0.0 else lex if w == 1.0 else (1 - w) * dense + w * lex
            target = fused[pick, own]
            out[k, start:stop] = (fused > target[:, None]).sum(dim=1).numpy()
    return out


def _dense_rows(encoder: SteerEncoder, queries: np.ndarray, doc_vectors: Any,
                overrides: tuple[np.ndarray, np.ndarray] | None) -> torch.Tensor:
    """(len(queries), n_docs) float32 similarities, scored corpus block by corpus block as search does."""
    q = torch.as_tensor(np.asarray(queries), dtype=torch.float32)
    n_docs = len(doc_vectors)
    raw = torch.empty((len(q), n_docs), dtype=torch.float32)
    plan = BlockPlan(len(q), n_docs, max(len(q), 1), CORPUS_BLOCK)
    for _, d_rows, scores in dense_tiles(encoder.similarity, q, doc_vectors, plan, desc="self-tune dense"):
        raw[:, d_rows] = scores.float()
    if overrides is not None:
        rows, vectors = overrides
        raw[:, torch.from_numpy(np.asarray(rows))] = torch.as_tensor(
            encoder.similarity(q, torch.as_tensor(np.asarray(vectors), dtype=torch.float32))).float()
    return raw


@dataclass
class GridChoice:
    """One self-tuned parameter: the grid, the criterion (mean, paired SE vs the best) per value, the choice."""

    parameter: str
    grid: list[Any]
    scores: list[float]
    paired_se: list[float]
    reference: Any
    chosen: Any
    rule: str = RULE
    criterion: str = CRITERION
    pseudo_queries: int = 0
    source: str = ""


def choose(grid: Sequence[Any], per_query: np.ndarray, reference_index: int, distance: Sequence[float]
           ) -> tuple[int, list[float]]:
    """Index of the chosen grid value from per-query criterion values (len(grid), n_queries).

    The candidates are the values whose mean is within one paired standard error (std of the
    per-query difference to the best, / sqrt(n)) of the best mean; of these the one with the
    smallest `distance` to the reference (the reference itself when it qualifies; ties: the better).
    Returns (index, paired SE per value).
    """
    means = per_query.mean(axis=1)
    best = int(np.argmax(means))
    n = per_query.shape[1]
    diffs = per_query[best][None, :] - per_query
    se = diffs.std(axis=1, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(len(grid))
    candidates = [i for i in range(len(grid)) if means[i] >= means[best] - se[i]]
    chosen = min(candidates, key=lambda i: (i != reference_index, distance[i], -means[i]))
    return chosen, [float(v) for v in se]


def _bm25_distance(params: BM25Params) -> float:
    return abs(params.k1 - REFERENCE_PARAMS.k1) / (max(K1_GRID) - min(K1_GRID)) + abs(
        params.b - REFERENCE_PARAMS.b) / (max(B_GRID) - min(B_GRID))


def bm25_grid() -> list[BM25Params]:
    """The (k1, b) settings tried: K1_GRID x B_GRID (the reference 0.9, 0.4 among them)."""
    return [BM25Params(k1=k1, b=b) for k1 in K1_GRID for b in B_GRID]


def grid_counts(texts: Sequence[str], ids: Sequence[str], bank: QueryBank | None,
                grid: Sequence[BM25Params]) -> TermCounts:
    """The (expanded) passages' term counts, once for a whole (k1, b) grid (which must share tokenisation)."""
    if len({(p.stopwords, p.stemmer) for p in grid}) != 1:
        raise ValueError("a BM25 grid must share stop words and stemmer (it is tokenised once)")
    expanded = expand_with_bank(ids, texts, bank)[0] if bank is not None else texts
    return count_terms(expanded, grid[0])


def tune_bm25(probes: Probes, ids: Sequence[str], texts: Sequence[str], bank: QueryBank | None,
              grid: Sequence[BM25Params], work_mem_mb: int = 256, counts: TermCounts | None = None
              ) -> tuple[GridChoice, np.ndarray]:
    """Choose (k1, b) by BM25 alone on the pseudo-queries; also returns the per-query criterion (grid, n).
    `counts`: the texts' `grid_counts`, when the caller also needs them (tokenising is the costly part)."""
    counts = counts if counts is not None else grid_counts(texts, ids, bank, grid)
    per_query = []
    for params in tqdm(grid, desc="self-tune BM25 (k1, b)", leave=False):
        index = LexicalIndex.build(ids, texts, params, bank, counts=counts)
        per_query.append(ndcg_at_10(probe_ranks(probes, len(ids), [1.0], lexical=index, work_mem_mb=work_mem_mb)[0]))
    values = np.stack(per_query)
    ref = next((i for i, p in enumerate(grid) if (p.k1, p.b) == (REFERENCE_PARAMS.k1, REFERENCE_PARAMS.b)), 0)
    chosen, se = choose(grid, values, ref, [_bm25_distance(p) for p in grid])
    return GridChoice("bm25 (k1, b)", [[p.k1, p.b] for p in grid], [float(v) for v in values.mean(axis=1)], se,
                      [grid[ref].k1, grid[ref].b], [grid[chosen].k1, grid[chosen].b],
                      pseudo_queries=len(probes.texts), source=probes.source), values


def tune_weight(probes: Probes, lexical: LexicalIndex, query_vectors: np.ndarray, doc_vectors: np.ndarray,
                encoder: SteerEncoder, grid: Sequence[float], fusion: str, work_mem_mb: int = 256,
                doc_overrides: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[GridChoice, np.ndarray]:
    """Choose the lexical weight by the hybrid on the pseudo-queries; also the per-query criterion."""
    ranks = probe_ranks(probes, lexical.n_docs, grid, lexical=lexical, query_vectors=query_vectors,
                        doc_vectors=doc_vectors, encoder=encoder, fusion=fusion, work_mem_mb=work_mem_mb,
                        doc_overrides=doc_overrides)
    values = ndcg_at_10(ranks)
    ref = int(np.argmin([abs(w - DEFAULT_WEIGHT) for w in grid]))
    chosen, se = choose(grid, values, ref, [abs(w - grid[ref]) for w in grid])
    return GridChoice("lexical_weight", list(grid), [float(v) for v in values.mean(axis=1)], se, grid[ref],
                      grid[chosen], pseudo_queries=len(probes.texts), source=probes.source), values


# -- the step -----------------------------------------------------------------------------------------

class SelfTunedHybrid(LexicalHybrid):
    """`LexicalHybrid` whose BM25 (k1, b) and weight are chosen per corpus at `fit` (module docstring).

    Args:
        encoder: embeds the pseudo-queries (as queries, with the query transforms real queries get)
            and, without a bank, the passages they were cut from (as documents).
        held_out: {doc_id: generated query} from `split_bank`; None = cut sentences from passages.
        bank: the bank WITHOUT the held-out queries (expansion, when `expand`).
        sample_size / seed: how many pseudo-queries, and which.
        The other arguments are LexicalHybrid's.
    """

    def __init__(self, encoder: SteerEncoder, *, fusion: str | None = None, held_out: dict[str, str] | None = None,
                 bank: QueryBank | None = None, expand: bool = True, sample_size: int = SAMPLE_SIZE,
                 seed: int = SEED, k1_grid: Sequence[float] = K1_GRID, b_grid: Sequence[float] = B_GRID,
                 weight_grid: Sequence[float] = WEIGHT_GRID, work_mem_mb: int = 256, **kwargs: Any) -> None:
        super().__init__(DEFAULT_WEIGHT, fusion, bank=bank, expand=expand, **kwargs)
        self.work_mem_mb = work_mem_mb  # bound on one chunk of pseudo-query scores while tuning
        if self.fusion not in ("zscore", "minmax"):
            raise ValueError(f"--self-tune chooses weights for the zscore or minmax fusion, not {self.fusion!r}")
        if not weight_grid or any(not 0 <= w <= 1 for w in weight_grid):
            raise ValueError(f"the self-tune weight grid must be values in [0, 1], got {list(weight_grid)}")
        self.encoder = encoder
        self.held_out = held_out
        self.sample_size = sample_size
        self.seed = seed
        self.bm25_grid = [BM25Params(k1=k1, b=b) for k1 in k1_grid for b in b_grid]
        self.weight_grid = sorted(float(w) for w in weight_grid)
        self.tag = f"bm25{'x' if self.bank is not None else ''}-{self.fusion}-selftune"
        self.choices: dict[str, list[GridChoice]] = {}

    @property
    def training_datasets(self) -> set[str]:
        return set()

    def describe(self) -> dict[str, Any]:
        config = super().describe()
        for fixed in ("weight", "bm25", "defaults_chosen_on"):
            config.pop(fixed)
        config["self_tune"] = {"k1_grid": sorted({p.k1 for p in self.bm25_grid}),
                               "b_grid": sorted({p.b for p in self.bm25_grid}), "weight_grid": self.weight_grid,
                               "sample_size": self.sample_size, "seed": self.seed, "rule": RULE,
                               "criterion": CRITERION,
                               "pseudo_queries": "held-out generated" if self.held_out is not None else "passage sentence",
                               "held_out": None if self.held_out is None else len(self.held_out)}
        return config

    def probes(self, index: CorpusIndex) -> Probes:
        """The pseudo-queries of this corpus (held-out bank queries, else sentences cut from passages)."""
        if self.held_out is not None:
            return bank_probes(self.held_out, index)
        return cut_sentence_probes(index.texts, self.sample_size, self.seed)

    def fit(self, index: CorpusIndex) -> None:
        """Choose (k1, b), then the weight, on this corpus's pseudo-queries; then build the real index."""
        probes = self.probes(index)
        texts = probes.tuning_texts if probes.tuning_texts is not None else index.texts
        counts = grid_counts(texts, index.ids, self.bank, self.bm25_grid)  # shared by the grid and the chosen index
        bm25, _ = tune_bm25(probes, index.ids, texts, self.bank, self.bm25_grid, self.work_mem_mb, counts=counts)
        self.params = BM25Params(k1=bm25.chosen[0], b=bm25.chosen[1])
        lexical = LexicalIndex.build(index.ids, texts, self.params, self.bank, counts=counts)
        query_vectors = self.encoder.embed(probes.texts, PromptType.query)
        weight, _ = tune_weight(probes, lexical, query_vectors, index.embeddings, self.encoder, self.weight_grid,
                                self.fusion, self.work_mem_mb, cut_vectors(probes, texts, self.encoder))
        self.weight = float(weight.chosen)
        self.choices[index.task_name] = [bm25, weight]
        logger.info("self-tune %s (%d pseudo-queries, %s): k1=%g b=%g weight=%g", index.task_name,
                    len(probes.texts), probes.source, self.params.k1, self.params.b, self.weight)
        super().fit(index)

    def fit_report(self, task_name: str) -> dict[str, Any]:
        """What was chosen on `task_name`: `chosen` is the weight; `choices` holds every step's grid and criterion."""
        choices = self.choices.get(task_name)
        if not choices:
            return {}
        bm25, weight = choices
        return {"parameter": "lexical_weight", "chosen": weight.chosen, "rule": RULE,
                "bm25": {"k1": bm25.chosen[0], "b": bm25.chosen[1]}, "choices": [asdict(c) for c in choices]}
