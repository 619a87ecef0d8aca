"""Who a commit is by and what it says: identities parsed as git takes them, messages made safe."""

from __future__ import annotations

import pytest

from service.vcs.authorship import Identity, message


def test_an_identity_is_parsed_and_refused_when_git_would_refuse_it() -> None:
    assert Identity.parse("Jane Doe <jane@example.com>") == Identity("Jane Doe", "jane@example.com")
    assert str(Identity.client("ops")) == "ops <ops@clients.switchboard.invalid>"
    for bad in ("no email", "<only@email>", "a <b> <c>", "name <with space@x>", "evil\n <x@y>"):
        with pytest.raises(ValueError, match="identity"):
            Identity.parse(bad)


def test_a_message_has_the_subject_the_reason_as_body_and_the_trailer() -> None:
    text = message("create api_key x", "rotating\nbecause\tleaked  ", "ops")
    assert text == "create api_key x\n\nrotating because leaked\n\nSwitchboard-Client: ops\n"
    assert (
        message("delete ai_server y", None, "anonymous")
        == "delete ai_server y\n\nSwitchboard-Client: anonymous\n"
    )
    assert len(message("s", "x" * 10_000, "c")) < 2100
    # a header's bytes that are not UTF-8 arrive as lone surrogates (aiohttp's surrogateescape)
    odd = message("s", "caf\u00e9 \udcff\udcfe\x1b[31m\x85x\u2028y", "c")
    assert odd == "s\n\ncaf\u00e9 \ufffd\ufffd [31m x y\n\nSwitchboard-Client: c\n"
    odd.encode("utf-8")
