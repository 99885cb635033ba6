"""`mteb-steer` command line: parse, validate everything cheap first, then delegate.

evaluate        run MTEB retrieval tasks with a (steered) model; leaderboard-layout results
generate        fill the LLM query cache for a corpus and/or export it as a portable query bank
encode          fill the embedding cache with a task's corpus vectors (in this process or on Ray)
train-adapter   fit a linear query adapter on labelled pairs or on generated queries
submit          prepare a results-repository submission (nothing is pushed)
mteb            mteb's own CLI (run, mock-run, ...) with this package's models and local tasks
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from mteb_steer.embedding_cache import CACHE_ENV, STORAGE_DTYPES, default_embedding_cache
from mteb_steer.encoding import BACKENDS, DTYPES

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (naming the flag and where help is) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(low: float | None = None, high: float | None = None, *, auto: bool = False, integer: bool = False,
            strict_low: bool = False):
    """An argparse type: a number in [low, high] ((low, high] with strict_low), or 'auto' when allowed."""
    def parse(value: str) -> float | int | str:
        if auto and value == "auto":
            return value
        try:
            number = int(value) if integer else float(value)
        except ValueError:
            number = None
        ok = number is not None and number == number and abs(number) != float("inf")
        if ok and low is not None:
            ok = number > low if strict_low else number >= low
        if ok and high is not None:
            ok = number <= high
        if not ok:
            kind = "an integer" if integer else "a number"
            bounds = ("" if low is None else f" {'>' if strict_low else '>='} {low:g}") + \
                ("" if high is None else f"{' and' if low is not None else ''} <= {high:g}")
            also = " or 'auto'" if auto else ""
            raise argparse.ArgumentTypeError(f"expected {kind}{bounds}{also}, got {value!r}")
        return number
    return parse


_POSITIVE_INT = _number(1, integer=True)
_NON_NEGATIVE_INT = _number(0, integer=True)
_STRENGTH = _number(auto=True)  # a number or 'auto'; the range is fusion.select_strength's to check (one validator)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", default=None,
                        help="SentenceTransformer: registry/hub name or local folder "
                             "(default: bundled sentence-transformers/all-MiniLM-L6-v2)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    parser.add_argument("--batch-size", type=_POSITIVE_INT, default=32)
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--embedding-cache", default=None, metavar="DIR",
                       help="folder keeping base embeddings block by block, so other configurations reuse them and "
                            "a killed run's rerun continues where it stopped (default $MTEB_STEER_EMBEDDING_CACHE, "
                            "else ~/.cache/mteb_steer/embeddings); never part of a model's identity or results")
    cache.add_argument("--no-embedding-cache", action="store_true",
                       help="encode without reading or writing the embedding cache")
    parser.add_argument("--backend", choices=list(BACKENDS), default="torch",
                        help="inference backend: torch, or onnx / openvino on a CPU (exported once, offline); "
                             "anything but torch float32 is filed as its own model")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="compute precision: float32; float16 with torch on a GPU; bfloat16 with torch "
                             "(GPU, or a CPU with bf16 units); "
                             "int8 with onnx (dynamic) or openvino (static) quantisation")
    parser.add_argument("--embedding-storage", choices=list(STORAGE_DTYPES), default="float32",
                        help="precision of the stored (memory-mapped) corpus vectors; float16 halves disk and memory")
    parser.add_argument("--data-root", default=None,
                        help="folder holding local BEIR copies (scifact/, arguana/, ...); "
                             "default $MTEB_STEER_DATA_ROOT or ../shared/datasets")


def _add_llm_arguments(parser: argparse.ArgumentParser, several: bool = False) -> None:
    parser.add_argument("--llm-base-url", default=None, action="append" if several else "store",
                        help="OpenAI-compatible endpoint (default $OPENAI_BASE_URL, else the embedded llama.cpp "
                             "server with the bundled Gemma-3-270m); the key comes from $OPENAI_API_KEY"
                             + ("; with --engine ray give it several times, or name a file of URLs" if several
                                else ""))
    parser.add_argument("--llm-model", default=None, help="model name at the endpoint (needed with a URL)")
    parser.add_argument("--llm-mode", choices=["completion", "chat"], default="completion",
                        help="completion (2-shot prompt, base models) or chat (instruction-tuned models)")
    parser.add_argument("--num-queries", type=_POSITIVE_INT, default=3, help="generated queries per passage")
    parser.add_argument("--query-style", default="task",
                        help="what generated queries should look like: 'task' (the task's own mteb metadata "
                             "prompt; default), 'generic' (plain search questions, the prompt of earlier banks), "
                             "or your own one-line description (e.g. for a BEIR folder)")
    parser.add_argument("--cache-dir", default=None,
                        help="LLM cache folder (default $MTEB_STEER_LLM_CACHE or ~/.cache/mteb_steer/llm)")
    parser.add_argument("--llm-timeout", type=float, default=120.0,
                        help="seconds one LLM request (and the start-up health check) may take (default 120)")
    parser.add_argument("--llm-retries", type=int, default=3, help="extra attempts per failed LLM request (default 3)")
    parser.add_argument("--allow-failed-passages", action="store_true",
                        help="accept passages that got no queries: generate exits 0, evaluate files the result "
                             "under a 'partial' revision (default: exit code 4, no result)")


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="local: this process; ray: a Ray pipeline (pip install 'mteb-steer[ray]')")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to join (e.g. ray://head:10001); default: start a local Ray instance")
    parser.add_argument("--ray-workers", type=_POSITIVE_INT, default=None,
                        help="Ray workers (default: one per endpoint, 2 embedded LLM replicas, or one encoder per "
                             "GPU, else per CPU)")


def _check_engine(args: argparse.Namespace, ray_only: Sequence[str]) -> None:
    """Ray flags without --engine ray would be ignored: refuse them."""
    given = [f"--{name.replace('_', '-')}" for name in ("ray_address", "ray_workers", *ray_only)
             if getattr(args, name) is not None]
    if args.engine != "ray" and given:
        raise ValueError(f"{', '.join(given)} need(s) --engine ray")


def build_parser(include_submit: bool = True) -> argparse.ArgumentParser:
    parser = _Parser(prog="mteb-steer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="evaluate a (steered) model on MTEB retrieval tasks")
    _add_model_arguments(ev)
    ev.add_argument("-t", "--tasks", nargs="+", default=["SciFact"],
                    help="MTEB task names (SciFact, ArguAna, TRECDLPool, ...) or BEIR folder paths")
    ev.add_argument("--output-folder", default=None,
                    help="results go to <output-folder>/results/<org__model>/<revision>/ (default: current dir)")
    ev.add_argument("--overwrite", action="store_true", help="re-run tasks whose results already exist")
    corpus = ev.add_argument_group("corpus steering")
    corpus.add_argument("--query-bank", default=None,
                        help="generated queries: a JSONL(.gz) bank or a BEIR generated-queries folder")
    corpus.add_argument("--fusion", choices=["mean", "sum", "rotate"], default=None,
                        help="fuse passage vectors with their generated queries (bank, else generate with the LLM)")
    for name, what in (("alpha", "mean"), ("beta", "sum"), ("gamma", "rotate")):
        corpus.add_argument(f"--{name}", type=_STRENGTH, default=None,
                            help=f"strength of --fusion {what}, or 'auto' (label-free held-out choice; default)")
    _add_llm_arguments(corpus)
    query = ev.add_argument_group("query steering")
    query.add_argument("--adapter", default=None, help="query adapter folder written by train-adapter")
    query.add_argument("--refine-teacher", default=None,
                       help="test-time refinement teacher: gold (oracle) | embedding:MODEL | cross-encoder:MODEL "
                            "| llm:MODEL | bm25 | hybrid")
    query.add_argument("--refine-top-k", type=_number(2, integer=True), default=20)
    query.add_argument("--refine-steps", type=_NON_NEGATIVE_INT, default=100)
    query.add_argument("--refine-lr", type=_number(0, strict_low=True), default=1e-4)
    query.add_argument("--hyde", type=_NON_NEGATIVE_INT, default=0, metavar="N",
                       help="fuse each query with N generated hypothetical passages")
    lexical = ev.add_argument_group("lexical hybrid")
    lexical.add_argument("--lexical", choices=["bm25"], default=None, help="add BM25 scores to the dense scores")
    lexical.add_argument("--lexical-weight", type=_number(0, 1), default=None,
                         help="lexical weight in [0, 1] (default: chosen on the TREC-DL pool)")
    lexical.add_argument("--lexical-fusion", choices=["zscore", "rrf", "minmax"], default=None)
    lexical.add_argument("--no-lexical-expand", action="store_true",
                         help="do not append a passage's generated queries to its BM25 text")
    lexical.add_argument("--lexical-index-dir", default=None, help="save/reuse BM25 indexes here")
    ev.add_argument("--self-tune", action="store_true",
                    help="choose BM25 k1/b, the lexical weight and the fusion strength per corpus from held-out "
                         "pseudo-queries (generated queries of --query-bank, else sentences cut from passages); "
                         "no label is read; choices go to steer_fit.json")
    ev.add_argument("--self-tune-sample", type=_POSITIVE_INT, default=None, metavar="N",
                    help="pseudo-queries per corpus for --self-tune (default 500; more gives steadier choices "
                         "and tunes proportionally slower: BENCHMARKS.md section 7)")

    gen = sub.add_parser("generate", help="generate queries for a corpus into the cache; optionally export a bank")
    gen.add_argument("-t", "--task", required=True, help="task name or BEIR folder whose corpus to use")
    gen.add_argument("--data-root", default=None)
    _add_llm_arguments(gen, several=True)
    gen.add_argument("--export", default=None, help="write the cached queries to this JSONL(.gz) bank")
    gen.add_argument("--no-generate", action="store_true", help="only export what the cache holds (no requests)")
    gen.add_argument("--resume-from", default=None, metavar="BANK",
                     help="first seed the cache from a bank an earlier run of this same generator exported "
                          "(e.g. on another machine); its passages send no request")
    gen.add_argument("--limit", type=_POSITIVE_INT, default=None, help="only the first N passages")
    _add_engine_arguments(gen)
    gen.add_argument("--per-endpoint", type=_POSITIVE_INT, default=None,
                     help="with --engine ray: requests in flight per endpoint worker (default 4)")
    gen.add_argument("--vllm-model", default=None,
                     help="with --engine ray: generate with ray.data.llm vLLM engines, one per GPU, running this "
                          "model (needs GPU nodes and `pip install 'ray[llm]'`)")

    enc = sub.add_parser("encode", help="encode the corpus of tasks into the embedding cache (here or on Ray)")
    _add_model_arguments(enc)
    enc.add_argument("-t", "--tasks", nargs="+", required=True, help="MTEB task names or BEIR folder paths")
    _add_engine_arguments(enc)

    tr = sub.add_parser("train-adapter", help="train a linear query adapter")
    _add_model_arguments(tr)
    tr.add_argument("--data", default=None, help="task name or BEIR folder with labelled pairs (qrels/<split>.tsv)")
    tr.add_argument("--split", default="train", help="labelled split to train on (never an eval split)")
    tr.add_argument("--query-bank", default=None, help="train on generated queries instead of labels")
    tr.add_argument("--loss", choices=["mnrl", "triplet", "mse"], default="mnrl")
    tr.add_argument("--rank", type=_POSITIVE_INT, default=None, help="low-rank update W = I + U V^T of this rank")
    tr.add_argument("--epochs", type=_POSITIVE_INT, default=30)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", required=True, help="output folder (safetensors + JSON config)")
    tr.add_argument("--export-sentence-transformer", default=None, metavar="DIR",
                    help="also write a plain sentence-transformers model applying the adapter to queries only")

    if include_submit:  # imports mteb: skipped when another command runs, so flag errors come at once
        from mteb_steer.submit import add_submit_parser

        add_submit_parser(sub)
    sub.add_parser("mteb", add_help=False, help="mteb's own CLI (run, mock-run, create-model-results, ...) with "
                   "this package's models and local tasks: `mteb-steer mteb run -m mteb-steer/... -t SciFact`")
    return parser


def _evaluate(args: argparse.Namespace) -> int:
    _check_combinations(args)  # flags first: nothing heavy is imported yet

    from mteb_steer.backbone import check_device, resolve_backbone
    from mteb_steer.pipeline import SteerConfig, build_encoder, build_model, default_output_folder
    from mteb_steer.results import STEER_FIT_FILE, evaluate_tasks, format_table, read_fits, result_dir
    from mteb_steer.tasks import resolve_task

    config = SteerConfig.from_options(  # validated here, before any data or weights load
        alpha=args.alpha, beta=args.beta, gamma=args.gamma,
        model=args.model, device=args.device, batch_size=args.batch_size, embedding_cache=args.embedding_cache,
        backend=args.backend, dtype=args.dtype, embedding_storage=args.embedding_storage,
        query_bank=args.query_bank, fusion=args.fusion, llm_base_url=args.llm_base_url,
        llm_model=args.llm_model, llm_mode=args.llm_mode, num_queries=args.num_queries, llm_cache_dir=args.cache_dir,
        query_style=args.query_style, llm_timeout=args.llm_timeout, llm_retries=args.llm_retries,
        allow_failed_passages=args.allow_failed_passages, adapter=args.adapter, refine_teacher=args.refine_teacher,
        refine_top_k=args.refine_top_k,
        refine_steps=args.refine_steps, refine_lr=args.refine_lr, hyde=args.hyde, lexical=args.lexical,
        lexical_weight=args.lexical_weight, lexical_fusion=args.lexical_fusion,
        lexical_expand=not args.no_lexical_expand, lexical_index_dir=args.lexical_index_dir,
        self_tune=args.self_tune, self_tune_sample=args.self_tune_sample)
    check_device(args.device)
    if args.model:  # a hub model offline is refused now, not after the data loads
        resolve_backbone(args.model)
    output = args.output_folder or default_output_folder()
    check_writable(output, "--output-folder")
    if args.embedding_cache:
        check_writable(args.embedding_cache, "--embedding-cache")
    tasks = [resolve_task(name, args.data_root) for name in args.tasks]
    for task in tasks:  # bad data fails here, before any model loads
        task.load_data()
    if args.query_bank:
        _check_bank(args.query_bank, tasks)
    encoder = build_encoder(config)
    scores = []
    for task in tasks:  # one model per task: the gold teacher and identical-id rules are per task
        model = build_model(config, encoder=encoder, task=task)
        print(f"model: {model.mteb_model_meta.name} @ {model.mteb_model_meta.revision}", file=sys.stderr)
        scores += evaluate_tasks(model, [task], output, overwrite=args.overwrite, batch_size=args.batch_size)
        folder = result_dir(output, model)
        for tag, fit in read_fits(folder).get(task.metadata.name, {}).items():
            bm25 = f" with BM25 k1={fit['bm25']['k1']:g} b={fit['bm25']['b']:g}" if "bm25" in fit else ""
            print(f"{tag}: auto chose {fit['parameter']}={fit['chosen']:g}{bm25} on {task.metadata.name} "
                  f"(label-free, rule {fit['rule']}; {STEER_FIT_FILE})", file=sys.stderr)
        print(f"results: {folder}", file=sys.stderr)
    print(format_table(scores))
    return 0


def _check_combinations(args: argparse.Namespace) -> None:
    """Flags that would be silently ignored are refused (before any data loads)."""
    bank_users = args.fusion or args.lexical or args.refine_teacher
    if args.query_bank and not bank_users:
        raise ValueError("--query-bank is used only with --fusion, --lexical or --refine-teacher: add one of "
                         "them (e.g. --fusion mean), or drop --query-bank")
    lexical_teacher = (args.refine_teacher or "").strip().lower() in {"bm25", "hybrid"}
    lexical_flags = [flag for flag, given in (("--lexical-weight", args.lexical_weight is not None),
                                              ("--lexical-fusion", args.lexical_fusion is not None),
                                              ("--no-lexical-expand", args.no_lexical_expand),
                                              ("--lexical-index-dir", args.lexical_index_dir is not None)) if given]
    if lexical_flags and not (args.lexical or lexical_teacher):
        raise ValueError(f"{', '.join(lexical_flags)} need(s) --lexical bm25 (or a bm25/hybrid --refine-teacher)")
    refine_flags = [flag for flag, value, default in (("--refine-top-k", args.refine_top_k, 20),
                                                      ("--refine-steps", args.refine_steps, 100),
                                                      ("--refine-lr", args.refine_lr, 1e-4)) if value != default]
    if refine_flags and not args.refine_teacher:
        raise ValueError(f"{', '.join(refine_flags)} need(s) --refine-teacher")


def _check_bank(path: str, tasks: Sequence) -> None:
    """A bank made for another corpus (no passage id in common) is refused before any model loads."""
    from mteb_steer.steering.banks import BankError, load_bank

    bank = load_bank(path)
    for task in tasks:
        ids = {str(i) for split in task.eval_splits for i in task.dataset["default"][split]["corpus"]["id"]}
        if not ids & set(bank):
            raise BankError(f"--query-bank {path}: its {len(bank)} passages (e.g. {list(bank)[:2]}) share no id with "
                            f"the corpus of {task.metadata.name} (e.g. {sorted(ids)[:2]}): a bank made for another "
                            "corpus?")


def check_writable(folder: str | os.PathLike, flag: str) -> None:
    """Create `folder` and write a probe file there, so a read-only or full disk fails now, in one line."""
    from pathlib import Path

    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".mteb-steer-write-probe-{os.getpid()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot write there ({err.strerror or err}); choose a writable folder "
                         f"with {flag}") from None


def _generate(args: argparse.Namespace) -> int:
    from mteb_steer.beir import find_file, read_jsonl
    from mteb_steer.encoder import passage_text
    from mteb_steer.pipeline import SteerConfig, _gen_config
    from mteb_steer.steering.generation import export_bank, generate, resume_from_bank
    from mteb_steer.steering.query_style import resolve_query_style
    from mteb_steer.tasks import resolve_task

    _check_engine(args, ("vllm_model", "per_endpoint"))
    urls = _endpoints(args.llm_base_url or [], args.engine)
    task = resolve_task(args.task, args.data_root)
    folder = getattr(task, "data_folder", None)
    if folder is None:
        raise ValueError(f"generate needs a local BEIR copy of {args.task} (give --data-root or a folder)")
    rows = list(read_jsonl(find_file(folder, "corpus")))[: args.limit]
    passages = [(str(r["_id"]), passage_text(r.get("title"), r.get("text"))) for r in rows]
    config = SteerConfig(llm_base_url=urls[0] if urls and args.engine == "local" else None,
                         llm_model=args.llm_model or args.vllm_model, llm_mode=args.llm_mode,
                         num_queries=args.num_queries, llm_cache_dir=args.cache_dir, llm_timeout=args.llm_timeout,
                         llm_retries=args.llm_retries)
    gen_config = _gen_config(config, query_style=resolve_query_style(args.query_style, task))
    if args.resume_from:
        seeded = resume_from_bank(args.resume_from, passages, gen_config, config.llm_cache())
        print(f"resumed {seeded} passage(s) from {args.resume_from}")
    report = None
    if not args.no_generate and args.engine == "ray":
        from mteb_steer.steering.llm_client import endpoint_url
        from mteb_steer.steering.ray_engine import RayPlan, generate_on_ray

        plan = RayPlan(address=args.ray_address, endpoints=urls or tuple(filter(None, [endpoint_url(None)])),
                       workers=args.ray_workers, per_endpoint=args.per_endpoint or RayPlan.per_endpoint,
                       vllm_model=args.vllm_model)
        report = generate_on_ray(passages, gen_config, config.llm_cache(), plan)
        print(report.summary())
    elif not args.no_generate:
        report = generate(passages, gen_config, config.llm_cache(), base_url=config.llm_base_url)
        print(report.summary())
    if args.export:
        bank = export_bank(passages, gen_config, config.llm_cache(), args.export)
        print(f"exported {len(bank)} of {len(passages)} passages to {args.export}")
    if report is not None and not args.allow_failed_passages:
        report.require_complete("pass --allow-failed-passages to accept the gaps")
    return 0


def _encode(args: argparse.Namespace) -> int:
    _check_engine(args, ())
    from mteb.types import PromptType

    from mteb_steer.backbone import check_encoding, resolve_backbone
    from mteb_steer.embedding_cache import EmbeddingCache
    from mteb_steer.encoder import SteerEncoder, dataset_passage_texts
    from mteb_steer.encoding import Encoding
    from mteb_steer.identity import encoding_meta
    from mteb_steer.tasks import resolve_task

    if args.no_embedding_cache:
        raise ValueError("encode only fills the embedding cache: --no-embedding-cache leaves it nothing to do")
    cache_dir = args.embedding_cache  # main() resolved the default
    check_writable(cache_dir, "--embedding-cache")
    encoding = Encoding(args.backend, args.dtype, args.embedding_storage)
    check_encoding(args.device, encoding)
    backbone = resolve_backbone(args.model)
    options = {"model_name": args.model, "device": args.device, "batch_size": args.batch_size,
               "backend": args.backend, "dtype": args.dtype, "embedding_storage": args.embedding_storage}
    corpora: dict[str, list[str]] = {}  # cache key -> texts, each corpus once
    meta = encoding_meta(backbone.meta, encoding)
    for name in args.tasks:
        task = resolve_task(name, args.data_root)
        task.load_data()
        for split in task.eval_splits:
            texts = dataset_passage_texts(task.dataset["default"][split]["corpus"])
            corpora[SteerEncoder.cache_key(meta, "document", texts, args.embedding_storage)] = texts
    if args.engine == "ray":
        from mteb_steer.ray_cluster import encode_on_ray, ray_session

        with ray_session(args.ray_address):
            for key, texts in corpora.items():
                encode_on_ray(texts, options, EmbeddingCache(cache_dir), key, args.embedding_storage,
                              actors=args.ray_workers, batch_size=args.batch_size)
    else:
        encoder = SteerEncoder(**options, cache_dir=cache_dir, backbone=backbone)
        for texts in corpora.values():
            encoder.embed(texts, PromptType.document, show_progress_bar=True)
    for key, texts in corpora.items():
        print(f"{len(texts)} passages -> {cache_dir}/{key}.npy")
    return 0


def _endpoints(values: Sequence[str], engine: str) -> tuple[str, ...]:
    """The --llm-base-url values as URLs (files of URLs read); more than one needs --engine ray."""
    if engine == "ray":
        from mteb_steer.steering.ray_engine import read_endpoints

        return read_endpoints(values)
    if len(values) > 1:
        raise ValueError("--llm-base-url given several times needs --engine ray")
    return tuple(values)


def _train_adapter(args: argparse.Namespace) -> int:
    from mteb_steer.pipeline import SteerConfig, build_encoder
    from mteb_steer.steering.adapter import (AdapterTrainConfig, export_sentence_transformer, train_and_save,
                                             training_pairs)

    train_config = AdapterTrainConfig(loss=args.loss, rank=args.rank, epochs=args.epochs, seed=args.seed)
    pairs = training_pairs(args.data, args.split, query_bank=args.query_bank, data_root=args.data_root)
    encoder = build_encoder(SteerConfig(model=args.model, device=args.device, batch_size=args.batch_size,
                                        embedding_cache=args.embedding_cache, backend=args.backend,
                                        dtype=args.dtype, embedding_storage=args.embedding_storage))
    adapter, history, folder = train_and_save(encoder, pairs, args.out, train_config)
    print(f"adapter {adapter.tag} -> {folder} ({len(history.epochs)} epochs)")
    if args.export_sentence_transformer:
        print(f"sentence-transformers model -> {export_sentence_transformer(encoder, adapter, args.export_sentence_transformer)}")
    return 0


EXIT_USAGE = 2  # a bad flag, file or folder
EXIT_LLM = 3  # the LLM endpoint cannot serve the run (nothing listens, hung, key rejected, died mid-run)
EXIT_INCOMPLETE = 4  # some passages got no queries and --allow-failed-passages was not given


def _submit(args: argparse.Namespace) -> int:
    from mteb_steer.submit import run_submit

    return run_submit(args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["mteb"]:  # every later argument is mteb's, parsed by mteb's own parser
        from mteb_steer.mteb_cli import main as mteb_main

        return mteb_main(argv[1:])
    command = next((a for a in argv if not a.startswith("-")), None)
    local_commands = {"evaluate", "generate", "encode", "train-adapter"}
    args = build_parser(include_submit=command not in local_commands).parse_args(argv)
    if "no_embedding_cache" in args:  # on by default: a killed run must not lose the vectors it encoded
        args.embedding_cache = None if args.no_embedding_cache else args.embedding_cache or default_embedding_cache()
        if args.no_embedding_cache:  # the encoder falls back to the variable: off must mean off
            os.environ.pop(CACHE_ENV, None)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from mteb_steer.steering.generation import IncompleteGeneration
    from mteb_steer.steering.llm_client import EndpointError

    handlers = {"evaluate": _evaluate, "generate": _generate, "encode": _encode, "train-adapter": _train_adapter,
                "submit": _submit}
    try:
        return handlers[args.command](args)
    except EndpointError as err:
        print(f"mteb-steer: error: {err}", file=sys.stderr)
        return EXIT_LLM
    except IncompleteGeneration as err:
        print(f"mteb-steer: error: {err}", file=sys.stderr)
        return EXIT_INCOMPLETE
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"mteb-steer: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # a disk that filled up or turned read-only mid-run: name the file, no traceback
        where = f" {err.filename}" if err.filename else ""
        print(f"mteb-steer: error: cannot write{where}: {err.strerror or err}; free space or choose another folder "
              f"(finished tasks are kept; rerun to continue)", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
