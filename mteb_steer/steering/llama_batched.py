"""The embedded GGUF model run in this process, decoding several completion requests in one batch.

Why: on a CPU a small model's decode step costs little more for eight sequences than for one, so
decoding requests together raises throughput (BENCHMARKS.md §7: 1.34x to 1.37x per passage with the
task-styled prompts, whose long prompts batching does not speed up). The llama.cpp server
(`llm_server`) answers one request at a time; this engine takes the generator's concurrent requests into `slots` sequences of one llama.cpp context and
decodes them together. It implements `llm_client.LLM` (completion mode), so the generator, its
cache, retries and parsing are the same whichever engine answers. Each request is sampled with the
server's own llama.cpp sampler chain and defaults (`SERVER_SAMPLING`), so a bank means the same thing
whichever engine wrote it. Each slot keeps its last prompt in the KV cache and re-evaluates only what
differs, so the shared few-shot prefix is evaluated once per slot.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from mteb_steer.steering.llm_client import RequestFailed
from mteb_steer.steering.llm_server import LLMServerError, LocalServerConfig, require_llama_server

logger = logging.getLogger(__name__)

# llama-cpp-python server's completion defaults (llama_cpp/server/types.py) and its history window
SERVER_SAMPLING = {"top_k": 40, "min_p": 0.05, "typical_p": 1.0, "repeat_penalty": 1.1, "last_n": 64}


@dataclass
class _Request:
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...]
    future: Future = field(default_factory=Future)


@dataclass
class _Slot:
    """One sequence of the shared context: what its KV cache holds and the request it is serving."""

    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens in this sequence's KV cache, in order
    request: _Request | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to evaluate
    answer: list[int] = field(default_factory=list)
    sampler: Any = None
    logits_at: int = -1  # batch index of this slot's logits after the current decode


class BatchedLlama:
    """`llm_client.LLM` over a GGUF model in this process: up to `server.slots` completions decoded together.

    Completion mode only (the embedded base model's mode); `chat` raises. Use as a context manager
    or call `close()`: a background thread owns the llama.cpp context.
    """

    def __init__(self, server: LocalServerConfig | None = None, n_batch: int = 1024) -> None:
        require_llama_server()
        import llama_cpp
        from llama_cpp import _internals, _logger

        _logger.set_verbose(False)  # llama.cpp's load and graph messages, as `Llama(verbose=False)` silences them

        server = server or LocalServerConfig()
        path = server.gguf_path()
        slots = server.slots
        if slots < 1:
            raise ValueError(f"LocalServerConfig.slots must be >= 1, got {slots}")
        self._llama_cpp, self._internals = llama_cpp, _internals
        self.alias = server.model_alias()
        self.base_url = f"in-process:{self.alias}"
        self.requests = 0
        self.n_ctx = server.n_ctx  # per request, as the server's context window
        threads = server.threads()
        self._model = _internals.LlamaModel(path_model=path, params=llama_cpp.llama_model_default_params(),
                                            verbose=False)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = server.n_ctx * slots
        params.n_batch, params.n_ubatch = n_batch, min(n_batch, 512)  # the server's micro-batch
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as the server runs it
        params.n_seq_max = slots
        params.kv_unified = False  # a KV stream per slot: attention never scans the other slots' cells
        params.swa_full = True  # keep sliding-window layers whole, so a slot's prefix stays reusable
        params.n_threads = params.n_threads_batch = threads
        self._ctx = _internals.LlamaContext(model=self._model, params=params, verbose=False)
        self._batch = _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=slots, verbose=False)
        self._n_batch = n_batch
        self._slots = [_Slot(seq_id=i) for i in range(slots)]
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="llama-batched", daemon=True)
        self._thread.start()
        logger.info("in-process LLM %s: %d slots, %d threads", self.alias, slots, threads)

    # -- llm_client.LLM ----------------------------------------------------------------------------

    def check(self) -> None:
        if self._failure is not None:
            raise LLMServerError(f"in-process LLM {self.alias} stopped: {self._failure}") from self._failure

    def complete(self, *, model: str, prompt: str, max_tokens: int = 16, temperature: float = 0.8,
                 top_p: float = 0.95, seed: int | None = None, stop: list[str] | None = None, **_: Any) -> Any:
        """An OpenAI-style completion (choices[0].text / finish_reason, usage); blocks until it is decoded."""
        if model != self.alias:
            raise RequestFailed(f"the in-process LLM serves {self.alias!r}, not {model!r}")
        with self._lock:  # close() frees the model: tokenise under the lock, after the check
            self.check()
            if self._closed:
                raise LLMServerError(f"in-process LLM {self.alias} is closed")
            tokens = self._model.tokenize(prompt.encode("utf-8"), True, True)
            if len(tokens) + max_tokens > self.n_ctx:
                raise RequestFailed(f"prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceed the "
                                    f"context window of {self.n_ctx} tokens")
            request = _Request(tokens, max_tokens, temperature, top_p, 0 if seed is None else seed,
                               tuple(stop or ()))
            self.requests += 1
            self._queue.put(request)
        return request.future.result()

    def chat(self, **params: Any) -> Any:
        raise RequestFailed("the in-process LLM serves completion mode only; chat mode uses the llama.cpp server")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()
        self._batch.close()
        self._ctx.close()
        self._model.close()

    def __enter__(self) -> BatchedLlama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the decode loop (background thread) --------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._admit():
                self._step()
            err: BaseException = LLMServerError(f"in-process LLM {self.alias} was closed mid-request")
        except BaseException as failure:  # noqa: BLE001 (handed to every waiting caller)
            self._failure = err = failure
            logger.exception("in-process LLM %s failed", self.alias)
        for slot in self._slots:
            if slot.request is not None:
                slot.request.future.set_exception(err)
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                break
            if request is not None:
                request.future.set_exception(err)

    def _admit(self) -> bool:
        """Start queued requests in free slots (blocking while all is idle); False once closed."""
        busy = any(s.request is not None for s in self._slots)
        for slot in self._slots:
            if slot.request is not None:
                continue
            try:
                request = self._queue.get(block=not busy)
            except queue.Empty:
                break
            if request is None:
                return False
            self._start(slot, request)
            busy = True
        return True

    def _start(self, slot: _Slot, request: _Request) -> None:
        prompt = request.prompt
        keep = 0
        while keep < min(len(slot.cached), len(prompt) - 1) and slot.cached[keep] == prompt[keep]:
            keep += 1
        if not self._ctx.kv_cache_seq_rm(slot.seq_id, keep, -1):
            self._ctx.kv_cache_seq_rm(slot.seq_id, -1, -1)
            keep = 0
        slot.cached, slot.pending, slot.answer = prompt[:keep], prompt[keep:], []
        slot.request, slot.sampler = request, self._sampler(request)

    def _sampler(self, request: _Request) -> Any:
        """The llama.cpp sampler chain llama-cpp-python's server builds for the same request."""
        s = self._internals.LlamaSampler()
        s.add_penalties(self._model.n_vocab(), SERVER_SAMPLING["last_n"], SERVER_SAMPLING["repeat_penalty"], 0.0, 0.0)
        if request.temperature == 0:
            s.add_greedy()
        else:
            s.add_top_k(SERVER_SAMPLING["top_k"])
            s.add_typical(SERVER_SAMPLING["typical_p"], 1)
            s.add_top_p(request.top_p, 1)
            s.add_min_p(SERVER_SAMPLING["min_p"], 1)
            s.add_temp(request.temperature)
            s.add_dist(request.seed)
        return s

    def _step(self) -> None:
        """One llama_decode: every answering slot's last token, then prompt chunks while the batch has room."""
        llama_cpp, batch = self._llama_cpp, self._batch.batch
        n = 0

        def add(slot: _Slot, token: int, logits: bool) -> None:
            nonlocal n
            batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, len(slot.cached), 1
            batch.seq_id[n][0], batch.logits[n] = slot.seq_id, logits
            slot.cached.append(token)
            if logits:
                slot.logits_at = n
            n += 1

        active = [s for s in self._slots if s.request is not None]
        for slot in active:
            slot.logits_at = -1
            if not slot.pending:
                add(slot, slot.answer[-1], True)
        for slot in active:
            take = slot.pending[: self._n_batch - n]
            for i, token in enumerate(take):
                add(slot, token, i == len(slot.pending) - 1)
            slot.pending = slot.pending[len(take):]
        batch.n_tokens = n
        code = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code} (batch of {n} tokens, {len(active)} requests)")
        for slot in active:
            if slot.logits_at >= 0:
                self._sample(slot)

    def _sample(self, slot: _Slot) -> None:
        request = slot.request
        token = slot.sampler.sample(self._ctx, slot.logits_at)  # also accepts it into the penalty history
        eog = self._llama_cpp.llama_vocab_is_eog(self._model.vocab, token)
        if not eog:
            slot.answer.append(token)
        text = self._model.detokenize(slot.answer).decode("utf-8", errors="ignore")
        cut = min((text.find(s) for s in request.stop if s in text), default=-1)
        if eog or cut >= 0:
            self._finish(slot, text[:cut] if cut >= 0 else text, "stop")
        elif len(slot.answer) >= request.max_tokens:
            self._finish(slot, text, "length")

    def _finish(self, slot: _Slot, text: str, reason: str) -> None:
        request = slot.request
        usage = SimpleNamespace(prompt_tokens=len(request.prompt), completion_tokens=len(slot.answer),
                                total_tokens=len(request.prompt) + len(slot.answer))
        slot.sampler.close()
        slot.request, slot.sampler = None, None  # the KV cache keeps prompt + answer for the next prefix match
        request.future.set_result(SimpleNamespace(choices=[SimpleNamespace(text=text, finish_reason=reason)],
                                                  usage=usage))
