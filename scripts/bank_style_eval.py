"""Compare query banks at equal coverage: dense fusion, BM25 expansion and a query adapter, through the CLI.

Why: a task-styled bank takes many CPU hours to generate; while it is partial, the fair question is
whether its queries steer better than another bank's *for the same passages*. Every bank is cut to
the passages that all of them cover, then each runs the three bank uses as a user would
(`mteb-steer evaluate --query-bank B --fusion mean`, `... --lexical bm25` with and without
`--self-tune`, `mteb-steer train-adapter --query-bank B` + `evaluate --adapter`), with the defaults
(nothing chosen on the test labels), beside the same runs without a bank. Writes nDCG@10 per run,
what each run's steps chose (steer_fit.json), the coverage, the cut banks' fingerprints and the commands.

    python scripts/bank_style_eval.py -t SciFact --bank styled=results/banks/scifact-gemma3-270m-taskstyle.jsonl.gz \\
        --bank question=results/banks/scifact-gemma3-270m.jsonl.gz --out results/benchmark/bank_style_scifact.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mteb_steer.beir import find_file, read_jsonl
from mteb_steer.cli import main as cli
from mteb_steer.results import read_fits
from mteb_steer.steering.banks import bank_fingerprint, bank_stats, load_bank, load_bank_metadata, save_bank
from mteb_steer.tasks import resolve_task


def _words(texts: list[str]) -> dict[str, float]:
    """Query length in words: do generated queries look like the task's own (texts only, never labels)?"""
    counts = [len(t.split()) for t in texts]
    return {"median": statistics.median(counts), "mean": round(statistics.fmean(counts), 1)}


def _outcome(folder: Path, task: str) -> tuple[float, dict]:
    """nDCG@10 of the one result file a run wrote under `folder` (mean over the task's eval splits), and
    what its steps chose (`steer_fit.json` beside it: fusion strength, self-tuned BM25 and weight)."""
    (path,) = folder.rglob(f"{task}.json")
    scores = json.loads(path.read_text())["scores"]
    values = [s["ndcg_at_10"] for split in scores.values() for s in split]
    return round(sum(values) / len(values), 4), read_fits(path.parent).get(task, {})


def _evaluate(task: str, data_root: str, work: Path, name: str, *options: str) -> tuple[float, str, dict]:
    out = work / name
    argv = ["evaluate", "-t", task, "--data-root", data_root, "--output-folder", str(out), *options]
    if cli(argv) != 0:
        raise SystemExit(f"mteb-steer {' '.join(argv)} failed")
    score, fit = _outcome(out, task)
    return score, "mteb-steer " + " ".join(argv), fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-t", "--task", required=True)
    parser.add_argument("--bank", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--data-root", default=os.environ.get("MTEB_STEER_DATA_ROOT", "../shared/datasets"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    paths = dict(item.split("=", 1) for item in args.bank)
    banks = {name: load_bank(path) for name, path in paths.items()}
    common = set.intersection(*({d for d, q in bank.items() if q} for bank in banks.values()))
    if not common:
        raise SystemExit("the banks cover no passage in common")
    folder = resolve_task(args.task, args.data_root).data_folder
    real = [str(r.get("text") or "") for r in read_jsonl(find_file(folder, "queries"))]
    record: dict = {"task": args.task, "passages_in_common": len(common),
                    "task_queries_words": _words(real), "banks": {}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = record["runs"]
        runs["plain"] = _evaluate(args.task, args.data_root, work, "plain")
        runs["hybrid (no bank)"] = _evaluate(args.task, args.data_root, work, "hybrid", "--lexical", "bm25")
        for name, bank in banks.items():
            cut = {doc_id: bank[doc_id] for doc_id in sorted(common)}
            path = save_bank(cut, work / f"{name}.jsonl.gz")
            record["banks"][name] = {"source": paths[name], "generator": load_bank_metadata(paths[name]).get("generator"),
                                     "coverage_of_source": f"{len(common)} of {len(bank)} passages with queries",
                                     "fingerprint_of_cut": bank_fingerprint(cut), **bank_stats(cut),
                                     "words_per_query": _words([q for qs in cut.values() for q in qs])}
            runs[f"{name}: dense fusion (mean, alpha auto)"] = _evaluate(
                args.task, args.data_root, work, f"{name}-fusion", "--query-bank", str(path), "--fusion", "mean")
            runs[f"{name}: BM25 expansion hybrid"] = _evaluate(
                args.task, args.data_root, work, f"{name}-lexical", "--query-bank", str(path), "--lexical", "bm25")
            runs[f"{name}: BM25 expansion hybrid, self-tuned"] = _evaluate(
                args.task, args.data_root, work, f"{name}-selftune", "--query-bank", str(path), "--lexical", "bm25",
                "--self-tune")
            adapter = work / f"{name}-adapter"
            train = ["train-adapter", "--data", args.task, "--data-root", args.data_root, "--query-bank", str(path),
                     "--out", str(adapter)]
            if cli(train) != 0:
                raise SystemExit(f"mteb-steer {' '.join(train)} failed")
            trained = json.loads(next(adapter.rglob("training.json")).read_text())
            record["banks"][name]["adapter"] = {k: trained.get(k) for k in ("pairs", "best_epoch", "seconds")}
            score, command, fit = _evaluate(args.task, args.data_root, work, f"{name}-adapted", "--adapter",
                                            str(adapter))
            runs[f"{name}: query adapter on its pairs"] = (score, "mteb-steer " + " ".join(train) + " && " + command,
                                                          fit)
            print(json.dumps({k: v[0] for k, v in runs.items()}), flush=True)
    record["runs"] = {name: {"ndcg_at_10": score, "command": command, **({"fit": fit} if fit else {})}
                      for name, (score, command, fit) in runs.items()}
    record["passage_ids"] = sorted(common)  # with the complete banks, these ids rebuild every cut exactly
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
