"""mteb-native use: SteerConfig as the one configuration, `mteb.get_model` loaders, and mteb's own CLI."""

from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import fields, replace
from pathlib import Path

import mteb
import pytest

import mteb_steer
from mteb_steer.beir import write_beir_slice
from mteb_steer.cli import main as cli_main
from mteb_steer.loader import MissingArtifactError
from mteb_steer.pipeline import MACHINE_LOCAL, SteerConfig, build_model
from mteb_steer.results import evaluate_tasks
from mteb_steer.tasks import resolve_task

PRESET = "mteb-steer/all-MiniLM-L6-v2-bm25-zscore0.2"
REPO = Path(__file__).resolve().parent.parent


def _scores(folder: Path, task: str) -> dict:
    return json.loads((folder / f"{task}.json").read_text())["scores"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_root) -> Path:
    """12 real SciFact test queries over ~90 real passages: a BEIR folder that evaluates in seconds."""
    return write_beir_slice(data_root / "scifact", tmp_path_factory.mktemp("tiny") / "scifact", "test", 12, 70)


@pytest.fixture(autouse=True)
def shared_embedding_cache(encoder, monkeypatch):
    """Models mteb.get_model builds read the session encoder's base vectors (same text keys)."""
    monkeypatch.setenv("MTEB_STEER_EMBEDDING_CACHE", str(encoder.cache.folder))


# -- one configuration -----------------------------------------------------------------------------
def test_steer_config_json_round_trip():
    config = SteerConfig.from_options(beta=0.05, fusion="sum", query_bank="bank.jsonl.gz", adapter="ad",
                                      lexical="bm25", lexical_weight=0.3, lexical_fusion="rrf", hyde=2,
                                      refine_teacher="bm25", refine_lr=0.01, device="cpu")
    again = SteerConfig.from_json(json.loads(json.dumps(config.to_json())))
    assert again == config and again.fusion_param == 0.05 and again.strength_name == "beta"
    assert SteerConfig.from_json(SteerConfig().to_json()) == SteerConfig()
    # every field (encoding, LLM client, bank fusion, ...) set away from its default survives the JSON trip
    everything = SteerConfig.from_options(
        beta=0.05, model="org/model", device="cpu", batch_size=8, embedding_cache="cache", backend="onnx",
        dtype="int8", embedding_storage="float16", query_bank="bank.jsonl.gz", fusion="sum", fusion_rule="best",
        fusion_weighting="similarity", fusion_temperature=0.1, fusion_drop_fraction=0.2, llm_base_url="http://x",
        llm_model="m", llm_mode="chat", num_queries=5, llm_cache_dir="llm", query_style="generic", llm_timeout=30.0,
        llm_retries=1, allow_failed_passages=True, adapter="ad", refine_teacher="bm25", refine_top_k=10,
        refine_steps=5, refine_lr=0.01, hyde=2, lexical="bm25", lexical_weight=0.3, lexical_fusion="rrf",
        lexical_expand=False, lexical_index_dir="index")
    self_tuned = SteerConfig(self_tune=True, self_tune_sample=2000, lexical="bm25", fusion="mean",
                             query_bank="bank.jsonl.gz")
    changed = {f.name for c in (everything, self_tuned) for f in fields(SteerConfig)
               if getattr(c, f.name) != f.default}
    assert changed == {f.name for f in fields(SteerConfig)}
    for c in (everything, self_tuned):  # this machine's cache folders are never filed (they change no number)
        assert not set(MACHINE_LOCAL) & set(c.to_json())
        assert SteerConfig.from_json(json.loads(json.dumps(c.to_json()))) == replace(
            c, embedding_cache=None, llm_cache_dir=None, lexical_index_dir=None)
    with pytest.raises(ValueError, match=r"unknown configuration keys \['alpha'\]"):
        SteerConfig.from_json({**config.to_json(), "alpha": 0.1})


@pytest.mark.parametrize(("method", "name", "value", "message"), [
    ("mean", "alpha", 1.5, "alpha is a mixing weight in [0, 1], got 1.5 (--alpha needs a value in that range)"),
    ("rotate", "gamma", -0.1, "gamma must be a number >= 0 or 'auto', got -0.1 (--gamma needs such a value)"),
])
def test_cli_and_benchmark_reject_a_bad_strength_with_one_message(method, name, value, message, tmp_path,
                                                                 data_root, capsys):
    import benchmark

    code = cli_main(["evaluate", "-t", "SciFact", "--data-root", str(data_root), "--query-bank", "b.jsonl",
                     "--fusion", method, f"--{name}", str(value)])
    assert code == 2 and message in capsys.readouterr().err
    bench = benchmark.Bench(benchmark.parse_args(["--data-root", str(data_root), "--output-folder", str(tmp_path)]))
    with pytest.raises(ValueError) as raised:
        bench.config("minilm", {"fusion": method, "fusion_param": value, "query_bank": "b.jsonl"})
    assert str(raised.value) == message


