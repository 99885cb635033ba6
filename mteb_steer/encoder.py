"""SteerEncoder: a frozen SentenceTransformer as an mteb 2.x encoder, with BEIR-style methods too.

Queries go through `encode_query` (plus any query transforms, e.g. the linear adapter),
documents through `encode_document`; both return float32 numpy arrays. The base model is
never changed: steering lives in small step objects (see `mteb_steer.steps`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.types import PromptType
from tqdm.auto import tqdm

from mteb_steer.backbone import Backbone, check_encoding, load_sentence_transformer, resolve_backbone
from mteb_steer.embedding_cache import CACHE_ENV, EmbeddingCache
from mteb_steer.encoding import Encoding
from mteb_steer.identity import encoding_meta, steered_meta
from mteb_steer.steps import QueryTransform

if TYPE_CHECKING:
    from mteb import ModelMeta
    from mteb.abstasks.task_metadata import TaskMetadata
    from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)

# Texts per model call while streaming a corpus into the cache, and the unit a killed run resumes
# from: about 50 s of all-MiniLM-L6-v2 on two idle CPU cores for SciFact passages (1,000 took 51 s,
# results/benchmark/costs.json), so a kill costs at most that. Blocks change which texts share a
# padded batch, hence the vectors at float rounding level (tests/test_encoding.py bounds it; SciFact:
# max 1.6e-7, every metric unchanged, see results/benchmark/encode_blocks_scifact.txt).
ENCODE_CHUNK = 1024


def passage_text(title: str | None, text: str | None) -> str:
    """Join title and body exactly as mteb does for retrieval corpora (`title + " " + text`, stripped)."""
    text = text or ""
    return (title + " " + text).strip() if title else text.strip()


def corpus_texts(corpus: Iterable[dict[str, Any]] | Iterable[str] | dict[str, dict[str, Any]]) -> list[str]:
    """Passages given as BEIR/mteb 1.x dicts (`title`/`text`), a dict of those, or plain strings."""
    if isinstance(corpus, dict):
        corpus = corpus.values()
    return [doc if isinstance(doc, str) else passage_text(doc.get("title"), doc.get("text")) for doc in corpus]


def dataset_passage_texts(corpus: Any) -> list[str]:
    """Passage texts of an mteb corpus dataset (columns `title`?, `text`): what the search model embeds."""
    titles = corpus["title"] if "title" in corpus.column_names else [None] * len(corpus)
    return [passage_text(t, x) for t, x in zip(titles, corpus["text"], strict=True)]


class SteerEncoder(AbsEncoder):
    """An mteb `EncoderProtocol` over any SentenceTransformer, with optional query transforms.

    Args:
        model_name: registry/hub name, local folder, or None for the bundled all-MiniLM-L6-v2.
        revision: ignored for offline copies (the registry revision names them); kept for mteb.
        device: cpu, cuda, cuda:N or mps; None picks cuda when available.
        query_transforms: steps applied to query embeddings only (corpus vectors untouched).
        batch_size: default encoding batch size.
        cache_dir: folder for base-embedding reuse (also `$MTEB_STEER_EMBEDDING_CACHE`); None disables.
        dtype, backend, embedding_storage: the `Encoding` (torch float32 stored as float32 by default);
            anything else gives the model another identity (`identity.encoding_meta`).
    """

    def __init__(
        self,
        model_name: str | None = None,
        revision: str | None = None,
        *,
        device: str | None = None,
        query_transforms: Sequence[QueryTransform] = (),
        batch_size: int = 32,
        cache_dir: str | os.PathLike | None = None,
        backbone: Backbone | None = None,
        dtype: str = "float32",
        backend: str = "torch",
        embedding_storage: str = "float32",
        **kwargs: Any,
    ) -> None:
        self.encoding = Encoding(backend=backend, dtype=dtype, storage=embedding_storage)
        device = check_encoding(device, self.encoding)  # before the model is resolved or loaded
        self.backbone = backbone or resolve_backbone(model_name)
        self.model = load_sentence_transformer(self.backbone.source, device, self.encoding, self.backbone.meta)
        self.query_transforms = list(query_transforms)
        self.batch_size = batch_size
        cache_dir = cache_dir or os.environ.get(CACHE_ENV)
        self.cache = EmbeddingCache(cache_dir) if cache_dir else None
        self._base_meta = encoding_meta(self.backbone.meta, self.encoding)
        self.mteb_model_meta = steered_meta(self._base_meta, self.query_transforms)

    @property
    def base_meta(self) -> ModelMeta:
        """The unsteered model's identity: the backbone's, or its encoding variant (see `encoding_meta`)."""
        return self._base_meta

    # -- the one place texts become vectors -------------------------------------------------
    @staticmethod
    def cache_key(base_meta: ModelMeta, kind: str, texts: list[str], storage: str = "float32") -> str:
        """The embedding-cache key of `texts` embedded as `kind` ("query"/"document") by that base model.

        `base_meta` (from `base_meta`) names backend and dtype; `storage` the stored precision.
        """
        return EmbeddingCache.key(f"{base_meta.name}@{base_meta.revision}", kind, texts, storage)

    def embed(self, texts: list[str], prompt_type: PromptType | None, *, batch_size: int | None = None,
              show_progress_bar: bool = False, apply_transforms: bool = True, upcast: bool = True) -> np.ndarray:
        """Embed texts as queries or documents, shape (len(texts), dim).

        Base vectors come from the cache when possible (memory-mapped, copy-on-write); query
        transforms are applied after it, so one cached base run serves every adapter. Documents
        are rounded to the encoding's storage dtype whether cached or not (results never depend
        on the cache); `upcast=False` returns them in that dtype (a float16 memory map stays one),
        else float32.
        """
        kind = "query" if prompt_type == PromptType.query else "document"
        storage = self.encoding.storage if kind == "document" else "float32"
        key = base = None
        if self.cache is not None and texts:
            key = self.cache_key(self.base_meta, kind, texts, storage)
            base = self.cache.get(key, rows=len(texts))
        if base is None:
            base = self._encode(texts, kind, batch_size or self.batch_size, show_progress_bar, storage, key)
        if upcast and base.dtype != np.float32:
            base = base.astype(np.float32)
        if kind == "query" and apply_transforms:
            for step in self.query_transforms:
                base = np.asarray(step.transform_queries(base), dtype=np.float32)
        return base

    def _encode(self, texts: list[str], kind: str, batch_size: int, show_progress_bar: bool, storage: str,
                key: str | None) -> np.ndarray:
        """Run the model; with a cache `key`, stream blocks of `ENCODE_CHUNK` texts into the cache file.

        Each block is committed to the cache as soon as it is encoded, so after a kill the rerun
        encodes only the blocks the killed run had not finished (the bar starts where it resumes).
        """
        if not texts:
            return np.zeros((0, self.dimension()), dtype=np.float32)
        encode = self.model.encode_query if kind == "query" else self.model.encode_document

        def block(start: int) -> np.ndarray:  # the model's own bar counts its batches within the block
            return np.asarray(encode(texts[start:start + ENCODE_CHUNK], batch_size=batch_size, convert_to_numpy=True,
                                     show_progress_bar=show_progress_bar), dtype=np.float32)

        if key is None or self.cache is None:
            parts = [block(s).astype(storage, copy=False) for s in range(0, len(texts), ENCODE_CHUNK)]
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        with self.cache.writer(key, len(texts), self.dimension(), storage) as entry, \
                tqdm(total=len(texts), initial=entry.done, desc=f"encoding {kind}s", unit="text",
                     disable=not show_progress_bar or len(texts) <= ENCODE_CHUNK) as bar:
            for start in range(entry.done, len(texts), ENCODE_CHUNK):
                end = min(start + ENCODE_CHUNK, len(texts))
                entry.array[start:end] = block(start)
                entry.commit(end)
                bar.update(end - start)
        return self.cache.written(key, len(texts))

    def dimension(self) -> int:
        """The vector width (sentence-transformers 6 renamed the method; 5.x has only the old name)."""
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return getter()

    # -- mteb 2.x EncoderProtocol --------------------------------------------------------------
    def encode(
        self,
        inputs: DataLoader,
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        # mteb passes show_progress_bar=False only when the caller turned bars off: show one otherwise
        return self.embed(texts, prompt_type, batch_size=kwargs.get("batch_size"),
                          show_progress_bar=kwargs.get("show_progress_bar", True))

    # -- BEIR / mteb 1.x style ----------------------------------------------------------------
    def encode_queries(self, queries: list[str], batch_size: int = 32, **kwargs: Any) -> np.ndarray:
        """Embed queries (query prompt, then query transforms)."""
        return self.embed(list(queries), PromptType.query, batch_size=batch_size,
                          show_progress_bar=kwargs.get("show_progress_bar", False))

    def encode_corpus(self, corpus: list[dict[str, Any]] | list[str] | dict[str, dict[str, Any]],
                      batch_size: int = 32, **kwargs: Any) -> np.ndarray:
        """Embed passages given as `{"title", "text"}` dicts or strings, joined like mteb joins them."""
        return self.embed(corpus_texts(corpus), PromptType.document, batch_size=batch_size,
                          show_progress_bar=kwargs.get("show_progress_bar", False))
