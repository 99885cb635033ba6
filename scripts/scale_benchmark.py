"""Scale benchmark (issue 12): block-wise search on synthetic corpora of 100k, 1M and 8.8M passages.

Dense side: random unit vectors (dim 384, all-MiniLM-L6-v2's) standing in for encoded passages,
written in chunks to a float16 memory-mapped .npy file, and 1,000 random unit query vectors.
Lexical side: passages of 30-70 words drawn from the word frequencies of the real SciFact and
TREC-DL pool corpora, queries of 4-10 such words. Stages, each timed and with its own peak
resident memory (VmHWM reset before it; RssAnon sampled every 20 ms, which leaves out the
memory-mapped corpus pages):

- plain: `SteerSearch.rank` (top 1000, mteb's tie order) with the bundled model's cosine similarity;
- fused: `QueryFusion.fuse_rows` (mean, alpha 0.1) over one generated-query vector per passage
  (float16 memmap), written block by block to a float16 memmap, then the same search over it;
- hybrid: BM25 index build (`LexicalHybrid.fit`) and search with the default z-score 0.2 fusion
  (corpora above 200,000 passages use the lexical module's union regime);
- selftune: `SelfTunedHybrid.fit` with no bank (`--self-tune`): 500 sentences cut from the passages
  (texts are then written as sentences of 12 words), the (k1, b) grid, the cut passages re-embedded
  by the bundled model, the weight grid, then the real index. The dense scores are meaningless here
  (random corpus vectors); only time and memory are measured.

Each size runs in a fresh subprocess (so ru_maxrss is that size's own peak); the synthetic files
are deleted afterwards. Raw output: results/benchmark/scale.json; plot: results/plots/scale.png.

    python benchmark.py --scale                       # all sizes (8.8M takes long on 2 cores)
    python scripts/scale_benchmark.py --sizes 100000 1000000
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DIM = 384
TOP_K = 1000
DEFAULT_SIZES = (100_000, 1_000_000, 8_800_000)
ALL_STAGES = ("plain", "fused", "hybrid", "selftune")
SENTENCE_WORDS = 12  # words per synthetic sentence (the selftune stage cuts sentences from passages)
WRITE_CHUNK = 100_000


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


class Stage:
    """Times a stage (wall and process CPU seconds: CPU time is what a shared machine's load distorts least) and
    records its peak resident memory (VmHWM, reset first), peak RssAnon and the load at its end."""

    def __init__(self, record: dict, name: str) -> None:
        self.record, self.name, self.anon_peak = record, name, 0
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            self.anon_peak = max(self.anon_peak, _status_kib("RssAnon"))

    def __enter__(self) -> Stage:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        self.anon_peak = _status_kib("RssAnon")
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        self.started, self.cpu_started = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        seconds, cpu = time.perf_counter() - self.started, time.process_time() - self.cpu_started
        self._stop.set()
        self._thread.join()
        self.anon_peak = max(self.anon_peak, _status_kib("RssAnon"))
        self.record[self.name] = {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "peak_rss_mib": round(_status_kib("VmHWM") / 1024, 1),
                                  "peak_anon_mib": round(self.anon_peak / 1024, 1),
                                  "load_avg_1min": round(os.getloadavg()[0], 2)}
        print(f"  {self.name}: {self.record[self.name]}", flush=True)


def vocabulary(data_root: Path) -> tuple[list[str], np.ndarray]:
    """Words and their frequencies in the real SciFact and TREC-DL pool corpora."""
    counts: Counter = Counter()
    for name in ("scifact", "msmarco-trec-dl-pool"):
        with gzip.open(data_root / name / "corpus.jsonl.gz", "rt") as fh:
            for line in fh:
                row = json.loads(line)
                counts.update(re.findall(r"[a-z]{2,}", f"{row.get('title', '')} {row['text']}".lower()))
    words, freq = zip(*counts.most_common(), strict=True)
    return list(words), np.asarray(freq, dtype=np.float64) / sum(freq)


def random_texts(n: int, words: list[str], p: np.ndarray, lo: int, hi: int, rng: np.random.Generator,
                 sentences: bool = False) -> list[str]:
    """n texts of lo..hi words drawn with the real word frequencies; with `sentences`, the same words
    written as capitalised sentences of SENTENCE_WORDS words (the tokeniser sees the same terms)."""
    lengths = rng.integers(lo, hi + 1, n)
    ids = rng.choice(len(words), size=int(lengths.sum()), p=p)
    vocab = np.asarray(words, dtype=object)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    if not sentences:
        return [" ".join(vocab[ids[a:b]]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return [" ".join(" ".join(vocab[ids[i:min(i + SENTENCE_WORDS, b)]]).capitalize() + "."
                     for i in range(a, b, SENTENCE_WORDS)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def unit_memmap(path: Path, n: int, rng: np.random.Generator) -> np.memmap:
    """n random unit vectors, float16, written in chunks to a .npy memmap."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, DIM))
    for start in range(0, n, WRITE_CHUNK):
        block = rng.standard_normal((min(WRITE_CHUNK, n - start), DIM), dtype=np.float32)
        out[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def run_size(n_docs: int, n_queries: int, stages: list[str], workdir: Path, data_root: Path) -> dict:
    """One corpus size, all stages, in this (fresh) process."""
    import torch

    from mteb_steer.encoder import SteerEncoder
    from mteb_steer.search import SteerSearch
    from mteb_steer.steering.fusion import FUSE_BLOCK, CorpusQueries, QueryFusion
    from mteb_steer.steering.lexical import LexicalHybrid
    from mteb_steer.steering.self_tune import SelfTunedHybrid
    from mteb_steer.steps import CorpusIndex, QueryBatch

    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n_docs)
    record: dict = {"n_docs": n_docs, "n_queries": n_queries, "top_k": TOP_K, "dim": DIM,
                    "torch_threads": torch.get_num_threads(), "corpus_matrix_mib": round(n_docs * DIM * 2 / 2**20, 1)}
    encoder = SteerEncoder(device="cpu", cache_dir=None)
    queries_vec = rng.standard_normal((n_queries, DIM), dtype=np.float32)
    queries_vec /= np.linalg.norm(queries_vec, axis=1, keepdims=True)
    record["baseline_anon_mib"] = round(_status_kib("RssAnon") / 1024, 1)  # interpreter, torch, model
    with Stage(record, "write_vectors"):
        corpus = unit_memmap(workdir / "corpus.npy", n_docs, rng)
    texts: list[str] = []
    if {"hybrid", "selftune"} & set(stages):
        words, p = vocabulary(data_root)
        with Stage(record, "make_texts"):
            texts = random_texts(n_docs, words, p, 30, 70, rng, sentences="selftune" in stages)
        qtexts = random_texts(n_queries, words, p, 4, 10, rng)
    else:
        qtexts = [""] * n_queries
    ids = [str(i) for i in range(n_docs)]
    queries = QueryBatch([f"q{i}" for i in range(n_queries)], qtexts, queries_vec)
    index = CorpusIndex(ids, texts or [""] * n_docs, corpus, task_name=f"synthetic-{n_docs}")
    if "plain" in stages:
        with Stage(record, "plain_search"):
            SteerSearch(encoder).rank(queries, index, TOP_K)
    if "fused" in stages:
        generated = unit_memmap(workdir / "generated.npy", n_docs, rng)
        bank_queries = CorpusQueries([""] * n_docs, np.arange(n_docs), generated)
        fusion = QueryFusion({"0": ["q"]}, "mean", alpha=0.1)
        with Stage(record, "fuse_corpus"):
            fused = np.lib.format.open_memmap(workdir / "fused.npy", mode="w+", dtype=np.float16, shape=(n_docs, DIM))
            for start in range(0, n_docs, FUSE_BLOCK):
                rows = slice(start, min(start + FUSE_BLOCK, n_docs))
                fused[rows] = fusion.fuse_rows(corpus, bank_queries, 0.1, rows)
            fused.flush()
            del fused
        fused_index = CorpusIndex(ids, index.texts, np.load(workdir / "fused.npy", mmap_mode="r"))
        with Stage(record, "fused_search"):
            SteerSearch(encoder).rank(queries, fused_index, TOP_K)
        del generated, bank_queries, fused_index
    if "hybrid" in stages:
        hybrid = LexicalHybrid()
        record["hybrid_regime"] = "union" if n_docs > hybrid.full_max_docs else "full"
        with Stage(record, "lexical_index"):
            hybrid.fit(index)
        with Stage(record, "hybrid_search"):
            SteerSearch(encoder, score_fusion=hybrid).rank(queries, index, TOP_K)
        del hybrid
    if "selftune" in stages:
        tuned = SelfTunedHybrid(encoder)
        with Stage(record, "self_tune_fit"):
            tuned.fit(index)
        report = tuned.fit_report(index.task_name)
        record["self_tune_chose"] = {"bm25": report["bm25"], "lexical_weight": report["chosen"],
                                     "pseudo_queries": report["choices"][0]["pseudo_queries"]}
    record["process_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return record


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage in ("plain_search", "fuse_corpus", "fused_search", "lexical_index", "hybrid_search", "self_tune_fit"):
        pts = [(r["n_docs"], r[stage]) for r in records if stage in r]
        if not pts:
            continue
        xs = [x for x, _ in pts]
        line, = ax_t.plot(xs, [s["seconds"] for _, s in pts], "o-", label=f"{stage} (wall)")
        cpu = [(x, s["cpu_seconds"]) for x, s in pts if "cpu_seconds" in s]
        if cpu:
            ax_t.plot(*zip(*cpu), "x--", color=line.get_color(), label=f"{stage} (CPU)")
        ax_m.plot(xs, [s["peak_anon_mib"] / 1024 for _, s in pts], "o-", label=stage)
    for ax, label in ((ax_t, "seconds (wall: solid; process CPU: dashed)"), (ax_m, "peak anonymous resident memory, GiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("passages (1,000 queries, top 1000)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=6, ncol=2)
    fig.suptitle("Block-wise search on synthetic corpora (CPU, 2 shared cores; GPU not measured)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _merged(old: dict | None, new: dict, stages: list[str]) -> dict:
    """A run of some stages keeps the other stages' filed numbers for that size; `runs` lists each run
    still behind a number, with the stages it measured and its own baseline.

    Why: the 8.8M stages need the whole machine, so they are measured in separate runs.
    """
    if old is None or "failed" in old or set(stages) >= set(ALL_STAGES):
        return new
    keys = ("command", "finished", "baseline_anon_mib")  # a stage's memory beyond start uses its run's baseline
    runs = old.get("runs") or [{"stages": [s for s in ALL_STAGES if s not in old.get("skipped", [])],
                                **{key: old[key] for key in keys if key in old}}]
    runs = [{**run, "stages": [s for s in run["stages"] if s not in stages]} for run in runs]
    runs = [run for run in runs if run["stages"]] + [{"stages": stages, **{key: new[key] for key in keys}}]
    merged = {**old, **new, "runs": runs,
              "skipped": sorted(set(old.get("skipped", [])) & set(new["skipped"])),
              "process_peak_rss_mib": max(old.get("process_peak_rss_mib", 0), new["process_peak_rss_mib"])}
    for key in ("command", "finished"):
        merged.pop(key)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--stages", nargs="+", default=list(ALL_STAGES), choices=ALL_STAGES)
    parser.add_argument("--no-hybrid-above", type=int, default=None, metavar="N",
                        help="skip the hybrid stage for corpora larger than N passages")
    parser.add_argument("--workdir", default="/tmp/mteb_steer_scale", help="where the synthetic files go (deleted)")
    parser.add_argument("--data-root", default=os.environ.get("MTEB_STEER_DATA_ROOT", str(REPO.parent / "shared" / "datasets")))
    parser.add_argument("--out", default=str(REPO / "results" / "benchmark" / "scale.json"))
    parser.add_argument("--plot", default=str(REPO / "results" / "plots" / "scale.png"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        record = run_size(args.sizes[0], args.queries, args.stages, Path(args.workdir), Path(args.data_root))
        print("RESULT " + json.dumps(record), flush=True)
        return 0
    out = Path(args.out)
    records = {r["n_docs"]: r for r in (json.loads(out.read_text())["sizes"] if out.exists() else [])}
    for n_docs in args.sizes:
        stages = [s for s in args.stages
                  if not (s == "hybrid" and args.no_hybrid_above is not None and n_docs > args.no_hybrid_above)]
        workdir = Path(args.workdir) / str(n_docs)
        print(f"{n_docs} passages: {stages}", flush=True)
        cmd = [sys.executable, __file__, "--child", "--sizes", str(n_docs), "--queries", str(args.queries),
               "--workdir", str(workdir), "--data-root", args.data_root, "--stages", *stages]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        print(proc.stdout[-3000:], proc.stderr[-3000:] if proc.returncode else "", flush=True)
        result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not result:
            records[n_docs] = {"n_docs": n_docs, "failed": f"exit {proc.returncode}: {proc.stderr[-500:]}"}
        else:
            record = {**json.loads(result[-1][len("RESULT "):]), "skipped": sorted(set(args.stages) - set(stages)),
                      "command": "python scripts/scale_benchmark.py " + " ".join(argv or sys.argv[1:]),
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            records[n_docs] = _merged(records.get(n_docs), record, stages)
        ordered = [records[k] for k in sorted(records)]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": f"{os.cpu_count()} CPU cores, no GPU", "sizes": ordered}, indent=1) + "\n")
        plot([r for r in ordered if "failed" not in r], Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
