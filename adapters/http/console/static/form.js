// A form for a signal's payload, generated from the JSON schema of the waiting step's output.
// Booleans named like a decision (approved, approve, ok, accept) become Approve / Reject
// buttons; strings, numbers and enums become inputs; anything nested is edited as JSON.

import { h } from "./dom.js";

const DECISIONS = ["approved", "approve", "accepted", "accept", "ok"];

function resolve(schema, root) {
  if (schema && schema.$ref && root.$defs) {
    return root.$defs[schema.$ref.split("/").pop()] || {};
  }
  if (schema && schema.anyOf) {
    const other = schema.anyOf.filter((s) => s.type !== "null");
    if (other.length === 1) return { ...resolve(other[0], root), nullable: true };
  }
  return schema || {};
}

function field(name, prop, required) {
  const id = `f-${name}`;
  const title = prop.title || name;
  const hint = prop.description ? h("small", { class: "muted" }, prop.description) : null;
  let input;
  if (prop.enum) {
    input = h("select", { id, name },
      ...(required ? [] : [h("option", { value: "" }, "—")]),
      ...prop.enum.map((v) => h("option", { value: JSON.stringify(v) }, String(v))));
  } else if (prop.type === "boolean") {
    input = h("input", { id, name, type: "checkbox" });
    if (prop.default === true) input.checked = true;
  } else if (prop.type === "integer" || prop.type === "number") {
    input = h("input", { id, name, type: "number", step: prop.type === "integer" ? "1" : "any" });
    if (prop.minimum !== undefined) input.min = prop.minimum;
    if (prop.maximum !== undefined) input.max = prop.maximum;
    if (prop.default !== undefined) input.value = prop.default;
  } else if (prop.type === "string") {
    input = h("input", { id, name, type: "text", autocomplete: "off" });
    if (prop.maxLength) input.maxLength = prop.maxLength;
    if (prop.default !== undefined) input.value = prop.default;
  } else {
    input = h("textarea", { id, name, rows: 3, placeholder: "JSON", "data-json": "1" });
    if (prop.default !== undefined) input.value = JSON.stringify(prop.default);
  }
  if (required && prop.type !== "boolean") input.required = true;
  input.dataset.kind = prop.enum ? "enum" : prop.type || "json";
  return h("label", { for: id, class: "field" },
    h("span", {}, title + (required ? " *" : "")), input, hint);
}

function read(form, names) {
  const out = {};
  for (const name of names) {
    const input = form.elements.namedItem(name);
    const kind = input.dataset.kind;
    if (kind === "boolean") out[name] = input.checked;
    else if (input.value === "") continue;
    else if (kind === "enum") out[name] = JSON.parse(input.value);
    else if (kind === "integer") out[name] = parseInt(input.value, 10);
    else if (kind === "number") out[name] = Number(input.value);
    else if (kind === "string") out[name] = input.value;
    else out[name] = JSON.parse(input.value);
  }
  return out;
}

// schema: JSON schema (or null: any JSON); onSubmit(payload) returns a promise.
export function signalForm(schema, onSubmit) {
  const root = resolve(schema || {}, schema || {});
  const form = h("form", { class: "signal-form" });
  const props = root.type === "object" && root.properties ? root.properties : null;
  const required = new Set(root.required || []);
  let decision = null;
  const names = [];
  if (props) {
    decision = Object.keys(props).find((n) => DECISIONS.includes(n) &&
      resolve(props[n], schema).type === "boolean") || null;
    for (const [name, raw] of Object.entries(props)) {
      if (name === decision) continue;
      names.push(name);
      form.append(field(name, resolve(raw, schema), required.has(name)));
    }
  } else {
    form.append(h("label", { class: "field" }, h("span", {}, "payload (JSON)"),
      h("textarea", { name: "payload", rows: 4, "data-json": "1" })));
  }
  const status = h("p", { class: "form-status", role: "status" });
  const send = async (value) => {
    let payload;
    try {
      if (props) {
        payload = read(form, names);
        if (decision) payload[decision] = value;
      } else {
        const text = form.elements.namedItem("payload").value.trim();
        payload = text ? JSON.parse(text) : null;
      }
    } catch (exc) {
      status.textContent = `Not valid JSON: ${exc.message}`;
      status.className = "form-status error";
      return;
    }
    for (const b of form.querySelectorAll("button")) b.disabled = true;
    status.textContent = "Sending…";
    status.className = "form-status";
    try {
      await onSubmit(payload);
      status.textContent = "Sent.";
    } catch (exc) {
      status.textContent = exc.message;
      status.className = "form-status error";
      for (const b of form.querySelectorAll("button")) b.disabled = false;
    }
  };
  const buttons = h("div", { class: "buttons" });
  if (decision) {
    const yes = h("button", { type: "submit", class: "approve", "data-value": "true" }, "Approve");
    const no = h("button", { type: "submit", class: "reject", "data-value": "false" }, "Reject");
    buttons.append(yes, no);
  } else {
    buttons.append(h("button", { type: "submit", class: "approve" }, "Send signal"));
  }
  form.append(buttons, status);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const button = event.submitter;
    send(button && button.dataset.value ? button.dataset.value === "true" : undefined);
  });
  return form;
}
