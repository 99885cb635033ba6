"""Choose the lexical hybrid's default weight and fusion mode on the TREC-DL 2019/2020 pool.

BEIR practice: tune on MS MARCO, report zero-shot elsewhere. The dense side is the plain bundled
all-MiniLM-L6-v2; every (fusion, weight) pair is a full `mteb.evaluate` on both splits, and the
pair with the best mean nDCG@10 over dl19 and dl20 is printed as the choice. SciFact/ArguAna
labels are never looked at.

    HF_HUB_OFFLINE=1 python scripts/tune_lexical_weight.py --data-root /work/shared/datasets
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lexical_eval import evaluate_settings, markdown_table, write_rows  # noqa: E402

from mteb_steer.embedding_cache import default_embedding_cache  # noqa: E402
from mteb_steer.encoder import SteerEncoder  # noqa: E402
from mteb_steer.pipeline import default_output_folder  # noqa: E402
from mteb_steer.steering.lexical import FUSION_MODES  # noqa: E402

WEIGHTS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="TRECDLPool", help="the tuning task (never a reported one)")
    parser.add_argument("--data-root", default="/work/shared/datasets")
    parser.add_argument("--weights", nargs="+", type=float, default=WEIGHTS)
    parser.add_argument("--fusions", nargs="+", default=list(FUSION_MODES), choices=FUSION_MODES)
    parser.add_argument("--index-dir", default=str(Path(tempfile.gettempdir()) / "mteb_steer_lexical_indexes"))
    parser.add_argument("--cache-dir", default=default_embedding_cache(), help="base-embedding cache")
    parser.add_argument("--output-folder", type=Path, default=default_output_folder(),
                        help="results land in <output-folder>/results/<org__model>/<revision>/ (default: current dir)")
    parser.add_argument("--json", type=Path, default=Path("results/lexical_eval/trecdl_tuning.json"),
                        help="the rows and the choice, committed beside the results")
    args = parser.parse_args()
    settings = ["dense", "bm25"] + [f"{f}:{w:g}" for f in args.fusions for w in args.weights]
    rows = evaluate_settings(args.task, settings, args.data_root, None, Path(args.index_dir),
                             SteerEncoder(cache_dir=args.cache_dir), args.output_folder)
    print(f"\n{args.task}: plain all-MiniLM-L6-v2 + BM25 (lucene k1=0.9 b=0.4), every (fusion, weight)\n")
    print(markdown_table(rows))
    best = max(rows[2:], key=lambda r: r["mean_ndcg"])
    fusion, weight = best["setting"].split(":")
    print(f"\nchosen: fusion={fusion} weight={weight} (mean nDCG@10 {best['mean_ndcg']:.4f}, "
          f"mean R@100 {best['mean_recall']:.4f})")
    write_rows(args.json, {"command": " ".join(["python", *sys.argv]), "task": args.task, "rows": rows,
                           "chosen": {"fusion": fusion, "weight": float(weight)}})


if __name__ == "__main__":
    main()
