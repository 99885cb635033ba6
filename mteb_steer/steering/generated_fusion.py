"""Corpus step that first generates queries for the indexed corpus (cached), then fuses them.

Used when a run names an LLM endpoint instead of a ready query bank: the corpus is only known
at `index()` time, so generation happens there. Its identity is the generator's configuration
(model, prompt version, parameters), not a bank file, so the same settings map to one revision.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mteb_steer.steering.fusion import STRENGTH_NAME, QueryFusion
from mteb_steer.steering.generation import GenConfig, generate_bank, resolve_model
from mteb_steer.steering.llm_server import LocalServerConfig

if TYPE_CHECKING:
    from mteb_steer.encoder import SteerEncoder
    from mteb_steer.steps import CorpusIndex


class GeneratedQueryFusion:
    """CorpusStep: `generate_bank` over the corpus, then `QueryFusion(bank, method, **strength)`.

    Args:
        config: generator settings (model None = the embedded llama.cpp server's model).
        cache_dir: generation cache; a rerun makes no request for passages already there.
        base_url: OpenAI-compatible endpoint (None: $OPENAI_BASE_URL, else the embedded server).
        method / strength: the fusion (see QueryFusion); strength maps to alpha, beta or gamma.
    """

    def __init__(self, config: GenConfig, cache_dir: str | Path, *, base_url: str | None = None,
                 method: str = "mean", strength: float | str = "auto") -> None:
        self.config = config
        self.cache_dir = Path(cache_dir)
        self.base_url = base_url
        self.method = method
        self.strength = strength
        self._generator = resolve_model(config, LocalServerConfig()).identity()
        self.fusion_: QueryFusion | None = None  # the last corpus's fusion (holds its `auto` selection)

    def _fusion(self, bank: dict[str, list[str]]) -> QueryFusion:
        return QueryFusion(bank, self.method, **{STRENGTH_NAME[self.method]: self.strength})

    @property
    def tag(self) -> str:
        model = Path(self._generator["model"]).stem
        value = self.strength if isinstance(self.strength, str) else f"{self.strength:g}"
        return f"gen-{model}-fuse-{self.method}-{value}"

    def describe(self) -> dict[str, Any]:
        return {"generator": self._generator, "method": self.method, "strength": self.strength}

    @property
    def training_datasets(self) -> set[str]:
        return set()

    def steer_corpus(self, index: CorpusIndex, encoder: SteerEncoder) -> np.ndarray:
        bank = generate_bank(dict(zip(index.ids, index.texts, strict=True)), self.config, self.cache_dir,
                             base_url=self.base_url)
        self.fusion_ = self._fusion(bank)
        return self.fusion_.steer_corpus(index, encoder)

    def fit_report(self, task_name: str) -> dict[str, Any]:
        return self.fusion_.fit_report(task_name) if self.fusion_ else {}
