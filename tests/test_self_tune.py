"""Issue 14: task-styled generation prompts and per-corpus self-tuning from pseudo-queries.

Style: it reaches both prompts and the cache key. Self-tuning: it never reads qrels, files its
choices in steer_fit.json, keeps held-out generated queries out of fusion and expansion, cuts
pseudo-queries out of the tuning text, and its rule keeps the reference unless beaten by > 1 SE.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Mapping

import mteb
import numpy as np
import pytest

from mteb_steer.pipeline import SteerConfig, build_model
from mteb_steer.results import STEER_FIT_FILE, evaluate_tasks, read_fits, result_dir
from mteb_steer.steering.banks import load_bank, save_bank
from mteb_steer.steering.fusion import QueryFusion
from mteb_steer.steering.generation import GenConfig
from mteb_steer.steering.lexical import expand_with_bank
from mteb_steer.steering.llm_cache import CacheEntry, QueryCache
from mteb_steer.steering.query_style import resolve_query_style, task_query_style
from mteb_steer.steering.self_tune import (
    SAMPLE_SIZE,
    SelfTunedHybrid,
    choose,
    cut_sentence_probes,
    ndcg_at_10,
    split_bank,
)
from mteb_steer.tasks import BeirFolderTask

SCIFACT_STYLE = "Given a scientific claim, retrieve documents that support or refute the claim"


# -- task-styled generation --------------------------------------------------------------------------

def test_task_style_comes_from_mteb_metadata_and_user_strings_override():
    assert task_query_style(mteb.get_task("SciFact")) == SCIFACT_STYLE
    assert resolve_query_style("task", mteb.get_task("ArguAna")) == "Given a claim, find documents that refute the claim"
    assert resolve_query_style("task", BeirFolderTask.__new__(BeirFolderTask)) is None  # a folder states none
    assert resolve_query_style("  Find the  counter-argument ", None) == "Find the counter-argument"
    assert resolve_query_style("generic", mteb.get_task("SciFact")) is None
    with pytest.raises(ValueError, match="at most"):
        resolve_query_style("x" * 400, None)


@pytest.mark.parametrize("mode", ["completion", "chat"])
def test_style_reaches_the_prompt_and_the_cache_key(tmp_path, mode):
    plain = GenConfig(model="m", mode=mode)
    styled = GenConfig(model="m", mode=mode, query_style=SCIFACT_STYLE)
    assert SCIFACT_STYLE not in "".join(plain.template())
    assert SCIFACT_STYLE in "".join(styled.template())
    assert "{passage}" in styled.template()[1]
    assert "query_style" not in plain.identity()  # banks generated before styles keep their cache keys
    assert styled.identity()["query_style"] == SCIFACT_STYLE
    with QueryCache(tmp_path) as cache:
        cache.put(plain.identity(), "a passage", CacheEntry(queries=["a question"], raw="1. a question"))
        assert cache.get(plain.identity(), "a passage") is not None
        assert cache.get(styled.identity(), "a passage") is None  # another style is another generation
    with pytest.raises(ValueError, match="query_style"):
        GenConfig(model="m", query_style="two\nlines")


def test_generated_fusion_identity_carries_the_task_style(tmp_path, encoder):
    import sys

    from fault_stub import fault_stub

    from mteb_steer.tasks import local_copy

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from fault_suite_llm import tiny_scifact

    # SciFact's metadata (its declared style) over 25 of its passages: generate-then-fuse generates when built
    task = local_copy(mteb.get_task("SciFact"), tiny_scifact(tmp_path))

    def revision(style: str, url: str) -> str:
        config = SteerConfig(fusion="mean", llm_cache_dir=str(tmp_path / "cache"), query_style=style,
                             llm_base_url=url, llm_model="stub-model")
        return build_model(config, encoder=encoder, task=task).mteb_model_meta.revision

    with fault_stub(echo=True) as (url, _):
        assert revision("task", url) != revision("generic", url) != revision("Find claims", url)


# -- self-tuning ------------------------------------------------------------------------------------

class _RaisingQrels(Mapping):
    """Qrels that fail on any access: self-tuning must never look at them."""

    def _fail(self, *args, **kwargs):
        raise AssertionError("self-tuning read the qrels")

    __getitem__ = __iter__ = __len__ = __contains__ = keys = items = values = get = _fail


def _index_and_search(model, task, split="test"):
    data = task.dataset["default"][split]
    kwargs = {"task_metadata": task.metadata, "hf_split": split, "hf_subset": "default",
              "encode_kwargs": {"batch_size": 32}}
    model.index(data["corpus"], **kwargs)
    return model.search(data["queries"], top_k=10, **kwargs)


def test_self_tune_never_reads_qrels(scifact_slice, encoder):
    task = BeirFolderTask(scifact_slice)
    task.load_data()
    task.dataset["default"]["test"]["relevant_docs"] = _RaisingQrels()
    model = build_model(SteerConfig(lexical="bm25", self_tune=True), encoder=encoder, task=task)
    results = _index_and_search(model, task)
    assert len(results) == 40 and all(len(docs) == 10 for docs in results.values())
    assert model.fit_reports[task.metadata.name]  # it did tune, from the corpus alone


def test_fit_tokenises_the_corpus_once_for_tuning_and_once_for_the_real_index(scifact_slice, encoder, monkeypatch):
    """Tokenising is the costly part of a BM25 build at scale (BENCHMARKS §9 profile): the grid and the
    chosen setting's tuning index share one count of the tuning texts."""
    from mteb_steer.steering import lexical, self_tune

    calls = []

    def counting(texts, params):
        calls.append(len(texts))
        return real(texts, params)

    real = lexical.count_terms
    monkeypatch.setattr(lexical, "count_terms", counting)
    monkeypatch.setattr(self_tune, "count_terms", counting)
    task = BeirFolderTask(scifact_slice)
    task.load_data()
    model = build_model(SteerConfig(lexical="bm25", self_tune=True), encoder=encoder, task=task)
    _index_and_search(model, task)
    assert len(calls) == 2  # the tuning texts (cut sentences), then the real passages


