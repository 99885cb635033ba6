"""Make steered models known to mteb: named presets and every configuration filed under a results folder.

mteb 2.26 has no plugin hook: `mteb.get_model` / `mteb.get_model_meta` look a name up in
`mteb.models.model_implementations.MODEL_REGISTRY` (one ModelMeta per name; a `revision`
other than that meta's is refused), and unknown names go to the Hugging Face hub. Here:

- `register(meta)` puts a steered ModelMeta into that dict; the newest registered revision of
  a name answers `revision=None`;
- a name filed under several revisions (one per bank, adapter, ...) keeps all of them: the
  one wrapper installed on `get_model_meta` swaps the registry entry to the revision asked for
  before mteb's own lookup runs, so `mteb.get_model(name, revision)` rebuilds that one;
- `register_results(folder)` registers every `results/<org__model>/<revision>/` whose
  `model_meta.json` carries a configuration (written by `mteb-steer evaluate` and by `mteb run`
  with a steered model); `$MTEB_STEER_RESULTS` (folders joined by the path separator) is
  registered on `import mteb_steer`.

Nothing here loads weights: a ModelMeta is metadata, its loader runs only on `get_model`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mteb
import mteb.models.get_model_meta as _lookup
from mteb.models.model_implementations import MODEL_REGISTRY
from mteb.models.model_meta import ModelMeta

from mteb_steer.backbone import DEFAULT_MODEL, MPNET_MODEL
from mteb_steer.identity import ORG
from mteb_steer.loader import ARTIFACT_ROOTS, load_steered
from mteb_steer.results import STEER_CONFIG_FILE

logger = logging.getLogger(__name__)

RESULTS_ENV = "MTEB_STEER_RESULTS"
META_FILE = "model_meta.json"

_REVISIONS: dict[str, dict[str, ModelMeta]] = {}


def preset_configs() -> list[Any]:
    """The named presets: configurations with no artifact to fetch (BM25 + dense hybrid, defaults)."""
    from mteb_steer.pipeline import SteerConfig

    return [SteerConfig(lexical="bm25"), SteerConfig(model=MPNET_MODEL, lexical="bm25")]


@dataclass
class Registration:
    """What `register_results` found: registered `name@revision`s and folders left out, with why."""

    registered: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def register(meta: ModelMeta) -> ModelMeta:
    """Add a steered ModelMeta to mteb's registry (the newest registration answers revision=None)."""
    if meta.name is None or meta.revision is None or not meta.name.startswith(f"{ORG}/"):
        raise ValueError(f"only named, revisioned {ORG}/... models are registered, got {meta.name}@{meta.revision}")
    _install_revision_lookup()
    _REVISIONS.setdefault(meta.name, {})[meta.revision] = meta
    MODEL_REGISTRY[meta.name] = meta
    return meta


def registered_revisions(name: str) -> list[str]:
    """The revisions of `name` this process has registered."""
    return sorted(_REVISIONS.get(name, {}))


def register_presets() -> list[ModelMeta]:
    """Register the named presets (metadata only: the base model's registry meta, no weights)."""
    from mteb_steer.pipeline import configuration_meta

    return [register(configuration_meta(config, mteb.get_model_meta(config.model or DEFAULT_MODEL)))
            for config in preset_configs()]


def _steer_config(data: dict[str, Any], folder: Path) -> dict[str, Any] | None:
    """The configuration in model_meta.json's loader_kwargs, else under "config" in steer_config.json."""
    kwargs = data.get("loader_kwargs") or {}
    if isinstance(kwargs, dict) and kwargs.get("steer_config"):
        return kwargs["steer_config"]
    filed = folder / STEER_CONFIG_FILE
    return json.loads(filed.read_text()).get("config") if filed.is_file() else None


def register_results(folder: str | os.PathLike) -> Registration:
    """Register every steered configuration filed under `folder` (a folder holding `results/`, or
    `results/` itself). Relative bank/adapter paths are later looked up beside that `results/`."""
    root = Path(folder).expanduser()
    results = root / "results" if (root / "results").is_dir() else root
    if not results.is_dir():
        raise FileNotFoundError(f"results folder {folder} does not exist")
    if results.parent not in ARTIFACT_ROOTS:
        ARTIFACT_ROOTS.append(results.parent)
    report = Registration()
    for meta_path in sorted(results.glob(f"{ORG}__*/*/{META_FILE}")):
        where = str(meta_path.parent)
        try:
            data = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            report.skipped[where] = f"unreadable {META_FILE}: {err}"
            continue
        try:
            config = _steer_config(data, meta_path.parent)
        except (OSError, json.JSONDecodeError) as err:
            report.skipped[where] = f"unreadable {STEER_CONFIG_FILE}: {err}"
            continue
        if config is None:
            report.skipped[where] = (f"no configuration in its {META_FILE} nor {STEER_CONFIG_FILE} (filed before "
                                     "configurations were recorded): re-run it with `mteb-steer evaluate` to make "
                                     "it loadable")
            continue
        data.update(loader=None, loader_kwargs={})
        meta = ModelMeta.model_validate_json_resolved(json.dumps(data))
        meta = meta.model_copy(update={"loader": load_steered, "loader_kwargs": {"steer_config": config}})
        register(meta)
        report.registered.append(f"{meta.name}@{meta.revision}")
    return report


def register_from_environment() -> None:
    """Register the folders named in `$MTEB_STEER_RESULTS`; a bad folder is logged, never fatal on import."""
    for folder in filter(None, os.environ.get(RESULTS_ENV, "").split(os.pathsep)):
        try:
            register_results(folder)
        except (OSError, ValueError) as err:
            logger.warning("%s: %s not registered: %s", RESULTS_ENV, folder, err)


def _install_revision_lookup() -> None:
    """Wrap mteb's `get_model_meta` once so a registered name answers each of its registered revisions."""
    if getattr(_lookup.get_model_meta, "_mteb_steer", False):
        return
    original = _lookup.get_model_meta

    @functools.wraps(original)
    def get_model_meta(model_name: str, revision: str | None = None, *args: Any, **kwargs: Any) -> ModelMeta:
        known = _REVISIONS.get(model_name)
        if known and revision:
            if revision not in known:
                raise ValueError(f"{model_name}: revision {revision} is not registered (known: "
                                 f"{', '.join(sorted(known))}); register the results folder that holds it with "
                                 f"mteb_steer.register_results(folder) or ${RESULTS_ENV}")
            MODEL_REGISTRY[model_name] = known[revision]
        elif known:
            MODEL_REGISTRY[model_name] = list(known.values())[-1]
        return original(model_name, revision, *args, **kwargs)

    get_model_meta._mteb_steer = True  # type: ignore[attr-defined]
    _lookup.get_model_meta = get_model_meta
    mteb.get_model_meta = get_model_meta
