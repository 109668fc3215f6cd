"""The party-facts key: one CPO party's facts meet in one partition and one stage-2 state."""

from __future__ import annotations

from pipeline.facts import party_key
from pipeline.reconcile import PartyState
from pipeline.state import Overlay


def test_parties_holding_a_slash_have_keys_of_their_own_and_their_rows_name_them() -> None:
    """CiString allows `/` in a country code or party id: `N/` + `L` and `N` + `/L` were one party key, their
    facts in one state, and the rows of the first named country `N` and party `/L`."""
    assert party_key("N/", "L") != party_key("N", "/L")
    assert party_key("nl", "tnm") == "NL/TNM"
    state = PartyState(party_key("n/", "l%"), Overlay(lambda _key: None))
    assert (state.country_code, state.party_id) == ("N/", "L%")
