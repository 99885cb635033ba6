"""Generation and encoding on Ray (issue 13), against a real local Ray instance and real llama.cpp servers.

The generation tests start two SmolLM2-135M servers, each behind a counting proxy (requests are
counted on the server side), run the Ray pipeline over them, kill one server mid-run, and check
that every passage is covered, that the bank equals the single-process bank, and that a rerun
sends nothing. The encoding test checks that a corpus encoded by Ray actors lands in the
embedding cache under the in-process key with the in-process vectors, resuming an interrupted entry.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest_llm import CountingProxy, smollm2_gguf

from mteb_steer.steering.generation import GenConfig, export_bank, generate
from mteb_steer.steering.ray_engine import RayPlan, generate_on_ray, read_endpoints

ray = pytest.importorskip("ray", reason="the Ray engine needs the extra `mteb-steer[ray]`")

REPO = Path(__file__).resolve().parent.parent
# one query of at most 24 tokens per passage: the cheapest real request; fast backoff for the kill
CONFIG = GenConfig(model="smollm2-135m", num_queries=1, max_tokens=24, max_passage_tokens=48, concurrency=1,
                   timeout=300, backoff=0.1, backoff_cap=0.5)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray instance (2 CPUs) for the module; the engine joins it instead of starting its own."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def passages(data_root) -> list[tuple[str, str]]:
    """Two dozen real SciFact passages (id, title + text)."""
    from mteb_steer.beir import load_beir_split
    from mteb_steer.encoder import passage_text

    rows = load_beir_split(data_root / "scifact", "test").corpus[:24]
    return [(r["id"], passage_text(r["title"], r["text"])) for r in rows]


def _server_pid(port: int) -> int:
    """PID of the llama.cpp server this process started on `port` (read from /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "stat").read_text().split()[3] == str(os.getpid()):
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                if b"llama_cpp.server" in cmd and str(port).encode() in cmd:
                    return int(proc.name)
        except OSError:
            continue
    raise AssertionError(f"no llama.cpp server of this test on port {port}")


def _entries(cache_dir: Path) -> int:
    import diskcache

    from mteb_steer.steering.llm_cache import CLAIM_PREFIX

    if not (cache_dir / "cache.db").exists():
        return 0
    with diskcache.Cache(str(cache_dir)) as cache:
        return sum(1 for key in cache.iterkeys() if not str(key).startswith(CLAIM_PREFIX))


