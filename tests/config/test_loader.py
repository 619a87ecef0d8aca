"""The loader: bytes of one file -> a validated document, or problems with file and line."""

from __future__ import annotations

import time

import pytest

from service.config.loader import MAX_FILE_BYTES, decrypt, is_config_file, parse, with_secrets
from service.config.models import AiServer, ApiKey, Routing
from service.config.secret import Sealed
from service.errors import FileRejected
from tests.conftest import SopsProject

ENC = "ENC[AES256_GCM,data:Zm9v,iv:aXZpdml2aXZpdml2aXY=,tag:dGFndGFndGFndGFn,type:str]"
SOPS_BLOCK = "sops:\n  mac: ENC[AES256_GCM,data:eA==,iv:eA==,tag:eA==,type:str]\n  version: 3.11.0\n"


def problems(file: str, text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    with pytest.raises(FileRejected) as caught:
        parse(file, data)
    return [str(p) for p in caught.value.problems]


def test_a_self_hosted_server_loads_with_defaults() -> None:
    text = "kind: ai_server\nid: gpu\nserver_type: vllm\nbase_url: http://10.0.0.5:8000/v1/\n"
    loaded = parse("providers.d/gpu.yaml", text.encode())
    assert isinstance(loaded.document, AiServer)
    assert loaded.document.base_url == "http://10.0.0.5:8000/v1"
    assert loaded.document.purposes == ["chat"]
    assert loaded.document.connect_timeout_s == 5
    assert loaded.document.timeout_s == 600
    assert loaded.document.first_byte_timeout_s == 15
    assert loaded.document.idle_timeout_s == 60
    assert loaded.document.enabled is True
    assert not loaded.encrypted


def test_an_encrypted_key_loads_sealed_with_the_vendor_default_url() -> None:
    text = f"kind: api_key\nid: or\nprovider: openrouter\napi_key: {ENC}\n{SOPS_BLOCK}"
    loaded = parse("providers.d/or.yaml", text.encode())
    assert isinstance(loaded.document, ApiKey)
    assert isinstance(loaded.document.api_key, Sealed)
    assert loaded.document.endpoint == "https://openrouter.ai/api/v1"
    assert loaded.document.speaks_openai
    assert loaded.encrypted


def test_a_plaintext_key_is_refused_with_how_to_encrypt_it_and_never_echoed() -> None:
    text = "kind: api_key\nid: or\nprovider: openrouter\napi_key: sk-CANARY-0123456789\n"
    found = problems("providers.d/or.yaml", text)
    assert found == [
        "providers.d/or.yaml:4: error: `api_key` is in plaintext; encrypt it before committing: "
        "switchboard encrypt providers.d/or.yaml"
    ]
    assert "CANARY" not in "".join(found)


def test_every_problem_of_a_file_is_reported_at_its_own_line() -> None:
    text = (
        "kind: ai_server\n"
        "id: other\n"
        "server_type: vllm\n"
        "base_url: ftp://x\n"
        "purposes: [chat, jokes]\n"
        "timeout_s: '5'\n"
        "base_ur: http://x\n"
    )
    assert problems("providers.d/gpu.yaml", text) == [
        "providers.d/gpu.yaml:2: error: `id` is 'other' but the file is named 'gpu'; they must be equal",
        "providers.d/gpu.yaml:4: error: `base_url`: must be an http:// or https:// URL with a host",
        "providers.d/gpu.yaml:5: error: `purposes.1`: Input should be 'chat', 'embeddings' or 'reranking'",
        "providers.d/gpu.yaml:6: error: `timeout_s`: Input should be a valid number",
        "providers.d/gpu.yaml:7: error: unknown field `base_ur`; did you mean `base_url`?",
    ]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://user:pw@host/v1", "must not carry credentials"),
        ("https://host/v1?key=abc", "must not have a query"),
        ("https://host:99999/v1", "invalid port"),
        ("localhost:8000", "must be an http:// or https:// URL"),
    ],
)
def test_bad_urls_are_refused(url: str, message: str) -> None:
    text = f"kind: ai_server\nid: gpu\nserver_type: vllm\nbase_url: '{url}'\n"
    (found,) = problems("providers.d/gpu.yaml", text)
    assert found.startswith("providers.d/gpu.yaml:4: error: `base_url`: ")
    assert message in found


