"""`mteb-steer submit`: prepare a leaderboard submission locally, with mteb's own tooling, pushing nothing.

Writes into `--out`:
- `results/<org__model>/<revision>/` with the task results, `model_meta.json` and
  `run_settings.jsonl`, copied by mteb's `CopyResultsAction` (the step `ResultCache.submit_results`
  runs before it commits) from the files `ResultCache.get_cache_paths` finds for the model;
- `model_meta.py`: the `ModelMeta` Python snippet the mteb model registry needs (the results
  repository refuses models the registry does not know);
- `steer_config.json` and `steer_fit.json` when the result folder has them (the steering
  configuration behind the revision, and what its label-free `auto` steps chose; kept out of
  `results/` because every `*.json` there must be a task result).

Then it runs on the copy what the results repository's tests check: folder == model name with
'/' -> '__', revision folder == meta revision and not `no_revision_available`, `model_meta.json`
loads as a ModelMeta, every `<Task>.json` loads as an mteb `TaskResult` whose `task_name` is the
file name, results made with mteb >= 2.0.0, and every (task, split, subset) covered by
`run_settings.jsonl`. Failures are errors (exit code 1); things the leaderboard would flag but
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

MIN_MTEB_VERSION = Version("2.0.0")  # the results repository's run-settings check
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
    copied: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        lines = [f"submission folder: {self.folder}", f"ModelMeta snippet: {self.snippet}",
                 f"task results: {', '.join(self.copied) or 'none'}"]
        lines += [f"WARNING: {w}" for w in self.warnings]
        lines += [f"ERROR: {e}" for e in self.errors]
        lines.append("checks passed: ready to copy into a clone of embeddings-benchmark/results"
                     if self.ok else f"checks FAILED ({len(self.errors)} error(s))")
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

    `loader=None`: the registry shows results of models it cannot run itself that way; the
    steering configuration that reproduces the revision is given in the comment.
    """
    data = json.loads(json.dumps(meta.to_dict(), default=str))
    fields = [name for name in ModelMeta.model_fields if name != "loader" and name in data]
    lines = ["# ModelMeta for mteb's model registry (mteb/models/model_implementations/), generated by",
             "# `mteb-steer submit`. Reproduce with the mteb-steer package and the configuration below."]
    if steer_config:
        lines += ["#", "# steering configuration (steer_config.json):"]
        lines += [f"#   {line}" for line in json.dumps(steer_config, indent=2, sort_keys=True).splitlines()]
    lines += ["from mteb.models.model_meta import ModelMeta", "", "model_meta = ModelMeta(", "    loader=None,"]
    for name in fields:
        value = getattr(meta, name)
        rendered = _literal(value) if isinstance(value, set | frozenset) else _literal(data[name])
        lines.append(f"    {name}={rendered},")
    lines.append(")")
    return "\n".join(lines) + "\n"


def check_snippet(source: str, meta: ModelMeta) -> list[str]:
    """Errors if the snippet does not build a ModelMeta equal to `meta` (loader aside)."""
    namespace: dict[str, Any] = {}
    try:
        exec(compile(source, "model_meta.py", "exec"), namespace)  # our own generated source
    except Exception as err:
        return [f"model_meta.py does not build a ModelMeta: {type(err).__name__}: {err}"]
    built: ModelMeta = namespace["model_meta"]
    differ = [name for name in ModelMeta.model_fields
              if name != "loader" and getattr(built, name) != getattr(meta, name)]
    return [f"model_meta.py differs from model_meta.json in {differ}"] if differ else []


# -- the results repository's checks ---------------------------------------------------------------
def _version_error(version: str | None, what: str) -> list[str]:
    parsed = TaskResult._parse_mteb_version_min(version) if version else None
    if parsed is None:
        return [f"{what}: no usable mteb version (got {version!r})"]
    if parsed < MIN_MTEB_VERSION:
        return [f"{what}: made with mteb {version}, the results repository needs >= {MIN_MTEB_VERSION}"]
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
        errors.append(f"model folder {folder.parent.name!r} != model name {meta.name!r} as a path "
                      f"({meta.model_name_as_path()!r})")
    if meta.revision in (None, NO_REVISION) or folder.name == NO_REVISION:
        errors.append(f"{folder}: revision {meta.revision!r}: new results need a real revision, not {NO_REVISION}")
    elif folder.name != meta.revision:
        errors.append(f"revision folder {folder.name!r} != model_meta.json revision {meta.revision!r}")
    run_settings = folder / RUN_SETTINGS_FILE
    covered: set[tuple[str, str, str]] = set()
    if not run_settings.is_file():
        errors.append(f"{folder}: {RUN_SETTINGS_FILE} is missing (mteb writes it with each result)")
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
    if meta.name not in {m.name for m in mteb.get_model_metas()}:
        warnings.append(f"{meta.name} is not in the installed mteb model registry: the results repository's "
                        "test_model_implementation needs model_meta.py merged into mteb first")
    return errors, warnings


def _is_mteb_task(name: str) -> bool:
    try:
        mteb.get_task(name)
    except KeyError:
        return False
    return True


# -- preparing the submission ----------------------------------------------------------------------
def prepare_submission(model: str, out: str | Path, output_folder: str | Path = ".") -> SubmissionReport:
    """Copy `model`'s results into `out/results/` with mteb's tooling, write the snippet, run the checks.

    Only results of MTEB tasks are copied (local tasks such as TRECDLPool are not leaderboard
    tasks: listed as a warning). Raises SubmitError before writing when the source is unusable.
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
    parser.set_defaults(handler=run_submit)


def run_submit(args: argparse.Namespace) -> int:
    """Handler of `mteb-steer submit`: 0 when every check passes, 1 otherwise."""
    report = prepare_submission(args.model, args.out, args.output_folder)
    print(report.format(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1
