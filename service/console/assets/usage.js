// Usage (usage:read): cost and tokens over time, stacked by client, provider or model; the
// top clients and models; each budget as spent / reserved / left; limit hits. Live: asked
// again every few seconds while shown (conditional GETs: an unchanged answer is a 304), and
// at once when the event log says a budget ran out or the clients changed.
//
// It reads the API like any client: `…/usage` (grouped), `…/usage/requests` (the latest
// refusals) and `…/limits`. A ledger that is down (503) is said in the page; the budgets,
// which do not need it, are still shown.

import { API, ApiError } from "./api.js";
import { clip, h, keepFocus, note, number, replace, when } from "./dom.js";
import { SERIES, approx, dollars, meter, stackedBars, units, usd } from "./chart.js";

const POLL_MS = 5_000;
const RANGES = {
  "24h": { label: "the last 24 hours", bucket: "hour" },
  "7d": { label: "the last 7 days", bucket: "day" },
  "30d": { label: "the last 30 days", bucket: "day" },
};
const BY = ["client", "provider", "model"];
const TOP = 10;
const TOP_BUDGETS = 20;
const LIVE_EVENTS = new Set(["budget.exhausted", "clients.updated", "provider.updated", "provider.added", "provider.removed"]);

export function mount(main, { store, api, params }) {
  const state = {
    range: Object.hasOwn(RANGES, params.range) ? params.range : "7d",
    by: BY.includes(params.by) ? params.by : "client",
    measure: params.measure === "tokens" ? "tokens" : "cost",
  };
  const select = (id, label, options, key) => {
    const el = h("select", { id, onchange: () => { state[key] = el.value; refresh(); } },
      options.map(([value, text]) => h("option", { value, selected: state[key] === value }, text)));
    return h("div", { class: "field" }, h("label", { for: id }, label), el);
  };
  const toolbar = h(
    "div",
    { class: "toolbar" },
    select("usage-range", "Period", Object.entries(RANGES).map(([k, r]) => [k, r.label]), "range"),
    select("usage-measure", "Show", [["cost", "cost (USD)"], ["tokens", "tokens"]], "measure"),
    select("usage-by", "Stacked by", BY.map((b) => [b, b]), "by"),
  );
  const status = h("div", { class: "usage-status", role: "status", "aria-live": "polite" });
  const cards = h("section", { class: "cards", "aria-label": "Totals" });
  const chart = h("section", { class: "card usage-chart", "aria-labelledby": "usage-chart-title" });
  const tops = h("section", { class: "usage-tops" });
  const budgets = h("section", { class: "card", "aria-labelledby": "budgets-title" });
  const hits = h("section", { class: "card", "aria-labelledby": "hits-title" });
  main.append(h("h1", { tabindex: "-1" }, "Usage"), toolbar, status, cards, chart, tops, budgets, hits);

  let stopped = false;
  let running = null;
  let again = false;
  async function refresh() {
    if (running) {
      again = true;
      return running;
    }
    running = (async () => {
      do {
        again = false;
        await load();
      } while (again && !stopped);
    })();
    try {
      await running;
    } finally {
      running = null;
    }
  }

  async function load() {
    const { range, by, measure } = state;
    const bucket = RANGES[range].bucket;
    const q = (group) => `${API}/usage?since=${range}&group_by=${group}`;
    const [series, clients, models, refusals, limits] = await Promise.all([
      get(api, q(`${bucket},${by}`)),
      get(api, q("client")),
      get(api, q("model")),
      get(api, `${API}/usage/requests?since=${range}&status=429&limit=10`),
      get(api, `${API}/limits`),
    ]);
    if (stopped) return;
    keepFocus(main, () => {
      const ledgerDown = [series, clients, models, refusals].find((a) => a.error)?.error ?? null;
      replace(
        status,
        ledgerDown ? note(problem(ledgerDown, "The usage ledger")) : null,
        h("span", { class: "help" }, `Updated ${new Date().toISOString().slice(11, 19)}Z · asked again every ${POLL_MS / 1000} s`),
      );
      drawCards(cards, clients.body);
      drawChart(chart, series.body, { bucket, by, measure, range });
      drawTops(tops, clients.body, models.body);
      drawBudgets(budgets, limits);
      drawHits(hits, clients.body, refusals.body, limits.body);
    });
  }

  refresh();
  const timer = setInterval(() => {
    if (document.visibilityState === "visible") refresh();
  }, POLL_MS);
  let seen = store.events.at(-1)?.seq ?? 0;
  return {
    update(changed) {
      if (!changed.has("events")) return;
      const fresh = store.events.filter((e) => e.seq > seen);
      seen = store.events.at(-1)?.seq ?? seen;
      if (fresh.some((e) => LIVE_EVENTS.has(e.type))) refresh();
    },
    unmount() {
      stopped = true;
      clearInterval(timer);
    },
  };
}

