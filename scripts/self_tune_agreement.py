"""Does the label-free self-tuning criterion rank settings the way real nDCG@10 does? (issue 14)

For each task, every grid setting is scored twice: by the self-tuning criterion (pseudo-query
nDCG@10, `mteb_steer.steering.self_tune`, no label) and by real nDCG@10 of the task's eval
split(s) (pytrec_eval, the qrels read ONLY here, after the criterion is computed, for the report).
Reported per grid: Spearman and Kendall rank correlation between the two, and the real nDCG@10
of the setting the rule picks against the best, the worst and the fixed reference setting.

Grids: BM25 (k1, b) with BM25 alone; then, with --dense, the lexical weight of the hybrid at the
(k1, b) the rule picked (needs the corpus embeddings; cached after the first encode). With
`--bank TASK=PATH` that task is also run with held-out generated queries as pseudo-queries and the
bank (minus them) as BM25 expansion, as `evaluate --query-bank PATH --lexical bm25 --self-tune` runs.

    HF_HUB_OFFLINE=1 python scripts/self_tune_agreement.py --tasks SciFact ArguAna TRECDLPool \\
        --dense SciFact ArguAna --bank ArguAna=/work/shared/datasets/arguana-genq \\
        --out results/benchmark/self_tune_agreement.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytrec_eval  # noqa: E402
import torch  # noqa: E402
from mteb.types import PromptType  # noqa: E402
from scipy.stats import kendalltau, spearmanr  # noqa: E402

from mteb_steer.embedding_cache import default_embedding_cache  # noqa: E402
from mteb_steer.encoder import SteerEncoder, dataset_passage_texts  # noqa: E402
from mteb_steer.search import SteerSearch  # noqa: E402
from mteb_steer.steering.banks import load_bank  # noqa: E402
from mteb_steer.steering.lexical import DEFAULT_FUSION, BM25Params, LexicalHybrid, LexicalIndex  # noqa: E402
from mteb_steer.steering.self_tune import (  # noqa: E402
    SAMPLE_SIZE,
    SEED,
    WEIGHT_GRID,
    Probes,
    bank_probes,
    bm25_grid,
    cut_sentence_probes,
    cut_vectors,
    grid_counts,
    split_bank,
    tune_bm25,
    tune_weight,
)
from mteb_steer.steps import CorpusIndex, QueryBatch  # noqa: E402
from mteb_steer.tasks import resolve_task  # noqa: E402

QUERY_CHUNK = 256


def top11(score_chunks, query_ids: list[str], doc_ids: list[str]) -> dict[str, dict[str, float]]:
    """The top 11 passages per query from (row offset, score tensor) chunks."""
    run: dict[str, dict[str, float]] = {}
    for start, scores in score_chunks:
        values, idx = torch.topk(scores, min(11, scores.shape[1]), dim=1)
        for q in range(scores.shape[0]):
            run[query_ids[start + q]] = {doc_ids[i]: float(v) for i, v in zip(idx[q].tolist(), values[q].tolist(),
                                                                             strict=True)}
    return run


def real_ndcg10(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]], ignore_identical_ids: bool
                ) -> float:
    """Mean nDCG@10 (pytrec_eval) of a run's top 10 per query (a query's own passage dropped first if asked)."""
    top10 = {}
    for qid, docs in run.items():
        kept = {d: v for d, v in docs.items() if not (ignore_identical_ids and d == qid)}
        top10[qid] = dict(sorted(kept.items(), key=lambda kv: -kv[1])[:10])
    judged = {q: {d: int(s) for d, s in docs.items()} for q, docs in qrels.items() if q in top10}
    per_query = pytrec_eval.RelevanceEvaluator(judged, {"ndcg_cut.10"}).evaluate({q: top10[q] for q in judged})
    return float(np.mean([v["ndcg_cut_10"] for v in per_query.values()]))


def agreement(criterion: list[float], real: list[float], chosen: int, reference: int) -> dict[str, Any]:
    rho = spearmanr(criterion, real).statistic
    tau = kendalltau(criterion, real).statistic
    return {"spearman": float(rho), "kendall": float(tau), "chosen_real": real[chosen],
            "best_real": max(real), "worst_real": min(real), "reference_real": real[reference],
            "criterion_argmax_real": real[int(np.argmax(criterion))]}


def run_task(name: str, data_root: str, bank_path: str | None, dense: bool, encoder: SteerEncoder | None,
             sample_size: int, seed: int) -> dict[str, Any]:
    task = resolve_task(name, data_root)
    task.load_data()
    first = task.dataset["default"][task.eval_splits[0]]
    ids = [str(i) for i in first["corpus"]["id"]]
    texts = dataset_passage_texts(first["corpus"])
    bank = held = None
    if bank_path:
        bank, held = split_bank(load_bank(bank_path), sample_size, seed)
    doc_vectors = encoder.embed(texts, PromptType.document, show_progress_bar=True) if dense else None
    index = CorpusIndex(ids=ids, texts=texts, embeddings=doc_vectors if dense else np.zeros((len(ids), 1)),
                        task_name=name)
    probes: Probes = bank_probes(held, index) if held is not None else cut_sentence_probes(texts, sample_size, seed)
    tuning_texts = probes.tuning_texts if probes.tuning_texts is not None else texts
    out: dict[str, Any] = {"task": name, "passages": len(ids), "pseudo_queries": len(probes.texts),
                           "source": probes.source, "bank": bank_path, "sample_size": sample_size, "seed": seed}

    # 1. label-free criterion (no qrels touched yet)
    started = time.perf_counter()
    grid = bm25_grid()
    tuning_counts = grid_counts(tuning_texts, ids, bank, grid)  # shared by the grid and the chosen index
    bm25_choice, _ = tune_bm25(probes, ids, tuning_texts, bank, grid, counts=tuning_counts)
    out["bm25_tune_s"] = round(time.perf_counter() - started, 1)
    chosen_params = BM25Params(k1=bm25_choice.chosen[0], b=bm25_choice.chosen[1])
    weight_choice = None
    if dense:
        lexical = LexicalIndex.build(ids, tuning_texts, chosen_params, bank, counts=tuning_counts)
        weight_choice, _ = tune_weight(probes, lexical, encoder.embed(probes.texts, PromptType.query), doc_vectors,
                                       encoder, list(WEIGHT_GRID), DEFAULT_FUSION,
                                       doc_overrides=cut_vectors(probes, tuning_texts, encoder))

    # 2. real nDCG@10 per setting (labels read here, for the report only)
    splits = {s: task.dataset["default"][s] for s in task.eval_splits}
    ignore = bool(getattr(task, "ignore_identical_ids", False))

    query_vectors = {name: encoder.embed(list(split["queries"]["text"]), PromptType.query)
                     for name, split in splits.items()} if dense else {}

    def mean_over_splits(run_fn) -> float:
        """Mean over eval splits of real nDCG@10; run_fn(query ids, texts, vectors or None) -> top 11 per query."""
        values = []
        for name, split in splits.items():
            qids = [str(i) for i in split["queries"]["id"]]
            run = run_fn(qids, list(split["queries"]["text"]), query_vectors.get(name))
            values.append(real_ndcg10(run, split["relevant_docs"], ignore))
        return float(np.mean(values))

    def bm25_run(ix: LexicalIndex, qids: list[str], qtexts: list[str], _vectors) -> dict[str, dict[str, float]]:
        chunks = ((s, torch.from_numpy(bm25_chunk(ix, qtexts[s:s + QUERY_CHUNK])))
                  for s in range(0, len(qtexts), QUERY_CHUNK))
        return top11(chunks, qids, ids)

    real_bm25 = []
    counts = grid_counts(texts, ids, bank, grid)
    for params in grid:
        real_index = LexicalIndex.build(ids, texts, params, bank, counts=counts)
        real_bm25.append(mean_over_splits(lambda qids, q, v, ix=real_index: bm25_run(ix, qids, q, v)))
    ref = bm25_choice.grid.index(bm25_choice.reference)
    out["bm25"] = {**bm25_choice.__dict__, "real_ndcg10": real_bm25,
                   **agreement(bm25_choice.scores, real_bm25, bm25_choice.grid.index(bm25_choice.chosen), ref)}
    if weight_choice is not None:
        real_weight = []
        for w in WEIGHT_GRID:
            hybrid = LexicalHybrid(w, DEFAULT_FUSION, params=chosen_params, bank=bank)
            hybrid.fit(index)

            def fused(qids, qtexts, vectors, h=hybrid):  # the package's own search path, tile by tile
                return SteerSearch(encoder, score_fusion=h).rank(QueryBatch(ids=qids, texts=qtexts, embeddings=vectors),
                                                                 index, top_k=11)
            real_weight.append(mean_over_splits(fused))
        ref = weight_choice.grid.index(weight_choice.reference)
        out["weight"] = {**weight_choice.__dict__, "bm25_params": [chosen_params.k1, chosen_params.b],
                         "real_ndcg10": real_weight,
                         **agreement(weight_choice.scores, real_weight, weight_choice.grid.index(weight_choice.chosen),
                                     ref)}
    return out


def fmt(value: float | list[float]) -> str:
    """A grid value as the tables print it: 0.9, or "1.2, 0.75" for a (k1, b) pair."""
    return ", ".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"


def markdown(paths: list[str]) -> str:
    """The BENCHMARKS.md table of committed agreement files (no number typed by hand)."""
    lines = ["| data set | pseudo-queries | grid | Spearman | Kendall | rule's pick | real nDCG@10 of pick | best "
             "| worst | fixed reference |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in (r for path in paths for r in json.loads(Path(path).read_text())["rows"]):
        source = f"{row['source']} x{row['pseudo_queries']}" + (" (rest of bank expands BM25)" if row["bank"] else "")
        for grid in ("bm25", "weight"):
            if grid in row:
                g = row[grid]
                what = ("BM25 (k1, b), BM25 alone" if grid == "bm25" else
                        f"lexical weight, hybrid at k1, b = {fmt(g['bm25_params'])}")
                lines.append(f"| {row['task']} | {source} | {what} | {g['spearman']:.3f} | {g['kendall']:.3f} | "
                             f"{fmt(g['chosen'])} | {g['chosen_real']:.4f} | {g['best_real']:.4f} | "
                             f"{g['worst_real']:.4f} | {g['reference_real']:.4f} ({fmt(g['reference'])}) |")
    return "\n".join(lines)


def stability(paths: list[str]) -> str:
    """How much the rule's pick depends on which pseudo-queries were sampled: agreement files of
    several seeds grouped by data set, pseudo-query source and sample size. The picks are label-free;
    the real nDCG@10 columns only describe their spread (nothing is chosen on them)."""
    groups: dict[tuple, list[dict]] = {}
    for row in (r for path in paths for r in json.loads(Path(path).read_text())["rows"]):
        groups.setdefault((row["task"], row["source"], bool(row["bank"]), row["sample_size"]), []).append(row)
    lines = ["| data set | pseudo-queries | seeds | (k1, b) picks | weight picks | BM25 alone: real nDCG@10 of "
             "pick, min-max (fixed 0.9, 0.4) | hybrid: real nDCG@10 of pick, mean (min-max) |",
             "|---|---|---|---|---|---|---|"]
    for (task, source, bank, size), rows in groups.items():
        rows = sorted(rows, key=lambda r: r["seed"])
        bm25_real = [r["bm25"]["chosen_real"] for r in rows]
        picks = "; ".join(fmt(r["bm25"]["chosen"]) for r in rows)
        weights = ", ".join(fmt(r["weight"]["chosen"]) for r in rows if "weight" in r) or "-"
        hybrid = [r["weight"]["chosen_real"] for r in rows if "weight" in r]
        hybrid_cell = f"{np.mean(hybrid):.4f} ({min(hybrid):.4f}-{max(hybrid):.4f})" if hybrid else "-"
        lines.append(f"| {task} | {source} x{size}" + (" (rest of bank expands BM25)" if bank else "") +
                     f" | {', '.join(str(r['seed']) for r in rows)} | {picks} | {weights} | "
                     f"{min(bm25_real):.4f}-{max(bm25_real):.4f} ({rows[0]['bm25']['reference_real']:.4f}) | {hybrid_cell} |")
    return "\n".join(lines)


def bm25_chunk(index: LexicalIndex, query_texts: list[str]) -> np.ndarray:
    """BM25 of one query chunk (QUERY_CHUNK rows) against every passage: matched part + constant."""
    query_matrix = index.query_matrix(query_texts)[0]
    return index.matched_block(query_matrix, slice(0, len(index.ids))) + index.constant(query_matrix)[:, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["SciFact", "ArguAna", "TRECDLPool"])
    parser.add_argument("--dense", nargs="*", default=[], help="tasks whose hybrid weight grid is also checked")
    parser.add_argument("--bank", action="append", default=[], metavar="TASK=PATH",
                        help="also run TASK with held-out generated queries of this bank")
    parser.add_argument("--data-root", default=os.environ.get("MTEB_STEER_DATA_ROOT", "/work/shared/datasets"))
    parser.add_argument("--sample-size", type=int, default=SAMPLE_SIZE)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", help="JSON output file")
    parser.add_argument("--markdown", nargs="+", metavar="JSON", help="only print the table of these output files")
    parser.add_argument("--stability", nargs="+", metavar="JSON",
                        help="only print how the picks vary over these output files (runs with different --seed)")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(args.markdown))
        return
    if args.stability:
        print(stability(args.stability))
        return
    if not args.out:
        parser.error("--out is required")
    banks = dict(item.split("=", 1) for item in args.bank)
    encoder = SteerEncoder(cache_dir=default_embedding_cache()) if args.dense else None
    rows = []
    for name in args.tasks:
        for bank_path in [None, *([banks[name]] if name in banks else [])]:
            row = run_task(name, args.data_root, bank_path, name in args.dense, encoder, args.sample_size, args.seed)
            rows.append(row)
            for grid in ("bm25", "weight"):
                if grid in row:
                    g = row[grid]
                    print(f"{name} [{row['source']}] {grid}: spearman {g['spearman']:.3f} kendall {g['kendall']:.3f} "
                          f"chosen {g['chosen']} real {g['chosen_real']:.4f} (best {g['best_real']:.4f}, worst "
                          f"{g['worst_real']:.4f}, reference {g['reference_real']:.4f})", flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"command": "scripts/self_tune_agreement.py", "args": vars(args),
                                                  "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
