"""SteerSearch: the mteb `SearchProtocol` model that runs the steering steps around a SteerEncoder.

`index()` embeds the corpus once and applies corpus steps (fusion); `search()` embeds queries,
applies query steps (HyDE, refinement) that may look at the index, then scores block by block
(`mteb_steer.blocks`: corpus blocks of mteb's chunk size, query blocks within a memory budget, on
the encoder's device) with the encoder's similarity (the one metric of the model), adds lexical
evidence per tile, and keeps a running top-k with the same `torch.topk` and heap tie order as
mteb's own `SearchEncoderWrapper`, so with no steps the results are identical to mteb's. No
(queries x corpus) matrix is ever built.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from mteb._create_dataloaders import create_dataloader
from mteb.types import PromptType

from mteb_steer.blocks import CORPUS_BLOCK, SCORE_BUDGET_BYTES, MtebTopK, dense_tiles, gather_pairs, plan_blocks
from mteb_steer.encoder import SteerEncoder, dataset_passage_texts
from mteb_steer.identity import steered_meta
from mteb_steer.steps import (
    CorpusIndex,
    CorpusStep,
    QueryBatch,
    QueryStep,
    ReportsFit,
    ScoreFusion,
    Tile,
)

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata

logger = logging.getLogger(__name__)


def _rerank_top_ranked(tiles: Iterator[Tile], index: CorpusIndex, query_ids: Sequence[str],
                       top_ranked: dict[str, list[str]], top_k: int) -> dict[str, dict[str, float]]:
    """Reranking tasks: keep each query's given candidates only, best top_k of them."""
    ranked = [top_ranked.get(qid) or [] for qid in query_ids]
    query_idx = np.repeat(np.arange(len(ranked)), [len(r) for r in ranked])
    rows = np.array([index.id_to_row[d] for r in ranked for d in r], dtype=np.int64)
    scores = gather_pairs(tiles, query_idx, rows)
    out: dict[str, dict[str, float]] = {}
    start = 0
    for qid, docs in zip(query_ids, ranked, strict=True):
        if not docs:
            out[qid] = {}
            continue
        values, idx = torch.topk(torch.from_numpy(scores[start:start + len(docs)]), min(top_k, len(docs)))
        out[qid] = {docs[i]: v for i, v in zip(idx.tolist(), values.tolist(), strict=True)}
        start += len(docs)
    return out


