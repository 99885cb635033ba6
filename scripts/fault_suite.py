"""Fault suite: run the package the way a user would, break it on purpose, and record what they see.

Every scenario is a callable taking a fresh work folder and returning one record:
`{"scenario", "user_sees", "exit_code", "requests_sent", "lost"}`. This file holds the process,
data and flag faults; the LLM endpoint faults come from `scripts/fault_suite_llm.py` (`SCENARIOS`)
when it is present. The CLI runs as a subprocess (`python -m mteb_steer.cli`) on tiny BEIR folders
cut from the real SciFact, so each scenario takes seconds. Writes the raw records to
`results/reliability/faults.json` and the table to `RELIABILITY.md`.

    python scripts/fault_suite.py                  # every scenario (a few minutes on 2 cores)
    python scripts/fault_suite.py --only flag       # scenarios whose name contains "flag"
    python benchmark.py --faults                    # the same as the first line
    python scripts/fault_suite.py --table-only      # rewrite RELIABILITY.md from the JSON records
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from mteb_steer.beir import write_beir_slice  # noqa: E402

FAULTS_JSON = REPO / "results" / "reliability" / "faults.json"
FAULTS_LLM_JSON = REPO / "results" / "reliability" / "faults_llm.json"  # written by fault_suite_llm.py alone
RELIABILITY_MD = REPO / "RELIABILITY.md"
Record = dict[str, object]
Scenario = Callable[[Path], Record]


def data_root() -> Path:
    """The shared BEIR copies (`$MTEB_STEER_DATA_ROOT`, else ../shared/datasets beside the repository)."""
    env = os.environ.get("MTEB_STEER_DATA_ROOT")
    return Path(env) if env else REPO.parent / "shared" / "datasets"


def tiny_task(work: Path, name: str = "tiny", *, n_queries: int = 5, n_docs: int = 60, split: str = "test") -> Path:
    """A real SciFact slice: `n_queries` queries of `split`, their passages and `n_docs` more."""
    return write_beir_slice(data_root() / "scifact", work / name, split, n_queries, n_docs)


# -- running the CLI --------------------------------------------------------------------------------
@dataclass
class Run:
    exit_code: int | None  # None: killed by the suite
    stderr: str
    stdout: str
    seconds: float


def _env(work: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "MTEB_STEER_EMBEDDING_CACHE": str(work / "embeddings"), "MTEB_STEER_DATA_ROOT": str(data_root())}


def _command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "mteb_steer.cli", *args]


def cli(work: Path, *args: str, timeout: float = 600) -> Run:
    """Run `mteb-steer ARGS` to the end."""
    started = time.perf_counter()
    proc = subprocess.run(_command(list(args)), cwd=work, env=_env(work), capture_output=True, text=True,
                          timeout=timeout)
    return Run(proc.returncode, proc.stderr, proc.stdout, time.perf_counter() - started)


def cli_killed_when(work: Path, args: list[str], ready: Callable[[str], bool], *, timeout: float = 600) -> Run:
    """Run `mteb-steer ARGS` and `kill -9` it as soon as `ready(stderr so far)` holds."""
    log = work / f"stderr-{time.monotonic_ns()}.log"
    started = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(_command(args), cwd=work, env=_env(work), stdout=subprocess.PIPE, stderr=err,
                                text=True)
        killed = False
        while proc.poll() is None and time.perf_counter() - started < timeout:
            if ready(log.read_text(errors="replace")):
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.05)
        stdout = proc.communicate()[0]
    return Run(None if killed else proc.returncode, log.read_text(errors="replace"), stdout,
               time.perf_counter() - started)


def user_line(run: Run) -> str:
    """What the user is told: the error line, else the last line of output (a traceback is flagged)."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]", run.stderr) if ln.strip()]
    prefix = "TRACEBACK: " if "Traceback (most recent call last)" in run.stderr else ""
    errors = [ln for ln in lines if "error:" in ln]
    out = run.stdout.strip().splitlines()
    if errors:
        line = errors[-1]
    elif run.exit_code == 0 and out:  # a finished run's own last word, not a progress bar's
        line = out[-1]
    elif lines:
        line = lines[-1]
    else:
        line = out[-1] if out else ""
    return prefix + line[:300]


