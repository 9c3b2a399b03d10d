"""Grounding captions: the corners of the rules in `datagen.grounding_captions` that mutation
testing found unguarded (round trips, the user's choices, tie-breaks, separators)."""

import dataclasses

import pytest

from blip3.core.errors import UserError
from blip3.datagen.grounding_captions import (
    GroundedObject,
    build_captions,
    check_caption_choice,
    inline_caption,
    location_text,
    no_objects_caption,
    normalize_box,
    parse_textual_tags,
    pick_caption,
    reading_order,
    tag_caption,
)


def test_object_round_trips_through_its_dict():
    o = GroundedObject("cup", (0.1, 0.2, 0.3, 0.4), 0.123456)
    d = o.to_dict()
    assert d == {"label": "cup", "bbox": [0.1, 0.2, 0.3, 0.4], "score": 0.1235}
    assert GroundedObject.from_dict(d) == GroundedObject("cup", (0.1, 0.2, 0.3, 0.4), 0.1235)
    # annotations without a score are certain
    assert GroundedObject.from_dict({"label": 7, "bbox": ["0.5", 0, 1, 1]}) == GroundedObject("7", (0.5, 0.0, 1.0, 1.0), 1.0)


def test_objects_are_values():
    """Frozen: an object stored in a sample's metadata cannot be changed behind the caption built from it."""
    o = GroundedObject("cup", (0.1, 0.2, 0.3, 0.4))
    assert o.score == 1.0 and o.to_dict()["score"] == 1.0  # an object without a score is certain
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.label = "mug"
    assert len({o, GroundedObject("cup", (0.1, 0.2, 0.3, 0.4))}) == 1


def test_normalize_box_refuses_empty_sizes_and_clamps_both_axes():
    for w, h in [(0, 10), (10, 0), (-1, 10), (10, -1)]:
        with pytest.raises(ValueError, match="positive"):
            normalize_box(0, 0, 1, 1, w, h)
    assert normalize_box(1, 1, 1, 1, 1, 1) == (1.0, 1.0, 1.0, 1.0)  # a 1x1 image is fine
    assert normalize_box(50, 900, 10, -5, 100, 300) == (0.1, 0.0, 0.5, 1.0)
    assert normalize_box(10, 30, 20, 60, 100, 300) == (0.1, 0.1, 0.2, 0.2)  # x by width, y by height


def test_location_text_refuses_unknown_formats():
    with pytest.raises(ValueError, match="unknown grounding format"):
        location_text((0, 0, 1, 1), "json")


def test_no_objects_caption_without_lead_in():
    assert no_objects_caption() == "The image contains no objects"
    assert no_objects_caption("", "detector") == "No objects"
    assert no_objects_caption("", "reading") == "No objects."
    assert no_objects_caption("Here:", "reading") == "Here: no objects."
    assert tag_caption([GroundedObject("a", (0, 0, 0.1, 0.1))], "positional", lead_in="", order="reading") == (
        "a (at the top left corner).")


def test_reading_order_ties():
    # same row and centre x: higher centre first, then label, then the higher score
    low = GroundedObject("b", (0.4, 0.1, 0.6, 0.3))
    high = GroundedObject("b", (0.4, 0.0, 0.6, 0.2))
    assert reading_order([low, high]) == [high, low]
    a, b = GroundedObject("b", (0, 0, 0.1, 0.1)), GroundedObject("a", (0, 0, 0.1, 0.1))
    assert reading_order([a, b]) == [b, a]
    weak, strong = GroundedObject("a", (0, 0, 0.1, 0.1), 0.2), GroundedObject("a", (0, 0, 0.1, 0.1), 0.9)
    assert reading_order([weak, strong]) == [strong, weak]
    # row first: a box further left but one row lower comes after
    assert reading_order([GroundedObject("x", (0, 0.4, 0.1, 0.6)), GroundedObject("y", (0.9, 0, 1, 0.1))])[0].label == "y"


def test_inline_separators_close_the_caption():
    board = GroundedObject("surfboard", (0.0, 0.8, 0.2, 1.0))
    tail = "The image also contains surfboard (at the bottom left corner)."
    assert inline_caption("Wow!", [board], "positional") == f"Wow! {tail}"
    assert inline_caption("Really?  ", [board], "positional") == f"Really? {tail}"
    assert inline_caption("A beach", [board], "positional") == f"A beach. {tail}"
    assert inline_caption("", [board], "positional") == tail


