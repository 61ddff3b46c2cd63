"""proto/ has no breaking change against the last released schema (buf's WIRE_JSON rules)."""
from __future__ import annotations

import shutil

import pytest

from shared.contracts.buf import PROTO_ROOT, BufUnavailable, breaking_changes, ensure_buf

pytestmark = [pytest.mark.unit, pytest.mark.slow]  # slow only on the first run, which builds buf


@pytest.fixture(scope="module")
def buf():
    try:
        return ensure_buf()
    except BufUnavailable as error:
        pytest.skip(f"buf cannot be had here: {error}")


def test_schema_has_no_breaking_change_against_the_baseline(buf):
    assert breaking_changes(buf) == ""


def test_renumbering_a_field_is_caught(buf, tmp_path):
    copy = tmp_path / "proto"
    shutil.copytree(PROTO_ROOT, copy, ignore=shutil.ignore_patterns("baseline"))
    checkpoint = copy / "agentforge" / "v1" / "checkpoint.proto"
    text = checkpoint.read_text()
    assert "string sha256 = 2;" in text
    checkpoint.write_text(text.replace("string sha256 = 2;", "string sha256 = 20;"))
    found = breaking_changes(buf, copy)
    assert "sha256" in found and "checkpoint.proto" in found
