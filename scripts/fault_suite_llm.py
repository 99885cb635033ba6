"""LLM-side fault scenarios: the real `mteb-steer` CLI in subprocesses against a misbehaving endpoint.

Each scenario is a function `(workdir) -> record` with the keys `scenario`, `user_sees` (the one
line the user is left with), `exit_code`, `requests_sent` (counted on the server side, all runs of
the scenario together), `lost` (answers the endpoint delivered in full that are not in the cache
afterwards: finished work thrown away; after a kill -9 these are the answers in flight at the
kill), plus `seconds` and scenario details. The endpoint is
`tests/fault_stub.py` on a loopback port; the data are 25 real SciFact passages.
`scripts/fault_suite.py` (the framework) imports SCENARIOS; `python scripts/fault_suite_llm.py OUT.json`
runs them alone and writes the raw records.

Exit codes: 0 ok, 2 bad input, 3 the endpoint cannot serve the run, 4 passages got no queries.
"""

from __future__ import annotations

import ast
import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from fault_stub import FaultStub, fault_stub  # noqa: E402

N_PASSAGES = 25
MODEL = "stub-model"
SECRET = "sk-mtebsteer-RECOGNISABLE-7f3a9c"  # a key no real service issues: grep for it anywhere


def _data_root() -> Path:
    return Path(os.environ.get("MTEB_STEER_DATA_ROOT") or REPO.parent / "shared" / "datasets")


def tiny_scifact(workdir: Path) -> Path:
    """A BEIR folder of 25 real SciFact passages: 3 test queries, their relevant passages, then the first others."""
    from mteb_steer.beir import find_file, read_jsonl, read_qrels

    folder = workdir / "scifact25"
    if (folder / "corpus.jsonl.gz").exists():
        return folder
    source = _data_root() / "scifact"
    qrels = read_qrels(source / "qrels" / "test.tsv")
    qids = list(qrels)[:3]
    wanted = {d for q in qids for d in qrels[q]}
    rows = list(read_jsonl(find_file(source, "corpus")))
    corpus = [r for r in rows if r["_id"] in wanted]
    corpus += [r for r in rows if r["_id"] not in wanted][: N_PASSAGES - len(corpus)]
    (folder / "qrels").mkdir(parents=True)
    with gzip.open(folder / "corpus.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in corpus)
    queries = [r for r in read_jsonl(find_file(source, "queries")) if r["_id"] in set(qids)]
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    lines = [f"{q}\t{d}\t{s}\n" for q in qids for d, s in qrels[q].items()]
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(lines))
    return folder


