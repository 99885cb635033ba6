"""HyDE: each query is joined by short hypothetical passages an LLM writes for it (Gao et al., 2022).

The mirror of corpus steering: there the LLM writes queries for passages, here passages for
queries. Both go through `steering.generation` (same endpoint, embedded llama.cpp fallback,
retries, per-item disk cache), with a HyDE prompt: the "passage" sent is the query text and the
"queries" parsed back are the hypothetical passages, one numbered line each. The query vector
becomes the mean of itself and the document embeddings of its hypothetical passages, as HyDE
does. A query the generator fails on keeps its own vector (and is listed in `stats`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from mteb.types import PromptType

from mteb_steer.steering.generation import GenConfig, generate, resolve_model
from mteb_steer.steering.llm_client import endpoint_url
from mteb_steer.steering.llm_server import LocalServerConfig
from mteb_steer.steps import CorpusIndex, QueryBatch

if TYPE_CHECKING:
    from mteb_steer.encoder import SteerEncoder

logger = logging.getLogger(__name__)

HYDE_PROMPT_VERSION = "hyde-v1"
TOKENS_PER_PASSAGE = 64
# chat (instruction-tuned models): the user message; {passage} is where the QUERY goes
HYDE_CHAT = (
    "Write {n} short passages, one to three sentences each, as they would appear in documents that "
    "answer the search query below. Put each passage on its own numbered line.\n\nQuery: {passage}"
)
# completion (base models): one worked example, then the query; the answer starts at "1."
_EXAMPLE = (
    "does regular exercise lower blood pressure",
    (
        ("Randomised trials show that 30 minutes of aerobic exercise on most days lowers systolic blood "
         "pressure by 5 to 8 mmHg in adults with hypertension."),
        ("Regular physical activity improves the elasticity of blood vessels, which reduces resting blood "
         "pressure over several weeks of training."),
        "Guidelines recommend exercise as a first treatment for high blood pressure, alone or with medication.",
    ),
)
MAX_COMPLETION_PASSAGES = len(_EXAMPLE[1])


def hyde_completion_prompt(n: int) -> str:
    """The 1-shot completion prompt for n hypothetical passages; `{passage}` marks where the query goes."""
    shown = "\n".join(f"{i}. {p}" for i, p in enumerate(_EXAMPLE[1][:n], 1))
    return ("Each search query below is followed by short passages from documents that answer it.\n\n"
            f"Query: {_EXAMPLE[0]}\nPassages:\n{shown}\n\nQuery: {{passage}}\nPassages:\n1.")


class HyDE:
    """QueryStep: mean of the query vector and the vectors of `n` generated hypothetical passages.

    Args:
        n: hypothetical passages per query (the CLI's `--hyde N`).
        cache_dir: generation cache folder (the same one query generation uses is fine: keys differ).
        config: generator settings (model, mode chat|completion, temperature, seed, concurrency,
            retries...); the prompt, its version, the count and the token budget are set here.
        base_url / api_key / server: the endpoint, or the embedded llama.cpp server when none is given.
    """

    def __init__(self, n: int = 1, *, cache_dir: str | os.PathLike, config: GenConfig | None = None,
                 base_url: str | None = None, api_key: str | None = None, server: LocalServerConfig | None = None,
                 show_progress: bool = True) -> None:
        config = config or GenConfig()
        if endpoint_url(base_url) and config.model is None:
            raise ValueError("HyDE with an endpoint (base_url / OPENAI_BASE_URL) needs the model name (config.model)")
        if n < 1:
            raise ValueError(f"HyDE needs n >= 1 hypothetical passages per query, got {n}")
        if config.mode == "completion" and n > MAX_COMPLETION_PASSAGES:
            raise ValueError(f"the HyDE completion prompt shows {MAX_COMPLETION_PASSAGES} passages; "
                             f"n={n} needs chat mode")
        prompt = HYDE_CHAT if config.mode == "chat" else hyde_completion_prompt(n)
        self.config = replace(config, prompt=prompt, prompt_version=HYDE_PROMPT_VERSION, num_queries=n,
                              max_tokens=TOKENS_PER_PASSAGE * n)
        self.n = n
        self.cache_dir = Path(cache_dir)
        self.base_url = base_url
        self.api_key = api_key
        self.server = server
        self.show_progress = show_progress
        self._identity = resolve_model(self.config, server or LocalServerConfig()).identity()
        self.tag = f"hyde{n}-{Path(self._identity['model']).name}"
        self.timings: dict[str, float] = {}
        self.stats: dict[str, int] = {}

    def describe(self) -> dict[str, Any]:
        return {"method": "hyde", "n": self.n, "fusion": "mean(query, passages)", "generator": self._identity}

    @property
    def training_datasets(self) -> set[str]:
        return set()

    def steer_queries(self, queries: QueryBatch, index: CorpusIndex, encoder: SteerEncoder) -> np.ndarray:
        """(n_queries, dim) float32: each row the mean of the query vector and its passages' document vectors."""
        started = time.perf_counter()
        report = generate(dict(zip(queries.ids, queries.texts, strict=True)), self.config, self.cache_dir,
                          base_url=self.base_url, api_key=self.api_key, server=self.server,
                          show_progress=self.show_progress)
        self.timings["generate_s"] = time.perf_counter() - started
        row_of = {qid: i for i, qid in enumerate(queries.ids)}
        owners = np.array([row_of[qid] for qid, passages in report.bank.items() for _ in passages], dtype=np.int64)
        texts = [p for passages in report.bank.values() for p in passages]
        started = time.perf_counter()
        vectors = encoder.embed(texts, PromptType.document)
        self.timings["embed_s"] = time.perf_counter() - started
        total = np.asarray(queries.embeddings, dtype=np.float64).copy()
        np.add.at(total, owners, vectors)
        counts = 1 + np.bincount(owners, minlength=len(queries.ids))
        self.stats = {"queries": len(queries.ids), "with_passages": len(report.bank),
                      "passages": len(texts), "failed": len(report.failures), "empty": len(report.empty)}
        if report.failures or report.empty:
            logger.warning("HyDE: %d query(ies) got no hypothetical passage and keep their own vector",
                           len(queries.ids) - len(report.bank))
        return (total / counts[:, None]).astype(np.float32)
