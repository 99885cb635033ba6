"""Query generation: parsing and input checks, faults against a loopback stub, and the real thing
(a llama.cpp server with SmolLM2-135M) for generation, caching, resume, banks and the embedded default.

Request counts on the real server are taken by a counting proxy in front of it (server side).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import diskcache
import pytest
from conftest_llm import CountingProxy, smollm2_gguf
from fault_stub import fault_stub
from hypothesis import given, settings
from hypothesis import strategies as st

from mteb_steer.beir import load_beir_split
from mteb_steer.steering import generation, llm_server
from mteb_steer.steering.banks import BankError, load_bank, load_bank_metadata
from mteb_steer.steering.generation import (
    CHARS_PER_TOKEN,
    GenConfig,
    few_shot_prompt,
    UnparseableOutput,
    export_bank,
    generate,
    import_bank,
    parse_queries,
    prepare_passages,
    resume_from_bank,
    truncate_passage,
)
from mteb_steer.steering.llm_cache import CLAIM_PREFIX, cache_key
from mteb_steer.steering.llm_client import EndpointError, backoff_delay
from mteb_steer.steering.llm_server import LLMServerError, LocalServerConfig, local_llm_server
from mteb_steer.steering.query_style import style_form

REPO = Path(__file__).resolve().parent.parent
WIDGETS = "Widgets are small machines assembled from gears and springs in a factory."
# Fast settings for the fault tests: tiny backoff, short timeout.
STUB_CONFIG = GenConfig(model="stub-model", num_queries=3, retries=2, backoff=0.01, backoff_cap=0.05, timeout=1.0,
                        concurrency=2)
# Small, fast settings for the real SmolLM2 server (an instruct model, but it follows the 2-shot prompt).
SMOL_CONFIG = GenConfig(model="smollm2-135m", mode="completion", num_queries=2, max_tokens=40, max_passage_tokens=48,
                        concurrency=1, timeout=300)
SMOL_ONE = replace(SMOL_CONFIG, num_queries=1, max_tokens=24)  # one query: the cheapest real request


@pytest.fixture(scope="module")
def scifact_passages(data_root) -> list[tuple[str, str]]:
    """Three real SciFact passages (id, title + text joined as mteb does)."""
    from mteb_steer.encoder import passage_text  # loads torch and mteb: only the server tests pay for it

    rows = load_beir_split(data_root / "scifact", "test").corpus[:3]
    return [(r["id"], passage_text(r["title"], r["text"])) for r in rows]


# -- parsing and input checks (no server) ------------------------------------------------------------

def test_parse_numbered_list_strips_markers_preamble_duplicates_and_cut_line():
    passage = "Thioredoxin controls CRMP2 phosphorylation and growth cone collapse in neurons."
    answer = ("Here are the queries:\n1. what does thioredoxin do to CRMP2\n2) \"growth cone collapse in neurons\"\n"
              "- What does thioredoxin do to CRMP2\n3. thioredoxin and growth co")
    assert parse_queries(answer, 5, passage, truncated_answer=True) == [
        "what does thioredoxin do to CRMP2", "growth cone collapse in neurons"]
    # not cut: the last line counts; n caps the list
    assert parse_queries(answer, 5, passage)[-1] == "thioredoxin and growth co"
    assert len(parse_queries(answer, 1, passage)) == 1


def test_parse_drops_generic_copied_and_echoed_lines():
    passage = "Thioredoxin controls CRMP2 phosphorylation and growth cone collapse in neurons."
    answer = ("1. why did this occur\n2. what causes coral bleaching\n3. thioredoxin in neurons\n"
              "Passage: growth cone thioredoxin\n4. growth cone collapse")
    # generic (no shared content word), a prompt example, and everything after an echoed "Passage:"
    assert parse_queries(answer, 5, passage) == ["thioredoxin in neurons"]
    assert "why did this occur" in parse_queries(answer, 5, passage, require_overlap=False)
    with pytest.raises(UnparseableOutput, match="no usable query"):
        parse_queries("### @@@ 12\n---", 3, passage)


@settings(max_examples=200, deadline=None)
@given(answer=st.lists(st.sampled_from(["gears", "widgets", "ab", "xyz", " ", "\n", "1.", "2)", "-", ":", '"', "#"]),
                       max_size=60).map("".join),
       n=st.integers(1, 5), cut=st.booleans())
def test_parse_invariants(answer, n, cut):
    try:
        queries = parse_queries(answer, n, WIDGETS, truncated_answer=cut)
    except UnparseableOutput:
        return
    assert 1 <= len(queries) <= n
    assert len({q.lower() for q in queries}) == len(queries)
    assert all(q == q.strip() and not q.endswith(":") and len(re.findall(r"[^\W\d_]{2,}", q)) >= 2 for q in queries)


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab é\n\t")), max_size=500), max_tokens=st.integers(16, 100))
def test_truncate_is_a_bounded_prefix(text, max_tokens):
    cut, was_cut = truncate_passage(text, max_tokens)
    assert text.startswith(cut)
    assert len(cut) <= max_tokens * CHARS_PER_TOKEN
    assert was_cut == (len(text) > max_tokens * CHARS_PER_TOKEN)


@given(attempt=st.integers(0, 20), base=st.floats(0.0, 5.0), cap=st.floats(0.0, 60.0), seed=st.integers(0, 99))
def test_backoff_is_exponential_capped_and_jittered(attempt, base, cap, seed):
    d = min(cap, base * 2.0 ** attempt)
    delay = backoff_delay(attempt, base, cap, random.Random(seed))
    assert d / 2 - 1e-12 <= delay <= d + 1e-12


def test_config_is_checked_and_identity_tracks_output_changing_fields():
    with pytest.raises(ValueError, match="mode must be"):
        GenConfig(mode="instruct")
    with pytest.raises(ValueError, match="2-shot prompt shows 5"):
        GenConfig(num_queries=6)
    with pytest.raises(ValueError, match=r"\{passage\}"):
        GenConfig(prompt="no placeholder")
    with pytest.raises(ValueError, match="not resolved"):
        GenConfig().identity()
    base = GenConfig(model="m")
    changed = [GenConfig(model="m2"), GenConfig(model="m", temperature=0.7), GenConfig(model="m", num_queries=2),
               GenConfig(model="m", mode="chat"), GenConfig(model="m", prompt="Q for {passage}:"),
               GenConfig(model="m", max_passage_tokens=100), GenConfig(model="m", seed=1)]
    keys = {cache_key(c.identity(), "p") for c in [base, *changed]}
    assert len(keys) == 1 + len(changed)
    # transport settings do not change the key
    assert cache_key(GenConfig(model="m", concurrency=9, timeout=5, retries=0).identity(), "p") == cache_key(
        base.identity(), "p")


SCIFACT_STYLE = "Given a scientific claim, retrieve documents that support or refute the claim"
ARGUANA_STYLE = "Given a claim, find documents that refute the claim"


def test_style_form_rule_reads_only_the_style_string():
    assert style_form(SCIFACT_STYLE) == "claim"  # support or refute: verification of a statement
    assert style_form(ARGUANA_STYLE) == "argument"  # refute only: the query takes a side
    assert style_form("Given a debate topic, retrieve the best counter-argument") == "argument"
    assert style_form("Given a financial statement, retrieve related news") == "claim"
    assert style_form("Given a question, retrieve passages that answer the question") == "question"
    assert style_form(None) == "question"


def test_styled_prompts_show_examples_in_the_style_form_and_the_generic_prompt_is_unchanged():
    claim_prompt = few_shot_prompt(3, SCIFACT_STYLE)
    argument_prompt = few_shot_prompt(3, ARGUANA_STYLE)
    generic_question = "does low vitamin D increase the risk of hip fracture in older adults"
    assert "1. Low serum vitamin D is linked to a higher rate of hip fractures in adults over 65." in claim_prompt
    assert "1. Health services should test everyone over 65 for vitamin D deficiency" in argument_prompt
    for styled, style in ((claim_prompt, SCIFACT_STYLE), (argument_prompt, ARGUANA_STYLE)):
        assert generic_question not in styled and "?" not in styled  # no question-form example left to copy
        assert styled.count(style) == 4  # header, and above each of the two examples and the answer
        assert styled.endswith("\n1.")
    chat = GenConfig(model="m", mode="chat", query_style=SCIFACT_STYLE).template()[1]
    assert "a claim: one declarative sentence" in chat and "Low serum vitamin D is linked" in chat
    # the generic prompts' cache identities, recorded before styles were reworked: old banks stay valid
    common = {"model": "m", "prompt_version": "v1", "num_queries": 3, "temperature": 0.2, "top_p": 0.95,
              "max_tokens": 96, "seed": 0, "max_passage_tokens": 768, "require_overlap": True}
    assert GenConfig(model="m").identity() == {**common, "mode": "completion", "prompt_sha": "6332cdeb1d7e8c85"}
    assert GenConfig(model="m", mode="chat").identity() == {**common, "mode": "chat", "prompt_sha": "6d0197c2872b0f0c"}
    assert few_shot_prompt(2).startswith("Each passage below is followed by search queries that it answers.")
    styled = GenConfig(model="m", query_style=ARGUANA_STYLE).identity()
    assert styled["style_prompt_version"] == "style-v2" and styled["max_tokens"] == 3 * 96  # arguments run long


def test_parse_keeps_styled_claims_and_long_arguments():
    passage = ("Judges are capable of delivering consistency. Judges are trained professionals and must demonstrate "
               "competence to be appointed, so they are unlikely to administer random sentences.")
    argument = ("Judges should keep their discretion in sentencing, because trained professionals who must "
                "demonstrate competence to be appointed are far better placed than a fixed table of guidelines "
                "to weigh the circumstances of each crime, and they already follow the precedents of higher courts.")
    answer = f"1. Judges deliver consistent sentences.\n2. {argument}"
    assert parse_queries(answer, 2, passage) == ["Judges deliver consistent sentences.", argument]
    copied = "1. Ocean warming kills coral reefs through bleaching."  # a claim-form example, copied
    with pytest.raises(UnparseableOutput):
        parse_queries(copied, 1, "Ocean warming and coral reefs", require_overlap=False)


def test_duplicate_ids_fail_before_any_request(tmp_path):
    with fault_stub() as (url, stub), pytest.raises(ValueError, match=r"duplicate passage id\(s\) \['a'\]"):
        generate([("a", WIDGETS), ("b", WIDGETS), ("a", "gears")], STUB_CONFIG, tmp_path, base_url=url,
                 show_progress=False)
    assert stub.requests == []


def test_empty_passages_are_skipped_without_request(tmp_path, caplog):
    with fault_stub() as (url, stub), caplog.at_level(logging.WARNING):
        report = generate({"a": "", "b": "  \n ", "c": WIDGETS}, STUB_CONFIG, tmp_path, base_url=url,
                          show_progress=False)
    assert report.empty == ["a", "b"] and list(report.bank) == ["c"]
    assert len(stub.requests) == 1
    assert "skipping 2 empty passage(s)" in caplog.text


def test_long_passages_are_truncated_with_one_warning(tmp_path, caplog):
    long_text = WIDGETS + " " + " ".join(f"filler{i}" for i in range(400)) + " TAILMARKER"
    config = GenConfig(model="stub-model", max_passage_tokens=64, backoff=0.01, timeout=2.0)
    with fault_stub() as (url, stub), caplog.at_level(logging.WARNING):
        report = generate({"x": long_text, "y": long_text, "z": WIDGETS}, config, tmp_path, base_url=url,
                          show_progress=False)
    assert report.truncated == ["x", "y"] and set(report.bank) == {"x", "y", "z"}
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 3 passage(s)" in warnings[0].getMessage()
    prompts = [r["prompt"] for r in stub.requests]
    assert not any("TAILMARKER" in p for p in prompts)
    assert any(prepare_passages({"x": long_text}, 64).items[0][1] in p for p in prompts)


# -- faults (loopback stub) -----------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["429", "500", "stall", "html"])
def test_transient_fault_is_retried_then_succeeds(tmp_path, fault):
    config = GenConfig(model="stub-model", retries=2, backoff=0.01, backoff_cap=0.05, timeout=0.5)
    with fault_stub(script=[fault], stall_s=2.0) as (url, stub):
        report = generate({"w": WIDGETS}, config, tmp_path, base_url=url, show_progress=False)
    assert report.failures == {}
    assert report.bank == {"w": ["how are widgets made from gears", "what holds widgets together",
                                 "widgets and gears in machines"]}
    assert len(stub.requests) == 2 and report.requests == 2


def test_retries_run_out_on_persistent_5xx(tmp_path):
    with fault_stub(default="500") as (url, stub):
        report = generate({"w": WIDGETS}, STUB_CONFIG, tmp_path, base_url=url, show_progress=False)
    assert len(stub.requests) == STUB_CONFIG.retries + 1
    assert "passage 'w'" in report.failures["w"] and "HTTP 500" in report.failures["w"]


def test_garbage_is_a_named_failure_not_cached_and_retried_on_rerun(tmp_path):
    passages = {"good": WIDGETS, "bad": " ".join(["Gears and widgets again, a long passage about widgets."] * 40)}
    # concurrency 1: "good" asks first and gets ok, then every answer for "bad" is garbage
    config = GenConfig(model="stub-model", retries=2, backoff=0.01, timeout=1.0, concurrency=1)
    with fault_stub(script=["ok"], default="garbage") as (url, stub):
        report = generate(passages, config, tmp_path, base_url=url, show_progress=False)
    assert list(report.bank) == ["good"]
    assert set(report.failures) == {"bad"}
    assert "passage 'bad'" in report.failures["bad"] and "unparseable output after 3 attempt" in report.failures["bad"]
    assert len(stub.requests) == 1 + 3
    # each parse retry asks with another seed (a temperature-0 endpoint would repeat itself) and half the passage
    assert [r["seed"] for r in stub.requests[1:]] == [0, 1, 2]
    sizes = [len(r["prompt"]) for r in stub.requests[1:]]
    assert sizes[0] > sizes[1] > sizes[2]
    with fault_stub() as (url, stub):  # the endpoint recovered: only the failed passage is asked again
        again = generate(passages, config, tmp_path, base_url=url, show_progress=False)
    assert len(stub.requests) == 1 and again.cached == 1 and set(again.bank) == {"good", "bad"}


def test_auth_error_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-4711")
    with fault_stub(default="401") as (url, stub), pytest.raises(EndpointError, match="rejected the API key") as err:
        generate({f"p{i}": f"{WIDGETS} ({i})" for i in range(10)}, STUB_CONFIG, tmp_path, base_url=url,
                 show_progress=False)
    # no retry, and the run stops: at most the requests already handed to the threads
    assert 1 <= len(stub.requests) <= 2 * STUB_CONFIG.concurrency
    assert url in str(err.value) and "4711" not in str(err.value)  # the stub echoed the key; the message does not


def test_api_key_is_sent_but_never_stored(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    with fault_stub() as (url, stub):
        report = generate({"w": WIDGETS}, STUB_CONFIG, tmp_path, base_url=url, show_progress=False)
    assert report.bank["w"] and stub.auth == ["Bearer sk-secret-123"]
    stored = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert b"sk-secret-123" not in stored and b"widgets" in stored


def test_published_bank_folder_imports_so_generation_sends_nothing(data_root, tmp_path):
    genq = load_bank(data_root / "arguana-genq")
    rows = [r for r in load_beir_split(data_root / "arguana", "test").corpus if r["id"] in genq][:3]
    passages = {r["id"]: r["text"] for r in rows}
    config = GenConfig(model="docT5query", retries=0, timeout=1.0)
    assert import_bank(data_root / "arguana-genq", passages, config, tmp_path) == 3
    dead = f"http://127.0.0.1:{llm_server.free_port()}/v1"  # nothing listens: any request would fail
    report = generate(passages, config, tmp_path, base_url=dead, show_progress=False)
    assert report.requests == 0 and report.failures == {}
    assert report.bank == {doc_id: genq[doc_id] for doc_id in passages}


def test_resume_from_an_exported_partial_bank_skips_its_passages_and_refuses_another_generator(
        data_root, tmp_path):
    genq = load_bank(data_root / "arguana-genq")
    rows = [r for r in load_beir_split(data_root / "arguana", "test").corpus if r["id"] in genq][:4]
    passages = {r["id"]: r["text"] for r in rows}
    styled = GenConfig(model="gemma", query_style="Given a claim, find documents that refute the claim",
                       retries=0, timeout=1.0)
    first_machine, partial = tmp_path / "first", tmp_path / "partial.jsonl.gz"
    done = dict(list(passages.items())[:3])  # the run stopped after three passages
    import_bank(data_root / "arguana-genq", done, styled, first_machine)
    export_bank(passages, styled, first_machine, partial)

    second_machine = tmp_path / "second"
    assert resume_from_bank(partial, passages, styled, second_machine) == 3
    dead = f"http://127.0.0.1:{llm_server.free_port()}/v1"  # nothing listens: any request would fail
    report = generate(done, styled, second_machine, base_url=dead, show_progress=False)
    assert report.requests == 0 and report.bank == {doc_id: genq[doc_id] for doc_id in done}
    export_bank(passages, styled, second_machine, tmp_path / "again.jsonl.gz")  # its usage says what it covers
    assert load_bank_metadata(tmp_path / "again.jsonl.gz")["llm_usage"] == {
        "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "imported_passages": 3}
    with pytest.raises(EndpointError, match="nothing answers"):  # the fourth passage still needs the LLM
        generate(passages, styled, second_machine, base_url=dead, show_progress=False)

    for other, field_name in ((replace(styled, query_style=None), "query_style"),
                              (replace(styled, temperature=0.7), "temperature")):
        with pytest.raises(BankError, match=f"another generator.*{field_name}"):
            resume_from_bank(partial, passages, other, tmp_path / "third")
    with pytest.raises(BankError, match="no generator metadata"):
        resume_from_bank(data_root / "arguana-genq", passages, styled, tmp_path / "third")
    assert not (tmp_path / "third").exists() or _entries(tmp_path / "third") == 0


def test_server_errors_are_clear_before_starting(monkeypatch, tmp_path):
    missing = LocalServerConfig(model_path=str(tmp_path / "missing.gguf"))
    with pytest.raises(LLMServerError, match="GGUF model file not found"), local_llm_server(missing):
        pass
    monkeypatch.setattr(llm_server, "_SERVER_MODULES", ("llama_cpp", "no_such_module_for_test"))
    with pytest.raises(LLMServerError, match=r"no_such_module_for_test.*mteb-steer\[llm\]"):
        llm_server.require_llama_server()


# -- the real server (llama.cpp + SmolLM2) ----------------------------------------------------------------

@pytest.fixture(scope="session")
def llama_smollm2() -> Iterator[tuple[str, CountingProxy]]:
    """(base URL through the counting proxy, proxy) of a real llama.cpp server running SmolLM2-135M.

    One thread: on a shared 2-core machine llama.cpp's multi-thread barriers stall badly.
    """
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (extra `mteb-steer[llm]`) is not installed")
    config = LocalServerConfig(model_path=str(smollm2_gguf()), alias="smollm2-135m", n_ctx=1024, n_threads=1)
    with local_llm_server(config) as base_url:
        upstream = base_url.removesuffix("/v1")
        with CountingProxy(upstream) as proxy:
            yield proxy.url + "/v1", proxy


def _llama_children() -> set[int]:
    """PIDs of llama.cpp servers this test process started (read from /proc)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "stat").read_text().split()[3] == str(os.getpid()) and \
                    b"llama_cpp.server" in (proc / "cmdline").read_bytes():
                pids.add(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.llm
def test_real_server_generates_parsed_queries_and_rerun_sends_nothing(llama_smollm2, scifact_passages, tmp_path):
    url, proxy = llama_smollm2
    passages, cache_dir = scifact_passages[:2], tmp_path / "cache"
    before = proxy.total
    first = generate(passages, SMOL_CONFIG, cache_dir, base_url=url, show_progress=False)
    assert proxy.total - before == first.requests >= len(passages)
    assert first.failures == {} and list(first.bank) == [doc_id for doc_id, _ in passages]
    for doc_id, text in passages:
        queries = first.bank[doc_id]
        assert 1 <= len(queries) <= SMOL_CONFIG.num_queries
        assert all(isinstance(q, str) and q and not q[0].isdigit() and "Passage:" not in q for q in queries)
    assert first.prompt_tokens > 0 and first.completion_tokens > 0
    before = proxy.total
    second = generate(passages, SMOL_CONFIG, cache_dir, base_url=url, show_progress=False)
    assert proxy.total == before and second.requests == 0  # counted on the server side
    assert second.bank == first.bank and second.cached == len(passages)

    # the bank round trip: export, import into an empty cache, and a run there sends nothing either
    bank_path = tmp_path / "bank.jsonl.gz"
    assert export_bank(passages, SMOL_CONFIG, cache_dir, bank_path) == first.bank
    assert load_bank(bank_path) == first.bank
    meta = load_bank_metadata(bank_path)
    assert meta["generator"]["model"] == "smollm2-135m" and meta["passages_with_queries"] == len(passages)
    usage = meta["llm_usage"]  # the successful request of each passage (a retried answer costs more)
    assert usage["requests"] == len(passages) <= first.requests and usage["imported_passages"] == 0
    assert 0 < usage["prompt_tokens"] <= first.prompt_tokens and 0 < usage["completion_tokens"] <= first.completion_tokens
    fresh = tmp_path / "fresh"
    assert import_bank(bank_path, passages, SMOL_CONFIG, fresh) == len(passages)
    third = generate(passages, SMOL_CONFIG, fresh, base_url=url, show_progress=False)
    assert proxy.total == before and third.bank == first.bank


def _entries(cache_dir: Path) -> int:
    if not (cache_dir / "cache.db").exists():
        return 0
    with diskcache.Cache(str(cache_dir)) as cache:  # query entries, not the claims of workers
        return sum(1 for key in cache.iterkeys() if not str(key).startswith(CLAIM_PREFIX))


@pytest.mark.llm
def test_killed_run_resumes_where_it_stopped(llama_smollm2, scifact_passages, tmp_path):
    url, proxy = llama_smollm2
    cache_dir = tmp_path / "cache"
    args = json.dumps({"passages": scifact_passages, "cache": str(cache_dir), "url": url})
    script = ("import json, sys; from mteb_steer.steering.generation import GenConfig, generate; "
              "a = json.loads(sys.argv[1]); generate(a['passages'], GenConfig(model='smollm2-135m', num_queries=1, "
              "max_tokens=24, max_passage_tokens=48, concurrency=1, timeout=300), a['cache'], base_url=a['url'], "
              "show_progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", script, args], cwd=REPO, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and _entries(cache_dir) == 0:
        time.sleep(0.1)
    proc.kill()  # SIGKILL: no cleanup of any kind
    proc.wait()
    done = _entries(cache_dir)
    assert 1 <= done < len(scifact_passages), "the run should have been killed part-way"
    before = proxy.total
    resumed = generate(scifact_passages, SMOL_ONE, cache_dir, base_url=url, show_progress=False)
    assert resumed.cached == done and resumed.generated == len(scifact_passages) - done
    assert proxy.total - before == resumed.requests >= len(scifact_passages) - done
    assert len(resumed.bank) == len(scifact_passages)


@pytest.mark.llm
def test_chat_mode_against_the_instruct_model(llama_smollm2, scifact_passages, tmp_path):
    url, proxy = llama_smollm2
    config = replace(SMOL_ONE, mode="chat", max_tokens=32, require_overlap=False)
    report = generate(scifact_passages[:1], config, tmp_path, base_url=url, show_progress=False)
    assert report.failures == {} and len(report.bank[scifact_passages[0][0]]) == 1
    assert proxy.posts["/v1/chat/completions"] >= 1


@pytest.mark.llm
def test_embedded_model_runs_in_process_for_completion_and_as_a_stopped_server_for_chat(
        llama_smollm2, scifact_passages, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    running = _llama_children()  # the session server
    server = LocalServerConfig(model_path=str(smollm2_gguf()), n_ctx=512, n_threads=1, slots=2)
    config = replace(SMOL_ONE, model=None, concurrency=4)  # the embedded model names the model
    assert generation.embedded_config(config, server).concurrency == 2  # one request per slot
    with monkeypatch.context() as patched:  # completion mode: batched in this process, no server
        patched.setattr(generation, "local_llm_server", None)
        report = generate(scifact_passages[:2], config, tmp_path / "completion", server=server, show_progress=False)
    assert report.requests >= 2 and all(report.bank[doc_id] for doc_id, _ in scifact_passages[:2])
    chat = replace(config, mode="chat", max_tokens=32, require_overlap=False)
    assert generation.embedded_config(chat, server).concurrency == 1  # the server answers one at a time
    report = generate(scifact_passages[:1], chat, tmp_path, server=server, show_progress=False)
    assert report.requests >= 1 and report.bank[scifact_passages[0][0]]
    assert _llama_children() == running
    # a rerun finds everything cached and does not even start a server
    gone = LocalServerConfig(model_path=str(tmp_path / "gone" / smollm2_gguf().name))  # same alias, no file
    assert generate(scifact_passages[:1], chat, tmp_path, server=gone, show_progress=False).requests == 0
    with pytest.raises(ValueError, match="needs --llm-base-url"):
        generate(scifact_passages[:1], GenConfig(model="gpt-4o"), tmp_path, server=server, show_progress=False)


@pytest.mark.llm
def test_local_server_stops_when_the_block_raises(llama_smollm2):
    running = _llama_children()
    config = LocalServerConfig(model_path=str(smollm2_gguf()), n_ctx=512, n_threads=1)
    with pytest.raises(RuntimeError, match="boom"), local_llm_server(config) as url:
        with urllib.request.urlopen(f"{url}/models", timeout=10) as resp:
            assert json.load(resp)["data"][0]["id"] == smollm2_gguf().stem
        raise RuntimeError("boom")
    assert _llama_children() == running
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/models", timeout=2)


@pytest.mark.llm
def test_local_server_dies_with_a_killed_parent(llama_smollm2):
    script = ("import sys, time; from mteb_steer.steering.llm_server import LocalServerConfig, local_llm_server\n"
              "with local_llm_server(LocalServerConfig(model_path=sys.argv[1], n_ctx=256, n_threads=1)) as url:\n"
              "    print(url, flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(smollm2_gguf())], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    url = proc.stdout.readline().strip()
    with urllib.request.urlopen(f"{url}/models", timeout=10) as resp:
        assert resp.status == 200
    proc.kill()  # SIGKILL: no `finally` runs in the parent; the kernel must take the server down
    proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/models", timeout=2).close()
        except (urllib.error.URLError, OSError):
            return
        time.sleep(0.2)
    pytest.fail(f"the llama.cpp server at {url} outlived its killed parent")
