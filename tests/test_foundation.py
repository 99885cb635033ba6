"""The plain model through the package equals mteb's own path; identities never collide; bad input fails early."""

from __future__ import annotations

import json
from pathlib import Path

import mteb
import numpy as np
import pytest
import torch
from mteb.cache import ResultCache
from mteb.models.models_protocols import EncoderProtocol, SearchProtocol
from mteb.models.search_wrappers import SearchEncoderWrapper

from mteb_steer.beir import DataFolderError, load_beir_split
from mteb_steer.encoder import passage_text
from mteb_steer.identity import steered_meta
from mteb_steer.search import SteerSearch
from mteb_steer.tasks import BeirFolderTask, local_copy, resolve_task


def _run_search(model, task) -> dict[str, dict[str, float]]:
    """Index + search one split exactly as mteb's retrieval evaluator would."""
    task.load_data()
    split = task.eval_splits[0]
    data = task.dataset["default"][split]
    common = dict(task_metadata=task.metadata, hf_split=split, hf_subset="default",
                  encode_kwargs={"batch_size": 32, "show_progress_bar": False})
    model.index(data["corpus"], **common)
    return model.search(data["queries"], top_k=100, **common)


class _Tag:
    """A minimal step for identity tests."""

    def __init__(self, tag: str, value: float, trained_on: set[str] = frozenset()) -> None:
        self.tag, self.value, self._trained = tag, value, set(trained_on)

    def describe(self) -> dict:
        return {"value": self.value}

    @property
    def training_datasets(self) -> set[str]:
        return self._trained


def test_protocols(encoder):
    assert isinstance(encoder, EncoderProtocol)
    search = SteerSearch(encoder)
    assert isinstance(search, SearchProtocol)
    assert search.mteb_model_meta == mteb.get_model_meta("sentence-transformers/all-MiniLM-L6-v2")


def test_mock_run_passes_for_encoder_and_search(encoder):
    for model in (encoder, SteerSearch(encoder)):
        report = mteb.mock_run(model)
        ran = {name: r for name, r in report.task_results.items() if r is not None}
        assert ran, "no mock task ran"
        failed = {name: r for name, r in ran.items() if not hasattr(r, "scores")}
        assert not failed, failed


@pytest.mark.parametrize("slice_name", ["scifact_slice", "arguana_slice"])
def test_search_equals_mteb_search_wrapper(encoder, slice_name, request):
    folder = request.getfixturevalue(slice_name)
    ours = _run_search(SteerSearch(encoder), BeirFolderTask(folder))
    theirs = _run_search(SearchEncoderWrapper(encoder), BeirFolderTask(folder))
    assert ours.keys() == theirs.keys()
    for qid in theirs:  # same documents, same scores (ties included)
        assert ours[qid].keys() == theirs[qid].keys(), qid
        np.testing.assert_allclose([ours[qid][d] for d in theirs[qid]], list(theirs[qid].values()), atol=1e-6)


def test_beir_style_loop_matches_mteb_evaluation(encoder, scifact_slice):
    """encode_queries / encode_corpus in a tiny BEIR loop give the same nDCG@10 as mteb.evaluate."""
    import pytrec_eval

    split = load_beir_split(scifact_slice, "test")
    q = encoder.encode_queries([r["text"] for r in split.queries], batch_size=16)
    d = encoder.encode_corpus([{"title": r["title"], "text": r["text"]} for r in split.corpus], batch_size=16)
    scores = torch.nn.functional.normalize(torch.tensor(q), dim=1) @ torch.nn.functional.normalize(
        torch.tensor(d), dim=1).T
    run = {}
    for i, query in enumerate(split.queries):
        top = torch.topk(scores[i], 100)
        run[query["id"]] = {split.corpus[j]["id"]: float(v) for v, j in zip(top.values, top.indices, strict=True)}
    per_query = pytrec_eval.RelevanceEvaluator(split.qrels, {"ndcg_cut.10"}).evaluate(run)
    beir_ndcg = float(np.mean([v["ndcg_cut_10"] for v in per_query.values()]))
    result = mteb.evaluate(SteerSearch(encoder), BeirFolderTask(scifact_slice), cache=None, show_progress_bar=False)
    assert beir_ndcg == pytest.approx(result.task_results[0].get_score(), abs=1e-4)


