"""The one OpenAI-compatible client of the package: query generation, HyDE and the LLM judge all use it.

Why one: a retry policy, a notion of "this endpoint is dead" and a rule for secrets are only
trustworthy when they exist once.

- `check()` is a health check before any work: nothing listening, a hung server and a rejected
  key each stop the run at once with one line naming the URL and what to do.
- every request retries timeouts, connection errors, 408/409/5xx and bodies that are not OpenAI
  JSON with exponential backoff and jitter; 429 waits what Retry-After asks (backoff without it);
- `max_failures_in_a_row` failed requests with no success in between (over all threads) mean the
  endpoint died: `EndpointError`, the run stops instead of failing every item slowly;
- 401/403/404 are `EndpointError` at once (every other item would fail the same way); other 4xx
  reject this item only (`RequestFailed`), as do attempts used up;
- no message ever holds the API key: it is masked wherever the server echoes it.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import openai

logger = logging.getLogger(__name__)

NO_KEY = "sk-no-key-needed"  # the openai client insists on some key; local servers ignore it
T = TypeVar("T")


class LLMError(RuntimeError):
    """Base of the LLM client's errors; messages name the endpoint, never the key."""


class EndpointError(LLMError):
    """The endpoint cannot serve this run (nothing listens, hung, key rejected, dead mid-run): the run stops."""


class RequestFailed(LLMError):
    """One request failed for good (attempts used up, or rejected as a bad request): record it and go on."""


@dataclass(frozen=True)
class Transport:
    """How requests are sent; nothing here changes what a model answers (so no cache key holds it).

    timeout: seconds for one request (and the health check). retries: extra attempts per request.
    max_failures_in_a_row: failed requests with no success in between that declare the endpoint dead.
    max_retry_after: longest Retry-After (s) honoured; a 429 asking for more stops the run.
    """

    timeout: float = 120.0
    retries: int = 3
    backoff: float = 1.0
    backoff_cap: float = 30.0
    max_failures_in_a_row: int = 5
    max_retry_after: float = 300.0

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.retries < 0 or self.backoff < 0 or self.backoff_cap < 0 \
                or self.max_failures_in_a_row < 1 or self.max_retry_after < 0:
            raise ValueError(f"invalid LLM transport settings: need timeout > 0, retries >= 0, backoff >= 0 and "
                             f"max_failures_in_a_row >= 1 (got timeout={self.timeout}, retries={self.retries}, "
                             f"backoff={self.backoff}, max_failures_in_a_row={self.max_failures_in_a_row})")


@runtime_checkable
class LLM(Protocol):
    """What an LLM caller needs: OpenAI completions and chat completions, retried, with a health check."""

    base_url: str
    requests: int  # attempts sent so far (the client side of a cost report)

    def check(self) -> None: ...

    def complete(self, **params: Any) -> Any: ...

    def chat(self, **params: Any) -> Any: ...


