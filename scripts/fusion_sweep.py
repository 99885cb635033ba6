"""Sweep query-fusion settings on one retrieval task and print a markdown table (nDCG@10, recall@100).

Each setting is a full `mteb.evaluate` of the model `build_model(SteerConfig(...))` builds (the
multi-vector max score fusion, an exploration outside SteerConfig, is built directly) with the
shared base-embedding cache, so the corpus,
the task queries and the generated queries are embedded once for the whole sweep.

    HF_HUB_OFFLINE=1 python scripts/fusion_sweep.py --task ArguAna \\
        --bank /work/shared/datasets/arguana-genq --data-root /work/shared/datasets [--output-folder .]

A setting is `method:key=value,...`, e.g. `mean:alpha=0.1`, `rotate:gamma=auto`,
`mean:alpha=auto,weighting=similarity,drop_fraction=0.2`, `maxsim:margin=0.05`, or `none`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mteb

from mteb_steer.embedding_cache import default_embedding_cache
from mteb_steer.encoder import SteerEncoder
from mteb_steer.pipeline import BANK_FUSION_OPTIONS, SteerConfig, build_model
from mteb_steer.results import evaluate_tasks, read_fits
from mteb_steer.search import SteerSearch
from mteb_steer.steering.banks import load_bank
from mteb_steer.steering.fusion import AutoSelection, MultiVectorMax, QueryFusion
from mteb_steer.tasks import resolve_task

logger = logging.getLogger("fusion_sweep")
DEFAULT_SETTINGS = [
    "none",
    "mean:alpha=0.05", "mean:alpha=0.1", "mean:alpha=0.2", "mean:alpha=0.5", "mean:alpha=auto",
    "mean:alpha=auto,rule=best",
    "sum:beta=0.025", "sum:beta=0.05", "sum:beta=0.1", "sum:beta=0.15", "sum:beta=auto", "sum:beta=auto,rule=best",
    "rotate:gamma=0.01", "rotate:gamma=0.02", "rotate:gamma=0.04", "rotate:gamma=0.08", "rotate:gamma=auto",
    "rotate:gamma=auto,rule=best",
]
EXPLORE_SETTINGS = [
    "mean:alpha=0.1,weighting=similarity", "mean:alpha=0.2,weighting=similarity", "sum:beta=0.05,weighting=similarity",
    "rotate:gamma=0.01,weighting=similarity", "mean:alpha=0.1,drop_fraction=0.3", "mean:alpha=0.2,drop_fraction=0.3",
    "sum:beta=0.05,drop_fraction=0.3", "rotate:gamma=0.02,drop_fraction=0.3", "mean:alpha=auto,drop_fraction=0.3",
    "maxsim:margin=0", "maxsim:margin=0.05", "maxsim:margin=0.1", "maxsim:margin=0.2",
]
FLOAT_KEYS = {"alpha", "beta", "gamma", "temperature", "drop_fraction", "margin"}


def parse_setting(spec: str) -> tuple[str, dict[str, object]]:
    """`method:key=value,...` -> (method, kwargs); numbers become floats, `auto` stays a string."""
    method, _, rest = spec.partition(":")
    kwargs: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"bad setting {spec!r}: expected key=value, got {item!r}")
        kwargs[key] = float(value) if key in FLOAT_KEYS and value != "auto" else value
    return method, kwargs


def config_for(spec: str, bank: str) -> SteerConfig | None:
    """The configuration a fusion setting names (None for `maxsim`, which SteerConfig does not hold)."""
    method, kwargs = parse_setting(spec)
    if method == "none":
        return SteerConfig()
    if method == "maxsim":
        return None
    fields = {name.removeprefix("fusion_") for name in BANK_FUSION_OPTIONS}
    options = {f"fusion_{key}" if key in fields else key: value for key, value in kwargs.items()}
    try:
        return SteerConfig.from_options(fusion=method, query_bank=bank, **options)
    except TypeError as err:
        raise SystemExit(f"bad setting {spec!r}: {err}") from None


def build(encoder: SteerEncoder, bank_path: str, spec: str) -> tuple[SteerSearch, QueryFusion | None]:
    config = config_for(spec, bank_path)
    if config is None:
        return SteerSearch(encoder, score_fusion=MultiVectorMax(load_bank(bank_path), encoder,
                                                                **parse_setting(spec)[1])), None
    model = build_model(config, encoder=encoder)
    return model, (model.corpus_steps[0] if model.corpus_steps else None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="ArguAna", help="MTEB task name or BEIR folder (default ArguAna)")
    parser.add_argument("--bank", required=True, help="query bank: JSONL(.gz) file or generated-queries folder")
    parser.add_argument("--data-root", default="/work/shared/datasets")
    parser.add_argument("--cache-dir", default=default_embedding_cache(), help="base-embedding cache")
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, help="fusion settings (see module doc)")
    parser.add_argument("--explore", action="store_true", help="run the exploration settings (weighting, "
                        "Doc2Query-- filter, multi-vector max) instead of the default sweep")
    parser.add_argument("--output", type=Path, help="also write the markdown table here")
    parser.add_argument("--output-folder", type=Path, help="also file every setting's result in the MTEB "
                        "leaderboard layout under DIR/results/ (with steer_config.json and, for auto, steer_fit.json)")
    parser.add_argument("--overwrite", action="store_true", help="with --output-folder: recompute settings "
                        "whose result file exists (default: read them back)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("mteb").setLevel(logging.WARNING)

    settings = EXPLORE_SETTINGS if args.explore else args.settings
    for spec in settings:  # fail on a typo before any model work
        config_for(spec, args.bank)
    task = resolve_task(args.task, args.data_root)
    encoder = SteerEncoder(cache_dir=args.cache_dir)
    lines = [f"Task {args.task}, bank {args.bank}, model {encoder.base_meta.name}", "",
             "| setting | chosen (auto) | nDCG@10 | recall@100 | seconds |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for spec in settings:
        model, fusion = build(encoder, args.bank, spec)
        if args.output_folder:
            score = evaluate_tasks(model, [task], args.output_folder, overwrite=args.overwrite,
                                   show_progress_bar=False)[0]
            ndcg, recall = score.ndcg_at_10, score.recall_at_100
            seconds = "read back" if score.reused else f"{score.seconds:.0f}"
            fits = read_fits(score.path.parent).get(task.metadata.name, {})
            selections = [AutoSelection(**fit) for fit in fits.values()]
        else:
            started = time.perf_counter()
            result = mteb.evaluate(model, task, cache=None, show_progress_bar=False)
            seconds = f"{time.perf_counter() - started:.0f}"
            entry = next(iter(result.task_results[0].scores.values()))[0]
            ndcg, recall = entry["ndcg_at_10"], entry["recall_at_100"]
            selections = list(fusion.selections.values()) if fusion else []
        chosen = ", ".join(f"{s.parameter}={s.chosen:g}" for s in selections)
        if selections:
            logger.info("%s auto grid: %s", spec, " | ".join(s.table() for s in selections))
        line = f"| `{spec}` | {chosen} | {ndcg:.4f} | {recall:.4f} | {seconds} |"
        lines.append(line)
        print(line, flush=True)
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
