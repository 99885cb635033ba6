"""Read a BEIR-layout folder (`corpus.jsonl[.gz]`, `queries.jsonl[.gz]`, `qrels/<split>.tsv`), checked.

Every problem is reported before any model work starts, naming the file and the offending id.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


logger = logging.getLogger(__name__)


class DataFolderError(ValueError):
    """A BEIR folder is missing a file or holds inconsistent ids."""


def find_file(folder: Path, stem: str) -> Path:
    """`stem.jsonl` or `stem.jsonl.gz` inside folder, or a clear error."""
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        if (folder / name).exists():
            return folder / name
    raise DataFolderError(f"{folder}: missing {stem}.jsonl or {stem}.jsonl.gz")


def read_jsonl(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataFolderError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """`query-id corpus-id score` TSV (with header) -> {query_id: {doc_id: score}}."""
    if not path.exists():
        raise DataFolderError(f"missing qrels file {path}")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise DataFolderError(f"{path} is empty")
        for row_no, row in enumerate(reader, 2):
            if len(row) < 3:
                raise DataFolderError(f"{path}:{row_no}: expected 3 tab-separated columns, got {row!r}")
            qrels.setdefault(row[0], {})[row[1]] = int(float(row[2]))
    return qrels


@dataclass
class BeirSplit:
    """One split of a BEIR folder: corpus rows, the queries that have qrels, and the qrels."""

    corpus: list[dict[str, str]]  # id, title, text
    queries: list[dict[str, str]]  # id, text
    qrels: dict[str, dict[str, int]]


def available_splits(folder: Path) -> list[str]:
    return sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))


def read_corpus(folder: str | Path) -> list[dict[str, str]]:
    """The corpus rows (`id`, `title`, `text`) of a BEIR folder, checked non-empty with unique ids."""
    corpus_path = find_file(Path(folder), "corpus")
    corpus = [{"id": str(r["_id"]), "title": r.get("title") or "", "text": r.get("text") or ""}
              for r in read_jsonl(corpus_path)]
    if not corpus:
        raise DataFolderError(f"{corpus_path}: the corpus is empty")
    seen: set[str] = set()
    for row in corpus:
        if row["id"] in seen:
            raise DataFolderError(f"{corpus_path}: duplicate document id {row['id']!r}")
        seen.add(row["id"])
    return corpus


def load_beir_split(folder: str | Path, split: str) -> BeirSplit:
    """Load and validate one split; raises DataFolderError naming the problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFolderError(f"data folder {folder} does not exist")
    queries_path = find_file(folder, "queries")
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.exists():
        raise DataFolderError(f"{folder}: no qrels for split {split!r} (have: {available_splits(folder)})")
    qrels = read_qrels(qrels_path)
    corpus = read_corpus(folder)
    all_queries = {str(r["_id"]): r.get("text") or "" for r in read_jsonl(queries_path)}
    missing = [qid for qid in qrels if qid not in all_queries]
    if missing:
        raise DataFolderError(
            f"{qrels_path}: {len(missing)} query id(s) absent from {queries_path.name}, e.g. {missing[:3]}"
        )
    queries = [{"id": qid, "text": all_queries[qid]} for qid in all_queries if qid in qrels]
    warn_unknown_documents(qrels_path, qrels, {row["id"] for row in corpus})
    return BeirSplit(corpus=corpus, queries=queries, qrels=qrels)


def warn_unknown_documents(qrels_path: Path, qrels: dict[str, dict[str, int]], corpus_ids: set[str]) -> int:
    """Warn (never fail: mteb's own ArguAna has 5 such rows) about qrels rows naming no corpus document.

    Such a row can never be retrieved, so it lowers every model's score alike; a folder where most
    rows are like that is almost surely mismatched. Returns the number of such rows.
    """
    unknown = [(qid, doc) for qid, docs in qrels.items() for doc in docs if doc not in corpus_ids]
    if unknown:
        total = sum(len(docs) for docs in qrels.values())
        logger.warning("%s: %d of %d qrels rows name documents absent from the corpus (e.g. query %r -> %r); "
                       "they count as unretrievable", qrels_path, len(unknown), total, *unknown[0])
    return len(unknown)


def write_beir_slice(source: Path, target: Path, split: str, n_queries: int, n_extra_docs: int,
                     must_include: set[str] = frozenset()) -> Path:
    """A small real BEIR folder cut from `source`: the first `n_queries` queries of `split`, their
    relevant docs, the first `n_extra_docs` corpus docs, and any ids in `must_include` (tests, fault suite)."""
    qrels = read_qrels(source / "qrels" / f"{split}.tsv")
    qids = list(qrels)[:n_queries]
    wanted = {d for q in qids for d in qrels[q]} | set(must_include)
    corpus = [r for i, r in enumerate(read_jsonl(find_file(source, "corpus")))
              if i < n_extra_docs or r["_id"] in wanted]
    queries = [r for r in read_jsonl(find_file(source, "queries")) if r["_id"] in set(qids)]
    (target / "qrels").mkdir(parents=True)
    with gzip.open(target / "corpus.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in corpus)
    (target / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    rows = [f"{q}\t{d}\t{s}\n" for q in qids for d, s in qrels[q].items()]
    (target / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(rows))
    return target
