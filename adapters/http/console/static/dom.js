// Building DOM without innerHTML: every value from the server goes in as text, never markup.

export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export const MAX_SHOWN = 4000;  // characters of an input or output shown before "more"

export function jsonBlock(value) {
  if (value === undefined) return h("span", { class: "muted" }, "—");
  const text = JSON.stringify(value, null, 2);
  if (text.length <= MAX_SHOWN) return h("pre", { class: "json" }, text);
  return h("pre", { class: "json" }, text.slice(0, MAX_SHOWN),
    h("span", { class: "muted" }, `\n… ${text.length - MAX_SHOWN} more characters not shown ` +
      "(the run's export has everything)"));
}

export function money(cost) {
  return cost ? `$${Number(cost).toFixed(4)}` : "$0";
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 2 : 1)} s`;
  const m = Math.floor(seconds / 60);
  if (m < 60) return `${m} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

export function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

export function between(a, b) {
  if (!a || !b) return null;
  return (new Date(b) - new Date(a)) / 1000;
}

export function badge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

export function shortId(id) {
  return String(id).slice(0, 8);
}
