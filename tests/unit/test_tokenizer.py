"""The byte-level BPE: deterministic, lossless on any text, digits one per token, saved and reloaded as-is."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from shared.tokenizer import EOS_TOKEN, PAD_TOKEN, train_tokenizer

pytestmark = pytest.mark.unit

CORPUS = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "12 + 345 = 357\n", "use the calculator: 12 times 4 ? <calc>12*4</calc>\n",
    "Ann has 3 apples. Then Ann buys 2 more. How many apples does Ann have now? 5\n",
] * 40


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, 600, 64)


def test_same_corpus_gives_the_same_tokenizer(tokenizer):
    again = train_tokenizer(CORPUS, 600, 64)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_special_tokens_are_distinct_and_set(tokenizer):
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert len(tokenizer) <= 600


def test_any_text_round_trips_even_unseen_bytes(tokenizer):
    text = "Zoë's naïve café — 東京 🎭\ttabs\n\nand 9876543210"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_digits_are_one_token_each(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("345")["input_ids"])
    assert tokens == ["3", "4", "5"]


def test_encoding_adds_no_special_tokens(tokenizer):
    ids = tokenizer("to be")["input_ids"]
    assert tokenizer.eos_token_id not in ids and tokenizer.pad_token_id not in ids


def test_save_and_reload_encodes_identically(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = CORPUS[0] + CORPUS[2]
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (reloaded.eos_token_id, reloaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_too_small_a_vocabulary_is_refused():
    with pytest.raises(ValueError, match="below the minimum"):
        train_tokenizer(CORPUS, 300, 64)