def test_inline_adjacent_phrases_both_ground():
    """Spans that touch (one ends where the next starts) do not overlap."""
    a = GroundedObject("red", (0.0, 0.0, 0.1, 0.1))
    b = GroundedObject("car", (0.9, 0.9, 1.0, 1.0))
    out = inline_caption("red car", [a, b], "bbox")
    assert out == ("<object>red</object><bbox>[0.000, 0.000][0.100, 0.100]</bbox> "
                   "<object>car</object><bbox>[0.900, 0.900][1.000, 1.000]</bbox>")


def test_inline_touching_phrases_both_ground():
    """A span that ends exactly where a claimed one starts (or starts where it ends) is free."""
    left, right = GroundedObject("a-", (0.0, 0.0, 0.1, 0.1)), GroundedObject("-bc", (0.9, 0.9, 1.0, 1.0))
    assert inline_caption("a--bc", [left, right], "positional") == (
        "a- (at the top left corner)-bc (at the bottom right corner)")
    left, right = GroundedObject("ab-", (0.0, 0.0, 0.1, 0.1)), GroundedObject("-c", (0.9, 0.9, 1.0, 1.0))
    assert inline_caption("ab--c", [left, right], "positional") == (
        "ab- (at the top left corner)-c (at the bottom right corner)")


def test_inline_plural_es_and_spaced_words():
    box = GroundedObject("bus", (0.4, 0.4, 0.6, 0.6))
    assert inline_caption("Two buses.", [box], "positional") == "Two buses (in the center)."
    fp = GroundedObject("football player", (0.4, 0.4, 0.6, 0.6))
    assert inline_caption("a football\nplayer", [fp], "positional") == "a football player (in the center)"


def test_build_captions_ignores_a_blank_source_caption():
    o = GroundedObject("cup", (0.4, 0.4, 0.6, 0.6))
    assert [c["style"] for c in build_captions([o], "   ")] == ["tags"] * 3
    assert build_captions([o], "  a cup  ")[3]["text"] == "a cup (in the center)"
    caps = build_captions([o], None, lead_in="Seen:")
    assert caps[0]["text"] == "Seen: cup (in the center)"
    assert build_captions([], None, lead_in="")[0]["text"] == "No objects"


def test_pick_caption_prefers_the_style_then_tags_and_may_find_none():
    caps = [{"format": "bbox", "style": "tags", "text": "t"}, {"format": "bbox", "style": "inline", "text": "i"}]
    assert pick_caption(caps, "bbox", None)["text"] == "i"
    assert pick_caption(caps, "bbox", "tags")["text"] == "t"
    assert pick_caption(caps[:1], "bbox", "inline")["text"] == "t"
    assert pick_caption(caps, "textual", None) is None


def test_check_caption_choice_names_the_bad_option():
    check_caption_choice("bbox", None)
    check_caption_choice("textual", "tags", "reading")
    for args, field in [(("bbox", None, "size"), "--tag-order"), (("json", None), "--caption-format"),
                        (("bbox", "list"), "--caption-style")]:
        with pytest.raises(UserError) as e:
            check_caption_choice(*args)
        assert field in str(e.value)


def test_parse_textual_tags_reads_labels_between_objects():
    text = ("Seen: garment (starts at [0.5, 0.6] and extends up to [0.9, 1]), and neckband (starts at "
            "[0.4, 0.1] and extends up to [0.6, 0.3]); (starts at [0, 0] and extends up to [1, 1])")
    objs = parse_textual_tags(text, lead_in="Seen:")
    assert [(o.label, o.bbox) for o in objs] == [("garment", (0.5, 0.6, 0.9, 1.0)), ("neckband", (0.4, 0.1, 0.6, 0.3))]
    # without the lead-in the first label keeps its words
    assert parse_textual_tags("A cup (starts at [0, 0] and extends up to [1, 1])", lead_in="")[0].label == "A cup"
    # a first label without the lead-in keeps all its words
    assert parse_textual_tags("A cup (starts at [0, 0] and extends up to [1, 1])")[0].label == "A cup"
    # the lead-in is only stripped from the first label
    two = "The image contains x (starts at [0, 0] and extends up to [1, 1]) The image contains y (starts at [0, 0] and extends up to [1, 1])"
    assert [o.label for o in parse_textual_tags(two)] == ["x", "The image contains y"]
