"""How texts become vectors: the backend (torch, ONNX Runtime, OpenVINO), its precision, and the
dtype the corpus vectors are stored in.

Anything here that changes the vectors also changes the model's identity (`identity.encoding_meta`)
and the embedding-cache key, so vectors of two precisions never share a cache entry or a result
folder. The default, torch float32 stored as float32, keeps the plain model's identity exactly.

ONNX and OpenVINO run only the transformer: the SentenceTransformer keeps its own tokenizer,
pooling and normalisation, and its transformer's `forward` is routed to an inference session.
The transformer is exported once, offline, with `torch.onnx.export` into
`~/.cache/mteb_steer/backends/` (or `$MTEB_STEER_BACKEND_CACHE`) and quantised there with
onnxruntime (dynamic int8) or NNCF (static int8 for OpenVINO). sentence-transformers' own
`backend="onnx"/"openvino"` needs optimum-onnx / optimum-intel, whose releases pin
transformers < 4.58 / < 5.6 and so cannot share an environment with sentence-transformers 6
(transformers 5); the packages used here (`pip install mteb-steer[onnx]` / `[openvino]`) pin
nothing of the torch stack and are imported only when such a backend is asked for.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mteb_steer.embedding_cache import check_storage_dtype

logger = logging.getLogger(__name__)

BACKEND_CACHE_ENV = "MTEB_STEER_BACKEND_CACHE"
# backend -> precisions it runs ("int8": weights and activations quantised after export)
BACKENDS: dict[str, tuple[str, ...]] = {
    "torch": ("float32", "float16", "bfloat16"),
    "onnx": ("float32", "int8"),
    "openvino": ("float32", "int8"),
}
DTYPES = tuple(dict.fromkeys(d for dtypes in BACKENDS.values() for d in dtypes))
EXPORT_VERSION = "v1"  # bump when the export or quantisation recipe changes: it is part of the identity
_QUANTIZATION = {"onnx": "onnxruntime-dynamic-qint8-per-channel", "openvino": "nncf-static-int8-mixed"}
_PACKAGES = {"onnx": ("onnx", "onnxruntime"), "openvino": ("onnx", "onnxruntime", "openvino", "nncf")}


@dataclass(frozen=True)
class Encoding:
    """Backend, compute precision and corpus-vector storage precision of a base model.

    Args:
        backend: "torch" (default), "onnx" or "openvino" (the latter two CPU only).
        dtype: compute precision: float32 everywhere; float16 for torch on a GPU; bfloat16 for
            torch on a GPU or a CPU (fast only on CPUs with bf16 units, e.g. AVX512-BF16 / AMX);
            int8 for onnx (dynamic quantisation) and openvino (static quantisation calibrated
            on a fixed set of generic sentences, no evaluation data).
        storage: dtype corpus vectors are kept in (cache and memory map): float32 or float16.
    """

    backend: str = "torch"
    dtype: str = "float32"
    storage: str = "float32"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: use one of {', '.join(BACKENDS)}")
        if self.dtype not in BACKENDS[self.backend]:
            raise ValueError(f"dtype {self.dtype!r} is not available with backend {self.backend!r}: "
                             f"use one of {', '.join(BACKENDS[self.backend])}")
        check_storage_dtype(self.storage)

    @property
    def is_default(self) -> bool:
        """torch float32 stored as float32: the vectors every result filed so far was computed with."""
        return self == Encoding()

    @property
    def tag(self) -> str:
        """Readable name part, e.g. `onnx-int8`, `float16`, `float16-store`; empty for the default."""
        parts = [self.backend] if self.backend != "torch" else []
        parts += [self.dtype] if self.dtype != "float32" else []
        parts += [f"{self.storage}-store"] if self.storage != "float32" else []
        return "-".join(parts)

    def describe(self) -> dict[str, Any]:
        """Everything about the encoding that changes the vectors (hashed into the revision)."""
        out: dict[str, Any] = {"backend": self.backend, "dtype": self.dtype, "storage": self.storage}
        if self.backend != "torch":
            out["export"] = f"torch.onnx-{EXPORT_VERSION}"
        if self.dtype == "int8":
            out["quantization"] = _QUANTIZATION[self.backend]
        return out

    def check_device(self, device: str) -> None:
        """Refuse combinations that cannot run here, before any weights load."""
        kind = device.split(":")[0]
        if self.backend != "torch" and kind != "cpu":
            raise ValueError(f"backend {self.backend!r} runs on the CPU only (device {device!r} given); "
                             "use --backend torch for a GPU")
        if self.backend == "torch" and self.dtype == "float16" and kind == "cpu":
            raise ValueError(f"--dtype float16 needs a GPU (device is {device!r}): CPU kernels for float16 are "
                             "missing or emulated; on a CPU use --dtype bfloat16 (fast where the CPU has bf16 "
                             "units), --backend onnx or --backend openvino")


def load_model(source: str, device: str, encoding: Encoding, name: str, revision: str | None):
    """A SentenceTransformer for `source` running `encoding` on `device` (both already checked).

    `name`/`revision` name the base model's export folder, so each base is exported once per backend.
    """
    from sentence_transformers import SentenceTransformer

    if encoding.backend == "torch":
        import torch

        kwargs = {"model_kwargs": {"torch_dtype": getattr(torch, encoding.dtype)}} if encoding.dtype != "float32" else {}
        return SentenceTransformer(source, device=device, **kwargs)
    _require(encoding.backend)
    model = SentenceTransformer(source, device="cpu")
    path = exported_model(model, encoding, name, revision)
    transformer = model[0]
    runner = _RUNNERS[encoding.backend](path, transformer.tokenizer.model_input_names)
    transformer.model.forward = _session_forward(runner)  # tokenizer, pooling, normalisation stay ST's
    return model


def backend_cache() -> Path:
    return Path(os.environ.get(BACKEND_CACHE_ENV) or Path.home() / ".cache" / "mteb_steer" / "backends")


def _require(backend: str) -> None:
    import importlib.util

    missing = [m for m in _PACKAGES[backend] if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"backend {backend!r} needs {', '.join(missing)}: pip install 'mteb-steer[{backend}]'")


def _session_forward(runner: Callable[[dict[str, np.ndarray]], np.ndarray]) -> Callable[..., dict[str, Any]]:
    """A drop-in for the Hugging Face model's forward: token tensors in, `last_hidden_state` out."""
    import torch

    def forward(input_ids=None, attention_mask=None, token_type_ids=None, **_: Any) -> dict[str, Any]:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        arrays = {k: v.cpu().numpy().astype(np.int64) for k, v in inputs.items() if v is not None}
        return {"last_hidden_state": torch.from_numpy(np.ascontiguousarray(runner(arrays), dtype=np.float32))}

    return forward


