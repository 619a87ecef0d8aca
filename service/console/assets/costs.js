// What a provider file says about money and protocols, as the provider form edits it:
// `pricing` (per model, "*" for every other, USD per million tokens of each class),
// `budget` (an amount and a period) and `protocols` (what its upstream speaks natively).
//
// Amounts stay the text the operator typed, sent as JSON strings: money is exact, and a
// JavaScript number (a binary float) would not be. The service validates them; its problems
// (`pricing.gpt-4o.input: ...`) are shown beside these fields.

import { h } from "./dom.js";
import { checkboxes, field, lines } from "./forms.js";

export const CLASSES = ["input", "output", "cached_input", "cache_write"];
const PERIODS = ["day", "week", "month", "total"];

/** The three fields: `{pricing, budgetUsd, budgetPeriod, protocols, budgetWrap}`. */
export function costFields(words) {
  const pricing = field(
    "pricing",
    "Pricing",
    h("textarea", { rows: "3", spellcheck: "false", placeholder: "* input=0.15 output=0.60\ngpt-4o input=2.50 output=10.00 cached_input=1.25" }),
    `one model per line ("*": every other model), then class=USD per million tokens; classes: ${CLASSES.join(", ")}. Unpriced: the price map bundled with litellm (API keys only), else free`,
  );
  const usd = h("input", { type: "text", inputmode: "decimal", autocomplete: "off", spellcheck: "false", placeholder: "200" });
  const period = h(
    "select",
    { "aria-label": "Budget period" },
    h("option", { value: "" }, "no budget"),
    PERIODS.map((p) => h("option", { value: p }, p)),
  );
  const budget = field("budget", "Budget (USD per period)", usd, "the most this provider may spend in a period (UTC); when spent, it is skipped and requests fall back");
  budget.wrap.querySelector("input").after(period);
  period.id = "f-budget-period";
  const protocols = checkboxes("protocols", "Protocols spoken natively", words.protocols ?? ["chat", "messages", "responses", "completions"], []);
  protocols.wrap.append(h("div", { class: "help" }, "none ticked: the vendor's or server type's default; others are translated to chat"));
  return { pricing, budget, usd, period, protocols };
}

/** What the fields show for a provider as the API answers it. */
export function fillCosts(f, v) {
  f.pricing.input.value = pricingText(v.pricing);
  f.usd.value = v.budget ? String(v.budget.usd) : "";
  f.period.value = v.budget ? v.budget.period : "";
  for (const box of f.protocols.boxes) box.checked = (v.protocols ?? []).includes(box.value);
}

/** Each control's raw value, to tell which the operator touched. */
export function costControls(f) {
  return {
    pricing: f.pricing.input.value,
    budget: `${f.usd.value}\n${f.period.value}`,
    protocols: f.protocols.boxes.filter((b) => b.checked).map((b) => b.value).join(" "),
  };
}

/** `{pricing, budget, protocols}` as the API takes them, and the problems found reading them. */
export function readCosts(f) {
  const problems = [];
  const pricing = Object.create(null); // a model called `__proto__` is a model like any other
  for (const line of lines(f.pricing.input.value)) {
    const [model, ...parts] = line.split(/\s+/);
    const price = {};
    for (const part of parts) {
      const at = part.indexOf("=");
      const name = at > 0 ? part.slice(0, at) : "";
      if (!CLASSES.includes(name) || at === part.length - 1) {
        problems.push({ path: "pricing", message: `not "class=amount" (classes: ${CLASSES.join(", ")}): ${part}` });
      } else price[name] = part.slice(at + 1);
    }
    if (!parts.length) problems.push({ path: "pricing", message: `no price for ${model}: add input=… output=…` });
    if (Object.hasOwn(pricing, model)) problems.push({ path: "pricing", message: `${model} is priced twice` });
    pricing[model] = price;
  }
  const amount = f.usd.value.trim();
  let budget = null;
  if (amount || f.period.value) {
    if (!amount) problems.push({ path: "budget", message: "give the budget an amount in USD, or choose no budget" });
    else if (!f.period.value) problems.push({ path: "budget", message: "choose the budget's period: day, week, month or total" });
    else budget = { usd: amount, period: f.period.value };
  }
  const ticked = f.protocols.boxes.filter((b) => b.checked).map((b) => b.value);
  return { values: { pricing, budget, protocols: ticked.length ? ticked : null }, problems };
}

/** The fields of a new file: only what was given. */
export function costDocument(values) {
  const doc = {};
  if (Object.keys(values.pricing).length) doc.pricing = values.pricing;
  if (values.budget) doc.budget = values.budget;
  if (values.protocols) doc.protocols = values.protocols;
  return doc;
}

/**
 * The merge patch (RFC 7386) of a touched field. A merge patch merges objects, so a model
 * the operator removed is sent as null, and each model's classes are all sent (null: removed),
 * or the file would keep what the form no longer shows.
 */
export function costPatch(key, old, values) {
  if (key === "budget" || key === "protocols") return values[key];
  const patch = Object.create(null);
  for (const model of Object.keys(old ?? {})) if (!Object.hasOwn(values.pricing, model)) patch[model] = null;
  for (const [model, price] of Object.entries(values.pricing)) {
    patch[model] = Object.fromEntries(CLASSES.map((c) => [c, Object.hasOwn(price, c) ? price[c] : null]));
  }
  return patch;
}

function pricingText(pricing) {
  return Object.entries(pricing ?? {})
    .map(([model, price]) => [model, ...CLASSES.filter((c) => price[c] != null).map((c) => `${c}=${price[c]}`)].join(" "))
    .join("\n");
}
