"""Tag sources: the noun-phrase chunker (and its documented limits) and vocabulary files."""

import pytest

from blip3.core.errors import UserError
from blip3.datagen.tags import MAX_PHRASE_WORDS, load_vocab, noun_phrases


@pytest.mark.parametrize(
    "caption, phrases",
    [
        ("This image showcases a football player in action on a green field.",
         ["football player", "action", "green field"]),
        ("A man rides a horse next to two dogs and a red fire hydrant.", ["man", "horse", "dogs", "red fire hydrant"]),
        ("A group of people standing in front of a tall building.", ["people", "tall building"]),
        ("The man's hat is on the wooden table, while a cat grabs the toy.",
         ["man", "hat", "wooden table", "cat", "toy"]),
        ("Two dogs play in the snow near 3 trees; two dogs again.", ["dogs", "snow", "trees"]),
        ("", []),
        (None, []),
    ],
)
def test_noun_phrases(caption, phrases):
    assert noun_phrases(caption) == phrases


def test_documented_limits():
    # a verb missing from the list stays inside the phrase
    assert noun_phrases("a dog naps") == ["dog naps"]
    # long runs keep their last words (the head noun and its nearest modifiers)
    assert noun_phrases("a big old rusty red metal bucket") == ["rusty red metal bucket"]
    assert len(noun_phrases("a big old rusty red metal bucket")[0].split()) == MAX_PHRASE_WORDS
    # no lemmatisation
    assert noun_phrases("cats") == ["cats"]


def test_vocab_file(tmp_path):
    f = tmp_path / "vocab.txt"
    f.write_text("# objects\ndog\nCat, traffic  light\n\ndog\n")
    assert load_vocab(f) == ["dog", "cat", "traffic light"]
    f.write_text("# only a comment\n")
    with pytest.raises(UserError, match="vocab.txt: --vocab: vocabulary file has no tags"):
        load_vocab(f)
    f.write_text("a.b\n")
    with pytest.raises(UserError, match="prompt separator"):
        load_vocab(f)
    with pytest.raises(UserError, match="not found"):
        load_vocab(tmp_path / "missing.txt")