def test_a_missing_required_field_and_an_unknown_vendor_are_named() -> None:
    text = f"kind: api_key\nid: x\nprovider: acme\napi_key: {ENC}\n{SOPS_BLOCK}"
    (found,) = problems("providers.d/x.yaml", text)
    assert found.startswith("providers.d/x.yaml:3: error: `provider`: unknown vendor; one of anthropic")
    assert problems("providers.d/x.yaml", "kind: ai_server\nid: x\nbase_url: http://h\n") == [
        "providers.d/x.yaml:1: error: missing required field `server_type`"
    ]


def test_a_missing_or_unknown_kind_lists_the_kinds() -> None:
    assert problems("providers.d/x.yaml", "id: x\n") == [
        "providers.d/x.yaml:1: error: missing `kind`; one of ai_server, api_key, routing, clients"
    ]
    assert problems("providers.d/x.yaml", "id: x\nkind: server\n") == [
        "providers.d/x.yaml:2: error: unknown `kind`; one of ai_server, api_key, routing, clients"
    ]


def test_routing_accepts_one_id_or_a_list_and_checks_weights() -> None:
    text = "kind: routing\npurposes:\n  chat:\n    primary: a\n    fallbacks: b\n"
    loaded = parse("providers.d/routing.yaml", text.encode())
    assert isinstance(loaded.document, Routing)
    assert loaded.document.purposes["chat"].primary == ["a"]
    assert loaded.document.purposes["chat"].fallbacks == ["b"]
    bad = "kind: routing\npurposes:\n  chat:\n    primary: [a, a]\n    weights: {c: 2}\n"
    (found,) = problems("providers.d/routing.yaml", bad)
    assert found.startswith("providers.d/routing.yaml:3: error: `purposes.chat`: names a more than once")


@pytest.mark.parametrize("value", [".inf", ".nan", "1.0e+400"])
def test_numbers_that_are_not_finite_are_refused(value: str) -> None:
    """A timeout of `.inf` passed validation, and its event then could not be written as JSON."""
    server = f"kind: ai_server\nid: x\nserver_type: vllm\nbase_url: http://h\ntimeout_s: {value}\n"
    (found,) = problems("providers.d/x.yaml", server)
    assert found.startswith("providers.d/x.yaml:5: error: `timeout_s`")
    routing = f"kind: routing\npurposes:\n  chat:\n    primary: a\n    weights: {{a: {value}}}\n"
    (found,) = problems("providers.d/routing.yaml", routing)
    assert "weights" in found


def test_a_key_with_a_line_break_is_refused_once_decrypted(sops_project: SopsProject) -> None:
    """No HTTP header can carry it: every request sent with it raised in aiohttp, a 500."""
    path = sops_project.providers / "k.yaml"
    text = 'kind: api_key\nid: k\nprovider: openrouter\napi_key: "sk-a\\r\\nInjected: yes"\n'
    loaded = parse("providers.d/k.yaml", sops_project.sops.encrypt(text.encode(), str(path)))
    with pytest.raises(FileRejected) as caught:
        decrypt(loaded, sops_project.sops)
    (found,) = caught.value.problems
    assert "control character" in found.message and found.path == "api_key"
    assert "Injected" not in str(caught.value)


