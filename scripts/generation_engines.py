"""Time the embedded generator's two engines on the same passages: llama.cpp server vs in-process batched.

Why: generation is the slow step of corpus steering on a CPU (a full bank takes hours), and the
in-process engine (`llama_batched`) exists to make it faster; this measures by how much, per query
form, with the bundled Gemma-3-270m, the task's styled prompt and one thread each, through the
public `generate` (fresh caches, so every passage is a request).

    python scripts/generation_engines.py --tasks SciFact ArguAna --passages 48 \\
        --out results/benchmark/generation_engines.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from mteb_steer.beir import find_file, read_jsonl
from mteb_steer.encoder import passage_text
from mteb_steer.steering.generation import GenConfig, generate
from mteb_steer.steering.llm_server import LocalServerConfig, local_llm_server
from mteb_steer.steering.query_style import resolve_query_style
from mteb_steer.tasks import resolve_task


def _passages(task_name: str, data_root: str, start: int, count: int) -> list[tuple[str, str]]:
    folder = resolve_task(task_name, data_root).data_folder
    rows = list(read_jsonl(find_file(folder, "corpus")))[start:start + count]
    return [(str(r["_id"]), passage_text(r.get("title"), r.get("text"))) for r in rows]


def _timed(passages: list[tuple[str, str]], config: GenConfig, server: LocalServerConfig,
           base_url: str | None) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        report = generate(passages, config, cache, base_url=base_url, server=server, show_progress=False)
        seconds = time.perf_counter() - start
    summary = report.summary()
    return {"seconds": round(seconds, 1), "passages_per_minute": round(60 * len(passages) / seconds, 2),
            **{k: summary[k] for k in ("passages_with_queries", "failed", "requests", "prompt_tokens",
                                       "completion_tokens")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["SciFact", "ArguAna"])
    parser.add_argument("--data-root", default=os.environ.get("MTEB_STEER_DATA_ROOT", "../shared/datasets"))
    parser.add_argument("--passages", type=int, default=48)
    parser.add_argument("--start", type=int, default=1000, help="first corpus row used")
    parser.add_argument("--slots", type=int, default=LocalServerConfig.slots)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    server = LocalServerConfig(n_threads=1, slots=args.slots)
    runs = []
    for task_name in args.tasks:
        task = resolve_task(task_name, args.data_root)
        config = GenConfig(query_style=resolve_query_style("task", task))
        passages = _passages(task_name, args.data_root, args.start, args.passages)
        batched = _timed(passages, config, server, None)
        with local_llm_server(server) as url:
            served = _timed(passages, GenConfig(model=server.model_alias(), query_style=config.query_style,
                                                concurrency=1), server, url)
        runs.append({"task": task_name, "query_style": config.query_style, "passages": len(passages),
                     "llama_cpp_server": served, "in_process_batched": batched,
                     "speedup": round(served["seconds"] / batched["seconds"], 2)})
        print(json.dumps(runs[-1]), flush=True)
    out = {"command": "python scripts/generation_engines.py " + " ".join(
               f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}"
               for k, v in vars(args).items() if k != "data_root"),
           "model": server.model_alias(), "threads_per_engine": 1, "slots": args.slots,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
