"""`switchboard plan [BASE [HEAD]] [--format markdown|json]`: a pull request's plan, for its review.

Markdown for a pull request comment (the workflow in `docs/workflows/` posts it), or JSON;
exit 1 when the service would refuse HEAD.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from service.crypto.sops import Sops
from service.errors import GitError
from service.settings import Settings
from service.vcs.gitrepo import GitRepo
from service.vcs.plan import Plan, earlier_seals, make_plan, read_sides


def run(ns: argparse.Namespace, settings: Settings) -> int:
    """`switchboard plan`: prints the plan; 1 when the service would refuse HEAD."""
    repo = GitRepo.find(settings.root)
    if repo is None:
        raise GitError(f"{settings.root}: not inside a git repository")
    base, head = read_sides(repo, settings, ns.base, ns.head)
    earlier = functools.partial(earlier_seals, repo, settings, base, head)
    result = make_plan(base, head, sops=Sops.from_settings(settings), earlier=earlier)
    print(render_json(result) if ns.format == "json" else render_markdown(result), end="")
    return 1 if result.refused else 0


def render_json(plan: Plan) -> str:
    """The plan as one JSON document."""
    body = {
        "base": {"rev": plan.base.rev, "commit": plan.base.commit},
        "head": {"rev": plan.head.rev, "commit": plan.head.commit, "worktree": plan.head.rev is None},
        "refused": plan.refused,
        "changes": plan.changes,
        "warnings": plan.warnings,
        "limits": plan.limits,
        "problems": [asdict(p) for p in plan.problems],
    }
    return json.dumps(body, indent=2, ensure_ascii=False) + "\n"


def render_markdown(plan: Plan) -> str:
    """The plan as Markdown for a pull request comment."""
    out = [f"## Switchboard plan: {plan.base.label} → {plan.head.label}", ""]
    if plan.refused:
        out += [f"**❌ The service would refuse this configuration** ({len(plan.problems)} problem(s)).", ""]
    else:
        out += ["**✅ The service would accept this configuration.**", ""]
    by_type: dict[str, list[dict[str, Any]]] = {}
    for change in plan.changes:
        by_type.setdefault(change["type"], []).append(change)
    if not plan.changes:
        out += ["No configuration changes.", ""]
    out += _section("Providers added", by_type.get("provider.added", []), _added)
    out += _section("Providers removed", by_type.get("provider.removed", []), _removed)
    out += _section("Providers changed", by_type.get("provider.updated", []), _updated)
    out += _section("Routing", by_type.get("routing.updated", []), _keyed(_route))
    out += _section("Clients", by_type.get("clients.updated", []), _keyed(_scopes))
    if plan.limits:
        out += ["### Limits and budgets", "", *[f"- {line}" for line in plan.limits], ""]
    if plan.warnings:
        out += ["### ⚠️ Warnings", "", *[f"- {w}" for w in plan.warnings], ""]
    if plan.problems:
        out += ["### Problems", ""]
        out += [f"- `{p.file}:{p.line}`: {_cell(p.message)}" for p in plan.problems] + [""]
    return "\n".join(out)


def _section(title: str, changes: list[dict[str, Any]], render: Any) -> list[str]:
    if not changes:
        return []
    lines = [f"### {title}", ""]
    for change in changes:
        lines += render(change)
    return lines


_SHOWN_WHEN_ADDED = (
    "kind",
    "provider",
    "server_type",
    "base_url",
    "models",
    "purposes",
    "enabled",
    "api_key",
)


def _added(change: dict[str, Any]) -> list[str]:
    fields = change["changes"]
    shown = [f"{k}: {_code(fields[k]['new'])}" for k in _SHOWN_WHEN_ADDED if k in fields]
    return [f"- **`{change['subject']}`** (`{change['file']}`): " + ", ".join(shown), ""]


def _removed(change: dict[str, Any]) -> list[str]:
    return [f"- **`{change['subject']}`** (`{change['file']}`)", ""]


def _updated(change: dict[str, Any]) -> list[str]:
    lines = [
        f"**`{change['subject']}`** (`{change['file']}`)",
        "",
        "| field | before | after |",
        "|---|---|---|",
    ]
    for name, values in change["changes"].items():
        before = _code(values.get("old"))
        after = _code(values.get("new")) if "new" in values else "*(removed)*"
        if "note" in values:
            after = f"{after}: {_cell(values['note'])}"
        lines.append(f"| {name} | {before} | {after} |")
    return [*lines, ""]


def _keyed(describe: Any) -> Any:
    def render(change: dict[str, Any]) -> list[str]:
        lines = ["| | before | after |", "|---|---|---|"]
        for key, values in change["changes"].items():
            lines.append(f"| `{key}` | {describe(values['old'])} | {describe(values['new'])} |")
        return [*lines, ""]

    return render


def _route(route: Mapping[str, Any] | None) -> str:
    if route is None:
        return "—"
    weights = route.get("weights") or {}
    primary = ", ".join(f"{p} (weight {weights[p]:g})" if p in weights else p for p in route["primary"])
    fallbacks = ", ".join(route.get("fallbacks") or []) or "none"
    return _cell(f"primary: {primary}; fallbacks: {fallbacks}")


def _scopes(client: Mapping[str, Any] | None) -> str:
    if client is None:
        return "—"
    shown = ", ".join(client.get("scopes", []))
    limits = client.get("limits") or {}
    if limits:
        parts = [f"{k} {v}" for k, v in limits.items() if k != "budget"]
        if "budget" in limits:
            parts.append(f"budget {limits['budget']['usd']} USD/{limits['budget']['period']}")
        shown += f"; limits: {', '.join(parts)}"
    if client.get("token_sha256"):  # masked (`****5d80`): a token replaced shows as one
        shown += f"; token `{client['token_sha256']}`"
    return _cell(shown)


def _code(value: Any) -> str:
    if value is None:
        return "—"
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    safe = _cell(text.replace("`", "'"))
    return f"`{safe}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
