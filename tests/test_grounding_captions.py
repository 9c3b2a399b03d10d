"""Grounding caption formats and insertion, against strings computed by hand."""

import pytest

from blip3.datagen.grounding_captions import (
    GroundedObject,
    build_captions,
    format_object,
    inline_caption,
    normalize_box,
    pick_caption,
    position_words,
    tag_caption,
)

GARMENT = GroundedObject("garment", (0.512, 0.604, 0.990, 0.998), 0.9)


@pytest.mark.parametrize(
    "fmt, expected",
    [
        ("positional", "garment (at the bottom right corner)"),
        ("textual", "garment (starts at [0.512, 0.604] and extends up to [0.990, 0.998])"),
        ("bbox", "<object>garment</object><bbox>[0.512, 0.604][0.990, 0.998]</bbox>"),
    ],
)
def test_spec_table(fmt, expected):
    assert format_object(GARMENT, fmt) == expected


def test_textual_pads_to_three_decimals():
    o = GroundedObject("sky", (0.0, 0.0, 1.0, 0.25))
    assert format_object(o, "textual") == "sky (starts at [0.000, 0.000] and extends up to [1.000, 0.250])"


@pytest.mark.parametrize(
    "bbox, words",
    [
        ((0.0, 0.0, 0.2, 0.2), "at the top left corner"),
        ((0.4, 0.0, 0.6, 0.2), "above the center"),
        ((0.8, 0.0, 1.0, 0.2), "at the top right corner"),
        ((0.0, 0.4, 0.2, 0.6), "to the left of the center"),
        ((0.4, 0.4, 0.6, 0.6), "in the center"),
        ((0.8, 0.4, 1.0, 0.6), "to the right of the center"),
        ((0.0, 0.8, 0.2, 1.0), "at the bottom left corner"),
        ((0.4, 0.8, 0.6, 1.0), "below the center"),
        ((0.8, 0.8, 1.0, 1.0), "at the bottom right corner"),
        # cell borders: centre x 0.333 -> left, 0.3335 -> middle, 0.6665 -> middle, 0.667 -> right
        ((0.0, 0.4, 0.666, 0.6), "to the left of the center"),
        ((0.0, 0.4, 0.667, 0.6), "in the center"),
        ((0.333, 0.4, 1.0, 0.6), "in the center"),
        ((0.334, 0.4, 1.0, 0.6), "to the right of the center"),
        # same borders on y
        ((0.4, 0.0, 0.6, 0.666), "above the center"),
        ((0.4, 0.0, 0.6, 0.667), "in the center"),
        ((0.4, 0.333, 0.6, 1.0), "in the center"),
        ((0.4, 0.334, 0.6, 1.0), "below the center"),
        # the whole image is in the center
        ((0.0, 0.0, 1.0, 1.0), "in the center"),
    ],
)
def test_grid_words_and_borders(bbox, words):
    assert position_words(bbox) == words


def test_normalize_box_clamps_orders_rounds():
    assert normalize_box(-10, 50, 700, 20, 640, 480) == (0.0, 0.042, 1.0, 0.104)
    with pytest.raises(ValueError):
        normalize_box(0, 0, 1, 1, 0, 10)


def test_tag_caption_default_is_the_papers_form():
    """Fig. 4 of the paper: objects in detector order, no final period."""
    neck = GroundedObject("neckband", (0.4, 0.1, 0.6, 0.3))
    assert tag_caption([GARMENT, neck], "positional") == (
        "The image contains garment (at the bottom right corner), neckband (above the center)"
    )
    assert tag_caption([neck], "bbox", lead_in="") == "<object>neckband</object><bbox>[0.400, 0.100][0.600, 0.300]</bbox>"
    assert build_captions([GARMENT, neck], None)[0]["text"] == tag_caption([GARMENT, neck], "positional")
    assert tag_caption([], "textual") == ""
    with pytest.raises(ValueError):
        tag_caption([neck], "textual", order="size")


def test_tag_caption_reading_order_option():
    neck = GroundedObject("neckband", (0.4, 0.1, 0.6, 0.3))
    assert tag_caption([GARMENT, neck], "positional", order="reading") == (
        "The image contains neckband (above the center), garment (at the bottom right corner)."
    )
    # same grid row: left to right, even when the left one sits lower
    high_right = GroundedObject("square", (0.591, 0.121, 0.731, 0.308))
    low_left = GroundedObject("triangle", (0.309, 0.196, 0.438, 0.367))
    assert tag_caption([high_right, low_left], "positional", order="reading") == (
        "The image contains triangle (above the center), square (above the center)."
    )
    assert tag_caption([neck], "bbox", lead_in="", order="reading") == (
        "<object>neckband</object><bbox>[0.400, 0.100][0.600, 0.300]</bbox>.")
    assert build_captions([GARMENT, neck], None, tag_order="reading")[0]["text"].endswith("(at the bottom right corner).")


