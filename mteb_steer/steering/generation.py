"""Ask an LLM which queries each passage answers: any OpenAI-compatible endpoint, cached, resumable.

Why: corpus steering moves each passage vector toward the queries it answers; those queries come
from a language model. This module turns `{doc_id: passage}` into a query bank `{doc_id: [query]}`:

- one request per passage returns all N queries as a numbered list (parsed), in one of two modes:
  `chat` for instruction-tuned models, `completion` with a 2-shot prompt for base models (the
  bundled Gemma-3-270m writes usable queries only that way);
- requests go through `llm_client.LLMClient` (health check first, retries, Retry-After, a dead
  endpoint stops the run with one line) on a bounded thread pool; output that parses into no query
  is retried with another seed and a shorter passage, then recorded as a failure naming the passage
  id (never cached, so a rerun tries again);
- every passage's queries go to the disk cache (`llm_cache.QueryCache`) the moment they arrive,
  so a killed run loses nothing and a second run over the same corpus sends zero requests; each
  passage is claimed in the cache before its request, so two processes on one cache share the work;
- with no endpoint configured (`base_url` or `OPENAI_BASE_URL`), the bundled Gemma-3-270m runs for
  the run: in this process, several requests decoded together (`llama_batched`), in completion mode;
  as a local llama.cpp server (`llm_server.local_llm_server`) in chat mode.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from mteb_steer.identity import stable_hash
from mteb_steer.steering.banks import BankError, QueryBank, load_bank, load_bank_metadata, save_bank
from mteb_steer.steering.llama_batched import BatchedLlama
from mteb_steer.steering.llm_cache import CacheEntry, QueryCache
from mteb_steer.steering.llm_client import LLM, EndpointError, LLMClient, RequestFailed, Transport, endpoint_url
from mteb_steer.steering.llm_server import LocalServerConfig, local_llm_server
from mteb_steer.steering.query_style import QueryForm, clean_style, style_form

logger = logging.getLogger(__name__)

Mode = Literal["chat", "completion"]
Passages = Mapping[str, str] | Sequence[tuple[str, str]]

CHARS_PER_TOKEN = 4  # token estimate for truncation: English/scientific text runs ~4 chars a token
MIN_RETRY_TOKENS = 32  # a retry after an unusable answer never cuts the passage below this

# -- prompts (bump the version when the text changes; the text itself is in the cache key too) ----

PROMPT_VERSION = "v1"
STYLED_PROMPT_VERSION = "style-v2"  # the styled prompts (query_style set); v1 stated the style in the header only

_FEW_SHOT: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        (
            "Vitamin D deficiency and hip fractures in older adults. We followed 2,400 adults aged over 65 "
            "for five years. Participants with low serum vitamin D had a 40% higher rate of hip fractures "
            "than those with normal levels, after adjusting for age, sex and physical activity. "
            "Supplementation lowered the risk only when combined with calcium."
        ),
        (
            "does low vitamin D increase the risk of hip fracture in older adults",
            "vitamin D and calcium supplementation to prevent fractures",
            "serum vitamin D levels and bone health in the elderly",
            "is vitamin D supplementation alone enough to prevent fractures",
            "cohort study of vitamin D deficiency in people over 65",
        ),
    ),
    (
        (
            "Coral bleaching. When sea temperatures stay above normal for several weeks, corals expel the "
            "algae that live in their tissues and turn white. Without the algae they lose their main source "
            "of food and many die. Mass bleaching hit the Great Barrier Reef in 1998, 2002, 2016 and 2017."
        ),
        (
            "what causes coral bleaching",
            "why do corals turn white when the water is too warm",
            "years of mass bleaching on the Great Barrier Reef",
            "how does ocean warming kill coral reefs",
            "relationship between corals and the algae in their tissues",
        ),
    ),
)
MAX_FEW_SHOT_QUERIES = len(_FEW_SHOT[0][1])

# The same two passages with their queries in the other forms a style can ask for (query_style.style_form):
# a base model copies the form of its examples, so a styled prompt must show that form, not questions.
_FORM_QUERIES: dict[QueryForm, tuple[tuple[str, ...], ...]] = {
    "question": tuple(queries for _, queries in _FEW_SHOT),
    "claim": (
        (
            "Low serum vitamin D is linked to a higher rate of hip fractures in adults over 65.",
            "Vitamin D supplementation alone does not lower the risk of hip fracture in older adults.",
            "Older adults with vitamin D deficiency have a 40% higher rate of hip fractures.",
            "Taking vitamin D together with calcium reduces fracture risk in the elderly.",
            "The link between low vitamin D and hip fractures holds after adjusting for age, sex and activity.",
        ),
        (
            "Sea temperatures above normal for several weeks cause corals to expel their algae.",
            "Corals that lose their algae lose their main source of food and often die.",
            "Mass coral bleaching hit the Great Barrier Reef in 2016 and 2017.",
            "Bleached corals turn white because they have expelled the algae in their tissues.",
            "Ocean warming kills coral reefs through bleaching.",
        ),
    ),
    "argument": (
        (
            "Health services should test everyone over 65 for vitamin D deficiency, because older adults with "
            "low vitamin D suffer far more hip fractures and a fracture often ends their independence.",
            "Telling older people to take vitamin D pills is bad advice: on their own the supplements do not "
            "prevent fractures, so the money is better spent on calcium and exercise programmes.",
            "Vitamin D deficiency is a serious public health problem, and a 40% higher rate of hip fractures "
            "shows that treating it would save lives and hospital costs.",
            "Fracture prevention cannot rely on supplements alone; older adults need to stay physically "
            "active, since age and activity matter as much as vitamin D levels.",
            "Governments should add vitamin D and calcium to common foods, because preventing fractures in "
            "the elderly is cheaper than treating them.",
        ),
        (
            "Countries must cut carbon emissions now, because warmer seas are bleaching and killing coral "
            "reefs such as the Great Barrier Reef.",
            "Coral bleaching is not a natural cycle we can ignore: mass bleaching has struck the Great Barrier "
            "Reef four times since 1998 and the reefs have no time to recover.",
            "Tourism on coral reefs should be limited, since bleached corals are already starving and every "
            "extra stress makes it more likely that they die.",
            "Money spent on local reef protection is wasted while ocean warming continues, because heat, "
            "not fishing or pollution, is what makes corals expel their algae.",
            "Saving coral reefs is worth the cost, because whole ecosystems and the fishing communities "
            "around them depend on the corals surviving.",
        ),
    ),
}
_EXAMPLE_QUERIES = frozenset(q.lower() for shots in _FORM_QUERIES.values() for qs in shots for q in qs)

_COMPLETION_HEADER = (
    "Each passage below is followed by search queries that it answers. Every query is specific: "
    "it names the topic, substances or findings of its own passage.\n\n"
)
_QUERIES_LINE = "Search queries answered by this passage:"

# what a styled prompt calls the queries of each form (header sentence, and the line before each list)
_FORM_WORDS: dict[QueryForm, tuple[str, str]] = {
    "question": ("a question or short search phrase", "Queries"),
    "claim": ("a claim: one declarative sentence stating a finding as fact, never a question", "Claims"),
    "argument": ("an argument: a position on the passage's issue with its reason, one or two sentences, "
                 "never a question", "Arguments"),
}

# answer budget per query when max_tokens is not given: claims and arguments are whole sentences
_FORM_TOKENS: dict[QueryForm, int] = {"question": 32, "claim": 48, "argument": 96}

CHAT_SYSTEM = "You write search queries. Answer with a numbered list of queries only, one per line."
CHAT_USER_V1 = (
    "Write {n} different search queries that the passage below answers. Each query must be specific "
    "to this passage (name its topic, substances or findings) and read like something a person "
    "would type into a search engine.\n\nPassage: {passage}"
)
CHAT_USER_STYLED = (
    "Write {n} different queries for this task: {style}. Each query is {form}, specific to the passage "
    "below (name its topic, substances or findings). Example of the form: \"{example}\"\n\nPassage: {passage}"
)


def few_shot_prompt(n: int, query_style: str | None = None) -> str:
    """The built-in 2-shot completion template for N queries; `{passage}` marks where the passage goes.

    With `query_style`, the examples' queries take the style's form (query_style.style_form) and
    the style is stated in the header and again above each list, just before the model's answer.
    """
    if query_style is None:
        header, line = _COMPLETION_HEADER, _QUERIES_LINE
        shots = [queries for _, queries in _FEW_SHOT]
    else:
        form = style_form(query_style)
        what, noun = _FORM_WORDS[form]
        task = query_style.rstrip(".")
        header = (f"Each passage below is followed by queries for this task: {task}. Every query is {what}, "
                  "specific to its own passage (it names the topic, substances or findings).\n\n")
        line = f"{noun} for the task \"{task}\", from this passage:"
        shots = list(_FORM_QUERIES[form])
    blocks = [
        f"Passage: {text}\n{line}\n" + "\n".join(f"{i}. {q}" for i, q in enumerate(queries[:n], 1)) + "\n"
        for (text, _), queries in zip(_FEW_SHOT, shots, strict=True)
    ]
    return header + "\n".join(blocks) + f"\nPassage: {{passage}}\n{line}\n1."


def chat_user_prompt(n: int, query_style: str | None = None) -> str:
    """The built-in chat user message for N queries; with `query_style`, it names the style and shows
    one example query of the style's form (a claim, an argument or a question)."""
    if query_style is None:
        return CHAT_USER_V1.replace("{n}", str(n))
    form = style_form(query_style)
    return (CHAT_USER_STYLED.replace("{n}", str(n)).replace("{style}", query_style.rstrip("."))
            .replace("{form}", _FORM_WORDS[form][0]).replace("{example}", _FORM_QUERIES[form][0][0]))


