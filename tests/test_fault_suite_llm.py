"""The LLM fault scenarios through the real CLI: exit codes and the one line the user sees, partial banks
never filed as final results, the bank's content in a generate-then-fuse identity, and the API key
never written anywhere. Fast ones call `cli.main` in-process; the whole subprocess suite
(`scripts/fault_suite_llm.py`, kill -9 and two processes included) is the slow test at the end.
"""

from __future__ import annotations

import gzip
import logging
import re
import sys
from pathlib import Path

import pytest
from fault_stub import fault_stub

from mteb_steer.cli import EXIT_INCOMPLETE, EXIT_LLM, main
from mteb_steer.steering import llm_server
from mteb_steer.steering.generated_fusion import GeneratedQueryFusion, task_passages
from mteb_steer.steering.generation import GenConfig, generate, import_bank
from mteb_steer.tasks import resolve_task

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import fault_suite_llm as suite  # noqa: E402

MODEL = suite.MODEL


@pytest.fixture
def folder(tmp_path) -> Path:
    return suite.tiny_scifact(tmp_path)


def _generate(folder: Path, url: str, cache: Path, *extra: str) -> int:
    return main(["generate", "-t", str(folder), "--llm-base-url", url, "--llm-model", MODEL, "--cache-dir", str(cache),
                 "--llm-timeout", "2", *extra])


def _evaluate(folder: Path, url: str, tmp_path: Path, *extra: str) -> int:
    return main(["evaluate", "-t", str(folder), "--fusion", "mean", "--alpha", "0.5", "--llm-base-url", url,
                 "--llm-model", MODEL, "--cache-dir", str(tmp_path / "cache"), "--llm-retries", "0",
                 "--output-folder", str(tmp_path / "out"), "--embedding-cache", str(tmp_path / "emb"), *extra])


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("mteb-steer: error")]


def test_dead_endpoint_exits_3_with_one_line(folder, tmp_path, capsys):
    url = f"http://127.0.0.1:{llm_server.free_port()}/v1"
    assert _generate(folder, url, tmp_path / "cache") == EXIT_LLM
    err = capsys.readouterr().err
    assert _error_lines(err) == [line for line in err.splitlines() if line.strip()]  # nothing but the one line
    assert len(_error_lines(err)) == 1 and url in err and "start the LLM server" in err


def test_failed_passages_exit_4_unless_allowed_and_a_rerun_retries_only_them(folder, tmp_path, capsys):
    cache = tmp_path / "cache"
    with fault_stub(script=["ok"] * 10 + ["garbage"] * 2, echo=True) as (url, stub):
        assert _generate(folder, url, cache, "--llm-retries", "0") == EXIT_INCOMPLETE
    err = capsys.readouterr().err
    assert re.search(r"2 of 25 passages got no queries .*rerun to retry them.*--allow-failed-passages", err)
    with fault_stub(default="garbage", echo=True) as (url, stub):
        assert _generate(folder, url, cache, "--llm-retries", "0", "--allow-failed-passages") == 0
        assert len(stub.requests) == 2
    with fault_stub(echo=True) as (url, stub):
        assert _generate(folder, url, cache) == 0
        assert len(stub.requests) == 2  # the 23 finished passages are not asked again


def test_evaluate_never_files_a_partial_bank_as_the_final_result(folder, tmp_path, capsys):
    out = tmp_path / "out"
    with fault_stub(script=["ok"] * 20 + ["garbage"] * 2, echo=True) as (url, _):
        assert _evaluate(folder, url, tmp_path) == EXIT_INCOMPLETE
    assert "2 of 25 passages got no queries" in capsys.readouterr().err
    assert not [p for p in out.rglob("*.json") if p.name not in ("model_meta.json", "steer_config.json")]
    with fault_stub(default="garbage", echo=True) as (url, _):
        assert _evaluate(folder, url, tmp_path, "--allow-failed-passages") == 0
    partial = re.search(r"model: (\S+) @ (\S+)", capsys.readouterr().err)
    assert "partial23of25" in partial.group(1)
    with fault_stub(echo=True) as (url, stub):  # healthy again: the gaps are retried, a new revision is computed
        assert _evaluate(folder, url, tmp_path) == 0
        assert len(stub.requests) == 2
    captured = capsys.readouterr()
    complete = re.search(r"model: (\S+) @ (\S+)", captured.err)
    assert "partial" not in complete.group(1) and complete.group(2) != partial.group(2)
    assert "cached" not in captured.out


