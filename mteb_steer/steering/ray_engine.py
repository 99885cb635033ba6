"""Query generation on Ray: a Ray Data pipeline over many LLM endpoints, embedded servers or vLLM engines.

Why: one process writes ~30 passages a minute with the embedded model; a corpus of millions needs
many LLM replicas at once. The pipeline: the driver reads the cache (`generation.start_report`),
the passages not cached yet become a Ray Dataset, `map_batches` sends batches to a pool of worker
actors, each worker asks its LLM for every passage of a batch (`QueryGenerator.generate_one`: the
same prompt, parsing and retries as one process), and the rows stream back to the driver, which
writes each passage's queries into the same `QueryCache` entry the single-process run writes. So
`export_bank` and everything downstream are unchanged, a killed driver resumes from the cache, a
second run sends nothing, and the nodes need no shared file system (only the driver writes).

Workers, one kind per run:
- endpoints: any number of OpenAI-compatible URLs; one worker per endpoint by default, each bound
  to one (round robin) with `per_endpoint` requests in flight;
- embedded (no endpoint given): every worker starts its own llama.cpp server (one replica per
  worker, `llm_server.local_llm_server`) and lists it, so the others can take over if it dies;
- vLLM (`vllm_model`): `ray.data.llm` with one vLLM engine per GPU (`pip install "ray[llm]"` on GPU
  nodes). Written to the documented `vLLMEngineProcessorConfig` / `build_processor` API but never
  run here: this repository's machines have no GPU and no vllm.

Failover: the live endpoints are listed in one registry actor. A worker whose endpoint is declared
dead (the LLM client's rule: `max_failures_in_a_row` failures with no success) marks it dead there
and sends the batch's unfinished passages, and the ones that failed there, to another live endpoint
(`report.rerouted`); an embedded worker with no live replica left starts a new server of its own
(at most MAX_SERVER_RESTARTS times). An actor that dies is restarted by Ray Data and its batch
retried. The run stops with `EndpointError` only when no endpoint is left.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import Any

from tqdm.auto import tqdm

from mteb_steer.ray_cluster import ray_session, require_ray
from mteb_steer.steering.generation import (
    GenConfig,
    GenerationReport,
    Passages,
    PassageFailure,
    QueryGenerator,
    UnparseableOutput,
    embedded_config,
    finish_report,
    parse_queries,
    start_report,
)
from mteb_steer.steering.llm_cache import CacheEntry, QueryCache
from mteb_steer.steering.llm_client import EndpointError, LLMClient
from mteb_steer.steering.llm_server import LocalServerConfig, local_llm_server

COUNTS = ("requests", "prompt_tokens", "completion_tokens", "rerouted")
MAX_SERVER_RESTARTS = 2  # an embedded replica that keeps dying is not restarted forever


@dataclass(frozen=True)
class RayPlan:
    """Where and how wide a Ray generation run goes.

    address: a Ray cluster to join (`ray://...` or `host:port`); None starts a local instance.
    endpoints: OpenAI-compatible base URLs; empty = embedded llama.cpp servers, one per worker.
    workers: worker actors; None = one per endpoint, else 2 embedded replicas.
    per_endpoint: requests one worker keeps in flight at its endpoint (embedded servers: always 1).
    cpus_per_worker: CPUs Ray reserves per worker (an embedded server runs on them).
    batch_size: passages per batch (the unit Ray retries and reroutes).
    vllm_model: a model for `ray.data.llm` vLLM engines instead of endpoints (GPU nodes only).
    """

    address: str | None = None
    endpoints: tuple[str, ...] = ()
    workers: int | None = None
    per_endpoint: int = 4
    cpus_per_worker: float = 1.0
    batch_size: int = 8
    vllm_model: str | None = None

    def __post_init__(self) -> None:
        if (self.workers is not None and self.workers < 1) or self.per_endpoint < 1 or self.batch_size < 1 \
                or self.cpus_per_worker < 0:
            raise ValueError(f"invalid Ray plan: need workers >= 1, per_endpoint >= 1, batch_size >= 1 and "
                             f"cpus_per_worker >= 0 (got {self.workers}, {self.per_endpoint}, {self.batch_size}, "
                             f"{self.cpus_per_worker})")
        if self.vllm_model and self.endpoints:
            raise ValueError("--vllm-model and --llm-base-url exclude each other: vLLM engines are the endpoints")

    @property
    def worker_count(self) -> int:
        return self.workers or len(self.endpoints) or 2


def read_endpoints(values: Sequence[str]) -> tuple[str, ...]:
    """Endpoint URLs from `--llm-base-url` values: a URL, or a file with one URL per line ('#' comments)."""
    urls: list[str] = []
    for value in values:
        if "://" in value:
            urls.append(value)
            continue
        try:
            lines = open(value, encoding="utf-8").read().splitlines()  # noqa: SIM115 (read at once)
        except OSError as err:
            raise ValueError(f"--llm-base-url {value!r} is neither a URL nor a readable file of URLs "
                             f"({err.strerror or err})") from None
        urls += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if len(set(urls)) != len(urls):
        raise ValueError(f"--llm-base-url lists an endpoint twice: {sorted({u for u in urls if urls.count(u) > 1})}")
    return tuple(urls)


class EndpointRegistry:
    """Ray actor body: the run's endpoints (live or dead), who gets which, and the counts of all workers."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)
        self.dead: set[str] = set()
        self.turn = 0
        self.counts = dict.fromkeys(COUNTS, 0)

    def add(self, url: str) -> None:
        if url not in self.urls:
            self.urls.append(url)

    def pick(self, prefer: str | None = None) -> str | None:
        """`prefer` while it lives (a worker's own server), else the next live endpoint; None when all are dead."""
        alive = [u for u in self.urls if u not in self.dead]
        if prefer in alive or not alive:
            return prefer if alive else None
        self.turn += 1
        return alive[(self.turn - 1) % len(alive)]

    def mark_dead(self, url: str) -> None:
        self.dead.add(url)

    def record(self, counts: dict[str, int]) -> None:
        for name, value in counts.items():
            self.counts[name] += value

    def totals(self) -> tuple[dict[str, int], list[str]]:
        return dict(self.counts), sorted(self.dead)