def exported_model(model, encoding: Encoding, name: str, revision: str | None) -> Path:
    """Path of `model`'s transformer exported for `encoding` (an .onnx or OpenVINO .xml file).

    Exported once into the backend cache; each file is written under a temporary name and renamed
    when complete, so a killed export is redone rather than half used.
    """
    safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in f"{name}@{revision or 'local'}")
    folder = backend_cache() / safe / EXPORT_VERSION
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / "model.onnx"
    if not onnx_path.exists():
        logger.info("exporting %s to ONNX into %s (once per model)", name, folder)
        _publish(onnx_path, lambda tmp: _export_onnx(model, tmp))
    if encoding.backend == "onnx" and encoding.dtype == "float32":
        return onnx_path
    if encoding.backend == "onnx":
        target = folder / "model_qint8.onnx"
        if not target.exists():
            _publish(target, lambda tmp: _quantize_onnx(onnx_path, tmp))
        return target
    target = folder / ("openvino_model.xml" if encoding.dtype == "float32" else "openvino_model_int8.xml")
    if not target.exists():
        _publish(target, lambda tmp: _to_openvino(onnx_path, tmp, model if encoding.dtype == "int8" else None))
    return target


def _publish(target: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` and rename tmp (and an OpenVINO .bin beside it) onto `target` when it succeeded."""
    tmp = target.with_name(f"{target.stem}.{os.getpid()}.partial{target.suffix}")
    try:
        write(tmp)
        if tmp.suffix == ".xml":  # weights first: the .xml is what `exists()` checks
            tmp.with_suffix(".bin").replace(target.with_suffix(".bin"))
        tmp.replace(target)
    finally:
        for leftover in (tmp, tmp.with_suffix(".bin")):
            leftover.unlink(missing_ok=True)


def _export_onnx(model, path: Path) -> None:
    """The transformer alone (token ids -> last hidden state), dynamic batch and sequence axes."""
    import torch

    transformer = model[0]
    hf_model = transformer.model
    names = list(transformer.tokenizer.model_input_names)
    sample = transformer.tokenizer(["an example sentence", "a second, longer example sentence"], padding=True,
                                   return_tensors="pt")

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = hf_model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(names, tensors, strict=True))).last_hidden_state

    previous = hf_model.config._attn_implementation
    hf_model.set_attn_implementation("eager")  # plain ops trace to ONNX everywhere
    try:
        with torch.no_grad():
            torch.onnx.export(LastHidden().eval(), tuple(sample[n] for n in names), str(path), dynamo=False,
                              input_names=names, output_names=["last_hidden_state"], opset_version=17,
                              dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names},
                                            "last_hidden_state": {0: "batch", 1: "sequence"}})
    finally:
        hf_model.set_attn_implementation(previous)


def _quantize_onnx(source: Path, path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(path), weight_type=QuantType.QInt8, per_channel=True)


# Static int8 needs calibration text. These fixed generic sentences and questions (no evaluation
# data) keep the export offline and reproducible; EXPORT_VERSION names them.
_CALIBRATION = [
    "The mitochondria is the powerhouse of the cell and produces most of its chemical energy.",
    "What are the side effects of taking ibuprofen every day?",
    "Paris is the capital and most populous city of France.",
    "Researchers found that regular exercise lowers the risk of heart disease in older adults.",
    "how to replace a bicycle chain",
    "The stock market fell sharply after the central bank raised interest rates.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Should school uniforms be mandatory? Supporters argue they reduce bullying and distraction.",
    "The treaty was signed in 1648, ending the Thirty Years' War in central Europe.",
    "Vaccines train the immune system to recognise a pathogen without causing the disease.",
    "best way to learn a second language as an adult",
    "The algorithm sorts the list in O(n log n) time using a divide-and-conquer strategy.",
    "Climate change is driving more frequent and intense heatwaves across southern Europe.",
    "A protein's three-dimensional structure determines its biological function in the cell.",
    "Is coffee bad for your health?",
    "The court ruled that the law violated the constitutional right to free speech.",
]


def _to_openvino(source: Path, path: Path, model=None) -> None:
    """Convert the ONNX export to OpenVINO IR; with `model`, quantise it statically to int8 (NNCF)."""
    import openvino as ov

    ov_model = ov.convert_model(str(source))
    if model is not None:
        import nncf

        tokenizer = model[0].tokenizer
        names = list(tokenizer.model_input_names)
        samples = [{n: t.numpy() for n, t in tokenizer([text], return_tensors="pt").items() if n in names}
                   for text in _CALIBRATION]
        ov_model = nncf.quantize(ov_model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                                 subset_size=len(samples))
    ov.save_model(ov_model, str(path), compress_to_fp16=False)  # keep float32 weights float32


class _OnnxRunner:
    def __init__(self, path: Path, input_names: list[str]) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}

    def __call__(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(["last_hidden_state"], {k: v for k, v in arrays.items() if k in self.inputs})[0]


class _OpenVinoRunner:
    def __init__(self, path: Path, input_names: list[str]) -> None:
        import openvino as ov

        # f32 hint: on CPUs with bf16 units OpenVINO would otherwise compute in bf16 (other vectors)
        self.compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        self.inputs = {name for port in self.compiled.inputs for name in port.get_names()}

    def __call__(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        result = self.compiled({k: v for k, v in arrays.items() if k in self.inputs})
        return result[self.compiled.output(0)]


_RUNNERS: dict[str, Callable[[Path, list[str]], Callable[[dict[str, np.ndarray]], np.ndarray]]] = {
    "onnx": _OnnxRunner, "openvino": _OpenVinoRunner}
