"""From a plain configuration to a ready SteerSearch: the one place steps are assembled.

The CLI and benchmark.py both describe a run as a `SteerConfig`; `build_model` turns it into
the encoder + steps. Nothing here computes; it only wires (artifacts load, nothing trains).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from mteb_steer.backbone import check_encoding, resolve_backbone
from mteb_steer.encoder import SteerEncoder
from mteb_steer.encoding import Encoding
from mteb_steer.search import SteerSearch
from mteb_steer.steering.fusion import STRENGTH_NAME, select_strength

LLM_MODES = ("completion", "chat")
LEXICAL_METHODS = ("bm25",)
# SteerConfig field -> QueryFusion keyword; ranges are QueryFusion's to check (when the bank is at hand)
BANK_FUSION_OPTIONS = {"fusion_rule": "rule", "fusion_weighting": "weighting", "fusion_temperature": "temperature",
                       "fusion_drop_fraction": "drop_fraction"}

# cache folders of this machine: never filed with a result (see SteerConfig.to_json)
MACHINE_LOCAL = ("embedding_cache", "llm_cache_dir", "lexical_index_dir")


@dataclass
class SteerConfig:
    """Everything that selects a model and its steering; defaults = the plain bundled model.

    The one place a configuration is checked and named: `validate()` runs on construction, so
    the CLI, benchmark.py, the scripts and mteb's loaders reject a bad value with the same
    message before any data or weights load. A new plain field needs no code beyond its
    declaration (and a check in `validate` if it has a range): `to_json`/`from_json` carry
    every field but this machine's cache folders (MACHINE_LOCAL), and that JSON (in `steer_config.json`
    and the ModelMeta's `loader_kwargs`) is what `mteb.get_model` rebuilds the model from.
    """

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
    fusion_param: float | str = "auto"  # the strength: alpha (mean) / beta (sum) / gamma (rotate), or "auto"
    fusion_rule: str = "one-se"  # how "auto" picks: one-se | best (see QueryFusion)
    fusion_weighting: str = "uniform"  # uniform | similarity
    fusion_temperature: float = 0.05  # softmax temperature of the similarity weighting
    fusion_drop_fraction: float = 0.0  # Doc2Query-- filter: drop this share of the generated queries
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
    self_tune_sample: int | None = None  # pseudo-queries per corpus; None: steering.self_tune.SAMPLE_SIZE

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field; cheap (no data, no weights)."""
        from mteb_steer.steering.lexical import FUSION_MODES

        if self.fusion is None:
            if self.fusion_param != "auto":
                raise ValueError(f"a fusion strength ({self.fusion_param!r}) needs a fusion method (mean, sum, rotate)")
        else:
            self.fusion_param = select_strength(self.fusion, {STRENGTH_NAME.get(self.fusion, "alpha"): self.fusion_param})
        bank_only = {name: getattr(self, name) for name in BANK_FUSION_OPTIONS
                     if getattr(self, name) != SteerConfig.__dataclass_fields__[name].default}
        if bank_only and self.fusion and not self.query_bank:
            raise ValueError(f"{sorted(bank_only)} apply to fusion with a query bank, not to generate-then-fuse")
        from mteb_steer.steering.llm_client import Transport

        Encoding(self.backend, self.dtype, self.embedding_storage)  # names the bad backend / dtype / storage
        Transport(timeout=self.llm_timeout, retries=self.llm_retries)  # the LLM client's own check
        at_least = {"batch_size": 1, "num_queries": 1, "refine_top_k": 1, "refine_steps": 0, "hyde": 0,
                    **({"self_tune_sample": 1} if self.self_tune_sample is not None else {})}  # None: the default
        for name, low in at_least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not self.refine_lr > 0:
            raise ValueError(f"refine_lr must be > 0, got {self.refine_lr!r}")
        if self.llm_mode not in LLM_MODES:
            raise ValueError(f"llm_mode must be one of {LLM_MODES}, got {self.llm_mode!r}")
        if self.lexical not in (None, *LEXICAL_METHODS):
            raise ValueError(f"unknown lexical method {self.lexical!r}; only {', '.join(LEXICAL_METHODS)} is available")
        if self.lexical_weight is not None and not 0.0 <= self.lexical_weight <= 1.0:
            raise ValueError(f"lexical weight must be in [0, 1] (dense weight is 1 - w), got {self.lexical_weight}")
        if self.lexical_fusion is not None and self.lexical_fusion not in FUSION_MODES:
            raise ValueError(f"lexical fusion {self.lexical_fusion!r} unknown; choose one of {FUSION_MODES}")
        if self.self_tune_sample is not None and not self.self_tune:
            raise ValueError("--self-tune-sample sets how many pseudo-queries --self-tune uses; give --self-tune")
        if self.self_tune:
            _check_self_tune(self)

    @property
    def strength_name(self) -> str | None:
        """The user-facing name of the fusion strength (alpha, beta or gamma); None without fusion."""
        return STRENGTH_NAME.get(self.fusion) if self.fusion else None

    @classmethod
    def from_options(cls, *, alpha: float | str | None = None, beta: float | str | None = None,
                     gamma: float | str | None = None, **options: Any) -> SteerConfig:
        """A config from user-facing option names: the fusion strength given as alpha, beta or gamma."""
        given = {"alpha": alpha, "beta": beta, "gamma": gamma}
        named = [name for name, value in given.items() if value is not None]
        if named and not options.get("fusion"):
            raise ValueError(f"{', '.join(named)} given without a fusion method (mean takes alpha, sum beta, "
                             "rotate gamma)")
        if options.get("fusion"):
            options["fusion_param"] = select_strength(options["fusion"], given)
        return cls(**options)

    def to_json(self) -> dict[str, Any]:
        """Every field but MACHINE_LOCAL, JSON-able; `from_json` of it gives an equal config (caches aside).

        Those are where this machine keeps base vectors, LLM answers and BM25 indexes: they change
        no number, and a result file naming them would send another machine's `mteb.get_model` to a
        folder of ours (and publish our paths with the results).
        """
        return {name: value for name, value in asdict(self).items() if name not in MACHINE_LOCAL}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SteerConfig:
        """The config `to_json` wrote; unknown keys are refused (they would be silently ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def llm_cache(self) -> Path:
        return Path(self.llm_cache_dir or os.environ.get("MTEB_STEER_LLM_CACHE")
                    or Path.home() / ".cache" / "mteb_steer" / "llm")


def build_encoder(config: SteerConfig) -> SteerEncoder:
    """Base model + query transforms (the adapter), validated before weights load.

    An adapter only makes sense on the base model it was trained for: a mismatch is refused here.
    """
    check_encoding(config.device, Encoding(config.backend, config.dtype, config.embedding_storage))
    backbone = resolve_backbone(config.model)
    return SteerEncoder(config.model, device=config.device, batch_size=config.batch_size,
                        cache_dir=config.embedding_cache, query_transforms=query_transforms(config, backbone.meta),
                        backbone=backbone, backend=config.backend, dtype=config.dtype,
                        embedding_storage=config.embedding_storage)


def query_transforms(config: SteerConfig, base_meta: Any) -> list:
    """The encoder's query transforms (the adapter), loaded from disk and checked against the base
    model's `base_meta`; no weights needed."""
    if not config.adapter:
        return []
    from mteb_steer.steering.adapter import QueryAdapter

    return [QueryAdapter.load(config.adapter, expect_base=base_meta)]


