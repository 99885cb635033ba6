"""The seam where steering plugs in: small step objects handed to the encoder or the search model.

Data flows one way: corpus -> base embeddings -> corpus steps -> (index) ; queries -> base
embeddings -> query transforms (encoder) -> query steps (search, may look at the index) ->
dense scores -> score fusion (lexical) -> top-k. A step never imports from a later stage.
Scores only ever exist as tiles of (query block x corpus block) (`mteb_steer.blocks`): no step
sees, or builds, a (queries x corpus) matrix.

Every step describes itself (`describe`) so the configuration gets its own MTEB identity,
and names the labelled data it was fitted on (`training_datasets`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

    from mteb_steer.encoder import SteerEncoder


@runtime_checkable
class Step(Protocol):
    """What every step offers for identity: a short tag and a canonical, JSON-able config."""

    tag: str

    def describe(self) -> dict[str, Any]:
        """Everything that changes the output (hyper-parameters, artifact fingerprints); no secrets."""
        ...

    @property
    def training_datasets(self) -> set[str]:
        """MTEB task names whose labelled data this step was fitted on (empty when label-free)."""
        ...


@dataclass
class CorpusIndex:
    """The indexed corpus as every search-time step sees it.

    `embeddings` are the (possibly steered) document vectors, shape (n_docs, dim), in the same row
    order as `ids` and `texts` (texts are title + " " + text as MTEB joins them); float32 in memory,
    or a float16/float32 `np.memmap` (scoring converts one block at a time).
    """

    ids: list[str]
    texts: list[str]
    embeddings: np.ndarray
    task_name: str = ""
    id_to_row: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.id_to_row = {doc_id: i for i, doc_id in enumerate(self.ids)}


@dataclass
class QueryBatch:
    """Queries of one search call: ids, texts and float32 vectors of shape (n_queries, dim)."""

    ids: list[str]
    texts: list[str]
    embeddings: np.ndarray


@runtime_checkable
class ReportsFit(Protocol):
    """A step that chooses something from the corpus at index time (a label-free `auto` strength).

    What it chose is filed beside the result (`steer_fit.json`), so an `auto` score can be audited.
    """

    def fit_report(self, task_name: str) -> dict[str, Any]:
        """What was chosen on `task_name`'s corpus, JSON-able, with at least `parameter`, `chosen` and
        `rule`; empty when nothing was chosen."""
        ...


class QueryTransform(Step, Protocol):
    """A pure map on query embeddings (the linear adapter): lives in the encoder, needs no corpus."""

    def transform_queries(self, embeddings: np.ndarray) -> np.ndarray: ...


class CorpusStep(Step, Protocol):
    """Changes document vectors at index time (fusion with generated queries)."""

    def steer_corpus(self, index: CorpusIndex, encoder: SteerEncoder) -> np.ndarray: ...


class QueryStep(Step, Protocol):
    """Changes query vectors at search time, with the corpus at hand (HyDE, test-time refinement)."""

    def steer_queries(self, queries: QueryBatch, index: CorpusIndex, encoder: SteerEncoder) -> np.ndarray: ...


Tile = tuple[slice, slice, "torch.Tensor"]  # (query rows, corpus rows, scores (len(query rows), len(corpus rows)))
TileFuser = Callable[[slice, slice, "torch.Tensor"], "torch.Tensor"]


class ScoreFusion(Step, Protocol):
    """Adds non-dense evidence to the dense scores (lexical hybrid), one score tile at a time."""

    def fit(self, index: CorpusIndex) -> None: ...

    def fuser(self, queries: QueryBatch, index: CorpusIndex,
              dense_tiles: Callable[[], Iterator[Tile]]) -> TileFuser:
        """For these queries, a map (query rows, corpus rows, dense tile) -> fused tile of the same shape.

        `dense_tiles()` starts a fresh pass over all dense tiles of these queries; a fusion that needs
        exact statistics over the whole corpus (per-query mean, spread, top candidates) takes them
        in such a pass first.
        """
        ...