def test_a_key_sops_encrypted_as_a_number_is_refused_saying_to_quote_it(sops_project: SopsProject) -> None:
    """`api_key: 123456789012345` unquoted is an int to YAML and `type:int` to sops: refused
    before decrypting, saying what to do (docs/reference.md §2.4), not "did not decrypt"."""
    path = sops_project.providers / "k.yaml"
    text = "kind: api_key\nid: k\nprovider: openrouter\napi_key: 123456789012345\n"
    data = sops_project.sops.encrypt(text.encode(), str(path))
    with pytest.raises(FileRejected) as caught:
        parse("providers.d/k.yaml", data)
    (found,) = caught.value.problems
    assert (
        found.message
        == '`api_key` must be a string: quote it (`api_key: "0123…"`) and encrypt the file again'
    )
    assert (found.line, found.path) == (4, "api_key")
    quoted = text.replace("123456789012345", '"123456789012345"')
    loaded = parse("providers.d/k.yaml", sops_project.sops.encrypt(quoted.encode(), str(path)))
    with pytest.raises(FileRejected) as caught:  # a decrypted number (whatever let it through)
        with_secrets(loaded, {"api_key": 123456789012345})
    assert "must be a string: quote it" in str(caught.value.problems[0].message)
    assert decrypt(loaded, sops_project.sops).document.api_key.reveal() == "123456789012345"  # type: ignore[union-attr]


def test_an_empty_file_is_refused() -> None:
    assert problems("providers.d/x.yaml", "") == [
        "providers.d/x.yaml:1: error: file is empty; expected a mapping with a `kind`"
    ]
    assert problems("providers.d/x.yaml", "# only a comment\n") == [
        "providers.d/x.yaml:1: error: file is empty; expected a mapping with a `kind`"
    ]


def test_two_documents_in_one_file_are_refused_at_the_second() -> None:
    assert problems("providers.d/x.yaml", "kind: routing\npurposes: {}\n---\nkind: routing\n") == [
        "providers.d/x.yaml:3: error: YAML syntax: more than one YAML document; a file holds exactly one"
    ]


def test_binary_garbage_is_refused() -> None:
    assert problems("providers.d/x.yaml", b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x00") == [
        "providers.d/x.yaml:1: error: not UTF-8 text (a binary file?)"
    ]
    assert problems("providers.d/x.yaml", b"kind: ai_server\n\x00\x00") == [
        "providers.d/x.yaml:2: error: not text: contains NUL bytes"
    ]


