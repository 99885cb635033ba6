"""SteerSearch: the mteb `SearchProtocol` model that runs the steering steps around a SteerEncoder.

`index()` embeds the corpus once and applies corpus steps (fusion); `search()` embeds queries,
applies query steps (HyDE, refinement) that may look at the index, scores with the encoder's
similarity (the one metric of the model), adds lexical evidence, and keeps the top-k with the
same chunking, `torch.topk` and heap tie order as mteb's own `SearchEncoderWrapper`, so with no
steps the results are identical to mteb's.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from mteb._create_dataloaders import create_dataloader
from mteb.types import PromptType

from mteb_steer.encoder import SteerEncoder, dataset_passage_texts
from mteb_steer.identity import steered_meta
from mteb_steer.steps import (
    CorpusIndex,
    CorpusStep,
    QueryBatch,
    QueryStep,
    ReportsFit,
    ScoreFusion,
)

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata

logger = logging.getLogger(__name__)

MTEB_CORPUS_CHUNK = 50_000  # SearchEncoderWrapper's default corpus_chunk_size


def top_k_like_mteb(scores: torch.Tensor, doc_ids: Sequence[str], query_ids: Sequence[str], top_k: int,
                    chunk_size: int = MTEB_CORPUS_CHUNK) -> dict[str, dict[str, float]]:
    """Top-k per query exactly as mteb's `chunked_full_corpus_search` picks them.

    Per corpus chunk `torch.topk(top_k + 1)`, then a (score, doc_id) min-heap of size top_k:
    ties between equal scores resolve the same way, which matters on corpora with duplicate
    passages (ArguAna has 96 identical embeddings).
    """
    heaps: dict[str, list[tuple[float, str]]] = {qid: [] for qid in query_ids}
    n_docs = scores.shape[1]
    for start in range(0, n_docs, chunk_size):
        block = scores[:, start:start + chunk_size]
        values, idx = torch.topk(block, min(top_k + 1, block.shape[1]), dim=1, largest=True)
        for q, qid in enumerate(query_ids):
            heap = heaps[qid]
            for i, score in zip(idx[q].tolist(), values[q].tolist(), strict=True):
                item = (score, doc_ids[start + i])
                if len(heap) < top_k:
                    heapq.heappush(heap, item)
                else:
                    heapq.heappushpop(heap, item)
    return {qid: {doc: score for score, doc in heap} for qid, heap in heaps.items()}


def _rerank_top_ranked(scores: torch.Tensor, index: CorpusIndex, query_ids: Sequence[str],
                       top_ranked: dict[str, list[str]], top_k: int) -> dict[str, dict[str, float]]:
    """Reranking tasks: keep each query's given candidates only, best top_k of them."""
    out: dict[str, dict[str, float]] = {}
    for q, qid in enumerate(query_ids):
        ranked = top_ranked.get(qid) or []
        if not ranked:
            out[qid] = {}
            continue
        rows = torch.tensor([index.id_to_row[d] for d in ranked])
        values, idx = torch.topk(scores[q, rows], min(top_k, len(ranked)))
        out[qid] = {ranked[i]: v for i, v in zip(idx.tolist(), values.tolist(), strict=True)}
    return out


