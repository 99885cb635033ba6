"""Every process, data and flag scenario of the fault suite (scripts/fault_suite.py), asserted.

Each test runs the real CLI as a subprocess on a tiny real SciFact slice, exactly as the suite
does, and checks what the user is told: one line naming the input, exit code 2, no traceback;
for the kill scenarios, that a rerun finishes and nothing torn is read back.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import fault_suite  # noqa: E402


def _user_error(record: dict, *needles: str) -> None:
    assert record["exit_code"] == 2, record
    assert not record["user_sees"].startswith(("TRACEBACK", "SCENARIO FAILED")), record
    assert "error:" in record["user_sees"], record
    for needle in needles:
        assert needle in record["user_sees"], (needle, record)


@pytest.mark.parametrize("scenario", fault_suite.FLAG_SCENARIOS, ids=lambda s: s.__name__)
def test_flag_faults_are_one_line_before_any_data(scenario, tmp_path):
    record = scenario(tmp_path)
    flag = [word for word in record["scenario"].split("(")[1].split() if word.startswith("--")][-1]
    _user_error(record, flag.rstrip(")"))  # the error names the offending (last) flag
    assert "(see mteb-steer" in record["user_sees"] or "need" in record["user_sees"] or "used only" in \
        record["user_sees"] or "does not apply" in record["user_sees"], record


def test_unknown_task_name_suggests_the_close_one(tmp_path, data_root):
    _user_error(fault_suite.unknown_task_name(tmp_path), "SciFcat", "SciFact")


def test_hub_task_offline_says_so_at_once(tmp_path, data_root):
    record = fault_suite.hub_task_offline(tmp_path)
    _user_error(record, "NFCorpus", "need network", "-t PATH", "--data-root")


def test_hub_model_offline_says_so_at_once(tmp_path, data_root):
    _user_error(fault_suite.hub_model_offline(tmp_path), "BAAI/bge-small-en-v1.5", "need network", "-m PATH")


def test_not_a_beir_folder(tmp_path, data_root):
    _user_error(fault_suite.not_a_beir_folder(tmp_path), "is not a BEIR folder", "corpus.jsonl")


def test_corpus_line_not_json_names_file_and_line(tmp_path, data_root):
    _user_error(fault_suite.corpus_line_not_json(tmp_path), "corpus.jsonl:8", "not valid JSON")


def test_empty_corpus(tmp_path, data_root):
    _user_error(fault_suite.empty_corpus(tmp_path), "corpus.jsonl", "empty")


def test_unknown_qrels_ids_warn_and_evaluate(tmp_path, data_root):
    record = fault_suite.qrels_unknown_ids(tmp_path)
    assert record["exit_code"] == 0, record
    assert "2 of" in record["user_sees"] and "absent from the corpus" in record["user_sees"], record
    assert "no-such-doc" in record["user_sees"], record


def test_bank_for_another_corpus(tmp_path, data_root):
    _user_error(fault_suite.bank_for_another_corpus(tmp_path), "bank.jsonl", "share no id with the corpus")


def test_bank_with_a_broken_line(tmp_path, data_root):
    _user_error(fault_suite.bank_broken_line(tmp_path), "bank.jsonl:2", "not valid JSON")


@pytest.mark.parametrize("scenario, flag", [(fault_suite.read_only_output_folder, "--output-folder"),
                                            (fault_suite.read_only_embedding_cache, "--embedding-cache")])
def test_read_only_folders_are_refused_before_any_work(scenario, flag, tmp_path, data_root):
    record = scenario(tmp_path)
    if record["exit_code"] is None:
        pytest.skip(record["user_sees"])
    _user_error(record, flag, "cannot write")


def test_full_output_folder_is_one_line_and_leaves_nothing_torn(tmp_path, data_root):
    record = fault_suite.full_output_folder(tmp_path)
    if record["exit_code"] is None:
        pytest.skip(record["user_sees"])
    _user_error(record, "No space left on device")
    assert record["lost"].endswith("torn result files left: 0"), record


def test_corrupt_result_file_is_named_and_overwrite_recomputes(tmp_path, data_root):
    record = fault_suite.corrupt_result_json(tmp_path)
    _user_error(record, "not valid JSON", "--overwrite", "LocalTiny")
    assert record["user_sees"].endswith("with --overwrite: exit 0"), record


@pytest.mark.slow
def test_kill_during_corpus_encoding_then_rerun(tmp_path, data_root):
    record = fault_suite.kill_during_corpus_encoding(tmp_path)
    assert record["exit_code"] == 0, record
    assert "kill came too late" not in record["lost"], record
    assert record["lost"].startswith("passages encoded again after the kill: 0 committed ones"), record  # resumed
    assert "0 unreadable result files" in record["lost"], record


@pytest.mark.slow
def test_kill_during_adapter_training_then_rerun(tmp_path, data_root):
    record = fault_suite.kill_during_adapter_training(tmp_path)
    assert record["exit_code"] == 0, record
    assert "0 new text sets encoded" in record["user_sees"], record  # pair vectors came from the cache
    assert "no adapter folder" in record["user_sees"], record


@pytest.mark.slow
def test_kill_during_result_writing_never_leaves_a_torn_file(tmp_path, data_root):
    record = fault_suite.kill_during_result_writing(tmp_path, attempts=3)
    assert record["exit_code"] == 0, record
    assert "half-written result files read back: 0;" in record["user_sees"], record  # a temp file may stay: never read


@pytest.mark.slow
def test_two_evaluations_on_one_folder(tmp_path, data_root):
    record = fault_suite.two_evaluations_same_folder(tmp_path)
    assert record["exit_code"] == 0, record
    assert "tracebacks: 0" in record["user_sees"] and "unreadable: 0" in record["user_sees"], record


def test_suite_writes_json_and_table(tmp_path, data_root):
    records = fault_suite.run_scenarios([fault_suite.FLAG_SCENARIOS[0]])
    table = fault_suite.markdown(records, "python scripts/fault_suite.py --only x")
    assert set(records[0]) >= {"scenario", "user_sees", "exit_code", "requests_sent", "lost"}
    assert "| flags: strength out of range" in table and "| 2 |" in table