class SteerSearch:
    """mteb `SearchProtocol` (and `EncoderProtocol`, by delegation) with steering steps.

    Args:
        encoder: the SteerEncoder (base model + query transforms).
        corpus_steps: applied in order to document vectors at index time.
        query_steps: applied in order to query vectors at search time.
        score_fusion: optional lexical (or other) evidence added to the dense scores.
        corpus_block: passages per scoring block (mteb's chunk size; its tie order depends on it).
        score_budget_bytes: memory for score tiles; sets how many queries are scored at once.
        config: the SteerConfig these steps were built from (`pipeline.build_model` passes it); with
            it, the ModelMeta gets a loader that rebuilds the model (`mteb.get_model`).

    Timing: `timings` holds the seconds of the latest call's parts (base encoding, each step by
    its tag, scoring); `calls` keeps one record per `index`/`search` call (`call`, `task`,
    `split`, `n`, and that call's timings), so a caller times a run without wrapping methods.
    """

    def __init__(self, encoder: SteerEncoder, corpus_steps: Sequence[CorpusStep] = (),
                 query_steps: Sequence[QueryStep] = (), score_fusion: ScoreFusion | None = None,
                 config: Any | None = None, *, corpus_block: int = CORPUS_BLOCK,
                 score_budget_bytes: int = SCORE_BUDGET_BYTES) -> None:
        self.encoder = encoder
        self.corpus_block = corpus_block
        self.score_budget_bytes = score_budget_bytes
        self.corpus_steps = list(corpus_steps)
        self.query_steps = list(query_steps)
        self.score_fusion = score_fusion
        self.index_: CorpusIndex | None = None
        self.config = config
        self.timings: dict[str, float] = {}
        self.calls: list[dict[str, Any]] = []
        self.fit_reports: dict[str, dict[str, Any]] = {}  # task name -> step tag -> what the step chose
        self.mteb_model_meta = steered_meta(encoder.base_meta, self.steps, config)

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
        texts = dataset_passage_texts(corpus)  # the one copy of the texts: embedded here, kept by the index
        spent: dict[str, float] = {}
        started = time.perf_counter()
        embeddings = self.encoder.embed(texts, PromptType.document, batch_size=encode_kwargs.get("batch_size"),
                                        show_progress_bar=encode_kwargs.get("show_progress_bar", False))
        spent["encode_corpus_s"] = time.perf_counter() - started
        index = CorpusIndex(ids=ids, texts=texts, embeddings=embeddings, task_name=task_metadata.name)
        for step in self.corpus_steps:
            started = time.perf_counter()
            index.embeddings = np.asarray(step.steer_corpus(index, self.encoder), dtype=np.float32)
            spent[f"{step.tag}_s"] = time.perf_counter() - started
        if self.score_fusion is not None:
            started = time.perf_counter()
            self.score_fusion.fit(index)
            spent["score_fusion_fit_s"] = time.perf_counter() - started
        self._record("index", task_metadata.name, hf_split, len(corpus), spent)
        self.fit_reports[index.task_name] = {step.tag: report for step in self.steps
                                             if isinstance(step, ReportsFit) and (report := step.fit_report(index.task_name))}
        self.index_ = index

    def search(self, queries, *, task_metadata: TaskMetadata, hf_split: str, hf_subset: str, top_k: int,
               encode_kwargs: dict[str, Any], top_ranked: dict[str, list[str]] | None = None,
               num_proc: int | None = None, **kwargs: Any) -> dict[str, dict[str, float]]:
        """Embed and steer queries, score the index block by block, return top_k docs per query id."""
        if self.index_ is None:
            raise ValueError("index() must be called with the corpus before search()")
        index = self.index_
        loader = create_dataloader(queries, task_metadata=task_metadata, prompt_type=PromptType.query,
                                   batch_size=encode_kwargs.get("batch_size", 32), num_proc=num_proc)
        texts = [text for batch in loader for text in batch["text"]]
        spent: dict[str, float] = {}
        started = time.perf_counter()
        q_emb = self.encoder.embed(texts, PromptType.query, batch_size=encode_kwargs.get("batch_size"))
        batch = QueryBatch(ids=[str(i) for i in queries["id"]], texts=texts, embeddings=q_emb)
        spent["encode_queries_s"] = time.perf_counter() - started
        for step in self.query_steps:
            started = time.perf_counter()
            batch.embeddings = np.asarray(step.steer_queries(batch, index, self.encoder), dtype=np.float32)
            spent[f"{step.tag}_s"] = time.perf_counter() - started
        started = time.perf_counter()
        out = self.rank(batch, index, top_k, top_ranked)
        spent["score_s"] = time.perf_counter() - started
        self._record("search", task_metadata.name, hf_split, len(queries), spent)
        return out

    def _record(self, call: str, task: str, split: str, n: int, spent: dict[str, float]) -> None:
        self.timings.update(spent)
        self.calls.append({"call": call, "task": task, "split": split, "n": n, **spent})

    def rank(self, queries: QueryBatch, index: CorpusIndex, top_k: int,
             top_ranked: dict[str, list[str]] | None = None) -> dict[str, dict[str, float]]:
        """The top_k passages per query (or the best of each query's `top_ranked` candidates), tile by tile."""
        tiles = self.score_tiles(queries, index)
        if top_ranked is not None:
            return _rerank_top_ranked(tiles, index, queries.ids, top_ranked, top_k)
        top = MtebTopK(queries.ids, index.ids, top_k)
        for q_rows, d_rows, scores in tiles:
            top.push(q_rows, d_rows, scores)
        return top.result()

    def score_tiles(self, queries: QueryBatch, index: CorpusIndex) -> Iterator[Tile]:
        """Final scores (dense similarity, then score fusion if any) as (query rows, corpus rows, tile)."""
        plan = plan_blocks(len(queries.ids), len(index.ids), corpus_block=self.corpus_block,
                           budget_bytes=self.score_budget_bytes, what=f"search {index.task_name}".strip())
        vectors = torch.as_tensor(np.asarray(queries.embeddings), dtype=torch.float32, device=self.encoder.model.device)

        def dense() -> Iterator[Tile]:
            return dense_tiles(self.encoder.similarity, vectors, index.embeddings, plan)

        if self.score_fusion is None:
            return dense()
        fuse = self.score_fusion.fuser(queries, index, dense)
        return ((q_rows, d_rows, fuse(q_rows, d_rows, scores)) for q_rows, d_rows, scores in dense())

    # -- EncoderProtocol by delegation (non-retrieval tasks) ----------------------------------
    def encode(self, inputs, **kwargs: Any) -> np.ndarray:
        return self.encoder.encode(inputs, **kwargs)

    def similarity(self, embeddings1, embeddings2):
        return self.encoder.similarity(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        return self.encoder.similarity_pairwise(embeddings1, embeddings2)