def _serve_in_thread(server: LocalServerConfig) -> tuple[str, threading.Event]:
    """Start an embedded server from a thread that lives as long as the actor (its exit stops the server)."""
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()

    def hold() -> None:
        try:
            with local_llm_server(server) as url:
                ready.put(url)
                stop.wait()
        except BaseException as err:  # noqa: BLE001 (handed to the constructor, which raises it)
            ready.put(err)

    threading.Thread(target=hold, name="llm-server", daemon=True).start()
    got = ready.get()
    if isinstance(got, BaseException):
        raise got
    return got, stop


class GenerationWorker:
    """Ray Data actor: generates a batch through its endpoint, moving to another live one if it dies."""

    def __init__(self, config: GenConfig, registry: Any, api_key: str | None, server: LocalServerConfig | None,
                 threads: int) -> None:
        self.ray = require_ray()
        self.config, self.registry, self.api_key, self.threads = config, registry, api_key, threads
        self.server, self.own = server, None
        self.restarts = 0
        if server is not None:
            self._start_server()
        self.url: str | None = None
        self.generator: QueryGenerator | None = None

    def _start_server(self) -> None:
        """Start this worker's embedded server (again, after it died) and list it for every worker."""
        if self.own is not None:
            self._stop.set()  # the holder thread leaves its block: the dead server's process is reaped
        self.own, self._stop = _serve_in_thread(self.server)
        self.ray.get(self.registry.add.remote(self.own))

    def _connect(self) -> QueryGenerator:
        while self.generator is None:
            url = self.ray.get(self.registry.pick.remote(self.own))
            if url is None and self.server is not None and self.restarts < MAX_SERVER_RESTARTS:
                self.restarts += 1  # no replica left alive (the others may still be starting): a new one
                self._start_server()
                continue
            if url is None:
                raise EndpointError("every LLM endpoint of this Ray run is dead: restart them, then rerun "
                                    "(finished passages are cached)")
            llm = LLMClient(url, self.api_key, self.config.transport())
            try:
                llm.check()
            except EndpointError:
                self.ray.get(self.registry.mark_dead.remote(url))
                continue
            self.url, self.generator = url, QueryGenerator(self.config, llm)
        return self.generator

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        ids, texts = [str(d) for d in batch["doc_id"]], [str(p) for p in batch["passage"]]
        results: dict[str, dict[str, Any]] = {}
        todo = list(zip(ids, texts, strict=True))
        rerouted = 0
        while todo:
            gen = self._connect()
            before = gen.llm.requests
            with ThreadPoolExecutor(self.threads, thread_name_prefix="genq") as pool:
                futures = {pool.submit(gen.generate_one, doc_id, passage): doc_id for doc_id, passage in todo}
                wait(futures)
            dead = None
            for fut, doc_id in futures.items():
                try:
                    results[doc_id] = {"entry": fut.result().to_dict()}
                except PassageFailure as err:
                    results[doc_id] = {"failure": str(err)}
                except EndpointError as err:
                    dead = err
            self.ray.get(self.registry.record.remote({"requests": gen.llm.requests - before,
                                                      "prompt_tokens": gen.prompt_tokens,
                                                      "completion_tokens": gen.completion_tokens}))
            gen.prompt_tokens = gen.completion_tokens = 0
            if dead is None and any("failure" in results[d] for d, _ in todo):
                try:  # failures on an endpoint that no longer answers are the endpoint's, not the passages'
                    gen.llm.check()
                except EndpointError as err:
                    dead = err
            if dead is None:
                break
            # the endpoint died: what it left unfinished, and what failed there, goes to another one
            self.ray.get(self.registry.mark_dead.remote(self.url))
            self.generator = None
            todo = [(d, p) for d, p in todo if "entry" not in results.get(d, {})]
            rerouted += len(todo)
        if rerouted:
            self.ray.get(self.registry.record.remote({"rerouted": rerouted}))
        return {"doc_id": ids, "result": [json.dumps(results[d]) for d in ids]}


