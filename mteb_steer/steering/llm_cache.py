"""Disk cache of generated queries: one entry per (generator identity, passage text).

Why: generation is the slow, paid part. Every passage's queries are written the moment they
arrive, so a killed run loses nothing and a rerun continues; a second run over the same corpus
finds every entry and sends no request at all. The key is `identity.stable_hash` over the
generator identity (model, mode, prompt version and text, generation parameters; never a key or
URL) and the exact passage text sent, so any change that alters the output gets new entries.
`diskcache` makes the store safe for several threads and processes at once; a worker claims a
passage (`claim`) before requesting it, so two processes on one cache never ask twice. A claim
expires unless renewed, and one held by a dead process on this machine is taken over at once.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache

from mteb_steer.identity import stable_hash
from mteb_steer.steering.banks import QueryBank

KEY_LENGTH = 32  # hex chars of sha256: collisions are out of reach for any corpus
CLAIM_PREFIX = "claim:"  # claim entries live beside the query entries, under the same key


def _alive(owner: Mapping[str, Any]) -> bool:
    """Whether a claim's holder may still be working: a process on this host is checked, others are trusted."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@dataclass(frozen=True)
class CacheEntry:
    """What one passage's generation produced: the parsed queries, the raw answer (for audits and
    re-parsing) and the token usage of the successful request (for cost reports)."""

    queries: list[str]
    raw: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    source: str = "llm"  # "llm" or "bank:<file name>" for imported entries

    def to_dict(self) -> dict[str, Any]:
        return {"queries": list(self.queries), "raw": self.raw, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "source": self.source}


def cache_key(identity: Mapping[str, Any], passage: str) -> str:
    """The entry key for `passage` (the text as sent, after truncation) under generator `identity`."""
    return stable_hash({"generator": dict(identity), "passage": passage}, length=KEY_LENGTH)


class QueryCache:
    """A folder of generated queries keyed by `cache_key`; entries are never partial."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self._store = diskcache.Cache(str(self.directory))
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}

    def claim(self, identity: Mapping[str, Any], passage: str, ttl: float) -> bool:
        """Take (or renew) the right to generate `passage` for `ttl` seconds; False while another live worker holds it.

        Atomic across processes (one SQLite transaction). A claim lapses after `ttl` unless renewed,
        and one whose holder is a dead process on this host is taken over at once (a `kill -9`ed run).
        """
        key = CLAIM_PREFIX + cache_key(identity, passage)
        with self._store.transact():
            held = self._store.get(key)
            if held is not None and held["token"] != self.owner["token"] and _alive(held):
                return False
            self._store.set(key, self.owner, expire=ttl)
            return True

    def release(self, identity: Mapping[str, Any], passage: str) -> None:
        """Drop this worker's claim on `passage` (after its queries are stored, or it failed)."""
        key = CLAIM_PREFIX + cache_key(identity, passage)
        with self._store.transact():
            held = self._store.get(key)
            if held is not None and held["token"] == self.owner["token"]:
                self._store.delete(key)

    def get(self, identity: Mapping[str, Any], passage: str) -> CacheEntry | None:
        value = self._store.get(cache_key(identity, passage))
        return CacheEntry(**value) if value is not None else None

    def put(self, identity: Mapping[str, Any], passage: str, entry: CacheEntry) -> None:
        self._store.set(cache_key(identity, passage), entry.to_dict())

    def export(self, identity: Mapping[str, Any], items: Iterable[tuple[str, str]]) -> QueryBank:
        """The bank of every `(doc_id, passage)` item that has an entry under `identity` (others left out)."""
        bank: QueryBank = {}
        for doc_id, passage in items:
            entry = self.get(identity, passage)
            if entry is not None:
                bank[doc_id] = list(entry.queries)
        return bank

    def usage(self, identity: Mapping[str, Any], items: Iterable[tuple[str, str]]) -> dict[str, int]:
        """Token usage recorded for the generated entries of `items`: the LLM cost of a bank.

        Imported entries (a resumed or published bank) carry no usage; `imported_passages` counts them,
        so a bank continued across machines says which share of it its usage covers.
        """
        usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "imported_passages": 0}
        for _, passage in items:  # one entry at a time: a bank of millions is never held whole
            entry = self.get(identity, passage)
            if entry is None:
                continue
            if entry.source != "llm":
                usage["imported_passages"] += 1
                continue
            usage["requests"] += 1  # successful requests; retries of failed answers are not stored
            usage["prompt_tokens"] += entry.prompt_tokens
            usage["completion_tokens"] += entry.completion_tokens
        return usage

    def import_bank(self, identity: Mapping[str, Any], items: Iterable[tuple[str, str]], bank: QueryBank,
                    source: str, overwrite: bool = False) -> int:
        """Store `bank[doc_id]` for each item whose id is in `bank` and has queries; returns how many were written.

        Existing entries are kept unless `overwrite`, so importing never replaces fresher generations.
        """
        written = 0
        for doc_id, passage in items:
            queries = bank.get(doc_id)
            if not queries or (not overwrite and self.get(identity, passage) is not None):
                continue
            self.put(identity, passage, CacheEntry(queries=list(queries), source=source))
            written += 1
        return written

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> QueryCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
