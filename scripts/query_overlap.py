"""How much of each query's wording comes from its passage: generated banks against the task's own queries.

Why: a generated query that restates its passage adds nothing to the passage's BM25 terms or vector,
and as a tuning pseudo-query it is found too easily. For each bank (queries -> the passage they
were written for) and for the task's real queries (-> their relevant passages in `--split`, read for
this description only, never to choose a setting), it reports the share of queries that appear
verbatim in the passage, the share whose words are >= 90% passage words, and the mean share.

    python scripts/query_overlap.py -t SciFact --split train --bank styled=results/banks/scifact-gemma3-270m-taskstyle.jsonl.gz \\
        --bank question=results/banks/scifact-gemma3-270m.jsonl.gz --out results/benchmark/query_overlap_scifact.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
from collections.abc import Iterable
from pathlib import Path

from mteb_steer.beir import load_beir_split
from mteb_steer.encoder import passage_text
from mteb_steer.steering.banks import load_bank
from mteb_steer.tasks import resolve_task

_WORD = re.compile(r"\w+")


def overlap(pairs: Iterable[tuple[str, str]]) -> dict[str, float | int]:
    """Statistics over (query, passage) pairs of how much of the query's wording the passage holds."""
    shares, verbatim = [], 0
    for query, passage in pairs:
        words = _WORD.findall(query.lower())
        vocabulary = set(_WORD.findall(passage.lower()))
        shares.append(sum(w in vocabulary for w in words) / max(1, len(words)))
        verbatim += query.lower().strip(" .") in passage.lower()
    n = len(shares)
    return {"pairs": n, "verbatim_in_passage": round(verbatim / n, 3),
            "words_90pct_from_passage": round(sum(s >= 0.9 for s in shares) / n, 3),
            "mean_share_of_passage_words": round(statistics.fmean(shares), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-t", "--task", required=True, help="task name or BEIR folder")
    parser.add_argument("--split", required=True, help="qrels split whose real queries to describe")
    parser.add_argument("--bank", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--data-root", default=os.environ.get("MTEB_STEER_DATA_ROOT", "../shared/datasets"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    split = load_beir_split(resolve_task(args.task, args.data_root).data_folder, args.split)
    corpus = {r["id"]: passage_text(r["title"], r["text"]) for r in split.corpus}
    queries = {r["id"]: r["text"] for r in split.queries}
    real = [(queries[qid], corpus[doc_id]) for qid, docs in split.qrels.items() for doc_id, score in docs.items()
            if score > 0 and doc_id in corpus and qid != doc_id]
    record = {"task": args.task, f"real queries ({args.split} qrels)": overlap(real)}
    for name, path in (item.split("=", 1) for item in args.bank):
        bank = load_bank(path)
        record[name] = {"source": path, "passages_with_queries": sum(bool(qs) for qs in bank.values()),
                        **overlap((q, corpus[d]) for d, qs in bank.items() for q in qs)}
    print(json.dumps(record, indent=2))
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
