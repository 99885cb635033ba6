"""mteb's own `HybridSearch` measured side by side with the package's lexical hybrid (issue 16).

Every cell uses the same dense model (all-MiniLM-L6-v2 through `SteerEncoder` / `SteerSearch`,
base vectors from the shared embedding cache) and is a full `mteb.evaluate` filed with mteb's
`ResultCache` under `<output>/results/<org__name>/<revision>/<Task>.json`:

- `dense`: the plain model.
- `bm25s` / `pkg-bm25`: the lexical side alone: mteb's `mteb/baseline-bm25s` (bm25s Lucene k1=1.5
  b=0.75, title "\\n" text) and the package's BM25 (bm25s Lucene k1=0.9 b=0.4, `LexicalHybrid`
  with lexical weight 1, i.e. the raw BM25 ranking over the whole corpus).
- `mteb-<fusion>-<lexical>`: `mteb.HybridSearch([lexical, dense], fusion_strategy=fusion)` with
  mteb's shipped settings (equal weights, rrf_k=60, sub-model top lists of max(top_k, 100) = 1000
  for mteb's retrieval tasks), fusion rrf | dbsf | rsf, lexical = bm25s | pkg-bm25.
- `mteb-<fusion>-pkg-bm25-w0.2` (diagnostic): the same with the package's lexical weight 0.2 / dense 0.8
  instead of equal weights, to separate the effect of the weight from that of the normalisation.
- `pkg-default`: the package's default hybrid (`mteb-steer evaluate --lexical bm25`: z-score
  fusion over the whole corpus, lexical weight 0.2 chosen on the TREC-DL pool).

HybridSearch names itself `mteb/baseline-hybrid-<fusion>-<sub-model names>` without a revision;
each cell here gets a revision hashed from its full configuration, so no two cells (nor a later
change of a sub-model's settings) ever share a result file. Nothing is tuned: every setting is
either mteb's shipped default or the package's default.

    HF_HUB_OFFLINE=1 nice -n 10 python scripts/mteb_hybrid_compare.py --tasks SciFact ArguAna TRECDLPool

Writes `results/benchmark/mteb_hybrid_compare.json` (every cell's nDCG@10 / recall@100 per split,
model name, revision and result file) and prints the markdown table. Cells already on disk are read
back, not recomputed (`--overwrite` recomputes).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mteb
from mteb.cache import ResultCache

from mteb_steer.embedding_cache import default_embedding_cache
from mteb_steer.encoder import SteerEncoder
from mteb_steer.identity import stable_hash
from mteb_steer.search import SteerSearch
from mteb_steer.steering.lexical import DEFAULT_WEIGHT, LexicalHybrid
from mteb_steer.tasks import resolve_task

FUSIONS = ("rrf", "dbsf", "rsf")
LEXICAL = ("bm25s", "pkg-bm25")
MTEB_BM25 = "mteb/baseline-bm25s"
SUMMARY = Path("results") / "benchmark" / "mteb_hybrid_compare.json"


@dataclass(frozen=True)
class Cell:
    """One column of the comparison: a label and how to build its search model."""

    label: str
    description: str
    build: Callable[[], Any]


def package_bm25(encoder: SteerEncoder, index_dir: Path | None = None) -> SteerSearch:
    """The package's BM25 as a search model: lexical weight 1 returns the raw BM25 scores."""
    return SteerSearch(encoder, score_fusion=LexicalHybrid(weight=1.0, fusion="zscore", index_dir=index_dir))


def lexical_model(kind: str, encoder: SteerEncoder, index_dir: Path | None = None) -> Any:
    """`bm25s`: mteb's registered `mteb/baseline-bm25s` (its loader, its defaults); `pkg-bm25`: ours."""
    if kind == "bm25s":
        return mteb.get_model(MTEB_BM25)
    if kind == "pkg-bm25":
        return package_bm25(encoder, index_dir)
    raise ValueError(f"unknown lexical sub-model {kind!r}; choose one of {LEXICAL}")


def _sub_identity(model: Any) -> dict[str, Any]:
    meta = model.mteb_model_meta
    return {"name": meta.name, "revision": meta.revision}


def mteb_hybrid(lexical: Any, dense: Any, fusion: str, lexical_weight: float | None = None) -> mteb.HybridSearch:
    """mteb's HybridSearch as mteb ships its hybrids ([bm25, dense], defaults; equal weights unless
    `lexical_weight` is given), with a revision that hashes the whole configuration (mteb leaves it empty)."""
    weights = None if lexical_weight is None else [lexical_weight, 1.0 - lexical_weight]
    hybrid = mteb.HybridSearch(models=[lexical, dense], weights=weights, fusion_strategy=fusion)
    config = {"hybrid": "mteb.HybridSearch", "mteb": mteb.__version__, "fusion": fusion,
              "weights": list(hybrid.weights), "rrf_k": hybrid.rrf_k, "sub_model_top_k": hybrid.sub_model_top_k,
              "models": [_sub_identity(m) for m in hybrid.wrapped_models]}
    hybrid.mteb_model_meta = hybrid.mteb_model_meta.model_copy(update={"revision": stable_hash(config)})
    return hybrid