/** A GET's body, or the error that came instead (`{body: null, error}`). */
async function get(api, path) {
  try {
    return { body: (await api.get(path)).body, error: null };
  } catch (error) {
    return { body: null, error };
  }
}

function problem(error, what) {
  if (error instanceof ApiError && error.status === 503) return `${what} is unavailable (503 ${error.type}): ${error.message}. Budgets below come from the limits, which do not need it.`;
  if (error instanceof ApiError) return `${what}: ${error.status} ${error.type}: ${error.message}`;
  return `${what} could not be asked: ${error.message ?? error}`;
}

// -- totals ---------------------------------------------------------------------------------------

function tokens(row) {
  return (Number(row.prompt_tokens) || 0) + (Number(row.completion_tokens) || 0);
}

function card(label, value, extra) {
  return h("div", { class: "card stat" }, h("div", { class: "stat-label" }, label), h("div", { class: "stat-value" }, value), extra);
}

function drawCards(el, answer) {
  if (!answer) return replace(el);
  const t = answer.totals ?? {};
  replace(
    el,
    card("Cost", usd(t.cost_usd ?? "0"), h("div", { class: "help" }, answer.shared ? "ledger shared by every replica" : "this replica's ledger")),
    card("Requests", number(t.requests ?? 0)),
    card("Tokens", number(tokens(t)), h("div", { class: "help" }, `${number(t.prompt_tokens ?? 0)} in · ${number(t.completion_tokens ?? 0)} out`)),
    card("Errors", number(t.errors ?? 0)),
    card("Refused by a limit", number(t.limited ?? 0)),
  );
}

// -- the chart ------------------------------------------------------------------------------------

/** Every bucket of [since, until): `YYYY-MM-DD` or `YYYY-MM-DDTHH`. */
export function bucketsOf(since, until, bucket) {
  const start = new Date(since);
  const end = new Date(until);
  if (Number.isNaN(start.getTime()) || Number.isNaN(end.getTime())) return [];
  const keys = [];
  const at = new Date(start);
  if (bucket === "day") at.setUTCHours(0, 0, 0, 0);
  else at.setUTCMinutes(0, 0, 0);
  while (at < end && keys.length < 1000) {
    keys.push(key(at.toISOString(), bucket));
    if (bucket === "day") at.setUTCDate(at.getUTCDate() + 1);
    else at.setUTCHours(at.getUTCHours() + 1);
  }
  return keys;
}

function key(text, bucket) {
  return String(text).slice(0, bucket === "day" ? 10 : 13);
}

function drawChart(el, answer, { bucket, by, measure }) {
  const money = measure === "cost";
  const title = `${money ? "Cost" : "Tokens"} by ${by}, per ${bucket}`;
  if (!answer) return replace(el, h("h2", { id: "usage-chart-title" }, title), h("p", { class: "help" }, "No data: see above."));
  const buckets = bucketsOf(answer.since, answer.until, bucket);
  const index = new Map(buckets.map((b, i) => [b, i]));
  const byName = new Map();
  for (const row of answer.rows ?? []) {
    const i = index.get(key(row[bucket], bucket));
    if (i === undefined) continue;
    const name = row[by] === null || row[by] === undefined ? "(none)" : String(row[by]);
    let entry = byName.get(name);
    if (!entry) byName.set(name, (entry = { name, units: buckets.map(() => 0n), tokens: buckets.map(() => 0) }));
    entry.units[i] += units(row.cost_usd) ?? 0n;
    entry.tokens[i] += tokens(row);
  }
  const total = (e) => (money ? approx(e.units.reduce((a, b) => a + b, 0n)) : e.tokens.reduce((a, b) => a + b, 0));
  const ranked = [...byName.values()].sort((a, b) => total(b) - total(a) || (a.name < b.name ? -1 : 1));
  const shown = ranked.slice(0, SERIES);
  const rest = ranked.slice(SERIES);
  if (rest.length) {
    shown.push({
      name: `${rest.length} other${rest.length === 1 ? "" : "s"}`,
      other: true,
      units: buckets.map((_, i) => rest.reduce((a, e) => a + e.units[i], 0n)),
      tokens: buckets.map((_, i) => rest.reduce((a, e) => a + e.tokens[i], 0)),
    });
  }
  const series = shown.map((e) => ({ ...e, values: money ? e.units.map(approx) : e.tokens }));
  const labels = buckets.map((b) => (bucket === "day" ? b.slice(5) : `${b.slice(11, 13)}h`));
  const format = (value, s, i) => (money ? dollars(s.units[i]) : `${number(value)} tokens`);
  replace(el, h("h2", { id: "usage-chart-title" }, title), stackedBars({ title, buckets: labels, series, money, format }));
}