def warning_line(run: Run, needle: str) -> str:
    return next((ln.strip() for ln in run.stderr.splitlines() if needle in ln), "")


def cache_files(work: Path) -> set[str]:
    """Finished entries of the base-embedding cache (`<key>.npy`; not the partial, progress or lock files)."""
    folder = work / "embeddings"
    return {p.name for p in folder.glob("*.npy") if "." not in p.stem} if folder.is_dir() else set()


def result_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.json") if p.is_file())


def unreadable(files: list[Path]) -> list[str]:
    """Result files that are not whole JSON."""
    bad = []
    for path in files:
        try:
            json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad.append(path.name)
    return bad


def record(scenario: str, run: Run | None, *, user_sees: str | None = None, requests_sent: object = "n/a",
           lost: str = "nothing") -> Record:
    return {"scenario": scenario, "user_sees": user_sees if user_sees is not None else user_line(run),
            "exit_code": None if run is None else run.exit_code, "requests_sent": requests_sent, "lost": lost}


# -- process faults --------------------------------------------------------------------------------
_ENCODED = re.compile(r"encoding documents:.*?\|\s*(\d+)/(\d+)")


def encoded_rows(stderr: str) -> list[int]:
    """The corpus progress bar's counts, in order (the first is where the run started or resumed)."""
    return [int(m.group(1)) for m in _ENCODED.finditer(stderr.replace("\r", "\n"))]


def kill_during_corpus_encoding(work: Path) -> Record:
    """kill -9 once the first block of the corpus is in the embedding cache; rerun; rerun again.

    The corpus is a little larger than one encoding block, so the killed run has committed one block
    and the rerun should encode only the rest: what it repeats is read off its bar's starting point.
    """
    from mteb_steer.encoder import ENCODE_CHUNK

    task = tiny_task(work, n_docs=ENCODE_CHUNK + 100)
    passages = sum(1 for _ in gzip.open(task / "corpus.jsonl.gz", "rt"))
    args = ["evaluate", "-t", str(task), "--output-folder", str(work / "out"), "--batch-size", "32"]
    killed = cli_killed_when(work, args, lambda err: any(encoded_rows(err)), timeout=3600)  # a block: minutes on a busy CPU
    if killed.exit_code is not None:
        return record("kill -9 during corpus encoding, then rerun", killed,
                      lost="kill came too late: run finished before a block was committed")
    committed = max(encoded_rows(killed.stderr))
    rerun = cli(work, *args)
    resumed_at = (encoded_rows(rerun.stderr) or [0])[0]
    third = cli(work, *args)
    files = result_files(work / "out" / "results")
    return record(
        "kill -9 during corpus encoding, then rerun", rerun,
        user_sees=f"killed run: {committed} of {passages} passages committed to the embedding cache; rerun: exit "
                  f"{rerun.exit_code}, its bar starts at {resumed_at}/{passages} and encodes {passages - resumed_at} "
                  f"passages ({rerun.seconds:.0f} s); third run: 'cached' in {third.seconds:.0f} s",
        lost=f"passages encoded again after the kill: {committed - resumed_at} committed ones, plus the block in "
             f"flight at the kill (at most {ENCODE_CHUNK}); results: none lost "
             f"({len(unreadable(files))} unreadable result files)")


def kill_during_adapter_training(work: Path) -> Record:
    """kill -9 as training starts (its pair vectors are encoded and cached by then); rerun; no half adapter left."""
    task = tiny_task(work, n_queries=80, n_docs=0, split="train")
    out = work / "adapter"
    args = ["train-adapter", "--data", str(task), "--split", "train", "--out", str(out), "--epochs", "30"]
    killed = cli_killed_when(work, args, lambda err: "adapter mnrl:" in err)  # the training bar has appeared
    half = out.exists() and any(out.iterdir())
    before = cache_files(work)
    rerun = cli(work, *args)
    encoded = cache_files(work) - before
    return record(
        "kill -9 during adapter training, then rerun", rerun,
        user_sees=f"killed run: {'a partial adapter folder' if half else 'no adapter folder'} left; rerun: exit "
                  f"{rerun.exit_code}, {len(encoded)} new text sets encoded, {user_line(rerun)}",
        lost=("kill came too late: training had finished" if killed.exit_code is not None else
              "the epochs trained before the kill (training restarts; its pair embeddings come from the cache)"
              if not encoded else f"epochs before the kill, and {len(encoded)} text sets re-encoded"))