class SteerSearch:
    """mteb `SearchProtocol` (and `EncoderProtocol`, by delegation) with steering steps.

    Args:
        encoder: the SteerEncoder (base model + query transforms).
        corpus_steps: applied in order to document vectors at index time.
        query_steps: applied in order to query vectors at search time.
        score_fusion: optional lexical (or other) evidence added to the dense scores.
    """

    def __init__(self, encoder: SteerEncoder, corpus_steps: Sequence[CorpusStep] = (),
                 query_steps: Sequence[QueryStep] = (), score_fusion: ScoreFusion | None = None) -> None:
        self.encoder = encoder
        self.corpus_steps = list(corpus_steps)
        self.query_steps = list(query_steps)
        self.score_fusion = score_fusion
        self.index_: CorpusIndex | None = None
        self.timings: dict[str, float] = {}
        self.fit_reports: dict[str, dict[str, Any]] = {}  # task name -> step tag -> what the step chose
        self.mteb_model_meta = steered_meta(encoder.base_meta, self.steps)

    @property
    def steps(self) -> list:
        """All steps in pipeline order; they define this model's identity."""
        steps = [*self.encoder.query_transforms, *self.corpus_steps, *self.query_steps]
        return [*steps, self.score_fusion] if self.score_fusion is not None else steps

    # -- SearchProtocol ---------------------------------------------------------------------
    def index(self, corpus, *, task_metadata: TaskMetadata, hf_split: str, hf_subset: str,
              encode_kwargs: dict[str, Any], num_proc: int | None = None, **kwargs: Any) -> None:
        """Embed the corpus (as mteb would) and run the corpus steps; keeps ids, texts and vectors."""
        if len(corpus) == 0:
            raise ValueError(f"{task_metadata.name} ({hf_split}): the corpus is empty")
        ids = [str(i) for i in corpus["id"]]
        texts = dataset_passage_texts(corpus)
        started = time.perf_counter()
        loader = create_dataloader(corpus, task_metadata=task_metadata, prompt_type=PromptType.document,
                                   batch_size=encode_kwargs.get("batch_size", 32), num_proc=num_proc)
        embeddings = self.encoder.encode(loader, task_metadata=task_metadata, hf_split=hf_split,
                                         hf_subset=hf_subset, prompt_type=PromptType.document, **encode_kwargs)
        self.timings["encode_corpus_s"] = time.perf_counter() - started
        index = CorpusIndex(ids=ids, texts=texts, embeddings=embeddings, task_name=task_metadata.name)
        for step in self.corpus_steps:
            started = time.perf_counter()
            index.embeddings = np.asarray(step.steer_corpus(index, self.encoder), dtype=np.float32)
            self.timings[f"{step.tag}_s"] = time.perf_counter() - started
        if self.score_fusion is not None:
            started = time.perf_counter()
            self.score_fusion.fit(index)
            self.timings["score_fusion_fit_s"] = time.perf_counter() - started
        self.fit_reports[index.task_name] = {step.tag: report for step in self.steps
                                             if isinstance(step, ReportsFit) and (report := step.fit_report(index.task_name))}
        self.index_ = index

    def search(self, queries, *, task_metadata: TaskMetadata, hf_split: str, hf_subset: str, top_k: int,
               encode_kwargs: dict[str, Any], top_ranked: dict[str, list[str]] | None = None,
               num_proc: int | None = None, **kwargs: Any) -> dict[str, dict[str, float]]:
        """Embed and steer queries, score the whole index, return top_k docs per query id."""
        if self.index_ is None:
            raise ValueError("index() must be called with the corpus before search()")
        index = self.index_
        loader = create_dataloader(queries, task_metadata=task_metadata, prompt_type=PromptType.query,
                                   batch_size=encode_kwargs.get("batch_size", 32), num_proc=num_proc)
        texts = [text for batch in loader for text in batch["text"]]
        started = time.perf_counter()
        q_emb = self.encoder.embed(texts, PromptType.query, batch_size=encode_kwargs.get("batch_size"))
        batch = QueryBatch(ids=[str(i) for i in queries["id"]], texts=texts, embeddings=q_emb)
        self.timings["encode_queries_s"] = time.perf_counter() - started
        for step in self.query_steps:
            started = time.perf_counter()
            batch.embeddings = np.asarray(step.steer_queries(batch, index, self.encoder), dtype=np.float32)
            self.timings[f"{step.tag}_s"] = time.perf_counter() - started
        started = time.perf_counter()
        scores = self.score(batch, index)
        if top_ranked is not None:
            out = _rerank_top_ranked(scores, index, batch.ids, top_ranked, top_k)
        else:
            out = top_k_like_mteb(scores, index.ids, batch.ids, top_k)
        self.timings["score_s"] = time.perf_counter() - started
        return out

    def score(self, queries: QueryBatch, index: CorpusIndex) -> torch.Tensor:
        """Full (n_queries, n_docs) score matrix: dense similarity, then score fusion if any."""
        scores = torch.as_tensor(self.encoder.similarity(queries.embeddings, index.embeddings))
        if self.score_fusion is not None:
            scores = self.score_fusion.fuse(queries, scores, index)
        return scores

    # -- EncoderProtocol by delegation (non-retrieval tasks) ----------------------------------
    def encode(self, inputs, **kwargs: Any) -> np.ndarray:
        return self.encoder.encode(inputs, **kwargs)

    def similarity(self, embeddings1, embeddings2):
        return self.encoder.similarity(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        return self.encoder.similarity_pairwise(embeddings1, embeddings2)
