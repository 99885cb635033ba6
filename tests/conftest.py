"""Shared fixtures: one session-scoped encoder on the bundled model, the shared data root, small real slices."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from mteb_steer.beir import write_beir_slice

REPO = Path(__file__).resolve().parent.parent


def _data_root() -> Path:
    env = os.environ.get("MTEB_STEER_DATA_ROOT")
    return Path(env) if env else REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session", autouse=True)
def default_embedding_cache(tmp_path_factory):
    """The CLI keeps base vectors in the default embedding cache: in tests, a session folder, never ~/.cache."""
    from mteb_steer.embedding_cache import CACHE_ENV

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, os.environ.get(CACHE_ENV) or str(tmp_path_factory.mktemp("default-embcache")))
        yield


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    if not (root / "scifact").is_dir():
        pytest.fail(f"shared datasets not found at {root} (set MTEB_STEER_DATA_ROOT)")
    return root


@pytest.fixture(scope="session")
def encoder(tmp_path_factory):
    """The bundled all-MiniLM-L6-v2, loaded once, with a session-local embedding cache."""
    from mteb_steer.encoder import SteerEncoder

    return SteerEncoder(device="cpu", cache_dir=tmp_path_factory.mktemp("embcache"))


@pytest.fixture(scope="session")
def scifact_slice(tmp_path_factory, data_root) -> Path:
    """40 real SciFact test queries over ~440 real passages."""
    return write_beir_slice(data_root / "scifact", tmp_path_factory.mktemp("scifact") / "scifact", "test", 40, 400)


@pytest.fixture(scope="session")
def arguana_slice(tmp_path_factory, data_root) -> Path:
    """40 real ArguAna queries over ~530 passages, including all 96 passages that share their text
    with another one (identical embeddings: tie order matters)."""
    from collections import defaultdict

    from mteb_steer.beir import find_file, read_jsonl

    by_text = defaultdict(list)
    for row in read_jsonl(find_file(data_root / "arguana", "corpus")):
        by_text[(row["title"] + " " + row["text"]).strip()].append(row["_id"])
    duplicates = {i for ids in by_text.values() if len(ids) > 1 for i in ids}
    return write_beir_slice(data_root / "arguana", tmp_path_factory.mktemp("arguana") / "arguana", "test", 40, 400,
                       must_include=duplicates)
