"""`mteb-steer` command line: parse, validate everything cheap first, then delegate.

evaluate   run MTEB retrieval tasks with a (steered) model and write leaderboard-layout results
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", default=None,
                        help="SentenceTransformer: registry/hub name or local folder "
                             "(default: bundled sentence-transformers/all-MiniLM-L6-v2)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--embedding-cache", default=os.environ.get("MTEB_STEER_EMBEDDING_CACHE"),
                        help="folder to reuse base embeddings across configurations")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mteb-steer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="evaluate a (steered) model on MTEB retrieval tasks")
    _add_model_arguments(ev)
    ev.add_argument("-t", "--tasks", nargs="+", default=["SciFact"],
                    help="MTEB task names (SciFact, ArguAna, TRECDLPool, ...) or BEIR folder paths")
    ev.add_argument("--data-root", default=None,
                    help="folder holding local BEIR copies (scifact/, arguana/, ...); "
                         "default $MTEB_STEER_DATA_ROOT or ../shared/datasets")
    ev.add_argument("--output-folder", default=None,
                    help="results go to <output-folder>/results/<org__model>/<revision>/ (default: current dir)")
    ev.add_argument("--overwrite", action="store_true", help="re-run tasks whose results already exist")
    return parser


def _evaluate(args: argparse.Namespace) -> int:
    from mteb_steer.backbone import check_device
    from mteb_steer.pipeline import SteerConfig, build_model, default_output_folder
    from mteb_steer.results import evaluate_tasks, format_table, result_dir
    from mteb_steer.tasks import resolve_task

    check_device(args.device)
    tasks = [resolve_task(name, args.data_root) for name in args.tasks]
    for task in tasks:  # bad data fails here, before any model loads
        task.load_data()
    config = SteerConfig(model=args.model, device=args.device, batch_size=args.batch_size,
                         embedding_cache=args.embedding_cache)
    model = build_model(config)
    output = args.output_folder or default_output_folder()
    print(f"model: {model.mteb_model_meta.name} @ {model.mteb_model_meta.revision}", file=sys.stderr)
    scores = evaluate_tasks(model, tasks, output, overwrite=args.overwrite, batch_size=args.batch_size)
    print(format_table(scores))
    print(f"results: {result_dir(output, model)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"evaluate": _evaluate}[args.command](args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"mteb-steer: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
