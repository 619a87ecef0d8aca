// Adding, editing and deleting a provider (Changes, config:write). A new provider is a POST
// of the fields given; an edit is a JSON merge patch of the fields the operator changed, with
// `If-Match` (the ETag the form was loaded with); a delete carries it too.
//
// "Changed" is what the operator did to a control, not a comparison of the control with the
// file: a form cannot hold every value a file can (a model_map key with `=` or spaces around
// it, a name with a line break), and an edit of one field must not rewrite the others.

import { API } from "./api.js";
import { costControls, costDocument, costFields, costPatch, fillCosts, readCosts } from "./costs.js";
import { commitCode, h, note, providerLink, replace } from "./dom.js";
import {
  branched,
  checkboxes,
  clearProblems,
  failed,
  field,
  focusProblem,
  headerText,
  lines,
  showProblems,
  topField,
  vocabulary,
} from "./forms.js";

const TIMEOUTS = [
  ["connect_timeout_s", "Connect timeout (s)", "default 5"],
  ["timeout_s", "Answer timeout (s)", "default 600; non-streaming requests"],
  ["first_byte_timeout_s", "First byte timeout (s)", "default 15; streams"],
  ["idle_timeout_s", "Idle timeout (s)", "default 60; streams, between chunks"],
];
const SEGMENT = { api_key: "api-keys", ai_server: "servers" };