def _vllm_dataset(ray: Any, ds: Any, config: GenConfig, plan: RayPlan) -> Any:
    """`ds` run through `ray.data.llm` vLLM engines (one per GPU); rows come back as {doc_id, result}.

    Not run in this repository (no GPU, no vllm): written to ray.data.llm's documented API. An answer
    that parses into no query is a failure (not cached, retried by a rerun); there is no per-passage
    retry with another seed here.
    """
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    completion = config.mode == "completion"

    def pre(row: dict[str, Any]) -> dict[str, Any]:
        request = config.request(row["passage"])
        stop = request.pop("stop", None)  # a sampling parameter for vLLM
        sampling = {**config.sampling(config.seed), **({"stop": stop} if stop else {})}
        return {**row, **request, "sampling_params": sampling}

    def post(row: dict[str, Any]) -> dict[str, Any]:
        text = config.answer_text({"prompt": row.get("prompt")} if completion else {}, row["generated_text"])
        try:
            queries = parse_queries(text, config.num_queries, row["passage"],
                                    truncated_answer=row["num_generated_tokens"] >= config.answer_tokens,
                                    require_overlap=config.require_overlap)
        except UnparseableOutput as err:
            return {"doc_id": row["doc_id"], "result": json.dumps({"failure": f"passage {row['doc_id']!r}: {err}"})}
        entry = CacheEntry(queries=queries, raw=text, prompt_tokens=int(row["num_input_tokens"]),
                           completion_tokens=int(row["num_generated_tokens"]))
        return {"doc_id": row["doc_id"], "result": json.dumps({"entry": entry.to_dict()})}

    engines = plan.workers or max(1, int(ray.cluster_resources().get("GPU", 1)))  # one per GPU
    engine = vLLMEngineProcessorConfig(model_source=plan.vllm_model, concurrency=engines,
                                       batch_size=plan.batch_size, chat_template_stage=not completion,
                                       should_continue_on_error=True)
    return build_processor(engine, preprocess=pre, postprocess=post)(ds)


