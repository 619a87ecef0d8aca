// One provider: what its file says (masked), its health and traffic, its recent events, and
// a Test button (admin) that checks it now.

import { API } from "./api.js";
import { badge, clip, commitCode, h, keepFocus, ms, note, number, own, replace, when } from "./dom.js";
import { eventItem } from "./events.js";

export function mount(main, { store, api, parts }) {
  const id = parts[0];
  const title = h("h1", { tabindex: "-1" }, id);
  const detail = h("div");
  const actions = h("div", { class: "actions" });
  const result = h("div", { class: "test-result", role: "status", "aria-live": "polite" });
  const recent = h("section", { "aria-labelledby": "recent-title" });
  main.append(h("p", { class: "crumbs" }, h("a", { href: "#/providers" }, "Providers"), " / ", id), title, detail, actions, result, recent);

  async function test(button) {
    button.disabled = true;
    replace(result, h("p", { class: "help" }, "Checking…"));
    try {
      const { body } = await api.send("POST", `${API}/providers/${encodeURIComponent(id)}/test`, {});
      replace(
        result,
        h(
          "p",
          { class: body.ok ? "ok" : "problem" },
          body.ok ? "OK" : "Failed",
          ` in ${ms(body.latency_ms)}: `,
          body.message,
        ),
      );
      store.refresh(["providers", "active"]);
    } catch (error) {
      replace(result, h("p", { class: "problem" }, `${error.status ?? ""} ${error.message}`));
    } finally {
      button.disabled = false;
    }
  }

  replace(
    actions,
    store.can("admin")
      ? h("button", { type: "button", class: "primary", id: "test", onclick: (e) => test(e.currentTarget) }, "Test now")
      : note("Test needs the scope admin; this token does not have it."),
    store.can("config:write")
      ? h("a", { class: "button", href: `#/changes/edit/${encodeURIComponent(id)}` }, "Edit or delete")
      : note("Editing needs the scope config:write; this token does not have it."),
  );

  function draw() {
    const p = store.byId.get(id);
    const t = own(store.traffic?.providers, id);
    if (!p) {
      replace(detail, note("No provider ", id, " in the current configuration (removed, or its file is refused: see the Overview)."));
    } else {
      replace(title, p.id, p.name ? h("span", { class: "muted" }, ` ${clip(p.name, 200)}`) : null);
      const row = (label, ...value) => [h("dt", {}, label), h("dd", {}, ...value)];
      replace(
        detail,
        h(
          "div",
          { class: "columns" },
          h(
            "section",
            { class: "card" },
            h("h2", {}, "Definition"),
            h(
              "dl",
              {},
              row("Kind", p.kind),
              row(p.kind === "api_key" ? "Vendor" : "Server type", p.provider ?? p.server_type),
              row("URL", h("span", { class: "url" }, p.base_url)),
              row("Name", p.name ?? "none"),
              // Every model and alias, each its own text, in a box that scrolls past a few lines.
              row("Models", p.models.length ? long(p.models.map((m, i) => [i ? ", " : "", m])) : "any"),
              row(
                "Model map",
                Object.keys(p.model_map).length
                  ? long(Object.entries(p.model_map).map(([a, b]) => h("div", {}, `${a} → ${b}`)))
                  : "none",
              ),
              row("Purposes", p.purposes.join(", ")),
              row("Enabled", p.enabled ? "yes" : "no"),
              row("Key", p.api_key ? h("code", {}, p.api_key) : "none"),
              row(
                "Timeouts",
                `connect ${p.connect_timeout_s} s · answer ${p.timeout_s} s · first byte ${p.first_byte_timeout_s} s · idle ${p.idle_timeout_s} s`,
              ),
              row("File", h("code", {}, p.file)),
              row("Commit", commitCode(p.commit)),
            ),
          ),
          h(
            "section",
            { class: "card" },
            h("h2", {}, "Health and traffic"),
            h(
              "dl",
              {},
              row("Health", p.enabled ? badge(p.health.status) : badge("disabled")),
              row("Checked", when(p.health.checked_at)),
              row("Check latency", ms(p.health.latency_ms)),
              row("Requests", number(t?.requests ?? 0)),
              row("Errors", number(t?.errors ?? 0)),
              row("Latency", ms(t?.latency_ms)),
              row("Tokens", t ? `${number(t.tokens.prompt)} prompt · ${number(t.tokens.completion)} completion` : "0"),
            ),
          ),
        ),
      );
    }
    const events = store.eventsOf(id, 20);
    replace(
      recent,
      h("h2", { id: "recent-title" }, "Recent events"),
      events.length
        ? h("ol", { class: "timeline" }, events.map((e) => h("li", {}, eventItem(e))))
        : h("p", { class: "help" }, store.caughtUp ? "None in the log." : "Reading the log…"),
      h("p", {}, h("a", { href: `#/events?subject=${encodeURIComponent(id)}` }, "Every event of this provider")),
    );
  }

  draw();
  return {
    update(changed) {
      if (changed.has("providers") || changed.has("traffic") || changed.has("events")) keepFocus(main, draw);
    },
  };
}

/** A long list in a box of its own height that scrolls (and takes the focus, to scroll by keys). */
function long(children) {
  return h("div", { class: "long", tabindex: "0" }, children);
}
