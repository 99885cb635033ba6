#!/usr/bin/env python
"""Benchmark: base models x steering configurations x tasks, through the path users use.

    python benchmark.py [--data-root DIR] [--quick] [--only PATTERN ...]
    python benchmark.py --scale [scale options]   # block-wise search at 100k / 1M / 8.8M passages
    python benchmark.py --encoding-backends [ARG ...]   # CPU encoding backends only (scripts/encoding_backends.py)

Every cell is a `SteerConfig` built into a model by `mteb_steer.pipeline.build_model` and
evaluated by `mteb_steer.results.evaluate_tasks` (mteb.evaluate + mteb's ResultCache) into
`./results/<org__model>/<revision>/`. A cell whose result file exists is read back, not
recomputed, so an interrupted run resumes where it stopped. Costs measured while a cell runs
(steering seconds, refinement time per query, adapter training time) are kept in
`results/benchmark/costs.json`, keyed by model name + revision + task.

Quality cells use the embedding cache (base vectors shared across configurations). The
steered/plain corpus-encoding ratio is measured separately, cold (no embedding cache), plain
and steered side by side in one process on the same corpus.

Outputs: the generated section of BENCHMARKS.md (between `<!-- benchmark:start -->` and
`<!-- benchmark:end -->`; the rest of the file is left alone) and plots under results/plots/.
Published comparator scores (mteb_steer.published) are shown in their own, marked table.

`--only` patterns select cells by id `model/configuration/task` (e.g. `minilm/fusion-mean/ArguAna`,
`'minilm/*/SciFact'`); a pattern without '/' matches any part (`lexical`, `ArguAna`, `mpnet`).
The plain cells of the selected model/task pairs always run too: deltas need them.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from mteb_steer.embedding_cache import CACHE_ENV, default_embedding_cache

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent
MARK_START, MARK_END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"
MODELS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "mpnet": "sentence-transformers/all-mpnet-base-v2"}
TASKS = ("SciFact", "ArguAna", "TRECDLPool")
QUICK_TASKS = ("SciFact", "ArguAna")
TEACHER = MODELS["mpnet"]  # embedding teacher for refinement (the larger offline model)
# Cold corpus-encoding speed on the 2-core benchmark CPU (SciFact passages, batch 32; BENCHMARKS.md).
# Without a GPU, a cell that would encode a corpus slower than CPU_BUDGET_MIN is skipped (--allow-slow runs it).
CPU_PASSAGES_PER_S = {MODELS["mpnet"]: 1.3}
CPU_BUDGET_MIN = 30
QUICK_TIMING_DOCS = 300
QUICK_TIMING_TASK = "ArguAna"  # full-coverage published bank: the fusion cost is not understated
# labels a step may name for a task (the lexical defaults name the TREC DL years of the pool)
TASK_LABEL_NAMES = {"TRECDLPool": {"TRECDLPool", "TRECDL2019", "TRECDL2020"}}
PUBLISHED_REPRODUCED = {"SciFact": 0.6451, "ArguAna": 0.5017}  # issue 5: plain MiniLM must match these
LLM_COST_KEYS = ("requests", "prompt_tokens", "completion_tokens", "seconds")  # looked up in bank metadata
PACKAGES = ("mteb", "sentence-transformers", "transformers", "torch", "numpy", "bm25s", "mteb-steer")


class Skip(Exception):
    """A cell that does not apply (e.g. no query bank for that corpus): reported, not an error."""


# -- configurations --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """A steering configuration: SteerConfig fields for a (model, task), or Skip."""

    name: str
    what: str
    quick: bool
    fields: Callable[[Cell], dict[str, Any]]


@dataclass(frozen=True)
class Cell:
    """One model x configuration x task; `bench` resolves banks and trains adapters on demand."""

    model: str
    recipe: Recipe
    task: str
    bench: Bench = field(compare=False, repr=False)

    @property
    def id(self) -> str:
        return f"{self.model}/{self.recipe.name}/{self.task}"

    def bank(self) -> str:
        path = self.bench.bank(self.task)
        if path is None:
            raise Skip(f"no query bank for the {self.task} corpus")
        return str(path)

    def adapter(self, kind: str) -> str:
        return str(self.bench.adapter(self.model, self.task, kind))

    def teacher(self) -> str:
        if self.bench.models[self.model] == TEACHER:
            raise Skip("the teacher would be the base model itself (no larger model offline)")
        return f"embedding:{TEACHER}"


RECIPES: tuple[Recipe, ...] = (
    Recipe("plain", "the frozen base model", True, lambda c: {}),
    Recipe("fusion-mean", "corpus fusion with generated queries: mean, alpha auto (label-free)", True,
           lambda c: {"query_bank": c.bank(), "fusion": "mean"}),
    Recipe("fusion-sum", "corpus fusion: sum, beta auto (label-free)", False,
           lambda c: {"query_bank": c.bank(), "fusion": "sum"}),
    Recipe("fusion-rotate", "corpus fusion: rotation, gamma auto (label-free)", False,
           lambda c: {"query_bank": c.bank(), "fusion": "rotate"}),
    Recipe("adapter-labelled", "linear query adapter trained on the task's train split (labels)", True,
           lambda c: {"adapter": c.adapter("labelled")}),
    Recipe("adapter-genq", "linear query adapter trained on generated queries (label-free)", True,
           lambda c: {"adapter": c.adapter("genq")}),
    Recipe("refine-gold", "ORACLE: test-time refinement taught by the test qrels (upper bound, not a result)",
           True, lambda c: {"refine_teacher": "gold"}),
    Recipe("refine-emb", "test-time refinement taught by all-mpnet-base-v2 (label-free)", False,
           lambda c: {"refine_teacher": c.teacher()}),
    Recipe("lexical", "BM25 (passages) + dense hybrid, default weight", True,
           lambda c: {"lexical": "bm25", "lexical_expand": False}),
    Recipe("lexical-expanded", "BM25 over passages + their generated queries, + dense", True,
           lambda c: {"lexical": "bm25", "query_bank": c.bank(), "lexical_expand": True}),
    Recipe("combo", "fusion-mean + lexical-expanded (label-free; fixed in advance, not picked on test scores)",
           True, lambda c: {"query_bank": c.bank(), "fusion": "mean", "lexical": "bm25", "lexical_expand": True}),
)


# -- results of cells ------------------------------------------------------------------------------
@dataclass
class Row:
    """One split of one cell as it goes into tables and plots."""

    cell: str
    model: str
    recipe: str
    task: str
    split: str
    ndcg: float
    recall: float | None
    labels: list[str]
    cost: dict[str, Any]


@dataclass
class Outcome:
    """What happened to a cell in this run: ran, read back (cached), skipped or failed."""

    cell: str
    status: str
    message: str = ""


def _split_costs(log: list[dict[str, Any]], split: str) -> dict[str, Any]:
    """The index and search seconds recorded for one split (the last call of each kind)."""
    index = next((c for c in reversed(log) if c["call"] == "index" and c["split"] == split), {})
    search = next((c for c in reversed(log) if c["call"] == "search" and c["split"] == split), {})
    return {"index": index, "search": search}


@contextlib.contextmanager
def _no_embedding_cache() -> Iterator[None]:
    """Hide `$MTEB_STEER_EMBEDDING_CACHE` so an encoder built inside encodes cold."""
    saved = os.environ.pop(CACHE_ENV, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[CACHE_ENV] = saved


# -- the benchmark ---------------------------------------------------------------------------------
class Bench:
    """Shared state of a run: paths, loaded encoders and tasks, banks, adapters, recorded costs."""

    def __init__(self, args: argparse.Namespace) -> None:
        from mteb_steer.pipeline import default_output_folder
        from mteb_steer.tasks import default_data_root

        self.args = args
        self.data_root = Path(args.data_root) if args.data_root else default_data_root()
        if self.data_root is None or not self.data_root.is_dir():
            raise SystemExit(f"benchmark: data root {self.data_root} not found (give --data-root DIR)")
        self.out = Path(args.output_folder) if args.output_folder else default_output_folder()
        self.work = self.out / "results" / "benchmark"
        self.costs_path, self.cells_path = self.work / "costs.json", self.work / "cells.json"
        self.costs: dict[str, Any] = json.loads(self.costs_path.read_text()) if self.costs_path.exists() else {}
        self.cells: dict[str, Any] = json.loads(self.cells_path.read_text()) if self.cells_path.exists() else {}
        self.models = dict(MODELS)
        self._encoders: dict[str, Any] = {}
        self._tasks: dict[str, Any] = {}

    def save(self) -> None:
        """Write the cost records and the cell -> result index (what lets later runs read cells back).

        Merged with what is on disk, so two runs on different cells (e.g. --only) keep each other's records.
        """
        self.work.mkdir(parents=True, exist_ok=True)
        for path, mine in ((self.costs_path, self.costs), (self.cells_path, self.cells)):
            on_disk = json.loads(path.read_text()) if path.exists() else {}
            timing = {**on_disk.get("encode_timing", {}), **mine.get("encode_timing", {})}
            mine.update({**on_disk, **mine, **({"encode_timing": timing} if timing else {})})
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(mine, indent=1, sort_keys=True) + "\n")
            tmp.replace(path)

    def adopt(self, key: str, name: str, encoder: Any) -> None:
        """Use an already loaded encoder (a comparator) as model `key`."""
        self.models[key] = name
        self._encoders = {key: encoder}

    def config(self, model: str, fields: dict[str, Any], *, cached: bool = True) -> Any:
        from mteb_steer.pipeline import SteerConfig

        return SteerConfig(model=self.models[model], device=self.args.device, batch_size=self.args.batch_size,
                           embedding_cache=self.args.embedding_cache if cached else None, **fields)

    def encoder(self, model: str) -> Any:
        """The quality-run encoder of `model` (with the embedding cache); one loaded at a time."""
        from mteb_steer.pipeline import build_encoder

        if model not in self._encoders:
            self._encoders.clear()
            gc.collect()
            self._encoders[model] = build_encoder(self.config(model, {}))
        return self._encoders[model]

    def task(self, name: str) -> Any:
        from mteb_steer.tasks import resolve_task

        if name not in self._tasks:
            self._tasks[name] = resolve_task(name, self.data_root)
        return self._tasks[name]

    def bank(self, task: str) -> Path | None:
        """The query bank of `task`'s corpus: ArguAna's published docT5query bank, else a generated
        `results/banks/<corpus folder>-*.jsonl.gz` (newest first); None when there is none."""
        from mteb_steer.tasks import LOCAL_FOLDERS

        folder = LOCAL_FOLDERS[task]
        published = self.data_root / f"{folder}-genq"
        if published.is_dir():
            return published
        generated = sorted((self.out / "results" / "banks").glob(f"{folder}-*.jsonl*"),
                           key=lambda p: p.stat().st_mtime, reverse=True)
        return generated[0] if generated else None

    def adapter(self, model: str, task: str, kind: str) -> Path:
        """The adapter folder for (model, task, kind), trained now when absent (seconds recorded beside it).

        kind "labelled": the task's own train split; "genq": the corpus's generated queries.
        """
        from mteb_steer.beir import available_splits
        from mteb_steer.steering.adapter import TRAINING_RECORD, pairs_from_split, train_and_save, training_pairs
        from mteb_steer.steering.banks import bank_fingerprint, load_bank
        from mteb_steer.tasks import LOCAL_FOLDERS

        bank = self.bank(task) if kind == "genq" else None
        # a generated bank grows while generation runs: an adapter is reused only for the same bank content
        version = f"-{bank_fingerprint(load_bank(bank))[:8]}" if bank is not None else ""
        folder = self.work / "adapters" / f"{model}-{task}-{kind}{version}"
        if (folder / TRAINING_RECORD).exists():
            return folder
        if kind == "labelled":
            if "train" not in available_splits(self.data_root / LOCAL_FOLDERS[task]):
                raise Skip(f"{task} has no labelled train split")
            pairs = pairs_from_split(task, "train", self.data_root)
        else:
            if bank is None:
                raise Skip(f"no query bank for the {task} corpus")
            pairs = training_pairs(task, query_bank=bank, data_root=self.data_root)
        train_and_save(self.encoder(model), pairs, folder, show_progress_bar=False)
        return folder

    # -- one cell ------------------------------------------------------------------------------
    def run(self, cell: Cell) -> Outcome:
        """Evaluate one cell (or read it back) and return its rows; never raises for one cell's failure."""
        from mteb.cache import ResultCache

        from mteb_steer.pipeline import build_encoder, build_model
        from mteb_steer.results import evaluate_tasks

        try:
            fields = cell.recipe.fields(cell)
            if fields.get("lexical"):
                fields["lexical_index_dir"] = str(self.work / "lexical")  # reuse BM25 indexes across cells
            config = self.config(cell.model, fields)
            task = self.task(cell.task)
            # the adapter lives in the encoder: an adapter cell gets its own (same cached base vectors)
            encoder = build_encoder(config) if config.adapter else self.encoder(cell.model)
            transforms = list(encoder.query_transforms)
            model = build_model(config, encoder=encoder, task=task)
            if list(encoder.query_transforms) != transforms:
                raise RuntimeError("build_model changed the shared encoder's query transforms")
            if fields and not model.steps:
                raise RuntimeError(f"build_model ignored the steering options {sorted(fields)}")
            meta = model.mteb_model_meta
            done = ResultCache(self.out).get_task_result_path(cell.task, meta).exists()
            if not done:
                teacher = str(fields.get("refine_teacher", ""))
                self.check_cpu_budget({self.models[cell.model]} | ({teacher[len("embedding:"):]}
                                      if teacher.startswith("embedding:") else set()), cell.task)
            started = time.perf_counter()
            evaluate_tasks(model, [task], self.out, batch_size=self.args.batch_size, show_progress_bar=False)
            base = set(encoder.base_meta.training_datasets or ())
            self.cells[cell.id] = {"name": meta.name, "revision": meta.revision, "task": cell.task,
                                   "labels": sorted(set(meta.training_datasets or ()) - base)}
            if not done:
                self.costs[f"{meta.name}@{meta.revision}/{cell.task}"] = {
                    "wall_s": time.perf_counter() - started, "calls": model.calls,
                    "adapter_training": self._adapter_training(fields),
                    "bank": self._bank_cost(fields.get("query_bank"))}
            self.save()
        except Skip as skip:
            return Outcome(cell.id, "skip", str(skip))
        except Exception as err:  # one broken cell must not stop the matrix; the report names it
            return Outcome(cell.id, "error", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        scores = ", ".join(f"{r.split} nDCG@10={r.ndcg:.4f}" for r in self.rows(cell.id))
        return Outcome(cell.id, "cached" if done else "ran", f"{meta.name}@{meta.revision}: {scores}")

    def rows(self, cell_id: str) -> list[Row]:
        """The rows of a cell from its result file (any run), with the costs recorded when it ran."""
        from mteb import TaskResult
        from mteb.cache import ResultCache

        entry = self.cells.get(cell_id)
        if entry is None:
            return []
        path = ResultCache(self.out).get_task_result_path(entry["task"], entry["name"], entry["revision"])
        if not path.exists():
            return []
        model, recipe, task = cell_id.split("/")
        cost = self.costs.get(f"{entry['name']}@{entry['revision']}/{task}", {})
        return [Row(cell_id, model, recipe, task, split, scores[0]["ndcg_at_10"], scores[0].get("recall_at_100"),
                    entry["labels"], {**cost, "split": _split_costs(cost.get("calls", []), split)})
                for split, scores in TaskResult.from_disk(path).scores.items()]

    def check_cpu_budget(self, model_names: set[str], task_name: str, limit: int | None = None,
                         passes: int = 1) -> None:
        """Skip (not fail) work that would encode `task_name`'s corpus (`passes` times) for hours on this CPU.

        A corpus whose vectors are already in the embedding cache costs nothing and is never skipped.
        """
        import torch

        slow = sorted(model_names & set(CPU_PASSAGES_PER_S))
        if not slow or self.args.allow_slow or (
                self.args.device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cpu":
            return
        from mteb_steer.backbone import resolve_backbone
        from mteb_steer.embedding_cache import EmbeddingCache
        from mteb_steer.encoder import SteerEncoder, dataset_passage_texts

        task = self.task(task_name)
        task.load_data()
        corpus = task.dataset["default"][task.metadata.eval_splits[0]]["corpus"]
        docs = min(len(corpus), limit) if limit else len(corpus)
        cache = EmbeddingCache(self.args.embedding_cache) if self.args.embedding_cache and not limit else None
        texts = dataset_passage_texts(corpus) if cache else []

        def cached(name: str) -> bool:  # the quality run would read this corpus's vectors from the cache
            if cache is None:  # checked first: resolving the model may join its weights on disk
                return False
            try:
                meta = resolve_backbone(name).meta
            except ImportError:  # not installed: the cell fails later with the install hint
                return False
            return cache.has(SteerEncoder.cache_key(meta, "document", texts))

        for name in slow:
            if cached(name):
                continue
            minutes = passes * docs / CPU_PASSAGES_PER_S[name] / 60
            if minutes > CPU_BUDGET_MIN:
                raise Skip(f"{name} encodes about {CPU_PASSAGES_PER_S[name]} passages/s on a 2-core CPU: "
                           f"{passes} x {docs:,} passages would take about {minutes:.0f} min "
                           "(run on a GPU, or --allow-slow)")

    @staticmethod
    def _adapter_training(fields: dict[str, Any]) -> dict[str, Any] | None:
        from mteb_steer.steering.adapter import TRAINING_RECORD

        path = Path(fields["adapter"]) / TRAINING_RECORD if fields.get("adapter") else None
        return json.loads(path.read_text()) if path and path.exists() else None

    @staticmethod
    def _bank_cost(bank: str | None) -> dict[str, Any] | None:
        """LLM cost of a bank from its metadata line (requests, tokens, seconds) where recorded."""
        from mteb_steer.steering.banks import load_bank_metadata

        if bank is None:
            return None
        if Path(bank).is_dir():
            return {"source": f"{Path(bank).name} (published, generated elsewhere: no LLM cost here)"}
        metadata = load_bank_metadata(bank)
        found: dict[str, Any] = {"source": Path(bank).name}
        if "passages" in metadata and "passages_with_queries" in metadata:
            found["coverage"] = f"{metadata['passages_with_queries']:,}/{metadata['passages']:,} passages"

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    if k in LLM_COST_KEYS and isinstance(v, int | float):
                        found.setdefault(k, v)
                    walk(v)
        walk(metadata)
        return found

    # -- cold corpus encoding: plain vs steered, side by side ------------------------------------
    def encode_timing(self, model: str, task_name: str, limit: int | None) -> dict[str, Any] | None:
        """Cold index() seconds of plain, fusion-mean and combo on the same corpus, one process."""
        from mteb.types import PromptType

        from mteb_steer.pipeline import build_encoder, build_model

        bank = self.bank(task_name)
        if bank is None:
            return None
        record_key = f"{model}/{task_name}/{limit or 'all'}"
        if record_key in self.costs.get("encode_timing", {}) and not self.args.retime:
            return self.costs["encode_timing"][record_key]
        self.check_cpu_budget({self.models[model]}, task_name, limit, passes=3)  # plain, fusion-mean, combo
        task = self.task(task_name)
        task.load_data()
        split = task.metadata.eval_splits[0]
        corpus = task.dataset["default"][split]["corpus"]
        if limit:
            corpus = corpus.select(range(min(limit, len(corpus))))
        with _no_embedding_cache():
            encoder = build_encoder(self.config(model, {}, cached=False))
            encoder.embed(["warm-up"], PromptType.document)
            configs = {"plain": {}, "fusion-mean": {"query_bank": str(bank), "fusion": "mean"},
                       "combo": {"query_bank": str(bank), "fusion": "mean", "lexical": "bm25", "lexical_expand": True}}
            seconds: dict[str, dict[str, float]] = {}
            for name, fields in configs.items():
                steered = build_model(self.config(model, fields, cached=False), encoder=encoder)
                if fields and not steered.steps:
                    raise RuntimeError(f"build_model ignored {sorted(fields)}: cannot time steering")
                steered.index(corpus, task_metadata=task.metadata, hf_split=split, hf_subset="default",
                              encode_kwargs={"batch_size": self.args.batch_size})
                seconds[name] = dict(steered.timings)
        record = {"docs": len(corpus), "bank": bank.name, "seconds": seconds,
                  "note": "cold: no embedding cache; generated queries read from the bank (no LLM calls)"}
        self.costs.setdefault("encode_timing", {})[record_key] = record
        self.save()
        return record


# -- cell selection --------------------------------------------------------------------------------
def _matches(cell_id: str, pattern: str) -> bool:
    if "/" in pattern:
        return fnmatch.fnmatchcase(cell_id, pattern)
    return any(fnmatch.fnmatchcase(part, pattern) for part in cell_id.split("/"))


def select_cells(bench: Bench, quick: bool, only: list[str] | None) -> list[Cell]:
    """The matrix (or its quick part), filtered by `only`, plus the plain cell of every selected pair."""
    models = ["minilm"] if quick else list(MODELS)
    tasks = QUICK_TASKS if quick else TASKS
    recipes = [r for r in RECIPES if r.quick or not quick]
    cells = [Cell(m, r, t, bench) for m in models for t in tasks for r in recipes]
    if only:
        chosen = [c for c in cells if any(_matches(c.id, p) for p in only)]
        pairs = {(c.model, c.task) for c in chosen}
        cells = [c for c in cells if c in chosen or (c.recipe.name == "plain" and (c.model, c.task) in pairs)]
    return cells


# -- report ----------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _delta(value: float | None, base: float | None) -> str:
    return "-" if value is None or base is None else f"{value - base:+.4f}"


# keys of a SteerSearch call record (`model.calls`) that are not a steering step's seconds
NOT_STEPS = {"call", "task", "split", "n", "encode_corpus_s", "encode_queries_s", "score_s"}


def _steering_seconds(row: Row) -> float | None:
    """Seconds spent in steering steps for this split (index steps + query steps), warm embedding cache."""
    split = row.cost.get("split", {})
    if not split.get("index") and not split.get("search"):
        return None
    steps = [v for part in ("index", "search") for k, v in split.get(part, {}).items() if k not in NOT_STEPS]
    return sum(steps) if steps else None


def _query_step_ms(row: Row) -> float | None:
    search = row.cost.get("split", {}).get("search", {})
    steps = [v for k, v in search.items() if k not in NOT_STEPS]
    return 1000 * sum(steps) / search["n"] if steps and search.get("n") else None


def _llm_cost(row: Row) -> str:
    bank = row.cost.get("bank")
    if not bank:
        return "-"
    coverage = f" (bank: {bank['coverage']})" if "coverage" in bank else ""
    if "requests" not in bank:
        return ("not recorded" if "published" not in bank["source"] else "external (published bank)") + coverage
    tokens = bank.get("prompt_tokens", 0) + bank.get("completion_tokens", 0)
    return f"{bank['requests']:,} req / {tokens:,} tok" + coverage


def _uses_task_labels(row: Row) -> bool:
    return bool(TASK_LABEL_NAMES.get(row.task, {row.task}) & set(row.labels))


def _labels(row: Row) -> str:
    if not row.labels:
        return "none"
    return ", ".join(row.labels) + (" **(this task's labels)**" if _uses_task_labels(row) else "")


def quality_tables(rows: list[Row], command: Callable[[str], str]) -> list[str]:
    """One markdown table per task/split: quality, delta to plain, labels used, costs, command."""
    out: list[str] = []
    plain = {(r.model, r.task, r.split): r for r in rows if r.recipe == "plain"}
    for task, split in sorted({(r.task, r.split) for r in rows}, key=lambda ts: (TASKS.index(ts[0]), ts[1])):
        out += [f"#### {task} ({split})", "",
                "| model | configuration | labels used | nDCG@10 | Δ plain | R@100 | Δ plain | LLM cost (bank) "
                "| steering s | query steps ms/q | adapter fit s | command |",
                "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|"]
        for r in [r for r in rows if (r.task, r.split) == (task, split)]:
            base = plain.get((r.model, r.task, r.split))
            fit = (r.cost.get("adapter_training") or {}).get("seconds")
            out.append(f"| {r.model} | {r.recipe} | {_labels(r)} | {_fmt(r.ndcg)} | "
                       f"{_delta(r.ndcg, base.ndcg if base else None)} | {_fmt(r.recall)} | "
                       f"{_delta(r.recall, base.recall if base else None)} | {_llm_cost(r)} | "
                       f"{_fmt(_steering_seconds(r), 1)} | {_fmt(_query_step_ms(r), 1)} | {_fmt(fit, 1)} | "
                       f"`{command(r.cell)}` |")
        out.append("")
    return out


def timing_table(timings: dict[str, dict[str, Any]]) -> list[str]:
    if not timings:
        return ["No cold encoding timing in this run (no task with a query bank selected)."]
    out = ["| model / task | docs | configuration | cold index s | of which base encoding s | ratio to plain |",
           "|---|---:|---|---:|---:|---:|"]
    for key, record in timings.items():
        plain_total = sum(record["seconds"]["plain"].values())
        for name, parts in record["seconds"].items():
            total = sum(parts.values())
            out.append(f"| {key} | {record['docs']:,} | {name} | {total:.1f} | {parts.get('encode_corpus_s', 0):.1f} "
                       f"| {total / plain_total:.2f}x |")
    return out + ["", "Cold: no embedding cache, generated queries read from the bank (no LLM calls); plain and "
                  "steered indexed one after the other in the same process on the same corpus."]


def published_table(tasks: list[str], comparators: dict[str, str]) -> list[str]:
    import mteb

    from mteb_steer.published import NOT_FOUND, published_scores

    out = ["**PUBLISHED numbers, not measured here** (copied from the MTEB results files linked; other "
           "mteb versions and hardware).", "",
           "| model | task | nDCG@10 (published) | R@100 (published) | MSMARCO in registry training data | source |",
           "|---|---|---:|---:|---|---|"]
    for p in published_scores(tasks):
        try:
            marco = "yes" if "MSMARCO" in (mteb.get_model_meta(p.model).training_datasets or ()) else "no"
        except KeyError:
            marco = "?"
        out.append(f"| {p.model} | {p.task} | {p.ndcg_at_10:.4f} | {_fmt(p.recall_at_100)} | {marco} | "
                   f"[{p.repo}: {p.path}]({p.url}) (mteb {p.mteb_version}) |")
    out += ["", "Not found (no number shown): "
            + "; ".join(f"{m} on {t if t != '*' else 'any task'}: {why}" for (m, t), why in NOT_FOUND.items()) + ".",
            "", "Comparators tried for measurement in this run: "
            + ("; ".join(f"{name}: {status}" for name, status in comparators.items())
               or "none (only full runs without --only try to load them)") + "."]
    return out


def machine_lines(started: float) -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    mem = next((int(line.split()[1]) / 2**20 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0.0) if Path("/proc/meminfo").exists() else 0.0
    versions = []
    for pkg in PACKAGES:
        try:
            versions.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            versions.append(f"{pkg} -")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    return [f"- machine: {cpu}, {os.cpu_count()} CPU cores, {mem:.0f} GiB RAM, no GPU used; {platform.platform()}",
            f"- Python {platform.python_version()}; {', '.join(versions)}",
            f"- git commit {commit.strip() or '-'} (plus uncommitted changes, if any); "
            f"run finished {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, wall time {time.time() - started:.0f} s"]


PLOT_COLORS = {"plain": "#8c8c8c", "label-free": "#4c72b0", "other-labels": "#8fb3e0", "labels": "#c44e52"}
PLOT_KINDS = {"label-free": "steered, label-free", "other-labels": "steered, defaults tuned on other labelled data",
              "labels": "steered, uses this task's labels (oracle / train split)"}


def _kind(row: Row) -> str:
    if row.recipe == "plain":
        return "plain"
    return "labels" if _uses_task_labels(row) else "other-labels" if row.labels else "label-free"


def _place_labels(ax: Any, points: list[tuple[float, float, str]], fontsize: int = 7) -> None:
    """Annotate points, nudging each label up until it clears the labels already placed (no overlaps)."""
    ax.figure.canvas.draw()
    placed: list[tuple[float, float, float, float]] = []  # display-space boxes
    for x, y, text in sorted(points, key=lambda p: (p[1], p[0])):
        px, py = ax.transData.transform((x, y))
        width, height = 0.55 * fontsize * len(text), 1.25 * fontsize
        dy = 2.0
        while any(px + 4 < bx1 and bx0 < px + 4 + width and py + dy < by1 and by0 < py + dy + height
                  for bx0, by0, bx1, by1 in placed):
            dy += height * 0.8
        placed.append((px + 4, py + dy, px + 4 + width, py + dy + height))
        ax.annotate(text, (x, y), fontsize=fontsize, xytext=(4, dy * 72 / ax.figure.dpi),
                    textcoords="offset points",
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey"} if dy > 2.0 else None)


def plots(rows: list[Row], out_dir: Path) -> list[Path]:
    """Quality per task/configuration, and nDCG@10 gain vs steering seconds; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from mteb_steer.published import published_scores

    out_dir.mkdir(parents=True, exist_ok=True)
    panels = sorted({(r.task, r.split) for r in rows}, key=lambda ts: (TASKS.index(ts[0]), ts[1]))
    if not panels:
        return []
    bars = {panel: [(f"{r.model}: {r.recipe}", r.ndcg, PLOT_COLORS[_kind(r)], "") for r in rows
                    if (r.task, r.split) == panel]
            + [(f"{p.model.split('/')[-1]} (PUBLISHED)", p.ndcg_at_10, "white", "///")
               for p in published_scores([panel[0]])] for panel in panels}
    height = max(len(b) for b in bars.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(max(9.0, 4.6 * len(panels) + 1.5), 0.3 * height + 1.8),
                             squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        labels, values, colors, hatches = zip(*bars[panel], strict=True)
        ax.barh(range(len(values)), values, color=colors, hatch=hatches, edgecolor="black", linewidth=0.5)
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:.3f}", va="center", fontsize=7)
        ax.set_yticks(range(len(values)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.06))
        ax.set_xlabel("nDCG@10")
        ax.set_title(f"{panel[0]} ({panel[1]} split)", fontsize=10)
    fig.legend(handles=[Patch(facecolor=PLOT_COLORS["plain"], label="plain base model"),
                        *(Patch(facecolor=PLOT_COLORS[k], label=text) for k, text in PLOT_KINDS.items()),
                        Patch(facecolor="white", hatch="///", edgecolor="black", label="published, not measured")],
               loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle("Retrieval quality per configuration (measured on this machine unless marked PUBLISHED)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    quality = out_dir / "benchmark_quality.png"
    fig.savefig(quality, dpi=120, bbox_inches="tight")
    plt.close(fig)

    plain = {(r.model, r.task, r.split): r.ndcg for r in rows if r.recipe == "plain"}
    fig, ax = plt.subplots(figsize=(10, 6.5))
    markers = {"SciFact": "o", "ArguAna": "s", "TRECDLPool": "^"}
    several_models = len({r.model for r in rows}) > 1
    points: list[tuple[float, float, str]] = []
    for r in rows:
        if r.recipe == "plain" or (r.model, r.task, r.split) not in plain:
            continue
        seconds = (_steering_seconds(r) or 0.0) + (r.cost.get("adapter_training") or {}).get("seconds", 0.0)
        gain = r.ndcg - plain[(r.model, r.task, r.split)]
        ax.scatter(seconds, gain, marker=markers.get(r.task, "x"), color=PLOT_COLORS[_kind(r)], s=45,
                   edgecolor="black", linewidth=0.4, zorder=3)
        where = ", ".join([*([r.model] if several_models else []), *([r.split] if r.split != "test" else [])])
        points.append((seconds, gain, r.recipe + (f" ({where})" if where else "")))
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=0)
    _place_labels(ax, points)
    ax.set_xlabel("extra compute for steering, seconds (index + query steps + adapter fitting; symlog scale)")
    ax.set_ylabel("nDCG@10 gain over the plain base model")
    ax.set_title("Quality gain vs cost (marker: task; colour: what labels the steering used)", fontsize=11)
    ax.legend(handles=[*(plt.Line2D([], [], marker=m, ls="", color="black", label=t) for t, m in markers.items()),
                       *(Patch(color=PLOT_COLORS[k], label=text) for k, text in PLOT_KINDS.items())],
              fontsize=8, loc="upper left")
    fig.tight_layout()
    gain = out_dir / "benchmark_gain_vs_cost.png"
    fig.savefig(gain, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return [quality, gain]


def write_section(path: Path, lines: list[str]) -> None:
    """Replace the text between the markers in `path` (appending markers when absent); the rest stays."""
    text = path.read_text() if path.exists() else ""
    block = "\n".join([MARK_START, *lines, MARK_END])
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        text = head + block + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)


def _cell_order(cell_id: str) -> tuple[int, str, int, int]:
    model, recipe, task = cell_id.split("/")
    names = [r.name for r in RECIPES]
    return (list(MODELS).index(model) if model in MODELS else len(MODELS), model,
            TASKS.index(task) if task in TASKS else len(TASKS), names.index(recipe) if recipe in names else len(names))


def report(bench: Bench, outcomes: list[Outcome], timings: dict[str, Any], comparators: dict[str, str],
           started: float, quick: bool) -> list[str]:
    """The generated BENCHMARKS.md section: every cell with a result (this run or earlier ones)."""
    rows = [row for cell_id in sorted(bench.cells, key=_cell_order) for row in bench.rows(cell_id)]
    extra = f" --data-root {shlex.quote(str(bench.args.data_root))}" if bench.args.data_root else ""

    def command(cell_id: str) -> str:
        return f"python benchmark.py{extra} --only {cell_id}"

    argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
    pngs = plots(rows, bench.out / "results" / "plots")
    lines = ["## Benchmark: steering vs plain vs fine-tuned (generated by benchmark.py)", "",
             f"Generated by `python benchmark.py {argv}`"
             + (" (**quick run: a subset of the matrix was computed**)" if quick else "")
             + ". Cells not computed in this run are read back from earlier runs (`results/benchmark/cells.json` "
             "maps each cell to its result). Each row's `command` re-runs (or reads back) exactly that cell; results "
             "are in `results/<org__model>/<revision>/<Task>.json` (mteb layout), costs in "
             "`results/benchmark/costs.json`.",
             "", *machine_lines(started), "", "### Measured quality", "",
             "Δ plain: difference to the plain base model on the same task. `labels used`: labelled data the "
             "steering was fitted on (model meta `training_datasets` beyond the base model's); rows using the "
             "evaluated task's own labels are not comparable results (`refine-gold` is an oracle upper bound). "
             "`steering s`: seconds in steering steps (index + search) with the embedding cache warm; "
             "`query steps ms/q`: per-query time of query-side steps (refinement); `adapter fit s`: fitting the "
             "adapter on cached vectors.", ""]
    lines += quality_tables(rows, command)
    for task, target in PUBLISHED_REPRODUCED.items():
        got = next((r.ndcg for r in rows if (r.model, r.recipe, r.task) == ("minilm", "plain", task)), None)
        if got is not None:
            verdict = "reproduced" if abs(got - target) <= 0.001 else "NOT reproduced"
            lines.append(f"- plain all-MiniLM-L6-v2 on {task}: {got:.4f} vs MTEB's published {target}: {verdict}")
    lines += ["", "### Configurations", ""] + [f"- `{r.name}`: {r.what}" for r in RECIPES]
    skipped = [o for o in outcomes if o.status in ("skip", "error")]
    if skipped:
        lines += ["", "### Cells not measured", ""] + [f"- `{o.cell}`: {o.status}: {o.message}" for o in skipped]
    lines += ["", "### Corpus encoding cost, steered vs plain (cold)", "", *timing_table(timings),
              "", "### Published comparators (not measured here)", "", *published_table(list(TASKS), comparators),
              "", "### Plots", ""] + [f"![{p.stem}]({p.relative_to(bench.out).as_posix()})" for p in pngs]
    return lines


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None, help="folder with scifact/, arguana/, arguana-genq/, "
                        "msmarco-trec-dl-pool/ (default $MTEB_STEER_DATA_ROOT or ../shared/datasets)")
    parser.add_argument("--quick", action="store_true",
                        help=f"MiniLM on {', '.join(QUICK_TASKS)}, the cheaper configurations, cached banks, "
                             f"cold timing on {QUICK_TIMING_DOCS} {QUICK_TIMING_TASK} passages")
    parser.add_argument("--only", nargs="+", default=None, metavar="PATTERN",
                        help="run only cells whose id model/configuration/task matches (see above)")
    parser.add_argument("--output-folder", default=None, help="where results/ lives (default: current dir)")
    parser.add_argument("--benchmarks-md", default=None, help="file to write the section into (default: "
                        "<output-folder>/BENCHMARKS.md)")
    parser.add_argument("--embedding-cache", default=default_embedding_cache(),
                        help="base-embedding cache for quality cells (timing runs never use it)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-timing", action="store_true", help="skip the cold encoding timing")
    parser.add_argument("--timing-docs", type=int, default=None, metavar="N",
                        help=f"time cold encoding on the first N passages of each corpus (default: all; "
                             f"--quick: {QUICK_TIMING_DOCS} {QUICK_TIMING_TASK} passages)")
    parser.add_argument("--retime", action="store_true", help="re-measure the cold encoding timing")
    parser.add_argument("--allow-slow", action="store_true",
                        help=f"on CPU, also run cells whose corpus encoding would exceed {CPU_BUDGET_MIN} min "
                             "(all-mpnet-base-v2 on ArguAna and the TREC-DL pool)")
    parser.add_argument("--encoding-backends", nargs=argparse.REMAINDER, default=None, metavar="ARG",
                        help="only run scripts/encoding_backends.py (CPU backends: throughput and nDCG@10 vs torch "
                             "float32), passing any ARGs after the flag on to it")
    parser.add_argument("--online", action="store_true",
                        help="allow Hugging Face hub downloads, so comparators can be measured (default: offline)")
    parser.add_argument("--faults", action="store_true",
                        help="run the fault suite instead (scripts/fault_suite.py): RELIABILITY.md + "
                             "results/reliability/faults.json")
    args = parser.parse_args(argv)
    if args.quick and args.timing_docs is None:
        args.timing_docs = QUICK_TIMING_DOCS
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--scale" in argv:  # the synthetic scale benchmark (issue 12): its own script and options
        from scripts.scale_benchmark import main as scale_main

        return scale_main([a for a in argv if a != "--scale"])
    args = parse_args(argv)
    if args.encoding_backends is not None:
        return subprocess.call([sys.executable, str(REPO / "scripts" / "encoding_backends.py"),
                                *(["--data-root", args.data_root] if args.data_root else []),
                                *(["--output-folder", args.output_folder] if args.output_folder else []),
                                "--embedding-cache", args.embedding_cache, *args.encoding_backends])
    if args.faults:
        sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
        from fault_suite import main as fault_suite

        return fault_suite([])
    if not args.online:
        os.environ["HF_HUB_OFFLINE"] = "1"
    from tqdm.auto import tqdm

    from mteb_steer.published import COMPARATORS, load_comparator

    started = time.time()
    bench = Bench(args)
    cells = select_cells(bench, args.quick, args.only)
    if not cells:
        raise SystemExit(f"benchmark: no cell matches {args.only}")
    outcomes: list[Outcome] = []
    bar = tqdm(cells, desc="benchmark", unit="cell")
    for cell in bar:
        bar.set_postfix_str(cell.id)
        outcome = bench.run(cell)
        outcomes.append(outcome)
        tqdm.write(f"{cell.id}: {outcome.status} {outcome.message}")

    comparators: dict[str, str] = {}
    if not args.only and not args.quick:
        for name in COMPARATORS:
            loaded = load_comparator(name, device=args.device, cache_dir=args.embedding_cache)
            if isinstance(loaded, str):
                comparators[name] = f"not loadable ({loaded}): published numbers shown"
                continue
            key = name.split("/")[-1]
            bench.adopt(key, name, loaded)
            for task in TASKS:
                outcome = bench.run(Cell(key, RECIPES[0], task, bench))
                outcomes.append(outcome)
                tqdm.write(f"{outcome.cell}: {outcome.status} {outcome.message}")
            comparators[name] = "measured (rows above)"

    timings: dict[str, Any] = {}
    if not args.no_timing:
        timing_tasks = [QUICK_TIMING_TASK] if args.quick else TASKS
        for model in [m for m in MODELS if m in {cell.model for cell in cells}]:
            for task in [t for t in timing_tasks if t in {cell.task for cell in cells}]:
                try:
                    record = bench.encode_timing(model, task, args.timing_docs)
                except Skip as skip:
                    outcomes.append(Outcome(f"timing {model}/{task}", "skip", str(skip)))
                    continue
                except Exception as err:  # a timing failure is reported, the quality tables still get written
                    outcomes.append(Outcome(f"timing {model}/{task}", "error", f"{type(err).__name__}: {err}"))
                    continue
                if record is not None:
                    timings[f"{model} / {task}"] = record
    target = Path(args.benchmarks_md) if args.benchmarks_md else bench.out / "BENCHMARKS.md"
    if args.only and not args.benchmarks_md:  # a partial report would drop every other cell and the timings
        print(f"benchmark: --only run: {target}'s generated section left as it was (its rows come from "
              f"results/benchmark/cells.json; pass --benchmarks-md FILE to write this run's partial report)")
    else:
        write_section(target, report(bench, outcomes, timings, comparators, started, args.quick))
    errors = [o for o in outcomes if o.status == "error"]
    print(f"benchmark: {len(outcomes)} cells ({sum(o.status == 'ran' for o in outcomes)} ran, "
          f"{sum(o.status == 'cached' for o in outcomes)} read back, {sum(o.status == 'skip' for o in outcomes)} "
          f"skipped, {len(errors)} errors) in {time.time() - started:.0f} s; wrote {target}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
