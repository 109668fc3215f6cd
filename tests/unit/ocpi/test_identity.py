"""CiString comparison forms (ocpi.identity)."""

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ocpi.identity import ObjectKey, ci_equal, ci_index, ci_normalize, owner_from_key_part, owner_key_part

_ASCII_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)


@pytest.mark.parametrize(("value", "expected"), [
    ("nl", "NL"), ("Tnm", "TNM"), ("loc-1_a.b", "LOC-1_A.B"), ("", ""),
    ("straße", "STRAßE"),  # only ASCII letters fold: str.upper() would give "STRASSE"
    ("ǆ", "ǆ"), ("éa", "éA"),
])
def test_ci_normalize_upper_cases_ascii_letters_only(value: str, expected: str) -> None:
    assert ci_normalize(value) == expected


@given(st.text(max_size=40))
def test_ci_normalize_is_the_ascii_only_mapping(value: str) -> None:
    assert ci_normalize(value) == value.translate(_ASCII_UPPER)


def test_ci_equal() -> None:
    assert ci_equal("nl", "NL")
    assert not ci_equal("straße", "STRASSE")
    assert ci_equal(None, None)
    assert not ci_equal(None, "")


@given(st.lists(st.text(alphabet="aAbBß1", max_size=3), max_size=6), st.text(alphabet="aAbBß1", max_size=3))
def test_ci_index_is_the_first_ci_equal_value(values: list[str], wanted: str) -> None:
    expected = next((i for i, value in enumerate(values) if ci_equal(value, wanted)), None)
    assert ci_index(values, wanted) == expected


def test_owners_holding_a_slash_have_keys_of_their_own() -> None:
    """CiString allows `/` in a country code or party id: unescaped, `N/` + `L` and `N` + `/L` were one Kafka and
    state key, one object's state serving another's events."""
    assert ObjectKey("N/", "L", "X").kafka_key() != ObjectKey("N", "/L", "X").kafka_key()
    assert ObjectKey("n%", "tnm", "a/b").kafka_key() == b"N%25/TNM/A/B"  # the id, the last part, stays as it is
    assert ObjectKey("nl", "tnm", "loc-1").kafka_key() == b"NL/TNM/LOC-1"  # real codes: the keys of before


@given(st.text(alphabet="aA/%2F5", max_size=4))
def test_an_owner_key_part_holds_no_slash_and_reads_back(value: str) -> None:
    part = owner_key_part(value)
    assert "/" not in part
    assert owner_from_key_part(part) == ci_normalize(value)


def test_only_the_escapes_owner_key_part_writes_are_read_back() -> None:
    assert owner_from_key_part("N%2fL%252F%41") == "N/L%2F%41"  # one pass; %41 is not one of ours
