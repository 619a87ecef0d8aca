"""Bytes of a file in `providers.d/` -> a validated document, or every problem with its line.

YAML is parsed with the safe loader under limits (size, one document, a mapping, bounded
alias expansion, no duplicate keys), so a hostile file is refused quickly and cannot take
the process down. Secrets stay `Sealed` until `decrypt` swaps in the `Secret` values.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath
from typing import Any, Protocol

import yaml
from pydantic import ValidationError

from service.config.models import MODELS, SECRET_FIELDS, AiServer, ApiKey, Document
from service.config.secret import NOT_A_STRING, SOPS_STRING, SOPS_VALUE, Sealed, Secret, unsendable
from service.config.sops_mac import Known, Seal, changed_outside_sops, seal_of
from service.errors import FileRejected, Problem, SopsError, SopsTampered, printable

MAX_FILE_BYTES = 1 << 20
MAX_ALIAS_EXPANSION = 10_000
"""How many more nodes aliases may add to a document than it has: a "billion laughs" stops here."""

MAC_ONLY = (
    "the sops MAC covers only the secrets (`mac_only_encrypted`), so the URL and every other value "
    "could be changed unnoticed; re-encrypt the file under a .sops.yaml rule without it"
)
"""Why a file made under `mac_only_encrypted` is refused (docs/reference.md §2.4: the MAC covers
every value of the file, so nobody can send a key they cannot read to a host of their choosing)."""

_IGNORED_SUFFIXES = ("~", ".swp", ".tmp", ".bak")
_C_LOADER_MAX_BRACKETS = 1_000
_C_LOADER_MAX_INDENT = 1_000

Path_ = tuple[str | int, ...]


def is_config_file(name: str) -> bool:
    """Whether a file name in `providers.d/` is a document (editors' droppings are not)."""
    return (
        not name.startswith(".") and not name.endswith(_IGNORED_SUFFIXES) and name.endswith((".yaml", ".yml"))
    )


def config_files(folder: Path) -> list[Path]:
    """The documents directly in `folder`, in name order; none when it is not a folder."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and is_config_file(p.name))


class Decrypter(Protocol):
    """What loading needs of `service.crypto.sops.Sops`.

    `config` sits below `crypto` (a file's format does not depend on how it is encrypted),
    so it names the shape it needs instead of importing the class.
    """

    def decrypt(self, data: bytes, filename: str) -> dict[str, Any]: ...

    async def decrypt_async(self, data: bytes, filename: str) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Loaded:
    """One validated file: its document, the line of every key, and its raw bytes for sops."""

    file: str
    sha256: str
    document: Document
    data: bytes = field(repr=False)
    lines: Mapping[Path_, int] = field(repr=False, default_factory=dict)
    encrypted: bool = False
    """The file carries a `sops:` block, so loading it decrypts it and checks its MAC."""
    seal: Seal | None = field(repr=False, default=None)
    """The MAC it carries and its data's fingerprint (a file with a `sops:` block), to tell a
    change made outside sops from the version it replaces (docs/reference.md §2.4)."""

    def line(self, *path: str | int) -> int:
        """The line of the key at `path`, or of its nearest enclosing key."""
        return _line_of(self.lines, path)

    def changed_outside_sops(self, known: Known) -> FileRejected | None:
        """The refusal of this file when it carries the MAC of a `known` version whose data
        differs: only a change made without the identity does that. Decrypts nothing."""
        problem = changed_outside_sops(self.file, self.line("sops", "mac"), self.seal, known)
        return FileRejected([problem]) if problem else None

    @property
    def decrypted(self) -> bool:
        return not any(isinstance(getattr(self.document, f, None), Sealed) for f in SECRET_FIELDS)


def parse(file: str, data: bytes) -> Loaded:
    """Parse and validate one file without decrypting it. Raises FileRejected with every problem."""
    tree, lines, has_sops, meta = _read_yaml(file, data)
    try:
        seal = seal_of(tree, meta) if has_sops else None
    except RecursionError:
        raise FileRejected([Problem(file, 1, "YAML nested too deeply")]) from None
    problems: list[Problem] = []
    kind = tree.get("kind")
    model = MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        expected = ", ".join(MODELS)
        what = "missing `kind`" if kind is None else "unknown `kind`"
        raise FileRejected([Problem(file, _line_of(lines, ("kind",)), f"{what}; one of {expected}", "kind")])
    problems += _check_secrets(file, tree, lines, has_sops)
    if isinstance(meta, dict) and meta.get("mac_only_encrypted") not in (None, False):
        problems.append(Problem(file, _line_of(lines, ("sops", "mac_only_encrypted")), MAC_ONLY, "sops"))
    stem = PurePath(file).stem
    if model in (AiServer, ApiKey) and isinstance(tree.get("id"), str) and tree["id"] != stem:
        message = f"`id` is {tree['id']!r} but the file is named {stem!r}; they must be equal"
        problems.append(Problem(file, _line_of(lines, ("id",)), message, "id"))
    try:
        document = model.model_validate(tree)
    except ValidationError as exc:
        problems += [_problem(file, lines, error, model.model_fields) for error in _errors(exc)]
    if problems:
        raise FileRejected(_dedupe(problems))
    digest = hashlib.sha256(data).hexdigest()
    return Loaded(file, digest, document, data, lines, has_sops, seal)


def seal(file: str, data: bytes) -> Seal | None:
    """The seal of a file read as YAML alone, schema aside (None without a MAC, or unreadable):
    for the versions in git's history that a change may take its MAC from."""
    try:
        tree, _, has_sops, meta = _read_yaml(file, data)
        return seal_of(tree, meta) if has_sops else None
    except (FileRejected, RecursionError):
        return None


def too_large(file: str, size: int) -> FileRejected:
    """The refusal of a file over `MAX_FILE_BYTES` (1 MiB)."""
    message = f"file is {size:,} bytes; the limit is {MAX_FILE_BYTES:,} (1 MiB)"
    return FileRejected([Problem(file, 1, message)])


_KIND_TEXT = re.compile(r"""^\s*["']?kind["']?\s*:\s*["']?([A-Za-z_]+)""", re.MULTILINE)
_CLIENTS_TEXT = re.compile(r"""^["']?clients["']?\s*:""", re.MULTILINE)


def declared_kind(data: bytes) -> str | None:
    """The `kind` a file says it is, even when it fails to load; None when it cannot be told.

    From the YAML when it parses to a mapping with a known `kind`; otherwise from the text
    (a syntax error, a head cut off a file too large). Where it is unclear it errs towards
    `clients`, the answer that keeps authentication on: a `kind: clients` line anywhere, or
    a top-level `clients:` key under a missing or misspelt kind, makes it a clients file.
    """
    try:
        tree: dict[str, Any] | None = _read_yaml("", data)[0]
    except FileRejected:
        tree = None
    if tree is not None:
        kind = tree.get("kind")
        if isinstance(kind, str) and kind in MODELS:
            return kind
        if "clients" in tree:
            return "clients"
    text = data.decode("utf-8", "replace")
    found = [m.group(1) for m in _KIND_TEXT.finditer(text)]
    if "clients" in found or (not set(found) & set(MODELS) and _CLIENTS_TEXT.search(text)):
        return "clients"
    known = [k for k in found if k in MODELS]
    return known[0] if known else None


def refused_provider(name: str, data: bytes) -> str | None:
    """The id a refused file would define when it declares a provider kind (its file's name),
    else None: routing may name it, as it may name any provider a file defines (docs/reference.md
    §4), so the cross-file checks take it as known."""
    return PurePath(name).stem if declared_kind(data) in ("ai_server", "api_key") else None


def with_secrets(loaded: Loaded, plaintext: Mapping[str, Any]) -> Loaded:
    """The same file with its secret fields replaced by the decrypted values."""
    update: dict[str, Secret] = {}
    for name in SECRET_FIELDS:
        value = plaintext.get(name)
        if isinstance(getattr(loaded.document, name, None), Sealed):
            if isinstance(value, int | float):  # sops' int, float or bool: written unquoted
                problem = Problem(loaded.file, loaded.line(name), f"`{name}` {NOT_A_STRING}", name)
                raise FileRejected([problem])
            if not isinstance(value, str):
                raise FileRejected([Problem(loaded.file, loaded.line(name), f"`{name}` did not decrypt")])
            value = value.strip()  # a key pasted with its line break works as the key it is
            if unsendable(value):  # it would fail every request it was sent with
                message = f"`{name}` holds a control character (a line break?); a key is one line"
                raise FileRejected([Problem(loaded.file, loaded.line(name), message, name)])
            update[name] = Secret(value)
    return replace(loaded, document=loaded.document.model_copy(update=update)) if update else loaded


def decrypt(loaded: Loaded, sops: Decrypter) -> Loaded:
    """Decrypt a parsed file through sops (checking its MAC) and swap in its secrets."""
    if not loaded.encrypted:
        return loaded
    try:
        plaintext = sops.decrypt(loaded.data, loaded.file)
    except SopsError as exc:
        raise _sops_rejection(loaded, exc) from None
    return with_secrets(loaded, plaintext)


async def decrypt_async(loaded: Loaded, sops: Decrypter) -> Loaded:
    """`decrypt` without blocking the event loop, so many files decrypt in parallel."""
    if not loaded.encrypted:
        return loaded
    try:
        plaintext = await sops.decrypt_async(loaded.data, loaded.file)
    except SopsError as exc:
        raise _sops_rejection(loaded, exc) from None
    return with_secrets(loaded, plaintext)


def _sops_rejection(loaded: Loaded, exc: SopsError) -> FileRejected:
    # A tampered value is shown at the secret; a key or MAC problem at the sops metadata.
    secrets = [name for name in SECRET_FIELDS if (name,) in loaded.lines]
    line = loaded.line(secrets[0]) if isinstance(exc, SopsTampered) and secrets else loaded.line("sops")
    rejected = FileRejected([Problem(loaded.file, line, exc.case)])
    rejected.sops_error = exc  # type: ignore[attr-defined]
    return rejected


# -- YAML under limits -------------------------------------------------------------------


def _read_yaml(file: str, data: bytes) -> tuple[dict[str, Any], dict[Path_, int], bool, object]:
    """The document without its `sops:` block, the line of each key, whether it had one, and the block."""

    def reject(message: str, line: int = 1) -> FileRejected:
        return FileRejected([Problem(file, line, message)])

    if len(data) > MAX_FILE_BYTES:
        raise too_large(file, len(data))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise reject("not UTF-8 text (a binary file?)", line) from None
    if "\x00" in text:
        raise reject("not text: contains NUL bytes", text[: text.index("\x00")].count("\n") + 1)
    loader = _loader_for(text)(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise reject("file is empty; expected a mapping with a `kind`")
        if not isinstance(node, yaml.MappingNode):
            raise reject("expected a mapping with a `kind` at the top", node.start_mark.line + 1)
        lines: dict[Path_, int] = {}
        _inspect(file, node, lines)
        tree = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        problem = exc.problem or "invalid YAML"
        if "expected a single document" in str(exc.context):
            problem = "more than one YAML document; a file holds exactly one"
        raise reject(f"YAML syntax: {problem}", line) from None
    except yaml.YAMLError as exc:
        raise reject(f"YAML syntax: {exc}") from None
    except RecursionError:
        raise reject("YAML nested too deeply") from None
    finally:
        loader.dispose()
    if not all(isinstance(k, str) for k in tree):
        raise reject("top-level keys must be strings")
    has_sops = "sops" in tree
    meta = tree.pop("sops", None)
    return tree, lines, has_sops, meta


def _loader_for(text: str) -> type[yaml.SafeLoader] | type[yaml.CSafeLoader]:
    """libyaml's loader (fast), unless the text could nest deeply enough to overflow its C stack.

    Nesting needs brackets or indentation; the pure-Python loader turns deep nesting into a
    RecursionError instead of a crash, so it takes any text that could nest deep.
    """
    c_loader = getattr(yaml, "CSafeLoader", None)
    if c_loader is None or text.count("[") + text.count("{") > _C_LOADER_MAX_BRACKETS:
        return yaml.SafeLoader
    deepest = max((len(line) - len(line.lstrip(" ")) for line in text.splitlines()), default=0)
    return yaml.SafeLoader if deepest > _C_LOADER_MAX_INDENT else c_loader


def _inspect(file: str, root: yaml.Node, lines: dict[Path_, int]) -> None:
    """Record the line of every key, and refuse duplicate keys, cycles and alias bombs."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def walk(node: yaml.Node, path: Path_, record: bool) -> int:
        key = id(node)
        if key in active:
            raise FileRejected([Problem(file, node.start_mark.line + 1, "recursive YAML alias")])
        if key in sizes:  # an alias: counted again, but its lines belong to the anchor
            return sizes[key]
        active.add(key)
        lines.setdefault(path, node.start_mark.line + 1)
        size = 1
        if isinstance(node, yaml.MappingNode):
            seen: set[object] = set()
            for key_node, value_node in node.value:
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else repr(key_node.value)
                line = key_node.start_mark.line + 1
                if name in seen:
                    raise FileRejected([Problem(file, line, f"duplicate key `{printable(str(name))}`")])
                seen.add(name)
                lines.setdefault((*path, name), line)
                size += 1 + walk(value_node, (*path, name), record)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                size += walk(item, (*path, index), record)
        active.discard(key)
        sizes[key] = size
        return size

    expanded = walk(root, (), True)
    distinct = sum(1 for _ in sizes)
    if expanded - distinct > MAX_ALIAS_EXPANSION:
        raise FileRejected(
            [Problem(file, 1, f"YAML aliases expand to {expanded:,} nodes; refused as an alias bomb")]
        )


def _line_of(lines: Mapping[Path_, int], path: Path_) -> int:
    for end in range(len(path), -1, -1):
        line = lines.get(tuple(path[:end]))
        if line is not None:
            return line
    return 1


# -- secrets and schema errors -----------------------------------------------------------


def _check_secrets(
    file: str, tree: dict[str, Any], lines: Mapping[Path_, int], has_sops: bool
) -> list[Problem]:
    problems = []
    for name in SECRET_FIELDS:
        value = tree.get(name)
        if not isinstance(value, str):
            continue
        line = _line_of(lines, (name,))
        if SOPS_VALUE.match(value) and not has_sops:
            problems.append(
                Problem(file, line, f"`{name}` looks encrypted but the file has no `sops:` block", name)
            )
        elif not SOPS_VALUE.match(value):
            problems.append(
                Problem(
                    file,
                    line,
                    f"`{name}` is in plaintext; encrypt it before committing: switchboard encrypt {file}",
                    name,
                )
            )
            tree[name] = Sealed("")  # reported here; keep the schema check from repeating it
        elif not value.endswith(SOPS_STRING):  # `api_key: 0123…` unquoted: sops kept it an int
            problems.append(Problem(file, line, f"`{name}` {NOT_A_STRING}", name))
    return problems


def _errors(exc: ValidationError) -> list[dict[str, Any]]:
    # include_input=False: an input may be a plaintext secret, and it is never echoed.
    return [dict(e) for e in exc.errors(include_input=False, include_url=False, include_context=False)]


def _problem(
    file: str, lines: Mapping[Path_, int], error: Mapping[str, Any], fields: Mapping[str, Any]
) -> Problem:
    loc = tuple(p for p in error["loc"] if p != "[key]")
    where = printable(".".join(str(p) for p in loc))
    line = _line_of(lines, loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        guess = difflib.get_close_matches(str(loc[-1]), list(fields), n=1) if len(loc) == 1 else []
        hint = f"; did you mean `{guess[0]}`?" if guess else ""
        return Problem(file, line, f"unknown field `{where}`{hint}", where)
    if kind == "missing":
        return Problem(file, _line_of(lines, loc[:-1]), f"missing required field `{where}`", where)
    message = str(error["msg"]).removeprefix("Value error, ")
    return Problem(file, line, f"`{where}`: {message}" if where else message, where)


def _dedupe(problems: list[Problem]) -> list[Problem]:
    return sorted(dict.fromkeys(problems), key=lambda p: p.line)