// -- the top clients and models -------------------------------------------------------------------

function ranking(answer, keyName) {
  return [...(answer?.rows ?? [])].sort((a, b) => {
    const d = (units(b.cost_usd) ?? 0n) - (units(a.cost_usd) ?? 0n);
    return d > 0n ? 1 : d < 0n ? -1 : tokens(b) - tokens(a) || String(a[keyName]).localeCompare(String(b[keyName]));
  });
}

function drawTops(el, clients, models) {
  const table = (id, title, answer, keyName) => {
    const rows = ranking(answer, keyName);
    return h(
      "div",
      { class: "card" },
      h("h2", { id }, title),
      rows.length
        ? h(
            "table",
            { class: "data", "aria-labelledby": id },
            h("thead", {}, h("tr", {}, h("th", { scope: "col" }, keyName), h("th", { scope: "col", class: "num" }, "requests"), h("th", { scope: "col", class: "num" }, "tokens"), h("th", { scope: "col", class: "num" }, "cost"))),
            h(
              "tbody",
              {},
              rows.slice(0, TOP).map((row) =>
                h("tr", { dataset: { name: clip(row[keyName] ?? "", 200) } }, h("td", { class: "name" }, clip(row[keyName] ?? "(none)", 120)), h("td", { class: "num" }, number(row.requests)), h("td", { class: "num" }, number(tokens(row))), h("td", { class: "num" }, usd(row.cost_usd))),
              ),
            ),
          )
        : h("p", { class: "help" }, answer ? "No requests in this period." : "No data: see above."),
      rows.length > TOP ? h("p", { class: "help" }, `and ${number(rows.length - TOP)} more (switchboard usage --by ${keyName} has them all)`) : null,
    );
  };
  replace(el, table("top-clients", "Top clients", clients, "client"), table("top-models", "Top models", models, "model"));
}

// -- budgets ----------------------------------------------------------------------------------------

