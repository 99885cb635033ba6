"""From a plain configuration to a ready SteerSearch: the one place steps are assembled.

The CLI and benchmark.py both describe a run as a `SteerConfig`; `build_model` turns it into
the encoder + steps. Nothing here computes; it only wires (artifacts load, nothing trains).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mteb_steer.backbone import check_encoding, resolve_backbone
from mteb_steer.encoder import SteerEncoder
from mteb_steer.encoding import Encoding
from mteb_steer.search import SteerSearch


@dataclass
class SteerConfig:
    """Everything that selects a model and its steering; defaults = the plain bundled model."""

    model: str | None = None
    device: str | None = None
    batch_size: int = 32
    embedding_cache: str | None = None
    # encoding (issue 12): torch | onnx | openvino; float32 | float16 | bfloat16 (torch, GPU) | int8 (onnx, openvino)
    backend: str = "torch"
    dtype: str = "float32"
    embedding_storage: str = "float32"  # float32 | float16: precision of the stored corpus vectors
    # corpus steering (issue 3): a query bank file/folder, or generation through an LLM endpoint
    query_bank: str | None = None
    fusion: str | None = None  # mean | sum | rotate
    fusion_param: float | str = "auto"  # alpha (mean) / beta (sum) / gamma (rotate), or "auto"
    llm_base_url: str | None = None
    llm_model: str | None = None
    llm_mode: str = "completion"
    num_queries: int = 3
    llm_cache_dir: str | None = None
    query_style: str | None = "task"  # issue 14: "task" (the task's metadata), "generic", or the user's style
    llm_timeout: float = 120.0  # seconds per LLM request (and the health check)
    llm_retries: int = 3  # extra attempts per LLM request
    allow_failed_passages: bool = False  # evaluate from a partial generated bank (its revision says `partial`)
    # query adapter (issue 4)
    adapter: str | None = None  # folder written by train-adapter
    # test-time refinement (issue 4)
    refine_teacher: str | None = None  # gold | embedding:MODEL | cross-encoder:MODEL | llm:MODEL | bm25 | hybrid
    refine_top_k: int = 20
    refine_steps: int = 100
    refine_lr: float = 1e-4
    hyde: int = 0
    # lexical hybrid (issue 7)
    lexical: str | None = None  # bm25
    lexical_weight: float | None = None  # None: the default chosen on TREC-DL
    lexical_fusion: str | None = None  # None: the default chosen on TREC-DL
    lexical_expand: bool = True
    lexical_index_dir: str | None = None
    # self-tuning per corpus (issue 14): BM25 (k1, b), lexical weight, fusion strength from pseudo-queries
    self_tune: bool = False

    def llm_cache(self) -> Path:
        return Path(self.llm_cache_dir or os.environ.get("MTEB_STEER_LLM_CACHE")
                    or Path.home() / ".cache" / "mteb_steer" / "llm")


def build_encoder(config: SteerConfig) -> SteerEncoder:
    """Base model + query transforms (the adapter), validated before weights load.

    An adapter only makes sense on the base model it was trained for: a mismatch is refused here.
    """
    check_encoding(config.device, Encoding(config.backend, config.dtype, config.embedding_storage))
    backbone = resolve_backbone(config.model)
    transforms = []
    if config.adapter:
        from mteb_steer.steering.adapter import QueryAdapter

        transforms.append(QueryAdapter.load(config.adapter, expect_base=backbone.meta))
    return SteerEncoder(config.model, device=config.device, batch_size=config.batch_size,
                        cache_dir=config.embedding_cache, query_transforms=transforms, backbone=backbone,
                        backend=config.backend, dtype=config.dtype, embedding_storage=config.embedding_storage)


def _gen_config(config: SteerConfig, **overrides: Any):
    from mteb_steer.steering.generation import GenConfig

    return GenConfig(model=config.llm_model, mode=config.llm_mode, num_queries=config.num_queries,
                     timeout=config.llm_timeout, retries=config.llm_retries, **overrides)


def build_model(config: SteerConfig, encoder: SteerEncoder | None = None, task: Any | None = None) -> SteerSearch:
    """The search model for `config` on `task` (needed only by the gold teacher and identical-id rules).

    Pass `encoder` to reuse one already loaded with the same base model and adapter.
    """
    encoder = encoder or build_encoder(config)
    bank = held_out = None
    if config.query_bank:
        from mteb_steer.steering.banks import load_bank

        bank = load_bank(config.query_bank)
    if config.self_tune:
        _check_self_tune(config)
        if bank is not None:  # the held-out queries tune; fusion and expansion never see them
            from mteb_steer.steering.self_tune import split_bank

            bank, held_out = split_bank(bank)
    corpus_steps, query_steps, score_fusion = [], [], None
    if config.fusion:
        if bank is not None:
            from mteb_steer.steering.fusion import STRENGTH_NAME, QueryFusion

            corpus_steps.append(QueryFusion(bank, config.fusion,
                                            **{STRENGTH_NAME[config.fusion]: config.fusion_param}))
        else:
            from mteb_steer.steering.generated_fusion import GeneratedQueryFusion, task_passages

            from mteb_steer.steering.query_style import resolve_query_style

            if task is None:
                raise ValueError(f"--fusion {config.fusion} without --query-bank generates queries for the task's "
                                 "corpus first: build_model needs the task")
            gen_config = _gen_config(config, query_style=resolve_query_style(config.query_style, task))
            corpus_steps.append(GeneratedQueryFusion(gen_config, config.llm_cache(),
                                                     passages=task_passages(task), base_url=config.llm_base_url,
                                                     method=config.fusion, strength=config.fusion_param,
                                                     allow_partial=config.allow_failed_passages))
    if config.hyde:
        from mteb_steer.steering.hyde import HyDE

        query_steps.append(HyDE(config.hyde, cache_dir=config.llm_cache(), config=_gen_config(config),
                                base_url=config.llm_base_url))
    if config.refine_teacher:
        from mteb_steer.steering.refine import TestTimeRefinement
        from mteb_steer.steering.teachers import make_teacher

        qrels = None
        ignore_identical_ids = bool(getattr(task, "ignore_identical_ids", False))
        if config.refine_teacher.strip().lower() == "gold" and task is not None:
            task.load_data()
            qrels = {q: docs for split in task.eval_splits
                     for q, docs in task.dataset["default"][split]["relevant_docs"].items()}
        teacher = make_teacher(
            config.refine_teacher, encoder=encoder, task_name=task.metadata.name if task is not None else "",
            qrels=qrels, cache_dir=config.embedding_cache, device=config.device,
            ignore_identical_ids=ignore_identical_ids, bank=bank,
            lexical_index_dir=config.lexical_index_dir, lexical_weight=config.lexical_weight,
            lexical_fusion=config.lexical_fusion, llm_base_url=config.llm_base_url,
            llm_cache_dir=config.llm_cache(), llm_transport=_gen_config(config).transport())
        query_steps.append(TestTimeRefinement(teacher, top_k=config.refine_top_k, steps=config.refine_steps,
                                              lr=config.refine_lr, ignore_identical_ids=ignore_identical_ids))
    if config.lexical:
        if config.lexical != "bm25":
            raise ValueError(f"unknown lexical method {config.lexical!r}; only 'bm25' is available")
        from mteb_steer.steering.lexical import LexicalHybrid
        from mteb_steer.steering.self_tune import SelfTunedHybrid

        if config.self_tune:
            score_fusion = SelfTunedHybrid(encoder, fusion=config.lexical_fusion, held_out=held_out, bank=bank,
                                           expand=config.lexical_expand, index_dir=config.lexical_index_dir)
        else:
            score_fusion = LexicalHybrid(config.lexical_weight, config.lexical_fusion, bank=bank,
                                         expand=config.lexical_expand, index_dir=config.lexical_index_dir)
    return SteerSearch(encoder, corpus_steps=corpus_steps, query_steps=query_steps, score_fusion=score_fusion)


def _check_self_tune(config: SteerConfig) -> None:
    """`--self-tune` chooses what it tunes itself: a fixed value for it, or nothing to tune, is an error."""
    if not (config.lexical or config.fusion):
        raise ValueError("--self-tune tunes the lexical hybrid and corpus fusion: give --lexical bm25 and/or --fusion")
    if config.lexical_weight is not None:
        raise ValueError("--self-tune chooses the lexical weight itself; drop --lexical-weight")
    if config.fusion and config.fusion_param != "auto":
        raise ValueError("--self-tune chooses the fusion strength itself; drop --alpha/--beta/--gamma")
    if config.fusion and not config.query_bank:
        raise ValueError("--self-tune with --fusion needs a --query-bank (pseudo-queries are held out of the "
                         "bank; make one with `mteb-steer generate --export`)")


def default_output_folder() -> Path:
    """The current directory: results land in `./results/<org__model>/<revision>/` (leaderboard layout)."""
    return Path.cwd()
