"""Raw evidence for task-styled generation (issue 14): generic vs styled queries for a few passages.

Why: a 270M base model copies the form of its few-shot examples, so whether a styled prompt
works is seen only in what the model writes. For each task this takes N passages spread evenly
over the corpus (never its queries or labels), asks the model once with the generic prompt and
once with the task's style (mteb metadata), and writes the raw answers, parsed queries and
timings to one JSON file. Without --llm-base-url the bundled Gemma-3-270m is started.

    python scripts/style_samples.py --data-root /work/shared/datasets -t SciFact -t ArguAna \
        --passages 10 --out results/banks/style_samples.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

from mteb_steer.beir import find_file, read_jsonl
from mteb_steer.encoder import passage_text
from mteb_steer.steering.generation import GenConfig, PassageFailure, QueryGenerator, prepare_passages
from mteb_steer.steering.llm_client import LLMClient
from mteb_steer.steering.llm_server import LocalServerConfig, local_llm_server
from mteb_steer.steering.query_style import resolve_query_style, style_form
from mteb_steer.tasks import resolve_task


def spread_passages(folder: Path, count: int) -> list[tuple[str, str]]:
    """`count` passages at evenly spaced positions of the corpus (id, title + text)."""
    rows = list(read_jsonl(find_file(folder, "corpus")))
    step = max(1, len(rows) // count)
    return [(str(r["_id"]), passage_text(r.get("title"), r.get("text"))) for r in rows[::step][:count]]


def sample_task(task_name: str, data_root: str, count: int, llm: LLMClient, base: GenConfig) -> dict[str, Any]:
    """Generic and styled answers for `count` passages of one task, with seconds per request."""
    task = resolve_task(task_name, data_root)
    style = resolve_query_style("task", task)
    configs = {"generic": base, "styled": replace(base, query_style=style)}
    prepared = prepare_passages(spread_passages(Path(task.data_folder), count), base.max_passage_tokens).items
    out: dict[str, Any] = {"query_style": style, "form": style_form(style), "seconds": {}, "passages": []}
    rows = {doc_id: {"id": doc_id, "passage": text[:300]} for doc_id, text in prepared}
    for name, config in configs.items():
        generator = QueryGenerator(config, llm)
        start = time.monotonic()
        for doc_id, text in prepared:
            try:
                entry = generator.generate_one(doc_id, text)
                rows[doc_id][name] = {"queries": entry.queries, "raw": entry.raw}
            except PassageFailure as err:
                rows[doc_id][name] = {"failed": str(err)}
        out["seconds"][name] = round(time.monotonic() - start, 1)
    out["passages"] = list(rows.values())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-t", "--task", action="append", required=True)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--passages", type=int, default=10)
    parser.add_argument("--llm-base-url", default=None, help="an OpenAI-compatible endpoint; default: bundled Gemma")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    server = LocalServerConfig()
    base = GenConfig(model=server.model_alias())  # a llama.cpp server started with that alias also answers to it
    with (nullcontext(args.llm_base_url) if args.llm_base_url else local_llm_server(server)) as url:
        llm = LLMClient(url, None, base.transport())
        llm.check()
        result = {"command": "python " + shlex.join(sys.argv), "model": base.model,
                  "tasks": {t: sample_task(t, args.data_root, args.passages, llm, base) for t in args.task}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    for name, task in result["tasks"].items():
        print(name, task["form"], task["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
