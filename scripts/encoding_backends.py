"""Encoding throughput and nDCG@10 of each CPU backend against torch float32 (issue 12).

Throughput: the first `--passages` passages of SciFact's corpus (corpus order), encoded by every
backend in turn, `--rounds` times, the order rotated each round, so all backends see the same
machine load; the ratio to torch float32 is taken within each round and its median reported
(on a shared machine absolute passages/s drift, ratios much less). Quality: a full `mteb.evaluate`
of each backend on each task (its own identity, results in the leaderboard layout under
`<output-folder>/results/`; torch float32 reads back the plain model's existing files).

    HF_HUB_OFFLINE=1 nice -n 10 python scripts/encoding_backends.py --tasks SciFact ArguAna
    python benchmark.py --encoding-backends          # the same, from the benchmark entry point

Quality runs in the order of `--variants` and is saved after each evaluation, so a run stopped
early keeps what it measured. Raw output: scripts/encoding_backends.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mteb_steer.embedding_cache import default_embedding_cache  # noqa: E402
from mteb_steer.encoding import Encoding  # noqa: E402

VARIANTS = {
    "torch-float32": Encoding(),
    "onnx-float32": Encoding("onnx"),
    "onnx-int8": Encoding("onnx", "int8"),
    "openvino-float32": Encoding("openvino"),
    "openvino-int8": Encoding("openvino", "int8"),
    "torch-bfloat16": Encoding(dtype="bfloat16"),  # CPU bfloat16: fast only where the CPU has bf16 units
}
REFERENCE = "torch-float32"
QUALITY_MARGIN = 0.002  # a backend may become the default only within this nDCG@10 of torch float32 on every task


def load_encoders(names: list[str], cache_dir: str, batch_size: int) -> dict:
    from mteb_steer.backbone import resolve_backbone
    from mteb_steer.encoder import SteerEncoder

    backbone = resolve_backbone(None)
    return {name: SteerEncoder(backbone=backbone, device="cpu", cache_dir=cache_dir, batch_size=batch_size,
                               backend=VARIANTS[name].backend, dtype=VARIANTS[name].dtype) for name in names}


def throughput(models: dict, texts: list[str], rounds: int, batch_size: int) -> dict:
    """Interleaved rounds: passages/s per model per round, ratio to the reference within each round."""
    from tqdm.auto import tqdm

    names = list(models)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    vectors: dict[str, np.ndarray] = {}
    for n in names:  # warm-up: first-call allocations and lazy initialisation are not throughput
        models[n].encode_document(texts[:batch_size], batch_size=batch_size)
    bar = tqdm(total=rounds * len(names), desc="throughput", unit="run")
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            started = time.perf_counter()
            out = models[n].encode_document(texts, batch_size=batch_size, convert_to_numpy=True)
            seconds[n].append(time.perf_counter() - started)
            vectors[n] = np.asarray(out, dtype=np.float32)
            bar.update()
    bar.close()
    ref = vectors[REFERENCE]
    out = {}
    for n in names:
        cos = np.sum(vectors[n] * ref, axis=1) / np.linalg.norm(vectors[n], axis=1) / np.linalg.norm(ref, axis=1)
        ratios = [seconds[REFERENCE][r] / seconds[n][r] for r in range(rounds)]
        out[n] = {"seconds": seconds[n], "passages_per_s": [len(texts) / s for s in seconds[n]],
                  "median_passages_per_s": len(texts) / statistics.median(seconds[n]),
                  "speedup_vs_torch_float32_per_round": ratios, "median_speedup": statistics.median(ratios),
                  "cosine_to_torch_float32_min": float(cos.min()), "cosine_to_torch_float32_mean": float(cos.mean())}
    return out


def quality(encoders: dict, task_names: list[str], data_root: str | None, output_folder: Path,
            batch_size: int, out: dict, record) -> dict:
    """nDCG@10 per backend and task through the package's results writer (each backend its own identity),
    filled into `out` (task -> backend -> numbers) and `record()`ed after each evaluation."""
    from mteb_steer.results import evaluate_tasks, result_dir
    from mteb_steer.search import SteerSearch
    from mteb_steer.tasks import resolve_task

    for task_name in task_names:
        task = resolve_task(task_name, data_root)
        for name, encoder in encoders.items():
            model = SteerSearch(encoder)
            started = time.perf_counter()
            scores = evaluate_tasks(model, [task], output_folder, batch_size=batch_size)
            out.setdefault(task_name, {})[name] = {
                "ndcg_at_10": scores[0].ndcg_at_10, "split": scores[0].split,
                "read_back": scores[0].reused, "seconds": time.perf_counter() - started,
                "encode_corpus_s": model.timings.get("encode_corpus_s"),
                "model": model.mteb_model_meta.name, "revision": model.mteb_model_meta.revision,
                "result": str(result_dir(output_folder, model).relative_to(output_folder) / f"{task_name}.json")}
            print(f"{task_name} {name}: nDCG@10 {scores[0].ndcg_at_10:.4f}"
                  f"{' (read back)' if scores[0].reused else ''}", flush=True)
            record()
    return out


def verdict(quality_by_task: dict, task_names: list[str]) -> dict:
    """Which backends stay within QUALITY_MARGIN of torch float32 on every measured task."""
    out = {}
    for name in quality_by_task.get(task_names[0], {}):
        deltas = {t: quality_by_task[t][name]["ndcg_at_10"] - quality_by_task[t][REFERENCE]["ndcg_at_10"]
                  for t in task_names if name in quality_by_task.get(t, {})}
        out[name] = {"delta_ndcg_at_10": deltas,
                     "within_margin_on_all": bool(deltas) and all(abs(d) <= QUALITY_MARGIN for d in deltas.values())}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["SciFact", "ArguAna"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--passages", type=int, default=512, help="SciFact passages per throughput run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-quality", action="store_true", help="throughput only")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--embedding-cache", default=default_embedding_cache())
    parser.add_argument("--output-folder", default=str(REPO), help="results go to <this>/results/")
    parser.add_argument("--raw", default=str(REPO / "scripts" / "encoding_backends.json"))
    args = parser.parse_args(argv)
    if REFERENCE not in args.variants:
        parser.error(f"--variants must include {REFERENCE} (the reference)")

    import torch

    from mteb_steer.encoder import dataset_passage_texts
    from mteb_steer.tasks import resolve_task

    raw: dict = {"command": "python scripts/encoding_backends.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu_count": os.cpu_count(),
                 "torch_threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg(),
                 "batch_size": args.batch_size, "variants": {n: VARIANTS[n].describe() for n in args.variants}}

    def record() -> None:
        Path(args.raw).write_text(json.dumps(raw, indent=2) + "\n")

    encoders = load_encoders(args.variants, args.embedding_cache, args.batch_size)
    scifact = resolve_task("SciFact", args.data_root)
    scifact.load_data()
    corpus = scifact.dataset["default"][scifact.metadata.eval_splits[0]]["corpus"]
    texts = dataset_passage_texts(corpus)[: args.passages]
    models = {n: e.model for n, e in encoders.items()}
    raw["throughput"] = {"task": "SciFact", "passages": len(texts), "rounds": args.rounds,
                         "results": throughput(models, texts, args.rounds, args.batch_size)}
    raw["load_average_after_throughput"] = os.getloadavg()
    record()
    if not args.no_quality:
        raw["quality"] = {}
        quality(encoders, args.tasks, args.data_root, Path(args.output_folder), args.batch_size, raw["quality"],
                record)
        raw["verdict"] = verdict(raw["quality"], args.tasks)
    raw["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    raw["load_average_at_end"] = os.getloadavg()
    record()
    print(json.dumps({"throughput": {n: round(r["median_speedup"], 2) for n, r in raw["throughput"]["results"].items()},
                      "verdict": raw.get("verdict")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
