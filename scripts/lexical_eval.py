"""Evaluate lexical-hybrid settings on one retrieval task and print a markdown table.

Each setting is a full `mteb.evaluate` of the model `build_model(SteerConfig(lexical="bm25", ...))` builds
with the shared base-embedding cache (the dense side is encoded once for the whole sweep) and
built BM25 indexes reused from `--index-dir`. Columns: nDCG@10 and recall@100 per split and
their mean, and the scoring time per query (dense similarity + fusion + top-k, last split;
query vectors come from the cache). `--costs` adds a fresh BM25 index build: build time, size on disk, BM25-only time per query.

    HF_HUB_OFFLINE=1 python scripts/lexical_eval.py --task SciFact --settings dense bm25 zscore:0.3 rrf:0.5
    HF_HUB_OFFLINE=1 python scripts/lexical_eval.py --task ArguAna --bank /work/shared/datasets/arguana-genq

Every setting's evaluation is filed in the leaderboard layout under `--output-folder` (default: the
current directory, i.e. `results/<org__model>/<revision>/`); `--json` writes the printed rows too.

A setting is `dense` (no lexical side), `bm25` (lexical weight 1), `default` (the package
defaults), or `<fusion>:<weight>` with fusion zscore | rrf | minmax.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mteb_steer.embedding_cache import default_embedding_cache
from mteb_steer.encoder import SteerEncoder, dataset_passage_texts
from mteb_steer.pipeline import SteerConfig, build_model, default_output_folder
from mteb_steer.results import evaluate_tasks
from mteb_steer.steering.banks import QueryBank, load_bank
from mteb_steer.steering.lexical import FUSION_MODES, LexicalIndex, disk_bytes
from mteb_steer.tasks import resolve_task

DEFAULT_SETTINGS = ["dense", "bm25", "default", "zscore:0.1", "zscore:0.3", "zscore:0.5", "rrf:0.3", "minmax:0.3"]


def config_for(setting: str, bank: str | None, index_dir: Path) -> SteerConfig:
    """The configuration a setting names (`dense`: no lexical side)."""
    if setting == "dense":
        return SteerConfig()
    lexical = {"lexical": "bm25", "query_bank": bank, "lexical_index_dir": str(index_dir)}
    if setting == "default":
        return SteerConfig(**lexical)
    if setting == "bm25":
        return SteerConfig(lexical_weight=1.0, lexical_fusion="zscore", **lexical)
    fusion, _, weight = setting.partition(":")
    if fusion not in FUSION_MODES or not weight:
        raise SystemExit(f"bad setting {setting!r}: expected dense, bm25, default or <zscore|rrf|minmax>:<weight>")
    return SteerConfig(lexical_weight=float(weight), lexical_fusion=fusion, **lexical)


def evaluate_settings(task_name: str, settings: list[str], data_root: str, bank: str | None,
                      index_dir: Path, encoder: SteerEncoder, output_folder: Path) -> list[dict]:
    """One row per setting: {setting, splits: {split: (ndcg@10, recall@100)}, mean_ndcg, mean_recall, ms_per_query}."""
    task = resolve_task(task_name, data_root)
    task.load_data()  # mteb.evaluate unloads the data after each run: count the last split's queries now
    last = task.eval_splits[-1]
    n_queries = len(task.dataset["default"][last]["queries"])
    rows = []
    for setting in settings:
        model = build_model(config_for(setting, bank, index_dir), encoder=encoder)
        scores = evaluate_tasks(model, [task], output_folder, overwrite=True, show_progress_bar=False)
        splits = {s.split: (s.ndcg_at_10, s.recall_at_100) for s in sorted(scores, key=lambda s: s.split)}
        rows.append({"setting": setting, "tag": model.score_fusion.tag if model.score_fusion else "dense",
                     "splits": splits,
                     "mean_ndcg": sum(s[0] for s in splits.values()) / len(splits),
                     "mean_recall": sum(s[1] for s in splits.values()) / len(splits),
                     "ms_per_query": 1000 * model.timings["score_s"] / n_queries})
        print(f"  {setting:<12} nDCG@10 {rows[-1]['mean_ndcg']:.4f}  R@100 {rows[-1]['mean_recall']:.4f}", flush=True)
    return rows


def write_rows(path: Path, report: dict) -> None:
    """The raw rows behind a printed table, committed beside the results (every number traceable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


def markdown_table(rows: list[dict]) -> str:
    splits = list(rows[0]["splits"])
    head = ["setting", "step tag"] + [f"{s} nDCG@10 / R@100" for s in splits]
    if len(splits) > 1:
        head.append("mean nDCG@10 / R@100")
    head.append("score+fuse+top-k ms/query")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["setting"], row["tag"]] + [f"{n:.4f} / {r:.4f}" for n, r in row["splits"].values()]
        if len(splits) > 1:
            cells.append(f"{row['mean_ndcg']:.4f} / {row['mean_recall']:.4f}")
        cells.append(f"{row['ms_per_query']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def index_costs(task_name: str, data_root: str, bank: QueryBank | None) -> str:
    """A fresh BM25 build of the task corpus: build seconds, size on disk, BM25-only ms per query."""
    task = resolve_task(task_name, data_root)
    task.load_data()
    split = task.eval_splits[-1]
    data = task.dataset["default"][split]
    corpus = data["corpus"]
    texts = dataset_passage_texts(corpus)
    queries = list(data["queries"]["text"])
    started = time.perf_counter()
    index = LexicalIndex.build([str(i) for i in corpus["id"]], texts, bank=bank)
    build_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        size = disk_bytes(index.save(Path(tmp) / "index"))
    started = time.perf_counter()
    query_matrix = index.query_matrix(queries)[0]
    for start in range(0, len(texts), 50_000):  # corpus blocks, as the search scores them
        index.matched_block(query_matrix, slice(start, start + 50_000))
    per_query_ms = 1000 * (time.perf_counter() - started) / len(queries)
    return (f"BM25 index ({len(texts)} passages{', expanded' if bank else ''}): build {build_s:.1f} s, "
            f"{size / 2**20:.1f} MiB on disk ({index.term_docs.nnz} postings), "
            f"BM25 scoring {per_query_ms:.2f} ms/query over {len(queries)} {split} queries")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True)
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS)
    parser.add_argument("--data-root", default="/work/shared/datasets")
    parser.add_argument("--bank", help="query bank (JSONL or BEIR genq folder) for document expansion")
    parser.add_argument("--index-dir", default=str(Path(tempfile.gettempdir()) / "mteb_steer_lexical_indexes"))
    parser.add_argument("--cache-dir", default=default_embedding_cache(), help="base-embedding cache")
    parser.add_argument("--costs", action="store_true", help="also time a fresh index build")
    parser.add_argument("--output-folder", type=Path, default=default_output_folder(),
                        help="results land in <output-folder>/results/<org__model>/<revision>/ (default: current dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows (and costs) as JSON here")
    args = parser.parse_args()
    for setting in args.settings:  # a typo fails before any model work
        config_for(setting, args.bank, Path(args.index_dir))
    bank = load_bank(args.bank) if args.bank else None
    encoder = SteerEncoder(cache_dir=args.cache_dir)
    rows = evaluate_settings(args.task, args.settings, args.data_root, args.bank, Path(args.index_dir), encoder,
                             args.output_folder)
    print(f"\n{args.task}{' (expanded with ' + args.bank + ')' if bank else ''}\n")
    print(markdown_table(rows))
    costs = index_costs(args.task, args.data_root, bank) if args.costs else None
    if costs:
        print("\n" + costs)
    if args.json:
        write_rows(args.json, {"command": " ".join(["python", *sys.argv]), "task": args.task, "bank": args.bank,
                               "rows": rows, "costs": costs})


if __name__ == "__main__":
    main()