def test_a_strength_of_another_method_is_refused(capsys):
    assert cli_main(["evaluate", "--fusion", "mean", "--beta", "0.1"]) == 2
    assert "fusion 'mean' takes alpha, not beta" in capsys.readouterr().err
    with pytest.raises(ValueError, match="alpha given without a fusion method"):
        SteerConfig.from_options(alpha=0.1)


# -- mteb.get_model ----------------------------------------------------------------------------------
def test_preset_is_known_to_mteb_and_rebuilds_the_same_scores(encoder, tiny, tmp_path):
    meta = mteb.get_model_meta(PRESET)
    assert meta.loader is not None and meta.adapted_from == "sentence-transformers/all-MiniLM-L6-v2"
    assert mteb.get_model_meta(PRESET, meta.revision) is meta
    loaded = mteb.get_model(PRESET, meta.revision, device="cpu")
    built = build_model(SteerConfig(lexical="bm25"), encoder=encoder)
    assert built.mteb_model_meta.revision == loaded.mteb_model_meta.revision == meta.revision
    task = resolve_task(str(tiny))
    task.load_data()  # mteb.evaluate unloads it afterwards: count first
    sizes = {part: len(task.dataset["default"]["test"][part]) for part in ("corpus", "queries")}
    [a] = evaluate_tasks(loaded, [task], tmp_path / "a", show_progress_bar=False)
    [b] = evaluate_tasks(built, [task], tmp_path / "b", show_progress_bar=False)
    assert _scores(a.path.parent, a.task) == _scores(b.path.parent, b.task)
    # timing records: one per index/search call, without wrapping the model's methods
    assert [(c["call"], c["task"], c["split"], c["n"]) for c in built.calls] == [
        ("index", task.metadata.name, "test", sizes["corpus"]),
        ("search", task.metadata.name, "test", sizes["queries"])]
    assert {"encode_corpus_s", "score_fusion_fit_s"} <= set(built.calls[0])
    assert {"encode_queries_s", "score_s"} <= set(built.calls[1])
    with pytest.raises(ValueError, match="revision 000000000000 is not registered"):
        mteb.get_model_meta(PRESET, "000000000000")


def _slice_bank(source: Path, corpus: Path, target: Path) -> Path:
    """The real SciFact bank restricted to the slice's passages (a small portable JSONL bank)."""
    with gzip.open(corpus / "corpus.jsonl.gz", "rt") as fh:
        ids = {json.loads(line)["_id"] for line in fh}
    with gzip.open(source, "rt") as fh:
        rows = [line for line in fh if json.loads(line).get("id") in ids]
    target.write_text("".join(rows))
    return target


def test_results_folder_configurations_load_and_missing_bank_is_named(encoder, tiny, tmp_path):
    bank = _slice_bank(REPO / "results" / "banks" / "scifact-gemma3-270m.jsonl.gz", tiny,
                       tmp_path / "bank.jsonl")
    config = SteerConfig(query_bank=str(bank), fusion="mean", fusion_param=0.2)
    model = build_model(config, encoder=encoder)
    task = resolve_task(str(tiny))
    [score] = evaluate_tasks(model, [task], tmp_path / "out", show_progress_bar=False)
    filed = json.loads((score.path.parent / "steer_config.json").read_text())
    assert SteerConfig.from_json(filed["config"]) == config  # the file holds what rebuilds the model
    meta = model.mteb_model_meta
    report = mteb_steer.register_results(tmp_path / "out")
    assert report.registered == [f"{meta.name}@{meta.revision}"]
    assert mteb.get_model_meta(meta.name, meta.revision).loader_kwargs == {"steer_config": config.to_json()}
    loaded = mteb.get_model(meta.name, meta.revision, device="cpu")
    [again] = evaluate_tasks(loaded, [task], tmp_path / "again", show_progress_bar=False)
    assert _scores(again.path.parent, again.task) == _scores(score.path.parent, score.task)
    bank.rename(tmp_path / "elsewhere.jsonl")
    with pytest.raises(MissingArtifactError, match=r"needs the query bank .*bank.jsonl, which is missing.*"
                                                    r"mteb-steer generate -t <task> --export"):
        mteb.get_model(meta.name, meta.revision, device="cpu")


# -- mteb's own CLI ----------------------------------------------------------------------------------
def test_mteb_run_through_the_entry_point_matches_evaluate_and_submits(tiny, tmp_path, monkeypatch):
    """`mteb-steer mteb run` (mteb's CLI, SciFact resolved to the local slice by --data-root) files the same
    scores as `mteb-steer evaluate`; its folder becomes a submission whose ModelMeta source has the loader."""
    from mteb_steer.submit import check_snippet, load_meta, prepare_submission

    monkeypatch.chdir(tmp_path)
    local = ["-t", "SciFact", "--data-root", str(tiny.parent)]
    assert cli_main(["mteb", "run", "-m", PRESET, *local, "--output-folder", str(tmp_path / "mteb"),
                     "--overwrite-strategy", "always"]) == 0
    assert cli_main(["evaluate", "--lexical", "bm25", *local, "--device", "cpu",
                     "--output-folder", str(tmp_path / "ours")]) == 0
    revision = mteb.get_model_meta(PRESET).revision
    folder = Path("results") / PRESET.replace("/", "__") / revision
    assert _scores(tmp_path / "mteb" / folder, "SciFact") == _scores(tmp_path / "ours" / folder, "SciFact")
    meta = json.loads((tmp_path / "mteb" / folder / "model_meta.json").read_text())
    assert meta["loader"] == "load_steered" and meta["loader_kwargs"]["steer_config"]["lexical"] == "bm25"

    report = prepare_submission(PRESET, tmp_path / "sub", output_folder=tmp_path / "mteb", mock=False)
    assert report.ok, report.format()
    source = report.snippet.read_text()
    assert "loader=load_steered," in source and "from mteb_steer.loader import load_steered" in source
    assert check_snippet(source, load_meta(report.folder)) == []
    assert any("not in mteb's own model registry" in w for w in report.warnings)  # registered by us only
    assert "merges results only of models in mteb's registry" in report.format()


