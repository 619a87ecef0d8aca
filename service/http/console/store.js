// What the console knows: who the token is, the configuration, health, traffic and the log.
//
// The pages read it and subscribe to its changes. The event stream keeps it current: an
// event of a configuration or health change refreshes what it touches (conditional GETs, so
// nothing is sent twice), and the log's events feed the timelines. Traffic and health's
// details (latency, last check) move without an event: what the page shown needs of them is
// asked again every `POLL_MS` while the tab is visible.

import { API, ApiError } from "./api.js";
import { EventStream } from "./stream.js";

const POLL_MS = 10_000;
const MAX_EVENTS = 50_000; // kept for the timeline; older ones are dropped (the CLI has them all)

const REFRESHES = {
  "provider.added": ["ready", "active", "providers", "traffic"],
  "provider.updated": ["ready", "active", "providers"],
  "provider.removed": ["ready", "active", "providers", "traffic"],
  "routing.updated": ["ready", "active"],
  "config.rejected": ["ready", "active", "providers"],
  "provider.health_changed": ["active", "providers"],
  "clients.updated": ["whoami"],
  "service.started": ["ready"],
  "sync.failed": ["ready"],
};

export class Store {
  constructor(api) {
    this.api = api;
    this.whoami = null;
    this.ready = null;
    this.readyError = null;
    this.active = null;
    this.providers = [];
    this.byId = new Map();
    this.traffic = null;
    this.events = [];
    this.trimmed = 0;
    this.live = "connecting";
    this.caughtUp = false;
    this.errors = new Map();
    this.listeners = new Set();
    this.pending = new Set();
    this.queued = new Set();
    this.refreshing = null;
    this.stream = null;
    this.poller = null;
    // What the page shown reads that moves without an event (set by the router).
    this.polled = [];
  }

  can(scope) {
    return Boolean(this.whoami && this.whoami.scopes.includes(scope));
  }

  /** `listener(changed: Set<string>)` after each batch of changes; returns an unsubscribe. */
  subscribe(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  changed(...keys) {
    const first = this.pending.size === 0;
    for (const key of keys) this.pending.add(key);
    if (!first) return;
    queueMicrotask(() => {
      const keys = new Set(this.pending);
      this.pending.clear();
      for (const listener of [...this.listeners]) listener(keys);
    });
  }

  /** Start: everything the token may read, then the event stream and the polling. */
  async start() {
    const kinds = ["ready"];
    if (this.can("config:read")) kinds.push("active", "providers", "traffic");
    await this.refresh(kinds);
    if (this.can("config:read")) {
      this.stream = new EventStream(this.api, {
        event: (event) => this.arrived(event),
        connected: () => this.connected(),
        status: (text) => {
          this.live = text;
          this.changed("live");
        },
        failed: (error) => {
          this.live = error.status === 403 ? "no access" : "signed out";
          this.changed("live");
        },
      });
      this.stream.start();
      this.poller = setInterval(() => {
        if (document.visibilityState === "visible" && this.polled.length) this.refresh(this.polled);
      }, POLL_MS);
    }
  }

  stop() {
    this.stream?.stop();
    clearInterval(this.poller);
  }

  connected() {
    // What changed between the first GETs and the end of the catch-up: one conditional round.
    this.caughtUp = true;
    this.refresh(["ready", "active", "providers", "traffic"]);
    this.changed("events");
  }

  arrived(event) {
    this.events.push(event);
    if (this.events.length > MAX_EVENTS) {
      const drop = this.events.length - MAX_EVENTS;
      this.events.splice(0, drop);
      this.trimmed += drop;
    }
    if (!this.caughtUp) return; // the catch-up ends with one refresh and one redraw
    this.changed("events");
    const kinds = REFRESHES[event.type];
    if (kinds) this.refresh(kinds);
  }

  /** Fetch what `kinds` name, coalesced: one request of each in flight, the rest queued. */
  refresh(kinds) {
    for (const kind of kinds) this.queued.add(kind);
    if (!this.refreshing) {
      this.refreshing = (async () => {
        while (this.queued.size) {
          const batch = [...this.queued];
          this.queued.clear();
          await Promise.all(batch.map((kind) => this.fetch(kind)));
        }
        this.refreshing = null;
      })();
    }
    return this.refreshing;
  }

  async fetch(kind) {
    try {
      if (kind === "ready") {
        try {
          this.ready = (await this.api.get("readyz", { conditional: false })).body;
          this.readyError = null;
        } catch (error) {
          this.readyError = error;
        }
        this.changed("ready");
        return;
      }
      if (kind === "whoami") {
        this.whoami = (await this.api.get(`${API}/whoami`, { conditional: false })).body;
        this.changed("whoami");
        return;
      }
      const path = { active: `${API}/active`, providers: `${API}/providers`, traffic: `${API}/traffic` }[kind];
      const { body, changed } = await this.api.get(path);
      this.errors.delete(kind);
      if (!changed) return;
      if (kind === "providers") {
        this.providers = body.providers;
        this.byId = new Map(body.providers.map((p) => [p.id, p]));
      } else this[kind] = body;
      this.changed(kind);
    } catch (error) {
      if (!(error instanceof ApiError) && !(error instanceof TypeError)) throw error;
      this.errors.set(kind, error);
      this.changed(kind);
    }
  }

  /** The events about `subject`, newest first, at most `limit`. */
  eventsOf(subject, limit = 20) {
    const found = [];
    for (let i = this.events.length - 1; i >= 0 && found.length < limit; i--) {
      if (this.events[i].subject === subject) found.push(this.events[i]);
    }
    return found;
  }
}