# -- configuration ------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenConfig:
    """Everything about one generation run.

    Output-changing fields (model, mode, num_queries, temperature, top_p, max_tokens, seed, prompt
    and prompt_version, max_passage_tokens, require_overlap) form `identity()`, the cache key;
    the others (concurrency, timeout, retries, backoff) only change how requests are sent.

    model: the name the endpoint knows; None = the embedded server's model.
    mode: "chat" (instruction-tuned models) or "completion" (base models, 2-shot prompt).
    prompt: custom template with `{passage}` (and optionally `{n}`); for chat it is the user
        message, for completion the whole prompt (end it where the first query starts, e.g. "1.").
    max_tokens: answer budget; None = 32 tokens per query (48 for claims, 96 for arguments: style_form).
    max_passage_tokens: longer passages are cut (estimate: CHARS_PER_TOKEN chars a token).
    require_overlap: drop queries sharing no content word with their passage (generic or copied ones).
    query_style: what the task's queries look like (query_style.py), stated in the built-in prompts;
        None = the generic question-style prompt.
    """

    model: str | None = None
    mode: Mode = "completion"
    num_queries: int = 3
    temperature: float = 0.2
    top_p: float = 0.95
    max_tokens: int | None = None
    seed: int = 0
    prompt: str | None = None
    prompt_version: str = PROMPT_VERSION
    max_passage_tokens: int = 768
    require_overlap: bool = True
    query_style: str | None = None
    concurrency: int = 4
    # transport settings, defaults taken from the LLM client's (one place for them); see transport()
    timeout: float = Transport.timeout
    retries: int = Transport.retries
    backoff: float = Transport.backoff
    backoff_cap: float = Transport.backoff_cap

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in ("chat", "completion"):
            problems.append(f"mode must be 'chat' or 'completion', got {self.mode!r}")
        if self.num_queries < 1:
            problems.append(f"num_queries must be >= 1, got {self.num_queries}")
        if self.mode == "completion" and self.prompt is None and self.num_queries > MAX_FEW_SHOT_QUERIES:
            problems.append(f"the built-in 2-shot prompt shows {MAX_FEW_SHOT_QUERIES} queries per example; "
                            f"num_queries={self.num_queries} needs a custom prompt or chat mode")
        if self.prompt is not None and "{passage}" not in self.prompt:
            problems.append("a custom prompt must contain the placeholder {passage}")
        if not self.prompt_version:
            problems.append("prompt_version must not be empty")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            problems.append(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            problems.append(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.max_passage_tokens < 16:
            problems.append(f"max_passage_tokens must be >= 16, got {self.max_passage_tokens}")
        if self.concurrency < 1:
            problems.append(f"concurrency must be >= 1, got {self.concurrency}")
        if self.query_style is not None and clean_style(self.query_style) != self.query_style:
            problems.append(f"query_style must be one non-empty line (query_style.clean_style), got {self.query_style!r}")
        if problems:
            raise ValueError("invalid generation config: " + "; ".join(problems))
        self.transport()  # checks timeout, retries and backoff

    def transport(self) -> Transport:
        """How requests are sent (timeout, retries, backoff): the LLM client's settings."""
        return Transport(timeout=self.timeout, retries=self.retries, backoff=self.backoff,
                         backoff_cap=self.backoff_cap)

    @property
    def answer_tokens(self) -> int:
        return self.max_tokens or _FORM_TOKENS[style_form(self.query_style)] * self.num_queries

    def template(self) -> tuple[str, str]:
        """(system message, prompt) with `{n}` filled and `{passage}` still open; system is "" unless chat.

        For chat the prompt is the user message; for completion, the whole text sent.
        """
        n = str(self.num_queries)
        if self.prompt is not None:
            return "", self.prompt.replace("{n}", n)
        if self.mode == "completion":
            return "", few_shot_prompt(self.num_queries, self.query_style)
        return CHAT_SYSTEM, chat_user_prompt(self.num_queries, self.query_style)

    def request(self, passage: str) -> dict[str, Any]:
        """What one request for `passage` sends besides sampling: `prompt` and `stop` (completion) or `messages`.

        One place for it, so every engine (one process, Ray workers, vLLM on Ray) asks the same thing.
        """
        system, template = self.template()
        text = template.replace("{passage}", passage)
        if self.mode == "completion":
            return {"prompt": text, "stop": ["\n\n", "Passage:", f"\n{self.num_queries + 1}."]}
        return {"messages": ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}]}

    def sampling(self, seed: int) -> dict[str, Any]:
        """Sampling parameters of one request (OpenAI and vLLM use the same names)."""
        return {"max_tokens": self.answer_tokens, "temperature": self.temperature, "top_p": self.top_p, "seed": seed}

    @staticmethod
    def answer_text(request: Mapping[str, Any], text: str) -> str:
        """The answer as the parser reads it: a completion prompt that ends in "1." gets that marker back."""
        prompt = request.get("prompt")
        return ("1." if prompt is not None and prompt.endswith("1.") else "") + text

    def identity(self) -> dict[str, Any]:
        """What determines the output: the cache key's generator part and the bank's provenance. No secrets."""
        if self.model is None:
            raise ValueError("GenConfig.model is not resolved yet (pass --llm-model or use the embedded server)")
        return {
            "model": self.model, "mode": self.mode, "prompt_version": self.prompt_version,
            "prompt_sha": stable_hash(list(self.template()), length=16), "num_queries": self.num_queries,
            "temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.answer_tokens,
            "seed": self.seed, "max_passage_tokens": self.max_passage_tokens,
            "require_overlap": self.require_overlap,
            # only when set, so the cache keys of banks generated before styles stay valid
            **({"query_style": self.query_style, "style_prompt_version": STYLED_PROMPT_VERSION}
               if self.query_style is not None else {}),
        }


