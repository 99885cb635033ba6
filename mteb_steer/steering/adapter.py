"""Linear query adapter: a learned map on query embeddings only, so the corpus is never re-embedded.

After Chroma's "Embedding Adapters" report and NUDGE's adapter baseline. The adapter is

    y = (x W^T + b) * ||x|| / ||x W^T + b||,   W = I + D  (full)  or  W = I + U V^T  (low rank r)

initialised at the identity (D = 0, U = 0, b = 0), so an untrained adapter returns its input
bit for bit. The output keeps the input's L2 norm: a query's ranking never depends on its
scale (cosine or dot product alike), and keeping the base scale leaves downstream score
fusion and refinement temperatures calibrated as for the plain model.

Training works on vectors only: query and passage base embeddings are computed once through
`SteerEncoder.embed` (its disk cache shared with evaluation), then the adapter is fitted with
one of three losses on (query, relevant passage) pairs, with in-batch and random negatives:

- ``mnrl``: multiple-negatives ranking, cross-entropy over scaled cosines (positive = own passage);
- ``triplet``: hinge ``max(0, margin - cos(q, p) + cos(q, n))`` averaged over the negatives;
- ``mse``: squared error of cosines to 1 (positive) and 0 (negatives).

Negatives that are in fact relevant (another pair's passage that is also a positive of this
query, e.g. SciFact queries with several relevant documents, or two generated queries of
the same passage in one batch) are excluded. Early stopping watches MRR@10 of a held-out part
of the *training* queries over the whole corpus; the best epoch is kept (0 = identity).

Training data: a labelled non-evaluation split (`pairs_from_split`, refuses a task's eval
split) or generated queries (`pairs_from_bank`, no labels at all). Saved as safetensors +
JSON config; `export_sentence_transformer` writes a plain sentence-transformers model whose
`encode_query` applies the adapter (a `Dense` layer in a `Router` query route) and whose
`encode_document` is the base model.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from mteb.types import PromptType
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from mteb_steer.beir import DataFolderError, load_beir_split, read_corpus
from mteb_steer.encoder import passage_text
from mteb_steer.files import write_atomic
from mteb_steer.identity import chunked_hash, stable_hash
from mteb_steer.steering.banks import QueryBank, load_bank
from mteb_steer.steering.fusion import reciprocal_ranks
from mteb_steer.tasks import LOCAL_FOLDERS, default_data_root, resolve_task

if TYPE_CHECKING:
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.models.model_meta import ModelMeta

    from mteb_steer.encoder import SteerEncoder

logger = logging.getLogger(__name__)

Loss = Literal["mnrl", "triplet", "mse"]
LOSSES: tuple[str, ...] = ("mnrl", "triplet", "mse")
Holdout = Literal["group", "passage"]
HOLDOUTS: tuple[str, ...] = ("group", "passage")
GENQ_SUFFIX = "-genq"


# -- the adapter ----------------------------------------------------------------------------------
class QueryAdapter(torch.nn.Module):
    """A linear map on query embeddings (a `QueryTransform`), identity at initialisation.

    Args:
        dim: embedding dimension (input = output).
        rank: None for a full matrix W = I + D; r for W = I + U V^T (U: dim x r, V: dim x r).
        bias: learn an additive bias b.
        data: short name of the training data ("scifact-train", "genq-arguana"); the tag is
            ``adapter-<data>``.
        training_datasets: MTEB task names whose labels the adapter was fitted on.
        base_model: ``name@revision`` of the base model it was trained for (checked on load).
        train_config: hyper-parameters and training record (informational, part of the identity).
        seed: seeds the random V of a low-rank adapter (U starts at 0, so W starts at I anyway).
    """

    config_keys: ClassVar[tuple[str, ...]] = ("dim", "rank", "bias", "data", "training_datasets", "base_model",
                                              "train_config")
    config_file_name = "adapter_config.json"
    weights_file_name = "adapter.safetensors"

    def __init__(self, dim: int, rank: int | None = None, bias: bool = True, *, data: str = "identity",
                 training_datasets: Iterable[str] = (), base_model: str | None = None,
                 train_config: dict[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"adapter dim must be >= 1, got {dim}")
        if rank is not None and not 1 <= rank <= dim:
            raise ValueError(f"adapter rank must be in [1, {dim}] or None (full), got {rank}")
        self.dim, self.rank, self.bias = dim, rank, bias
        self.data = data
        self._training_datasets = sorted(set(training_datasets))
        self.base_model = base_model
        self.train_config = dict(train_config or {})
        if rank is None:
            self.delta = torch.nn.Parameter(torch.zeros(dim, dim))
        else:
            generator = torch.Generator().manual_seed(seed)
            self.u = torch.nn.Parameter(torch.zeros(dim, rank))
            self.v = torch.nn.Parameter(torch.randn(dim, rank, generator=generator) / dim ** 0.5)
        self.offset = torch.nn.Parameter(torch.zeros(dim)) if bias else None

    # -- math --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, dim) -> (n, dim), each row rescaled to its input's L2 norm."""
        if self.rank is None:
            y = x + x @ self.delta.T
        else:
            y = x + (x @ self.v) @ self.u.T
        if self.offset is not None:
            y = y + self.offset
        scale = torch.linalg.vector_norm(x, dim=1, keepdim=True) / torch.linalg.vector_norm(
            y, dim=1, keepdim=True).clamp_min(torch.finfo(y.dtype).tiny)
        return y * scale

    def weight_matrix(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W, b) of the linear part, W = I + D or I + U V^T (dim x dim); b is None without bias."""
        with torch.no_grad():
            delta = self.delta if self.rank is None else self.u @ self.v.T
            weight = torch.eye(self.dim) + delta
            return weight, None if self.offset is None else self.offset.detach().clone()

    def transform_queries(self, embeddings: np.ndarray) -> np.ndarray:
        """Float32 (n, dim) query vectors -> adapted float32 (n, dim), same row norms."""
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"{self.tag}: expected query embeddings of shape (n, {self.dim}), "
                             f"got {embeddings.shape}")
        with torch.no_grad():
            return self(torch.from_numpy(embeddings)).numpy().astype(np.float32, copy=False)

    # -- identity (Step protocol) ------------------------------------------------------------------
    @property
    def tag(self) -> str:
        return f"adapter-{self.data}"

    @property
    def training_datasets(self) -> set[str]:
        return set(self._training_datasets)

    def get_config_dict(self) -> dict[str, Any]:
        """Exactly the constructor arguments `load` rebuilds from (sentence-transformers Module style)."""
        return {"dim": self.dim, "rank": self.rank, "bias": self.bias, "data": self.data,
                "training_datasets": list(self._training_datasets), "base_model": self.base_model,
                "train_config": self.train_config}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().contiguous() for name, p in self.state_dict().items()}

    def weights_sha256(self) -> str:
        """sha256 of the safetensors serialisation of the weights (what `save` writes)."""
        return hashlib.sha256(save(self._tensors())).hexdigest()

    def describe(self) -> dict[str, Any]:
        config = self.get_config_dict()
        weights = self.weights_sha256()
        return {"kind": "linear-query-adapter", **config, "weights_sha256": weights,
                "fingerprint": stable_hash({"config": config, "weights_sha256": weights})}

    # -- persistence -------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write `adapter.safetensors` + `adapter_config.json` into folder (created).

        Each file is written atomically, the config last: a kill mid-save never leaves a folder that loads.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / self.config_file_name).unlink(missing_ok=True)
        write_atomic(folder / self.weights_file_name, save(self._tensors()))
        write_atomic(folder / self.config_file_name, json.dumps(self.get_config_dict(), indent=2, sort_keys=True) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, *, expect_base: ModelMeta | None = None) -> QueryAdapter:
        """Rebuild from the two files `save` wrote; with `expect_base`, refuse an adapter trained for another model."""
        folder = Path(folder)
        config_path, weights_path = folder / cls.config_file_name, folder / cls.weights_file_name
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"adapter folder {folder}: missing {path.name}")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path}: not valid JSON ({err.msg})") from err
        unknown = sorted(set(config) - set(cls.config_keys))
        if unknown or "dim" not in config:
            raise ValueError(f"{config_path}: unexpected keys {unknown} or no 'dim' (expected {list(cls.config_keys)})")
        adapter = cls(**config)
        tensors = load_file(weights_path)
        expected = {name: tuple(p.shape) for name, p in adapter.state_dict().items()}
        found = {name: tuple(t.shape) for name, t in tensors.items()}
        if expected != found:
            raise ValueError(f"{weights_path}: tensors {found} do not match the config {expected}")
        adapter.load_state_dict(tensors)
        if expect_base is not None:
            try:
                adapter.check_base(expect_base)
            except ValueError as err:
                raise ValueError(f"adapter folder {folder}: {err}") from None
        return adapter

    def check_base(self, meta: ModelMeta) -> None:
        """Raise if the adapter was trained on another base model than `meta` names."""
        wanted = base_model_id(meta)
        if self.base_model is not None and self.base_model != wanted:
            raise ValueError(f"adapter {self.tag} was trained for {self.base_model}, not for {wanted}: evaluate it "
                             f"with -m {self.base_model.split('@')[0]}, or train an adapter for {meta.name}")


def base_model_id(meta: ModelMeta) -> str:
    return f"{meta.name}@{meta.revision}"


# -- training data --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairSet:
    """(query, relevant passage) training pairs over one corpus, with where they came from.

    `queries[i]` is relevant to `corpus_texts[positives[i]]`. `groups[i]` is the unit held out
    together for early stopping (the query id for labelled data, the passage id for generated
    queries). `name` becomes the adapter's data name; `training_datasets` the MTEB tasks whose
    labels were used (empty for generated queries).
    """

    queries: list[str]
    positives: np.ndarray
    groups: list[str]
    corpus_texts: list[str]
    name: str
    training_datasets: frozenset[str]

    def __post_init__(self) -> None:
        if not self.queries:
            raise ValueError(f"training data {self.name!r} holds no (query, passage) pairs")
        if not len(self.queries) == len(self.positives) == len(self.groups):
            raise ValueError(f"training data {self.name!r}: {len(self.queries)} queries, "
                             f"{len(self.positives)} positives, {len(self.groups)} groups")
        if self.positives.min() < 0 or self.positives.max() >= len(self.corpus_texts):
            raise ValueError(f"training data {self.name!r}: positive rows outside the corpus")

    def fingerprint(self) -> str:
        """Content hash of the pairs and the corpus, each hashed in chunks (no corpus-sized JSON blob)."""
        pairs = chunked_hash(len(self.queries), lambda a, b: [self.queries[a:b], self.positives[a:b].tolist(),
                                                              self.groups[a:b]])
        corpus = chunked_hash(len(self.corpus_texts), lambda a, b: list(self.corpus_texts[a:b]))
        return stable_hash({"name": self.name, "pairs": pairs, "corpus": corpus})


def _labelled_folder(data: str | os.PathLike, data_root: str | os.PathLike | None) -> tuple[Path, AbsTaskRetrieval]:
    """(folder, mteb task) of a task name with a local copy, or of a BEIR folder path."""
    path = Path(data).expanduser()
    if path.is_dir():
        known = {folder: name for name, folder in LOCAL_FOLDERS.items()}.get(path.name)
        return path, resolve_task(known, path.parent) if known else resolve_task(str(path))
    root = Path(data_root) if data_root else default_data_root()
    name = str(data)
    if name not in LOCAL_FOLDERS or root is None:
        raise ValueError(f"training data {name!r}: give a BEIR folder path or one of {sorted(LOCAL_FOLDERS)} "
                         f"with a data root holding its folder (data root: {root})")
    return root / LOCAL_FOLDERS[name], resolve_task(name, root)


def pairs_from_split(data: str | os.PathLike, split: str = "train",
                     data_root: str | os.PathLike | None = None) -> PairSet:
    """Pairs from the qrels of a labelled split (score > 0) of a task name or BEIR folder.

    Refuses the task's evaluation split(s): training on them would report test labels as results.
    Qrels pointing at passages absent from the corpus are skipped with a warning.
    """
    folder, task = _labelled_folder(data, data_root)
    if split in task.metadata.eval_splits:
        raise ValueError(f"refusing to train on {split!r}: it is an evaluation split of {task.metadata.name} "
                         f"(eval splits {task.metadata.eval_splits}); use a training split such as 'train'")
    beir = load_beir_split(folder, split)
    row_of = {row["id"]: i for i, row in enumerate(beir.corpus)}
    texts = {q["id"]: q["text"] for q in beir.queries}
    queries, positives, groups, missing = [], [], [], []
    for qid, docs in beir.qrels.items():
        for doc_id, score in docs.items():
            if score <= 0:
                continue
            if doc_id not in row_of:
                missing.append(doc_id)
                continue
            queries.append(texts[qid])
            positives.append(row_of[doc_id])
            groups.append(qid)
    if missing:
        logger.warning("%s/%s: %d qrels point at passages absent from the corpus (skipped), e.g. %s",
                       folder, split, len(missing), missing[:3])
    return PairSet(queries=queries, positives=np.asarray(positives, dtype=np.int64), groups=groups,
                   corpus_texts=[passage_text(r["title"], r["text"]) for r in beir.corpus],
                   name=f"{folder.name}-{split}", training_datasets=frozenset({task.metadata.name}))


def pairs_from_bank(bank: QueryBank, corpus: list[dict[str, str]], corpus_name: str) -> PairSet:
    """Pairs (generated query, its source passage) from a query bank over `corpus` rows (id, title, text).

    Pairs come in corpus row order (bank order within a passage), the order query fusion embeds
    the same bank in, so the two share cached query embeddings. No labels are used, so
    `training_datasets` is empty; the data name `genq-<corpus_name>` puts "trained on generated
    queries of this corpus" into the model name.
    """
    row_of = {row["id"]: i for i, row in enumerate(corpus)}
    unknown = [doc_id for doc_id in bank if doc_id not in row_of]
    if unknown:
        raise ValueError(f"query bank for {corpus_name!r}: {len(unknown)} passage id(s) absent from the corpus, "
                         f"e.g. {unknown[:3]}")
    queries, positives, groups = [], [], []
    for doc_id, generated in sorted(bank.items(), key=lambda item: row_of[item[0]]):
        queries.extend(generated)
        positives.extend([row_of[doc_id]] * len(generated))
        groups.extend([doc_id] * len(generated))
    return PairSet(queries=queries, positives=np.asarray(positives, dtype=np.int64), groups=groups,
                   corpus_texts=[passage_text(r["title"], r["text"]) for r in corpus],
                   name=f"genq-{corpus_name}", training_datasets=frozenset())


def training_pairs(data: str | os.PathLike | None = None, split: str = "train", *,
                   query_bank: str | os.PathLike | None = None,
                   data_root: str | os.PathLike | None = None) -> PairSet:
    """The CLI's choice: `--data X --split S` (labels) or `--query-bank B [--data CORPUS]` (generated).

    A bank that is a BEIR generated-queries folder (arguana-genq) carries its own corpus; a
    JSONL bank needs `data` (task name or folder) for the corpus it was generated from.
    """
    if query_bank is None:
        if data is None:
            raise ValueError("give labelled training data (--data TASK_OR_FOLDER --split train) or --query-bank PATH")
        return pairs_from_split(data, split, data_root)
    bank_path = Path(query_bank)
    if data is not None:
        folder = _labelled_folder(data, data_root)[0]
        corpus_name = folder.name
    elif bank_path.is_dir():
        folder = bank_path
        corpus_name = folder.name.removesuffix(GENQ_SUFFIX)
    else:
        raise ValueError(f"query bank {bank_path} is a file: also give --data (the task or folder whose corpus "
                         "the queries were generated from)")
    try:
        corpus = read_corpus(folder)
    except DataFolderError as err:
        raise ValueError(f"corpus for query bank {bank_path}: {err}") from err
    return pairs_from_bank(load_bank(bank_path), corpus, corpus_name)


# -- losses ---------------------------------------------------------------------------------------
def adapter_loss(queries: torch.Tensor, candidates: torch.Tensor, excluded: torch.Tensor, loss: Loss, *,
                 scale: float = 20.0, margin: float = 0.2) -> torch.Tensor:
    """Mean loss of a batch on cosine similarities.

    queries: (B, d); candidates: (C, d) with C >= B, candidate i the positive of query i, the
    rest negatives; excluded: (B, C) bool, True where a candidate must not count as a negative
    (false negatives; never the own positive). See the module docstring for the three losses.
    """
    sims = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(candidates, dim=1).T
    n = len(queries)
    own = torch.arange(n)
    positive = sims[own, own]
    negative = torch.ones_like(excluded)
    negative[own, own] = False
    negative &= ~excluded
    if loss == "mnrl":
        logits = (scale * sims).masked_fill(excluded, float("-inf"))
        return torch.nn.functional.cross_entropy(logits, own)
    count = negative.sum(dim=1).clamp_min(1)
    if loss == "triplet":
        hinge = torch.relu(margin - positive[:, None] + sims) * negative
        return (hinge.sum(dim=1) / count).mean()
    if loss == "mse":
        return ((1 - positive) ** 2 + (sims ** 2 * negative).sum(dim=1) / count).mean()
    raise ValueError(f"unknown adapter loss {loss!r}: use one of {LOSSES}")


# -- training -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterTrainConfig:
    """Hyper-parameters of `train_adapter` (all recorded in the adapter's identity).

    holdout: what early stopping holds out: "group" (the PairSet's groups: whole queries for
    labelled data, whole passages for generated queries) or "passage" (held-out pairs'
    passages are never training positives: measures generalisation to unseen documents).
    """

    loss: Loss = "mnrl"
    rank: int | None = None
    bias: bool = True
    epochs: int = 30
    batch_size: int = 64
    random_negatives: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    scale: float = 20.0
    margin: float = 0.2
    val_fraction: float = 0.1
    holdout: Holdout = "group"
    patience: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown adapter loss {self.loss!r}: use one of {LOSSES}")
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"adapter {name} must be >= 1, got {getattr(self, name)}")
        if self.random_negatives < 0:
            raise ValueError(f"adapter random_negatives must be >= 0, got {self.random_negatives}")
        if self.holdout not in HOLDOUTS:
            raise ValueError(f"unknown adapter holdout {self.holdout!r}: use one of {HOLDOUTS}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"adapter val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0 or self.scale <= 0 or self.weight_decay < 0:
            raise ValueError(f"adapter lr and scale must be > 0 and weight_decay >= 0 "
                             f"(got lr={self.lr}, scale={self.scale}, weight_decay={self.weight_decay})")


@dataclass
class TrainingHistory:
    """Per-epoch record (epoch 0 = identity): train loss and held-out MRR@10; the epoch kept."""

    epochs: list[dict[str, float]]
    best_epoch: int
    n_train_pairs: int
    n_val_pairs: int


def split_groups(groups: list[str], val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask over pairs: True for pairs whose group was drawn (seeded) into the held-out part."""
    names = sorted(set(groups))
    if len(names) < 2:
        raise ValueError(f"need at least 2 training queries/groups to hold some out, got {len(names)}")
    n_val = min(max(1, round(val_fraction * len(names))), len(names) - 1)
    held = set(np.random.default_rng(seed).permutation(names)[:n_val].tolist())
    return np.fromiter((g in held for g in groups), dtype=bool, count=len(groups))


def holdout_mask(data: PairSet, config: AdapterTrainConfig) -> np.ndarray:
    """True for the pairs early stopping holds out: whole groups, or whole positive passages."""
    units = data.groups if config.holdout == "group" else [str(r) for r in data.positives.tolist()]
    return split_groups(units, config.val_fraction, config.seed)


def positive_table(positives: np.ndarray, groups: list[str]) -> torch.Tensor:
    """(n_pairs, max positives per group) int64: every positive row of each pair's group, padded with -1."""
    rows: dict[str, list[int]] = {}
    for row, group in zip(positives.tolist(), groups, strict=True):
        if row not in rows.setdefault(group, []):
            rows[group].append(row)
    width = max(len(r) for r in rows.values())
    table = torch.full((len(groups), width), -1, dtype=torch.int64)
    for i, group in enumerate(groups):
        table[i, :len(rows[group])] = torch.tensor(rows[group])
    return table


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic kernels on one thread: the same result on any core count, and on tiny
    (batch x dim) matrices one thread is also ~15x faster than two contended ones."""
    previous, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.set_num_threads(threads)


def train_adapter(encoder: SteerEncoder, data: PairSet, config: AdapterTrainConfig | None = None, *,
                  show_progress_bar: bool = True) -> tuple[QueryAdapter, TrainingHistory]:
    """Fit a QueryAdapter on `data` with `encoder`'s base vectors; returns the best epoch's adapter.

    Base embeddings (no query transforms) are computed once through `encoder.embed` (cached);
    everything after runs on vectors. Seeded and deterministic on CPU.
    """
    config = config or AdapterTrainConfig()
    held_out = holdout_mask(data, config)
    query_vectors = torch.from_numpy(encoder.embed(data.queries, PromptType.query, apply_transforms=False,
                                                   show_progress_bar=show_progress_bar))
    passages = torch.from_numpy(encoder.embed(data.corpus_texts, PromptType.document,
                                              show_progress_bar=show_progress_bar))
    positives = torch.from_numpy(data.positives)
    table = positive_table(data.positives, data.groups)
    train_idx = torch.from_numpy(np.flatnonzero(~held_out))
    val_idx = torch.from_numpy(np.flatnonzero(held_out))

    adapter = QueryAdapter(passages.shape[1], config.rank, config.bias, seed=config.seed)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)

    def validate() -> float:
        with torch.no_grad():
            queries = adapter(query_vectors[val_idx]).numpy()
        return float(reciprocal_ranks(queries, positives[val_idx].numpy(), passages.numpy(), encoder).mean())

    bar = tqdm(range(1, config.epochs + 1), desc=f"adapter {config.loss}", disable=not show_progress_bar)
    with _deterministic():
        history = [{"epoch": 0, "train_loss": float("nan"), "val_mrr_at_10": validate()}]
        best_mrr, best_epoch, best_state = history[0]["val_mrr_at_10"], 0, copy.deepcopy(adapter.state_dict())
        for epoch in bar:
            order = train_idx[torch.randperm(len(train_idx), generator=generator)]
            total, batches = 0.0, 0
            for start in range(0, len(order), config.batch_size):
                batch = order[start:start + config.batch_size]
                randoms = torch.randint(len(passages), (config.random_negatives,), generator=generator)
                candidates = torch.cat([positives[batch], randoms])
                excluded = (table[batch][:, :, None] == candidates[None, None, :]).any(dim=1)
                excluded[torch.arange(len(batch)), torch.arange(len(batch))] = False
                loss = adapter_loss(adapter(query_vectors[batch]), passages[candidates], excluded,
                                    config.loss, scale=config.scale, margin=config.margin)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item()
                batches += 1
            mrr = validate()
            history.append({"epoch": epoch, "train_loss": total / batches, "val_mrr_at_10": mrr})
            bar.set_postfix(loss=f"{total / batches:.4f}", val_mrr=f"{mrr:.4f}")
            if mrr > best_mrr:
                best_mrr, best_epoch, best_state = mrr, epoch, copy.deepcopy(adapter.state_dict())
            elif epoch - best_epoch >= config.patience:
                break
    adapter.load_state_dict(best_state)
    adapter.data = data.name
    adapter._training_datasets = sorted(data.training_datasets)
    adapter.base_model = base_model_id(encoder.base_meta)
    adapter.train_config = {**asdict(config), "best_epoch": best_epoch, "val_mrr_at_10": best_mrr,
                            "data_fingerprint": data.fingerprint(), "n_pairs": len(data.queries)}
    return adapter, TrainingHistory(history, best_epoch, len(train_idx), len(val_idx))


TRAINING_RECORD = "training.json"


def train_and_save(encoder: SteerEncoder, data: PairSet, out: str | os.PathLike,
                   config: AdapterTrainConfig | None = None, *,
                   show_progress_bar: bool = True) -> tuple[QueryAdapter, TrainingHistory, Path]:
    """The one way an adapter is trained for use: `train_adapter`, save to `out`, and record
    `training.json` beside it (seconds, pairs, best epoch), so its cost is reported, not remembered.

    Used by `mteb-steer train-adapter` and benchmark.py. Seconds include base encoding of the
    pairs unless the embedding cache already held those vectors.
    """
    started = time.perf_counter()
    adapter, history = train_adapter(encoder, data, config, show_progress_bar=show_progress_bar)
    seconds = time.perf_counter() - started
    folder = adapter.save(out)
    record = {"seconds": seconds, "pairs": len(data.queries), "best_epoch": history.best_epoch,
              "fingerprint": adapter.describe()["fingerprint"]}
    (folder / TRAINING_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return adapter, history, folder


# -- export ---------------------------------------------------------------------------------------
def export_sentence_transformer(encoder: SteerEncoder, adapter: QueryAdapter, out_dir: str | os.PathLike) -> Path:
    """Save base model + adapter as one plain SentenceTransformer folder (loads without this package).

    A `Router` sends queries through the base modules then `Dense(W, b)` + `Normalize`, and
    documents through the base modules only (shared, saved once). This reproduces
    `transform_queries` exactly when the base ends in `Normalize` (unit input norm); other
    bases are refused, since stock modules cannot restore an arbitrary input norm.
    """
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Router
    except ImportError:  # sentence-transformers 5.x
        from sentence_transformers.models import Dense, Normalize, Router

    base = encoder.model
    adapter.check_base(encoder.base_meta)
    modules = copy.deepcopy(list(base.children()))
    if not modules or not isinstance(modules[-1], Normalize):
        raise ValueError(f"{encoder.base_meta.name} does not end in a Normalize module: the exported query route "
                         "could not keep the adapter's norm-preserving output; use the adapter through mteb-steer")
    dim = base.get_sentence_embedding_dimension()
    if dim != adapter.dim:
        raise ValueError(f"adapter {adapter.tag} has dim {adapter.dim}, the base model {dim}")
    weight, offset = adapter.weight_matrix()
    dense = Dense(dim, dim, bias=offset is not None, activation_function=None, init_weight=weight,
                  init_bias=offset)
    router = Router.for_query_document(query_modules=[*modules, dense, Normalize()], document_modules=modules)
    model = SentenceTransformer(modules=[router], device="cpu", similarity_fn_name=base.similarity_fn_name,
                                prompts=base.prompts, default_prompt_name=base.default_prompt_name)
    out_dir = Path(out_dir)
    model.save(str(out_dir))
    return out_dir
