"""The `loader` of every steered ModelMeta: rebuild the exact model from its configuration.

mteb calls `meta.load_model()` -> `loader(name, revision=..., device=..., **loader_kwargs)`;
a steered meta's `loader_kwargs` is `{"steer_config": SteerConfig.to_json()}` (see
`identity.steered_meta`), so the configuration travels inside `model_meta.json` too. The
rebuilt model must have the revision it was registered under: a bank or adapter that changed
since (another fingerprint) gives another revision, and is refused rather than scored under
the old name.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

# folders (besides the working directory) where relative bank / adapter paths are looked up:
# `registry.register_results` adds a results folder's parent, where its commands ran
ARTIFACT_ROOTS: list[Path] = []

_HOW_TO_MAKE = {
    "query_bank": "make it with `mteb-steer generate -t <task> --export {path}` (or copy the bank there)",
    "adapter": "train it with `mteb-steer train-adapter --data <task> --out {path}` (or copy the folder there)",
}


class MissingArtifactError(FileNotFoundError):
    """A bank or adapter a configuration names is not on disk."""


def resolve_artifacts(config: Any, name: str, revision: str | None) -> Any:
    """`config` with its bank / adapter paths found (as given, else under ARTIFACT_ROOTS); raises
    MissingArtifactError naming the missing file, the model that needs it and how to make it."""
    changes = {}
    for field in _HOW_TO_MAKE:
        value = getattr(config, field)
        if not value:
            continue
        path = Path(value).expanduser()
        candidates = [path] + ([root / path for root in ARTIFACT_ROOTS] if not path.is_absolute() else [])
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            where = ", ".join(str(c) for c in candidates)
            raise MissingArtifactError(
                f"{name}@{revision or '?'} needs the {field.replace('_', ' ')} {value}, which is missing "
                f"(looked in: {where}); {_HOW_TO_MAKE[field].format(path=value)}. The revision fingerprints "
                "its content, so only the same bank/adapter rebuilds this model.")
        if found != path:
            changes[field] = str(found)
    return dataclasses.replace(config, **changes) if changes else config


def load_steered(model_name: str, revision: str | None = None, *, steer_config: dict[str, Any],
                 device: str | None = None, **kwargs: Any):
    """Rebuild the SteerSearch `model_name`@`revision` from `steer_config` (what mteb's loaders get).

    Raises ValueError when the rebuilt model's name or revision differs from the registered one
    (an artifact changed), or for a configuration that needs a task (the gold oracle teacher).
    """
    from mteb_steer.pipeline import SteerConfig, build_model

    if kwargs:
        raise ValueError(f"{model_name}: load_steered takes no options besides device, got {sorted(kwargs)}")
    config = SteerConfig.from_json(steer_config)
    if device is not None:
        config = dataclasses.replace(config, device=device)
    if (config.refine_teacher or "").strip().lower() == "gold":
        raise ValueError(f"{model_name}: the gold (oracle) teacher reads the task's qrels, which a loader "
                         "does not get; evaluate it with `mteb-steer evaluate`")
    config = resolve_artifacts(config, model_name, revision)
    model = build_model(config)
    built = model.mteb_model_meta
    if built.name != model_name or (revision is not None and built.revision != revision):
        raise ValueError(
            f"{model_name}@{revision}: its configuration now builds {built.name}@{built.revision}; a bank, "
            "adapter or base model changed since it was filed (steer_config.json beside its results lists "
            "the fingerprints it was made with)")
    return model
