"""Corpus step that first generates queries for a task's corpus (cached), then fuses them.

Used when a run names an LLM endpoint instead of a ready query bank. Generation runs when the
step is built, before evaluation, because the model's identity (its revision, hence its result
file) must depend on the bank's content: a changed cache gives a new revision, never an old file.
An incomplete generation (some passages got no queries) is refused unless the caller allows it;
then the identity says `partial` with the covered count, so the result can never pass for the
complete one, and a rerun (which retries the missing passages) gets its own revision.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mteb_steer.steering.fusion import STRENGTH_NAME, QueryFusion
from mteb_steer.steering.generation import GenConfig, generate, resolve_model
from mteb_steer.steering.llm_server import LocalServerConfig

if TYPE_CHECKING:
    from mteb_steer.encoder import SteerEncoder
    from mteb_steer.steps import CorpusIndex


def task_passages(task: Any) -> dict[str, str]:
    """`{doc_id: passage text}` over every subset and eval split of a task, as `SteerSearch.index` sees them."""
    from mteb_steer.encoder import dataset_passage_texts

    task.load_data()
    passages: dict[str, str] = {}
    for subset in task.dataset.values():
        for split in task.eval_splits:
            if split in subset:
                corpus = subset[split]["corpus"]
                passages.update(zip((str(i) for i in corpus["id"]), dataset_passage_texts(corpus), strict=True))
    return passages


class GeneratedQueryFusion:
    """CorpusStep: `generate` over `passages` at construction, then `QueryFusion(bank, method, **strength)`.

    Args:
        config: generator settings (model None = the embedded llama.cpp server's model).
        cache_dir: generation cache; a rerun makes no request for passages already there.
        passages: the corpus the step will index (`task_passages(task)`).
        base_url / api_key: OpenAI-compatible endpoint (None: $OPENAI_BASE_URL, else the embedded server).
        method / strength: the fusion (see QueryFusion); strength maps to alpha, beta or gamma.
        allow_partial: accept a bank that misses passages (tagged `partial`); default: raise
            IncompleteGeneration naming a failed passage.
    """

    def __init__(self, config: GenConfig, cache_dir: str | Path, *, passages: Mapping[str, str],
                 base_url: str | None = None, api_key: str | None = None, method: str = "mean",
                 strength: float | str = "auto", allow_partial: bool = False, show_progress: bool = True) -> None:
        self.config = config
        self.cache_dir = Path(cache_dir)
        self.method = method
        self.strength = strength
        self._generator = resolve_model(config, LocalServerConfig()).identity()
        report = generate(passages, config, self.cache_dir, base_url=base_url, api_key=api_key,
                          show_progress=show_progress)
        self.covered, self.total = len(report.bank), report.passages
        if not allow_partial:
            report.require_complete("pass --allow-failed-passages to evaluate the partial bank under a 'partial' "
                                    "revision (no result is written from it otherwise)")
        self.partial = bool(report.failures)
        self._ids = frozenset(passages)
        self.fusion_ = QueryFusion(report.bank, method, **{STRENGTH_NAME[method]: strength})

    @property
    def tag(self) -> str:
        model = Path(self._generator["model"]).stem
        value = self.strength if isinstance(self.strength, str) else f"{self.strength:g}"
        partial = f"-partial{self.covered}of{self.total}" if self.partial else ""
        return f"gen-{model}{partial}-fuse-{self.method}-{value}"

    def describe(self) -> dict[str, Any]:
        """The generator, the fusion and the bank's content fingerprint (with coverage): a new bank, a new revision."""
        return {"generator": self._generator, **self.fusion_.describe(), "coverage": [self.covered, self.total],
                "partial": self.partial}

    @property
    def training_datasets(self) -> set[str]:
        return set()

    def steer_corpus(self, index: CorpusIndex, encoder: SteerEncoder) -> np.ndarray:
        unknown = [doc_id for doc_id in index.ids if doc_id not in self._ids]
        if unknown:
            raise ValueError(f"generated-query fusion was built for another corpus: {len(unknown)} indexed passage "
                             f"id(s) were not generated for, e.g. {unknown[:3]}")
        return self.fusion_.steer_corpus(index, encoder)

    def fit_report(self, task_name: str) -> dict[str, Any]:
        return self.fusion_.fit_report(task_name)
