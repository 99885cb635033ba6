"""Task lookup: MTEB task names resolve to local BEIR copies first, then to mteb's own (hub) task.

A local copy keeps mteb's task class (same metadata, splits, `ignore_identical_ids`, scores),
only `load_data` reads the folder. Any other BEIR folder is evaluated by path as a generic
retrieval task; the MS MARCO TREC-DL pool gets a name nobody mistakes for MTEB's MSMARCO.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from pathlib import Path
from typing import Any

import datasets
import mteb
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata

from mteb_steer.beir import DataFolderError, available_splits, find_file, load_beir_split

DATA_ROOT_ENV = "MTEB_STEER_DATA_ROOT"

# MTEB task name -> folder name under a data root
LOCAL_FOLDERS = {"SciFact": "scifact", "ArguAna": "arguana", "TRECDLPool": "msmarco-trec-dl-pool"}


def default_data_root() -> Path | None:
    """`$MTEB_STEER_DATA_ROOT`, else `../shared/datasets` next to the working directory when present."""
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env)
    guess = Path.cwd().parent / "shared" / "datasets"
    return guess if guess.is_dir() else None


def _split_data(folder: Path, split: str) -> RetrievalSplitData:
    beir = load_beir_split(folder, split)
    return RetrievalSplitData(
        corpus=datasets.Dataset.from_list(beir.corpus),
        queries=datasets.Dataset.from_list(beir.queries),
        relevant_docs=beir.qrels,
        top_ranked=None,
    )


def check_folder(folder: Path) -> None:
    """Fail fast, in one line, on a folder that is not a BEIR folder (no corpus, queries or qrels)."""
    missing = [f"{stem}.jsonl[.gz]" for stem in ("corpus", "queries")
               if not any((folder / f"{stem}{ext}").exists() for ext in (".jsonl", ".jsonl.gz"))]
    if not available_splits(folder):
        missing.append("qrels/<split>.tsv")
    if missing:
        raise DataFolderError(f"{folder} is not a BEIR folder: missing {', '.join(missing)} (a BEIR folder holds "
                              "corpus.jsonl, queries.jsonl and qrels/<split>.tsv)")


def folder_fingerprint(folder: Path) -> str:
    """12 hex digits naming a folder's full path and its data files' sizes and times.

    Part of a folder task's name, so two folders with the same base name (or one folder whose
    files changed) never share a result file; cheap for a corpus of millions (no file is read).
    """
    folder = folder.resolve()
    digest = hashlib.sha256(str(folder).encode())
    for path in sorted([*folder.glob("*.jsonl*"), *(folder / "qrels").glob("*.tsv")]):
        stat = path.stat()
        digest.update(f"\0{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


class _LocalLoadMixin:
    """Replaces mteb's hub download with a read of a BEIR folder; everything else is the task's own."""

    data_folder: Path

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self.dataset = {"default": {split: _split_data(self.data_folder, split) for split in self.eval_splits}}
        self.dataset_transform(num_proc=num_proc)
        self.data_loaded = True


def local_copy(task: AbsTaskRetrieval, folder: Path) -> AbsTaskRetrieval:
    """The same mteb task, reading its data from `folder` (checked now, before any model work)."""
    check_folder(folder)
    for split in task.eval_splits:
        if split not in available_splits(folder):
            raise DataFolderError(f"{folder}: {task.metadata.name} needs qrels/{split}.tsv")
    cls = type(task.__class__.__name__, (_LocalLoadMixin, task.__class__), {"data_folder": folder})
    return cls()


class BeirFolderTask(_LocalLoadMixin, AbsTaskRetrieval):
    """A retrieval task over any BEIR folder; splits are its qrels files unless given."""

    def __init__(self, folder: str | Path, name: str | None = None, splits: list[str] | None = None,
                 description: str | None = None, ignore_identical_ids: bool = False, **kwargs: Any) -> None:
        self.data_folder = Path(folder)
        check_folder(self.data_folder)
        splits = splits or [s for s in available_splits(self.data_folder) if s != "train"] or ["test"]
        fingerprint = folder_fingerprint(self.data_folder)
        self._metadata = TaskMetadata(
            name=name or f"Local{self.data_folder.name.title().replace('-', '')}-{fingerprint}",
            description=description or f"Local BEIR folder {self.data_folder.resolve()}",
            reference=None,
            dataset={"path": str(self.data_folder.resolve()), "revision": fingerprint},
            type="Retrieval",
            category="t2t",
            modalities=["text"],
            eval_splits=splits,
            eval_langs=["eng-Latn"],
            main_score="ndcg_at_10",
            date=None,
            domains=None,
            task_subtypes=None,
            license=None,
            annotations_creators=None,
            dialect=None,
            sample_creation=None,
            bibtex_citation=None,
        )
        self.ignore_identical_ids = ignore_identical_ids
        super().__init__(**kwargs)

    # mteb keeps task metadata on the class and pops instance overrides in `unload_data`;
    # a folder task's metadata is per instance, so it lives behind a property that survives that.
    @property
    def metadata(self) -> TaskMetadata:
        return self._metadata

    @metadata.setter
    def metadata(self, value: TaskMetadata) -> None:
        self._metadata = value


def trec_dl_pool(folder: Path) -> BeirFolderTask:
    """MS MARCO passages pooled for TREC DL 2019/2020, graded 0-3: a pool, not MTEB's MSMARCO."""
    return BeirFolderTask(
        folder,
        name="TRECDLPool",
        splits=["dl19", "dl20"],
        description=(
            "MS MARCO v1 passages pooled (top-100 of six retrievers) for the TREC DL 2019 (dl19) and "
            "2020 (dl20) queries, official graded judgements. Scores compare systems on this pool only; "
            "they are not MS MARCO leaderboard numbers."
        ),
    )


