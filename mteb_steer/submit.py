"""`mteb-steer submit`: prepare a leaderboard submission locally, with mteb's own tooling, pushing nothing.

Writes into `--out`:
- `results/<org__model>/<revision>/` with the task results, `model_meta.json` and
  `run_settings.jsonl`, copied by mteb's `CopyResultsAction` (the step `ResultCache.submit_results`
  runs before it commits) from the files `ResultCache.get_cache_paths` finds for the model;
- `model_meta.py`: the `ModelMeta` source an upstream model-implementation pull request to mteb
  needs, with its loader (`mteb_steer.loader.load_steered`) and the configuration that rebuilds
  the model (the results repository refuses models mteb's registry does not know);
- `mock_run.md`: the output of mteb's `mock_run` (what `mteb mock-run` prints) for the model
  rebuilt through `mteb.get_model`, which that pull request's checklist asks for;
- `steer_config.json` and `steer_fit.json` when the result folder has them (the steering
  configuration behind the revision, and what its label-free `auto` steps chose; kept out of
  `results/` because every `*.json` there must be a task result).

Then it runs on the copy what the results repository checks (its `tests/` and its file-size
workflow): folder == model name with '/' -> '__' (`test_correct_folder_structure.py`), revision
folder == meta revision and not `no_revision_available`, `model_meta.json` loads as a ModelMeta,
every `<Task>.json` loads as an mteb `TaskResult` whose `task_name` is the file name
(`test_task_name_matches_filename.py`), results and `run_settings.jsonl` entries made with mteb
> 2.0.0 and every (task, split, subset) covered by `run_settings.jsonl`
(`test_new_results_run_settings.py`), no file over 10 MB (`.github/workflows/check_file_sizes.yml`),
and no file besides those (ours stay outside `results/`). Failures are errors (exit code 1); things the leaderboard would flag but
accept are warnings (a model missing from the installed registry, tasks trained on).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mteb
from mteb import TaskResult
from mteb.cache import ResultCache
from mteb.cache.result_cache import CopyResultsAction
from mteb.models.model_meta import ModelMeta
from mteb.results.task_result import _expand_run_settings_entry
from packaging.version import Version

from mteb_steer.results import SIDECAR_FILES, STEER_CONFIG_FILE

MIN_MTEB_VERSION = Version("2.0.0")  # the results repository's run-settings check: strictly newer
MAX_FILE_BYTES = 10 * 1024 * 1024  # the results repository's file-size workflow
MOCK_RUN_FILE = "mock_run.md"
REGISTRY_NOTE = ("the results repository merges results only of models in mteb's registry: open the pull request "
                 "adding model_meta.py to mteb (mteb/models/model_implementations/) first, and submit these "
                 "results once it is accepted")
NO_REVISION = "no_revision_available"
META_FILE = "model_meta.json"
RUN_SETTINGS_FILE = "run_settings.jsonl"


class SubmitError(ValueError):
    """The given model or folder cannot be turned into a submission (nothing was written)."""


@dataclass
class SubmissionReport:
    """What was written and what the results repository's checks found."""

    folder: Path | None = None
    snippet: Path | None = None
    mock_run: Path | None = None
    copied: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        lines = [f"submission folder: {self.folder}", f"ModelMeta source: {self.snippet}",
                 f"mteb mock-run output: {self.mock_run or 'not run'}",
                 f"task results: {', '.join(self.copied) or 'none'}"]
        lines += [f"WARNING: {w}" for w in self.warnings]
        lines += [f"ERROR: {e}" for e in self.errors]
        lines.append("checks passed: ready to copy into a clone of embeddings-benchmark/results"
                     if self.ok else f"checks FAILED ({len(self.errors)} error(s))")
        lines.append(f"NOTE: {REGISTRY_NOTE}")
        return "\n".join(lines)


