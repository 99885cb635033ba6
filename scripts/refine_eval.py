"""Measure test-time query refinement through `mteb.evaluate`: nDCG@10, recall@100, time per query.

One row per (teacher, lr, teacher temperature, steps): the refinement runs inside the search model
(SearchProtocol path), so the corpus is indexed first and the whole corpus is re-scored with the
refined vectors. Rows go to a JSON-lines file; `--table` prints them as markdown.

    python scripts/refine_eval.py --task SciFact --teacher gold embedding:sentence-transformers/all-mpnet-base-v2 \
        --out results/refine_eval/scifact.jsonl
    python scripts/refine_eval.py --task ArguAna --teacher bm25 --lr 1e-4 1e-3 --out results/refine_eval/arguana.jsonl

Each evaluation is also filed in the leaderboard layout (`results/<org__model>/<revision>/<Task>.json`
with `steer_config.json`) under `--output-folder` (default: the current directory).

The gold teacher reads the evaluated split's labels: its rows are ORACLE UPPER BOUNDS, never results.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from mteb_steer.embedding_cache import default_embedding_cache
from mteb_steer.encoder import SteerEncoder
from mteb_steer.pipeline import default_output_folder
from mteb_steer.results import evaluate_tasks
from mteb_steer.search import SteerSearch
from mteb_steer.steering.refine import TestTimeRefinement
from mteb_steer.steering.teachers import make_teacher
from mteb_steer.tasks import resolve_task


def _evaluate(model, task, output_folder: Path) -> tuple[float, float, float]:
    """Evaluate and file the result (leaderboard layout under output_folder/results/, recomputed each time)."""
    score = evaluate_tasks(model, [task], output_folder, overwrite=True, show_progress_bar=False)[0]
    return score.ndcg_at_10, score.recall_at_100, score.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True)
    parser.add_argument("--data-root", default="/work/shared/datasets")
    parser.add_argument("--teacher", nargs="+", required=True, help="gold | embedding:MODEL | bm25 | hybrid | ...")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--steps", type=int, nargs="+", default=[100])
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4])
    parser.add_argument("--teacher-temperature", type=float, nargs="+", default=[1.0])
    parser.add_argument("--student-temperature", type=float, default=1.0)
    parser.add_argument("--n-random", type=int, default=0)
    parser.add_argument("--proximity", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--cache-dir", default=default_embedding_cache(), help="base-embedding cache")
    parser.add_argument("--lexical-index-dir", default="/tmp/mteb_steer_lexical")
    parser.add_argument("--baseline", action="store_true", help="also evaluate the plain model")
    parser.add_argument("--out", required=True, help="JSON-lines file of the rows (commit it beside the results)")
    parser.add_argument("--output-folder", type=Path, default=default_output_folder(),
                        help="results land in <output-folder>/results/<org__model>/<revision>/ (default: current dir)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    task = resolve_task(args.task, args.data_root)
    task.load_data()
    split = task.eval_splits[0]
    qrels = task.dataset["default"][split]["relevant_docs"]
    ignore_ids = bool(getattr(task, "ignore_identical_ids", False))
    encoder = SteerEncoder(cache_dir=args.cache_dir, device="cpu")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(row: dict) -> None:  # one line per finished run, so a killed sweep keeps what it measured
        print(json.dumps(row), flush=True)
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    if args.baseline:
        ndcg, recall, seconds = _evaluate(SteerSearch(encoder), task, args.output_folder)
        record({"task": task.metadata.name, "teacher": "none (plain)", "ndcg_at_10": ndcg,
                "recall_at_100": recall, "eval_s": round(seconds, 1)})
    for spec in args.teacher:
        teacher = make_teacher(spec, encoder=encoder, task_name=task.metadata.name, qrels=qrels,
                               cache_dir=args.cache_dir, device="cpu", ignore_identical_ids=ignore_ids,
                               lexical_index_dir=args.lexical_index_dir)
        for steps, lr, t_t in itertools.product(args.steps, args.lr, args.teacher_temperature):
            step = TestTimeRefinement(teacher, top_k=args.top_k, steps=steps, lr=lr, teacher_temperature=t_t,
                                      student_temperature=args.student_temperature, n_random=args.n_random,
                                      proximity=args.proximity, ignore_identical_ids=ignore_ids)
            model = SteerSearch(encoder, query_steps=[step])
            ndcg, recall, seconds = _evaluate(model, task, args.output_folder)
            n_q = step.stats.get("queries", 0) or 1
            timings = {k: round(v, 3) for k, v in step.timings.items()}
            row = {
                "task": task.metadata.name, "teacher": spec, "oracle": bool(teacher.training_datasets & {task.metadata.name}),
                "top_k": args.top_k, "steps": steps, "lr": lr, "teacher_temperature": t_t,
                "student_temperature": args.student_temperature, "n_random": args.n_random,
                "proximity": args.proximity, "ignore_identical_ids": ignore_ids,
                "ndcg_at_10": ndcg, "recall_at_100": recall, "stats": step.stats, "timings_s": timings,
                "ms_per_query": {k.removesuffix("_s"): round(1000 * v / n_q, 2) for k, v in step.timings.items()},
                "model_name": model.mteb_model_meta.name, "revision": model.mteb_model_meta.revision,
                "torch_threads": args.threads, "eval_s": round(seconds, 1),
            }
            record(row)


if __name__ == "__main__":
    main()