def test_a_file_over_one_mebibyte_is_refused_before_parsing() -> None:
    data = b"kind: routing\n" + b"# padding\n" * (2 * MAX_FILE_BYTES // 10)
    (found,) = problems("providers.d/x.yaml", data)
    assert "the limit is 1,048,576 (1 MiB)" in found


@pytest.mark.timeout(5)
def test_an_alias_bomb_is_refused_quickly() -> None:
    lines = ["kind: routing", 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        name, prev = chr(ord("a") + i), chr(ord("a") + i - 1)
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    started = time.perf_counter()
    (found,) = problems("providers.d/x.yaml", "\n".join(lines) + "\n")
    assert "refused as an alias bomb" in found
    assert time.perf_counter() - started < 5  # the bound is the timeout; typically ~1 ms


def test_deep_nesting_and_recursive_aliases_do_not_crash_the_process() -> None:
    (deep,) = problems("providers.d/x.yaml", "[" * 200_000)
    assert "nested too deeply" in deep
    assert problems("providers.d/x.yaml", "a: &a [*a]\n") == [
        "providers.d/x.yaml:1: error: recursive YAML alias"
    ]


def test_duplicate_keys_are_refused_rather_than_silently_overwritten() -> None:
    text = "kind: ai_server\nid: x\nserver_type: vllm\nbase_url: http://a\nbase_url: http://b\n"
    assert problems("providers.d/x.yaml", text) == ["providers.d/x.yaml:5: error: duplicate key `base_url`"]


def test_a_top_level_list_or_scalar_is_refused() -> None:
    assert problems("providers.d/x.yaml", "- kind: routing\n") == [
        "providers.d/x.yaml:1: error: expected a mapping with a `kind` at the top"
    ]


def test_a_yaml_syntax_error_has_its_line() -> None:
    (found,) = problems("providers.d/x.yaml", "kind: ai_server\nid: x\nmodels: [a, b\n")
    assert found.startswith("providers.d/x.yaml:4: error: YAML syntax:")


def test_encrypted_values_without_a_sops_block_are_refused() -> None:
    text = f"kind: api_key\nid: x\nprovider: openai\napi_key: {ENC}\n"
    assert problems("providers.d/x.yaml", text) == [
        "providers.d/x.yaml:4: error: `api_key` looks encrypted but the file has no `sops:` block"
    ]


@pytest.mark.parametrize(
    ("name", "wanted"),
    [
        ("a.yaml", True),
        ("a.yml", True),
        (".a.yaml", False),
        ("a.yaml~", False),
        ("a.yaml.swp", False),
        ("a.yaml.tmp", False),
        ("a.yaml.bak", False),
        ("a.json", False),
        ("README.md", False),
    ],
)
def test_editor_droppings_and_other_files_are_ignored(name: str, wanted: bool) -> None:
    assert is_config_file(name) is wanted


def test_infinite_and_nan_numbers_are_refused() -> None:
    server = "kind: ai_server\nid: x\nserver_type: vllm\nbase_url: http://h\ntimeout_s: .inf\n"
    (found,) = problems("providers.d/x.yaml", server)
    assert "timeout_s" in found and "finite" in found
    routing = "kind: routing\npurposes:\n  chat:\n    primary: [a]\n    weights: {a: .nan}\n"
    (found,) = problems("providers.d/routing.yaml", routing)
    assert "weights" in found


def test_a_file_whose_mac_covers_only_its_secrets_is_refused_unread() -> None:
    """docs/reference.md §2.4: "never `mac_only_encrypted`"; the service refuses such a file
    before any decryption, as `validate` does without a key."""
    text = f"kind: api_key\nid: k\nprovider: openai\napi_key: {ENC}\n{SOPS_BLOCK}  mac_only_encrypted: true\n"
    found = problems("providers.d/k.yaml", text)
    assert len(found) == 1
    assert found[0].startswith("providers.d/k.yaml:8: error: the sops MAC covers only the secrets")
    assert parse("providers.d/k.yaml", text.replace("true", "false").encode()).encrypted


@pytest.mark.parametrize(
    "url", ["http://gpu /v1", "'http://gpu/v1 '", '"http://gpu\\n/v1"', '"http://gpu/\\x7fv1"']
)
def test_a_base_url_with_a_space_or_a_control_character_is_refused(url: str) -> None:
    """docs/reference.md §2.1: `base_url` is an http(s) URL; one of these is no URL, and would
    reach the upstream request as it is."""
    text = f"kind: ai_server\nid: gpu\nserver_type: vllm\nbase_url: {url}\n"
    assert problems("providers.d/gpu.yaml", text) == [
        "providers.d/gpu.yaml:4: error: `base_url`: must not contain spaces or control characters"
    ]


def test_a_key_holding_a_line_break_is_shown_escaped_on_its_one_line() -> None:
    """docs/reference.md §3: `validate` prints one line per problem; a key of the file must not
    start a line of its own (a forged `FILE:LINE: error:` line in a CI log)."""
    server = "kind: ai_server\nid: gpu\nserver_type: vllm\nbase_url: http://h\n"
    forged = '"x\\ngpu.yaml:1: error: forged": 1\n'
    assert problems("gpu.yaml", server + forged) == [
        "gpu.yaml:5: error: unknown field `x\\ngpu.yaml:1: error: forged`"
    ]
    assert problems("gpu.yaml", server + 'model_map: {"a\\rb": 1}\n') == [
        "gpu.yaml:5: error: `model_map.a\\rb`: Input should be a valid string"
    ]
    assert problems("gpu.yaml", 'kind: routing\n"a\\tb": 1\n"a\\tb": 2\n') == [
        "gpu.yaml:3: error: duplicate key `a\\tb`"
    ]