function drawBudgets(el, limits) {
  const title = h("h2", { id: "budgets-title" }, "Budgets");
  if (limits.error) return replace(el, title, note(problem(limits.error, "The limits")));
  const subjects = [
    ...(limits.body.clients ?? []).filter((c) => c.limits?.budget).map((c) => ({ kind: "client", name: c.name, budget: c.limits.budget, used: c.used })),
    ...(limits.body.providers ?? []).filter((p) => p.limits?.budget).map((p) => ({ kind: "provider", name: p.id, budget: p.limits.budget, used: p.used })),
  ];
  if (!subjects.length) return replace(el, title, h("p", { class: "help" }, "No client or provider has a budget (limits.budget in the clients file, budget in a provider file)."));
  // The closest to their budget first, and only the first TOP_BUDGETS: a clients file of
  // thousands must not make a table of thousands, drawn again at every poll.
  for (const s of subjects) {
    s.budgetUnits = units(s.budget.usd);
    s.spentUnits = units(s.used.budget_spent_usd) ?? 0n;
    s.reservedUnits = units(s.used.budget_reserved_usd) ?? 0n;
    s.share = s.budgetUnits === null ? 0 : s.budgetUnits > 0n ? approx(s.spentUnits + s.reservedUnits) / approx(s.budgetUnits) : 1;
  }
  subjects.sort((a, b) => b.share - a.share || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const more = subjects.length - TOP_BUDGETS;
  replace(
    el,
    title,
    h("p", { class: "help" }, `Counted ${limits.body.mode === "redis" ? "across replicas (Redis)" : `by this replica (${limits.body.mode})`}.`),
    h(
      "table",
      { class: "data budgets", "aria-labelledby": "budgets-title" },
      h("thead", {}, h("tr", {}, ["", "spent / reserved / left", "spent", "reserved", "left", "budget", "period ends"].map((t, i) => h("th", { scope: "col", class: i > 1 && i < 6 ? "num" : null }, t || "subject")))),
      h(
        "tbody",
        {},
        subjects.slice(0, TOP_BUDGETS).map((s) => {
          if (s.budgetUnits === null) {
            // Not an amount this page can read: shown as it came, never taken for $0 (exhausted).
            return h("tr", { dataset: { kind: s.kind, name: clip(s.name, 200) } }, h("td", { class: "name" }, h("span", { class: "kind" }, `${s.kind} `), clip(s.name, 120)), h("td", { colspan: "5" }, `${usd(s.budget.usd)} / ${s.budget.period}`), h("td", {}, s.used.period_end ? when(s.used.period_end) : "never (total)"));
          }
          const budget = s.budgetUnits;
          const spent = s.spentUnits;
          const reserved = s.reservedUnits;
          const left = budget - spent - reserved > 0n ? budget - spent - reserved : 0n;
          return h(
            "tr",
            { dataset: { kind: s.kind, name: clip(s.name, 200) }, class: left === 0n ? "exhausted" : null },
            h("td", { class: "name" }, h("span", { class: "kind" }, `${s.kind} `), clip(s.name, 120)),
            h("td", {}, meter(spent, reserved, budget)),
            h("td", { class: "num spent" }, dollars(spent)),
            h("td", { class: "num reserved" }, dollars(reserved)),
            h("td", { class: "num left" }, dollars(left)),
            h("td", { class: "num" }, `${dollars(budget)} / ${s.budget.period}`),
            h("td", {}, s.used.period_end ? when(s.used.period_end) : "never (total)"),
          );
        }),
      ),
    ),
    more > 0 ? h("p", { class: "help budgets-more" }, `and ${number(more)} more, further from their budget (switchboard limits, or GET /limits, has them all)`) : null,
  );
}

// -- limit hits -------------------------------------------------------------------------------------

function drawHits(el, clients, refusals, limits) {
  const title = h("h2", { id: "hits-title" }, "Limit hits");
  const limited = (clients?.rows ?? []).filter((r) => r.limited > 0).sort((a, b) => b.limited - a.limited);
  // The clients nearest one of their limits now, the first TOP of them (see the budgets).
  const near = (c) => Math.max(c.limits.rpm ? c.used.requests_60s / c.limits.rpm : 0, c.limits.tpm ? c.used.tokens_60s / c.limits.tpm : 0, c.limits.max_parallel ? c.used.in_flight / c.limits.max_parallel : 0);
  const limitedNow = (limits?.clients ?? []).filter((c) => c.limits && c.used && (c.limits.rpm || c.limits.tpm || c.limits.max_parallel));
  const now = limitedNow.map((c) => ({ c, near: near(c) || 0 })).sort((a, b) => b.near - a.near || (a.c.name < b.c.name ? -1 : a.c.name > b.c.name ? 1 : 0)).slice(0, TOP).map((x) => x.c);
  const use = (value, limit) => (limit ? `${number(value)} / ${number(limit)}` : "–");
  replace(
    el,
    title,
    clients
      ? limited.length
        ? h(
            "table",
            { class: "data hits", "aria-label": "Requests refused by a limit, by client" },
            h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "client"), h("th", { scope: "col", class: "num" }, "refused (429)"), h("th", { scope: "col", class: "num" }, "of requests"))),
            h("tbody", {}, limited.slice(0, TOP).map((r) => h("tr", { dataset: { name: clip(r.client ?? "", 200) } }, h("td", { class: "name" }, clip(r.client ?? "(none)", 120)), h("td", { class: "num" }, number(r.limited)), h("td", { class: "num" }, number(r.requests))))),
          )
        : h("p", { class: "help" }, "No request was refused by a limit in this period.")
      : null,
    refusals?.requests?.length
      ? h(
          "details",
          { class: "refusals" },
          h("summary", {}, `The latest ${refusals.requests.length} refusals`),
          h("ul", {}, refusals.requests.map((r) => h("li", {}, `${when(r.ts)} · `, clip(r.client ?? "(none)", 120), " · ", clip(r.model ?? "", 120), ` · ${r.status}`))),
        )
      : null,
    now.length
      ? h(
          "table",
          { class: "data", "aria-label": "Use now against each client's limits" },
          h("thead", {}, h("tr", {}, ["client", "requests in 60 s / rpm", "tokens in 60 s / tpm", "in flight / max_parallel"].map((t, i) => h("th", { scope: "col", class: i ? "num" : null }, t)))),
          h("tbody", {}, now.map((c) => h("tr", {}, h("td", { class: "name" }, clip(c.name, 120)), h("td", { class: "num" }, use(c.used.requests_60s, c.limits.rpm)), h("td", { class: "num" }, use(c.used.tokens_60s, c.limits.tpm)), h("td", { class: "num" }, use(c.used.in_flight, c.limits.max_parallel))))),
        )
      : null,
    limitedNow.length > TOP ? h("p", { class: "help limits-more" }, `and ${number(limitedNow.length - TOP)} more clients with limits, further from them`) : null,
  );
}
