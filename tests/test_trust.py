"""Issue 15 (configuration and data side): build_model's wiring, adapter/base checks, folder task
identity, unknown qrels documents, and result files that a kill cannot tear."""

from __future__ import annotations

import json
import logging
import shutil

import mteb
import numpy as np
import pytest

from mteb_steer.beir import load_beir_split
from mteb_steer.pipeline import SteerConfig, build_encoder, build_model
from mteb_steer.results import AtomicResultCache, check_result_file, evaluate_tasks, result_dir
from mteb_steer.search import SteerSearch
from mteb_steer.steering.adapter import QueryAdapter
from mteb_steer.tasks import BeirFolderTask, local_copy


# -- build_model wiring ---------------------------------------------------------------------------
@pytest.mark.parametrize("task_name, ignores", [("ArguAna", True), ("SciFact", False)])
def test_refinement_gets_the_tasks_identical_id_rule(encoder, arguana_slice, scifact_slice, task_name, ignores):
    folder = arguana_slice if task_name == "ArguAna" else scifact_slice
    task = local_copy(mteb.get_task(task_name), folder)
    model = build_model(SteerConfig(refine_teacher="gold"), encoder=encoder, task=task)
    (step,) = model.query_steps
    assert step.ignore_identical_ids is ignores
    assert step.describe()["ignore_identical_ids"] is ignores  # so it is part of the model's identity


def test_refinement_never_uses_the_querys_own_passage(encoder, arguana_slice):
    """On ArguAna every query is also a passage; with the rule wired, it is never a candidate."""
    task = local_copy(mteb.get_task("ArguAna"), arguana_slice)
    model = build_model(SteerConfig(refine_teacher="gold", refine_steps=1), encoder=encoder, task=task)
    (step,) = model.query_steps
    seen: list[np.ndarray] = []
    score = step.teacher.score
    step.teacher.score = lambda ids, texts, rows, index: (seen.append((list(ids), rows, index)), score(
        ids, texts, rows, index))[1]
    mteb.evaluate(model, task, cache=None, show_progress_bar=False)
    ids, rows, index = seen[0]
    own = [index.id_to_row.get(qid, -1) for qid in ids]
    assert sum(r >= 0 for r in own) > 0  # the slice does hold queries that are passages
    assert all(o not in set(r) for o, r in zip(own, rows.tolist(), strict=True))


def test_build_model_wires_every_flag(encoder, data_root):
    from mteb_steer.steering.fusion import QueryFusion
    from mteb_steer.steering.lexical import LexicalHybrid

    config = SteerConfig(query_bank=str(data_root / "arguana-genq"), fusion="sum", fusion_param=0.05,
                         lexical="bm25", lexical_weight=0.4, lexical_fusion="rrf", lexical_expand=False,
                         refine_teacher="bm25", refine_top_k=7, refine_steps=3, refine_lr=2e-4)
    model = build_model(config, encoder=encoder)
    (fusion,) = model.corpus_steps
    assert isinstance(fusion, QueryFusion) and (fusion.method, fusion.parameter, fusion.strength) == ("sum", "beta", 0.05)
    assert isinstance(model.score_fusion, LexicalHybrid)
    assert (model.score_fusion.weight, model.score_fusion.fusion, model.score_fusion.bank) == (0.4, "rrf", None)
    (refine,) = model.query_steps
    assert (refine.top_k, refine.steps, refine.lr, refine.ignore_identical_ids) == (7, 3, 2e-4, False)
    assert model.encoder is encoder and model.encoder.query_transforms == []


