"""From a plain configuration to a ready SteerSearch: the one place steps are assembled.

The CLI and benchmark.py both describe a run as a `SteerConfig`; `build_model` turns it into
the encoder + steps. Nothing here computes; it only wires.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mteb_steer.backbone import check_device
from mteb_steer.encoder import SteerEncoder
from mteb_steer.search import SteerSearch


@dataclass
class SteerConfig:
    """Everything that selects a model and its steering; defaults = the plain bundled model."""

    model: str | None = None
    device: str | None = None
    batch_size: int = 32
    embedding_cache: str | None = None
    # corpus steering (issue 3): a query bank file/folder, or generation through an LLM endpoint
    query_bank: str | None = None
    fusion: str | None = None  # mean | sum | rotate
    fusion_param: float | str = "auto"  # alpha (mean) / beta (sum) / gamma (rotate), or "auto"
    llm_base_url: str | None = None
    llm_model: str | None = None
    num_queries: int = 3
    llm_cache_dir: str | None = None
    # query adapter (issue 4)
    adapter: str | None = None  # folder written by train-adapter
    # test-time refinement (issue 4)
    refine_teacher: str | None = None  # gold | embedding:MODEL | cross-encoder:MODEL | llm:MODEL | bm25 | hybrid
    refine_top_k: int = 50
    refine_steps: int = 20
    refine_lr: float = 1e-3
    hyde: int = 0
    # lexical hybrid (issue 7)
    lexical: str | None = None  # bm25
    lexical_weight: float | None = None  # None: the default chosen on TREC-DL
    lexical_fusion: str = "zscore"
    lexical_expand: bool = True


def build_encoder(config: SteerConfig) -> SteerEncoder:
    """Base model + query transforms (validated before weights load)."""
    check_device(config.device)
    return SteerEncoder(config.model, device=config.device, batch_size=config.batch_size,
                        cache_dir=config.embedding_cache)


def build_model(config: SteerConfig, encoder: SteerEncoder | None = None) -> SteerSearch:
    """The search model for `config`; pass `encoder` to reuse one already loaded (same base model)."""
    encoder = encoder or build_encoder(config)
    return SteerSearch(encoder)


def default_output_folder() -> Path:
    """The current directory: results land in `./results/<org__model>/<revision>/` (leaderboard layout)."""
    return Path.cwd()
