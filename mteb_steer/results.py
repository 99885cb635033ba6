"""Run tasks through `mteb.evaluate` and file results with mteb's own ResultCache.

Layout: `<output_folder>/results/<org__model>/<revision>/<Task>.json` plus `model_meta.json` and
`run_settings.jsonl` (written by mteb), `steer_config.json` (the configuration behind the
revision: the SteerConfig that rebuilds it and the steps it resolved to) and `steer_fit.json`
(what label-free `auto` steps chose on each task's corpus), written here. Each task is saved as soon as it finishes, so a crash loses nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mteb
from mteb.cache import ResultCache

from mteb_steer.files import write_atomic
from mteb_steer.identity import describe_configuration
from mteb_steer.search import SteerSearch

STEER_CONFIG_FILE = "steer_config.json"
STEER_FIT_FILE = "steer_fit.json"
SIDECAR_FILES = (STEER_CONFIG_FILE, STEER_FIT_FILE)  # ours, beside mteb's files; not task results


@dataclass
class TaskScore:
    """One task's headline numbers for tables."""

    task: str
    split: str
    ndcg_at_10: float
    recall_at_100: float | None
    seconds: float
    path: Path
    reused: bool = False  # read back from an existing result file, not computed in this run


class AtomicResultCache(ResultCache):
    """mteb's ResultCache, except that a task's result file appears whole or not at all.

    mteb writes `<Task>.json` in place, so a kill mid-write would leave a torn file that the next run
    reads back as the finished result. Here mteb writes it under a temporary name (its own
    serialisation, untouched) and it is renamed into place after `model_meta.json` and
    `run_settings.jsonl`: a result file on disk is always complete, with its metadata beside it.
    """

    _staging = False

    def get_task_result_path(self, *args: Any, **kwargs: Any) -> Path:
        path = super().get_task_result_path(*args, **kwargs)
        return path.with_name(f".{path.name}.{os.getpid()}.tmp") if self._staging else path

    def save_to_cache(self, task_result: Any, model_name: Any, model_revision: str | None = None,
                      **kwargs: Any) -> None:
        final = self.get_task_result_path(task_name=task_result.task_name, model_name=model_name,
                                          model_revision=model_revision)
        self._staging = True
        try:
            staged = self.get_task_result_path(task_name=task_result.task_name, model_name=model_name,
                                               model_revision=model_revision)
            super().save_to_cache(task_result, model_name, model_revision, **kwargs)
        except OSError as err:  # e.g. the disk filled up: drop the partial file, name the folder
            staged.unlink(missing_ok=True)
            raise OSError(err.errno, err.strerror or str(err), str(final.parent)) from err
        finally:
            self._staging = False
        os.replace(staged, final)


def result_dir(output_folder: Path, model: SteerSearch) -> Path:
    """`<output_folder>/results/<org__model>/<revision>`, as mteb's ResultCache lays it out."""
    return ResultCache(output_folder).get_task_result_path(task_name="x", model_name=model.mteb_model_meta).parent


def steer_config_record(model: SteerSearch) -> dict[str, Any]:
    """What `steer_config.json` holds: the configuration (`SteerConfig.to_json()`, under "config",
    when the model was built from one) and what it resolved to (base model, every step's describe)."""
    record = describe_configuration(model.encoder.base_meta, model.steps)
    return {"config": model.config.to_json(), **record} if model.config is not None else record


def file_configuration(output_folder: str | Path, model: SteerSearch) -> Path:
    """Create the model's result folder and write `steer_config.json` (the configuration behind its revision)."""
    folder = result_dir(Path(output_folder), model)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / STEER_CONFIG_FILE, json.dumps(steer_config_record(model), indent=2, default=str) + "\n")
    return folder


def evaluate_tasks(model: SteerSearch, tasks: Sequence[Any], output_folder: str | Path,
                   *, overwrite: bool = False, batch_size: int = 32,
                   show_progress_bar: bool = True) -> list[TaskScore]:
    """Evaluate each task (skipping ones already on disk unless `overwrite`) and return headline scores."""
    output_folder = Path(output_folder)
    cache = AtomicResultCache(output_folder)
    folder = file_configuration(output_folder, model)
    scores: list[TaskScore] = []
    for task in tasks:
        reused = not overwrite and (folder / f"{task.metadata.name}.json").exists()
        if reused:
            check_result_file(folder / f"{task.metadata.name}.json")
        started = time.perf_counter()
        result = mteb.evaluate(model, task, cache=cache, overwrite_strategy="always" if overwrite else "only-missing",
                               encode_kwargs={"batch_size": batch_size, "show_progress_bar": show_progress_bar},
                               show_progress_bar=show_progress_bar)
        elapsed = time.perf_counter() - started
        if not reused and model.fit_reports.get(task.metadata.name):
            record_fit(folder, task.metadata.name, model.fit_reports[task.metadata.name])
        for task_result in result.task_results:
            for split, entries in task_result.scores.items():
                entry = entries[0]
                scores.append(TaskScore(task_result.task_name, split, entry["ndcg_at_10"], entry.get("recall_at_100"),
                                        elapsed, folder / f"{task_result.task_name}.json", reused))
    return scores


def check_result_file(path: Path) -> None:
    """An existing result file that is about to be read back must be a whole JSON object, else say which."""
    try:
        json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"existing result file {path} is not valid JSON ({err}); rerun with --overwrite to "
                         "recompute it (or delete the file)") from None


def read_fits(folder: Path) -> dict[str, dict[str, Any]]:
    """`<folder>/steer_fit.json` (task -> step tag -> what the step chose); {} when there is none."""
    path = folder / STEER_FIT_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def record_fit(folder: Path, task_name: str, report: dict[str, Any]) -> None:
    """Merge one task's fit report into `<folder>/steer_fit.json`."""
    fits = read_fits(folder)
    fits[task_name] = report
    write_atomic(folder / STEER_FIT_FILE, json.dumps(fits, indent=2, sort_keys=True) + "\n")


def format_table(scores: Sequence[TaskScore]) -> str:
    """A small fixed-width table: task, split, nDCG@10, recall@100, seconds."""
    lines = [f"{'task':<16} {'split':<6} {'nDCG@10':>8} {'R@100':>7} {'sec':>7}"]
    for s in scores:
        recall = f"{s.recall_at_100:.4f}" if s.recall_at_100 is not None else "-"
        seconds = "cached" if s.reused else f"{s.seconds:.1f}"
        lines.append(f"{s.task:<16} {s.split:<6} {s.ndcg_at_10:>8.4f} {recall:>7} {seconds:>7}")
    if any(s.reused for s in scores):
        lines.append("cached: read back from an existing result file (--overwrite recomputes)")
    return "\n".join(lines)