def endpoint_url(base_url: str | None) -> str | None:
    """The endpoint to use: `base_url`, else $OPENAI_BASE_URL, else None (the embedded server)."""
    return base_url or os.environ.get("OPENAI_BASE_URL") or None


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with equal jitter: uniform in [d/2, d], d = min(cap, base * 2**attempt)."""
    d = min(cap, base * 2.0 ** attempt)
    return d / 2 + rng.uniform(0, d / 2)


def retry_after_seconds(headers: Any) -> float | None:
    """The wait a Retry-After header asks for (seconds or an HTTP date), None when absent or unreadable."""
    value = (headers.get("retry-after") or "").strip() if headers is not None else ""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class LLMClient:
    """An OpenAI-compatible endpoint behind the `LLM` protocol; thread-safe, one instance per run.

    The key comes from `api_key`, else $OPENAI_API_KEY, else a placeholder (local servers need none).
    The openai client's own retries are off: this class retries, counts and judges the endpoint.
    """

    def __init__(self, base_url: str, api_key: str | None = None, transport: Transport | None = None) -> None:
        if not base_url:
            raise ValueError("no LLM endpoint: pass --llm-base-url or set OPENAI_BASE_URL")
        self.base_url = base_url.rstrip("/")
        self.transport = transport or Transport()
        self._key = api_key or os.environ.get("OPENAI_API_KEY") or NO_KEY
        self._client = openai.OpenAI(base_url=self.base_url, api_key=self._key, timeout=self.transport.timeout,
                                     max_retries=0)
        self._lock = threading.Lock()
        self._rng = random.Random(0)
        self._in_a_row = 0
        self._dead: EndpointError | None = None
        self.requests = 0

    # -- the protocol ---------------------------------------------------------------------------
    def check(self) -> None:
        """Health check (GET /models) before any work: raises EndpointError when nothing useful answers.

        Any HTTP answer other than 401/403 passes: /models is optional for OpenAI-compatible servers,
        the first real request decides the rest.
        """
        try:
            self._client.models.list()
        except openai.APITimeoutError:
            raise EndpointError(self._message("hung", 0)) from None
        except openai.APIConnectionError as err:
            reason = self._mask(str(err.__cause__ or err))[:120]
            raise EndpointError(f"nothing answers at {self.base_url} ({reason}): start the LLM server, "
                                "or fix --llm-base-url / OPENAI_BASE_URL") from None
        except openai.APIStatusError as err:
            if err.status_code in (401, 403):
                raise EndpointError(self._message("auth", err.status_code)) from None
        except (openai.OpenAIError, ValueError):  # an odd /models body: the first real request decides
            pass

    def complete(self, **params: Any) -> Any:
        """`completions.create(**params)` with this client's retries; the response has >= 1 choice."""
        return self._call(lambda: self._client.completions.create(**params))

    def chat(self, **params: Any) -> Any:
        """`chat.completions.create(**params)` with this client's retries; the response has >= 1 choice."""
        return self._call(lambda: self._client.chat.completions.create(**params))

    # -- retries and the dead-endpoint rule -----------------------------------------------------
    def _mask(self, text: str) -> str:
        return text.replace(self._key, "***") if len(self._key) >= 4 else text

    def _message(self, kind: str, n: int | str) -> str:
        url, t = self.base_url, self.transport.timeout
        return {
            "auth": f"{url} rejected the API key (HTTP {n}): set OPENAI_API_KEY to a key this endpoint accepts",
            "connection": f"nothing answers at {url} any more ({n} connection failure(s) in a row): "
                          "is the LLM server still running? Restart it, then rerun (finished work is cached)",
            "hung": f"{url} accepts connections but sent no answer within {t:g} s: the server is hung or "
                    "overloaded; restart it, or allow more time with --llm-timeout",
            "timeout": f"{url} sent no answer within {t:g} s ({n} request(s) in a row): the server is hung or "
                       "overloaded; restart it, or allow more time with --llm-timeout",
            "status": f"{url} failed {n} request(s) in a row with HTTP 5xx/408/409: see the server's log, "
                      "then rerun (finished work is cached)",
            "body": f"{url} does not answer like an OpenAI API ({n} response(s) in a row were not OpenAI JSON): "
                    "check --llm-base-url (it usually ends in /v1)",
        }[kind]

    def _fatal(self, message: str) -> EndpointError:
        with self._lock:
            self._dead = self._dead or EndpointError(message)
            return self._dead

    def _failed(self, kind: str) -> None:
        with self._lock:
            self._in_a_row += 1
            n = self._in_a_row
        if n >= self.transport.max_failures_in_a_row:
            raise self._fatal(self._message(kind, n))

    def _call(self, send: Callable[[], T]) -> T:
        t = self.transport
        last: str = ""
        for attempt in range(t.retries + 1):
            if self._dead is not None:  # another thread found the endpoint dead: stop at once
                raise self._dead
            with self._lock:
                self.requests += 1
            wait: float | None = None
            try:
                resp = send()
            except openai.APIStatusError as err:
                status = err.status_code
                if status in (401, 403):
                    raise self._fatal(self._message("auth", status)) from None
                if status == 404:
                    raise self._fatal(f"{self.base_url} answered 404 ({self._mask(err.message)[:160]}): check that "
                                      "--llm-base-url ends in /v1 and --llm-model names a model it serves") from None
                last = f"HTTP {status}: {self._mask(err.message)[:200]}"
                if status == 429:
                    wait = retry_after_seconds(err.response.headers)
                    if wait is not None and wait > t.max_retry_after:
                        raise self._fatal(f"{self.base_url} asks to wait {wait:.0f} s (HTTP 429 Retry-After), "
                                          f"more than {t.max_retry_after:g} s: try later or raise your rate limit"
                                          ) from None
                elif status in (408, 409) or status >= 500:
                    self._failed("status")
                else:
                    raise RequestFailed(f"rejected by {self.base_url}: {last}") from None
            except openai.APITimeoutError:
                last = f"no answer within {t.timeout:g} s"
                self._failed("timeout")
            except openai.APIConnectionError as err:
                last = f"connection failed ({self._mask(str(err.__cause__ or err))[:120]})"
                self._failed("connection")
            except ValueError as err:  # a 200 whose body is not JSON
                last = f"response is not JSON ({str(err)[:80]})"
                self._failed("body")
            else:
                if getattr(resp, "choices", None):  # the openai client hands back non-OpenAI bodies as-is
                    with self._lock:
                        self._in_a_row = 0
                    return resp
                last = f"not an OpenAI response: {self._mask(str(resp))[:80]!r}"
                self._failed("body")
            if attempt < t.retries:
                with self._lock:
                    delay = backoff_delay(attempt, t.backoff, t.backoff_cap, self._rng)
                time.sleep(wait if wait is not None else delay)
        raise RequestFailed(f"{last} (after {t.retries + 1} attempt(s))")