def kill_during_result_writing(work: Path, attempts: int = 3) -> Record:
    """kill -9 at staggered moments of an evaluation whose vectors are cached (so writing is a large share)."""
    task = tiny_task(work)
    args = ["evaluate", "-t", str(task), "--output-folder", str(work / "out"), "--overwrite"]
    cli(work, *args)  # fills the embedding cache
    warm = cli(work, *args)  # how long a run from cached vectors takes: the kills aim at its last part
    torn, leftovers, landed = [], [], 0
    for i in range(attempts):
        delay = warm.seconds * (0.85 + 0.14 * i / max(1, attempts - 1))
        started = time.perf_counter()
        killed = cli_killed_when(work, args, lambda err, s=started, d=delay: time.perf_counter() - s >= d)
        landed += killed.exit_code is None
        files = result_files(work / "out" / "results")
        torn += unreadable(files)
        leftovers += [p.name for p in (work / "out").rglob("*.tmp")]
    rerun = cli(work, "evaluate", "-t", str(task), "--output-folder", str(work / "out"))
    return record(
        f"kill -9 during result writing ({attempts} kills at 85-99% of a {warm.seconds:.0f} s run), then rerun", rerun,
        user_sees=f"kills that landed before the run ended: {landed} of {attempts}; half-written result files read "
                  f"back: {len(torn)}; leftover temp files: {len(set(leftovers))}; rerun: exit {rerun.exit_code}",
        lost="nothing (results are written to a temp file and renamed)" if not torn else f"torn files: {torn}")


