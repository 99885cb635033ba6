"""`mteb-steer mteb ...`: mteb's own command line, with this package's models and local tasks.

Every argument after `mteb` goes to mteb's parser (`mteb.cli.build_cli`), so each mteb flag
(`-b`, `--overwrite-strategy`, `--eval-splits`, ...) works as mteb documents it. Before handing
over, this registers the steered models (`import mteb_steer`: the presets and `$MTEB_STEER_RESULTS`;
`--results FOLDER` adds one) and, for the duration of the command, answers task names the way
`mteb-steer evaluate` does (`tasks.resolve_task`) where that is local:

- a BEIR folder path, or a task mteb does not know (TRECDLPool): always local;
- an MTEB task with a local copy under `--data-root` / `$MTEB_STEER_DATA_ROOT`: local when
  offline (`HF_HUB_OFFLINE`) or when `--data-root` is given; otherwise mteb's own loader.

The one patch point is `mteb.get_tasks` as mteb's CLI calls it; it is restored afterwards.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

OWN_OPTIONS = ("--data-root", "--results")
_TRUE = {"1", "true", "yes", "on"}


def split_own_options(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Take `--data-root X` / `--results X` (or `=X`) out of `argv`, anywhere; the rest is mteb's."""
    own: dict[str, str] = {}
    rest: list[str] = []
    items = iter(argv)
    for arg in items:
        name, eq, value = arg.partition("=")
        if name in OWN_OPTIONS:
            if not eq:
                value = next(items, None)
                if value is None:
                    raise ValueError(f"{name} needs a folder")
            own[name] = value
        else:
            rest.append(arg)
    return own, rest


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


@contextlib.contextmanager
def local_tasks(data_root: str | None, *, prefer_local: bool) -> Iterator[None]:
    """Within the block, `mteb.get_tasks(tasks=[...])` resolves names as `mteb-steer evaluate` does."""
    import mteb
    from mteb.get_tasks import MTEBTasks

    from mteb_steer.tasks import LOCAL_FOLDERS, resolve_task

    original = mteb.get_tasks

    def is_local(name: str) -> bool:
        if Path(name).expanduser().is_dir():
            return True
        try:
            mteb.get_task(name)
        except KeyError:  # not an mteb task: a local one (TRECDLPool), or resolve_task's suggestions
            return True
        return prefer_local and name in LOCAL_FOLDERS

    def get_tasks(tasks: Sequence[str] | None = None, *args: Any, eval_splits: Sequence[str] | None = None,
                  **kwargs: Any) -> MTEBTasks:
        if not tasks:
            return original(tasks, *args, eval_splits=eval_splits, **kwargs)
        found = []
        for name in tasks:
            if is_local(name):
                task = resolve_task(name, data_root)
                found.append(task.filter_eval_splits(list(eval_splits)) if eval_splits else task)
            else:
                found += list(original([name], *args, eval_splits=eval_splits, **kwargs))
        return MTEBTasks(found)

    mteb.get_tasks = get_tasks
    try:
        yield
    finally:
        mteb.get_tasks = original


def main(argv: Sequence[str]) -> int:
    """Register, then run mteb's CLI on `argv` (what follows `mteb-steer mteb`)."""
    import mteb_steer  # registers the presets and $MTEB_STEER_RESULTS
    from mteb.cli.build_cli import build_cli

    try:  # our own options fail with one line; everything after is mteb's, reported as mteb reports it
        own, rest = split_own_options(argv)
        if "--results" in own:
            report = mteb_steer.register_results(own["--results"])
            print(f"registered {len(report.registered)} steered configuration(s) from {own['--results']}",
                  file=sys.stderr)
    except (ValueError, OSError) as err:
        print(f"mteb-steer mteb: error: {err}", file=sys.stderr)
        return 2
    parser = build_cli()
    parser.prog = "mteb-steer mteb"
    args = parser.parse_args(rest)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    with local_tasks(own.get("--data-root"), prefer_local=_offline() or "--data-root" in own):
        args.func(args)
    return 0