def _gen_config(config: SteerConfig, **overrides: Any):
    from mteb_steer.steering.generation import GenConfig

    return GenConfig(model=config.llm_model, mode=config.llm_mode, num_queries=config.num_queries,
                     timeout=config.llm_timeout, retries=config.llm_retries, **overrides)


def _banks(config: SteerConfig) -> tuple[Any, Any]:
    """(query bank, held-out pseudo-queries): under self-tuning the held-out queries tune, and fusion
    and expansion never see them; (None, None) without a bank."""
    if not config.query_bank:
        return None, None
    from mteb_steer.steering.banks import load_bank

    bank = load_bank(config.query_bank)
    if not config.self_tune:
        return bank, None
    from mteb_steer.steering.self_tune import split_bank

    return split_bank(bank, **_self_tune_sample(config))


def corpus_steps(config: SteerConfig, bank: Any = None, task: Any | None = None) -> list:
    """Fusion of passages with their generated queries (from the bank, else generated by the LLM)."""
    if not config.fusion:
        return []
    if bank is not None:
        from mteb_steer.steering.fusion import QueryFusion

        options = {keyword: getattr(config, name) for name, keyword in BANK_FUSION_OPTIONS.items()}
        return [QueryFusion(bank, config.fusion, **{config.strength_name: config.fusion_param}, **options)]
    from mteb_steer.steering.generated_fusion import GeneratedQueryFusion, task_passages
    from mteb_steer.steering.query_style import resolve_query_style

    if task is None:
        raise ValueError(f"--fusion {config.fusion} without --query-bank generates queries for the task's "
                         "corpus first: build_model needs the task")
    gen_config = _gen_config(config, query_style=resolve_query_style(config.query_style, task))
    return [GeneratedQueryFusion(gen_config, config.llm_cache(), passages=task_passages(task),
                                 base_url=config.llm_base_url, method=config.fusion, strength=config.fusion_param,
                                 allow_partial=config.allow_failed_passages)]