# -- finding the result folder ---------------------------------------------------------------------
def find_result_dir(model: str, output_folder: str | Path = ".") -> Path:
    """The `<org__model>/<revision>` folder of `model`: a revision folder, a model folder with one
    revision, or a model name looked up under `<output_folder>/results/`."""
    path = Path(model).expanduser()
    if not path.is_dir():
        path = Path(output_folder) / "results" / model.replace("/", "__").replace(" ", "_")
        if not path.is_dir():
            raise SubmitError(f"no result folder for {model!r}: not a folder, and {path} does not exist "
                              "(give the result folder, or the model name with --output-folder)")
    if (path / META_FILE).is_file():
        return path
    revisions = sorted(p for p in path.iterdir() if p.is_dir() and (p / META_FILE).is_file())
    if len(revisions) != 1:
        found = ", ".join(p.name for p in revisions) or "none with a model_meta.json"
        raise SubmitError(f"{path}: expected exactly one revision folder, found {found}; give the revision folder")
    return revisions[0]


def load_meta(folder: Path) -> ModelMeta:
    """The folder's `model_meta.json` as mteb reads it (`ModelMeta.model_validate_json_resolved`)."""
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise SubmitError(f"{folder}: no {META_FILE} (results written by mteb.evaluate with a ModelMeta have one)")
    try:
        return ModelMeta.model_validate_json_resolved(meta_path.read_text())
    except Exception as err:  # pydantic / json errors: report which file and why
        raise SubmitError(f"{meta_path} is not a valid ModelMeta: {err}") from err


# -- the ModelMeta snippet -------------------------------------------------------------------------
def _literal(value: Any) -> str:
    """A Python literal for a model_meta.json value; sets come back sorted, so the snippet is stable."""
    if isinstance(value, set | frozenset):
        return "{" + ", ".join(repr(v) for v in sorted(value)) + "}" if value else "set()"
    return repr(value)


def meta_snippet(meta: ModelMeta, steer_config: dict[str, Any] | None = None) -> str:
    """Python source defining `model_meta = ModelMeta(...)` for mteb's model registry.

    With the model's SteerConfig (`loader_kwargs["steer_config"]` of its model_meta.json), the
    loader is `mteb_steer.loader.load_steered` and rebuilds the model; without one (results filed
    before configurations were recorded) `loader=None`, which the registry shows but cannot run.
    """
    data = json.loads(json.dumps(meta.to_dict(), default=str))
    config = (meta.loader_kwargs or {}).get("steer_config")
    fields = [name for name in ModelMeta.model_fields if name not in ("loader", "loader_kwargs") and name in data]
    lines = ["# ModelMeta for mteb's model registry (mteb/models/model_implementations/), generated by",
             "# `mteb-steer submit`. The loader needs the mteb-steer package (pip install mteb-steer)."]
    if steer_config:
        lines += ["#", "# what the configuration resolved to (steer_config.json):"]
        lines += [f"#   {line}" for line in json.dumps(steer_config, indent=2, sort_keys=True).splitlines()]
    lines.append("from mteb.models.model_meta import ModelMeta")
    if config is not None:
        lines += ["from mteb_steer.loader import load_steered", "", "model_meta = ModelMeta(",
                  "    loader=load_steered,", f"    loader_kwargs={{'steer_config': {config!r}}},"]
    else:
        lines += ["", "model_meta = ModelMeta(", "    loader=None,  # no configuration recorded: re-run evaluate"]
    for name in fields:
        value = getattr(meta, name)
        rendered = _literal(value) if isinstance(value, set | frozenset) else _literal(data[name])
        lines.append(f"    {name}={rendered},")
    lines.append(")")
    return "\n".join(lines) + "\n"


def check_snippet(source: str, meta: ModelMeta) -> list[str]:
    """Errors if the snippet does not build a ModelMeta equal to `meta` (same fields and configuration)."""
    namespace: dict[str, Any] = {}
    try:
        exec(compile(source, "model_meta.py", "exec"), namespace)  # our own generated source
    except Exception as err:
        return [f"model_meta.py does not build a ModelMeta: {type(err).__name__}: {err}"]
    built: ModelMeta = namespace["model_meta"]
    differ = [name for name in ModelMeta.model_fields
              if name not in ("loader", "loader_kwargs") and getattr(built, name) != getattr(meta, name)]
    if (built.loader_kwargs or {}).get("steer_config") != (meta.loader_kwargs or {}).get("steer_config"):
        differ.append("loader_kwargs.steer_config")
    return [f"model_meta.py differs from model_meta.json in {differ}"] if differ else []


