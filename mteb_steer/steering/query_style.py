"""The query style a generation prompt asks for: what a task's real queries look like, without reading them.

Why: an LLM asked for "search queries" writes short questions, but SciFact's queries are
scientific claims and ArguAna's whole counter-arguments; Promptagator showed that a prompt
stating the task's own query style beats a generic one. The style comes from what a task
declares about itself (mteb's `metadata.prompt`, else its description), never from its queries
or labels; a BEIR folder has no such declaration, so the user states it (`--query-style`).

`None` means the generic, question-style prompt (prompt version v1, the banks made before styles).
"""

from __future__ import annotations

import re
from typing import Any, Literal

QueryForm = Literal["question", "claim", "argument"]

TASK_STYLE = "task"  # CLI value: take the style from the task's metadata
GENERIC_STYLE = "generic"  # CLI value: no style, the v1 question-style prompt
MAX_STYLE_CHARS = 300


def clean_style(style: str | None) -> str | None:
    """One line, stripped; None or "" (or "generic") mean no style. Raises on an over-long style."""
    if style is None:
        return None
    text = " ".join(style.split())
    if not text or text.lower() == GENERIC_STYLE:
        return None
    if len(text) > MAX_STYLE_CHARS:
        raise ValueError(f"query style is {len(text)} characters; at most {MAX_STYLE_CHARS} "
                         f"(a one-sentence description of the queries): {text[:80]!r}...")
    return text


def task_query_style(task: Any) -> str | None:
    """The query style `task` declares: `metadata.prompt` (its query entry when a dict), else None.

    The description is not used: it describes the data set ("SciFact verifies scientific claims..."),
    not how a query reads, and a local BEIR folder's description is ours, not the task's.
    """
    metadata = getattr(task, "metadata", None)
    prompt = getattr(metadata, "prompt", None)
    if isinstance(prompt, dict):
        prompt = prompt.get("query")
    return clean_style(prompt) if isinstance(prompt, str) else None


def resolve_query_style(option: str | None, task: Any | None) -> str | None:
    """The style for a run: `option` "task" (the default) reads the task's metadata, "generic" or None
    gives no style, anything else is the user's own style string."""
    if option is None or option == TASK_STYLE:
        return task_query_style(task) if task is not None else None
    return clean_style(option)


_OPPOSE = re.compile(r"\b(refut\w*|counter\w*|rebut\w*|oppos\w*|against|debat\w*|argument\w*)\b", re.I)
_VERIFY = re.compile(r"\b(support\w*|verif\w*|fact\w*|evidence)\b", re.I)
_CLAIM = re.compile(r"\b(claim\w*|statement\w*|assertion\w*|hypothes\w*|fact\w*|opinion\w*|stance\w*)\b", re.I)


def style_form(style: str | None) -> QueryForm:
    """Which form of example queries a completion prompt shows for `style`, by a fixed word rule.

    Why: a small base model copies the form of its few-shot examples and ignores a stated style, so
    the examples must already have the style's form. The rule reads the style string only (first
    match wins): a style that asks for documents opposing the query (refute, counter, rebut, oppose,
    against, debate, argument) with no word of verification (support, verify, fact, evidence) wants
    "argument" queries (a stance with its reason); a style naming a claim, statement, assertion,
    hypothesis, fact, opinion or stance wants "claim" queries (declarative statements); anything
    else, and no style, wants "question" queries (the generic prompt's form).
    """
    if style is None:
        return "question"
    if _OPPOSE.search(style) and not _VERIFY.search(style):
        return "argument"
    return "claim" if _CLAIM.search(style) else "question"