def test_mteb_cli_own_options_fail_with_one_line(capsys):
    assert cli_main(["mteb", "run", "--results"]) == 2
    assert cli_main(["mteb", "run", "--results", "/nonexistent", "-m", PRESET]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["mteb-steer mteb: error: --results needs a folder",
                   "mteb-steer mteb: error: results folder /nonexistent does not exist"]


def test_mteb_cli_resolves_task_names_like_evaluate(data_root, monkeypatch):
    from mteb_steer.mteb_cli import local_tasks, split_own_options

    own, rest = split_own_options(["run", "--data-root", str(data_root), "-t", "SciFact", "--results=r"])
    assert own == {"--data-root": str(data_root), "--results": "r"} and rest == ["run", "-t", "SciFact"]
    with local_tasks(str(data_root), prefer_local=True):
        [local] = mteb.get_tasks(tasks=["SciFact"], eval_splits=["test"])
        [pool] = mteb.get_tasks(tasks=["TRECDLPool"])
    assert local.data_folder == data_root / "scifact" and isinstance(local, type(mteb.get_task("SciFact")))
    assert pool.metadata.name == "TRECDLPool"
    with local_tasks(str(data_root), prefer_local=False):
        [online] = mteb.get_tasks(tasks=["SciFact"])
    assert not hasattr(online, "data_folder") and mteb.get_tasks.__module__ == "mteb.get_tasks"


def test_results_filed_without_a_configuration_are_listed_with_the_fix(tmp_path):
    name = "mteb-steer__all-MiniLM-L6-v2-bm25-zscore0.2"  # a committed folder, made to look filed before configurations
    folder = tmp_path / "results" / name / "7d6b51b1c067"
    shutil.copytree(REPO / "results" / name / "7d6b51b1c067", folder)
    meta = json.loads((folder / "model_meta.json").read_text())
    meta["loader_kwargs"] = {}
    (folder / "model_meta.json").write_text(json.dumps(meta))
    steer = json.loads((folder / "steer_config.json").read_text())
    steer.pop("config", None)
    (folder / "steer_config.json").write_text(json.dumps(steer))
    report = mteb_steer.register_results(tmp_path)
    assert report.registered == []
    assert "re-run it with `mteb-steer evaluate`" in report.skipped[str(tmp_path / "results" / name / "7d6b51b1c067")]
    with pytest.raises(FileNotFoundError, match="results folder /nonexistent does not exist"):
        mteb_steer.register_results("/nonexistent")


def test_sweep_settings_are_configurations():
    """scripts/fusion_sweep.py builds each setting through SteerConfig; options a generated bank cannot take are refused."""
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from fusion_sweep import config_for

    config = config_for("mean:alpha=0.1,drop_fraction=0.3,rule=best", "bank.jsonl")
    assert (config.fusion, config.fusion_param, config.fusion_drop_fraction, config.fusion_rule) == (
        "mean", 0.1, 0.3, "best")
    assert config_for("maxsim:margin=0.1", "bank.jsonl") is None and config_for("none", "b") == SteerConfig()
    with pytest.raises(SystemExit, match="bad setting 'mean:colour=red'"):
        config_for("mean:colour=red", "bank.jsonl")
    with pytest.raises(ValueError, match=r"\['fusion_weighting'\] apply to fusion with a query bank"):
        SteerConfig(fusion="mean", fusion_weighting="similarity")


@pytest.mark.slow
def test_submission_carries_mtebs_mock_run_of_the_rebuilt_model(tiny, tmp_path, monkeypatch):
    """`mteb-steer submit` rebuilds the model through mteb.get_model and files mteb's mock-run (minutes on CPU)."""
    from mteb_steer.submit import prepare_submission

    monkeypatch.chdir(tmp_path)
    assert cli_main(["mteb", "run", "-m", PRESET, "-t", "SciFact", "--data-root", str(tiny.parent),
                     "--output-folder", str(tmp_path / "mteb")]) == 0
    report = prepare_submission(PRESET, tmp_path / "sub", output_folder=tmp_path / "mteb")
    assert report.ok, report.format()
    text = report.mock_run.read_text()
    assert text.startswith(f"# MTEB Mock-Run Results for `{PRESET}`") and "| MockRetrievalTask | text | ✓ |" in text