def resolve_task(name_or_path: str, data_root: str | Path | None = None) -> AbsTaskRetrieval:
    """A task from an MTEB name (local copy first) or a BEIR folder path; unknown names get suggestions."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return BeirFolderTask(path)
    if os.sep in name_or_path or path.exists():
        raise DataFolderError(f"task {name_or_path!r} is not an existing folder (give a BEIR folder or an MTEB task name)")
    root = Path(data_root) if data_root else default_data_root()
    if root is not None and not root.is_dir():
        raise DataFolderError(f"data root {root} does not exist")
    folder_name = LOCAL_FOLDERS.get(name_or_path)
    if name_or_path == "TRECDLPool":
        if root is None or not (root / folder_name).is_dir():
            raise DataFolderError(f"TRECDLPool needs {folder_name}/ under the data root ({root})")
        return trec_dl_pool(root / folder_name)
    try:
        task = mteb.get_task(name_or_path)
    except KeyError:
        names = list(dict.fromkeys([*LOCAL_FOLDERS, *(t.metadata.name for t in mteb.get_tasks(task_types=["Retrieval"]))]))
        close = difflib.get_close_matches(name_or_path, names, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown task {name_or_path!r}: not an MTEB task name nor a folder.{hint}") from None
    if folder_name and root is not None and (root / folder_name).is_dir():
        return local_copy(task, root / folder_name)
    _check_hub_task(task, folder_name)
    return task


def _check_hub_task(task: AbsTaskRetrieval, folder_name: str | None) -> None:
    """A hub task needs network unless the hub cache holds it: say so at once, with the local way."""
    from mteb_steer.hub import hub_cache_has, hub_offline_reason

    repo = task.metadata.dataset.get("path", "")
    if not repo or hub_cache_has(repo, kind="dataset"):
        return
    reason = hub_offline_reason()
    if reason:
        local = f"<data-root>/{folder_name}/" if folder_name else "a BEIR folder"
        raise DataFolderError(f"task {task.metadata.name} is not available offline ({reason}): MTEB hub tasks need "
                              f"network; use a local copy: pass {local} with -t PATH, or --data-root DIR holding "
                              f"{', '.join(f'{f}/' for f in LOCAL_FOLDERS.values())}")