def test_steer_fit_json_carries_every_choice(scifact_slice, encoder, tmp_path):
    task = BeirFolderTask(scifact_slice)
    model = build_model(SteerConfig(lexical="bm25", self_tune=True), encoder=encoder, task=task)
    evaluate_tasks(model, [task], tmp_path)
    fit = read_fits(result_dir(tmp_path, model))[task.metadata.name][model.score_fusion.tag]
    bm25, weight = fit["choices"]
    assert bm25["chosen"] in bm25["grid"] and [0.9, 0.4] in bm25["grid"]
    assert len(bm25["scores"]) == len(bm25["grid"]) == len(bm25["paired_se"]) == 16
    assert weight["chosen"] == fit["chosen"] == model.score_fusion.weight and fit["chosen"] in weight["grid"]
    assert [model.score_fusion.params.k1, model.score_fusion.params.b] == bm25["chosen"]
    assert fit["bm25"] == {"k1": bm25["chosen"][0], "b": bm25["chosen"][1]}
    assert bm25["pseudo_queries"] > 100 and bm25["source"] == "passage sentence"
    assert json.loads((result_dir(tmp_path, model) / STEER_FIT_FILE).read_text())


def test_held_out_queries_are_excluded_from_fusion_and_expansion(data_root, encoder):
    bank = load_bank(data_root / "arguana-genq")
    kept, held = split_bank(bank, sample_size=50, seed=3)
    assert len(held) == 50 and split_bank(bank, sample_size=50, seed=3)[1] == held  # seeded
    for doc_id, query in held.items():
        assert query not in kept[doc_id] and len(kept[doc_id]) == len(bank[doc_id]) - 1
    config = SteerConfig(query_bank=str(data_root / "arguana-genq"), fusion="mean", lexical="bm25", self_tune=True)
    model = build_model(config, encoder=encoder)
    fusion, hybrid = model.corpus_steps[0], model.score_fusion
    assert isinstance(fusion, QueryFusion) and isinstance(hybrid, SelfTunedHybrid)
    assert fusion.bank is hybrid.bank and hybrid.held_out
    ids = sorted(hybrid.held_out)[:20]
    expanded, _ = expand_with_bank(ids, ["passage"] * len(ids), hybrid.bank)
    for doc_id, text in zip(ids, expanded, strict=True):
        assert hybrid.held_out[doc_id] not in text
        assert hybrid.held_out[doc_id] not in fusion.bank[doc_id]


