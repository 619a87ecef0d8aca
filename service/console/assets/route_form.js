// Setting a purpose's route (Changes, config:write): primaries with their weights and
// fallbacks in order, loaded from `GET …/active/{purpose}` and written with `PUT` and
// `If-Match` (the route's ETag starts with the routing file's blob).

import { API, ApiError } from "./api.js";
import { commitCode, h, note, own, replace } from "./dom.js";
import { branched, clearProblems, failed, field, focusProblem, headerText, vocabulary } from "./forms.js";

export function routeForm(el, { store, api, go }, subject) {
  const words = vocabulary();
  const purposes = words.purposes ?? ["chat", "embeddings", "reranking"];
  const purpose = subject && purposes.includes(subject) ? subject : purposes[0];
  const chooser = h(
    "select",
    { id: "route-purpose", onchange: () => go(`#/changes/route/${chooser.value}`) },
    purposes.map((p) => h("option", { value: p, selected: p === purpose }, p)),
  );
  const candidates = h(
    "datalist",
    { id: "route-ids" },
    store.providers.filter((p) => p.purposes.includes(purpose) && p.enabled).map((p) => h("option", { value: p.id }, p.name ?? "")),
  );
  el.append(h("div", { class: "toolbar" }, h("div", { class: "field" }, h("label", { for: "route-purpose" }, "Purpose"), chooser), candidates));
  const area = h("div", {}, h("p", { class: "help" }, "Loading…"));
  el.append(area);

  (async () => {
    let route = null;
    let etag = null;
    try {
      const loaded = await api.get(`${API}/active/${purpose}`, { conditional: false });
      route = loaded.body;
      etag = loaded.etag;
    } catch (error) {
      if (!(error instanceof ApiError) || error.status !== 404) {
        replace(area, note(error.message));
        return;
      }
    }
    replace(area, editor(route, etag));
  })();

  function editor(route, etag) {
    const primaries = h("ol", { class: "rows", id: "route-primary" });
    const fallbacks = h("ol", { class: "rows", id: "route-fallbacks" });
    const primaryProblem = h("div", { class: "field-problem", id: "f-primary-problem", role: "alert" });
    const fallbackProblem = h("div", { class: "field-problem", id: "f-fallbacks-problem", role: "alert" });
    const reason = field("reason", "Reason", h("input", { type: "text", autocomplete: "off" }), "optional: the commit message's body");
    const general = h("div", { class: "form-problems", role: "alert" });
    const done = h("div", { role: "status", "aria-live": "polite" });
    const submit = h("button", { type: "submit", class: "primary" }, `Save the ${purpose} route`);

    function row(list, kind, id = "", weight = 1) {
      const n = () => [...list.children].indexOf(item);
      const idInput = h("input", { type: "text", list: "route-ids", value: id, autocomplete: "off", spellcheck: "false", class: "route-id" });
      const label = h("label", { class: "row-label" }, "");
      const weightInput = kind === "primary" ? h("input", { type: "number", min: "0", step: "any", value: String(weight), class: "route-weight" }) : null;
      const problem = h("div", { class: "field-problem", role: "alert" });
      const item = h(
        "li",
        { class: "field" },
        label,
        idInput,
        weightInput ? [h("label", { class: "weight-label" }, "weight"), weightInput] : null,
        kind === "fallbacks"
          ? [
              h("button", { type: "button", class: "quiet", onclick: () => move(-1), "aria-label": "move up" }, "↑"),
              h("button", { type: "button", class: "quiet", onclick: () => move(1), "aria-label": "move down" }, "↓"),
            ]
          : null,
        h("button", { type: "button", class: "quiet", onclick: () => (item.remove(), relabel(list, kind)), "aria-label": "remove" }, "Remove"),
        problem,
      );
      item.problem = problem;
      function move(step) {
        const to = n() + step;
        if (to < 0 || to >= list.children.length) return;
        const sibling = list.children[to];
        if (step < 0) list.insertBefore(item, sibling);
        else list.insertBefore(sibling, item);
        relabel(list, kind);
        idInput.focus();
      }
      list.append(item);
      relabel(list, kind);
      return idInput;
    }

    function relabel(list, kind) {
      [...list.children].forEach((item, i) => {
        const idInput = item.querySelector(".route-id");
        idInput.id = `f-${kind}-${i}`;
        const label = item.querySelector(".row-label");
        label.setAttribute("for", idInput.id);
        label.textContent = `${kind === "primary" ? "Primary" : "Fallback"} ${i + 1}`;
        const weight = item.querySelector(".route-weight");
        if (weight) {
          weight.id = `f-weight-${i}`;
          item.querySelector(".weight-label").setAttribute("for", weight.id);
        }
      });
    }

    const primaryIds = route ? route.primary.map((p) => p.id) : [];
    for (const id of primaryIds) row(primaries, "primary", id, own(route.weights, id) ?? 1);
    if (!primaryIds.length) row(primaries, "primary");
    for (const p of route?.fallbacks ?? []) row(fallbacks, "fallbacks", p.id);

    const form = h(
      "form",
      { class: "card change", novalidate: true, onsubmit: (e) => save(e) },
      h("h2", {}, `The ${purpose} route`),
      route ? h("p", { class: "help" }, "Now: generation ", String(route.generation), ", commit ", commitCode(route.commit)) : h("p", { class: "help" }, `${purpose} is not routed now.`),
      route?.unavailable?.length
        ? note("The routing file also names ", route.unavailable.join(", "), " (refused files, not shown above): saving from here leaves them out unless you add them back.")
        : null,
      h(
        "fieldset",
        { class: "field", dataset: { field: "primary" } },
        h("legend", {}, "Primaries (load-balanced by weight)"),
        primaries,
        h("button", { type: "button", onclick: () => row(primaries, "primary").focus() }, "Add a primary"),
        primaryProblem,
      ),
      h(
        "fieldset",
        { class: "field", dataset: { field: "fallbacks" } },
        h("legend", {}, "Fallbacks, tried in order"),
        fallbacks,
        h("button", { type: "button", onclick: () => row(fallbacks, "fallbacks").focus() }, "Add a fallback"),
        fallbackProblem,
      ),
      reason.wrap,
      general,
      h("div", { class: "actions" }, submit),
      done,
    );

    function read() {
      const primary = [];
      const weights = {};
      for (const item of primaries.children) {
        const id = item.querySelector(".route-id").value.trim();
        if (!id) continue;
        primary.push(id);
        const weight = Number(item.querySelector(".route-weight").value);
        if (item.querySelector(".route-weight").value.trim() !== "" && weight !== 1) weights[id] = weight;
      }
      const fallback = [...fallbacks.children].map((item) => item.querySelector(".route-id").value.trim()).filter(Boolean);
      const body = { primary };
      if (Object.keys(weights).length) body.weights = weights;
      if (fallback.length) body.fallbacks = fallback;
      return body;
    }

    function places() {
      // `purposes.chat.primary.1` → the second primary's row; `weights.x` → x's row.
      const map = { primary: primaryProblem, fallbacks: fallbackProblem, reason: reason.problem };
      [...primaries.children].forEach((item, i) => (map[`primary.${i}`] = item.problem));
      [...primaries.children].forEach((item) => {
        const id = item.querySelector(".route-id").value.trim();
        if (id) map[`weights.${id}`] = item.problem;
      });
      [...fallbacks.children].forEach((item, i) => (map[`fallbacks.${i}`] = item.problem));
      return map;
    }

    function where(problem) {
      const path = String(problem.path ?? "").replace(new RegExp(`^purposes\\.${purpose}\\.?`), "");
      const map = places();
      if (path in map) return path;
      const [first] = path.split(".");
      if (first === "weights") return "primary";
      return first;
    }

    async function save(e) {
      e.preventDefault();
      replace(done);
      const why = headerText(reason.input.value);
      const map = places();
      clearProblems(map, general);
      submit.disabled = true;
      try {
        const answer = await api.send("PUT", `${API}/active/${purpose}`, read(), { ifMatch: etag, reason: why || undefined });
        if (answer.status === 202) replace(done, branched(answer.body));
        else {
          etag = answer.etag ?? etag;
          replace(done, h("p", { class: "ok" }, `Saved the ${purpose} route: commit `, commitCode(answer.body.commit), `, applied in generation ${answer.body.generation}.`));
          store.refresh(["active", "ready"]);
        }
      } catch (error) {
        focusProblem(failed(error, places(), general, where, submit));
      } finally {
        submit.disabled = false;
      }
    }
    return form;
  }

  return { update() {} };
}
