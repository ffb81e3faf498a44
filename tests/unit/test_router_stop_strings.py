"""StopStringMatcher: stop strings split across deltas are found and never released."""

from __future__ import annotations

from lmfleet.router.tokenizer import StopStringMatcher


def feed_all(matcher, deltas):
    return [matcher.feed(d) for d in deltas]


def test_a_stop_string_split_across_deltas_is_cut_and_not_returned():
    matcher = StopStringMatcher(["###"])
    results = feed_all(matcher, ["Hello #", "#", "# world"])
    assert results == [("Hello ", False), ("", False), ("", True)]
    assert matcher.matched
    assert matcher.flush() == ""


def test_a_stop_string_inside_one_delta_keeps_the_text_before_it():
    matcher = StopStringMatcher(["\nUser:"])
    assert matcher.feed("Sure.\nUser: next") == ("Sure.", True)


def test_a_partial_match_that_breaks_off_is_released():
    matcher = StopStringMatcher(["abc"])
    assert feed_all(matcher, ["xa", "b", "d"]) == [("x", False), ("", False), ("abd", False)]
    assert not matcher.matched


def test_flush_releases_the_held_tail_when_generation_ends_without_a_match():
    matcher = StopStringMatcher(["abc"])
    assert matcher.feed("xab") == ("x", False)
    assert matcher.flush() == "ab"
    assert matcher.flush() == ""


def test_the_earliest_stop_string_wins():
    matcher = StopStringMatcher(["world", "lo"])
    assert matcher.feed("hello world") == ("hel", True)


def test_the_longest_possible_partial_match_is_held():
    # "aab" could still become "aabx"; holding only "ab" would leak the first "a".
    matcher = StopStringMatcher(["aabx", "ab"])
    assert matcher.feed("zaa") == ("z", False)
    assert matcher.feed("bx") == ("", True)


def test_without_stop_strings_text_passes_through():
    matcher = StopStringMatcher([])
    assert not matcher.active
    assert matcher.feed("anything ###") == ("anything ###", False)
    assert matcher.flush() == ""


def test_nothing_is_emitted_after_a_match():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("aSTOPb") == ("a", True)
    assert matcher.feed("more") == ("", True)