def test_sentence_pseudo_queries_are_cut_from_the_tuning_text(scifact_slice):
    from mteb_steer.beir import load_beir_split
    from mteb_steer.encoder import passage_text

    texts = [passage_text(r["title"], r["text"]) for r in load_beir_split(scifact_slice, "test").corpus]
    probes = cut_sentence_probes(texts, sample_size=100, seed=0)
    assert len(probes.texts) == 100 and probes.tuning_texts is not None
    for query, row in zip(probes.texts, probes.rows, strict=True):
        assert query in texts[row] and query not in probes.tuning_texts[row]
    # every other passage with two sentences loses one too, so relevant passages are not the short ones
    others = np.setdiff1d(np.arange(len(texts)), probes.rows)
    assert all(len(probes.tuning_texts[r]) <= len(texts[r]) for r in others)
    assert sum(probes.tuning_texts[r] != texts[r] for r in others) > len(others) // 2
    assert cut_sentence_probes(texts, 100, 0).texts == probes.texts


class _BlockOnlyCorpus:
    """A corpus matrix that hands out row blocks only, as a memory-mapped one should be read: loading or
    copying it whole raises, and the largest block requested is recorded."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors, self.shape, self.largest_block = vectors, vectors.shape, 0

    def __len__(self) -> int:
        return len(self.vectors)

    def __getitem__(self, rows):
        assert isinstance(rows, slice), f"corpus read by {type(rows).__name__}, not by a block of rows"
        self.largest_block = max(self.largest_block, len(range(*rows.indices(len(self.vectors)))))
        return self.vectors[rows]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole corpus matrix was loaded")

    def copy(self):
        raise AssertionError("the corpus matrix was copied")


def test_dense_tuning_reads_the_corpus_block_by_block_and_never_copies_it(scifact_slice, encoder, monkeypatch):
    """At millions of passages the corpus matrix is memory-mapped: tuning must not copy it (the cut passages'
    vectors stand in for theirs) nor turn it whole into a tensor per chunk of pseudo-queries."""
    from mteb.types import PromptType

    from mteb_steer.beir import load_beir_split
    from mteb_steer.encoder import passage_text
    from mteb_steer.steering import self_tune
    from mteb_steer.steering.lexical import BM25Params, LexicalIndex

    corpus = load_beir_split(scifact_slice, "test").corpus
    texts, ids = [passage_text(r["title"], r["text"]) for r in corpus], [r["id"] for r in corpus]
    docs = encoder.embed(texts, PromptType.document)
    probes = cut_sentence_probes(texts, sample_size=40, seed=0)
    lexical = LexicalIndex.build(ids, probes.tuning_texts, BM25Params(), None)
    queries = encoder.embed(probes.texts, PromptType.query)
    overrides = self_tune.cut_vectors(probes, probes.tuning_texts, encoder)
    swapped = docs.copy()  # the reference: the sampled passages' vectors replaced in a full copy
    swapped[overrides[0]] = overrides[1]
    args = dict(lexical=lexical, query_vectors=queries, encoder=encoder, work_mem_mb=1)
    expected = self_tune.probe_ranks(probes, len(ids), [0.0, 0.3], doc_vectors=swapped, **args)
    monkeypatch.setattr(self_tune, "CORPUS_BLOCK", 100)
    blocks = _BlockOnlyCorpus(docs)
    got = self_tune.probe_ranks(probes, len(ids), [0.0, 0.3], doc_vectors=blocks, doc_overrides=overrides, **args)
    assert np.array_equal(got, expected) and 0 < blocks.largest_block <= 100
    assert (got[0] < 10).mean() > 0.3  # a cut sentence finds its own passage in the top 10 often


def test_rule_keeps_the_reference_unless_clearly_beaten():
    rng = np.random.default_rng(0)
    base = rng.random(400)
    noisy = np.stack([base, base + rng.normal(0, 0.05, 400) + 0.002, base - 0.1])  # tiny, noisy gain
    assert choose([0, 1, 2], noisy, reference_index=0, distance=[0, 1, 2])[0] == 0
    clear = np.stack([base, base + 0.05, base + 0.02])
    assert choose([0, 1, 2], clear, reference_index=0, distance=[0, 1, 2])[0] == 1
    assert ndcg_at_10(np.array([0, 1, 9, 10])).tolist() == pytest.approx([1.0, 1 / np.log2(3), 1 / np.log2(11), 0.0])


def test_self_tune_configuration_errors(encoder):
    # SteerConfig refuses the first three on construction (its one validator), the hybrid the last
    for fields, message in (({}, "give --lexical"),
                            ({"lexical": "bm25", "lexical_weight": 0.3}, "drop --lexical-weight"),
                            ({"fusion": "mean"}, "needs a --query-bank"),
                            ({"lexical": "bm25", "lexical_fusion": "rrf"}, "zscore or minmax"),
                            ({"lexical": "bm25", "self_tune_sample": 0}, "integer >= 1")):
        with pytest.raises(ValueError, match=message):
            build_model(SteerConfig(self_tune=True, **fields), encoder=encoder)
    with pytest.raises(ValueError, match="give --self-tune"):
        SteerConfig(lexical="bm25", self_tune_sample=100)


def test_self_tune_sample_reaches_the_bank_split_and_the_tuner(tmp_path, encoder):
    """`--self-tune-sample N` holds out N generated queries and is part of the model's identity."""
    path = save_bank({f"d{i}": [f"query {i} a", f"query {i} b"] for i in range(300)}, tmp_path / "bank.jsonl.gz")
    tuned = build_model(SteerConfig(lexical="bm25", self_tune=True, self_tune_sample=120, query_bank=str(path)),
                        encoder=encoder).score_fusion
    assert tuned.sample_size == 120 and len(tuned.held_out) == 120
    assert tuned.describe()["self_tune"]["sample_size"] == 120
    default = build_model(SteerConfig(lexical="bm25", self_tune=True, query_bank=str(path)), encoder=encoder).score_fusion
    assert default.sample_size == SAMPLE_SIZE and len(default.held_out) == min(SAMPLE_SIZE, 300)


