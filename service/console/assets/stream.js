// The event stream (`GET …/events`), read with fetch rather than EventSource.
//
// EventSource cannot send an Authorization header, and a token must never travel in a URL.
// So the stream is a fetch whose body is read as it arrives and parsed as server-sent
// events. It starts from the beginning of the log (`?after=0`); after a drop it resumes with
// `Last-Event-ID`, and the service first sends what was missed, from the log. The service's
// `: connected` comment marks the end of that catch-up.

import { API, ApiError } from "./api.js";

const SILENCE_MS = 40_000; // the service comments every 15 s: this much silence is a dead connection
const MAX_BACKOFF_MS = 15_000;

export class EventStream {
  /** `handlers`: `event(e, size)` (size: its JSON's length), `connected()` once caught up, `status(text)`, `failed(ApiError)` (fatal). */
  constructor(api, handlers) {
    this.api = api;
    this.handlers = handlers;
    this.last = null;
    this.controller = null;
    this.stopped = false;
    this.replaying = false;
  }

  start() {
    this.stopped = false;
    this.run();
  }

  stop() {
    this.stopped = true;
    this.controller?.abort();
  }

  async run() {
    let failures = 0;
    while (!this.stopped) {
      this.handlers.status(failures ? "reconnecting" : "connecting");
      try {
        await this.once(() => {
          failures = 0;
        });
      } catch (error) {
        if (this.stopped) return;
        if (error instanceof ApiError && [401, 403].includes(error.status)) {
          this.handlers.failed(error);
          return;
        }
      }
      if (this.stopped) return;
      failures += 1;
      this.handlers.status("reconnecting");
      const backoff = Math.min(MAX_BACKOFF_MS, 500 * 2 ** Math.min(failures - 1, 5));
      await sleep(backoff / 2 + Math.random() * (backoff / 2));
    }
  }

  async once(onOpen) {
    const controller = (this.controller = new AbortController());
    const headers = this.api.headers({ Accept: "text/event-stream" });
    let path = `${API}/events`;
    if (this.last === null) path += "?after=0"; // the whole log, from its start
    else headers["Last-Event-ID"] = String(this.last);
    const response = await fetch(this.api.url(path), { headers, signal: controller.signal, cache: "no-store" });
    if (!response.ok) {
      let body = null;
      try {
        body = await response.json();
      } catch {}
      throw this.api.failed(response.status, body);
    }
    onOpen();
    this.replaying = true;
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let fields = { data: [] };
    let timer = setTimeout(() => controller.abort(), SILENCE_MS);
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        clearTimeout(timer);
        timer = setTimeout(() => controller.abort(), SILENCE_MS);
        buffer += value;
        const lines = buffer.split(/\r\n|\r|\n/);
        buffer = lines.pop();
        for (const line of lines) fields = this.line(line, fields);
      }
    } finally {
      clearTimeout(timer);
      controller.abort();
    }
  }

  line(line, fields) {
    if (line === "") {
      if (fields.data.length) this.dispatch(fields);
      return { data: [] };
    }
    if (line.startsWith(":")) {
      if (line.slice(1).trim() === "connected") {
        this.replaying = false;
        this.handlers.status("live");
        this.handlers.connected();
      }
      return fields;
    }
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "data") fields.data.push(value);
    else if (name === "id") fields.id = value;
    else if (name === "event") fields.event = value;
    return fields;
  }

  dispatch(fields) {
    const data = fields.data.join("\n");
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      return; // not an event of the log: nothing to show
    }
    if (!event || typeof event !== "object" || typeof event.seq !== "number") return;
    // What the log replays was maybe seen before the drop; what comes live is new (the service
    // sends each event once), even when its seq is lower, as after the log was replaced.
    if (this.replaying && this.last !== null && event.seq <= this.last) return;
    this.last = event.seq;
    this.handlers.event(event, data.length);
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