# -- input checks ---------------------------------------------------------------------------------

@dataclass
class PreparedPassages:
    """Passages as they will be sent: (id, text) in input order, plus what was skipped or cut."""

    items: list[tuple[str, str]]
    empty: list[str]
    truncated: list[str]


def truncate_passage(text: str, max_tokens: int) -> tuple[str, bool]:
    """Cut `text` to about `max_tokens` tokens (CHARS_PER_TOKEN chars each), at a word boundary."""
    limit = max_tokens * CHARS_PER_TOKEN
    if len(text) <= limit:
        return text, False
    cut = text[:limit]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(), True


def prepare_passages(passages: Passages, max_passage_tokens: int) -> PreparedPassages:
    """Check and normalise input before any request: duplicate ids raise, empty passages are set aside."""
    pairs = list(passages.items()) if isinstance(passages, Mapping) else [tuple(p) for p in passages]
    seen: set[str] = set()
    dupes: list[str] = []
    for doc_id, _ in pairs:
        if doc_id in seen:
            dupes.append(doc_id)
        seen.add(doc_id)
    if dupes:
        raise ValueError(f"duplicate passage id(s) {sorted(set(dupes))[:5]} ({len(dupes)} duplicate row(s)); "
                         "ids must be unique, nothing was sent")
    items, empty, truncated = [], [], []
    for doc_id, text in pairs:
        if not isinstance(doc_id, str) or not isinstance(text, str):
            raise TypeError(f"passage {doc_id!r}: id and text must be strings, got "
                            f"{type(doc_id).__name__} and {type(text).__name__}")
        text = " ".join(text.split())
        if not text:
            empty.append(doc_id)
            continue
        text, cut = truncate_passage(text, max_passage_tokens)
        if cut:
            truncated.append(doc_id)
        items.append((doc_id, text))
    return PreparedPassages(items, empty, truncated)