def two_evaluations_same_folder(work: Path) -> Record:
    """Two evaluate processes on one task and one output folder at the same time."""
    task = tiny_task(work)
    args = ["evaluate", "-t", str(task), "--output-folder", str(work / "out")]
    procs = [subprocess.Popen(_command(args), cwd=work, env=_env(work), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    files = result_files(work / "out" / "results")
    codes = [p.returncode for p in procs]
    tracebacks = sum("Traceback" in err for _, err in outs)
    return {"scenario": "two evaluations writing the same results folder at once",
            "user_sees": f"exit codes {codes}; tracebacks: {tracebacks}; result files: {len(files)}, "
                         f"unreadable: {len(unreadable(files))}",
            "exit_code": max(codes), "requests_sent": "n/a",
            "lost": "nothing; both processes encode the corpus (no cross-process lock), the last rename wins "
                    "with the same scores"}


# -- data faults -----------------------------------------------------------------------------------
def unknown_task_name(work: Path) -> Record:
    run = cli(work, "evaluate", "-t", "SciFcat", "--output-folder", str(work / "out"))
    return record("task name that does not exist (typo)", run)


def hub_task_offline(work: Path) -> Record:
    run = cli(work, "evaluate", "-t", "NFCorpus", "--output-folder", str(work / "out"))
    return record(f"MTEB hub task offline (NFCorpus, HF_HUB_OFFLINE=1; {run.seconds:.0f} s to the message)", run)


def hub_model_offline(work: Path) -> Record:
    task = tiny_task(work)
    run = cli(work, "evaluate", "-t", str(task), "-m", "BAAI/bge-small-en-v1.5", "--output-folder", str(work / "out"))
    return record(f"hub model offline (BAAI/bge-small-en-v1.5; {run.seconds:.0f} s to the message)", run)


def not_a_beir_folder(work: Path) -> Record:
    folder = work / "notbeir"
    folder.mkdir()
    (folder / "data.csv").write_text("id,text\n1,hello\n")
    return record("a folder that is not BEIR", cli(work, "evaluate", "-t", str(folder)))


def corpus_line_not_json(work: Path) -> Record:
    task = tiny_task(work)
    rows = gzip.open(task / "corpus.jsonl.gz", "rt").read().splitlines()
    rows.insert(7, '{"_id": "broken", "text": "no closing brace"')
    (task / "corpus.jsonl.gz").unlink()
    (task / "corpus.jsonl").write_text("\n".join(rows) + "\n")
    return record("a corpus line that is not JSON", cli(work, "evaluate", "-t", str(task)))


def empty_corpus(work: Path) -> Record:
    task = tiny_task(work)
    (task / "corpus.jsonl.gz").unlink()
    (task / "corpus.jsonl").write_text("")
    return record("an empty corpus", cli(work, "evaluate", "-t", str(task)))


def qrels_unknown_ids(work: Path) -> Record:
    task = tiny_task(work)
    qrels = task / "qrels" / "test.tsv"
    lines = qrels.read_text().splitlines()
    qid = lines[1].split("\t")[0]
    qrels.write_text("\n".join([*lines, f"{qid}\tno-such-doc-1\t1", f"{qid}\tno-such-doc-2\t1"]) + "\n")
    run = cli(work, "evaluate", "-t", str(task), "--output-folder", str(work / "out"))
    return record("qrels naming documents absent from the corpus (2 rows)", run,
                  user_sees=f"{warning_line(run, 'absent from the corpus')[:220]} (then the scores)",
                  lost="nothing (warned, evaluated)")


def bank_for_another_corpus(work: Path) -> Record:
    task = tiny_task(work)
    bank = work / "bank.jsonl"
    bank.write_text("".join(json.dumps({"id": f"other-{i}", "queries": ["what is x?"]}) + "\n" for i in range(20)))
    run = cli(work, "evaluate", "-t", str(task), "--query-bank", str(bank), "--fusion", "mean",
              "--output-folder", str(work / "out"))
    return record("a query bank made for another corpus", run)


def bank_broken_line(work: Path) -> Record:
    task = tiny_task(work)
    bank = work / "bank.jsonl"
    bank.write_text(json.dumps({"id": "1", "queries": ["a"]}) + "\n" + '{"id": "2", "queries": [\n')
    run = cli(work, "evaluate", "-t", str(task), "--query-bank", str(bank), "--fusion", "mean",
              "--output-folder", str(work / "out"))
    return record("a query bank with a broken line", run)


@contextlib.contextmanager
def read_only_folder(folder: Path) -> Iterator[bool]:
    """`folder`, made read-only for this process (chattr +i as root, chmod otherwise); yields success."""
    folder.mkdir(parents=True, exist_ok=True)
    as_root = os.geteuid() == 0
    if as_root:
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    else:
        folder.chmod(0o555)
        done = True
    try:
        yield done
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        else:
            folder.chmod(0o755)


def read_only_output_folder(work: Path) -> Record:
    task = tiny_task(work)
    with read_only_folder(work / "ro") as done:
        if not done:
            return {"scenario": "read-only output folder", "user_sees": "not measured (cannot make a folder "
                    "read-only here)", "exit_code": None, "requests_sent": "n/a", "lost": "n/a"}
        run = cli(work, "evaluate", "-t", str(task), "--output-folder", str(work / "ro"))
    return record("read-only output folder", run)


def read_only_embedding_cache(work: Path) -> Record:
    task = tiny_task(work)
    with read_only_folder(work / "rocache") as done:
        if not done:
            return {"scenario": "read-only embedding cache folder", "user_sees": "not measured", "exit_code": None,
                    "requests_sent": "n/a", "lost": "n/a"}
        run = cli(work, "evaluate", "-t", str(task), "--embedding-cache", str(work / "rocache"),
                  "--output-folder", str(work / "out"))
    return record("read-only embedding cache folder", run)


def full_output_folder(work: Path) -> Record:
    """The output folder on a 16 KiB file system: room for the write probe, not for the result file."""
    task = tiny_task(work)
    disk = work / "full"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)], capture_output=True).returncode:
        return {"scenario": "full output folder (disk full while writing the result)",
                "user_sees": "not measured (mounting a small file system needs root)", "exit_code": None,
                "requests_sent": "n/a", "lost": "n/a"}
    try:
        run = cli(work, "evaluate", "-t", str(task), "--output-folder", str(disk))
        torn = unreadable(result_files(disk))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
    return record("full output folder (disk full while writing the result)", run,
                  lost=f"the run's scores (rerun after freeing space); torn result files left: {len(torn)}")


