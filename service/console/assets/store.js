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
// The timeline keeps the newest events (the CLI has them all): at most MAX_EVENTS, and at
// most MAX_CHARS of their JSON, since a few events of huge files weigh as much as many small
// ones. Older ones are dropped TRIM (or a quarter of the budget) at a time: dropping them one
// by one moved the whole array for each event that arrived (seconds of a frozen page while a
// log of 150,000 events was read).
const MAX_EVENTS = 50_000;
const MAX_CHARS = 64 * 1024 * 1024;
const TRIM = 5_000;

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
    this.sizes = []; // each event's JSON length, in step with `events`
    this.chars = 0;
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
        event: (event, size) => this.arrived(event, size),
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

  /** An event of the stream; `size`: the length of its JSON. */
  arrived(event, size = 0) {
    this.events.push(event);
    this.sizes.push(size);
    this.chars += size;
    if (this.events.length > MAX_EVENTS + TRIM || this.chars > MAX_CHARS) this.trim();
    if (!this.caughtUp) return; // the catch-up ends with one refresh and one redraw
    this.changed("events");
    const kinds = REFRESHES[event.type];
    if (kinds) this.refresh(kinds);
  }

  /** Drop the oldest events: down to MAX_EVENTS, and to three quarters of MAX_CHARS. */
  trim() {
    let drop = Math.max(0, this.events.length - MAX_EVENTS);
    let chars = this.chars;
    for (let i = 0; i < drop; i++) chars -= this.sizes[i];
    while (chars > (MAX_CHARS * 3) / 4 && drop < this.events.length - 1) chars -= this.sizes[drop++];
    this.events.splice(0, drop);
    this.sizes.splice(0, drop);
    this.chars = chars;
    this.trimmed += drop;
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
