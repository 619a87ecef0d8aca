// Form parts for the Changes page: labelled fields with a place for their problems, and the
// mapping of a 422's `problems` (`path`: the field to blame) to those places.

import { ApiError } from "./api.js";
import { commitCode, h, own, replace } from "./dom.js";

/** `{purposes, vendors: {name: default URL}, server_types}`: from index.html, made by the service. */
export function vocabulary() {
  const meta = document.querySelector('meta[name="switchboard-vocabulary"]');
  try {
    return JSON.parse(meta?.content ?? "{}");
  } catch {
    return {};
  }
}

/** A labelled field: `{wrap, input, problem}`; problems about `name` are shown in `problem`. */
export function field(name, label, input, help) {
  const id = `f-${name}`;
  input.id = id;
  input.name = name;
  const problem = h("div", { class: "field-problem", id: `${id}-problem`, role: "alert" });
  const described = [help ? `${id}-help` : null, `${id}-problem`].filter(Boolean).join(" ");
  input.setAttribute("aria-describedby", described);
  const wrap = h(
    "div",
    { class: "field", dataset: { field: name } },
    h("label", { for: id }, label),
    input,
    help ? h("div", { class: "help", id: `${id}-help` }, help) : null,
    problem,
  );
  return { wrap, input, problem };
}

/** A fieldset of checkboxes: `{wrap, boxes, problem}`. */
export function checkboxes(name, legend, options, checked) {
  const problem = h("div", { class: "field-problem", id: `f-${name}-problem`, role: "alert" });
  const boxes = options.map((option) =>
    h("input", { type: "checkbox", id: `f-${name}-${option}`, name, value: option, checked: checked.includes(option) }),
  );
  const wrap = h(
    "fieldset",
    { class: "field checks", dataset: { field: name }, "aria-describedby": `f-${name}-problem` },
    h("legend", {}, legend),
    boxes.map((box) => h("label", { class: "check", for: box.id }, box, ` ${box.value}`)),
    problem,
  );
  return { wrap, boxes, problem };
}

/**
 * Show each problem beside the field it concerns: `places` maps a field name to its problem
 * element; `name(problem)` gives the field a problem is about. Problems about no field the
 * operator can see (none of that name, or one this form leaves out or hides) go to
 * `general`; a folded section with a problem unfolds. Returns the first element that shows
 * a problem (to focus its field).
 */
export function showProblems(problems, places, general, name) {
  clearProblems(places, general);
  let first = null;
  const elsewhere = [];
  for (const problem of problems) {
    const place = own(places, name(problem));
    if (place && place.isConnected && !place.closest("[hidden]")) {
      place.append(h("p", {}, problem.message));
      place.closest(".field")?.classList.add("invalid");
      const folded = place.closest("details");
      if (folded) folded.open = true;
      first ??= place;
    } else elsewhere.push(problem);
  }
  if (elsewhere.length) {
    general.append(
      h(
        "ul",
        { class: "problems" },
        elsewhere.map((p) =>
          h("li", {}, p.file ? [h("code", {}, p.file), p.path ? ` (${p.path})` : "", ": "] : p.path ? `${p.path}: ` : "", p.message),
        ),
      ),
    );
  }
  return first;
}

export function clearProblems(places, general) {
  for (const place of Object.values(places)) {
    replace(place);
    place.closest(".field")?.classList.remove("invalid");
  }
  replace(general);
}

/** The first segment of a problem's dotted path (`models.2` → `models`). */
export function topField(problem) {
  return String(problem.path ?? "").split(".")[0];
}

/** A commit's reason as one line: control characters (a pasted tab) become spaces. */
export function headerText(text) {
  return text.replace(/[\u0000-\u001f\u007f]/g, " ").trim();
}

export function lines(text) {
  return text
    .split("\n")
    .map((line) => line.trim())
    .filter(Boolean);
}

/** A write in branch mode: committed for review, nothing applied. */
export function branched(body) {
  return h(
    "p",
    { class: "ok" },
    "Committed to the branch ",
    h("code", {}, body.branch),
    " (",
    commitCode(body.commit),
    ") for review; nothing is applied until it is merged.",
  );
}

/** Show a failed write: a 422's problems beside their fields, anything else above the button. */
export function failed(error, places, general, name, submit) {
  if (!(error instanceof ApiError)) {
    replace(general, h("p", {}, `The request failed: ${error.message}`));
    return null;
  }
  if (error.status === 422 && error.problems.length) {
    return showProblems(error.problems, places, general, name);
  }
  if (error.status === 403 && places.api_key && error.message.includes("api_key")) {
    // A key goes only where its file says: a new URL or vendor needs the key in the same write.
    return showProblems([{ path: "api_key", message: error.message }], places, general, () => "api_key");
  }
  const hint = {
    409: "Nothing was written.",
    412: "Someone changed it since this form was loaded: load it again, then redo the change.",
    405: "Writes are off on this service (SWITCHBOARD_WRITE_MODE).",
  }[error.status];
  replace(general, h("p", {}, `${error.status}: `, error.message, hint ? ` ${hint}` : ""));
  submit?.focus();
  return null;
}

export function focusProblem(place) {
  place?.closest(".field")?.querySelector("input, select, textarea")?.focus();
}
