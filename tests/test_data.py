"""Data sources (mirror first, hub fallback, offline refusal), WikiText rows, token blocks, splits."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from ast_core import data
from ast_core.data import (DataSourceError, data_mirror, describe_source, load_texts, sha256_file,
                           split_blocks, tokenize_blocks, token_dtype, wikitext2_eval_text,
                           wikitext2_rows, wikitext_articles)

WIKI_TEST_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"


class FakeDatasets(types.ModuleType):
    """Stands in for the ``datasets`` package: records calls, returns canned rows or raises."""

    def __init__(self, rows=None) -> None:
        super().__init__("datasets")
        self.calls: list[tuple[tuple, dict]] = []
        self.rows = rows

    def load_dataset(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.rows is None:
            raise AssertionError("datasets.load_dataset must not be called")
        return self.rows


@pytest.fixture
def fake_datasets(monkeypatch: pytest.MonkeyPatch) -> FakeDatasets:
    fake = FakeDatasets()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    return fake


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in data.OFFLINE_ENVS:
        monkeypatch.delenv(key, raising=False)


# ----------------------------------------------------------------------------- mirror + WikiText

def test_default_mirror_is_shared_data_next_to_repo(monkeypatch, shared_data):
    monkeypatch.delenv(data.MIRROR_ENV, raising=False)
    assert data_mirror().resolve() == shared_data.resolve()
    monkeypatch.setenv(data.MIRROR_ENV, "/somewhere/else")
    assert data_mirror() == Path("/somewhere/else")


def test_wikitext2_test_rows_rebuilt_from_mirror_match_hf_layout(shared_data, fake_datasets, wikitext_test_text):
    rows = wikitext2_rows("test")
    assert len(rows) == 4358
    assert rows[:3] == ["", " = Robert Boulter = \n", ""]
    assert all(r == "" or (r.endswith("\n") and r.strip()) for r in rows)
    text = wikitext2_eval_text("test")
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film , television")
    assert text == wikitext_test_text
    assert fake_datasets.calls == []


def test_wikitext2_validation_rows_and_split_alias(shared_data, fake_datasets):
    rows = wikitext2_rows("valid")
    assert len(rows) == 3760 and rows[1] == " = Homarus gammarus = \n"
    assert rows == wikitext2_rows("validation")


def test_wikitext_articles_rejoin_exactly_to_eval_text(shared_data, fake_datasets):
    for split, n_articles in (("test", 60), ("validation", 60)):
        rows = wikitext2_rows(split)
        articles = wikitext_articles(rows)
        assert len(articles) == n_articles
        assert "\n\n".join(articles) == "\n\n".join(rows)
    test_articles = load_texts("wikitext2", "test")
    assert test_articles[0].startswith("\n\n = Robert Boulter = \n")
    assert test_articles[1].startswith(" = Du Fu = \n")
    # an equation line " = 1 henry ... = " inside "Constant k filter" does not start an article
    assert sum(" = Constant k filter = \n" in a for a in test_articles) == 1
    assert any("= 1 henry and capacitance C =" in a and " = Constant k filter = " in a for a in test_articles)
    assert load_texts("wikitext2", "test", max_docs=2) == test_articles[:2]


def test_c4_reads_1000_docs_from_mirror_and_never_calls_the_hub(shared_data, fake_datasets, online):
    docs = load_texts("c4")
    assert len(docs) == 1000
    assert docs[0].startswith("Beginners BBQ Class Taking Place in Missoula!")
    assert load_texts("c4", max_docs=5) == docs[:5]
    news = load_texts("c4-realnewslike", "train")
    assert len(news) == 1000 and news[0].startswith("After the martyrdom of St. Boniface")
    assert fake_datasets.calls == []


def test_mirror_env_override_is_read_first(tmp_path, monkeypatch, fake_datasets):
    (tmp_path / "c4").mkdir()
    rec = [{"text": "first doc", "url": "u"}, {"text": "second doc", "url": "v"}]
    (tmp_path / "c4" / "c4-en-train.00000-of-01024.first1000.jsonl").write_text(
        "\n".join(json.dumps(r) for r in rec) + "\n")
    monkeypatch.setenv(data.MIRROR_ENV, str(tmp_path))
    assert load_texts("c4") == ["first doc", "second doc"]
    assert describe_source("c4")["sha256"] == sha256_file(tmp_path / "c4" / "c4-en-train.00000-of-01024.first1000.jsonl")


# ----------------------------------------------------------------------------- hub fallback / offline

def test_offline_source_absent_from_mirror_is_a_clear_error_without_download(shared_data, fake_datasets,
                                                                               monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataSourceError) as err:
        load_texts("wikitext2", "train")
    msg = str(err.value)
    assert "'wikitext2'" in msg and "'train'" in msg and str(shared_data) in msg
    assert "wikitext/wikitext-2-raw-v1" in msg
    with pytest.raises(DataSourceError, match="'c4'.*'validation'"):
        load_texts("c4", "validation")
    assert fake_datasets.calls == []


def test_hub_offline_flag_alone_also_blocks(monkeypatch, fake_datasets, online):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataSourceError, match="'someone/corpus'"):
        load_texts("someone/corpus")
    assert fake_datasets.calls == []


def test_online_fallback_loads_missing_split_from_hub_with_exact_names(monkeypatch, shared_data, online):
    rows = ["", " = A = \n", "", " text a \n", "", " = B = \n", "", " text b \n", ""]
    fake = FakeDatasets([{"text": r} for r in rows])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    articles = load_texts("wikitext2", "train")
    assert fake.calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "train", "streaming": False})]
    assert articles == ["\n\n = A = \n\n\n\n\n text a \n\n\n", " = B = \n\n\n\n\n text b \n\n\n"]


def test_online_c4_validation_is_streamed_and_limited(monkeypatch, online):
    def endless():
        i = 0
        while True:
            yield {"text": f"doc {i}"}
            i += 1
    fake = FakeDatasets(endless())
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_texts("c4", "validation", max_docs=3) == ["doc 0", "doc 1", "doc 2"]
    assert fake.calls == [(("allenai/c4", "en"), {"split": "validation", "streaming": True})]


def test_hub_failure_is_reported_with_the_source_name(monkeypatch, online):
    fake = FakeDatasets()
    fake.load_dataset = lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("no such dataset"))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataSourceError, match="'nosuch:cfg'.*nosuch/cfg.*no such dataset"):
        load_texts("nosuch:cfg")


# ----------------------------------------------------------------------------- local paths

def test_local_jsonl_txt_gz_and_directory(tmp_path, fake_datasets):
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"text": "alpha", "x": 1}\n\n{"text": "beta"}\n')
    txt = tmp_path / "b.txt"
    txt.write_text("whole file\nis one document\n")
    gz = tmp_path / "c.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write('{"body": "gamma"}\n')
    (tmp_path / "ignored.csv").write_text("x,y\n")
    assert load_texts(str(jl)) == ["alpha", "beta"]
    assert load_texts(str(txt)) == ["whole file\nis one document\n"]
    assert load_texts(str(gz), text_field="body") == ["gamma"]
    sub = tmp_path / "dir"
    sub.mkdir()
    for f in (jl, txt):
        (sub / f.name).write_bytes(f.read_bytes())
    assert load_texts(str(sub)) == ["alpha", "beta", "whole file\nis one document\n"]
    assert load_texts(str(sub), max_docs=1) == ["alpha"]
    assert fake_datasets.calls == []


def test_missing_local_path_names_it(tmp_path, fake_datasets):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataSourceError, match=re.escape(f"local data path not found: {missing}")):
        load_texts(str(missing))
    with pytest.raises(DataSourceError, match="nope/deep/file"):
        describe_source("./nope/deep/file")
    assert fake_datasets.calls == []


def test_bad_jsonl_line_reports_file_and_line_number(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "ok too"}\n{"text": broken}\n')
    with pytest.raises(DataSourceError, match=re.escape(f"{f}:3: not valid JSON")):
        load_texts(str(f))
    g = tmp_path / "nofield.jsonl"
    g.write_text('{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(DataSourceError, match=re.escape(f"{g}:2: ") + ".*'text'"):
        load_texts(str(g))


def test_empty_files_are_errors_naming_them(tmp_path):
    for name, content in (("empty.txt", ""), ("blank.raw", " \n\n"), ("empty.jsonl", "\n\n")):
        f = tmp_path / name
        f.write_text(content)
        with pytest.raises(DataSourceError, match=re.escape(f"{f} is empty")):
            load_texts(str(f))
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(DataSourceError, match=re.escape(str(empty_dir))):
        load_texts(str(empty_dir))


def test_describe_source_gives_sha256_for_local_and_mirror_and_hub_name(tmp_path, shared_data, monkeypatch):
    f = tmp_path / "x.txt"
    f.write_bytes(b"hello world\n")
    desc = describe_source(str(f))
    assert desc["kind"] == "local" and desc["sha256"] == hashlib.sha256(b"hello world\n").hexdigest()
    mirror = describe_source("wikitext2", "test")
    assert mirror["kind"] == "mirror" and mirror["sha256"] == WIKI_TEST_SHA256
    assert describe_source("wikitext2", "train") == {"source": "wikitext2", "split": "train", "kind": "hub",
                                                     "hub": "wikitext/wikitext-2-raw-v1"}
    d1 = describe_source(str(tmp_path))["sha256"]
    (tmp_path / "y.txt").write_text("more")
    assert describe_source(str(tmp_path))["sha256"] != d1


# ----------------------------------------------------------------------------- token blocks

def test_tokenize_blocks_is_the_eos_joined_stream_cut_into_blocks(smollm2_tokenizer):
    tok = smollm2_tokenizer
    docs = ["The quick brown fox jumps over the lazy dog.", "Second document, a little longer than one word.",
            "Third."] * 5
    blocks = tokenize_blocks(docs, tok, seq_len=16)
    stream = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert blocks.dtype == np.uint16 and blocks.shape == (len(stream) // 16, 16)
    assert blocks.reshape(-1).tolist() == stream[: blocks.size]
    assert np.array_equal(blocks, tokenize_blocks(docs, tok, seq_len=16, batch_docs=4))
    no_eos = tokenize_blocks(docs, tok, seq_len=16, add_eos=False)
    assert tok.eos_token_id not in no_eos


def test_tokenize_blocks_too_short_says_how_many_tokens(smollm2_tokenizer):
    n = len(smollm2_tokenizer("Hello world", add_special_tokens=False)["input_ids"]) + 1
    with pytest.raises(ValueError, match=rf"{n} tokens from 1 documents, need at least seq_len=512"):
        tokenize_blocks(["Hello world"], smollm2_tokenizer, seq_len=512)


def test_token_dtype_widens_for_large_vocabularies():
    class BigVocab:
        eos_token_id = 70_000

        def __len__(self) -> int:
            return 70_001

        def __call__(self, texts, **kwargs):
            return {"input_ids": [[65_536 + len(t)] * 3 for t in texts]}

    blocks = tokenize_blocks(["ab", "abc"], BigVocab(), seq_len=4)
    assert token_dtype(BigVocab()) == np.uint32 and blocks.dtype == np.uint32
    assert blocks.tolist() == [[65_538, 65_538, 65_538, 70_000], [65_539, 65_539, 65_539, 70_000]]


def test_split_blocks_is_deterministic_disjoint_and_calib_comes_from_train():
    blocks = np.arange(50 * 4, dtype=np.uint16).reshape(50, 4)
    train, val, calib = split_blocks(blocks, val_fraction=0.1, calib_n=8, seed=3)
    assert train.shape == (45, 4) and val.shape == (5, 4) and calib.shape == (8, 4)
    ids = lambda a: set(a[:, 0].tolist())  # noqa: E731
    assert ids(train) | ids(val) == ids(blocks) and not ids(train) & ids(val)
    assert ids(calib) <= ids(train)
    assert np.all(np.diff(train[:, 0].astype(int)) > 0)  # train keeps source order
    again = split_blocks(blocks, n_val=5, calib_n=8, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, calib), again))
    assert not np.array_equal(val, split_blocks(blocks, n_val=5, seed=4)[1])
    assert split_blocks(blocks, val_fraction=0.001)[1].shape == (1, 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(val_fraction=0.1, n_val=2), "not both"),
    (dict(n_val=10), "at least one"),
    (dict(n_val=2, calib_n=9), "calib_n=9"),
    (dict(val_fraction=1.0), "val_fraction"),
])
def test_split_blocks_rejects_impossible_splits(kwargs, match):
    with pytest.raises(ValueError, match=match):
        split_blocks(np.zeros((10, 4), dtype=np.uint16), **kwargs)
