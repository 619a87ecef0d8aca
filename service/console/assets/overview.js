// Overview: each purpose's route (primaries with their weights, fallbacks) with each
// provider's health; the generation and commits the service runs; refused files and why.

import { badge, clip, commitCode, h, keepFocus, note, number, own, providerLink, replace } from "./dom.js";

const PURPOSES = ["chat", "embeddings", "reranking"];

export function mount(main, { store }) {
  const status = h("section", { class: "cards", "aria-label": "Status" });
  const refused = h("section", { "aria-labelledby": "refused-title" });
  const routes = h("section", { class: "routes", "aria-labelledby": "routes-title" });
  main.append(h("h1", { tabindex: "-1" }, "Overview"), status, refused, routes);

  function draw() {
    keepFocus(main, () => {
      drawStatus(status, store);
      drawRefused(refused, store);
      drawRoutes(routes, store);
    });
  }
  draw();
  return {
    update(changed) {
      if (changed.has("ready") || changed.has("active") || changed.has("providers")) draw();
    },
  };
}

function card(label, value, extra) {
  return h("div", { class: "card stat" }, h("div", { class: "stat-label" }, label), h("div", { class: "stat-value" }, value), extra);
}

function drawStatus(el, store) {
  const ready = store.ready;
  if (!ready) {
    const why = store.readyError ? store.readyError.message : "loading…";
    replace(el, card("Status", "not ready", h("div", { class: "help" }, why)));
    return;
  }
  const counts = { healthy: 0, unhealthy: 0, unknown: 0 };
  let enabled = 0;
  for (const p of store.providers) {
    if (p.enabled) enabled += 1;
    counts[p.health.status] = (counts[p.health.status] ?? 0) + 1;
  }
  replace(
    el,
    card(
      "Status",
      ready.degraded ? "degraded" : "ready",
      h("div", { class: "help" }, ready.degraded ? "some files are refused (below)" : "every file applied"),
    ),
    card("Generation", number(ready.generation)),
    card("Last applied commit", commitCode(ready.last_applied_commit)),
    card("Last attempted commit", commitCode(ready.last_attempted_commit)),
    card(
      "Providers",
      number(store.providers.length),
      h(
        "div",
        { class: "help" },
        `${number(enabled)} enabled · `,
        h("span", { class: counts.healthy ? "count-healthy" : null }, `${number(counts.healthy)} healthy`),
        " · ",
        h("span", { class: counts.unhealthy ? "count-unhealthy" : null }, `${number(counts.unhealthy)} unhealthy`),
        " · ",
        `${number(counts.unknown)} unknown`,
      ),
    ),
  );
}

function drawRefused(el, store) {
  const files = store.ready?.refused ?? [];
  replace(el, h("h2", { id: "refused-title" }, "Refused files"));
  if (!files.length) {
    el.append(h("p", { class: "help" }, "No file is refused."));
    return;
  }
  el.append(
    h(
      "p",
      { class: "help" },
      "Each keeps its last good version (or, new, is skipped) until a good version is committed.",
    ),
    h(
      "div",
      { class: "scroll" },
      h(
        "table",
        { class: "refused" },
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "File"), h("th", { scope: "col" }, "Reason"))),
        h(
          "tbody",
          {},
          files.map((f) =>
            h("tr", {}, h("td", { "data-label": "File" }, h("code", {}, f.file)), h("td", { class: "reason", "data-label": "Reason" }, f.reason)),
          ),
        ),
      ),
    ),
  );
}

function drawRoutes(el, store) {
  replace(el, h("h2", { id: "routes-title" }, "Routes"));
  if (store.errors.get("active")) {
    el.append(note("The routes could not be read: ", store.errors.get("active").message));
    return;
  }
  const purposes = store.active?.purposes ?? {};
  const grid = h("div", { class: "route-grid" });
  for (const purpose of PURPOSES) {
    const route = purposes[purpose];
    grid.append(
      route
        ? routeCard(purpose, route, store)
        : h(
            "article",
            { class: "card route", dataset: { purpose } },
            h("h3", {}, purpose),
            h("p", { class: "help" }, "Not routed: requests for it answer 404 (model_not_found)."),
          ),
    );
  }
  el.append(grid);
}

function routeCard(purpose, route, store) {
  const total = route.primary.reduce((sum, p) => sum + (own(route.weights, p.id) ?? 1), 0);
  const item = (p, weight) => {
    const health = store.byId.get(p.id)?.health ?? p.health;
    return h(
      "li",
      {},
      providerLink(p.id),
      p.name ? h("span", { class: "muted" }, ` ${clip(p.name, 200)}`) : null,
      " ",
      p.enabled ? badge(health.status) : badge("disabled"),
      weight === undefined
        ? null
        : h("span", { class: "weight", title: `weight ${weight} of ${total}` }, ` weight ${weight} · ${Math.round((weight / total) * 100)}%`),
    );
  };
  return h(
    "article",
    { class: "card route", dataset: { purpose } },
    h("h3", {}, purpose),
    h("h4", {}, route.primary.length > 1 ? "Primaries (load-balanced by weight)" : "Primary"),
    route.primary.length
      ? h("ul", { class: "plain" }, route.primary.map((p) => item(p, own(route.weights, p.id) ?? 1)))
      : h("p", { class: "help" }, "none available"),
    h("h4", {}, "Fallbacks, in order"),
    route.fallbacks.length ? h("ol", { class: "plain" }, route.fallbacks.map((p) => item(p))) : h("p", { class: "help" }, "none"),
    route.unavailable?.length
      ? note("Named but unavailable (their files are refused): ", route.unavailable.join(", "))
      : null,
  );
}
