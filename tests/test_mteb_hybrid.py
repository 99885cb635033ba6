"""scripts/mteb_hybrid_compare.py: distinct identities per cell, and mteb's HybridSearch on a real SciFact slice."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from mteb_steer.beir import write_beir_slice
from tests.conftest import REPO


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("mteb_hybrid_compare", REPO / "scripts" / "mteb_hybrid_compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_scifact(tmp_path_factory, data_root):
    """20 real SciFact test queries over ~220 real passages."""
    return write_beir_slice(data_root / "scifact", tmp_path_factory.mktemp("scifact200") / "scifact", "test", 20, 200)


def test_every_cell_has_its_own_result_identity(compare, encoder):
    cells = compare.build_cells(encoder)
    labels = [c.label for c in cells]
    assert len(cells) == 3 + len(compare.FUSIONS) * (len(compare.LEXICAL) + 1) + 1
    identities = [(m.name, m.revision) for m in (c.build().mteb_model_meta for c in cells)]
    assert all(rev for _, rev in identities), identities
    assert len(set(identities)) == len(identities), dict(zip(labels, identities, strict=True))
    # the same cell built twice keeps its identity (result files are found again)
    again = compare.build_cells(encoder)[labels.index("mteb-dbsf-pkg-bm25")].build().mteb_model_meta
    assert (again.name, again.revision) == identities[labels.index("mteb-dbsf-pkg-bm25")]


def _search(model, task, top_k):
    data = task.dataset["default"]["test"]
    common = {"task_metadata": task.metadata, "hf_split": "test", "hf_subset": "default",
              "encode_kwargs": {"batch_size": 32}}
    model.index(data["corpus"], **common)
    return model.search(data["queries"], top_k=top_k, **common), set(data["corpus"]["id"])


def test_mteb_rrf_cell_fuses_bm25s_and_dense_on_a_real_slice(compare, encoder, small_scifact):
    from mteb_steer.tasks import resolve_task

    task = resolve_task(str(small_scifact))
    task.load_data()
    cells = {c.label: c for c in compare.build_cells(encoder)}
    fused, corpus_ids = _search(cells["mteb-rrf-bm25s"].build(), task, top_k=10)
    dense, _ = _search(cells["dense"].build(), task, top_k=100)
    lexical, _ = _search(cells["bm25s"].build(), task, top_k=100)
    assert len(fused) == 20
    for qid, docs in fused.items():
        assert len(docs) == 10 and set(docs) <= corpus_ids
        scores = list(docs.values())
        assert scores == sorted(scores, reverse=True)
        # mteb's RRF with equal weights: 0.5 / (60 + rank) from each sub-model's top list
        ranks = [{d: r + 1 for r, d in enumerate(sorted(lst, key=lambda d: (lst[d], d), reverse=True))}
                 for lst in (lexical[qid], dense[qid])]
        for doc, score in docs.items():
            expected = sum(0.5 / (60 + rank[doc]) for rank in ranks if doc in rank)
            assert score == pytest.approx(expected)
    dense_top = {q: list(dict(sorted(d.items(), key=lambda x: x[1], reverse=True)[:10])) for q, d in dense.items()}
    assert sum(list(fused[q]) != dense_top[q] for q in fused) >= 5  # the lexical side changes rankings


def test_run_cell_files_each_configuration_separately(compare, encoder, small_scifact, tmp_path):
    cells = {c.label: c for c in compare.build_cells(encoder)}
    rows = [compare.run_cell(cells[label], str(small_scifact), "", tmp_path) for label in ("mteb-rrf-bm25s",
                                                                                          "mteb-rrf-pkg-bm25")]
    paths = [row["result_file"] for row in rows]
    assert len(set(paths)) == 2
    for row in rows:
        on_disk = json.loads(open(row["result_file"]).read())["scores"]["test"][0]["ndcg_at_10"]
        assert on_disk == pytest.approx(row["splits"]["test"]["ndcg_at_10"]) and 0 < on_disk <= 1
        assert not row["reused"]
    # a second run reads the file back instead of recomputing
    again = compare.run_cell(cells["mteb-rrf-bm25s"], str(small_scifact), "", tmp_path)
    assert again["reused"] and again["splits"] == rows[0]["splits"]
