"""Authentication header parsing and the authorization rule (roles, routing headers, hubs), as functions.

The same rules over real requests are in test_transport.py; here every branch of the hub rule is covered,
including broadcast pushes of Locations, which no router of ours serves yet.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from receivers.auth import authorize, parse_authorization, require_owner
from receivers.registry import Partner, PartnerStatus, RoutedPartner, credentials_role
from receivers.transport import ForeignParty, InvalidRoutingHeaders, RoutingHeaders, Unauthorized

OURS = ("NL", "OPP")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(("header", "expected"), [
    (f"Token {b64('example-token')}", ("example-token", b64("example-token"))),
    ("Token ZXhhbXBsZS10b2tlbgo=", ("example-token", "ZXhhbXBsZS10b2tlbgo=")),  # the spec's sample: trailing \n
    ("token ZXhhbXBsZS10b2tlbg==", ("example-token", "ZXhhbXBsZS10b2tlbg==")),  # scheme case-insensitive
    ("Token raw-token-not-base64!", (None, "raw-token-not-base64!")),
    ("Token //8=", (None, "//8=")),  # Base64 of bytes that are not UTF-8
])
def test_parse_authorization(header: str, expected: tuple[str | None, str]) -> None:
    assert parse_authorization(header) == expected


@pytest.mark.parametrize("header", [None, "", "Token", "Token ", "Bearer abc", "Token a b", "Basic dXNlcjpwdw==",
                                    "Token\tabc"])
def test_parse_authorization_refuses(header: str | None) -> None:
    with pytest.raises(Unauthorized):
        parse_authorization(header)


def partner(*parties: tuple[str, str, str]) -> Partner:
    now = datetime.now(UTC)
    roles = [credentials_role(country_code=c, party_id=p, role=r) for c, p, r in parties]
    return Partner(partner_id="p", name="p", status=PartnerStatus.REGISTERED, roles=roles, created_at=now,
                   updated_at=now)


CPO = partner(("BE", "BEC", "CPO"))
PLATFORM = partner(("NL", "EXO", "CPO"), ("NL", "PFC", "CPO"))
HUB = partner(("DE", "HUB", "HUB"))
# credentials_example2.json: one party with the roles CPO and EMSP; and a CPO platform that also hosts an eMSP.
CPO_AND_EMSP = partner(("NL", "EXA", "CPO"), ("NL", "EXA", "EMSP"))
MIXED = partner(("NL", "CPX", "CPO"), ("NL", "MSP", "EMSP"))


def headers(from_: tuple[str, str] | None, to: tuple[str, str] | None = OURS) -> RoutingHeaders:
    return RoutingHeaders(from_country_code=from_[0] if from_ else None, from_party_id=from_[1] if from_ else None,
                          to_country_code=to[0] if to else None, to_party_id=to[1] if to else None)


ALLOWED = [
    ("single party, no headers", CPO, headers(None, None), "sessions", "PUT", ("BE", "BEC")),
    ("single party, own from", CPO, headers(("BE", "BEC")), "sessions", "PUT", ("be", "bec")),
    ("platform, any of its parties", PLATFORM, headers(("NL", "EXO")), "sessions", "PUT", ("NL", "PFC")),
    ("hub relays for the from-* owner", HUB, headers(("NL", "XYZ")), "sessions", "PUT", ("NL", "XYZ")),
    ("hub relays a GET for the from-* owner", HUB, headers(("NL", "XYZ")), "locations", "GET", ("NL", "XYZ")),
    ("hub broadcast of a Location keeps the owner", HUB, headers(("DE", "HUB")), "locations", "PUT", ("NL", "ABC")),
    ("hub broadcast PATCH of a Location", HUB, headers(("DE", "HUB")), "locations", "PATCH", ("FR", "ZZZ")),
    ("hub broadcast of a Tariff", HUB, headers(("DE", "HUB")), "tariffs", "PUT", ("NL", "ABC")),
    ("no owner in the URL (CDR POST)", HUB, headers(("NL", "XYZ")), "cdrs", "POST", None),
    ("routing headers are CiStrings", CPO, headers(("be", "bec"), ("nl", "opp")), "sessions", "PUT", ("BE", "BEC")),
    ("platform, each of its CPO parties", PLATFORM, headers(("NL", "PFC")), "cdrs", "GET", ("NL", "EXO")),
    ("one party both CPO and EMSP", CPO_AND_EMSP, headers(("NL", "EXA")), "sessions", "PUT", ("NL", "EXA")),
    ("mixed platform, its CPO party", MIXED, headers(("NL", "CPX")), "locations", "PATCH", ("NL", "CPX")),
]


@pytest.mark.parametrize(("name", "who", "routing", "module", "method", "owner"), ALLOWED,
                         ids=[row[0] for row in ALLOWED])
def test_allowed(name: str, who: Partner, routing: RoutingHeaders, module: str, method: str,
                 owner: tuple[str, str] | None) -> None:
    acting = authorize(who, routing, ours=OURS, module=module, method=method, owner=owner)
    if owner is not None:
        require_owner(acting, *owner)


REFUSED = [
    ("owner not one of the roles", CPO, headers(None, None), "sessions", "PUT", ("NL", "TNM"), ForeignParty),
    ("from-* not the caller's", CPO, headers(("NL", "TNM")), "sessions", "PUT", ("BE", "BEC"),
     InvalidRoutingHeaders),
    ("to-* not ours", CPO, headers(("BE", "BEC"), ("DE", "XXX")), "sessions", "PUT", ("BE", "BEC"),
     InvalidRoutingHeaders),
    ("to-* not ours, without from-*", CPO, headers(None, ("DE", "XXX")), "sessions", "PUT", ("BE", "BEC"),
     InvalidRoutingHeaders),
    ("platform without headers", PLATFORM, headers(None, None), "sessions", "PUT", ("NL", "EXO"),
     InvalidRoutingHeaders),
    ("hub without from-*", HUB, headers(None), "sessions", "PUT", ("NL", "XYZ"), InvalidRoutingHeaders),
    ("hub without to-* (open routing reaches us addressed)", HUB, headers(("NL", "XYZ"), None), "sessions", "PUT",
     ("NL", "XYZ"), InvalidRoutingHeaders),
    ("hub relaying for someone else's object", HUB, headers(("NL", "XYZ")), "sessions", "PUT", ("NL", "ABC"),
     ForeignParty),
    ("hub 'broadcast' of Sessions", HUB, headers(("DE", "HUB")), "sessions", "PUT", ("NL", "ABC"), ForeignParty),
    ("hub 'broadcast' of CDRs", HUB, headers(("DE", "HUB")), "cdrs", "GET", ("NL", "ABC"), ForeignParty),
    ("hub GET is never broadcast", HUB, headers(("DE", "HUB")), "locations", "GET", ("NL", "ABC"), ForeignParty),
    # Locations, Sessions and CDRs are owned by a CPO (08/09/10 §1; their receiver interfaces are called by the CPO,
    # and the URL's country_code/party_id are the CPO's): a party the caller registered in another role owns none.
    *[(f"{role} role pushing {module}", partner(("NL", "MSP", role)), headers(None, None), module, method,
       ("NL", "MSP"), ForeignParty)
      for role in ("EMSP", "NSP", "OTHER", "NAP", "SCSP")
      for module, method in (("locations", "PUT"), ("sessions", "PATCH"), ("cdrs", "GET"))],
    ("EMSP role reading back a Session", partner(("NL", "MSP", "EMSP")), headers(None, None), "sessions", "GET",
     ("NL", "MSP"), ForeignParty),
    ("mixed platform, its EMSP party", MIXED, headers(("NL", "MSP")), "sessions", "PUT", ("NL", "MSP"),
     ForeignParty),
    ("mixed platform, its EMSP party, from-* its CPO", MIXED, headers(("NL", "CPX")), "locations", "PUT",
     ("NL", "MSP"), ForeignParty),
    # A request to us is never from us (04 §8.2: from-* is the requesting party): a Hub naming our party in from-*
    # relayed nothing, and was let push objects in our own party's name.
    ("hub relaying for our own party", HUB, headers(OURS), "sessions", "PUT", OURS, InvalidRoutingHeaders),
    ("hub relaying for our own party, as spelled otherwise", HUB, headers(("nl", "opp")), "locations", "PATCH",
     ("NL", "OPP"), InvalidRoutingHeaders),
    ("hub broadcast of a Location of our own party", HUB, headers(("DE", "HUB")), "locations", "PUT", ("nl", "opp"),
     ForeignParty),
    # Nor does any partner own what our party would: a CPO role registered under our own party (the handshake does
    # not refuse one) would push Locations, Sessions and CDRs in our name.
    *[(f"our own party as a partner's CPO role, {module}", partner(("NL", "OPP", "CPO")), headers(None, None), module,
       method, ("nl", "opp"), ForeignParty)
      for module, method in (("locations", "PUT"), ("sessions", "PATCH"), ("cdrs", "GET"))],
    ("hub's own party owns no Session", HUB, headers(("DE", "HUB")), "sessions", "PUT", ("DE", "HUB"), ForeignParty),
    ("hub's own party owns no CDR", HUB, headers(("DE", "HUB")), "cdrs", "GET", ("DE", "HUB"), ForeignParty),
    # A broadcast keeps its owner's party in the URL (04 §9), any party behind the Hub, but never the Hub's own: a
    # party registered as HUB owns no Location either.
    ("hub's own party owns no Location, not even in a broadcast", HUB, headers(("DE", "HUB")), "locations", "PUT",
     ("de", "hub"), ForeignParty),
    ("hub's own party owns no EVSE of a broadcast PATCH", HUB, headers(("DE", "HUB")), "locations", "PATCH",
     ("DE", "HUB"), ForeignParty),
    # CiStrings compare ignoring ASCII case only: str.upper() folds 'ı' to 'I' and 'ß' to 'SS', which let a URL
    # owner no CiString can be (and so a Kafka key no object has) pass as the caller's party, acknowledged 1000.
    ("owner folding onto a role only by Unicode case", partner(("NL", "IST", "CPO")), headers(None, None),
     "locations", "PATCH", ("NL", "\u0131ST"), ForeignParty),
    ("owner folding onto a role: sharp s", partner(("NL", "SSX", "CPO")), headers(None, None), "sessions", "PATCH",
     ("NL", "\u00dfX"), ForeignParty),
    ("hub relaying for an owner folding onto the from-* party", HUB, headers(("NL", "IST")), "sessions", "PATCH",
     ("NL", "\u0131ST"), ForeignParty),
    ("from-* folding onto a role only by Unicode case", partner(("NL", "IST", "CPO")), headers(("NL", "\u0131ST")),
     "sessions", "PATCH", ("NL", "IST"), InvalidRoutingHeaders),
]


@pytest.mark.parametrize(("name", "who", "routing", "module", "method", "owner", "error"), REFUSED,
                         ids=[row[0] for row in REFUSED])
def test_refused(name: str, who: Partner, routing: RoutingHeaders, module: str, method: str,
                 owner: tuple[str, str], error: type[Exception]) -> None:
    with pytest.raises(error):
        authorize(who, routing, ours=OURS, module=module, method=method, owner=owner)


def test_a_hubs_request_view_allows_only_the_routed_party_for_body_owners() -> None:
    acting = authorize(HUB, headers(("NL", "XYZ")), ours=OURS, module="cdrs", method="POST", owner=None)
    assert isinstance(acting, RoutedPartner)
    require_owner(acting, "NL", "XYZ")
    with pytest.raises(ForeignParty):
        require_owner(acting, "NL", "ABC")
    assert authorize(CPO, headers(None, None), ours=OURS, module="cdrs", method="POST", owner=None) is CPO


def test_a_cdr_posted_for_a_party_that_is_no_cpo_of_the_caller_is_refused() -> None:
    """A CDR POST has no owner in its URL: the handler checks the body's owner, by the same rule."""
    acting = authorize(MIXED, headers(("NL", "CPX")), ours=OURS, module="cdrs", method="POST", owner=None)
    require_owner(acting, "NL", "CPX")
    with pytest.raises(ForeignParty, match="EMSP"):
        require_owner(acting, "nl", "msp")
    hub = authorize(HUB, headers(("DE", "HUB")), ours=OURS, module="cdrs", method="POST", owner=None)
    with pytest.raises(ForeignParty):
        require_owner(hub, "DE", "HUB")