def generate_on_ray(passages: Passages, config: GenConfig, cache_dir: str | os.PathLike, plan: RayPlan, *,
                    api_key: str | None = None, server: LocalServerConfig | None = None,
                    show_progress: bool = True) -> GenerationReport:
    """`generation.generate` on Ray: same input checks, cache entries and report; many LLM replicas at once.

    Only the passages not cached yet are sent. The driver writes each passage's queries into the
    cache as its row arrives. `report.requests` counts every attempt of every worker (a passage
    generated once costs one; `report.rerouted` passages were sent again after their endpoint died).
    """
    server = server or LocalServerConfig()
    if plan.vllm_model:
        config = config if config.model is not None else replace(config, model=plan.vllm_model)
    elif not plan.endpoints:
        config = embedded_config(config, server)
    identity, transport = config.identity(), config.transport()
    start = time.monotonic()
    with QueryCache(cache_dir) as cache:
        report, todo, order = start_report(passages, config, cache)
        if todo:
            with ray_session(plan.address) as ray:
                _run(ray, todo, len(order), config, plan, api_key, server, cache, identity, transport, report,
                     show_progress)
    return finish_report(report, order, start)


def _run(ray: Any, todo: list[tuple[str, str]], total: int, config: GenConfig, plan: RayPlan, api_key: str | None,
         server: LocalServerConfig, cache: QueryCache, identity: dict[str, Any], transport: Any,
         report: GenerationReport, show_progress: bool) -> None:
    texts = dict(todo)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver's own bar says more
    ds = ray.data.from_items([{"doc_id": d, "passage": p} for d, p in todo])
    registry = ray.remote(num_cpus=0)(EndpointRegistry).remote(list(plan.endpoints))
    if plan.vllm_model:
        ds = _vllm_dataset(ray, ds, config, plan)
    else:
        embedded = not plan.endpoints
        ds = ds.map_batches(GenerationWorker, batch_size=plan.batch_size, concurrency=plan.worker_count,
                            num_cpus=plan.cpus_per_worker, fn_constructor_kwargs={
                                "config": config, "registry": registry, "api_key": api_key,
                                "server": server if embedded else None,
                                "threads": 1 if embedded else plan.per_endpoint})
    failed_in_a_row, began = 0, time.monotonic()
    with tqdm(total=total, initial=report.cached, desc=f"generating queries on Ray ({plan.worker_count} worker(s))",
              unit="passage", disable=not show_progress) as bar:
        try:
            for row in ds.iter_rows():
                doc_id, result = str(row["doc_id"]), json.loads(row.get("result") or "{}")
                if "entry" in result:
                    entry = CacheEntry(**result["entry"])
                    cache.put(identity, texts[doc_id], entry)
                    report.bank[doc_id] = entry.queries
                    report.generated += 1
                    failed_in_a_row = 0
                    if plan.vllm_model:  # vLLM engines are no endpoint of ours: each row was one request
                        report.requests += 1
                        report.prompt_tokens += entry.prompt_tokens
                        report.completion_tokens += entry.completion_tokens
                else:
                    report.failures[doc_id] = result.get("failure") or str(row.get("__inference_error__"))
                    failed_in_a_row += 1
                    if failed_in_a_row >= transport.max_failures_in_a_row:
                        raise EndpointError(f"{failed_in_a_row} passages in a row got no queries on Ray (e.g. "
                                            f"{report.failures[doc_id]}): check --llm-model and --llm-mode")
                bar.update(1)
                if bar.n % 8 == 0 or bar.n == total:
                    counts, _ = ray.get(registry.totals.remote())
                    bar.set_postfix(req_per_s=round(counts["requests"] / (time.monotonic() - began), 2),
                                    tokens=counts["prompt_tokens"] + counts["completion_tokens"],
                                    failed=len(report.failures), refresh=False)
        except Exception as err:  # a worker's EndpointError arrives wrapped in Ray's exceptions: unwrap it
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, EndpointError):
                cause = getattr(cause, "cause", None) or cause.__cause__
            if cause is None:
                raise
            raise cause from None
        finally:
            counts, dead = ray.get(registry.totals.remote())
            for name in COUNTS:
                setattr(report, name, getattr(report, name) + counts[name])
            if dead:
                bar.write(f"endpoint(s) died during the run, their passages went to the others: {dead}")