def test_endpoint_list_from_flags_and_file(tmp_path):
    listing = tmp_path / "urls.txt"
    listing.write_text("# two servers\nhttp://a:8000/v1\n\nhttp://b:8000/v1\n")
    assert read_endpoints(["http://c/v1", str(listing)]) == ("http://c/v1", "http://a:8000/v1", "http://b:8000/v1")
    with pytest.raises(ValueError, match="twice"):
        read_endpoints(["http://a:8000/v1", str(listing)])
    with pytest.raises(ValueError, match="neither a URL nor a readable file"):
        read_endpoints([str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="exclude each other"):
        RayPlan(endpoints=("http://a/v1",), vllm_model="m")


def test_cli_refuses_ray_flags_without_the_ray_engine(data_root):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for flags, message in ((["--ray-address", "x:1"], "--ray-address need(s) --engine ray"),
                           (["--llm-base-url", "http://a/v1", "--llm-base-url", "http://b/v1"],
                            "several times needs --engine ray")):
        proc = subprocess.run([sys.executable, "-m", "mteb_steer.cli", "generate", "-t", str(data_root / "scifact"),
                               *flags], capture_output=True, text=True, env=env, cwd=REPO)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.llm
def test_ray_generation_survives_a_killed_server_equals_one_process_and_reruns_free(local_ray, passages, tmp_path):
    from mteb_steer.steering.llm_server import LocalServerConfig, local_llm_server

    server = LocalServerConfig(model_path=str(smollm2_gguf()), alias="smollm2-135m", n_ctx=1024, n_threads=1)
    with ExitStack() as stack:
        urls = [stack.enter_context(local_llm_server(server)) for _ in range(2)]
        proxies = [stack.enter_context(CountingProxy(url.removesuffix("/v1"))) for url in urls]
        endpoints = tuple(p.url + "/v1" for p in proxies)

        # the single-process reference bank, through the first server
        one = generate(passages, CONFIG, tmp_path / "one", base_url=endpoints[0], show_progress=False)
        assert one.failures == {}

        # Ray: two workers, one per server; the first server is killed once a few passages are in
        cache_dir = tmp_path / "ray"
        killed = threading.Event()

        def kill_first_server() -> None:
            while _entries(cache_dir) < 4:
                time.sleep(0.2)
            os.kill(_server_pid(int(urls[0].rsplit(":", 1)[1].split("/")[0])), signal.SIGKILL)
            killed.set()

        threading.Thread(target=kill_first_server, daemon=True).start()
        before = [p.total for p in proxies]
        plan = RayPlan(endpoints=endpoints, per_endpoint=1, batch_size=3, cpus_per_worker=0.5)
        report = generate_on_ray(passages, CONFIG, cache_dir, plan, show_progress=False)
        assert killed.is_set(), "the run ended before the server was killed: the test proved nothing"
        sent = sum(p.total - b for p, b in zip(proxies, before, strict=True))

        # every passage covered, the cost counted where it was paid (the proxies), reroutes reported
        assert report.failures == {} and list(report.bank) == [d for d, _ in passages]
        assert report.generated == len(passages) and sent == report.requests
        assert report.requests >= len(passages) and report.rerouted >= 1
        # the same cache entries as one process: the exported banks are equal
        ray_bank = export_bank(passages, CONFIG, cache_dir, tmp_path / "ray.jsonl")
        one_bank = export_bank(passages, CONFIG, tmp_path / "one", tmp_path / "one.jsonl")
        assert set(ray_bank) == set(one_bank)
        assert all(len(ray_bank[d]) == len(one_bank[d]) for d in one_bank)
        assert ray_bank == one_bank

        # a second run sends nothing (counted at the surviving server)
        before = [p.total for p in proxies]
        again = generate_on_ray(passages, CONFIG, cache_dir, replace(plan, endpoints=endpoints[1:]),
                                show_progress=False)
        assert [p.total for p in proxies] == before and again.requests == 0 and again.cached == len(passages)
        assert again.bank == report.bank


def test_ray_encoding_writes_the_in_process_cache_entry(local_ray, encoder, scifact_slice, tmp_path):
    from mteb.types import PromptType

    from mteb_steer.beir import load_beir_split
    from mteb_steer.embedding_cache import EmbeddingCache
    from mteb_steer.encoder import SteerEncoder, corpus_texts
    from mteb_steer.ray_cluster import encode_on_ray

    texts = corpus_texts(load_beir_split(scifact_slice, "test").corpus)[:300]
    key = SteerEncoder.cache_key(encoder.base_meta, "document", texts)
    cache = EmbeddingCache(tmp_path / "emb")
    # an earlier driver was killed after committing its first shard: rows [0, 128) hold a sentinel (zeros)
    # that only survives if the Ray run resumes from the progress record instead of re-encoding them
    with pytest.raises(KeyboardInterrupt), cache.writer(key, len(texts), 384, "float32") as entry:
        entry.array[:128] = 0.0
        entry.commit(128)
        raise KeyboardInterrupt
    on_ray = encode_on_ray(texts, {"device": "cpu"}, cache, key, "float32", actors=2, shard_rows=64,
                           show_progress=False)
    assert (tmp_path / "emb" / f"{key}.npy").is_file() and on_ray.shape == (len(texts), 384)
    local = SteerEncoder(device="cpu", cache_dir=tmp_path / "emb", backbone=encoder.backbone)
    assert local.cache.get(key, rows=len(texts)) is not None  # the local encoder finds Ray's entry
    reference = encoder.embed(texts, PromptType.document)
    assert not np.asarray(on_ray[:128]).any()  # resumed: the committed rows were not encoded again
    np.testing.assert_allclose(np.asarray(on_ray[128:]), reference[128:], atol=1e-5)


def _descendant_servers() -> list[int]:
    """PIDs of llama.cpp servers anywhere below this process (the Ray workers' embedded servers)."""
    parent: dict[int, int] = {}
    servers = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if b"llama_cpp.server" in (proc / "cmdline").read_bytes():
                    servers.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue

    def below_us(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return [pid for pid in servers if below_us(pid)]


@pytest.mark.llm
@pytest.mark.slow
def test_ray_embedded_replicas_one_killed_cover_every_passage_like_one_process(local_ray, passages, tmp_path):
    from mteb_steer.steering.llm_server import LocalServerConfig

    server = LocalServerConfig(model_path=str(smollm2_gguf()), alias="smollm2-135m", n_ctx=1024, n_threads=1)
    subset = passages[:12]
    one = generate(subset, CONFIG, tmp_path / "one", server=server, show_progress=False)
    cache_dir = tmp_path / "ray"
    killed: list[int] = []

    def kill_one_replica() -> None:
        while _entries(cache_dir) < 3 or len(_descendant_servers()) < 2:  # both replicas up, some work done
            time.sleep(0.2)
        pid = _descendant_servers()[0]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    threading.Thread(target=kill_one_replica, daemon=True).start()
    report = generate_on_ray(subset, CONFIG, cache_dir, RayPlan(workers=2, batch_size=2), server=server,
                             show_progress=False)
    assert killed, "the run ended before a replica was killed: the test proved nothing"
    assert report.failures == {} and report.generated == len(subset) and report.rerouted >= 1
    assert export_bank(subset, CONFIG, cache_dir, tmp_path / "r.jsonl", server) == \
        export_bank(subset, CONFIG, tmp_path / "one", tmp_path / "o.jsonl", server) == one.bank
    again = generate_on_ray(subset, CONFIG, cache_dir, RayPlan(workers=2), server=server, show_progress=False)
    assert again.requests == 0 and again.cached == len(subset) and not _descendant_servers()


@pytest.mark.slow
def test_cli_encode_on_ray_is_reused_by_a_local_evaluation(scifact_slice, tmp_path):
    """`encode --engine ray` fills the cache; `evaluate` then encodes only the queries (one new file)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cache = tmp_path / "emb"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mteb_steer.cli", *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=900)

    encoded = cli("encode", "-t", str(scifact_slice), "--engine", "ray", "--ray-workers", "2", "--device", "cpu",
                  "--embedding-cache", str(cache))
    assert encoded.returncode == 0, encoded.stderr[-2000:]
    corpus_files = set(cache.glob("*.npy"))
    assert len(corpus_files) == 1 and str(next(iter(corpus_files))) in encoded.stdout
    evaluated = cli("evaluate", "-t", str(scifact_slice), "--device", "cpu", "--embedding-cache", str(cache),
                    "--output-folder", str(tmp_path / "out"))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    new = set(cache.glob("*.npy")) - corpus_files
    assert len(new) == 1 and np.load(next(iter(new))).shape[0] == 40  # the 40 queries; the corpus came from Ray
