// The console's only way to the server: the /v1 API, with the bearer token (if any) kept in
// this tab's sessionStorage. The token is sent in the Authorization header, never in a URL.

const TOKEN_KEY = "rulebound.token";

export class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

function headers(extra = {}) {
  const out = { Accept: "application/json", ...extra };
  const t = token();
  if (t) out.Authorization = `Bearer ${t}`;
  return out;
}

let onUnauthorized = () => {};
export function whenUnauthorized(fn) {
  onUnauthorized = fn;
}

async function failure(response) {
  let type = "error";
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error) {
      type = body.error.type;
      message = body.error.message;
    }
  } catch {
    // not JSON: keep the status line
  }
  if (response.status === 401) onUnauthorized();
  return new ApiError(response.status, type, message);
}

export async function get(path, { text = false, signal } = {}) {
  const response = await fetch(path, { headers: headers(), signal });
  if (!response.ok) throw await failure(response);
  return text ? response.text() : response.json();
}

export async function getBlob(path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw await failure(response);
  return response.blob();
}

export async function post(path, body, extra = {}) {
  const response = await fetch(path, {
    method: "POST",
    headers: headers({ "Content-Type": "application/json", ...extra }),
    body: JSON.stringify(body),
  });
  if (!response.ok) throw await failure(response);
  return response.json();
}

// A dedup id for a request that may be sent twice (a double click, a retry after a lost
// answer); getRandomValues works where randomUUID does not (plain http on a LAN address).
export function dedupId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return "console-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// Follow a run's events over server-sent events (read with fetch, so that the bearer header
// goes with it: EventSource cannot send one). Calls onEvent(event) for each event after
// position `after`; resolves when the stream ends (the run ended) or `signal` aborts it.
export async function follow(runId, after, onEvent, signal) {
  const response = await fetch(`/v1/runs/${runId}/events?follow=1&after=${after}`, {
    headers: headers({ Accept: "text/event-stream" }),
    signal,
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data: "))
        .map((line) => line.slice(6))
        .join("\n");
      if (data) onEvent(JSON.parse(data));
    }
  }
}