export function providerForm(el, { store, api, go }, { mode, provider, etag }) {
  const words = vocabulary();
  const creating = mode === "create";
  let kind = provider?.kind ?? "api_key";
  let loadedTag = etag ?? null;
  let initial = provider ? values(provider) : null;
  let loadedSeq = store.events.at(-1)?.seq ?? 0;
  let ownCommits = new Set();

  const kindApi = h("input", { type: "radio", name: "kind", id: "f-kind-api_key", value: "api_key", checked: kind === "api_key" });
  const kindServer = h("input", { type: "radio", name: "kind", id: "f-kind-ai_server", value: "ai_server", checked: kind === "ai_server" });
  const kindProblem = h("div", { class: "field-problem", id: "f-kind-problem", role: "alert" });
  const kinds = h(
    "fieldset",
    { class: "field checks", dataset: { field: "kind" } },
    h("legend", {}, "Kind"),
    h("label", { class: "check", for: kindApi.id }, kindApi, " API key of a vendor (api_key)"),
    h("label", { class: "check", for: kindServer.id }, kindServer, " Self-hosted server (ai_server)"),
    kindProblem,
  );
  const id = field("id", "Id", h("input", { type: "text", required: true, autocomplete: "off", spellcheck: "false" }), "lowercase letters, digits, . _ -; the file is providers.d/<id>.yaml");
  const name = field("name", "Display name", h("input", { type: "text", autocomplete: "off" }));
  const vendor = field(
    "provider",
    "Vendor",
    h("select", {}, Object.keys(words.vendors ?? {}).map((v) => h("option", { value: v }, v))),
  );
  const serverType = field(
    "server_type",
    "Server type",
    h("select", {}, (words.server_types ?? []).map((v) => h("option", { value: v }, v))),
  );
  const baseUrl = field(
    "base_url",
    "Base URL",
    h("input", { type: "text", inputmode: "url", autocomplete: "off", spellcheck: "false" }),
    creating || kind !== "api_key"
      ? null
      : "a key goes only where its file says: a new URL or vendor needs the key again below (or a token with secrets:read)",
  );
  const apiKey = field(
    "api_key",
    "API key",
    h("input", { type: "password", autocomplete: "new-password", spellcheck: "false" }),
    creating ? "encrypted by sops before it reaches the disk; never shown again" : "leave empty to keep the current key; a new one is encrypted by sops",
  );
  const models = field("models", "Models", h("textarea", { rows: "3", spellcheck: "false" }), "one per line, as clients name them; none: any model");
  const modelMap = field("model_map", "Model map", h("textarea", { rows: "2", spellcheck: "false" }), "one per line: alias = upstream model");
  const purposes = checkboxes("purposes", "Purposes", words.purposes ?? ["chat", "embeddings", "reranking"], ["chat"]);
  const enabled = h("input", { type: "checkbox", id: "f-enabled", name: "enabled", checked: true });
  const enabledProblem = h("div", { class: "field-problem", id: "f-enabled-problem", role: "alert" });
  const enabledField = h("div", { class: "field", dataset: { field: "enabled" } }, h("label", { class: "check", for: "f-enabled" }, enabled, " Enabled (disabled providers are kept but never routed to)"), enabledProblem);
  const costs = costFields(words);
  const timeouts = TIMEOUTS.map(([key, label, help]) => field(key, label, h("input", { type: "number", min: "0", step: "any", inputmode: "decimal" }), help));
  const reason = field("reason", "Reason", h("input", { type: "text", autocomplete: "off" }), "optional: the commit message's body (X-Switchboard-Reason)");
  const general = h("div", { class: "form-problems", role: "alert" });
  const done = h("div", { class: "done", role: "status", "aria-live": "polite" });
  const stale = h("div", { role: "alert" });
  const submit = h("button", { type: "submit", class: "primary" }, creating ? "Create provider" : "Save changes");

  const places = {
    kind: kindProblem,
    id: id.problem,
    name: name.problem,
    provider: vendor.problem,
    server_type: serverType.problem,
    base_url: baseUrl.problem,
    api_key: apiKey.problem,
    models: models.problem,
    model_map: modelMap.problem,
    purposes: purposes.problem,
    enabled: enabledProblem,
    pricing: costs.pricing.problem,
    budget: costs.budget.problem,
    protocols: costs.protocols.problem,
    reason: reason.problem,
    ...Object.fromEntries(timeouts.map((t) => [t.input.name, t.problem])),
  };

  const form = h(
    "form",
    { class: "card change", novalidate: true, onsubmit: (e) => save(e) },
    h("h2", {}, creating ? "Add a provider" : ["Edit ", providerLink(provider.id)]),
    stale,
    creating ? kinds : h("p", { class: "help" }, `${provider.kind} · file `, h("code", {}, provider.file), " · commit ", commitCode(provider.commit)),
    creating ? id.wrap : null,
    name.wrap,
    vendor.wrap,
    serverType.wrap,
    baseUrl.wrap,
    apiKey.wrap,
    models.wrap,
    modelMap.wrap,
    purposes.wrap,
    enabledField,
    h("details", { class: "costs", open: Boolean(initial?.pricing && Object.keys(initial.pricing).length) || Boolean(initial?.budget) || Boolean(initial?.protocols) }, h("summary", {}, "Pricing, budget and protocols"), costs.pricing.wrap, costs.budget.wrap, costs.protocols.wrap),
    h("details", { class: "timeouts" }, h("summary", {}, "Timeouts"), timeouts.map((t) => t.wrap)),
    reason.wrap,
    general,
    h("div", { class: "actions" }, submit),
    done,
  );
  el.append(form);

  function showKind() {
    kind = kindApi.checked ? "api_key" : "ai_server";
    vendor.wrap.hidden = kind !== "api_key";
    serverType.wrap.hidden = kind !== "ai_server";
    apiKey.wrap.hidden = kind !== "api_key";
    const fallback = words.vendors?.[vendor.input.value];
    baseUrl.input.placeholder = kind === "api_key" ? `the vendor's: ${fallback ?? ""}` : "http://host:8000/v1";
  }
  kindApi.addEventListener("change", showKind);
  kindServer.addEventListener("change", showKind);
  vendor.input.addEventListener("change", showKind);

  function fill(v) {
    name.input.value = v.name;
    if (v.provider) vendor.input.value = v.provider;
    if (v.server_type) serverType.input.value = v.server_type;
    baseUrl.input.value = v.base_url;
    apiKey.input.value = "";
    models.input.value = v.models.join("\n");
    modelMap.input.value = Object.entries(v.model_map).map(([a, b]) => `${a} = ${b}`).join("\n");
    for (const box of purposes.boxes) box.checked = v.purposes.includes(box.value);
    enabled.checked = v.enabled;
    for (const t of timeouts) t.input.value = v[t.input.name] ?? "";
    fillCosts(costs, v);
  }
  // Each control's value as filled from the file: a control still so was not touched.
  function controls() {
    const raw = {
      name: name.input.value,
      base_url: baseUrl.input.value,
      models: models.input.value,
      model_map: modelMap.input.value,
      purposes: purposes.boxes.filter((b) => b.checked).map((b) => b.value).join(" "),
      enabled: String(enabled.checked),
    };
    if (kind === "api_key") raw.provider = vendor.input.value;
    else raw.server_type = serverType.input.value;
    for (const t of timeouts) raw[t.input.name] = t.input.value;
    return { ...raw, ...costControls(costs) };
  }
  let untouched = null;
  if (initial) {
    fill(initial);
    untouched = controls();
  }
  showKind();

  function read() {
    const map = Object.create(null); // `__proto__` is an alias like any other
    const broken = [];
    for (const line of lines(modelMap.input.value)) {
      const at = line.indexOf("=");
      if (at < 1) broken.push(line);
      else map[line.slice(0, at).trim()] = line.slice(at + 1).trim();
    }
    const form = {
      name: name.input.value.trim(),
      base_url: baseUrl.input.value.trim(),
      api_key: apiKey.input.value,
      models: lines(models.input.value),
      model_map: map,
      purposes: purposes.boxes.filter((b) => b.checked).map((b) => b.value),
      enabled: enabled.checked,
    };
    if (kind === "api_key") form.provider = vendor.input.value;
    else form.server_type = serverType.input.value;
    for (const t of timeouts) {
      const text = t.input.value.trim();
      form[t.input.name] = text === "" ? null : Number(text);
    }
    const problems = broken.map((line) => ({ path: "model_map", message: `not "alias = model": ${line}` }));
    for (const t of timeouts) {
      if (t.input.validity.badInput) problems.push({ path: t.input.name, message: "not a number" });
    }
    const read = readCosts(costs);
    Object.assign(form, read.values);
    problems.push(...read.problems);
    return { form, problems };
  }

  function document_(form) {
    // A new file: the fields given, no more (defaults stay defaults).
    const doc = { id: id.input.value.trim() };
    if (kind === "api_key") doc.provider = form.provider;
    else doc.server_type = form.server_type;
    if (form.name) doc.name = form.name;
    if (form.base_url) doc.base_url = form.base_url;
    if (kind === "api_key") doc.api_key = form.api_key;
    if (form.models.length) doc.models = form.models;
    if (Object.keys(form.model_map).length) doc.model_map = form.model_map;
    doc.purposes = form.purposes;
    if (!form.enabled) doc.enabled = false;
    for (const [key] of TIMEOUTS) if (form[key] !== null) doc[key] = form[key];
    return { ...doc, ...costDocument(form) };
  }

  function patch(form, touched) {
    // A merge patch of the fields the operator changed: a cleared one goes back to its default.
    const changes = {};
    for (const key of touched) {
      if (key === "name" || key === "base_url") changes[key] = form[key] === "" ? null : form[key];
      else if (key === "model_map") changes.model_map = mapPatch(initial.model_map, form.model_map);
      else if (key === "pricing" || key === "budget" || key === "protocols") changes[key] = costPatch(key, initial[key], form);
      else changes[key] = form[key];
    }
    if (form.api_key) changes.api_key = form.api_key;
    return changes;
  }

  // The field a problem of the service is about, when it is about this file: routing.yaml's
  // `purposes.chat.primary.0` is not this file's `purposes` (it goes above the button, named).
  function ownField(problem) {
    if (problem.file) {
      const name = String(problem.file).split("/").pop();
      const stem = id.input.value.trim();
      const mine = creating ? name === `${stem}.yaml` || name === `${stem}.yml` : problem.file === provider.file;
      if (!mine) return "";
    }
    return topField(problem);
  }

  async function save(e) {
    e.preventDefault();
    replace(done);
    const { form, problems: found } = read();
    const now = creating ? {} : controls();
    const touched = Object.keys(now).filter((key) => now[key] !== untouched[key]);
    // A line the form cannot read is a problem only where the operator wrote it.
    const problems = creating ? found : found.filter((problem) => touched.includes(topField(problem)));
    const why = headerText(reason.input.value);
    if (problems.length) {
      focusProblem(showProblems(problems, places, general, topField));
      return;
    }
    clearProblems(places, general);
    let request;
    if (creating) request = ["POST", `${API}/${SEGMENT[kind]}`, document_(form), {}];
    else {
      const changes = patch(form, touched);
      if (!Object.keys(changes).length) {
        replace(done, h("p", { class: "help" }, "Nothing changed: nothing to commit."));
        return;
      }
      request = ["PATCH", `${API}/${SEGMENT[kind]}/${encodeURIComponent(provider.id)}`, changes, { ifMatch: loadedTag }];
    }
    const [method, path, body, options] = request;
    submit.disabled = true;
    try {
      const answer = await api.send(method, path, body, { ...options, reason: why || undefined });
      if (answer.status === 202) {
        replace(done, branched(answer.body));
        return;
      }
      const written = answer.body;
      ownCommits.add(written.commit);
      replace(
        done,
        h(
          "p",
          { class: "ok" },
          creating ? "Created " : "Saved ",
          providerLink(written.id),
          ": commit ",
          commitCode(written.commit),
          `, applied in generation ${written.generation}.`,
        ),
      );
      apiKey.input.value = "";
      if (creating) {
        id.input.value = "";
        store.refresh(["providers", "active", "ready"]);
      } else {
        loadedTag = answer.etag ?? loadedTag;
        initial = values(written);
        fill(initial); // what the file says now, and untouched again
        untouched = controls();
        replace(stale);
      }
    } catch (error) {
      focusProblem(failed(error, places, general, ownField, submit));
    } finally {
      submit.disabled = false;
    }
  }

  return {
    update(changed) {
      if (creating || !changed.has("events")) return;
      const newer = store.events.filter(
        (ev) => ev.seq > loadedSeq && ev.subject === provider.id && ["provider.updated", "provider.removed"].includes(ev.type) && !ownCommits.has(ev.commit),
      );
      if (newer.length) {
        replace(
          stale,
          note(
            `${provider.id} changed since this form was loaded (`,
            newer.at(-1).type,
            newer.at(-1).commit ? [", commit ", commitCode(newer.at(-1).commit)] : "",
            "): saving would be refused. ",
            h("button", { type: "button", onclick: () => go(`#/changes/edit/${encodeURIComponent(provider.id)}?t=${Date.now()}`) }, "Load it again"),
          ),
        );
      }
      loadedSeq = store.events.at(-1)?.seq ?? loadedSeq;
    },
  };
}

