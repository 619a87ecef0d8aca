// Building the page from data, safely: every value from the configuration becomes text.
//
// `h(tag, props, ...children)` makes an element. Strings among the children become text
// nodes, never markup, and no code path here sets innerHTML: a provider named
// `<img src=x onerror=alert(1)>` is shown as those characters. Control, invisible and
// bidirectional formatting characters (which could hide or reorder what an operator reads)
// are shown as visible `\u{…}` escapes by `clean`, and a text longer than `MAX_TEXT` is cut
// there, saying how much is left out: a file cannot make a page a kilometre long, nor cost
// seconds of layout on every live redraw.

// C0 and C1 controls, the soft hyphen, combining grapheme joiner, Arabic letter mark, Hangul
// fillers, Khmer inherent vowels, Mongolian selectors, zero-width and bidi formatting
// characters, line and paragraph separators, word joiners and invisible operators, variation
// selectors, the BOM, interlinear annotation, musical formatting, tags and their selectors.
const INVISIBLE =
  /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u2028-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff9-\ufffb\u{1d173}-\u{1d17a}\u{e0000}-\u{e0fff}]/gu;

/** The longest text shown in one place; the CLI and the files have the rest. */
export const MAX_TEXT = 2_000;

/** `value` as text an operator can trust: cut at `MAX_TEXT`, invisible characters made visible. */
export function clean(value) {
  return clip(value).replace(
    INVISIBLE,
    (c) => `\\u{${c.codePointAt(0).toString(16).toUpperCase().padStart(4, "0")}}`,
  );
}

/** `value` cut to `max` characters, saying how many more there are. */
export function clip(value, max = MAX_TEXT) {
  const text = String(value);
  if (text.length <= max) return text;
  const code = text.charCodeAt(max - 1);
  const end = code >= 0xd800 && code <= 0xdbff ? max - 1 : max; // never half a character
  return `${text.slice(0, end)}… (${NUMBER.format(text.length - end)} more characters)`;
}

/** The first `count` of `list`, each cut to `max`, then how many more there are. */
export function few(list, count, max = 100) {
  const shown = list.slice(0, count).map((item) => clip(item, max)).join(", ");
  return list.length > count ? `${shown}, and ${NUMBER.format(list.length - count)} more` : shown;
}

/**
 * `object[key]` when it is the object's own: a provider may be called `constructor`, which
 * every JavaScript object also answers (with Object's constructor function).
 */
export function own(object, key) {
  return object && Object.hasOwn(object, key) ? object[key] : undefined;
}

const SAFE_HREF = /^(#|\.\.?\/|\/(?!\/))/;

/** An element: `props` are attributes (`class`, `text`, `on<event>`, properties); children text or nodes. */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = Array.isArray(value) ? value.filter(Boolean).join(" ") : value;
    else if (key === "text") el.textContent = clean(value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "href") {
      // Only this origin's links: never a URL from a file (no `javascript:`, no other host).
      if (!SAFE_HREF.test(value)) throw new Error(`refusing the link ${JSON.stringify(value)}`);
      el.setAttribute("href", value);
    } else if (key === "value" || key === "checked" || key === "selected" || key === "disabled") el[key] = value;
    else el.setAttribute(key, value === true ? "" : clean(value));
  }
  append(el, children);
  return el;
}

/** Append children to `el`: nodes as they are, anything else as text. */
export function append(el, ...children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(clean(child)));
  }
  return el;
}

/** Replace the children of `el`. */
export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, ...children);
}

/**
 * Run `draw`, which rebuilds part of `container`, keeping the keyboard focus where it was: a
 * live update must not throw a keyboard user back to the top of the page. The element that
 * had the focus is found again in the new content by its id, or else by its link.
 */
export function keepFocus(container, draw) {
  const active = document.activeElement;
  let key = null;
  if (active && active !== container && container.contains(active)) {
    if (active.id) key = `#${CSS.escape(active.id)}`;
    else if (active.getAttribute("href")) key = `[href="${CSS.escape(active.getAttribute("href"))}"]`;
  }
  draw();
  if (key && !container.contains(active)) container.querySelector(key)?.focus({ preventScroll: true });
}

// -- formats -----------------------------------------------------------------------------------

const NUMBER = new Intl.NumberFormat("en");

export function number(value) {
  return value === null || value === undefined ? "–" : NUMBER.format(value);
}

export function ms(value) {
  if (value === null || value === undefined) return "–";
  return value >= 100 ? `${NUMBER.format(Math.round(value))} ms` : `${value.toFixed(1)} ms`;
}

export function shortSha(commit) {
  return commit ? String(commit).slice(0, 7) : "–";
}

/** `2026-11-27T05:33:08.123456Z` as `2026-11-27 05:33:08Z`. */
export function when(ts) {
  if (!ts) return "–";
  const text = String(ts);
  const match = /^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})/.exec(text);
  return match ? `${match[1]} ${match[2]}Z` : text;
}

/** A value of a file or an event as one line of text (strings as they are, the rest as JSON). */
export function show(value) {
  if (value === undefined) return "(none)";
  if (typeof value === "string") return value;
  return JSON.stringify(value);
}

/** A commit: its short sha, the whole one in the tooltip. */
export function commitCode(commit) {
  return h("code", { class: "sha", title: commit ?? "no commit" }, shortSha(commit));
}

export function badge(status) {
  const known = ["healthy", "unhealthy", "unknown", "disabled"].includes(status) ? status : "unknown";
  return h("span", { class: ["badge", `badge-${known}`] }, status);
}

/** A short note that something is left out, and why. */
export function note(...children) {
  return h("p", { class: "note", role: "note" }, ...children);
}

/** `#/providers/<id>`: a link to a provider's page. */
export function providerLink(id) {
  return h("a", { href: `#/providers/${encodeURIComponent(id)}` }, id);
}