def score_fusion(config: SteerConfig, bank: Any = None, encoder: SteerEncoder | None = None,
                 held_out: Any = None):
    """The lexical hybrid (self-tuned per corpus with `self_tune`, which needs the encoder), or None."""
    if not config.lexical:
        return None
    if config.self_tune:
        if encoder is None:
            raise ValueError("a self-tuned lexical hybrid needs the loaded encoder")
        from mteb_steer.steering.self_tune import SelfTunedHybrid

        return SelfTunedHybrid(encoder, fusion=config.lexical_fusion, held_out=held_out, bank=bank,
                               expand=config.lexical_expand, index_dir=config.lexical_index_dir,
                               **_self_tune_sample(config))
    from mteb_steer.steering.lexical import LexicalHybrid

    return LexicalHybrid(config.lexical_weight, config.lexical_fusion, bank=bank,
                         expand=config.lexical_expand, index_dir=config.lexical_index_dir)


def query_steps(config: SteerConfig, encoder: SteerEncoder, bank: Any = None, task: Any | None = None) -> list:
    """HyDE and test-time refinement: steps that need the loaded encoder (teachers score with it)."""
    steps = []
    if config.hyde:
        from mteb_steer.steering.hyde import HyDE

        steps.append(HyDE(config.hyde, cache_dir=config.llm_cache(), config=_gen_config(config),
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
        steps.append(TestTimeRefinement(teacher, top_k=config.refine_top_k, steps=config.refine_steps,
                                        lr=config.refine_lr, ignore_identical_ids=ignore_identical_ids))
    return steps


def build_model(config: SteerConfig, encoder: SteerEncoder | None = None, task: Any | None = None) -> SteerSearch:
    """The search model for `config` on `task` (needed only by the gold teacher and identical-id rules).

    Pass `encoder` to reuse one already loaded with the same base model and adapter. The model
    carries `config`, so its ModelMeta gets a loader that rebuilds it (`mteb.get_model`).
    """
    encoder = encoder or build_encoder(config)
    bank, held_out = _banks(config)
    return SteerSearch(encoder, corpus_steps=corpus_steps(config, bank, task),
                       query_steps=query_steps(config, encoder, bank, task),
                       score_fusion=score_fusion(config, bank, encoder, held_out), config=config)


def configuration_meta(config: SteerConfig, base_meta: Any) -> Any:
    """The ModelMeta `build_model(config)` would have, without loading the base model's weights.

    Only for configurations whose steps need no encoder (adapter, bank fusion, lexical hybrid):
    the named presets are of that kind.
    """
    if config.hyde or config.refine_teacher or config.self_tune or (config.fusion and not config.query_bank):
        raise ValueError("configuration_meta needs steps that work without the encoder "
                         "(no HyDE, refinement, self-tuning or generate-then-fuse)")
    from mteb_steer.identity import steered_meta

    bank, _ = _banks(config)
    fusion = score_fusion(config, bank)
    steps = [*query_transforms(config, base_meta), *corpus_steps(config, bank), *([fusion] if fusion else [])]
    return steered_meta(base_meta, steps, config)


def _self_tune_sample(config: SteerConfig) -> dict[str, int]:
    """The user's pseudo-query count as a keyword, or none (the self-tune module's default)."""
    return {} if config.self_tune_sample is None else {"sample_size": config.self_tune_sample}


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