def _env(key: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_BASE_URL", "OPENAI_API_KEY")}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if key:
        env["OPENAI_API_KEY"] = key
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from mteb_steer.cli import main; sys.exit(main())", *args]


def _generate_args(workdir: Path, url: str, *extra: str, cache: str = "cache", verbose: bool = False) -> list[str]:
    return _cli(*(["-v"] if verbose else []), "generate", "-t", str(tiny_scifact(workdir)), "--llm-base-url", url,
                "--llm-model", MODEL, "--cache-dir", str(workdir / cache), "--llm-timeout", "2", *extra)


def _start(args: list[str], key: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=REPO, env=_env(key), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(args: list[str], key: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=_env(key), capture_output=True, text=True, timeout=timeout)


def _last_line(proc: subprocess.CompletedProcess) -> str:
    """What the user is left with: the error line if any, else the last line of output (progress bars skipped)."""
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("mteb-steer: error")]
    if errors:
        return errors[-1]
    lines = [ln for ln in (proc.stdout + "\n" + proc.stderr).splitlines()
             if ln.strip() and "\r" not in ln and "generating queries" not in ln]
    return lines[-1] if lines else ""


def _cached(workdir: Path) -> int:
    """Query entries in the generation cache (claims of workers not counted)."""
    import diskcache

    from mteb_steer.steering.llm_cache import CLAIM_PREFIX

    if not (workdir / "cache" / "cache.db").exists():
        return 0
    with diskcache.Cache(str(workdir / "cache")) as cache:
        return sum(1 for key in cache.iterkeys() if not str(key).startswith(CLAIM_PREFIX))


def _summary(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    """The run's summary dict printed by `generate` (empty when it stopped before)."""
    for line in proc.stdout.splitlines():
        if line.startswith("{'passages_with_queries'"):
            return ast.literal_eval(line)
    return {}


def _record(name: str, proc: subprocess.CompletedProcess, stubs: list[FaultStub], workdir: Path, started: float,
            **extra: Any) -> dict[str, Any]:
    answered = sum(s.answered_ok for s in stubs)
    return {"scenario": name, "user_sees": _last_line(proc), "exit_code": proc.returncode,
            "requests_sent": sum(len(s.requests) for s in stubs), "lost": max(0, answered - _cached(workdir)),
            "cached_after": _cached(workdir), "passages": N_PASSAGES, "seconds": round(time.monotonic() - started, 1),
            **extra}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the scenarios ---------------------------------------------------------------------------------

def nothing_listening(workdir: Path) -> dict[str, Any]:
    started = time.monotonic()
    proc = _run(_generate_args(workdir, f"http://127.0.0.1:{_free_port()}/v1"))
    return _record("LLM endpoint: nothing listening", proc, [], workdir, started)


def _against_stub(workdir: Path, name: str, **stub_options: Any) -> dict[str, Any]:
    """One `generate` run against a stub set up with `stub_options`."""
    started = time.monotonic()
    with fault_stub(echo=True, **stub_options) as (url, stub):
        proc = _run(_generate_args(workdir, url))
    return _record(name, proc, [stub], workdir, started, **_retry_gaps(stub))


def _retry_gaps(stub: FaultStub) -> dict[str, float]:
    """The shortest wait before a passage's request was sent again (server side), when any was."""
    seen: dict[str, float] = {}
    gaps = []
    for body, at in zip(stub.requests, stub.times, strict=True):
        prompt = body.get("prompt", "")
        if prompt in seen:
            gaps.append(at - seen[prompt])
        seen[prompt] = at
    return {"shortest_wait_before_a_retry_s": round(min(gaps), 2)} if gaps else {}


def http_500(workdir: Path) -> dict[str, Any]:
    return _against_stub(workdir, "LLM endpoint: HTTP 500 on every request", default="500")


def http_429_retry_after(workdir: Path) -> dict[str, Any]:
    return _against_stub(workdir, "LLM endpoint: HTTP 429 with Retry-After: 1 (first 3 requests)",
                         script=["429:1"] * 3)


def http_429_no_retry_after(workdir: Path) -> dict[str, Any]:
    return _against_stub(workdir, "LLM endpoint: HTTP 429 without Retry-After (first 3 requests)", script=["429"] * 3)


def invalid_json(workdir: Path) -> dict[str, Any]:
    return _against_stub(workdir, "LLM endpoint: invalid JSON on every request", default="badjson")


def no_usable_queries(workdir: Path) -> dict[str, Any]:
    return _against_stub(workdir, "LLM endpoint: valid responses with no usable query", default="garbage")


def some_passages_fail_then_rerun(workdir: Path) -> dict[str, Any]:
    """2 passages get an unusable answer (no retries): exit 4, the rest kept; a rerun asks only for those 2."""
    started = time.monotonic()
    with fault_stub(script=["ok"] * 10 + ["garbage"] * 2, echo=True) as (url, first):
        proc = _run(_generate_args(workdir, url, "--llm-retries", "0"))
    with fault_stub(echo=True) as (url, second):
        rerun = _run(_generate_args(workdir, url))
    return _record("2 of 25 passages get no usable query, then rerun", proc, [first, second], workdir, started,
                   rerun_exit_code=rerun.returncode, rerun_requests=len(second.requests),
                   rerun_user_sees=_last_line(rerun))


def timeout_everything(workdir: Path) -> dict[str, Any]:
    return _against_stub(workdir, "LLM endpoint: accepts connections, never answers (--llm-timeout 2)",
                         default="stall", health="stall", stall_s=30.0)


def timeout_completions(workdir: Path) -> dict[str, Any]:
    return _against_stub(workdir, "LLM endpoint: health check ok, completions never answer (--llm-timeout 2)",
                         default="stall", stall_s=30.0)


def endpoint_dies_mid_run(workdir: Path) -> dict[str, Any]:
    started = time.monotonic()
    with fault_stub(die_after=10, echo=True) as (url, stub):
        proc = _run(_generate_args(workdir, url))
    cached = _cached(workdir)
    with fault_stub(echo=True) as (url, again):
        rerun = _run(_generate_args(workdir, url))
    return _record("LLM endpoint dies after 10 requests, then rerun", proc, [stub, again], workdir, started,
                   cached_when_it_died=cached, rerun_exit_code=rerun.returncode, rerun_requests=len(again.requests))


def wrong_key(workdir: Path) -> dict[str, Any]:
    started = time.monotonic()
    with fault_stub(key="sk-the-right-key", echo=True) as (url, stub):
        proc = _run(_generate_args(workdir, url), key=SECRET)
    return _record("LLM endpoint: wrong API key (401)", proc, [stub], workdir, started,
                   key_in_output=SECRET in proc.stdout + proc.stderr, health_checks=stub.health_checks)


def kill9_then_rerun(workdir: Path) -> dict[str, Any]:
    """SIGKILL once 8 answers arrived; the rerun must ask only for passages the cache does not hold."""
    started = time.monotonic()
    with fault_stub(delay_s=0.3, echo=True) as (url, stub):
        proc = _start(_generate_args(workdir, url))
        deadline = time.monotonic() + 120
        while stub.answered_ok < 8 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = subprocess.CompletedProcess(proc.args, proc.returncode, "", "")
        cached = _cached(workdir)
        first_requests = len(stub.requests)
        rerun = _run(_generate_args(workdir, url))
    rerun_requests = len(stub.requests) - first_requests
    record = _record("kill -9 during generation, then rerun", killed, [stub], workdir, started,
                     cached_at_kill=cached, rerun_exit_code=rerun.returncode, rerun_requests=rerun_requests,
                     repeated_for_finished=max(0, rerun_requests - (N_PASSAGES - cached)))
    record["user_sees"] = f"(killed) then: {_last_line(rerun)}"
    return record


def two_processes_one_cache(workdir: Path) -> dict[str, Any]:
    started = time.monotonic()
    with fault_stub(delay_s=0.4, echo=True) as (url, stub):
        procs = [_start(_generate_args(workdir, url)) for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
    done = [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs, strict=True)]
    summaries = [_summary(d) for d in done]
    record = _record("two generate processes on one cache at once", done[0], [stub], workdir, started,
                     exit_codes=[d.returncode for d in done],
                     generated_by_each=[s.get("generated") for s in summaries],
                     from_other_worker=[s.get("from_other_workers") for s in summaries])
    record["exit_code"] = max(d.returncode for d in done)
    return record


def evaluate_with_failed_passages(workdir: Path) -> dict[str, Any]:
    """`evaluate --fusion mean` over a bank with gaps: refused (exit 4, no result); allowed: a `partial` revision;
    then a healthy rerun retries the gaps and files a new revision (it does not read the partial one back)."""
    started = time.monotonic()
    out = workdir / "out"

    def evaluate(url: str, *extra: str) -> subprocess.CompletedProcess:
        return _run(_cli("evaluate", "-t", str(tiny_scifact(workdir)), "--fusion", "mean", "--alpha", "0.5",
                         "--llm-base-url", url, "--llm-model", MODEL, "--cache-dir", str(workdir / "cache"),
                         "--llm-retries", "0", "--llm-timeout", "5", "--output-folder", str(out),
                         "--embedding-cache", str(workdir / "emb"), *extra))

    def result_files() -> list[str]:  # task results, not the sidecars written beside them
        sidecars = {"model_meta.json", "steer_config.json", "steer_fit.json"}
        return sorted(str(p.relative_to(out)) for p in out.rglob("*.json") if p.name not in sidecars)

    with fault_stub(script=["ok"] * 20 + ["garbage"] * 2, echo=True) as (url, first):
        refused = evaluate(url)
        files_after_refusal = result_files()
    with fault_stub(script=["garbage"] * 2, echo=True) as (url, second):
        partial = evaluate(url, "--allow-failed-passages")
    with fault_stub(echo=True) as (url, third):
        healthy = evaluate(url)
    revisions = [re.search(r"model: (\S+) @ (\S+)", p.stderr) for p in (partial, healthy)]
    record = _record("evaluate --fusion mean with 2 failed passages: refused / allowed / healthy rerun", refused,
                     [first, second, third], workdir, started,
                     result_files_after_refusal=files_after_refusal,
                     allowed_exit_code=partial.returncode,
                     allowed_model=revisions[0].group(1) if revisions[0] else None,
                     healthy_exit_code=healthy.returncode,
                     healthy_model=revisions[1].group(1) if revisions[1] else None,
                     healthy_revision_differs=bool(revisions[0] and revisions[1]
                                                   and revisions[0].group(2) != revisions[1].group(2)),
                     healthy_reused_a_result="cached" in healthy.stdout,
                     healthy_requests=len(third.requests))
    return record


def secret_never_written(workdir: Path) -> dict[str, Any]:
    """generate + export + evaluate with a recognisable key: grep every file written and all output for it."""
    started = time.monotonic()
    folder = tiny_scifact(workdir)
    with fault_stub(key=SECRET, echo=True) as (url, stub):
        export = ("--export", str(workdir / "bank.jsonl.gz"))
        runs = [_run(_generate_args(workdir, url, *export, verbose=True), key=SECRET),
                _run(_cli("-v", "evaluate", "-t", str(folder), "--fusion", "mean", "--alpha", "0.5", "--llm-base-url",
                          url, "--llm-model", MODEL, "--cache-dir", str(workdir / "cache"), "--output-folder",
                          str(workdir / "out"), "--embedding-cache", str(workdir / "emb")), key=SECRET)]
    with fault_stub(key="sk-another-key", echo=True) as (url, rejecting):  # the key in a 401 the server echoes
        runs.append(_run(_generate_args(workdir, url, cache="cache-401", verbose=True), key=SECRET))
    files = [p for p in workdir.rglob("*") if p.is_file() and p.parent != folder and folder not in p.parents]
    holding = [str(p.relative_to(workdir)) for p in files if SECRET.encode() in _read_all(p)]
    output_hits = sum(SECRET in r.stdout + r.stderr for r in runs)
    record = _record("API key never written (generate, export, evaluate, 401)", runs[-1], [stub, rejecting], workdir,
                     started, exit_codes=[r.returncode for r in runs], files_checked=len(files),
                     files_holding_key=holding, outputs_holding_key=output_hits, key_was_sent=stub.auth.count(
                         f"Bearer {SECRET}"))
    record["user_sees"] = f"key found in {len(holding)} of {len(files)} files and {output_hits} of {len(runs)} outputs"
    return record


def _read_all(path: Path) -> bytes:
    blob = path.read_bytes()
    if path.suffix == ".gz":
        blob += gzip.decompress(blob)
    return blob


SCENARIOS: list[Callable[[Path], dict[str, Any]]] = [
    nothing_listening, http_500, http_429_retry_after, http_429_no_retry_after, invalid_json, no_usable_queries,
    some_passages_fail_then_rerun, timeout_everything, timeout_completions, endpoint_dies_mid_run, wrong_key,
    kill9_then_rerun, two_processes_one_cache, evaluate_with_failed_passages, secret_never_written,
]


def main(argv: list[str]) -> int:
    """`fault_suite_llm.py [OUT.json] [SCENARIO ...]`: run all (or the named) scenarios; named ones replace
    their records in an existing OUT.json."""
    import tempfile

    out = Path(argv[0]) if argv else REPO / "results" / "reliability" / "faults_llm.json"
    chosen = [s for s in SCENARIOS if not argv[1:] or s.__name__ in argv[1:]]
    old = json.loads(out.read_text())["records"] if out.exists() and argv[1:] else []
    records = {r["function"]: r for r in old}
    for scenario in chosen:
        with tempfile.TemporaryDirectory(prefix="fault-") as tmp:
            record = {"function": scenario.__name__, **scenario(Path(tmp))}
        print(json.dumps(record), flush=True)
        records[scenario.__name__] = record
    ordered = [records[s.__name__] for s in SCENARIOS if s.__name__ in records]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python scripts/fault_suite_llm.py", "records": ordered}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
