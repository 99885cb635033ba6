"""The in-process batched engine against the real llama.cpp server, both running SmolLM2-135M.

One slot must answer exactly as the server does (same prompt tokens, same sampler chain, greedy):
that is what lets a bank mix answers of the two engines. Several slots must serve concurrent
requests correctly (stop strings, max_tokens, usage), and bad requests fail naming the problem.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from conftest_llm import smollm2_gguf

from mteb_steer.beir import load_beir_split
from mteb_steer.steering.generation import GenConfig, QueryGenerator
from mteb_steer.steering.llama_batched import BatchedLlama
from mteb_steer.steering.llm_client import LLMClient, RequestFailed
from mteb_steer.steering.llm_server import LLMServerError, LocalServerConfig, local_llm_server

pytestmark = pytest.mark.llm

GREEDY = GenConfig(model="smollm2-135m", num_queries=2, max_tokens=40, max_passage_tokens=96, temperature=0.0)


@pytest.fixture(scope="module")
def server() -> LocalServerConfig:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (extra `mteb-steer[llm]`) is not installed")
    return LocalServerConfig(model_path=str(smollm2_gguf()), alias="smollm2-135m", n_ctx=1024, n_threads=1)


@pytest.fixture(scope="module")
def passages(data_root) -> list[str]:
    return [r["text"] for r in load_beir_split(data_root / "scifact", "test").corpus[10:15]]


def _answers(llm, passages: list[str], workers: int) -> list[tuple[str, bool, int, int]]:
    generator = QueryGenerator(GREEDY, llm)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: generator._ask(p, 0), passages))


def test_one_slot_answers_exactly_as_the_llama_cpp_server(server, passages):
    with local_llm_server(server) as url:
        served = _answers(LLMClient(url, None, GREEDY.transport()), passages[:3], 1)
    with BatchedLlama(replace(server, slots=1)) as llm:
        batched = _answers(llm, passages[:3], 1)
        assert llm.requests == 3
    assert batched == served  # text, cut-by-max-tokens flag, prompt and completion tokens


def test_slots_decode_concurrent_requests_with_stops_budgets_and_usage(server, passages):
    with BatchedLlama(replace(server, slots=3)) as llm:
        answers = _answers(llm, passages, 5)  # five requests over three slots: slots are reused
        short = llm.complete(model="smollm2-135m", prompt="Passage: " + passages[0] + "\nQuery 1:",
                             max_tokens=5, temperature=0.0)
        one_line = llm.complete(model="smollm2-135m", prompt="List three fruits, one per line:\n1.",
                                max_tokens=30, temperature=0.0, stop=["\n"])
    for text, cut, prompt_tokens, completion_tokens in answers:
        assert text.startswith("1.") and len(text) > 3 and prompt_tokens > 50
        assert 0 < completion_tokens <= 40 and cut == (completion_tokens == 40)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 5
    assert one_line.choices[0].finish_reason == "stop" and "\n" not in one_line.choices[0].text


def test_bad_requests_fail_naming_the_problem(server, passages, tmp_path):
    with pytest.raises(LLMServerError, match="GGUF model file not found"):
        BatchedLlama(LocalServerConfig(model_path=str(tmp_path / "missing.gguf")))
    with pytest.raises(ValueError, match="slots must be >= 1"):
        BatchedLlama(replace(server, slots=0))
    llm = BatchedLlama(replace(server, n_ctx=64, slots=2))
    with pytest.raises(RequestFailed, match="serves 'smollm2-135m', not 'gpt-4o'"):
        llm.complete(model="gpt-4o", prompt="hi", max_tokens=4)
    with pytest.raises(RequestFailed, match=r"exceed the context window of 64 tokens"):
        llm.complete(model="smollm2-135m", prompt=passages[0], max_tokens=4)
    with pytest.raises(RequestFailed, match="completion mode only"):
        llm.chat(model="smollm2-135m", messages=[{"role": "user", "content": "hi"}])
    llm.close()
    with pytest.raises(LLMServerError, match="is closed"):
        llm.complete(model="smollm2-135m", prompt="hi", max_tokens=4)
