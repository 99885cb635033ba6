"""Measure the linear query adapter on real data through `mteb.evaluate` (issue 4, "Must show").

    python scripts/adapter_eval.py scifact --out /tmp/adapter_eval     # trained on SciFact train qrels
    python scripts/adapter_eval.py arguana --out /tmp/adapter_eval     # trained on arguana-genq only

For every loss (plus a rank-16 mnrl adapter): train with the defaults of AdapterTrainConfig
(chosen before looking at any test score; early stopping on held-out *training* queries);
`mnrl-selected` is the best of an lr x rank grid by held-out *training* MRR@10 only;
save the adapter, evaluate the test split with mteb (results filed with mteb's ResultCache
under --out), and compute per-query nDCG@10 from mteb's saved predictions with pytrec_eval.
On SciFact the test queries are split by whether their relevant documents were train
positives (the splits share documents), an mnrl adapter early-stopped on held-out *passages*
is added, and an analysis-only control adapter is trained without the train pairs whose
positive is a test-relevant document. Prints markdown; --json writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mteb
import numpy as np
import pytrec_eval
from mteb.types import PromptType

from mteb_steer.beir import load_beir_split
from mteb_steer.embedding_cache import default_embedding_cache
from mteb_steer.encoder import SteerEncoder
from mteb_steer.search import SteerSearch
from mteb_steer.steering.adapter import (
    LOSSES,
    AdapterTrainConfig,
    PairSet,
    pairs_from_split,
    train_adapter,
    train_and_save,
    training_pairs,
)
from mteb_steer.pipeline import SteerConfig, build_model, default_output_folder
from mteb_steer.results import AtomicResultCache, file_configuration
from mteb_steer.tasks import resolve_task

CACHE = default_embedding_cache()
GRID_LR = (1e-4, 3e-4, 1e-3)
GRID_RANK = (None, 16, 64)
TASKS = {"scifact": ("SciFact", "scifact"), "arguana": ("ArguAna", "arguana")}


def evaluate(model: SteerSearch, task_name: str, data_root: Path, out: Path, label: str,
             output_folder: Path) -> tuple[float, dict]:
    """mteb nDCG@10 of the test split (filed under output_folder/results/ with its steer_config.json) and
    per-query nDCG@10 recomputed from mteb's predictions (kept under out)."""
    task = resolve_task(task_name, data_root)
    predictions = out / "predictions" / label
    started = time.perf_counter()
    file_configuration(output_folder, model)
    result = mteb.evaluate(model, task, cache=AtomicResultCache(output_folder), overwrite_strategy="always",
                           prediction_folder=predictions, show_progress_bar=False)
    seconds = time.perf_counter() - started
    score = result.task_results[0].get_score()
    run = json.loads(task._predictions_path(predictions).read_text())["default"]["test"]
    if getattr(task, "ignore_identical_ids", False):
        run = {qid: {d: s for d, s in docs.items() if d != qid} for qid, docs in run.items()}
    qrels = load_beir_split(data_root / TASKS[task_name.lower()][1], "test").qrels
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    return score, {"seconds": seconds, "per_query": {q: v["ndcg_cut_10"] for q, v in per_query.items()}}


def without_docs(data: PairSet, rows: set[int]) -> PairSet:
    """The same pairs minus those whose positive is one of `rows` (analysis-only control)."""
    keep = [i for i, r in enumerate(data.positives.tolist()) if r not in rows]
    return PairSet(queries=[data.queries[i] for i in keep], positives=data.positives[keep],
                   groups=[data.groups[i] for i in keep], corpus_texts=data.corpus_texts,
                   name=data.name + "-minus-test-docs", training_datasets=data.training_datasets)


def paired_delta(run: dict, plain: dict, qids: list[str]) -> str:
    """Mean per-query nDCG@10 difference to the plain model over `qids`, ± its standard error."""
    diff = np.array([run["per_query"][q] - plain["per_query"][q] for q in qids])
    se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    return f"{diff.mean():+.4f} ± {se:.4f}"