def corrupt_result_json(work: Path) -> Record:
    task = tiny_task(work)
    args = ["evaluate", "-t", str(task), "--output-folder", str(work / "out")]
    first = cli(work, *args)
    files = [p for p in result_files(work / "out" / "results") if p.name.startswith("LocalTiny")]
    if first.exit_code != 0 or not files:
        return record("corrupt result JSON already present", first, lost="setup failed")
    text = files[0].read_text()
    files[0].write_text(text[: len(text) // 2])
    run = cli(work, *args)
    fixed = cli(work, *args, "--overwrite")
    return record("corrupt result JSON already present (truncated), then --overwrite", run,
                  user_sees=f"{user_line(run)} | with --overwrite: exit {fixed.exit_code}",
                  lost="nothing (the torn file is named, --overwrite recomputes it)")


# -- flag faults -----------------------------------------------------------------------------------
def _flag_scenario(title: str, *flags: str) -> Scenario:
    def scenario(work: Path) -> Record:
        run = cli(work, "evaluate", "-t", "SciFact", *flags)
        return record(f"flags: {title} ({' '.join(flags)})", run,
                      user_sees=f"{user_line(run)} [{run.seconds:.1f} s, no data loaded]")
    scenario.__name__ = "flag_" + re.sub(r"\W+", "_", title).strip("_")
    return scenario


FLAG_SCENARIOS = [
    _flag_scenario("strength out of range", "--fusion", "mean", "--alpha", "1.5"),
    _flag_scenario("strength not numeric", "--fusion", "sum", "--beta", "strong"),
    _flag_scenario("lexical weight out of range", "--lexical", "bm25", "--lexical-weight", "2"),
    _flag_scenario("lexical weight not numeric", "--lexical", "bm25", "--lexical-weight", "nan"),
    _flag_scenario("unknown fusion mode", "--fusion", "median"),
    _flag_scenario("unknown lexical mode", "--lexical", "tfidf"),
    _flag_scenario("strength of another fusion", "--fusion", "mean", "--beta", "0.1"),
    _flag_scenario("query bank without a step that uses it", "--query-bank", "bank.jsonl"),
    _flag_scenario("lexical weight without --lexical", "--lexical-weight", "0.3"),
    _flag_scenario("refinement option without a teacher", "--refine-steps", "10"),
]

SCENARIOS: list[Scenario] = [  # quickest first
    *FLAG_SCENARIOS, unknown_task_name, hub_task_offline, hub_model_offline, not_a_beir_folder,
    corpus_line_not_json, empty_corpus, bank_broken_line, read_only_output_folder, read_only_embedding_cache,
    bank_for_another_corpus, qrels_unknown_ids, corrupt_result_json, full_output_folder,
    kill_during_adapter_training,
    kill_during_corpus_encoding, kill_during_result_writing, two_evaluations_same_folder,
]


def llm_scenarios() -> list[Scenario]:
    """The LLM side's scenarios (`scripts/fault_suite_llm.py`), [] where that file is absent."""
    try:
        from fault_suite_llm import SCENARIOS as LLM_SCENARIOS
    except ModuleNotFoundError as err:
        if err.name != "fault_suite_llm":
            raise
        return []
    return list(LLM_SCENARIOS)


def run_scenarios(scenarios: list[Scenario], keep: Path | None = None,
                  on_record: Callable[[Record], None] | None = None) -> list[Record]:
    """Run each scenario in its own fresh folder; a scenario that crashes is recorded, not fatal.

    `on_record` sees each record as soon as it exists (the suite files it at once: a stopped run keeps it).
    """
    records = []
    with tempfile.TemporaryDirectory(prefix="mteb-steer-faults-") as tmp:
        base = keep or Path(tmp)
        for i, scenario in enumerate(scenarios):
            work = base / f"{i:02d}-{scenario.__name__}"
            work.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            try:
                rec = scenario(work)
            except Exception as err:  # the suite reports a broken scenario instead of stopping
                rec = {"scenario": scenario.__name__, "user_sees": f"SCENARIO FAILED: {type(err).__name__}: {err}",
                       "exit_code": None, "requests_sent": "n/a", "lost": "n/a"}
            rec["id"] = scenario.__name__
            rec["seconds"] = round(time.perf_counter() - started, 1)
            print(f"[{i + 1}/{len(scenarios)}] {rec['scenario']}: exit {rec['exit_code']} ({rec['seconds']} s)",
                  flush=True)
            records.append(rec)
            if on_record is not None:
                on_record(rec)
            if keep is None:
                shutil.rmtree(work, ignore_errors=True)
    return records


def markdown(records: list[Record], command: str, llm_records: list[Record] | None = None) -> str:
    """RELIABILITY.md: the table, and how it was made; `llm_records`: the LLM side's own run, when it
    was not part of this one."""
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    def rows(recs: list[Record]) -> list[str]:
        return ["| scenario | what the user sees | exit | requests | passages / results lost | s |",
                "|---|---|---:|---:|---|---:|"] + [
            "| " + " | ".join(cell(rec.get(k, "")) for k in
                              ("scenario", "user_sees", "exit_code", "requests_sent", "lost", "seconds")) + " |"
            for rec in recs]

    lines = ["# Reliability: what a user sees when things go wrong", "",
             f"Generated by `{command}` from `results/reliability/faults.json` (raw records). Each scenario runs "
             "the CLI as a user would (a subprocess, `HF_HUB_OFFLINE=1`) on tiny BEIR folders cut from the real "
             "SciFact. `exit`: the process's exit code (2 = a user error, reported in one line; `None` = the "
             "suite did not run the CLI to an end). `requests`: LLM requests sent (n/a where no LLM is "
             "involved). Every scenario also has a test (`tests/test_faults.py`, `tests/test_fault_suite_llm.py`). "
             "Seconds include Python start-up and imports, which dominate the short scenarios on a busy machine.",
             "", *rows(records)]
    if llm_records:
        lines += ["", "## LLM endpoint faults", "",
                  "Recorded by `python scripts/fault_suite_llm.py results/reliability/faults_llm.json` (its own run; "
                  "`python scripts/fault_suite.py` runs these scenarios too when the file is present).", "",
                  *rows(llm_records)]
    return "\n".join(lines) + "\n"


def llm_records_on_file(records: list[Record]) -> list[Record] | None:
    """The LLM side's recorded run, unless this run already holds its scenarios."""
    ids = {str(rec.get("id")) for rec in records}
    if any(s.__name__ in ids for s in llm_scenarios()) or not FAULTS_LLM_JSON.exists():
        return None
    return json.loads(FAULTS_LLM_JSON.read_text())["records"]  # fault_suite_llm.py writes {command, records}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=None, help="run scenarios whose function name contains one")
    parser.add_argument("--json", default=str(FAULTS_JSON), help="raw records (default results/reliability/)")
    parser.add_argument("--markdown", default=str(RELIABILITY_MD), help="the table (default RELIABILITY.md)")
    parser.add_argument("--keep", default=None, help="keep the scenarios' work folders here")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: rewrite the markdown from the JSON records (and faults_llm.json)")
    args = parser.parse_args(argv)
    scenarios = [s for s in [*SCENARIOS, *llm_scenarios()]
                 if not args.only or any(o in s.__name__ for o in args.only)]
    if not scenarios:
        parser.error(f"no scenario matches {args.only}")
    json_path, md_path = Path(args.json), Path(args.markdown)
    # a partial run (--only) replaces its scenarios' records and keeps the others; a full run starts afresh
    kept = json.loads(json_path.read_text()) if args.only and json_path.exists() else []

    def file_record(rec: Record) -> None:
        nonlocal kept
        kept = [old for old in kept if old.get("id") != rec["id"]] + [rec]
        order = {s.__name__: i for i, s in enumerate([*SCENARIOS, *llm_scenarios()])}
        kept.sort(key=lambda r: order.get(str(r.get("id")), len(order)))
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(kept, indent=1) + "\n")
        md_path.write_text(markdown(kept, "python scripts/fault_suite.py", llm_records_on_file(kept)))

    if args.table_only:
        kept = json.loads(json_path.read_text())
        md_path.write_text(markdown(kept, "python scripts/fault_suite.py", llm_records_on_file(kept)))
        print(f"{md_path} from {json_path}")
        return 0
    run_scenarios(scenarios, Path(args.keep) if args.keep else None, on_record=file_record)
    print(f"{len(kept)} scenarios -> {json_path}, {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