@pytest.fixture(scope="module")
def agreement_script():
    """scripts/self_tune_agreement.py, loaded as a module."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "self_tune_agreement.py"
    spec = importlib.util.spec_from_file_location("self_tune_agreement", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_agreement_script_scores_both_grids_through_the_search_path(scifact_slice, encoder, agreement_script):
    """scripts/self_tune_agreement.py (the BENCHMARKS agreement tables) runs its BM25 and weight grids."""
    script = agreement_script
    row = script.run_task(str(scifact_slice), str(scifact_slice.parent), None, True, encoder, 60, 0)
    assert len(row["bm25"]["real_ndcg10"]) == 16 and len(row["weight"]["real_ndcg10"]) == len(script.WEIGHT_GRID)
    weights = row["weight"]["real_ndcg10"]
    assert all(0.0 < v <= 1.0 for v in weights) and len(set(weights)) > 1  # the weight changes the ranking
    assert row["weight"]["chosen_real"] == weights[script.WEIGHT_GRID.index(row["weight"]["chosen"])]


def test_stability_table_lists_every_seed_and_its_pick(scifact_slice, agreement_script, tmp_path):
    """The seed-stability table of BENCHMARKS §7 groups runs of several seeds and shows each seed's pick."""
    files = []
    for seed in (0, 1):
        row = agreement_script.run_task(str(scifact_slice), str(scifact_slice.parent), None, False, None, 60, seed)
        files.append(tmp_path / f"seed{seed}.json")
        files[-1].write_text(json.dumps({"rows": [row]}))
        picks = ", ".join(f"{v:g}" for v in row["bm25"]["chosen"])
    table = agreement_script.stability([str(f) for f in files]).splitlines()
    assert len(table) == 3  # header, rule, one group: both seeds share data set, source and sample size
    cells = [c.strip() for c in table[2].split("|")]
    assert cells[3] == "0, 1" and cells[4].endswith(picks) and cells[5] == "-"