def select_on_held_out(encoder: SteerEncoder, data: PairSet, grid: list[AdapterTrainConfig], report: dict
                       ) -> AdapterTrainConfig:
    """The grid point with the best held-out MRR@10 of the *training* queries (no test data involved)."""
    scores = []
    for config in grid:
        history = train_adapter(encoder, data, config, show_progress_bar=False)[1]
        scores.append(history.epochs[history.best_epoch]["val_mrr_at_10"])
        report.setdefault("grid", []).append({"lr": config.lr, "rank": config.rank, "best_epoch": history.best_epoch,
                                              "val_mrr_at_10": scores[-1]})
    return grid[int(np.argmax(scores))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--data-root", type=Path, default=Path("/work/shared/datasets"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/adapter_eval"), help="adapters and predictions")
    parser.add_argument("--output-folder", type=Path, default=default_output_folder(),
                        help="results land in <output-folder>/results/<org__model>/<revision>/ (default: current dir)")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    task_name, folder = TASKS[args.task]
    root = args.data_root

    if args.task == "scifact":
        data = pairs_from_split(root / folder, "train")
    else:
        data = training_pairs(query_bank=root / "arguana-genq")
    encoder = SteerEncoder(device="cpu", cache_dir=CACHE)
    report: dict = {"task": task_name, "training_data": data.name, "n_pairs": len(data.queries), "runs": {}}
    started = time.perf_counter()  # base vectors once (cached); training itself then runs on vectors only
    encoder.embed(data.queries, PromptType.query, apply_transforms=False, show_progress_bar=True)
    encoder.embed(data.corpus_texts, PromptType.document, show_progress_bar=True)
    report["embed_training_data_s"] = time.perf_counter() - started

    variants: list[tuple[str, PairSet, AdapterTrainConfig]] = [
        (loss, data, AdapterTrainConfig(loss=loss)) for loss in args.losses]
    variants.append(("mnrl-rank16", data, AdapterTrainConfig(loss="mnrl", rank=16)))
    if args.task == "scifact":
        variants.append(("mnrl-holdout-passage", data, AdapterTrainConfig(loss="mnrl", holdout="passage")))
        split = load_beir_split(root / folder, "test")
        row_of = {row["id"]: i for i, row in enumerate(split.corpus)}
        test_docs = {row_of[d] for docs in split.qrels.values() for d in docs if d in row_of}
        variants.append(("mnrl-control", without_docs(data, test_docs), AdapterTrainConfig(loss="mnrl")))
    grid = [AdapterTrainConfig(loss="mnrl", lr=lr, rank=rank) for lr in GRID_LR for rank in GRID_RANK]
    variants.append(("mnrl-selected", data, select_on_held_out(encoder, data, grid, report)))
    adapters = {}
    for label, pairs, config in variants:
        started = time.perf_counter()
        _, history, adapters[label] = train_and_save(encoder, pairs, args.out / "adapters" / f"{args.task}-{label}",
                                                     config)
        report["runs"][label] = {"train_s": time.perf_counter() - started, "best_epoch": history.best_epoch,
                                 "val_mrr": [e["val_mrr_at_10"] for e in history.epochs],
                                 "n_train_pairs": history.n_train_pairs}

    base_score, base = evaluate(build_model(SteerConfig(device="cpu"), encoder=encoder), task_name, root, args.out,
                                "plain", args.output_folder)
    report["runs"] = {"plain": {"ndcg_at_10": base_score, **base}, **report["runs"]}
    print(f"plain: nDCG@10 {base_score:.4f}", file=sys.stderr)
    for label, adapter_dir in adapters.items():
        model = build_model(SteerConfig(adapter=str(adapter_dir), device="cpu", embedding_cache=str(CACHE)))
        score, detail = evaluate(model, task_name, root, args.out, label, args.output_folder)
        run = report["runs"][label]
        run.update({"ndcg_at_10": score, **detail, "model": model.mteb_model_meta.name,
                    "revision": model.mteb_model_meta.revision})
        print(f"{label}: nDCG@10 {score:.4f} (best epoch {run['best_epoch']}, train {run['train_s']:.1f}s)",
              file=sys.stderr)

    print(f"## {task_name}: linear query adapter trained on {data.name} ({len(data.queries)} pairs; base "
          f"embeddings of the pairs {report['embed_training_data_s']:.0f} s (0: shared cache), not in train s)\n")
    print("| run | model name @ revision | nDCG@10 | Δ vs plain ± paired SE | best epoch "
          "| held-out MRR@10 (epoch 0 → best) | train s |")
    print("|---|---|---|---|---|---|---|")
    for label, run in report["runs"].items():
        if label == "plain":
            print(f"| plain | {encoder.mteb_model_meta.name} | {run['ndcg_at_10']:.4f} | | | | |")
            continue
        val = run["val_mrr"]
        print(f"| {label} | {run['model']} @ {run['revision']} | {run['ndcg_at_10']:.4f} "
              f"| {paired_delta(run, report['runs']['plain'], list(run['per_query']))} | {run['best_epoch']} "
              f"| {val[0]:.4f} → {val[run['best_epoch']]:.4f} | {run['train_s']:.1f} |")

    print("\n### mnrl grid, held-out training MRR@10 only (the best row is `mnrl-selected` above)\n")
    print("| lr | rank | best epoch | held-out MRR@10 |")
    print("|---|---|---|---|")
    for row in report["grid"]:
        print(f"| {row['lr']:g} | {row['rank'] or 'full'} | {row['best_epoch']} | {row['val_mrr_at_10']:.4f} |")

    if args.task == "scifact":
        train_docs = {d for docs in load_beir_split(root / folder, "train").qrels.values() for d, s in docs.items()
                      if s > 0}
        groups = {"all relevant docs were train positives": [], "some were": [], "none were": []}
        for qid, docs in split.qrels.items():
            seen = sum(d in train_docs for d in docs)
            key = "all relevant docs were train positives" if seen == len(docs) else "none were" if seen == 0 else \
                "some were"
            groups[key].append(qid)
        shared = {d for docs in split.qrels.values() for d in docs} & train_docs
        report["shared_relevant_docs"] = len(shared)
        report["groups"] = {k: len(v) for k, v in groups.items()}
        labels = list(report["runs"])
        print(f"\n### SciFact test queries by overlap with train positives ({len(shared)} relevant test docs "
              "are also train positives)\n")
        print("| test queries | n | " + " | ".join(labels) + " |")
        print("|---|---|" + "---|" * len(labels))
        for key, qids in groups.items():
            if not qids:
                continue
            cells = []
            for label in labels:
                run = report["runs"][label]
                mean = float(np.mean([run["per_query"][q] for q in qids]))
                delta = "" if label == "plain" else f" ({paired_delta(run, report['runs']['plain'], qids)})"
                cells.append(f"{mean:.4f}{delta}")
                report.setdefault("by_group", {}).setdefault(key, {})[label] = mean
            print(f"| {key} | {len(qids)} | " + " | ".join(cells) + " |")
    for label, run in report["runs"].items():  # per-query mean must equal mteb's aggregate
        run["per_query_mean"] = float(np.mean(list(run["per_query"].values())))
        assert abs(run["per_query_mean"] - run["ndcg_at_10"]) < 1e-4, (label, run["per_query_mean"], run["ndcg_at_10"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
