"""What a change does to limits and budgets, in words a reviewer can approve or not.

A section of the plan of a pull request (`plan.make_plan`): the two sides' masked views
compared client by client and provider by provider (docs/reference.md §13).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from service.config.view import ConfigView

_LIMITS = (("rpm", "requests a minute"), ("tpm", "tokens a minute"), ("max_parallel", "requests in flight"))
_PERIODS = {"day": "a day", "week": "a week", "month": "a month", "total": "in all"}


def limit_changes(before: ConfigView, after: ConfigView) -> list[str]:
    """What a change does to limits and budgets, in words a reviewer can approve or not:
    `client `ops`: budget raised from 50 to 80 USD a month`."""
    lines: list[str] = []
    old_clients, new_clients = before.get("clients", {}), after.get("clients", {})
    for name in sorted(old_clients.keys() | new_clients.keys()):
        old = (old_clients.get(name) or {}).get("limits") or {}
        new = (new_clients.get(name) or {}).get("limits") or {}
        who = f"client `{name}`"
        for key, unit in _LIMITS:
            lines += _count_change(who, key, unit, old.get(key), new.get(key))
        lines += _budget_change(who, old.get("budget"), new.get("budget"))
    old_providers, new_providers = before.get("providers", {}), after.get("providers", {})
    for pid in sorted(old_providers.keys() | new_providers.keys()):
        old_budget = (old_providers.get(pid) or {}).get("budget")
        new_budget = (new_providers.get(pid) or {}).get("budget")
        lines += _budget_change(f"provider `{pid}`", old_budget, new_budget)
    return lines


def _count_change(who: str, key: str, unit: str, old: Any, new: Any) -> list[str]:
    if old == new:
        return []
    if old is None:
        return [f"{who}: {key} set to {new:,} {unit} (unlimited before)"]
    if new is None:
        return [f"{who}: {key} removed (unlimited now; {old:,} {unit} before)"]
    verb = "raised" if new > old else "lowered"
    return [f"{who}: {key} {verb} from {old:,} to {new:,} {unit}"]


def _budget_change(who: str, old: Any, new: Any) -> list[str]:
    if old == new:
        return []
    if not isinstance(new, dict):
        return [f"{who}: budget removed (no cap now; {_budget(old)} before)"]
    if not isinstance(old, dict):
        return [f"{who}: budget set to {_budget(new)} (no cap before)"]
    if old.get("period") != new.get("period"):
        return [f"{who}: budget changed from {_budget(old)} to {_budget(new)}"]
    before_usd, after_usd = Decimal(str(old["usd"])), Decimal(str(new["usd"]))
    verb = "raised" if after_usd > before_usd else "lowered"
    return [f"{who}: budget {verb} from {old['usd']} to {_budget(new)}"]


def _budget(budget: Any) -> str:
    if not isinstance(budget, dict):
        return "none"
    period = _PERIODS.get(str(budget.get("period")), str(budget.get("period")))
    return f"{budget.get('usd')} USD {period}"