def build_cells(encoder: SteerEncoder, fusions: Sequence[str] = FUSIONS, lexical: Sequence[str] = LEXICAL,
                index_dir: Path | None = None) -> list[Cell]:
    """All cells in table order. Models are built lazily, one at a time, when a cell runs."""
    dense = SteerSearch(encoder)
    cells = [
        Cell("dense", "all-MiniLM-L6-v2 alone", lambda: dense),
        Cell("bm25s", f"{MTEB_BM25} alone (k1=1.5, b=0.75)", lambda: lexical_model("bm25s", encoder, index_dir)),
        Cell("pkg-bm25", "package BM25 alone (k1=0.9, b=0.4)", lambda: lexical_model("pkg-bm25", encoder, index_dir)),
    ]
    for lex in lexical:
        for fusion in fusions:
            cells.append(Cell(f"mteb-{fusion}-{lex}", f"mteb.HybridSearch {fusion}, {lex} + dense, equal weights",
                              lambda lex=lex, fusion=fusion: mteb_hybrid(
                                  lexical_model(lex, encoder, index_dir), dense, fusion)))
    # diagnostic: mteb's fusion with the package's lexical weight (chosen on the TREC-DL pool, not tuned here),
    # to tell the effect of the weight from that of the normalisation
    for fusion in fusions:
        cells.append(Cell(f"mteb-{fusion}-pkg-bm25-w{DEFAULT_WEIGHT:g}",
                          f"mteb.HybridSearch {fusion}, pkg-bm25 + dense, weights {DEFAULT_WEIGHT:g} / {1 - DEFAULT_WEIGHT:g}",
                          lambda fusion=fusion: mteb_hybrid(lexical_model("pkg-bm25", encoder, index_dir), dense,
                                                            fusion, DEFAULT_WEIGHT)))
    cells.append(Cell("pkg-default", "package hybrid (z-score, lexical weight 0.2)",
                      lambda: SteerSearch(encoder, score_fusion=LexicalHybrid(index_dir=index_dir))))
    return cells


def run_cell(cell: Cell, task_name: str, data_root: str, output: Path, overwrite: bool = False) -> dict[str, Any]:
    """Evaluate one cell on one task (or read its result file back) and return its summary row."""
    task = resolve_task(task_name, data_root)
    model = cell.build()
    meta = model.mteb_model_meta
    cache = ResultCache(output)
    path = cache.get_task_result_path(task_name=task.metadata.name, model_name=meta)
    reused = path.exists() and not overwrite
    started = time.perf_counter()
    result = mteb.evaluate(model, task, cache=cache,
                           overwrite_strategy="always" if overwrite else "only-missing", show_progress_bar=False)
    task_result = result.task_results[0]
    splits = {split: {"ndcg_at_10": entries[0]["ndcg_at_10"], "recall_at_100": entries[0]["recall_at_100"]}
              for split, entries in sorted(task_result.scores.items())}
    return {"cell": cell.label, "description": cell.description, "task": task.metadata.name, "model_name": meta.name,
            "revision": meta.revision, "result_file": str(path), "reused": reused,
            "seconds": None if reused else round(time.perf_counter() - started, 1), "splits": splits}


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """nDCG@10 per task/split (columns) for every cell (rows)."""
    columns = list(dict.fromkeys((r["task"], split) for r in rows for split in r["splits"]))
    by_cell: dict[str, dict[tuple[str, str], float]] = {}
    for r in rows:
        for split, s in r["splits"].items():
            by_cell.setdefault(r["cell"], {})[(r["task"], split)] = s["ndcg_at_10"]
    head = ["cell"] + [f"{t} {s}" for t, s in columns]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(columns) + "|"]
    for cell, scores in by_cell.items():
        lines.append("| " + " | ".join([cell] + [f"{scores[c]:.4f}" if c in scores else "-" for c in columns]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["SciFact", "ArguAna", "TRECDLPool"])
    parser.add_argument("--cells", nargs="+", help="only these cell labels (default: all)")
    parser.add_argument("--data-root", default=os.environ.get("MTEB_STEER_DATA_ROOT", "/work/shared/datasets"))
    parser.add_argument("--output", default=".", help="results go to <output>/results/...")
    parser.add_argument("--summary", default=str(SUMMARY))
    parser.add_argument("--index-dir", help="reuse the package's saved BM25 indexes from here")
    parser.add_argument("--cache-dir", default=default_embedding_cache(), help="base-embedding cache")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    encoder = SteerEncoder(cache_dir=args.cache_dir)
    cells = build_cells(encoder, index_dir=Path(args.index_dir) if args.index_dir else None)
    if args.cells:
        unknown = set(args.cells) - {c.label for c in cells}
        if unknown:
            raise SystemExit(f"unknown cells {sorted(unknown)}; known: {[c.label for c in cells]}")
        cells = [c for c in cells if c.label in args.cells]
    summary_path = Path(args.summary)
    done = json.loads(summary_path.read_text())["rows"] if summary_path.exists() else []
    for task in args.tasks:
        for cell in cells:
            row = run_cell(cell, task, args.data_root, Path(args.output), args.overwrite)
            done = [r for r in done if (r["task"], r["cell"]) != (row["task"], row["cell"])] + [row]
            summary_path.parent.mkdir(parents=True, exist_ok=True)
            summary_path.write_text(json.dumps({"mteb": mteb.__version__, "rows": done}, indent=1) + "\n")
            nd = "  ".join(f"{s} {v['ndcg_at_10']:.4f}" for s, v in row["splits"].items())
            print(f"{task:<11} {cell.label:<16} nDCG@10 {nd}{'  (read back)' if row['reused'] else ''}", flush=True)
    print("\n" + markdown_table(done))


if __name__ == "__main__":
    main()
