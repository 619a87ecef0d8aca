// Events: the event log as a timeline, newest first, from the start of the log (the event
// stream with `?after=0`), each change field by field with its commit and author; filtered
// by subject and type. `eventItem` draws one event, for the provider pages too.

import { commitCode, h, keepFocus, note, number, own, providerLink, replace, show, when } from "./dom.js";

const STEP = 100;
const unfolded = new Set(); // events whose folded fields the operator opened: kept open across redraws
const TYPES = [
  "provider.added",
  "provider.updated",
  "provider.removed",
  "routing.updated",
  "config.rejected",
  "provider.health_changed",
  "clients.updated",
  "secret.read",
  "sync.failed",
  "budget.exhausted",
  "service.started",
];

export function mount(main, { store, params }) {
  const state = { subject: params.subject ?? "", type: params.type ?? "", shown: STEP };
  const subject = h("input", {
    id: "event-subject",
    type: "search",
    value: state.subject,
    list: "event-subjects",
    autocomplete: "off",
    spellcheck: "false",
    placeholder: "a provider id, routing, clients",
    oninput: () => {
      state.subject = subject.value.trim();
      state.shown = STEP;
      draw();
    },
  });
  const subjects = h("datalist", { id: "event-subjects" });
  const type = h(
    "select",
    {
      id: "event-type",
      onchange: () => {
        state.type = type.value;
        state.shown = STEP;
        draw();
      },
    },
    h("option", { value: "" }, "any"),
    TYPES.map((t) => h("option", { value: t, selected: t === state.type }, t)),
  );
  const summary = h("p", { class: "help", role: "status", "aria-live": "polite" });
  const list = h("ol", { class: "timeline", reversed: true });
  const more = h("div", { class: "more" });
  main.append(
    h("h1", { tabindex: "-1" }, "Events"),
    h(
      "div",
      { class: "toolbar" },
      h("div", { class: "field" }, h("label", { for: "event-subject" }, "Subject"), subject, subjects),
      h("div", { class: "field" }, h("label", { for: "event-type" }, "Type"), type),
    ),
    summary,
    list,
    more,
  );
  if (!store.can("admin")) {
    main.insertBefore(
      note("Who read which secret (secret.read) and changes of the clients file are shown to admin tokens only."),
      summary,
    );
  }

  function matching() {
    const found = [];
    for (let i = store.events.length - 1; i >= 0; i--) {
      const e = store.events[i];
      if (state.type && e.type !== state.type) continue;
      if (state.subject && e.subject !== state.subject) continue;
      found.push(e);
    }
    return found;
  }

  function draw() {
    const found = matching();
    const shown = found.slice(0, state.shown);
    replace(list, shown.map((e) => h("li", {}, eventItem(e))));
    replace(
      summary,
      store.caughtUp ? "" : "Reading the log… ",
      `${number(found.length)} event${found.length === 1 ? "" : "s"}`,
      state.subject || state.type ? ` matching (of ${number(store.events.length)})` : "",
      store.trimmed ? `; the ${number(store.trimmed)} oldest are not kept here (switchboard audit show has them)` : "",
    );
    replace(
      more,
      found.length > shown.length
        ? h("button", { type: "button", id: "show-older", onclick: () => ((state.shown += STEP), keepFocus(main, draw)) }, `Show ${number(Math.min(STEP, found.length - shown.length))} older`)
        : null,
    );
    const seen = new Set();
    for (let i = store.events.length - 1; i >= 0 && seen.size < 2000; i--) {
      if (store.events[i].subject) seen.add(store.events[i].subject);
    }
    replace(subjects, [...seen].sort().map((s) => h("option", { value: s })));
  }

  let frame = 0;
  draw();
  return {
    update(changed) {
      if (!changed.has("events") || frame) return;
      frame = requestAnimationFrame(() => {
        frame = 0;
        keepFocus(main, draw);
      });
    },
    unmount() {
      cancelAnimationFrame(frame);
    },
  };
}

/** One event: seq, time, type and subject; its commit and author; each changed field. */
export function eventItem(e) {
  const subject =
    e.subject && e.type.startsWith("provider.") && e.type !== "provider.removed" ? providerLink(e.subject) : e.subject;
  const changes = Object.entries(e.changes ?? {});
  return h(
    "article",
    { class: ["event", `event-${e.type.split(".")[0]}`], dataset: { seq: String(e.seq), type: e.type } },
    h(
      "header",
      {},
      h("span", { class: "seq" }, `#${e.seq}`),
      " ",
      h("time", { datetime: e.ts }, when(e.ts)),
      " ",
      h("span", { class: "type" }, e.type),
      subject ? [" ", h("span", { class: "subject" }, subject)] : null,
    ),
    h(
      "p",
      { class: "meta" },
      e.file ? [h("code", {}, e.file), " · "] : null,
      e.commit ? ["commit ", commitCode(e.commit)] : e.uncommitted ? h("span", { class: "warn" }, "uncommitted") : "no commit",
      e.author ? [" · ", h("span", { class: "author" }, e.author)] : null,
      e.client ? [" · client ", e.client] : null,
      e.version ? [" · version ", e.version] : null,
    ),
    e.reason ? h("p", { class: "reason" }, e.reason) : null,
    changes.length ? changeTable(e, changes) : null,
  );
}

/**
 * The fields an event changed. An update shows each field before and after; an added or
 * removed provider (every field, one side empty) shows its fields folded, so the timeline
 * stays readable.
 */
function changeTable(e, changes) {
  const added = e.type === "provider.added";
  const removed = e.type === "provider.removed";
  const value = (v) => (e.type === "routing.updated" ? route(v) : show(v));
  if (added || removed) {
    const side = added ? "new" : "old";
    const shown = changes.filter(([, c]) => c[side] !== null && c[side] !== undefined);
    return h(
      "details",
      {
        class: "fields",
        open: unfolded.has(e.seq),
        ontoggle: (ev) => (ev.currentTarget.open ? unfolded.add(e.seq) : unfolded.delete(e.seq)),
      },
      h("summary", {}, `${shown.length} fields ${added ? "added" : "removed"}`),
      h(
        "table",
        { class: "changes" },
        h("tbody", {}, shown.map(([field, c]) => h("tr", {}, h("th", { scope: "row" }, field), h("td", { class: added ? "new" : "old" }, show(c[side]))))),
      ),
    );
  }
  return h(
    "table",
    { class: "changes" },
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Field"), h("th", { scope: "col" }, "Before"), h("th", { scope: "col" }, "After"))),
    h(
      "tbody",
      {},
      changes.map(([field, change]) =>
        h(
          "tr",
          {},
          h("th", { scope: "row" }, field),
          h("td", { class: "old" }, "old" in change && change.old !== null ? value(change.old) : "(none)"),
          h("td", { class: "new" }, "new" in change && change.new !== null ? value(change.new) : "(none)"),
        ),
      ),
    ),
  );
}

/** A route as an operator reads it: `a ×3, b; then c, d`. */
function route(value) {
  if (!value || typeof value !== "object" || !Array.isArray(value.primary)) return show(value);
  const weights = value.weights && typeof value.weights === "object" ? value.weights : {};
  const primary = value.primary.map((id) => {
    const weight = own(weights, id);
    return weight !== undefined && weight !== 1 ? `${id} ×${show(weight)}` : id;
  });
  const fallbacks = Array.isArray(value.fallbacks) && value.fallbacks.length ? `; then ${value.fallbacks.join(", ")}` : "";
  return `${primary.join(", ")}${fallbacks}`;
}