def test_adapter_is_loaded_only_for_its_base_model(encoder, tmp_path, scifact_slice, capsys):
    from mteb_steer.cli import main
    from mteb_steer.steering.adapter import base_model_id

    QueryAdapter(384, data="x", base_model=base_model_id(encoder.base_meta)).save(tmp_path / "mine")
    loaded = build_encoder(SteerConfig(adapter=str(tmp_path / "mine"), device="cpu"))
    assert [t.data for t in loaded.query_transforms] == ["x"]
    QueryAdapter(384, data="x", base_model="someone/else@abc").save(tmp_path / "other")
    with pytest.raises(ValueError, match="trained for someone/else@abc"):
        build_encoder(SteerConfig(adapter=str(tmp_path / "other")))
    capsys.readouterr()
    code = main(["evaluate", "-t", str(scifact_slice), "--adapter", str(tmp_path / "other"),
                 "--output-folder", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "other" in err[0] and "-m someone/else" in err[0], err


# -- folder tasks ---------------------------------------------------------------------------------
def test_two_folders_with_one_base_name_never_share_a_result(tmp_path, scifact_slice, encoder):
    first = shutil.copytree(scifact_slice, tmp_path / "data" / "tiny")
    second = shutil.copytree(scifact_slice, tmp_path / "data2" / "tiny")
    with (second / "qrels" / "test.tsv").open("a") as fh:  # the second one differs in its labels
        fh.write(open(second / "qrels" / "test.tsv").read().splitlines()[1].rsplit("\t", 1)[0] + "\t0\n")
    a, b = BeirFolderTask(first), BeirFolderTask(second)
    assert a.metadata.name != b.metadata.name and a.metadata.name.startswith("LocalTiny-")
    assert BeirFolderTask(first).metadata.name == a.metadata.name  # stable for an unchanged folder
    model = SteerSearch(encoder)
    assert {s.path for s in evaluate_tasks(model, [a], tmp_path / "out", show_progress_bar=False)} != \
        {s.path for s in evaluate_tasks(model, [b], tmp_path / "out", show_progress_bar=False)}


def test_qrels_naming_absent_documents_are_warned_not_fatal(tmp_path, scifact_slice, caplog):
    folder = shutil.copytree(scifact_slice, tmp_path / "f")
    qid = (folder / "qrels" / "test.tsv").read_text().splitlines()[1].split("\t")[0]
    with (folder / "qrels" / "test.tsv").open("a") as fh:
        fh.write(f"{qid}\tghost-doc\t1\n")
    with caplog.at_level(logging.WARNING, logger="mteb_steer.beir"):
        split = load_beir_split(folder, "test")
    assert "ghost-doc" in split.qrels[qid]
    (message,) = [r.getMessage() for r in caplog.records if "absent from the corpus" in r.getMessage()]
    assert "1 of" in message and "ghost-doc" in message and "test.tsv" in message


# -- result files ---------------------------------------------------------------------------------
def test_a_result_file_appears_only_whole(tmp_path, scifact_slice, encoder, monkeypatch):
    """A crash while the result is being written (here: the disk fills up) leaves no result file to read back.

    Without the atomic cache, mteb opens `<Task>.json` in place: the torn (here empty) file stays.
    """
    import mteb.cache.result_cache as result_cache

    task = BeirFolderTask(scifact_slice)
    model = SteerSearch(encoder)
    calls = []

    def dying_dump(*args, **kwargs):  # json.dump is how mteb writes the result file
        calls.append(1)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(result_cache.json, "dump", dying_dump)
    with pytest.raises(OSError):
        mteb.evaluate(model, task, cache=AtomicResultCache(tmp_path), show_progress_bar=False)
    monkeypatch.undo()
    folder = result_dir(tmp_path, model)
    assert calls and not (folder / f"{task.metadata.name}.json").exists()
    scores = evaluate_tasks(model, [task], tmp_path, show_progress_bar=False)  # the rerun computes it
    assert not scores[0].reused and json.loads(scores[0].path.read_text())["task_name"] == task.metadata.name
    assert not list(folder.glob(".*.tmp"))


def test_a_torn_result_file_is_named(tmp_path):
    path = tmp_path / "SciFact.json"
    path.write_text('{"scores": {"test": [')
    with pytest.raises(ValueError, match=r"SciFact\.json.*--overwrite"):
        check_result_file(path)


def test_python_path_shows_an_encoding_bar(encoder, capfd):
    """mteb.evaluate passes no show_progress_bar unless the caller turned bars off: encoding shows one."""
    from mteb.types import PromptType

    texts = [f"passage {i} written for the progress-bar test {np.random.default_rng().random()}" for i in range(3)]
    encoder.encode([{"text": texts}], task_metadata=None, hf_split="test", hf_subset="default",
                   prompt_type=PromptType.document)
    assert "Batches" in capfd.readouterr().err
    encoder.encode([{"text": [t + "!" for t in texts]}], task_metadata=None, hf_split="test", hf_subset="default",
                   prompt_type=PromptType.document, show_progress_bar=False)
    assert "Batches" not in capfd.readouterr().err


def test_hub_availability_is_judged_without_downloading(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from mteb_steer.hub import hub_cache_has, hub_offline_reason

    hub_offline_reason.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline_reason() == "HF_HUB_OFFLINE is set"
    hub_offline_reason.cache_clear()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert not hub_cache_has("org/model")
    (tmp_path / "models--org--model" / "snapshots" / "abc123").mkdir(parents=True)
    assert hub_cache_has("org/model") and not hub_cache_has("org/model", kind="dataset")