def write_mock_run(meta: ModelMeta, out: Path) -> tuple[Path | None, list[str]]:
    """Rebuild the model through `mteb.get_model` and run mteb's `mock_run` on it (what `mteb mock-run`
    does), writing its markdown to `out`; (path, errors)."""
    from mteb.mocks.mock_run import mock_run

    from mteb_steer.loader import load_steered
    from mteb_steer.registry import register

    if not (meta.loader_kwargs or {}).get("steer_config"):
        return None, []
    register(meta.model_copy(update={"loader": load_steered,
                                     "loader_kwargs": {"steer_config": meta.loader_kwargs["steer_config"]}}))
    try:
        model = mteb.get_model(meta.name, meta.revision)
    except (ValueError, FileNotFoundError, ImportError) as err:
        return None, [f"mteb.get_model({meta.name!r}, {meta.revision!r}) failed: {err}"]
    results = mock_run(model)
    out.write_text(results.to_markdown() + "\n", encoding="utf-8")
    return out, [] if results.all_passed else [f"mteb mock-run found failures: see {out}"]


# -- the results repository's checks ---------------------------------------------------------------
def _version_error(version: str | None, what: str) -> list[str]:
    parsed = TaskResult._parse_mteb_version_min(version) if version else None
    if parsed is None:
        return [f"{what}: no usable mteb version (got {version!r})"]
    if parsed <= MIN_MTEB_VERSION:
        return [f"{what}: made with mteb {version}, the results repository needs > {MIN_MTEB_VERSION}"]
    return []


