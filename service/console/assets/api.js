// The HTTP API as the console calls it: like any client, with the token as a bearer header.
//
// The token lives in the tab's sessionStorage (asked once per tab) and travels only in the
// `Authorization` header, never in a URL. GETs are conditional: the last answer and its ETag
// are kept, so a refresh that finds nothing new costs a 304.

const TOKEN_KEY = "switchboard.token";
export const API = "api/v1/llm-config";

/** Whether `token` can travel in a header at all (Latin-1, no control characters, not blank). */
export function sendable(token) {
  return typeof token === "string" && /^[\u0020-\u007e\u00a0-\u00ff]+$/.test(token) && token.trim() === token && token !== "";
}

/** An error answer: `status`, and the documented `{"error": {"type", "message", "problems"?}}`. */
export class ApiError extends Error {
  constructor(status, body) {
    const error = body && typeof body === "object" && body.error ? body.error : {};
    super(typeof error.message === "string" ? error.message : `HTTP ${status}`);
    this.status = status;
    this.type = typeof error.type === "string" ? error.type : "error";
    this.problems = Array.isArray(error.problems) ? error.problems : [];
  }
}

export class Api {
  /** `root`: the URL the service's paths are relative to (the console is at `<root>ui/`). */
  constructor(root) {
    this.root = root;
    // What the tab kept, if it can be a token at all: anything else (written by hand, or by
    // another script of this origin) would make every request throw before it is sent.
    const kept = sessionStorage.getItem(TOKEN_KEY);
    this.token = sendable(kept) ? kept : null;
    if (kept !== null && this.token === null) sessionStorage.removeItem(TOKEN_KEY);
    this.cache = new Map();
    this.onUnauthorized = () => {};
    this.onForbidden = () => {};
  }

  url(path) {
    return new URL(path, this.root).href;
  }

  setToken(token) {
    this.token = token;
    this.cache.clear();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  }

  headers(extra = {}) {
    const headers = { Accept: "application/json", ...extra };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    return headers;
  }

  /** GET `path`: `{body, etag, changed}`; a 304 gives the kept body with `changed` false. */
  async get(path, { conditional = true, signal } = {}) {
    const kept = conditional ? this.cache.get(path) : undefined;
    const headers = this.headers(kept ? { "If-None-Match": kept.etag } : {});
    const response = await fetch(this.url(path), { headers, signal, cache: "no-store" });
    if (response.status === 304 && kept) return { ...kept, changed: false };
    const body = await parse(response);
    if (!response.ok) throw this.failed(response.status, body);
    const etag = response.headers.get("ETag");
    if (conditional && etag) this.cache.set(path, { body, etag });
    return { body, etag, changed: true };
  }

  /** A write: JSON body, `If-Match` and `X-Switchboard-Reason` when given; `{status, body, etag}`. */
  async send(method, path, body, { ifMatch, reason } = {}) {
    const extra = { "Content-Type": "application/json" };
    if (ifMatch) extra["If-Match"] = ifMatch;
    if (reason) extra["X-Switchboard-Reason"] = utf8(reason);
    const init = { method, headers: this.headers(extra), cache: "no-store" };
    if (body !== undefined) init.body = JSON.stringify(body);
    const response = await fetch(this.url(path), init);
    const answer = await parse(response);
    if (!response.ok) throw this.failed(response.status, answer);
    return { status: response.status, body: answer, etag: response.headers.get("ETag") };
  }

  failed(status, body) {
    const error = new ApiError(status, body);
    if (status === 401) this.onUnauthorized(error);
    if (status === 403) this.onForbidden(error);
    return error;
  }
}

/**
 * `text` as its UTF-8 bytes, one character each. A header carries bytes, and fetch sends a
 * character below 256 as that byte: sent as it is, `café` would arrive as Latin-1, which
 * the service (reading UTF-8, as HTTP clients send) would commit as `caf\ufffd`.
 */
function utf8(text) {
  return Array.from(new TextEncoder().encode(text), (byte) => String.fromCharCode(byte)).join("");
}

async function parse(response) {
  const text = await response.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return { error: { type: "not_json", message: `HTTP ${response.status}: not JSON` } };
  }
}
