// Providers: a table of every provider with its health and traffic, filtered, sorted and
// paged, so a thousand of them draw as fast as fifty (only one page is in the DOM).

import { badge, clip, few, h, keepFocus, ms, note, number, own, providerLink, replace, when } from "./dom.js";

const PAGE = 50;
const SHORT = 200; // a cell's text at most: one long value must not make a row a page tall
const MODELS = 10; // models shown in a cell; the provider's page has them all

const COLUMNS = [
  { key: "id", title: "Provider", value: (p) => p.id },
  { key: "kind", title: "Kind", value: (p) => p.kind },
  { key: "type", title: "Vendor / server", value: (p) => p.provider ?? p.server_type },
  { key: "url", title: "URL", value: (p) => p.base_url },
  { key: "models", title: "Models", value: (p) => p.models.join(", ") },
  { key: "purposes", title: "Purposes", value: (p) => p.purposes.join(", ") },
  { key: "key", title: "Key", value: (p) => p.api_key ?? "" },
  { key: "health", title: "Health", value: (p) => (p.enabled ? p.health.status : "disabled") },
  { key: "requests", title: "Requests", numeric: true, value: (p, t) => t?.requests ?? 0 },
  { key: "errors", title: "Errors", numeric: true, value: (p, t) => t?.errors ?? 0 },
  { key: "latency", title: "Latency", numeric: true, value: (p, t) => t?.latency_ms ?? -1 },
  { key: "tokens", title: "Tokens", numeric: true, value: (p, t) => (t ? t.tokens.prompt + t.tokens.completion : 0) },
];