# -- parsing ------------------------------------------------------------------------------------------

class UnparseableOutput(ValueError):
    """The model's answer held no usable query."""


_ITEM_PREFIX = re.compile(r"^\s*(?:\d{1,2}\s*[.):]|[-*•])\s*")
_WORD = re.compile(r"[^\W\d_]{2,}")
_CONTENT_WORD = re.compile(r"[^\W_]{4,}")
_STOPWORDS = frozenset((
    "what", "which", "when", "where", "does", "this", "that", "with", "from", "have", "their", "there", "these",
    "those", "about", "into", "more", "most", "other", "such", "than", "them", "they", "were", "will", "would",
    "could", "should", "also", "been", "being", "some", "only", "over", "very", "your", "after", "before",
    "study", "studies", "article", "paper", "passage", "research", "effect", "effects", "role", "between",
    "query", "queries", "search", "using", "used", "based",
))


def _content_words(text: str) -> set[str]:
    return {w for w in _CONTENT_WORD.findall(text.lower()) if w not in _STOPWORDS}


def parse_queries(answer: str, n: int, passage: str, *, truncated_answer: bool = False,
                  require_overlap: bool = True) -> list[str]:
    """The first `n` distinct usable queries of a numbered (or one-per-line) answer.

    A line is used when, after stripping list markers and quotes, it has >= 2 words, <= 64 words,
    does not end with ':' (a preamble), is not a prompt example, and (with require_overlap) shares a
    content word with the passage. A cut-off last line (`truncated_answer`) is dropped. Lines after
    an echoed "Passage:" are ignored. Raises UnparseableOutput when nothing is left.
    """
    lines = answer.split("\n")
    if truncated_answer and len(lines) > 1:
        lines = lines[:-1]
    passage_words = _content_words(passage) if require_overlap else set()
    queries: list[str] = []
    seen: set[str] = set()
    for line in lines:
        if line.strip().lower().startswith("passage:"):
            break
        query = _ITEM_PREFIX.sub("", line).strip().strip("\"'`").strip()
        words = _WORD.findall(query)
        key = query.lower()
        if (len(words) < 2 or len(query.split()) > 64 or query.endswith(":") or key in seen
                or key in _EXAMPLE_QUERIES or (require_overlap and not _content_words(query) & passage_words)):
            continue
        seen.add(key)
        queries.append(query)
        if len(queries) == n:
            break
    if not queries:
        raise UnparseableOutput(f"no usable query in {answer[:120]!r}")
    return queries


