"""`mteb-steer submit` on real results: a plain and a steered model evaluated on a real SciFact slice."""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

from mteb_steer.results import evaluate_tasks
from mteb_steer.search import SteerSearch
from mteb_steer.steering.banks import load_bank
from mteb_steer.steering.fusion import QueryFusion
from mteb_steer.steering.lexical import LexicalHybrid
from mteb_steer.submit import (
    SubmitError,
    add_submit_parser,
    check_folder,
    check_snippet,
    meta_snippet,
    prepare_submission,
)
from mteb_steer.tasks import resolve_task

PLAIN = "sentence-transformers/all-MiniLM-L6-v2"
PLAIN_REVISION = "8b3219a92973c328a8e22fadcfa821b5dc75636a"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, encoder, scifact_slice):
    """A results tree written by evaluate_tasks: plain and lexical-hybrid MiniLM on the real SciFact slice
    (as the MTEB task SciFact), and the plain model on the same slice as a local, non-MTEB folder task."""
    root = tmp_path_factory.mktemp("evaluated")
    scifact = resolve_task("SciFact", scifact_slice.parent)
    plain = SteerSearch(encoder)
    hybrid = SteerSearch(encoder, score_fusion=LexicalHybrid(weight=0.3, fusion="zscore"))
    for model in (plain, hybrid):
        evaluate_tasks(model, [scifact], root, show_progress_bar=False)
    evaluate_tasks(plain, [resolve_task(str(scifact_slice))], root, show_progress_bar=False)
    return root, plain.mteb_model_meta, hybrid.mteb_model_meta


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mteb-steer")
    add_submit_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_plain_result_becomes_a_clean_submission(evaluated, tmp_path):
    root, meta, _ = evaluated
    report = prepare_submission(PLAIN, tmp_path / "sub", output_folder=root)
    assert report.ok, report.format()
    folder = tmp_path / "sub" / "results" / "sentence-transformers__all-MiniLM-L6-v2" / PLAIN_REVISION
    assert report.folder == folder
    assert sorted(p.name for p in folder.iterdir()) == ["SciFact.json", "model_meta.json", "run_settings.jsonl"]
    assert report.copied == ["SciFact"]
    # the local folder task is not a leaderboard task: reported, not copied
    assert any("LocalScifact-" in w and "not an MTEB task" in w for w in report.warnings)
    assert not any("registry" in w for w in report.warnings)  # the plain model is in mteb's registry
    source = json.loads((root / "results" / folder.parent.name / PLAIN_REVISION / "SciFact.json").read_text())
    assert json.loads((folder / "SciFact.json").read_text())["scores"] == source["scores"]
    assert check_snippet(report.snippet.read_text(), meta) == []


def test_steered_result_through_the_cli(evaluated, tmp_path, capsys):
    root, _, meta = evaluated
    source = root / "results" / meta.model_name_as_path() / meta.revision
    if not (source / "steer_config.json").exists():  # results.evaluate_tasks writes it beside the results
        (source / "steer_config.json").write_text(json.dumps({"base": PLAIN, "steps": [{"tag": "bm25"}]}))
    out = tmp_path / "sub"
    assert _run_cli(["submit", "-m", meta.name, "--out", str(out), "--output-folder", str(root)]) == 0
    printed = capsys.readouterr().out
    assert "checks passed" in printed and "not in mteb's own model registry" in printed
    assert "merges results only of models in mteb's registry" in printed  # said plainly, even when checks pass
    folder = out / "results" / meta.model_name_as_path() / meta.revision
    assert (folder / "SciFact.json").is_file() and not (folder / "steer_config.json").exists()
    assert json.loads((out / "steer_config.json").read_text()) == json.loads((source / "steer_config.json").read_text())
    snippet = (out / "model_meta.py").read_text()
    assert f"adapted_from={PLAIN!r}" in snippet and f"revision={meta.revision!r}" in snippet
    assert "# what the configuration resolved to" in snippet