export function mount(main, { store, params }) {
  const state = { filter: params.q ?? "", kind: "", health: "", sort: "id", descending: false, page: 0 };
  const filter = h("input", {
    id: "filter",
    type: "search",
    value: state.filter,
    placeholder: "id, name, URL, model…",
    autocomplete: "off",
    spellcheck: "false",
    oninput: () => {
      state.filter = filter.value;
      state.page = 0;
      draw();
    },
  });
  const kind = select("kind", "Kind", [["", "any"], ["api_key", "api_key"], ["ai_server", "ai_server"]], (v) => {
    state.kind = v;
    state.page = 0;
    draw();
  });
  const health = select("health", "Health", [["", "any"], ["healthy", "healthy"], ["unhealthy", "unhealthy"], ["unknown", "unknown"], ["disabled", "disabled"]], (v) => {
    state.health = v;
    state.page = 0;
    draw();
  });
  const summary = h("p", { class: "help", id: "providers-summary", role: "status", "aria-live": "polite" });
  const problem = h("div", { role: "alert" });
  const head = h("thead");
  const body = h("tbody");
  const pager = h("nav", { class: "pager", "aria-label": "Pages of providers" });
  const since = h("p", { class: "help" });
  main.append(
    h("h1", { tabindex: "-1" }, "Providers"),
    h(
      "div",
      { class: "toolbar" },
      h("div", { class: "field" }, h("label", { for: "filter" }, "Filter"), filter),
      kind.field,
      health.field,
    ),
    problem,
    summary,
    h("div", { class: "scroll" }, h("table", { class: "providers", "aria-describedby": "providers-summary" }, head, body)),
    pager,
    since,
  );

  function rows() {
    const needle = state.filter.trim().toLowerCase();
    const traffic = store.traffic?.providers ?? {};
    let found = store.providers.filter((p) => {
      if (state.kind && p.kind !== state.kind) return false;
      if (state.health && (p.enabled ? p.health.status : "disabled") !== state.health) return false;
      if (!needle) return true;
      return (
        p.id.includes(needle) ||
        (p.name ?? "").toLowerCase().includes(needle) ||
        p.base_url.toLowerCase().includes(needle) ||
        p.models.some((m) => m.toLowerCase().includes(needle))
      );
    });
    const column = COLUMNS.find((c) => c.key === state.sort) ?? COLUMNS[0];
    const sign = state.descending ? -1 : 1;
    found = found
      .map((p) => [column.value(p, own(traffic, p.id)), p])
      .sort(([a, pa], [b, pb]) => (a < b ? -sign : a > b ? sign : pa.id < pb.id ? -1 : 1))
      .map(([, p]) => p);
    // An exact id first, whatever the order: the filter box finds one provider by its id.
    const exact = found.findIndex((p) => p.id === needle);
    if (exact > 0) found.unshift(...found.splice(exact, 1));
    return found;
  }

  function drawHead() {
    replace(
      head,
      h(
        "tr",
        {},
        COLUMNS.map((c) => {
          const sorted = state.sort === c.key;
          return h(
            "th",
            { scope: "col", class: c.numeric ? "num" : null, "aria-sort": sorted ? (state.descending ? "descending" : "ascending") : null },
            h(
              "button",
              {
                type: "button",
                id: `sort-${c.key}`,
                class: "sort",
                title: `sort by ${c.title.toLowerCase()}`,
                onclick: () => {
                  state.descending = sorted ? !state.descending : Boolean(c.numeric);
                  state.sort = c.key;
                  state.page = 0;
                  keepFocus(head, drawHead);
                  draw();
                },
              },
              c.title,
              sorted ? (state.descending ? " ▼" : " ▲") : "",
            ),
          );
        }),
      ),
    );
  }

  function draw() {
    keepFocus(main, redraw);
  }

  function redraw() {
    const failed = store.errors.get("providers");
    replace(problem, failed ? note("The providers could not be read: ", failed.message) : null);
    const found = rows();
    const pages = Math.max(1, Math.ceil(found.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    const first = state.page * PAGE;
    const shown = found.slice(first, first + PAGE);
    const traffic = store.traffic?.providers ?? {};
    replace(body, shown.map((p) => row(p, own(traffic, p.id))));
    if (!shown.length) {
      body.append(h("tr", {}, h("td", { colspan: String(COLUMNS.length), class: "empty" }, store.providers.length ? "No provider matches." : "No providers.")));
    }
    replace(
      summary,
      found.length
        ? `Showing ${number(first + 1)}–${number(first + shown.length)} of ${number(found.length)}`
        : "Showing none",
      found.length !== store.providers.length ? ` (filtered from ${number(store.providers.length)})` : "",
    );
    replace(
      pager,
      h("button", { type: "button", id: "page-previous", disabled: state.page === 0, onclick: () => turn(-1) }, "Previous"),
      h("span", {}, ` Page ${number(state.page + 1)} of ${number(pages)} `),
      h("button", { type: "button", id: "page-next", disabled: state.page >= pages - 1, onclick: () => turn(1) }, "Next"),
    );
    replace(
      since,
      store.traffic
        ? `Traffic since the service started, ${when(store.traffic.since)}; latency is the mean time to the first byte of an answer.`
        : store.errors.get("traffic")
          ? note("Traffic could not be read: ", store.errors.get("traffic").message)
          : "",
    );
  }

  function turn(step) {
    state.page += step;
    draw();
  }

  drawHead();
  draw();
  return {
    update(changed) {
      if (changed.has("providers") || changed.has("traffic")) draw();
    },
  };
}

function row(p, t) {
  // One element per cell, so a narrow window can lay each out as "label: value".
  const cell = (label, ...content) => h("td", { "data-label": label }, h("div", {}, ...content));
  const num = (label, value) => h("td", { class: "num", "data-label": label }, h("div", {}, value));
  return h(
    "tr",
    { dataset: { id: p.id } },
    cell("Provider", providerLink(p.id), p.name ? h("div", { class: "muted" }, clip(p.name, SHORT)) : null),
    cell("Kind", h("span", { class: "nowrap" }, p.kind)),
    cell("Vendor / server", p.provider ?? p.server_type),
    cell("URL", h("span", { class: "url" }, clip(p.base_url, SHORT))),
    cell("Models", p.models.length ? few(p.models, MODELS) : h("span", { class: "muted" }, "any")),
    cell("Purposes", p.purposes.join(", ")),
    cell("Key", p.api_key ? h("code", { class: "nowrap" }, p.api_key) : h("span", { class: "muted" }, "none")),
    cell("Health", p.enabled ? badge(p.health.status) : badge("disabled")),
    num("Requests", number(t?.requests ?? 0)),
    num("Errors", number(t?.errors ?? 0)),
    num("Latency", ms(t?.latency_ms)),
    num("Tokens", number(t ? t.tokens.prompt + t.tokens.completion : 0)),
  );
}

function select(id, label, options, onchange) {
  const el = h(
    "select",
    { id, onchange: () => onchange(el.value) },
    options.map(([value, text]) => h("option", { value }, text)),
  );
  return { el, field: h("div", { class: "field" }, h("label", { for: id }, label), el) };
}