def test_passage_text_matches_mteb_join():
    from mteb._create_dataloaders import _corpus_to_dict

    for title, text in [("A title", "body "), ("", " body"), ("T", "")]:
        assert passage_text(title, text) == _corpus_to_dict({"id": "1", "title": title, "text": text})["text"]


def test_two_configurations_never_share_a_result_path(tmp_path, encoder):
    base = encoder.base_meta
    a, b = steered_meta(base, [_Tag("fusion", 0.1)]), steered_meta(base, [_Tag("fusion", 0.2)])
    c = steered_meta(base, [_Tag("adapter", 0.1, {"SciFact"})])
    cache = ResultCache(tmp_path)
    paths = {cache.get_task_result_path(task_name="SciFact", model_name=m) for m in (base, a, b, c)}
    assert len(paths) == 4
    assert cache.get_task_result_path(task_name="SciFact", model_name=a).parent.parent.name == a.name.replace("/", "__")
    assert a.adapted_from == base.name and a.name.startswith("mteb-steer/all-MiniLM-L6-v2-")
    assert "SciFact" in c.training_datasets and "SciFact" not in (a.training_datasets or set())
    assert steered_meta(base, [_Tag("fusion", 0.1)]).revision == a.revision  # deterministic


def test_cli_writes_leaderboard_layout(tmp_path, scifact_slice, capsys):
    from mteb_steer.cli import main

    args = ["evaluate", "-t", str(scifact_slice), "--output-folder", str(tmp_path), "--device", "cpu"]
    assert main(args) == 0
    assert "cached" not in capsys.readouterr().out
    assert main(args) == 0  # a finished task is read back, and the table says so
    assert "read back from an existing result file" in capsys.readouterr().out
    meta = mteb.get_model_meta("sentence-transformers/all-MiniLM-L6-v2")
    folder = tmp_path / "results" / "sentence-transformers__all-MiniLM-L6-v2" / meta.revision
    assert len(list(folder.glob("LocalScifact-*.json"))) == 1  # the name carries the folder's fingerprint
    assert json.loads((folder / "model_meta.json").read_text())["name"] == meta.name
    assert (folder / "run_settings.jsonl").read_text().strip()
    assert (folder / "steer_config.json").exists()


def test_local_task_keeps_mteb_metadata(data_root):
    task = resolve_task("ArguAna", data_root)
    assert task.metadata == mteb.get_task("ArguAna").metadata
    assert task.ignore_identical_ids is True
    task.load_data()
    assert len(task.dataset["default"]["test"]["corpus"]) == 8674


# -- bad input: clear errors naming the input, before any model work ----------------------------

def test_unknown_task_suggests_close_names(data_root):
    with pytest.raises(ValueError, match="SciFact"):
        resolve_task("SciFakt", data_root)


def _copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_file_is_named(tmp_path, scifact_slice):
    folder = _copy_folder(scifact_slice, tmp_path / "broken")
    (folder / "queries.jsonl").unlink()
    with pytest.raises(DataFolderError, match="queries.jsonl"):
        BeirFolderTask(folder)
    with pytest.raises(DataFolderError, match="queries.jsonl"):
        local_copy(mteb.get_task("SciFact"), folder)


def test_qrels_id_absent_from_queries_is_named(tmp_path, scifact_slice):
    folder = _copy_folder(scifact_slice, tmp_path / "broken")
    with (folder / "qrels" / "test.tsv").open("a") as fh:
        fh.write("no-such-query\t4983\t1\n")
    with pytest.raises(DataFolderError, match="no-such-query"):
        load_beir_split(folder, "test")


def test_empty_corpus_is_rejected(tmp_path, scifact_slice):
    import gzip

    folder = _copy_folder(scifact_slice, tmp_path / "broken")
    with gzip.open(folder / "corpus.jsonl.gz", "wt"):
        pass
    with pytest.raises(DataFolderError, match="empty"):
        load_beir_split(folder, "test")


def test_unknown_device_fails_before_loading(capsys, scifact_slice):
    from mteb_steer.cli import main

    assert main(["evaluate", "-t", str(scifact_slice), "--device", "tpu"]) == 2
    assert "tpu" in capsys.readouterr().err


def test_fusion_strength_flag_must_match_method(capsys):
    from mteb_steer.cli import main

    assert main(["evaluate", "-t", "SciFact", "--fusion", "mean", "--beta", "0.1"]) == 2
    assert "--beta" in capsys.readouterr().err