def test_generate_then_fuse_identity_tracks_the_bank_content(folder, tmp_path):
    passages = task_passages(resolve_task(str(folder)))
    config = GenConfig(model=MODEL, retries=0, timeout=2.0)
    with fault_stub(echo=True) as (url, _):
        first = GeneratedQueryFusion(config, tmp_path, passages=passages, base_url=url, strength=0.5,
                                     show_progress=False).describe()
        again = GeneratedQueryFusion(config, tmp_path, passages=passages, base_url=url, strength=0.5,
                                     show_progress=False).describe()
    assert first == again and first["coverage"] == [25, 25] and first["partial"] is False
    doc_id = next(iter(passages))
    bank_file = tmp_path / "edited.jsonl"
    bank_file.write_text(f'{{"id": "{doc_id}", "queries": ["an edited query about something else"]}}\n')
    assert import_bank(bank_file, passages, config, tmp_path, overwrite=True) == 1
    with fault_stub() as (url, stub):
        changed = GeneratedQueryFusion(config, tmp_path, passages=passages, base_url=url, strength=0.5,
                                       show_progress=False).describe()
        assert stub.requests == []
    assert changed["bank"] != first["bank"] and changed["generator"] == first["generator"]


def _read_all(path: Path) -> bytes:
    blob = path.read_bytes()
    return blob + gzip.decompress(blob) if path.suffix == ".gz" else blob


def test_api_key_never_reaches_files_logs_or_messages(folder, tmp_path, capsys, caplog, monkeypatch):
    key = suite.SECRET
    monkeypatch.setenv("OPENAI_API_KEY", key)
    caplog.set_level(logging.DEBUG)
    bank = tmp_path / "bank.jsonl.gz"
    with fault_stub(key=key, echo=True) as (url, stub):
        assert _generate(folder, url, tmp_path / "cache", "--export", str(bank)) == 0
        assert _evaluate(folder, url, tmp_path) == 0
    assert stub.auth and set(stub.auth) == {f"Bearer {key}"}  # the key was used...
    with fault_stub(key="sk-another-key") as (url, _):  # ...and a 401 whose body echoes it
        assert _generate(folder, url, tmp_path / "cache2") == EXIT_LLM
    captured = capsys.readouterr()
    written = [p for p in tmp_path.rglob("*") if p.is_file() and folder not in p.parents]
    assert any(p.name == "steer_config.json" for p in written) and any(p.name == "cache.db" for p in written)
    assert [p for p in written if key.encode() in _read_all(p)] == []
    assert key not in captured.out + captured.err and key not in caplog.text
    assert "rejected the API key" in captured.err


EXPECTED = {  # scenario function -> (exit code, most requests it may send)
    "nothing_listening": (EXIT_LLM, 0), "http_500": (EXIT_LLM, 9), "http_429_retry_after": (0, 28),
    "http_429_no_retry_after": (0, 28), "invalid_json": (EXIT_LLM, 9), "no_usable_queries": (EXIT_LLM, 32),
    "some_passages_fail_then_rerun": (EXIT_INCOMPLETE, 27), "timeout_everything": (EXIT_LLM, 0),
    "timeout_completions": (EXIT_LLM, 9), "endpoint_dies_mid_run": (EXIT_LLM, 40), "wrong_key": (EXIT_LLM, 0),
    "kill9_then_rerun": (-9, 40), "two_processes_one_cache": (0, 25),
    "evaluate_with_failed_passages": (EXIT_INCOMPLETE, 29), "secret_never_written": (EXIT_LLM, 25),
}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", suite.SCENARIOS, ids=lambda s: s.__name__)
def test_fault_scenario_through_the_cli(scenario, tmp_path):
    record = scenario(tmp_path)
    exit_code, most_requests = EXPECTED[scenario.__name__]
    assert record["exit_code"] == exit_code and record["requests_sent"] <= most_requests
    # lost: answers the server delivered that are not cached; only a kill -9 loses some (those in flight)
    assert record["lost"] <= (GenConfig().concurrency if scenario.__name__ == "kill9_then_rerun" else 0)
    assert record["user_sees"]
    assert "Traceback" not in record["user_sees"]
    if "rerun_requests" in record:
        assert record.get("repeated_for_finished", 0) == 0 and record["rerun_exit_code"] == 0
    if scenario.__name__ == "secret_never_written":
        assert record["files_holding_key"] == [] and record["outputs_holding_key"] == 0
        assert record["exit_codes"] == [0, 0, EXIT_LLM] and record["key_was_sent"] > 0
