// Building the page from data, safely: every value from the configuration becomes text.
//
// `h(tag, props, ...children)` makes an element. Strings among the children become text
// nodes, never markup, and no code path here sets innerHTML: a provider named
// `<img src=x onerror=alert(1)>` is shown as those characters. Control and bidirectional
// formatting characters (which could hide or reorder what an operator reads) are shown as
// visible `\u{…}` escapes by `clean`.

const INVISIBLE =
  /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]/gu;

/** `value` as text an operator can trust: invisible and control characters made visible. */
export function clean(value) {
  return String(value).replace(
    INVISIBLE,
    (c) => `\\u{${c.codePointAt(0).toString(16).toUpperCase().padStart(4, "0")}}`,
  );
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
