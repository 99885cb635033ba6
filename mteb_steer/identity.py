"""One MTEB identity per configuration, so mteb's result cache never mixes two models' scores.

mteb's `ResultCache` files results under `<name>/<revision>/<Task>.json` and `mteb.evaluate`
returns an existing file without running (`only-missing`). A steered variant that kept its
base model's name and revision would silently report the base's scores. Here every step
list gets its own name (readable tags) and revision (hash of base + full step configs).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from mteb_steer.steps import Step

if TYPE_CHECKING:  # only annotations: keeps `stable_hash` importable without loading mteb (seconds)
    from mteb.models.model_meta import ModelMeta

    from mteb_steer.encoding import Encoding

ORG = "mteb-steer"


def stable_hash(payload: Any, length: int = 12) -> str:
    """Short sha256 of a JSON-able payload with sorted keys: the one hashing helper of the package."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


HASH_CHUNK = 10_000  # items per JSON blob when hashing long sequences


def chunked_hash(n_items: int, chunk: Callable[[int, int], Any], size: int = HASH_CHUNK) -> str:
    """`stable_hash` of a long sequence without ever building it as one JSON blob.

    `chunk(start, stop)` returns the JSON-able payload of items [start, stop). Up to `size` items
    the hash is `stable_hash(chunk(0, n_items))`, exactly what hashing the whole payload gave before
    (so fingerprints already filed, e.g. of SciFact's and ArguAna's banks, stay valid); beyond it,
    the hash of the item count and the hashes of consecutive `size`-item chunks.
    """
    if n_items <= size:
        return stable_hash(chunk(0, n_items))
    parts = [stable_hash(chunk(start, min(start + size, n_items))) for start in range(0, n_items, size)]
    return stable_hash([n_items, parts])


def _safe_tag(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", tag).strip("-")


def steered_meta(base: ModelMeta, steps: Sequence[Step], steer_config: Any | None = None) -> ModelMeta:
    """The ModelMeta of `base` steered by `steps`; `base` itself when there are none.

    name: `mteb-steer/<base model>-<tag>+<tag>...`; revision: hash of the base name and
    revision plus every step's full `describe()`; `adapted_from`: the base; training data:
    the base's plus whatever labelled data a step was fitted on. With `steer_config` (a SteerConfig),
    `loader` is `mteb_steer.loader.load_steered` and `loader_kwargs` hold the configuration, so
    `meta.load_model()` (what `mteb.get_model` calls) rebuilds this exact model.
    """
    if not steps:
        return base
    config = describe_configuration(base, steps)
    short = (base.name or "model").split("/")[-1]
    name = f"{ORG}/{short}-" + "+".join(_safe_tag(s.tag) for s in steps)
    training = set(base.training_datasets or set())
    for step in steps:
        training |= step.training_datasets
    loader, loader_kwargs = None, {}
    if steer_config is not None:
        from mteb_steer.loader import load_steered

        loader, loader_kwargs = load_steered, {"steer_config": steer_config.to_json()}
    return base.model_copy(
        update={
            "loader": loader,
            "loader_kwargs": loader_kwargs,
            "name": name,
            "revision": stable_hash(config),
            "adapted_from": base.name,
            "training_datasets": training or None,
            "reference": None,
            "experiment_kwargs": None,
        }
    )


def encoding_meta(base: ModelMeta, encoding: Encoding) -> ModelMeta:
    """The ModelMeta of `base` run with `encoding`; `base` itself for the default (torch float32).

    Another backend or precision gives other vectors, hence another identity:
    name `mteb-steer/<base model>-<encoding tag>` (e.g. `all-MiniLM-L6-v2-onnx-int8`), revision
    the hash of the base name and revision plus `encoding.describe()`, `adapted_from` the base.
    Steered variants build on this meta, so their names and revisions carry the encoding too.
    """
    if encoding.is_default:
        return base
    short = (base.name or "model").split("/")[-1]
    config = {"base": base.name, "base_revision": base.revision, "encoding": encoding.describe()}
    return base.model_copy(
        update={
            "loader": None,
            "loader_kwargs": {"encoding": encoding.describe()},  # written to model_meta.json by mteb
            "name": f"{ORG}/{short}-{_safe_tag(encoding.tag)}",
            "revision": stable_hash(config),
            "adapted_from": base.name,
            "reference": None,
            "experiment_kwargs": None,
        }
    )


def describe_configuration(base: ModelMeta, steps: Sequence[Step]) -> dict[str, Any]:
    """The full configuration behind a revision, written next to results for readers."""
    return {
        "base": base.name,
        "base_revision": base.revision,
        "steps": [{"tag": s.tag, **s.describe()} for s in steps],
    }
