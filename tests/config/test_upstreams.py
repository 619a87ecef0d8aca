"""`SWITCHBOARD_ALLOWED_UPSTREAMS`: what it says, and what an address or a name may reach (reference §7)."""

from __future__ import annotations

import pytest

from service.config.upstreams import (
    LINK_LOCAL,
    SETTING,
    UNLISTED,
    AllowedUpstreams,
    host_refusal,
    numeric_spelling,
)
from tests.support.dns import Dns

UNSET = AllowedUpstreams.parse(None)


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "169.254.0.1",
        "fe80::1",
        "fe80::a9fe:a9fe%eth0",
        "::ffff:169.254.169.254",  # IPv4-mapped: a dual-stack socket reaches 169.254.169.254
        "::ffff:a9fe:a9fe",
        "fd00:ec2::254",  # AWS's metadata over IPv6
        "64:ff9b::a9fe:a9fe",  # through NAT64
    ],
)
def test_unset_refuses_metadata_addresses_only(address: str) -> None:
    assert UNSET.refusal(address) == LINK_LOCAL


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "8.8.8.8", "::1", "2001:db8::1", "0.0.0.0"])  # noqa: S104
def test_unset_allows_every_other_address(address: str) -> None:
    assert UNSET.refusal(address) is None


def test_a_list_allows_its_networks_and_names_and_nothing_else() -> None:
    allowed = AllowedUpstreams.parse(" 10.0.0.0/8, 192.168.1.5 ,fd00::/8, api.example.com, *.corp.example.")
    assert allowed.refusal("10.200.0.1") is None
    assert allowed.refusal("192.168.1.5") is None
    assert allowed.refusal("fd12::1") is None
    assert allowed.refusal("::ffff:10.0.0.1") is None  # the IPv4 address it reaches
    assert allowed.refusal("8.8.8.8", "api.example.com") is None  # a listed name, wherever it resolves
    assert allowed.refusal("8.8.8.8", "API.Example.COM.") is None
    assert allowed.refusal("8.8.8.8", "gpu.corp.example") is None
    assert allowed.refusal("8.8.8.8", "a.b.corp.example") is None
    for address, name in [
        ("192.168.1.6", None),
        ("127.0.0.1", None),
        ("0.0.0.0", None),  # noqa: S104 - reaches this host, and is not 127.0.0.1 in the list's eyes
        ("8.8.8.8", "corp.example"),  # `*.` is below the name, not the name itself
        ("8.8.8.8", "evilcorp.example"),
        ("8.8.8.8", "api.example.com.evil.test"),
    ]:
        assert allowed.refusal(address, name) == UNLISTED, (address, name)


def test_a_listed_name_never_unlocks_the_metadata_address() -> None:
    """A name may be re-pointed: only a listed network allows a link-local address."""
    named = AllowedUpstreams.parse("gpu.example.com, *.example.com")
    assert named.refusal("169.254.169.254", "gpu.example.com") is not None
    assert named.refusal("::ffff:169.254.169.254", "x.example.com") is not None
    networked = AllowedUpstreams.parse("169.254.169.254")
    assert networked.refusal("169.254.169.254") is None
    assert networked.refusal("169.254.169.253") is not None
    assert AllowedUpstreams.parse("169.254.0.0/16, fe80::/10").refusal("fe80::1") is None


def test_anywhere_is_not_the_metadata_service_too() -> None:
    """`0.0.0.0/0` lists every address, but not link-local explicitly: it stays refused."""
    anywhere = AllowedUpstreams.parse("0.0.0.0/0, ::/0")
    assert anywhere.refusal("8.8.8.8") is None and anywhere.refusal("2001:db8::1") is None
    for address in ("169.254.169.254", "fe80::1", "::ffff:169.254.169.254", "fd00:ec2::254"):
        assert anywhere.refusal(address) == LINK_LOCAL, address


@pytest.mark.parametrize(
    "text",
    [
        "10",
        "10.0.0.0/33",
        "300.1.2.3",
        "*",
        "a..b",
        "host:8080",
        "http://h",
        "*.*.x",
        "127.1",
        "0x7f.1",
        "a/b",
    ],
)
def test_an_entry_that_is_neither_a_network_nor_a_name_is_refused_at_start(text: str) -> None:
    with pytest.raises(ValueError, match=SETTING):
        AllowedUpstreams.parse(f"10.0.0.0/8,{text}")


def test_blank_is_unset() -> None:
    assert AllowedUpstreams.parse("") == AllowedUpstreams.parse(" , ") == UNSET
    assert not UNSET.listed


@pytest.mark.parametrize(
    "host", ["2852039166", "0251.0376.0251.0376", "0xa9.0xfe.0xa9.0xfe", "169.254.43518", "127.1"]
)
def test_a_legacy_spelling_of_an_address_is_refused_as_it_stands(host: str) -> None:
    assert numeric_spelling(host)
    reason = host_refusal(host, UNSET, Dns())
    assert reason is not None and "dotted decimal" in reason and SETTING in reason


def test_a_host_is_refused_when_every_address_it_resolves_to_is() -> None:
    dns = Dns({"metadata.test": ["169.254.169.254"], "both.test": ["169.254.169.254", "10.0.0.1"]})
    assert host_refusal("metadata.test", UNSET, dns) == (
        f"metadata.test is refused by {SETTING}: its address is {LINK_LOCAL}"
    )
    assert host_refusal("both.test", UNSET, dns) is None  # the connection keeps to 10.0.0.1
    assert host_refusal("169.254.169.254.", UNSET, dns) is not None  # a trailing dot is the same address
    assert host_refusal("::ffff:a9fe:a9fe", UNSET, dns) is not None


def test_a_name_that_does_not_resolve_is_refused_only_when_the_list_tells() -> None:
    dns = Dns()
    assert host_refusal("nowhere.test", UNSET, dns) is None
    assert host_refusal("nowhere.test", AllowedUpstreams.parse("10.0.0.0/8"), dns) is None  # it may, later
    named = AllowedUpstreams.parse("api.example.com")
    assert host_refusal("api.example.com", named, dns) is None
    assert (
        host_refusal("nowhere.test", named, dns) == f"nowhere.test is refused by {SETTING}: it is not listed"
    )
