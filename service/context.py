"""What request handlers read: the typed keys of the aiohttp application.

Set once by `create_app` and its cleanup context; handlers only read them.
"""

from __future__ import annotations

from aiohttp import web

from service.events import EventLog
from service.health import Health
from service.metrics import Metrics
from service.registry import Registry
from service.settings import Settings
from service.sops import Sops
from service.watcher import Reloader

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
SOPS = web.AppKey("sops", Sops)
EVENTS = web.AppKey("events", EventLog)
REGISTRY = web.AppKey("registry", Registry)
RELOADER = web.AppKey("reloader", Reloader)
HEALTH = web.AppKey("health", Health)
