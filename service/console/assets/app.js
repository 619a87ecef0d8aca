// The console's entry point: who the token is, the frame around the pages, and the router.
//
// The page asks for a token once per tab (not when the service runs without
// authentication: `whoami` then answers without one), learns the token's scopes from
// `whoami`, and offers only the pages and controls those scopes allow, saying where it
// leaves something out. Pages are `#/…` routes; each is a module with `mount(main, ctx)`
// that returns `{update(changed), unmount()}`, so live changes redraw only what they touch.

import { API, Api, ApiError, sendable } from "./api.js";
import { h, note, replace } from "./dom.js";
import { Store } from "./store.js";
import * as overview from "./overview.js";
import * as providers from "./providers.js";
import * as provider from "./provider.js";
import * as changes from "./changes.js";
import * as events from "./events.js";
import * as usage from "./usage.js";

// `polled`: what the page shows that moves without an event (traffic, health's details, the
// commits readyz names, which a commit of files already served moves),
// asked again every few seconds while the page is shown.
const PAGES = [
  { path: "overview", title: "Overview", scope: "config:read", page: overview, polled: ["providers", "ready"] },
  { path: "providers", title: "Providers", scope: "config:read", page: providers, polled: ["providers", "traffic"] },
  { path: "changes", title: "Changes", scope: "config:write", page: changes, polled: [] },
  { path: "events", title: "Events", scope: "config:read", page: events, polled: [] },
  { path: "usage", title: "Usage", scope: "usage:read", page: usage, polled: [] },
];

const api = new Api(new URL("../", location.href).href);
const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
let store = null;
let current = null;

// -- who is calling ---------------------------------------------------------------------------------

async function whoami() {
  return (await api.get(`${API}/whoami`, { conditional: false })).body;
}

async function boot(message) {
  stopPage();
  store?.stop();
  store = null;
  // From here a 401 answers "does the service want a token?", not "the session ended": were
  // the last session's handler left in place, each 401 would boot again, endlessly.
  api.onUnauthorized = () => {};
  api.onForbidden = () => {};
  replace(nav);
  replace(who);
  let identity = null;
  try {
    if (api.token) {
      try {
        identity = await whoami();
      } catch (error) {
        if (!(error instanceof ApiError) || error.status !== 401) throw error;
        api.setToken(null);
        message = "The service does not accept the token this tab had; enter one again.";
      }
    }
    if (!identity) {
      try {
        identity = await whoami(); // answers without a token when the service has no clients file
      } catch (error) {
        if (!(error instanceof ApiError) || error.status !== 401) throw error;
        return login(message);
      }
    }
  } catch (error) {
    return unavailable(error);
  }
  return start(identity);
}

function login(message) {
  // No `name`: were the form ever submitted natively, the token would not go into a URL.
  const input = h("input", {
    id: "token",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
    "aria-describedby": "token-help",
  });
  const problem = h("p", { class: "problem", role: "alert", id: "token-problem" }, message ?? "");
  const form = h(
    "form",
    { class: "login card", onsubmit: (e) => submit(e) },
    h("h1", {}, "Sign in"),
    h("label", { for: "token" }, "Token"),
    input,
    h(
      "p",
      { id: "token-help", class: "help" },
      "A token of the service's clients file (",
      h("code", {}, "switchboard token create NAME --scope config:read"),
      "). It is kept in this tab only (sessionStorage) and sent as a bearer header, never in a URL.",
    ),
    problem,
    h("button", { type: "submit", class: "primary" }, "Sign in"),
  );
  async function submit(e) {
    e.preventDefault();
    const token = input.value.trim();
    if (!token) return;
    if (!sendable(token)) {
      replace(problem, "The service does not know this token.");
      input.focus();
      return;
    }
    api.token = token;
    try {
      const identity = await whoami();
      api.setToken(token);
      input.value = "";
      start(identity);
    } catch (error) {
      api.token = null;
      replace(problem, error.status === 401 ? "The service does not know this token." : error.message);
      input.focus();
    }
  }
  replace(main, form);
  document.title = "Sign in · Switchboard";
  input.focus();
}

function unavailable(error) {
  const retry = h("button", { type: "button", onclick: () => boot() }, "Try again");
  replace(
    main,
    h(
      "section",
      { class: "card" },
      h("h1", {}, "The service cannot be reached"),
      h("p", { class: "problem" }, error instanceof ApiError ? `${error.status}: ${error.message}` : String(error)),
      retry,
    ),
  );
  setTimeout(() => {
    if (main.contains(retry)) boot();
  }, 3000);
}

// -- the frame --------------------------------------------------------------------------------------