def test_auto_fusion_files_what_it_chose_and_submit_carries_it(tmp_path, encoder, arguana_slice, data_root):
    """An `auto` strength is chosen on the corpus at index time: the choice is filed beside the result
    (steer_fit.json), survives a read-back run, and travels with the submission, outside results/."""
    bank = load_bank(data_root / "arguana-genq")
    task = resolve_task("ArguAna", arguana_slice.parent)
    model = SteerSearch(encoder, corpus_steps=[QueryFusion(bank, "mean")])
    [score] = evaluate_tasks(model, [task], tmp_path / "out", show_progress_bar=False)
    fits = json.loads((score.path.parent / "steer_fit.json").read_text())
    choice = fits["ArguAna"]["fuse-mean-aauto"]
    assert choice == asdict(model.corpus_steps[0].selections["ArguAna"])
    assert choice["parameter"] == "alpha" and choice["chosen"] in choice["grid"]
    assert len(choice["scores"]) == len(choice["grid"]) and choice["heldout_queries"] > 0
    again = SteerSearch(encoder, corpus_steps=[QueryFusion(bank, "mean")])
    [reread] = evaluate_tasks(again, [task], tmp_path / "out", show_progress_bar=False)
    assert reread.reused and reread.ndcg_at_10 == score.ndcg_at_10
    assert json.loads((score.path.parent / "steer_fit.json").read_text()) == fits
    report = prepare_submission(model.mteb_model_meta.name, tmp_path / "sub", output_folder=tmp_path / "out")
    assert report.ok, report.format()
    assert json.loads((tmp_path / "sub" / "steer_fit.json").read_text()) == fits
    assert not (report.folder / "steer_fit.json").exists() and not any("steer_fit" in w for w in report.warnings)


def test_snippet_check_catches_a_different_meta(evaluated):
    _, plain, hybrid = evaluated
    for meta in (plain, hybrid):
        assert check_snippet(meta_snippet(meta), meta) == []
    wrong = hybrid.model_copy(update={"revision": "0" * 12})
    assert check_snippet(meta_snippet(hybrid), wrong) == ["model_meta.py differs from model_meta.json in ['revision']"]


def _break_rename_model(folder: Path) -> Path:
    (folder.parent.parent / "someone__else").mkdir()
    return folder.rename(folder.parent.parent / "someone__else" / folder.name)


def _break_no_revision(folder: Path) -> Path:
    return folder.rename(folder.parent / "no_revision_available")


def _break_run_settings(folder: Path) -> Path:
    (folder / "run_settings.jsonl").unlink()
    return folder


def _break_old_mteb(folder: Path) -> Path:
    path = folder / "run_settings.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for entry in entries:
        entry["version"]["mteb"] = "1.38.0"
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return folder


def _break_oversized(folder: Path) -> Path:
    path = folder / "SciFact.json"  # still valid JSON: trailing whitespace up to 10 MB + 1 byte
    path.write_text(path.read_text() + " " * (10 * 1024 * 1024 + 1 - path.stat().st_size))
    return folder


def _break_extra_file(folder: Path) -> Path:
    (folder / "notes.txt").write_text("not a result\n")
    return folder


def _break_uncovered_split(folder: Path) -> Path:
    path = folder / "run_settings.jsonl"
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()
                            if line.strip() and json.loads(line)["task"] != "SciFact")
                    + json.dumps({"task": "SciFact", "splits": ["train"], "subsets": ["default"],
                                  "version": {"mteb": "2.26.24"}}) + "\n")
    return folder


def _break_task_name(folder: Path) -> Path:
    (folder / "SciFact.json").rename(folder / "NFCorpus.json")
    return folder


def _break_json(folder: Path) -> Path:
    (folder / "SciFact.json").write_text("{not json")
    return folder


def _break_meta(folder: Path) -> Path:
    (folder / "model_meta.json").unlink()
    return folder


@pytest.mark.parametrize(("breaker", "expected"), [
    (_break_rename_model, "model folder 'someone__else'"),
    (_break_no_revision, "not no_revision_available"),
    (_break_run_settings, "run_settings.jsonl is missing"),
    (_break_old_mteb, "needs > 2.0.0"),
    (_break_oversized, "over the results repository's 10 MB file limit"),
    (_break_extra_file, "notes.txt: extra file"),
    (_break_uncovered_split, "['test/default'] not covered by run_settings.jsonl"),
    (_break_task_name, "task_name 'SciFact' does not match the file name"),
    (_break_json, "SciFact.json is not a valid mteb TaskResult"),
    (_break_meta, "no model_meta.json"),
])
def test_broken_folders_are_reported(evaluated, tmp_path, breaker, expected):
    root, _, _ = evaluated
    report = prepare_submission(PLAIN, tmp_path / "sub", output_folder=root)
    assert report.ok and check_folder(report.folder) == ([], [])
    broken = breaker(report.folder)
    errors, _ = check_folder(broken)
    assert any(expected in e for e in errors), errors


def test_unusable_source_fails_before_writing(evaluated, tmp_path):
    root, _, _ = evaluated
    with pytest.raises(SubmitError, match="no result folder for 'org/never-evaluated'"):
        prepare_submission("org/never-evaluated", tmp_path / "sub", output_folder=root)
    loose = tmp_path / "loose" / "rev"
    shutil.copytree(root / "results" / "sentence-transformers__all-MiniLM-L6-v2" / PLAIN_REVISION, loose)
    with pytest.raises(SubmitError, match="expected the layout"):
        prepare_submission(str(loose), tmp_path / "sub", output_folder=root)
    assert not (tmp_path / "sub").exists()