# -- the generator ------------------------------------------------------------------------------------

class IncompleteGeneration(RuntimeError):
    """Some passages got no queries and the caller did not allow it: no final result from a partial bank."""


class PassageFailure(RequestFailed):
    """One passage got no queries (attempts used up, or a request the endpoint rejects): recorded, not raised."""


@dataclass
class GenerationReport:
    """Outcome of a run: the bank (cached + new), what failed and why, and the cost.

    `from_other_workers` counts passages another process generated while this one waited for them
    (both had claimed the same cache: each passage is requested once). `rerouted` counts passages
    sent again to another endpoint because theirs died mid-run (the Ray engine).
    """

    bank: QueryBank = field(default_factory=dict)
    cached: int = 0
    generated: int = 0
    from_other_workers: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    empty: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rerouted: int = 0
    seconds: float = 0.0

    @property
    def passages(self) -> int:
        """Passages that were to get queries (empty ones excluded)."""
        return len(self.bank) + len(self.failures)

    @property
    def complete(self) -> bool:
        return not self.failures

    def require_complete(self, allowed: str) -> None:
        """Raise IncompleteGeneration if any passage failed, naming one and `allowed` (how to accept gaps)."""
        if self.failures:
            raise IncompleteGeneration(
                f"{len(self.failures)} of {self.passages} passages got no queries (e.g. "
                f"{next(iter(self.failures.values()))}); rerun to retry them (finished ones are cached), or {allowed}")

    def summary(self) -> dict[str, Any]:
        keys = ("cached", "generated", "from_other_workers", "rerouted", "requests", "prompt_tokens",
                "completion_tokens")
        return {"passages_with_queries": len(self.bank), "failed": len(self.failures), "empty": len(self.empty),
                "truncated": len(self.truncated), **{k: getattr(self, k) for k in keys},
                "seconds": round(self.seconds, 1)}


CLAIM_POLL_S = 0.5  # how often a worker looks again at passages another worker holds