/**
 * A model_map as a merge patch (RFC 7386) merges it: each alias the operator removed is sent
 * as null, or the file would keep it.
 */
function mapPatch(old, now) {
  const patch = Object.create(null);
  for (const key of Object.keys(old)) if (!Object.hasOwn(now, key)) patch[key] = null;
  for (const [key, value] of Object.entries(now)) patch[key] = value;
  return patch;
}

/** What the form shows for a provider as the API answers it. */
function values(p) {
  const v = {
    name: p.name ?? "",
    base_url: p.base_url ?? "",
    models: [...p.models],
    model_map: { ...p.model_map },
    purposes: [...p.purposes],
    enabled: p.enabled,
    pricing: { ...(p.pricing ?? {}) },
    budget: p.budget ?? null,
    protocols: p.protocols ?? null,
  };
  if (p.kind === "api_key") v.provider = p.provider;
  else v.server_type = p.server_type;
  for (const [key] of TIMEOUTS) v[key] = p[key];
  return v;
}

// -- edit or delete -------------------------------------------------------------------------------

export function editPage(el, ctx, subject) {
  const { store, api, go } = ctx;
  const choose = h("input", {
    id: "edit-id",
    type: "search",
    list: "edit-ids",
    value: subject ?? "",
    autocomplete: "off",
    spellcheck: "false",
    placeholder: "a provider id",
  });
  const ids = h("datalist", { id: "edit-ids" }, store.providers.map((p) => h("option", { value: p.id })));
  const picker = h(
    "form",
    {
      class: "toolbar",
      onsubmit: (e) => {
        e.preventDefault();
        if (choose.value.trim()) go(`#/changes/edit/${encodeURIComponent(choose.value.trim())}`);
      },
    },
    h("div", { class: "field" }, h("label", { for: "edit-id" }, "Provider"), choose, ids),
    h("button", { type: "submit" }, "Load"),
  );
  el.append(picker);
  if (!subject) {
    el.append(h("p", { class: "help" }, "Choose a provider to edit or delete (or use Edit on its page)."));
    return { update() {} };
  }
  const area = h("div", {}, h("p", { class: "help" }, "Loading…"));
  el.append(area);
  let form = { update() {} };
  (async () => {
    let loaded;
    try {
      loaded = await api.get(`${API}/providers/${encodeURIComponent(subject)}`, { conditional: false });
    } catch (error) {
      replace(area, note(error.status === 404 ? `No provider ${subject} in the current configuration.` : error.message));
      return;
    }
    replace(area);
    form = providerForm(area, ctx, { mode: "edit", provider: loaded.body, etag: loaded.etag });
    area.append(deleteForm(loaded.body, loaded.etag, ctx));
  })();
  return { update: (changed) => form.update(changed) };
}

