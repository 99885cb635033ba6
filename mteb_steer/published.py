"""Published MTEB scores of comparator models, each with the results file it was read from.

The benchmark answers "is a base model + steering as good as a model fine-tuned for
retrieval?". Comparators are evaluated here when their weights load (`load_comparator`);
offline they cannot be, and only their published numbers are shown: in their own table,
marked "published", never mixed with measured rows.

Every number below was copied from the JSON file named in its `path` (repository `repo`,
commit `commit`); nothing is rounded or estimated. A comparator/task without a found file
is listed in `NOT_FOUND` with what was looked for, instead of a number.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mteb_steer.encoder import SteerEncoder

logger = logging.getLogger(__name__)

RESULTS_REPO = "embeddings-benchmark/results"
PAPER_REPO = "embeddings-benchmark/mtebpaper"

# MS MARCO fine-tuned retrieval models the benchmark compares steering against, plus strong small
# general models. all-MiniLM-L6-v2 / all-mpnet-base-v2 are the measured base models themselves.
COMPARATORS: tuple[str, ...] = (
    "sentence-transformers/msmarco-MiniLM-L6-cos-v5",
    "sentence-transformers/multi-qa-MiniLM-L6-cos-v1",
    "sentence-transformers/msmarco-distilbert-base-v4",
    "BAAI/bge-small-en-v1.5",
)


@dataclass(frozen=True)
class PublishedScore:
    """One published test-split score: what, how much, and exactly where it was read."""

    model: str
    task: str
    ndcg_at_10: float
    recall_at_100: float | None
    repo: str
    path: str
    commit: str
    mteb_version: str

    @property
    def url(self) -> str:
        """Permanent link to the source file at the commit it was read from."""
        return f"https://github.com/{self.repo}/blob/{self.commit}/{self.path}"


PUBLISHED: tuple[PublishedScore, ...] = (
    # The results repository holds no SciFact.json in all-MiniLM-L6-v2's registry revision folder
    # (only a MAIR-style no_revision_available/SciFact.json with another metric); the MTEB paper's
    # results repository holds the MTEB SciFact run of this model.
    PublishedScore("sentence-transformers/all-MiniLM-L6-v2", "SciFact", 0.64508, 0.925, PAPER_REPO,
                   "results/all-MiniLM-L6-v2/SciFact.json", "28debbe59f00719389cc2a42e630aa31ea8cdfee", "0.0.2"),
    PublishedScore("sentence-transformers/all-MiniLM-L6-v2", "ArguAna", 0.50167, 0.97724, RESULTS_REPO,
                   "results/sentence-transformers__all-MiniLM-L6-v2/8b3219a92973c328a8e22fadcfa821b5dc75636a/ArguAna.json",
                   "87b30e96bc3625439df74a216b3ed698009620b8", "1.12.75"),
    PublishedScore("sentence-transformers/all-mpnet-base-v2", "SciFact", 0.6557, 0.94167, RESULTS_REPO,
                   "results/sentence-transformers__all-mpnet-base-v2/84f2bcc00d77236f9e89c8a360a00fb1139bf47d/SciFact.json",
                   "87b30e96bc3625439df74a216b3ed698009620b8", "1.12.75"),
    PublishedScore("sentence-transformers/all-mpnet-base-v2", "ArguAna", 0.46521, 0.98649, RESULTS_REPO,
                   "results/sentence-transformers__all-mpnet-base-v2/84f2bcc00d77236f9e89c8a360a00fb1139bf47d/ArguAna.json",
                   "87b30e96bc3625439df74a216b3ed698009620b8", "1.12.75"),
    PublishedScore("sentence-transformers/multi-qa-MiniLM-L6-cos-v1", "SciFact", 0.54029, 0.88033, RESULTS_REPO,
                   "results/sentence-transformers__multi-qa-MiniLM-L6-cos-v1/b207367332321f8e44f96e224ef15bc607f4dbf0/SciFact.json",
                   "d3276592c01032e5fd634cab36836f915f57e348", "1.36.37"),
    PublishedScore("BAAI/bge-small-en-v1.5", "SciFact", 0.71273, 0.945, RESULTS_REPO,
                   "results/BAAI__bge-small-en-v1.5/5c38ec7c405ec4b44b94cc5a9bb96e735b38267a/SciFact.json",
                   "50ba3b9772266b9a3d42e4338f0156275cf805d6", "1.20.0"),
    PublishedScore("BAAI/bge-small-en-v1.5", "ArguAna", 0.60348, 0.98791, RESULTS_REPO,
                   "results/BAAI__bge-small-en-v1.5/5c38ec7c405ec4b44b94cc5a9bb96e735b38267a/ArguAna.json",
                   "dad8c98410c74521b3a428dfafb396aa96d1c3fb", "1.18.0"),
)

# (model, task) pairs searched for and not found: no number is shown for them.
NOT_FOUND: dict[tuple[str, str], str] = {
    ("sentence-transformers/msmarco-MiniLM-L6-cos-v5", "*"):
        "not in mteb's model registry (2.26) and no results/sentence-transformers__msmarco-MiniLM-L6-cos-v5/ "
        f"folder in {RESULTS_REPO}",
    ("sentence-transformers/msmarco-distilbert-base-v4", "*"):
        "not in mteb's model registry (2.26) and no results/sentence-transformers__msmarco-distilbert-base-v4/ "
        f"folder in {RESULTS_REPO}",
    ("sentence-transformers/multi-qa-MiniLM-L6-cos-v1", "ArguAna"):
        "its revision folder b207367332321f8e44f96e224ef15bc607f4dbf0 holds ArguAna-NL.v2.json but no ArguAna.json",
}


def published_scores(tasks: list[str] | tuple[str, ...] | None = None,
                     models: list[str] | tuple[str, ...] | None = None) -> list[PublishedScore]:
    """The published scores for `tasks` / `models` (None = all), in table order."""
    return [p for p in PUBLISHED
            if (tasks is None or p.task in tasks) and (models is None or p.model in models)]


def published_score(model: str, task: str) -> PublishedScore | None:
    """The one published score of `model` on `task`, or None when none was found."""
    return next((p for p in PUBLISHED if p.model == model and p.task == task), None)


def load_comparator(name: str, *, device: str | None = None, cache_dir: str | None = None,
                    batch_size: int = 32) -> SteerEncoder | str:
    """A comparator as a plain SteerEncoder when its weights load, else the reason they do not.

    Weights come through `mteb_steer.backbone.resolve_backbone` (hub name; the registry's
    ModelMeta when mteb knows the model). Offline, loading a hub model fails: the caller then
    shows the published numbers instead of measuring.
    """
    try:
        return SteerEncoder(name, device=device, cache_dir=cache_dir, batch_size=batch_size)
    except Exception as err:  # offline hub, missing files, bad weights: all mean "not measurable here"
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".strip()
        logger.info("comparator %s not loadable: %s", name, reason)
        return reason[:300]