function start(identity) {
  const session = (store = new Store(api));
  store.whoami = identity;
  api.onUnauthorized = () => {
    if (store !== session) return; // the answer to a request of a session already over
    api.setToken(null);
    boot("The service stopped accepting this token; enter one again.");
  };
  // A 403 may mean the clients file took a scope away: ask who the token is now.
  api.onForbidden = () => {
    if (store === session) store.refresh(["whoami"]);
  };
  let scopes = identity.scopes.join(" ");
  drawFrame();
  store.subscribe((changed) => {
    if (changed.has("whoami")) {
      drawFrame();
      const now = store.whoami.scopes.join(" ");
      if (now !== scopes) {
        scopes = now;
        route(); // the page shown may no longer be allowed (or now be)
      }
    }
    if (changed.has("live") || changed.has("whoami")) drawLive();
    current?.view.update(changed);
  });
  store.start();
  route();
}

function drawFrame() {
  replace(
    nav,
    h(
      "ul",
      {},
      PAGES.map(({ path, title, scope }) =>
        h(
          "li",
          {},
          store.can(scope)
            ? h("a", { href: `#/${path}`, dataset: { page: path } }, title)
            : h("span", { class: "nav-off", title: `needs the scope ${scope}` }, `${title} (needs ${scope})`),
        ),
      ),
    ),
  );
  const identity = store.whoami;
  const scopes = identity.scopes.join(", ");
  replace(
    who,
    h("span", { class: "live", id: "live", role: "status" }),
    identity.client === null
      ? h("span", { class: "client", title: "no clients file: loopback only" }, "no authentication")
      : h("span", { class: "client", title: `scopes: ${scopes}` }, identity.client),
    api.token ? h("button", { type: "button", class: "quiet", onclick: signOut }, "Sign out") : null,
  );
  drawLive();
  markNav();
}

function drawLive() {
  const live = document.getElementById("live");
  if (!live || !store) return;
  live.className = `live live-${store.live.replace(/\s+/g, "-")}`;
  replace(live, store.can("config:read") ? store.live : "");
}

function signOut() {
  api.setToken(null);
  boot("Signed out.");
}

// -- the router -------------------------------------------------------------------------------------

function stopPage() {
  current?.view.unmount?.();
  current = null;
}

function route() {
  if (!store) return;
  const hash = location.hash || "#/overview";
  if (!hash.startsWith("#/")) return; // an anchor within the page
  const [pathPart, query = ""] = hash.slice(2).split("?");
  const parts = pathPart.split("/").map(decode);
  const params = Object.fromEntries(new URLSearchParams(query));
  let entry = PAGES.find((p) => p.path === parts[0]) ?? PAGES[0];
  let page = entry.page;
  if (entry.path === "providers" && parts[1]) page = provider;
  stopPage();
  store.polled = store.can(entry.scope) ? entry.polled : [];
  const ctx = { store, api, parts: parts.slice(1), params, go: (to) => (location.hash = to) };
  const key = `${entry.path}${parts[1] ? "/" + parts[1] : ""}`;
  if (!store.can(entry.scope)) {
    replace(main, forbidden(entry));
    current = { key, view: { update() {} } };
  } else {
    replace(main);
    current = { key, view: page.mount(main, ctx) };
  }
  document.title = `${main.querySelector("h1")?.textContent || entry.title} · Switchboard`;
  markNav(entry.path);
  window.scrollTo(0, 0); // a new page starts at its top, as a link to another document would
  main.querySelector("h1")?.focus({ preventScroll: true });
}

/** A part of a link, decoded; anyone writes links, and `%E0` is no encoding: taken as it is. */
function decode(part) {
  try {
    return decodeURIComponent(part);
  } catch {
    return part;
  }
}

function forbidden(entry) {
  const identity = store.whoami;
  return h(
    "section",
    {},
    h("h1", { tabindex: "-1" }, entry.title),
    note(
      `This page needs the scope ${entry.scope}; this token (`,
      identity.client ?? "no authentication",
      `) has ${identity.scopes.join(", ") || "none"}. `,
      entry.scope === "config:write"
        ? "The forms that change providers and routes are not offered."
        : entry.scope === "usage:read"
          ? "Nothing of usage, cost or budgets is shown."
          : "Nothing of the configuration is shown.",
    ),
  );
}

function markNav(path) {
  const active = path ?? current?.key.split("/")[0];
  for (const link of nav.querySelectorAll("a[data-page]")) {
    if (link.dataset.page === active) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

document.querySelector(".skip")?.addEventListener("click", (e) => {
  e.preventDefault();
  main.focus();
});
window.addEventListener("hashchange", route);
boot();
