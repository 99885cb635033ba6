"""Query banks: JSONL(.gz) round trips, the real arguana-genq folder, and clear errors on bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mteb_steer.beir import read_jsonl
from mteb_steer.steering.banks import (
    BankError,
    bank_fingerprint,
    bank_stats,
    load_bank,
    load_bank_metadata,
    save_bank,
)

query_text = st.text(min_size=1, max_size=30).filter(lambda s: s.strip())
banks = st.dictionaries(st.text(min_size=1, max_size=12), st.lists(query_text, max_size=4), max_size=8)


@settings(max_examples=40, deadline=None)
@given(bank=banks, gz=st.booleans())
def test_round_trip_keeps_ids_queries_and_order(tmp_path_factory, bank, gz):
    path = tmp_path_factory.mktemp("bank") / ("b.jsonl.gz" if gz else "b.jsonl")
    save_bank(bank, path, metadata={"generator": "test", "n": 3})
    loaded = load_bank(path)
    assert loaded == bank
    assert list(loaded) == list(bank)
    assert load_bank_metadata(path) == ({"generator": "test", "n": 3})
    assert bank_fingerprint(loaded) == bank_fingerprint(bank)


def test_gz_suffix_really_gzips(tmp_path):
    save_bank({"d1": ["what is x"]}, tmp_path / "b.jsonl.gz")
    with gzip.open(tmp_path / "b.jsonl.gz", "rt") as fh:
        assert json.loads(fh.readline()) == {"id": "d1", "queries": ["what is x"]}
    save_bank({"d1": ["what is x"]}, tmp_path / "b.jsonl")
    assert json.loads((tmp_path / "b.jsonl").read_text()) == {"id": "d1", "queries": ["what is x"]}
    assert load_bank_metadata(tmp_path / "b.jsonl") == {}


def test_metadata_is_read_from_the_first_line_only(tmp_path):
    """Learning how a bank was made must not parse the whole bank: a broken later line is load_bank's
    error, not load_bank_metadata's; a broken first line is still named."""
    path = tmp_path / "b.jsonl.gz"
    save_bank({"d1": ["what is x"]}, path, metadata={"generator": "g"})
    with gzip.open(path, "at", encoding="utf-8") as fh:
        fh.write("not json\n")
    assert load_bank_metadata(path) == {"generator": "g"}
    with pytest.raises(BankError, match=r"b.jsonl.gz:3: not valid JSON"):
        load_bank(path)
    (tmp_path / "bad.jsonl").write_text("\n{oops\n")
    with pytest.raises(BankError, match=r"bad.jsonl:2: not valid JSON"):
        load_bank_metadata(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    assert load_bank_metadata(tmp_path / "empty.jsonl") == {}


def test_fingerprint_sees_content_and_order():
    base = {"a": ["q1", "q2"], "b": []}
    assert bank_fingerprint(base) != bank_fingerprint({"a": ["q2", "q1"], "b": []})
    assert bank_fingerprint(base) != bank_fingerprint({"a": ["q1", "q2"]})
    assert bank_fingerprint(base) == bank_fingerprint({"b": [], "a": ["q1", "q2"]})  # id order is not content


def _genq_slice(source: Path, target: Path, n_queries: int) -> dict[str, list[str]]:
    """A real slice of the published folder (first n generated queries) and the bank it should give."""
    (target / "qrels").mkdir(parents=True)
    rows = (source / "qrels" / "train.tsv").read_text().splitlines()
    kept = rows[1:n_queries + 1]
    (target / "qrels" / "train.tsv").write_text("\n".join([rows[0], *kept]) + "\n")
    wanted = {line.split("\t")[0]: line.split("\t")[1] for line in kept}
    texts = {r["_id"]: r["text"] for r in read_jsonl(source / "queries.jsonl.gz") if r["_id"] in wanted}
    with gzip.open(target / "queries.jsonl.gz", "wt") as fh:
        for qid in wanted:
            fh.write(json.dumps({"_id": qid, "text": texts[qid]}) + "\n")
    expected: dict[str, list[str]] = {}
    for qid, doc in wanted.items():
        expected.setdefault(doc, []).append(texts[qid])
    return expected


def test_reads_a_real_genq_slice(data_root, tmp_path):
    expected = _genq_slice(data_root / "arguana-genq", tmp_path / "genq", 300)
    bank = load_bank(tmp_path / "genq")
    assert bank == expected
    assert bank["test-environment-aeghhgwpe-pro02b"][0] == "is it better to be a vegan or vegetarian?"
    assert bank_stats(bank)["queries"] == 300


def test_reads_the_published_folder(data_root):
    bank = load_bank(data_root / "arguana-genq")
    assert bank_stats(bank) == {"passages": 8674, "queries": 25844, "empty_passages": 0}


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(("lines", "message"), [
    (['{"id": "a", "queries": ["q"]}', "{not json"], r"b\.jsonl:2: not valid JSON"),
    (['{"id": "a", "queries": ["q"]}', '{"id": "a", "queries": ["r"]}'], r"b\.jsonl:2: duplicate passage id 'a'"),
    (['{"id": "a", "query": ["q"]}'], r"b\.jsonl:1: expected keys 'id' and 'queries'"),
    (['{"id": "a", "queries": "q"}'], r"b\.jsonl:1: 'queries' must be a list of strings"),
    (['{"id": "a", "queries": ["ok", "  "]}'], r"b\.jsonl:1: empty query string"),
    (['["a", ["q"]]'], r"b\.jsonl:1: expected an object"),
    (['{"id": "a", "queries": ["q"]}', '{"metadata": {"x": 1}}'], r"b\.jsonl:2: a metadata line may only be the first"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, lines, message):
    path = _write(tmp_path / "b.jsonl", lines)
    with pytest.raises(BankError, match=message):
        load_bank(path)


def test_missing_and_unreadable_inputs(tmp_path):
    with pytest.raises(BankError, match="does not exist"):
        load_bank(tmp_path / "nope.jsonl")
    (tmp_path / "fake.jsonl.gz").write_text("not gzip")
    with pytest.raises(BankError, match=r"fake\.jsonl\.gz: cannot read"):
        load_bank(tmp_path / "fake.jsonl.gz")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(BankError, match="not a generated-queries folder: .*missing queries.jsonl"):
        load_bank(tmp_path / "empty_dir")


def test_genq_folder_with_dangling_query_id(data_root, tmp_path):
    _genq_slice(data_root / "arguana-genq", tmp_path / "genq", 5)
    with (tmp_path / "genq" / "qrels" / "train.tsv").open("a") as fh:
        fh.write("genQ999999\tsome-doc\t1\n")
    with pytest.raises(BankError, match="query id 'genQ999999' is absent from queries.jsonl.gz"):
        load_bank(tmp_path / "genq")


def test_save_rejects_bad_banks_and_never_leaves_partial_files(tmp_path):
    path = tmp_path / "b.jsonl.gz"
    save_bank({"a": ["q"]}, path)
    with pytest.raises(BankError, match=r"passage 'b'.*list of strings"):
        save_bank({"a": ["q"], "b": ["ok", 3]}, path)
    with pytest.raises(BankError, match="passage 'c'.*empty query"):
        save_bank({"c": [""]}, path)
    with pytest.raises(TypeError):  # not JSON-able metadata fails mid-write: old file stays, no temp left
        save_bank({"a": ["new"]}, path, metadata={"x": object()})
    assert load_bank(path) == {"a": ["q"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.jsonl.gz"]