PLAYER = GroundedObject("football player", (0.3, 0.2, 0.7, 0.8), 0.8)


@pytest.mark.parametrize(
    "fmt, expected",
    [
        ("positional", "This image showcases a football player (in the center) in action."),
        ("textual", "This image showcases a football player (starts at [0.300, 0.200] and extends up to "
                    "[0.700, 0.800]) in action."),
        ("bbox", "This image showcases a <object>football player</object><bbox>[0.300, 0.200][0.700, 0.800]"
                 "</bbox> in action."),
    ],
)
def test_inline_after_phrase(fmt, expected):
    assert inline_caption("This image showcases a football player in action.", [PLAYER], fmt) == expected


def test_inline_repeated_phrase_groups_on_first_occurrence():
    left = GroundedObject("dog", (0.0, 0.4, 0.2, 0.6))
    right = GroundedObject("dog", (0.8, 0.4, 1.0, 0.6))
    assert inline_caption("A dog chases another dog.", [right, left], "positional") == (
        "A dog (to the left of the center; to the right of the center) chases another dog."
    )
    assert inline_caption("A dog chases another dog.", [left, right], "bbox") == (
        "A <object>dog</object><bbox>[0.000, 0.400][0.200, 0.600]</bbox><bbox>[0.800, 0.400][1.000, 0.600]"
        "</bbox> chases another dog."
    )


def test_inline_phrase_not_found_is_appended():
    man = GroundedObject("man", (0.4, 0.4, 0.6, 0.6))
    board = GroundedObject("surfboard", (0.0, 0.8, 0.2, 1.0))
    assert inline_caption("A man on a beach.", [man, board], "positional") == (
        "A man (in the center) on a beach. The image also contains surfboard (at the bottom left corner)."
    )
    assert inline_caption("A man on a beach", [board], "positional", also_lead_in="Also") == (
        "A man on a beach. Also surfboard (at the bottom left corner)."
    )


def test_inline_overlapping_phrases_longest_first():
    fp = GroundedObject("football player", (0.4, 0.4, 0.6, 0.6))
    p = GroundedObject("player", (0.8, 0.0, 1.0, 0.2))
    # "player" lies inside the claimed "football player" span and has no other occurrence
    assert inline_caption("a football player kicks the ball", [p, fp], "positional") == (
        "a football player (in the center) kicks the ball. The image also contains player (at the top right corner)."
    )
    # ... but takes the next free occurrence when there is one
    assert inline_caption("a football player near another player", [p, fp], "positional") == (
        "a football player (in the center) near another player (at the top right corner)"
    )
    # partial overlap: the longer label wins the shared word
    hot = GroundedObject("hot dog", (0.0, 0.0, 0.2, 0.2))
    stand = GroundedObject("dog stand", (0.4, 0.4, 0.6, 0.6))
    assert inline_caption("a hot dog stand", [hot, stand], "positional") == (
        "a hot dog stand (in the center). The image also contains hot dog (at the top left corner)."
    )


def test_inline_word_boundaries_plural_and_case():
    dog = GroundedObject("dog", (0.4, 0.4, 0.6, 0.6))
    assert inline_caption("Dogs run.", [dog], "positional") == "Dogs (in the center) run."
    cat = GroundedObject("cat", (0.4, 0.4, 0.6, 0.6))
    assert inline_caption("A category of toys.", [cat], "positional") == (
        "A category of toys. The image also contains cat (in the center)."
    )


def test_build_captions_variants_and_default_pick():
    with_caption = build_captions([PLAYER], "a football player")
    assert [(c["format"], c["style"]) for c in with_caption] == [
        ("positional", "tags"), ("textual", "tags"), ("bbox", "tags"),
        ("positional", "inline"), ("textual", "inline"), ("bbox", "inline"),
    ]
    assert pick_caption(with_caption, "positional", None)["text"] == "a football player (in the center)"
    assert pick_caption(with_caption, "textual", "tags")["style"] == "tags"
    without = build_captions([PLAYER], None)
    assert len(without) == 3
    assert pick_caption(without, "bbox", "inline")["text"] == tag_caption([PLAYER], "bbox")
    # no objects: the tags say so, the inline variants are the source caption; never an empty .txt
    empty = build_captions([], "a caption")
    assert pick_caption(empty, "bbox", "tags")["text"] == "The image contains no objects"  # the paper's form
    assert pick_caption(empty, "positional", None)["text"] == "a caption"
    reading = build_captions([], None, tag_order="reading")
    assert pick_caption(reading, "positional", None)["text"] == "The image contains no objects."
    with pytest.raises(ValueError):
        pick_caption(with_caption, "nope", None)
