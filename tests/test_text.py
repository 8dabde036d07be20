"""Tokenizer and vocabulary: what every caption goes through before a model sees it."""

from __future__ import annotations

import json
from pathlib import Path

from captioner.readers import read_corpus
from captioner.text import END_ID, PAD_ID, SPECIAL_TOKENS, START_ID, UNK_ID, Vocabulary, tokenize


def test_tokenize_lowercases_and_drops_punctuation() -> None:
    assert tokenize("A dog's ball, in the PARK!") == ["a", "dog", "s", "ball", "in", "the", "park"]
    assert tokenize("Two  men\tplay 3 games.") == ["two", "men", "play", "3", "games"]
    assert tokenize("Café au lait") == ["café", "au", "lait"]
    assert tokenize(" ... ") == []


def test_build_keeps_words_at_min_count_sorted_by_count() -> None:
    captions = [["a", "dog"], ["a", "cat"], ["a", "dog", "runs"]]
    vocabulary = Vocabulary.build(captions, min_count=2)
    assert vocabulary.words == [*SPECIAL_TOKENS, "a", "dog"]
    assert len(Vocabulary.build(captions, min_count=1)) == len(SPECIAL_TOKENS) + 4


def test_encode_decode_round_trip_with_unknown_words() -> None:
    vocabulary = Vocabulary.build([["a", "dog"], ["a", "dog"]], min_count=1)
    ids = vocabulary.encode(["a", "zebra", "dog"])
    assert ids == [START_ID, vocabulary.index["a"], UNK_ID, vocabulary.index["dog"], END_ID]
    assert vocabulary.decode(ids + [PAD_ID, PAD_ID]) == ["a", "<unk>", "dog"]
    assert vocabulary.encode(["a", "dog", "a"], max_length=2)[-1] == END_ID
    assert len(vocabulary.encode(["a", "dog", "a"], max_length=2)) == 4


def test_saved_as_plain_json_in_id_order(tmp_path: Path) -> None:
    vocabulary = Vocabulary.build([["ünïcode", "word"], ["word"]], min_count=1)
    vocabulary.save(tmp_path / "vocab.json")
    saved = json.loads((tmp_path / "vocab.json").read_text("utf-8"))
    assert Vocabulary(saved["words"]).index == vocabulary.index


def test_vocabulary_is_built_from_the_train_split_only(tmp_path: Path) -> None:
    text = (
        "image,caption,split\n"
        "a.jpg,a dog runs,train\n"
        "a.jpg,a dog sits,train\n"
        "b.jpg,a zebra zebra zebra,test\n"
        "c.jpg,a giraffe giraffe,val\n"
    )
    (tmp_path / "c.csv").write_text(text)
    corpus = read_corpus([tmp_path / "c.csv"])
    vocabulary = Vocabulary.build(corpus.tokens_of_split("train"), min_count=1)
    assert set(vocabulary.words) - set(SPECIAL_TOKENS) == {"a", "dog", "runs", "sits"}