def check_folder(folder: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of a `results/<org__model>/<revision>/` folder, as the results repository tests it."""
    errors: list[str] = []
    warnings: list[str] = []
    try:
        meta = load_meta(folder)
    except SubmitError as err:
        return [str(err)], warnings
    if folder.parent.name != meta.model_name_as_path():
        errors.append(f"folder naming: model folder {folder.parent.name!r} != model name {meta.name!r} as a path "
                      f"({meta.model_name_as_path()!r}): results/<org>__<name>/<revision>/")
    if meta.revision in (None, NO_REVISION) or folder.name == NO_REVISION:
        errors.append(f"{folder}: revision {meta.revision!r}: new results need a real revision, not {NO_REVISION}")
    elif folder.name != meta.revision:
        errors.append(f"revision folder {folder.name!r} != model_meta.json revision {meta.revision!r}")
    run_settings = folder / RUN_SETTINGS_FILE
    covered: set[tuple[str, str, str]] = set()
    if not run_settings.is_file():
        errors.append(f"{folder}: {RUN_SETTINGS_FILE} is missing beside the result files (the results "
                      "repository needs it for new results; mteb >= 2 writes it with each result)")
    else:
        for number, line in enumerate(run_settings.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                errors.append(f"{RUN_SETTINGS_FILE} line {number} is not valid JSON: {err}")
                continue
            covered.update(key for key, _, _ in _expand_run_settings_entry(entry))
            errors += _version_error((entry.get("version") or {}).get("mteb"),
                                     f"{RUN_SETTINGS_FILE} line {number} ({entry.get('task')})")
    results = sorted(p for p in folder.glob("*.json") if p.name != META_FILE)
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
            errors.append(f"{path.name}: {path.stat().st_size:,} bytes, over the results repository's 10 MB "
                          "file limit (check_file_sizes.yml)")
        if path.name not in (META_FILE, RUN_SETTINGS_FILE) and not (path.is_file() and path.suffix == ".json"):
            errors.append(f"{path.name}: extra file; a revision folder holds only <Task>.json, {META_FILE} "
                          f"and {RUN_SETTINGS_FILE}")
    if not results:
        errors.append(f"{folder}: no task result (*.json)")
    for path in results:
        try:
            result = TaskResult.from_disk(path)
        except Exception as err:
            errors.append(f"{path.name} is not a valid mteb TaskResult: {type(err).__name__}: {err}")
            continue
        if result.task_name != path.stem:
            errors.append(f"{path.name}: task_name {result.task_name!r} does not match the file name")
        errors += _version_error(result.mteb_version, path.name)
        missing = sorted(f"{split}/{block['hf_subset']}" for split, blocks in result.scores.items()
                         for block in blocks if (result.task_name, split, block["hf_subset"]) not in covered)
        if run_settings.is_file() and missing:
            errors.append(f"{path.name}: {missing} not covered by {RUN_SETTINGS_FILE}")
        trained = set(meta.training_datasets or ()) & {result.task_name}
        if trained:
            warnings.append(f"{result.task_name}: the model's training_datasets include it "
                            "(the leaderboard will not count it as zero-shot)")
    from mteb_steer.registry import registered_revisions

    # names this package registered in-process do not count: the results repository runs mteb alone
    if meta.name not in {m.name for m in mteb.get_model_metas()} or registered_revisions(meta.name):
        warnings.append(f"{meta.name} is not in mteb's own model registry: {REGISTRY_NOTE}")
    return errors, warnings


def _is_mteb_task(name: str) -> bool:
    try:
        mteb.get_task(name)
    except KeyError:
        return False
    return True


# -- preparing the submission ----------------------------------------------------------------------
def prepare_submission(model: str, out: str | Path, output_folder: str | Path = ".", *,
                       mock: bool = True) -> SubmissionReport:
    """Copy `model`'s results into `out/results/` with mteb's tooling, write the snippet, run the checks.

    Only results of MTEB tasks are copied (local tasks such as TRECDLPool are not leaderboard
    tasks: listed as a warning). With `mock`, the model is rebuilt through `mteb.get_model` and
    mteb's mock-run written beside the snippet. Raises SubmitError before writing when the source
    is unusable.
    """
    source = find_result_dir(model, output_folder)
    if source.parent.parent.name != "results":
        raise SubmitError(f"{source}: expected the layout .../results/<org__model>/<revision>/ that mteb writes")
    meta = load_meta(source)
    cache = ResultCache(source.parent.parent.parent)
    paths = [p for p in cache.get_cache_paths(models=[meta], include_remote=False, load_experiments="match_kwargs")
             if p.parent == source]
    report = SubmissionReport()
    keep = [p for p in paths if p.name not in SIDECAR_FILES and _is_mteb_task(p.stem)]
    report.warnings += [f"{p.name}: not an MTEB task result, left out of the submission"
                        for p in paths if p not in keep and p.name not in SIDECAR_FILES]
    if not keep:
        raise SubmitError(f"{source}: no result of an MTEB task to submit (found {[p.name for p in paths]})")
    out = Path(out)
    CopyResultsAction({meta: keep}, out / "results").do()
    report.folder = out / "results" / meta.model_name_as_path() / str(meta.revision)
    report.copied = [p.stem for p in keep]
    steer_config = None
    if (source / STEER_CONFIG_FILE).is_file():
        steer_config = json.loads((source / STEER_CONFIG_FILE).read_text())
    for name in SIDECAR_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    snippet = meta_snippet(meta, steer_config)
    report.snippet = out / "model_meta.py"
    report.snippet.write_text(snippet)
    errors, warnings = check_folder(report.folder)
    report.errors += errors + check_snippet(snippet, meta)
    report.warnings += warnings
    if mock:
        report.mock_run, mock_errors = write_mock_run(meta, out / MOCK_RUN_FILE)
        report.errors += mock_errors
        if report.mock_run is None and not mock_errors:
            report.warnings.append("no configuration in model_meta.json: no loader, so no mteb mock-run")
    return report


# -- CLI -------------------------------------------------------------------------------------------
def add_submit_parser(sub: argparse._SubParsersAction) -> None:
    """Register `mteb-steer submit` on the CLI's subparsers."""
    parser = sub.add_parser("submit", help="prepare a results-repository submission locally (pushes nothing)")
    parser.add_argument("-m", "--model", required=True,
                        help="model name as in results/ (e.g. mteb-steer/all-MiniLM-L6-v2-...) or a result folder")
    parser.add_argument("--out", required=True, help="folder to write the submission into")
    parser.add_argument("--output-folder", default=".",
                        help="where the evaluation wrote results/ (default: current dir)")
    parser.add_argument("--no-mock-run", action="store_true",
                        help="skip rebuilding the model and running mteb's mock-run on it")
    parser.set_defaults(handler=run_submit)


def run_submit(args: argparse.Namespace) -> int:
    """Handler of `mteb-steer submit`: 0 when every check passes, 1 otherwise."""
    report = prepare_submission(args.model, args.out, args.output_folder, mock=not args.no_mock_run)
    print(report.format(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1
