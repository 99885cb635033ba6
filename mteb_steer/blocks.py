"""Block-wise scoring: queries x corpus in tiles of (query block x corpus block), never as one matrix.

Why: the score matrix of MS MARCO dev (6,980 queries x 8.8M passages) is about 247 GB. Everything
that ranks the corpus (search, score fusion, refinement candidates, the `auto` fusion check,
teachers) walks it here in corpus blocks of `CORPUS_BLOCK` passages (mteb's own
`corpus_chunk_size`, so the running top-k keeps mteb's tie order) and query blocks sized to a
memory budget, with torch on the encoder's device (CUDA when the encoder sits there).

Corpus vectors may be any array of rows, including an `np.memmap` in float16 or float32: each
block is converted to a float32 tensor on the device when it is scored, so only one block is
resident at a time.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mteb_steer.steps import Tile

logger = logging.getLogger(__name__)

CORPUS_BLOCK = 50_000  # mteb SearchEncoderWrapper's corpus_chunk_size: its top-k tie order depends on it
SCORE_BUDGET_BYTES = 256 * 2**20  # score tiles alive at once: the tile plus a few same-sized temporaries
TILE_COPIES = 4  # dense, lexical, fused and one temporary tile per (query block x corpus block)
LARGE_CORPUS = 100_000  # from this many passages on, log the memory plan and show a progress bar
ROW_ALIGN = 16  # query blocks are padded to a multiple of this many rows (see `dense_tiles`)



@dataclass(frozen=True)
class BlockPlan:
    """How a (n_queries x n_docs) scoring is cut: corpus blocks outside, query blocks inside."""

    n_queries: int
    n_docs: int
    query_block: int
    corpus_block: int

    @property
    def bytes_per_tile(self) -> int:
        """float32 bytes of one full score tile."""
        return 4 * self.query_block * min(self.corpus_block, max(self.n_docs, 1))

    def tiles(self) -> Iterator[tuple[slice, slice]]:
        """(query rows, corpus rows) in corpus-block order, every query block within each corpus block."""
        for d in range(0, self.n_docs, self.corpus_block):
            docs = slice(d, min(d + self.corpus_block, self.n_docs))
            for q in range(0, self.n_queries, self.query_block):
                yield slice(q, min(q + self.query_block, self.n_queries)), docs

    @property
    def n_tiles(self) -> int:
        return -(-self.n_docs // self.corpus_block) * -(-self.n_queries // self.query_block)

    def describe(self) -> str:
        return (f"{self.n_queries} queries x {self.n_docs} passages in tiles of {self.query_block} x "
                f"{self.corpus_block} ({self.n_tiles} tiles, {self.bytes_per_tile / 2**20:.0f} MiB of float32 "
                f"scores per tile, about {TILE_COPIES * self.bytes_per_tile / 2**20:.0f} MiB at once)")


def plan_blocks(n_queries: int, n_docs: int, *, corpus_block: int = CORPUS_BLOCK,
                budget_bytes: int = SCORE_BUDGET_BYTES, what: str = "scoring") -> BlockPlan:
    """The tiling for `n_queries` x `n_docs` within `budget_bytes` of score tiles; logged for large corpora."""
    if corpus_block < 1:
        raise ValueError(f"corpus_block must be >= 1, got {corpus_block}")
    width = min(corpus_block, max(n_docs, 1))
    query_block = max(ROW_ALIGN, budget_bytes // (TILE_COPIES * 4 * width) // ROW_ALIGN * ROW_ALIGN)
    query_block = min(query_block, max(n_queries, 1))
    plan = BlockPlan(n_queries, n_docs, query_block, corpus_block)
    if n_docs >= LARGE_CORPUS:
        logger.info("%s: %s", what, plan.describe())
    return plan


def corpus_block(corpus: Any, rows: slice, device: torch.device | str, dtype: torch.dtype = torch.float32
                 ) -> torch.Tensor:
    """Rows of a corpus array (ndarray, memmap or tensor, any float dtype) as a `dtype` tensor on `device`."""
    block = corpus[rows]
    if isinstance(block, torch.Tensor):
        return block.to(device=device, dtype=dtype)
    return torch.tensor(np.asarray(block), dtype=dtype, device=device)


def dense_tiles(similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], queries: torch.Tensor,
                corpus: Any, plan: BlockPlan, *, desc: str = "scoring") -> Iterator[Tile]:
    """Similarity tiles of `queries` (a tensor on the scoring device) against corpus rows, block by block.

    `similarity` is the encoder's own (mteb `similarity_fn_name`), applied to each block pair. A query
    block is padded with zero rows to a multiple of ROW_ALIGN: BLAS (MKL) takes other kernels, with other
    rounding, for a handful of rows, and the padding keeps every score bit-identical to one product of
    all queries with the block, whatever the tiling (measured: unpadded blocks of 1-47 rows differ in
    the last bit, which reorders duplicate passages' ties). Splitting the corpus side changes nothing.
    """
    bar = tqdm(total=plan.n_tiles, desc=desc, unit="tile", disable=plan.n_docs < LARGE_CORPUS, leave=False)
    current: slice | None = None
    block = None
    for q_rows, d_rows in plan.tiles():
        if d_rows != current:
            current, block = d_rows, corpus_block(corpus, d_rows, queries.device, queries.dtype)
        rows = queries[q_rows]
        short = -rows.shape[0] % ROW_ALIGN
        if short:
            rows = torch.cat([rows, rows.new_zeros((short, rows.shape[1]))])
        scores = torch.as_tensor(similarity(rows, block))
        yield q_rows, d_rows, scores[:scores.shape[0] - short]
        bar.update(1)
    bar.close()


class MtebTopK:
    """Running top-k per query with exactly the choices of mteb's `SearchEncoderWrapper`.

    Per corpus block `torch.topk(top_k + 1)`, then a (score, doc_id) min-heap of size top_k per query:
    ties between equal scores resolve as in mteb, which matters on corpora with duplicate passages
    (ArguAna has 96 identical embeddings). Pushes that cannot change a full heap (score below its
    minimum) are skipped in bulk, so the Python loop only sees items that enter the heap.
    """

    def __init__(self, query_ids: Sequence[str], doc_ids: Sequence[str], top_k: int) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.query_ids = list(query_ids)
        self.doc_ids = doc_ids
        self.top_k = top_k
        self.heaps: list[list[tuple[float, str]]] = [[] for _ in self.query_ids]
        self.floor = np.full(len(self.query_ids), -np.inf, dtype=np.float32)  # heap minimum once full

    def push(self, q_rows: slice, d_rows: slice, scores: torch.Tensor) -> None:
        """Offer one tile (queries q_rows x passages d_rows), which must be one whole corpus block."""
        values, idx = torch.topk(scores, min(self.top_k + 1, scores.shape[1]), dim=1, largest=True)
        values, idx = values.cpu().numpy(), idx.cpu().numpy() + d_rows.start
        counts = (values >= self.floor[q_rows, None]).sum(1)  # topk is sorted: the kept items are a prefix
        for local in np.flatnonzero(counts):
            q, n = q_rows.start + local, counts[local]
            heap = self.heaps[q]
            for i, score in zip(idx[local, :n].tolist(), values[local, :n].tolist(), strict=True):
                item = (score, self.doc_ids[i])
                if len(heap) < self.top_k:
                    heapq.heappush(heap, item)
                else:
                    heapq.heappushpop(heap, item)
            if len(heap) == self.top_k:
                self.floor[q] = heap[0][0]

    def result(self) -> dict[str, dict[str, float]]:
        """{query id: {doc id: score}} in mteb's (heap) order."""
        return {qid: {doc: score for score, doc in heap} for qid, heap in zip(self.query_ids, self.heaps, strict=True)}


class TopRows:
    """Running top-k corpus rows per query (best first), merged tile by tile on the scoring device.

    Equal scores may come in either order (torch.topk); -inf scores mark rows never to be taken.
    """

    def __init__(self, n_queries: int, k: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> None:
        self.k = k
        self.values = torch.full((n_queries, k), -torch.inf, device=device, dtype=dtype)
        self.rows = torch.full((n_queries, k), -1, dtype=torch.int64, device=device)

    def push(self, q_rows: slice, d_rows: slice, scores: torch.Tensor) -> None:
        values, idx = torch.topk(scores, min(self.k, scores.shape[1]), dim=1)
        values = torch.cat([self.values[q_rows], values], dim=1)
        rows = torch.cat([self.rows[q_rows], idx + d_rows.start], dim=1)
        best, pick = torch.topk(values, self.k, dim=1)
        self.values[q_rows], self.rows[q_rows] = best, torch.gather(rows, 1, pick)


def mask_rows(scores: torch.Tensor, q_rows: slice, d_rows: slice, rows: torch.Tensor | None) -> torch.Tensor:
    """Set scores[q, rows[q]] to -inf where query q's excluded row `rows[q]` (-1: none) lies in this tile."""
    if rows is None:
        return scores
    own = rows[q_rows]
    hit = torch.nonzero((own >= d_rows.start) & (own < d_rows.stop)).squeeze(1)
    scores[hit, own[hit] - d_rows.start] = -torch.inf
    return scores


def gather_pairs(tiles: Iterator[Tile], query_idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float32 scores of the (query_idx[i], rows[i]) pairs, read from the tiles that hold them."""
    out = np.full(len(rows), np.nan, dtype=np.float32)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    for q_rows, d_rows, scores in tiles:
        lo, hi = np.searchsorted(sorted_rows, [d_rows.start, d_rows.stop])
        pick = order[lo:hi]
        pick = pick[(query_idx[pick] >= q_rows.start) & (query_idx[pick] < q_rows.stop)]
        if len(pick):
            q = torch.as_tensor(query_idx[pick] - q_rows.start, device=scores.device)
            d = torch.as_tensor(rows[pick] - d_rows.start, device=scores.device)
            out[pick] = scores[q, d].float().cpu().numpy()
    return out