class QueryGenerator:
    """Asks `llm` for each passage's queries (one request, N parsed queries) on `config.concurrency` threads."""

    def __init__(self, config: GenConfig, llm: LLM) -> None:
        if config.model is None:
            raise ValueError(f"no model name for endpoint {llm.base_url}: pass --llm-model NAME")
        self.config = config
        self.llm = llm
        self._lock = threading.Lock()
        self._halt: EndpointError | None = None  # set when the run stops: running workers give up at once
        self.prompt_tokens = self.completion_tokens = 0

    def _ask(self, passage: str, seed: int) -> tuple[str, bool, int, int]:
        """One request (retried by the client): (answer, cut by max_tokens, prompt tokens, completion tokens)."""
        cfg = self.config
        request = cfg.request(passage)
        params = {"model": cfg.model, **cfg.sampling(seed), **request}
        if cfg.mode == "completion":
            choice, usage = self._first(self.llm.complete(**params))
            text = cfg.answer_text(request, choice.text or "")
        else:
            choice, usage = self._first(self.llm.chat(**params))
            text = getattr(getattr(choice, "message", None), "content", None) or ""
        p_tok, c_tok = (usage.prompt_tokens or 0, usage.completion_tokens or 0) if usage else (0, 0)
        with self._lock:
            self.prompt_tokens += p_tok
            self.completion_tokens += c_tok
        return text, getattr(choice, "finish_reason", None) == "length", p_tok, c_tok

    @staticmethod
    def _first(resp: Any) -> tuple[Any, Any]:
        return resp.choices[0], getattr(resp, "usage", None)

    def generate_one(self, doc_id: str, passage: str, keepalive: Callable[[], None] | None = None) -> CacheEntry:
        """Queries for one passage; the client retries transport faults, this retries unusable answers.

        After the k-th unusable answer the next request uses seed + k and the passage cut to
        1/2**k of its length (at least MIN_RETRY_TOKENS): tiny models copy the prompt's examples
        instead of reading a long passage, and a shorter one cures that. Raises PassageFailure
        naming `doc_id` when attempts run out or the endpoint rejects the request; EndpointError
        (from the client) stops the run. `keepalive` runs before each attempt (it renews the claim).
        """
        cfg = self.config
        last: Exception | None = None
        for attempt in range(cfg.retries + 1):
            if self._halt is not None:
                raise self._halt
            if keepalive is not None:
                keepalive()
            sent = passage if not attempt else truncate_passage(
                passage, max(MIN_RETRY_TOKENS, len(passage) // CHARS_PER_TOKEN >> attempt))[0]
            try:
                answer, cut, p_tok, c_tok = self._ask(sent, cfg.seed + attempt)
                queries = parse_queries(answer, cfg.num_queries, passage, truncated_answer=cut,
                                        require_overlap=cfg.require_overlap)
            except RequestFailed as err:
                raise PassageFailure(f"passage {doc_id!r}: {err}") from None
            except UnparseableOutput as err:
                last = err
                continue
            return CacheEntry(queries=queries, raw=answer, prompt_tokens=p_tok, completion_tokens=c_tok)
        raise PassageFailure(f"passage {doc_id!r}: unparseable output after {cfg.retries + 1} attempt(s): {last}")

    def run(self, items: Sequence[tuple[str, str]], cache: QueryCache, report: GenerationReport,
            progress: tqdm | None = None) -> None:
        """Generate for every item; each passage is claimed in `cache` first and cached as soon as it arrives.

        A passage another live worker holds is set aside and looked at again later (its queries
        then come from the cache); a claim whose holder died is taken over. After
        `max_failures_in_a_row` passages in a row fail, the run stops (EndpointError): the
        model at the endpoint is not writing usable queries.
        """
        identity = self.config.identity()
        transport = self.config.transport()
        ttl = (transport.retries + 1) * (transport.timeout + transport.backoff_cap) + 60

        def work(doc_id: str, passage: str) -> CacheEntry:
            try:
                entry = self.generate_one(doc_id, passage, keepalive=lambda: cache.claim(identity, passage, ttl))
                cache.put(identity, passage, entry)
                return entry
            finally:
                cache.release(identity, passage)

        def take_if_cached(doc_id: str, passage: str) -> bool:
            entry = cache.get(identity, passage)
            if entry is None:
                return False
            report.bank[doc_id] = entry.queries
            report.from_other_workers += 1
            if progress is not None:
                progress.update(1)
            return True

        queue, waiting = deque(items), []
        pending: dict[Future, tuple[str, str]] = {}
        failed_in_a_row = 0
        with ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="genq") as pool:
            try:
                while queue or waiting or pending:
                    # keep at most 2x concurrency in flight, so an interrupt leaves little queued work
                    while queue and len(pending) < 2 * self.config.concurrency:
                        doc_id, passage = queue.popleft()
                        if take_if_cached(doc_id, passage):
                            continue
                        if not cache.claim(identity, passage, ttl):
                            waiting.append((doc_id, passage))
                        elif take_if_cached(doc_id, passage):  # finished by its holder just before we claimed
                            cache.release(identity, passage)
                        else:
                            pending[pool.submit(work, doc_id, passage)] = (doc_id, passage)
                    if not pending:
                        if waiting:  # every passage left is held by another worker: look again shortly
                            time.sleep(CLAIM_POLL_S)
                            queue.extend(waiting)
                            waiting.clear()
                        continue
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        doc_id, _passage = pending.pop(fut)
                        try:
                            entry = fut.result()
                        except PassageFailure as err:  # one passage failed for good: record it, go on
                            report.failures[doc_id] = str(err)
                            failed_in_a_row += 1
                            if failed_in_a_row >= transport.max_failures_in_a_row:
                                self._halt = EndpointError(
                                    f"{self.llm.base_url}: {failed_in_a_row} passages in a row got no queries "
                                    f"(e.g. {err}): check --llm-model and --llm-mode")
                                raise self._halt from None
                        else:
                            report.bank[doc_id] = entry.queries
                            report.generated += 1
                            failed_in_a_row = 0
                        if progress is not None:
                            progress.update(1)
                            progress.set_postfix(cached=report.cached, failed=len(report.failures), refresh=False)
            except BaseException:
                for fut, (_, passage) in pending.items():
                    if fut.cancel():  # never started: its claim is ours to drop
                        cache.release(identity, passage)
                raise
            finally:
                report.prompt_tokens += self.prompt_tokens
                report.completion_tokens += self.completion_tokens
                self.prompt_tokens = self.completion_tokens = 0


# -- the entry points ---------------------------------------------------------------------------------

def resolve_model(config: GenConfig, server: LocalServerConfig) -> GenConfig:
    """`config` with its model name filled in: the embedded server's alias when none is given."""
    return config if config.model is not None else replace(config, model=server.model_alias())


def embedded_config(config: GenConfig, server: LocalServerConfig) -> GenConfig:
    """`config` for the embedded model: its alias as the model; as many requests in flight as it decodes at once."""
    alias = server.model_alias()
    if config.model not in (None, alias):
        raise ValueError(f"--llm-model {config.model!r} needs --llm-base-url (or OPENAI_BASE_URL): "
                         f"the embedded server serves {alias!r}")
    # completion mode runs in-process, `slots` requests decoded together; the llama.cpp server (chat mode)
    # answers one request at a time, so more threads would only queue into timeouts
    return replace(config, model=alias, concurrency=server.slots if config.mode == "completion" else 1)


def _generate_at(url: str, api_key: str | None, config: GenConfig, todo: Sequence[tuple[str, str]], total: int,
                 cache: QueryCache, report: GenerationReport, show_progress: bool) -> None:
    """Generate `todo` through one client of the endpoint at `url`."""
    _generate_with(LLMClient(url, api_key, config.transport()), config, todo, total, cache, report, show_progress)


def _generate_with(llm: LLM, config: GenConfig, todo: Sequence[tuple[str, str]], total: int,
                   cache: QueryCache, report: GenerationReport, show_progress: bool) -> None:
    """Health-check `llm`, then generate `todo` through it; the report counts its requests."""
    llm.check()
    try:
        with tqdm(total=total, initial=report.cached, desc="generating queries", unit="passage",
                  disable=not show_progress) as bar:
            bar.set_postfix(cached=report.cached, failed=0)
            QueryGenerator(config, llm).run(todo, cache, report, bar)
    finally:
        report.requests += llm.requests


def generate(passages: Passages, config: GenConfig, cache_dir: str | os.PathLike, *, base_url: str | None = None,
             api_key: str | None = None, server: LocalServerConfig | None = None,
             show_progress: bool = True) -> GenerationReport:
    """Queries for every passage: cached ones read back, the rest generated (and cached one by one).

    Input is checked first (duplicate ids raise; empty passages are skipped, too-long ones cut, each
    with one warning). Without `base_url` / OPENAI_BASE_URL the embedded model (`server`, by default
    the bundled Gemma-3-270m) is loaded, only when some passage is not cached yet: in this process
    with batched decoding for completion mode (`llama_batched`), as a local llama.cpp server for chat.
    Passages that fail for good are listed in `report.failures` (id -> reason), not raised; an
    endpoint that cannot serve the run (nothing listens, key rejected, dead mid-run) raises
    `EndpointError` with one line naming its URL (what finished is cached).
    """
    server = server or LocalServerConfig()
    endpoint = endpoint_url(base_url)
    config = config if endpoint else embedded_config(config, server)
    start = time.monotonic()
    with QueryCache(cache_dir) as cache:
        report, todo, order = start_report(passages, config, cache)
        if todo:
            if endpoint:
                _generate_at(endpoint, api_key, config, todo, len(order), cache, report, show_progress)
            elif config.mode == "completion":
                with BatchedLlama(server) as llm:
                    _generate_with(llm, config, todo, len(order), cache, report, show_progress)
            else:
                with local_llm_server(server) as local_url:
                    _generate_at(local_url, None, config, todo, len(order), cache, report, show_progress)
    return finish_report(report, order, start)


def start_report(passages: Passages, config: GenConfig, cache: QueryCache
                 ) -> tuple[GenerationReport, list[tuple[str, str]], list[str]]:
    """Check the input and read the cache: (report holding the cached queries, passages to generate, id order).

    Duplicate ids raise; empty passages are skipped and too-long ones cut, each with one warning.
    Shared by the single-process run and the Ray engine, so both see the same passages and keys.
    """
    identity = config.identity()
    prepared = prepare_passages(passages, config.max_passage_tokens)
    report = GenerationReport(empty=prepared.empty, truncated=prepared.truncated)
    if prepared.empty:
        logger.warning("skipping %d empty passage(s) (no request sent, they keep their vectors): %s",
                       len(prepared.empty), prepared.empty[:10])
    if prepared.truncated:
        logger.warning("%d of %d passage(s) are longer than ~%d tokens and were truncated for the LLM "
                       "(GenConfig.max_passage_tokens), e.g. %s", len(prepared.truncated), len(prepared.items),
                       config.max_passage_tokens, prepared.truncated[:5])
    todo: list[tuple[str, str]] = []
    for doc_id, passage in prepared.items:
        entry = cache.get(identity, passage)
        if entry is None:
            todo.append((doc_id, passage))
        else:
            report.bank[doc_id] = entry.queries
    report.cached = len(report.bank)
    return report, todo, [doc_id for doc_id, _ in prepared.items]


def finish_report(report: GenerationReport, order: Sequence[str], start: float) -> GenerationReport:
    """Put the bank in input order, stamp the time, and warn once about passages that got no queries."""
    report.bank = {doc_id: report.bank[doc_id] for doc_id in order if doc_id in report.bank}
    report.seconds = time.monotonic() - start
    if report.failures:
        first = next(iter(report.failures.items()))
        logger.warning("%d passage(s) got no queries (not cached; a rerun retries them), e.g. %s",
                       len(report.failures), first[1])
    return report


def export_bank(passages: Passages, config: GenConfig, cache_dir: str | os.PathLike, path: str | os.PathLike,
                server: LocalServerConfig | None = None) -> QueryBank:
    """Write the cached queries of `passages` under `config` to a JSONL(.gz) bank; partial coverage is fine.

    Sends no request. The model name resolves as in `generate` (embedded server alias by default).
    """
    config = resolve_model(config, server or LocalServerConfig())
    prepared = prepare_passages(passages, config.max_passage_tokens)
    with QueryCache(cache_dir) as cache:
        bank = cache.export(config.identity(), prepared.items)
        usage = cache.usage(config.identity(), prepared.items)
    # provenance, coverage (a partial bank says so) and the LLM cost behind it
    save_bank(bank, path, metadata={"generator": config.identity(), "passages": len(prepared.items),
                                    "passages_with_queries": len(bank), "llm_usage": usage})
    return bank


def resume_from_bank(path: str | os.PathLike, passages: Passages, config: GenConfig, cache_dir: str | os.PathLike,
                     server: LocalServerConfig | None = None) -> int:
    """Seed the cache from a (partial) bank that `export_bank` wrote under this same generator.

    Why: the cache lives on one machine; an exported bank travels (a repository, another host), so a
    long generation continues where the bank stops instead of starting over. A bank made by another
    generator (model, prompt, style, sampling) would pass off its queries as this config's, so it is
    refused naming the fields that differ. Returns the number of passages seeded.
    """
    expected = resolve_model(config, server or LocalServerConfig()).identity()
    made_by = load_bank_metadata(path).get("generator")
    if made_by != expected:
        if not isinstance(made_by, dict):
            raise BankError(f"{path}: no generator metadata; only a bank written by `generate --export` can be resumed")
        differ = sorted(k for k in expected.keys() | made_by.keys() if expected.get(k) != made_by.get(k))
        raise BankError(f"{path} was made by another generator (differs in {', '.join(differ)}); "
                        "resume with the same model, prompt, style and sampling")
    return import_bank(path, passages, config, cache_dir, server)


def import_bank(path: str | os.PathLike, passages: Passages, config: GenConfig, cache_dir: str | os.PathLike,
                server: LocalServerConfig | None = None, overwrite: bool = False) -> int:
    """Load a bank (JSONL(.gz) or generated-queries folder) into the cache as if `config` had generated it.

    A later `generate` with the same config then sends no request for those passages. Returns the
    number of entries written (existing entries are kept unless `overwrite`).
    """
    config = resolve_model(config, server or LocalServerConfig())
    prepared = prepare_passages(passages, config.max_passage_tokens)
    bank = load_bank(path)
    unknown = len(set(bank) - {doc_id for doc_id, _ in prepared.items})
    if unknown:
        logger.warning("%s: %d passage id(s) are not in the given corpus and were not imported", path, unknown)
    with QueryCache(cache_dir) as cache:
        return cache.import_bank(config.identity(), prepared.items, bank, source=f"bank:{Path(path).name}",
                                 overwrite=overwrite)

