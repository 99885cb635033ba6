"""Run tasks through `mteb.evaluate` and file results with mteb's own ResultCache.

Layout: `<output_folder>/results/<org__model>/<revision>/<Task>.json` plus `model_meta.json` and
`run_settings.jsonl` (written by mteb), `steer_config.json` (the configuration behind the
revision) and `steer_fit.json` (what label-free `auto` steps chose on each task's corpus), written
here. Each task is saved as soon as it finishes, so a crash loses nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mteb
from mteb.cache import ResultCache

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


def result_dir(output_folder: Path, model: SteerSearch) -> Path:
    """`<output_folder>/results/<org__model>/<revision>`, as mteb's ResultCache lays it out."""
    return ResultCache(output_folder).get_task_result_path(task_name="x", model_name=model.mteb_model_meta).parent


def evaluate_tasks(model: SteerSearch, tasks: Sequence[Any], output_folder: str | Path,
                   *, overwrite: bool = False, batch_size: int = 32,
                   show_progress_bar: bool = True) -> list[TaskScore]:
    """Evaluate each task (skipping ones already on disk unless `overwrite`) and return headline scores."""
    output_folder = Path(output_folder)
    cache = ResultCache(output_folder)
    folder = result_dir(output_folder, model)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STEER_CONFIG_FILE).write_text(
        json.dumps(describe_configuration(model.encoder.base_meta, model.steps), indent=2, default=str) + "\n")
    scores: list[TaskScore] = []
    for task in tasks:
        reused = not overwrite and (folder / f"{task.metadata.name}.json").exists()
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


def read_fits(folder: Path) -> dict[str, dict[str, Any]]:
    """`<folder>/steer_fit.json` (task -> step tag -> what the step chose); {} when there is none."""
    path = folder / STEER_FIT_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def record_fit(folder: Path, task_name: str, report: dict[str, Any]) -> None:
    """Merge one task's fit report into `<folder>/steer_fit.json`."""
    fits = read_fits(folder)
    fits[task_name] = report
    (folder / STEER_FIT_FILE).write_text(json.dumps(fits, indent=2, sort_keys=True) + "\n")


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