function deleteForm(provider, etag, { api, store }) {
  const general = h("div", { class: "form-problems", role: "alert" });
  const done = h("div", { role: "status", "aria-live": "polite" });
  const confirm = h("div", { class: "actions" });
  const start = h("button", { type: "button", class: "danger", onclick: ask }, `Delete ${provider.id}…`);
  function ask() {
    replace(
      confirm,
      h("p", {}, "Delete ", h("code", {}, provider.file), "? This commits its removal."),
      h("button", { type: "button", class: "danger", id: "confirm-delete", onclick: remove }, `Delete ${provider.id}`),
      h("button", { type: "button", onclick: () => replace(confirm, start) }, "Cancel"),
    );
    confirm.querySelector("#confirm-delete").focus();
  }
  async function remove() {
    try {
      const answer = await api.send("DELETE", `${API}/${SEGMENT[provider.kind]}/${encodeURIComponent(provider.id)}`, undefined, { ifMatch: etag });
      replace(confirm);
      if (answer.status === 202) replace(done, branched(answer.body));
      else replace(done, h("p", { class: "ok" }, `Deleted ${provider.id}: commit `, commitCode(answer.body.commit), `, applied in generation ${answer.body.generation}.`));
      store.refresh(["providers", "active", "ready"]);
    } catch (error) {
      replace(confirm, start);
      failed(error, {}, general, () => "", start);
    }
  }
  replace(confirm, start);
  return h("section", { class: "card change" }, h("h2", {}, "Delete"), h("p", { class: "help" }, "A provider that a route names cannot be deleted: change the route first."), confirm, general, done);
}
