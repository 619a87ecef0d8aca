// Changes (config:write): add, edit and delete a provider, and set a purpose's route, through
// the write API of docs/reference.md §8. Every write is a commit: edits and deletes carry `If-Match` (the
// ETag the form was loaded with), so a file changed meanwhile answers 412 instead of being
// overwritten; a 422's problems are shown beside the fields they concern; the commit's
// short sha is shown when it is done.

import { h, note } from "./dom.js";
import { editPage, providerForm } from "./provider_form.js";
import { routeForm } from "./route_form.js";

// An edit, a delete and a route start from what the service has and its ETag: they need
// config:read as well. A token that may only write is offered what it can do: adding one.
const READS = new Set(["edit", "route"]);

export function mount(main, ctx) {
  const [tab = "new", subject] = ctx.parts;
  const reads = ctx.store.can("config:read");
  const tabs = [
    ["new", "Add a provider"],
    ["edit", "Edit or delete a provider"],
    ["route", "Set a route"],
  ].filter(([path]) => reads || !READS.has(path));
  main.append(
    h("h1", { tabindex: "-1" }, "Changes"),
    h(
      "p",
      { class: "help" },
      "Each change is a git commit in the configuration repository, authored by this token's client, and applied before it is confirmed here.",
    ),
    h(
      "nav",
      { class: "tabs", "aria-label": "Kinds of change" },
      tabs.map(([path, title]) =>
        h("a", { href: `#/changes/${path}`, "aria-current": path === tab ? "page" : null }, title),
      ),
    ),
  );
  const body = h("div");
  main.append(body);
  if (READS.has(tab) && !reads) {
    body.append(
      note(
        `${tab === "route" ? "Setting a route" : "Editing or deleting a provider"} needs the scope config:read as well `,
        "(the form starts from what the service has); this token may only add providers.",
      ),
    );
    return { update() {} };
  }
  if (tab === "route") return routeForm(body, ctx, subject);
  if (tab === "edit") return editPage(body, ctx, subject);
  return providerForm(body, ctx, { mode: "create" });
}
