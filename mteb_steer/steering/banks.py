"""Query banks: the generated queries of each passage, as one portable, checkable file.

A bank is `{doc_id: [query, ...]}`, whatever produced it (an LLM through the generation cache,
a published docT5query set). Two on-disk forms are read:

- portable JSONL (optionally gzipped by a `.gz` suffix): one line per passage,
  `{"id": doc_id, "queries": [...]}`; an optional first line `{"metadata": {...}}` records how
  the bank was made (generator, prompt version, ...) and is not part of the bank;
- a BEIR generated-queries folder (the `arguana-genq` layout): `queries.jsonl[.gz]` with the
  generated queries and `qrels/train.tsv` mapping each generated query id to its passage id.

Every problem is reported naming the file and line (or query id) before any model work starts.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mteb_steer.beir import DataFolderError, find_file, read_jsonl, read_qrels
from mteb_steer.identity import chunked_hash

QueryBank = dict[str, list[str]]

GENQ_QRELS = Path("qrels") / "train.tsv"


class BankError(ValueError):
    """A query bank file or folder is missing, malformed, or inconsistent."""


def _check_queries(queries: Any, where: str) -> list[str]:
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise BankError(f"{where}: 'queries' must be a list of strings, got {queries!r:.120}")
    if any(not q.strip() for q in queries):
        raise BankError(f"{where}: empty query string")
    return queries


def _open_text(path: Path, mode: str):
    return gzip.open(path, mode + "t", encoding="utf-8") if path.suffix == ".gz" else path.open(mode, encoding="utf-8")


def _read_jsonl_bank(path: Path) -> tuple[QueryBank, dict[str, Any]]:
    bank: QueryBank = {}
    metadata: dict[str, Any] = {}
    try:
        with _open_text(path, "r") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise BankError(f"{where}: not valid JSON ({err.msg})") from err
                if not isinstance(row, dict):
                    raise BankError(f"{where}: expected an object, got {type(row).__name__}")
                if "id" not in row and "metadata" in row:
                    if bank or metadata:
                        raise BankError(f"{where}: a metadata line may only be the first line")
                    metadata = dict(row["metadata"])
                    continue
                if "id" not in row or "queries" not in row:
                    raise BankError(f"{where}: expected keys 'id' and 'queries', got {sorted(row)}")
                doc_id = str(row["id"])
                if doc_id in bank:
                    raise BankError(f"{where}: duplicate passage id {doc_id!r}")
                bank[doc_id] = _check_queries(row["queries"], where)
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise BankError(f"{path}: cannot read query bank ({err})") from err
    return bank, metadata


def _read_genq_folder(folder: Path) -> QueryBank:
    """BEIR generated-queries folder: queries in qrels order, grouped by the passage they came from."""
    try:
        queries_path = find_file(folder, "queries")
        texts = {str(r["_id"]): r.get("text") or "" for r in read_jsonl(queries_path)}
        qrels = read_qrels(folder / GENQ_QRELS)
    except DataFolderError as err:
        raise BankError(f"{folder} is not a generated-queries folder: {err}") from err
    bank: QueryBank = {}
    for qid, docs in qrels.items():
        if qid not in texts:
            raise BankError(f"{folder / GENQ_QRELS}: query id {qid!r} is absent from {queries_path.name}")
        _check_queries([texts[qid]], f"{queries_path} (query id {qid!r})")
        for doc_id in docs:
            bank.setdefault(doc_id, []).append(texts[qid])
    return bank


def load_bank(path: str | os.PathLike) -> QueryBank:
    """Read a JSONL(.gz) bank or a BEIR generated-queries folder into `{doc_id: [query, ...]}`.

    Query order is kept (file order; qrels order for a folder). Passages may have no queries.
    Raises BankError naming the file and line on any problem.
    """
    path = Path(path)
    if path.is_dir():
        return _read_genq_folder(path)
    if not path.exists():
        raise BankError(f"query bank {path} does not exist")
    return _read_jsonl_bank(path)[0]


def load_bank_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata line of a JSONL bank (how it was made); {} when absent or for a folder.

    Reads up to the first non-empty line only (metadata may only be first): a bank of millions of
    passages is not parsed to learn how it was made.
    """
    path = Path(path)
    if path.is_dir():
        return {}
    if not path.exists():
        raise BankError(f"query bank {path} does not exist")
    try:
        with _open_text(path, "r") as fh:
            for line_no, line in enumerate(fh, 1):
                if line.strip():
                    break
            else:
                return {}
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise BankError(f"{path}: cannot read query bank ({err})") from err
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise BankError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
    return dict(row["metadata"]) if isinstance(row, dict) and "id" not in row and "metadata" in row else {}


def save_bank(bank: QueryBank, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write `bank` as portable JSONL (gzipped when `path` ends in `.gz`), atomically.

    The file appears complete or not at all (temp file + rename in the same folder), so a
    crash never leaves a truncated bank. `metadata` (JSON-able, no secrets) becomes the first line.
    """
    path = Path(path)
    for doc_id, queries in bank.items():
        if not isinstance(doc_id, str):
            raise BankError(f"bank for {path}: passage id {doc_id!r} is not a string")
        _check_queries(queries, f"bank for {path} (passage {doc_id!r})")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                    suffix=".tmp.gz" if path.suffix == ".gz" else ".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _open_text(tmp, "w") as fh:
            if metadata:
                fh.write(json.dumps({"metadata": metadata}, ensure_ascii=False, sort_keys=True) + "\n")
            for doc_id, queries in bank.items():
                fh.write(json.dumps({"id": doc_id, "queries": queries}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def bank_fingerprint(bank: QueryBank) -> str:
    """Content hash of a bank (ids, queries and their order), for a step's `describe()`.

    Hashed in chunks of passages (sorted ids), so a bank of millions never becomes one JSON blob.
    """
    ids = sorted(bank)
    return chunked_hash(len(ids), lambda start, stop: {doc_id: bank[doc_id] for doc_id in ids[start:stop]})


def bank_stats(bank: QueryBank) -> dict[str, int]:
    """Passages, queries, and passages without queries: for logs and `describe()`."""
    return {"passages": len(bank), "queries": sum(len(q) for q in bank.values()),
            "empty_passages": sum(1 for q in bank.values() if not q)}
