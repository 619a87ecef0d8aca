// Charts drawn here, as inline SVG (no library, no other origin): stacked bars over time and
// a budget's meter. Every label is a text node (`<title>`, `<text>`), never markup; the
// series' names come from files a pull request's author writes.
//
// Money is exact: amounts are decimal strings, added and subtracted as integers of 10^-12
// USD (BigInt). Only a bar's height, a picture, goes through a float.

import { clean, clip, h } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";
const SCALE = 12;
const ONE = 10n ** BigInt(SCALE);
export const SERIES = 8; // the largest series each get a colour; the rest are one "others"

/** An SVG element; attributes are set as they are (numbers and fixed words, never data). */
export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) if (value !== undefined && value !== null) el.setAttribute(key, String(value));
  for (const child of children.flat()) if (child) el.append(child instanceof Node ? child : document.createTextNode(clean(child)));
  return el;
}

// -- exact money --------------------------------------------------------------------------------

/**
 * A decimal string of USD as an integer of 10^-12 USD (cut, never rounded, past that); null when
 * it is not one. Exponent notation (`1E+3`, as Python writes some decimals) is read exactly too.
 */
export function units(text) {
  const match = /^\s*(-?)(\d{1,40})(?:\.(\d{0,60}))?(?:[eE]([+-]?\d{1,2}))?\s*$/.exec(String(text ?? ""));
  if (!match) return null;
  const fraction = match[3] ?? "";
  const shift = SCALE + Number(match[4] ?? 0) - fraction.length; // the power of ten of the digits
  const digits = BigInt(match[2] + fraction);
  const value = shift >= 0 ? digits * 10n ** BigInt(shift) : digits / 10n ** BigInt(-shift);
  return match[1] ? -value : value;
}

/** Integer units as `$1,234.50` (at least two decimals, as many as the amount has). */
export function dollars(value) {
  if (value === null || value === undefined) return "–";
  const negative = value < 0n;
  const abs = negative ? -value : value;
  let fraction = (abs % ONE).toString().padStart(SCALE, "0").replace(/0+$/, "");
  fraction = fraction.padEnd(2, "0");
  return `${negative ? "-" : ""}$${(abs / ONE).toLocaleString("en")}.${fraction}`;
}

/** A decimal string of USD as `$1,234.50`; what is not one is shown as it is. */
export function usd(text) {
  const value = units(text);
  return value === null ? clip(String(text ?? "–"), 40) : dollars(value);
}

/** Units as a float, for a picture only. */
export function approx(value) {
  return Number(value) / Number(ONE);
}

const COMPACT = new Intl.NumberFormat("en", { notation: "compact", maximumFractionDigits: 1 });
const SMALL = new Intl.NumberFormat("en", { maximumSignificantDigits: 2 });

/** A tick's label: `$1.2K`, `1.5M` tokens. */
export function compact(value, money) {
  if (!Number.isFinite(value)) return "–";
  if (money && value > 0 && value < 1) return `$${SMALL.format(value)}`; // never `$1.0e-7`
  return `${money ? "$" : ""}${COMPACT.format(value)}`;
}

// -- stacked bars -------------------------------------------------------------------------------

/**
 * A stacked bar chart: `buckets` (labels, in order), `series` ([{name, values}], values by
 * bucket, numbers), drawn as an SVG with a legend. `money`: the values are USD. Returns a
 * `figure`.
 */
export function stackedBars({ title, buckets, series, money, format }) {
  const W = 760;
  const H = 240;
  const left = 64;
  const right = 8;
  const top = 10;
  const bottom = 26;
  const totals = buckets.map((_, i) => series.reduce((sum, s) => sum + (s.values[i] || 0), 0));
  const max = Math.max(0, ...totals);
  const plotW = W - left - right;
  const plotH = H - top - bottom;
  const step = buckets.length ? plotW / buckets.length : plotW;
  const barW = Math.max(1, step * 0.78);
  const y = (v) => top + plotH - (max > 0 ? (v / max) * plotH : 0);
  const chart = svg("svg", {
    viewBox: `0 0 ${W} ${H}`,
    class: "chart",
    role: "img",
    "aria-label": `${title}: ${buckets.length} bars, ${series.length} series`,
  });
  for (const fraction of [0, 0.5, 1]) {
    const at = top + plotH - fraction * plotH;
    chart.append(
      svg("line", { x1: left, x2: W - right, y1: at, y2: at, class: "grid" }),
      svg("text", { x: left - 6, y: at + 4, "text-anchor": "end", class: "tick" }, compact(max * fraction, money)),
    );
  }
  buckets.forEach((label, i) => {
    const x = left + i * step + (step - barW) / 2;
    let base = 0;
    series.forEach((s, k) => {
      const value = s.values[i] || 0;
      if (value <= 0) return;
      const y0 = y(base);
      const y1 = y(base + value);
      base += value;
      const rect = svg("rect", { x: x.toFixed(2), y: y1.toFixed(2), width: barW.toFixed(2), height: Math.max(0.5, y0 - y1).toFixed(2), class: `bar ${s.other ? "s-other" : `s${k % SERIES}`}` });
      rect.append(svg("title", {}, `${label} · ${clip(s.name, 120)}: ${format(value, s, i)}`));
      chart.append(rect);
    });
  });
  const every = Math.max(1, Math.ceil(buckets.length / 8));
  buckets.forEach((label, i) => {
    if (i % every !== 0 && i !== buckets.length - 1) return;
    chart.append(svg("text", { x: (left + i * step + step / 2).toFixed(2), y: H - 8, "text-anchor": "middle", class: "tick" }, label));
  });
  const legend = h(
    "ul",
    { class: "legend" },
    series.map((s, k) =>
      h("li", { dataset: { series: k } }, h("span", { class: ["swatch", s.other ? "s-other" : `s${k % SERIES}`], "aria-hidden": "true" }), clip(s.name, 80)),
    ),
  );
  return h("figure", { class: "chart-figure" }, chart, series.length ? legend : h("p", { class: "help" }, "Nothing in this period."));
}

// -- a budget's meter ---------------------------------------------------------------------------

/** spent | reserved | left of `budget` (all integer units), as a bar. */
export function meter(spent, reserved, budget) {
  const W = 200;
  const part = (v) => (budget > 0n ? Math.min(W, (approx(v) / approx(budget)) * W) : 0);
  const s = part(spent);
  const r = Math.min(W - s, part(reserved));
  return svg(
    "svg",
    { viewBox: `0 0 ${W} 12`, class: "meter", role: "img", "aria-label": `spent ${dollars(spent)}, reserved ${dollars(reserved)} of ${dollars(budget)}` },
    svg("rect", { x: 0, y: 0, width: W, height: 12, class: "meter-left" }),
    svg("rect", { x: 0, y: 0, width: s.toFixed(2), height: 12, class: "meter-spent" }),
    svg("rect", { x: s.toFixed(2), y: 0, width: r.toFixed(2), height: 12, class: "meter-reserved" }),
  );
}
