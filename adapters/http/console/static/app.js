// The rulebound console: runs, a run (graph, timeline, steps), approvals, workflows, audit.
// Hash routes; every page reads the /v1 API and cleans up its timers and streams on leaving.

import * as api from "./api.js";
import {
  badge, between, duration, h, jsonBlock, money, shortId, when,
} from "./dom.js";
import { signalForm } from "./form.js";
import { drawGraph, nodeOf } from "./graph.js";

const main = document.getElementById("main");
const banner = document.getElementById("banner");
const live = document.getElementById("live");
const STATUSES = ["running", "completed", "failed", "cancelled"];
const PAGE = 25;
const POLL_MS = 2000;
let page = null;  // { abort: AbortController }

// --- plumbing -------------------------------------------------------------------------

function showError(exc) {
  if (exc && exc.name === "AbortError") return;
  banner.hidden = false;
  banner.textContent = exc instanceof api.ApiError
    ? `${exc.message} (${exc.type})` : `Cannot reach the server: ${exc.message || exc}`;
}

function clearError() {
  banner.hidden = true;
  banner.textContent = "";
}

function every(ms, fn, signal) {
  let timer = null;
  const tick = async () => {
    if (signal.aborted) return;
    try {
      await fn();
      live.classList.add("on");
    } catch (exc) {
      live.classList.remove("on");
      showError(exc);
    }
    if (!signal.aborted) timer = setTimeout(tick, ms);
  };
  signal.addEventListener("abort", () => clearTimeout(timer));
  timer = setTimeout(tick, ms);
}

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query = ""] = raw.split("?");
  return { parts: path.split("/").filter(Boolean).map(decodeURIComponent),
    query: new URLSearchParams(query) };
}

function go(path) {
  location.hash = path;
}

function section(title, ...children) {
  return h("section", { class: "card" }, h("h2", {}, title), ...children);
}

function table(headers, rows, cls = "") {
  return h("div", { class: "table-wrap" }, h("table", { class: cls },
    h("thead", {}, h("tr", {}, ...headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, ...rows)));
}

api.whenUnauthorized(() => {
  if (!document.getElementById("token-form")) renderToken();
});

function renderToken() {
  if (page) page.abort.abort();
  page = { abort: new AbortController() };
  const input = h("input", { type: "password", name: "token", autocomplete: "off",
    required: true, id: "token-input" });
  const form = h("form", { id: "token-form", class: "card narrow" },
    h("h2", {}, "Sign in"),
    h("p", {}, "This server wants a bearer token (RULEBOUND_TOKEN). It is kept in this tab " +
      "only (sessionStorage) and sent in the Authorization header."),
    h("label", { class: "field", for: "token-input" }, h("span", {}, "Token"), input),
    h("div", { class: "buttons" }, h("button", { type: "submit" }, "Use token")));
  main.dataset.ready = "token";
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    delete main.dataset.ready;
    api.setToken(input.value.trim());
    clearError();
    route();
  });
  main.replaceChildren(form);
  input.focus();
}

// --- runs -----------------------------------------------------------------------------

async function renderRuns({ query }, signal) {
  const status = query.get("status") || "";
  const workflow = query.get("workflow") || "";
  const offset = Math.max(0, parseInt(query.get("offset") || "0", 10) || 0);
  const workflows = (await api.get("/v1/workflows", { signal })).workflows;
  const setQuery = (changes) => {
    const q = new URLSearchParams({ status, workflow, offset: String(offset), ...changes });
    for (const [k, v] of [...q.entries()]) if (!v || v === "0") q.delete(k);
    go(`/runs${q.toString() ? "?" + q : ""}`);
  };
  const statusSelect = h("select", { id: "filter-status", "aria-label": "status" },
    h("option", { value: "" }, "any status"),
    ...STATUSES.map((s) => h("option", { value: s, selected: s === status }, s)));
  statusSelect.addEventListener("change", () => setQuery({ status: statusSelect.value,
    offset: "0" }));
  const wfSelect = h("select", { id: "filter-workflow", "aria-label": "workflow" },
    h("option", { value: "" }, "any workflow"),
    ...workflows.map((w) => h("option", { value: w.name, selected: w.name === workflow },
      w.name)));
  wfSelect.addEventListener("change", () => setQuery({ workflow: wfSelect.value,
    offset: "0" }));
  const body = h("div", {});
  const pager = h("div", { class: "pager" });
  main.replaceChildren(h("div", { class: "page-head" }, h("h1", {}, "Runs"),
    h("div", { class: "filters" }, statusSelect, wfSelect)), body, pager);

  const load = async () => {
    const q = new URLSearchParams({ limit: String(PAGE), offset: String(offset), detail: "1" });
    if (status) q.set("status", status);
    if (workflow) q.set("workflow", workflow);
    const data = await api.get(`/v1/runs?${q}`, { signal });
    const rows = data.runs.map((r) => {
      const d = r.detail || {};
      const usage = d.usage || {};
      const started = d.started_at || r.created_at;
      const ended = d.ended_at || (r.status === "running" ? new Date().toISOString() : r.updated_at);
      const state = (d.waiting_for || []).length
        ? [badge(r.status), " ", h("span", { class: "badge waiting" },
          `waits for ${d.waiting_for.join(", ")}`)]
        : [badge(r.status)];
      return h("tr", { "data-run": r.run_id, class: "clickable",
        onclick: () => go(`/runs/${r.run_id}`) },
      h("td", { "data-label": "run" }, h("a", { href: `#/runs/${r.run_id}`, class: "mono" },
        shortId(r.run_id))),
      h("td", { "data-label": "status" }, ...state),
      h("td", { "data-label": "workflow" }, r.workflow),
      h("td", { "data-label": "started" }, when(started)),
      h("td", { "data-label": "duration", class: "num" }, duration(between(started, ended))),
      h("td", { "data-label": "cost", class: "num" }, money(usage.cost)),
      h("td", { "data-label": "tokens", class: "num" },
        String((usage.tokens_in || 0) + (usage.tokens_out || 0))));
    });
    body.replaceChildren(rows.length
      ? table(["run", "status", "workflow", "started", "duration", "cost", "tokens"], rows,
        "runs")
      : h("p", { class: "muted empty" }, "No runs match."));
    pager.replaceChildren(
      h("button", { type: "button", disabled: offset === 0,
        onclick: () => setQuery({ offset: String(Math.max(0, offset - PAGE)) }) }, "← newer"),
      h("span", { class: "muted" }, data.runs.length
        ? `${offset + 1}–${offset + data.runs.length}` : ""),
      h("button", { type: "button", disabled: data.next_offset === null,
        onclick: () => setQuery({ offset: String(data.next_offset) }) }, "older →"));
  };
  await load();
  every(POLL_MS, load, signal);
}

// --- a run ----------------------------------------------------------------------------

function pathOf(graph, events, view) {
  const taken = [];
  const visited = new Set();
  const failed = new Set();
  const current = new Set();
  for (const e of events) {
    if (e.type === "TransitionTaken") {
      taken.push([e.from_step, e.to_step]);
      visited.add(e.to_step);
    }
    if (e.type === "StepScheduled" || e.type === "StepCompleted") visited.add(nodeOf(graph, e.step));
    if (e.type === "StepFailed") failed.add(nodeOf(graph, e.step));
  }
  if (view.status === "running") {
    for (const [key, st] of Object.entries(view.steps)) {
      if (["scheduled", "running", "waiting", "attempt_failed", "abandoned", "succeeded"]
        .includes(st.status)) current.add(nodeOf(graph, key));
    }
  }
  return { taken, visited, failed, current };
}

function stepTable(events, view) {
  const steps = new Map();
  const of = (key) => {
    if (!steps.has(key)) {
      steps.set(key, { attempts: 0, failures: 0, latency: 0, cost: 0, tin: 0, tout: 0,
        status: "", output: undefined, error: null });
    }
    return steps.get(key);
  };
  for (const e of events) {
    if (!e.step) continue;
    const s = of(e.step);
    if (e.type === "AttemptSucceeded" || e.type === "AttemptFailed") {
      s.attempts += 1;
      s.latency += e.latency || 0;
      s.cost += (e.usage && e.usage.cost) || 0;
      s.tin += (e.usage && e.usage.tokens_in) || 0;
      s.tout += (e.usage && e.usage.tokens_out) || 0;
      if (e.type === "AttemptFailed") {
        s.failures += 1;
        s.error = `${e.error_type}: ${e.message}`;
      }
    }
    if (e.type === "StepCompleted") {
      s.status = "completed";
      s.output = e.output;
    } else if (e.type === "StepFailed") {
      s.status = "failed";
      s.error = `${e.error_type}: ${e.message}`;
    } else if (e.type === "StepScheduled" && !s.status) s.status = "scheduled";
  }
  for (const [key, st] of Object.entries(view.steps)) if (steps.has(key)) of(key).status = st.status;
  const rows = [...steps.entries()].map(([key, s]) => h("tr", { "data-step": key },
    h("td", { "data-label": "step" }, key),
    h("td", { "data-label": "status" }, s.status ? badge(s.status) : ""),
    h("td", { "data-label": "attempts", class: "num" },
      `${s.attempts}${s.failures ? ` (${s.failures} failed)` : ""}`),
    h("td", { "data-label": "time", class: "num" }, s.attempts ? duration(s.latency) : "—"),
    h("td", { "data-label": "cost", class: "num" }, money(s.cost)),
    h("td", { "data-label": "tokens", class: "num" }, `${s.tin} in / ${s.tout} out`),
    h("td", { "data-label": "output" }, s.output !== undefined
      ? h("details", {}, h("summary", {}, "output"), jsonBlock(s.output))
      : s.error ? h("span", { class: "error-text" }, s.error) : "")));
  return table(["step", "status", "attempts", "time", "cost", "tokens", "output"], rows,
    "steps");
}

function eventDetail(e) {
  const parts = [];
  const kv = (k, v) => parts.push(h("span", { class: "kv" }, h("b", {}, `${k} `), String(v)));
  switch (e.type) {
    case "RunStarted": kv("workflow", e.workflow); kv("version", e.definition_hash.slice(0, 12)); break;
    case "StepScheduled":
      kv("attempt", e.attempt); kv("visit", e.visit); kv("why", e.reason);
      if (e.not_before && e.not_before > e.at) kv("not before", when(e.not_before));
      break;
    case "AttemptStarted": kv("attempt", e.attempt); kv("executor", e.executor); kv("worker", e.worker); break;
    case "AttemptSucceeded":
      kv("attempt", e.attempt); kv("latency", duration(e.latency));
      if (e.usage) { kv("cost", money(e.usage.cost)); kv("tokens", `${e.usage.tokens_in}/${e.usage.tokens_out}`); }
      break;
    case "AttemptFailed":
      kv("attempt", e.attempt); kv("error", `${e.error_type}: ${e.message}`);
      kv("retryable", e.retryable ? "yes" : "no"); kv("latency", duration(e.latency));
      if (e.retry_after) kv("retry after", when(e.retry_after));
      break;
    case "AttemptAbandoned": kv("attempt", e.attempt); kv("why", e.why); break;
    case "StepFailed": kv("error", `${e.error_type}: ${e.message}`); break;
    case "TransitionTaken":
      kv("to", e.to_step); kv("because", e.condition);
      if (e.values && Object.keys(e.values).length) kv("read", JSON.stringify(e.values));
      break;
    case "SignalReceived": kv("signal", e.name); if (e.payload !== undefined) kv("payload", JSON.stringify(e.payload).slice(0, 300)); break;
    case "TimerFired": kv("timer", e.timer); break;
    case "LimitReached": kv("limit", e.limit); kv("used", e.used); kv("of", e.limit_value); break;
    case "RunCompleted": case "RunFailed": case "RunCancelled": case "CancelRequested":
      kv("reason", e.reason || e.error_type || ""); break;
    default: break;
  }
  return parts;
}

function timeline(events) {
  const start = events.length ? new Date(events[0].at) : null;
  const rows = events.map((e) => h("tr", { class: `ev ${e.type}`, "data-seq": e.seq },
    h("td", { class: "num mono", "data-label": "#" }, String(e.seq)),
    h("td", { class: "num", "data-label": "at" },
      start ? `+${duration((new Date(e.at) - start) / 1000)}` : ""),
    h("td", { "data-label": "event" }, h("span", { class: "etype" }, e.type)),
    h("td", { "data-label": "step" }, e.step || e.from_step || ""),
    h("td", { "data-label": "detail", class: "detail" }, ...eventDetail(e))));
  return table(["#", "at", "event", "step", "detail"], rows, "timeline");
}

async function waitingForms(view, graph, onSent) {
  const out = [];
  for (const signal of view.waiting_for || []) {
    const node = graph.nodes.find((n) => n.kind === "signal" && n.signal === signal);
    const id = api.dedupId();  // one per form shown: a second click sends the same signal
    const context = node ? Object.entries(view.steps)
      .filter(([key, st]) => st.status === "completed" && st.output !== null && key !== node.id)
      .slice(-1) : [];
    out.push(h("div", { class: "approval", "data-signal": signal },
      h("h3", {}, `Waiting for signal “${signal}”`),
      ...context.map(([key, st]) => h("details", {}, h("summary", {}, `latest output: ${key}`),
        jsonBlock(st.output))),
      signalForm(node ? node.schema : null, async (payload) => {
        await api.post(`/v1/runs/${view.run_id}/signals/${encodeURIComponent(signal)}`,
          payload, { "Idempotency-Key": id });
        onSent();
      })));
  }
  return out;
}

function cancelForm(runId, onDone) {
  const reason = h("input", { type: "text", name: "reason", placeholder: "reason",
    maxlength: 1000, "aria-label": "reason for cancelling", required: true });
  const status = h("span", { class: "form-status", role: "status" });
  const form = h("form", { class: "cancel-form" }, reason,
    h("button", { type: "submit", class: "danger" }, "Cancel run"), status);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    form.querySelector("button").disabled = true;
    try {
      await api.post(`/v1/runs/${runId}/cancel`, { reason: reason.value.trim() || "cancelled" +
        " in the console" });
      status.textContent = "Cancellation recorded.";
      onDone();
    } catch (exc) {
      status.textContent = exc.message;
      status.className = "form-status error";
      form.querySelector("button").disabled = false;
    }
  });
  return form;
}

async function graphFor(workflow, hash, signal) {
  try {
    return await api.get(`/v1/workflows/${encodeURIComponent(workflow)}?version=${hash}`,
      { signal });
  } catch (exc) {
    if (exc.status !== 404) throw exc;
    return api.get(`/v1/workflows/${encodeURIComponent(workflow)}`, { signal });
  }
}

async function renderRun({ parts }, signal) {
  const runId = parts[1];
  let view = await api.get(`/v1/runs/${runId}`, { signal });
  const graph = await graphFor(view.workflow, view.definition_hash, signal);
  let events = await api.get(`/v1/runs/${runId}/events`, { signal });
  const head = h("div", {});
  const graphBox = h("div", { class: "graph-box", id: "run-graph" });
  const actions = h("div", {});
  const steps = h("div", {});
  const timelineBox = h("div", {});
  const explainBox = h("pre", { class: "explain" });
  const io = h("div", { class: "io" });
  main.replaceChildren(head, actions,
    section("Path", graphBox, h("p", { class: "legend muted" },
      h("span", { class: "key taken" }), " path taken ",
      h("span", { class: "key current" }), " current step ",
      h("span", { class: "key failed" }), " failed")),
    section("Steps: cost, tokens and time", steps),
    section("Timeline", timelineBox),
    section("Explanation", explainBox),
    section("Input and output", io));

  let shownWaiting = null;
  const draw = async () => {
    const usage = view.usage || {};
    const ended = view.status === "running" ? new Date().toISOString() : view.updated_at;
    head.replaceChildren(h("div", { class: "page-head" },
      h("h1", {}, h("span", { class: "muted" }, "run "), h("span", { class: "mono" }, shortId(runId))),
      badge(view.status),
      ...(view.waiting_for.length ? [h("span", { class: "badge waiting" },
        `waits for ${view.waiting_for.join(", ")}`)] : [])),
    h("dl", { class: "facts" },
      h("dt", {}, "run"), h("dd", { class: "mono" }, runId),
      h("dt", {}, "workflow"), h("dd", {}, h("a", { href: `#/workflows/${encodeURIComponent(view.workflow)}` }, view.workflow)),
      h("dt", {}, "version"), h("dd", { class: "mono" }, view.definition_hash.slice(0, 16)),
      h("dt", {}, "started"), h("dd", {}, when(view.started_at)),
      h("dt", {}, "duration"), h("dd", {}, duration(between(view.started_at, ended))),
      h("dt", {}, "cost"), h("dd", {}, money(usage.cost)),
      h("dt", {}, "tokens"), h("dd", {}, `${usage.tokens_in} in / ${usage.tokens_out} out`),
      h("dt", {}, "attempts"), h("dd", {}, `${view.attempts} (${view.retries} retries)`),
      ...(view.reason ? [h("dt", {}, "reason"), h("dd", {}, view.reason)] : []),
      h("dt", {}, "audit"), h("dd", {}, h("a", { href: `#/audit/${runId}` }, "export and verify"))));
    graphBox.replaceChildren(drawGraph(graph, pathOf(graph, events, view)));
    steps.replaceChildren(stepTable(events, view));
    timelineBox.replaceChildren(timeline(events));
    const started = events.find((e) => e.type === "RunStarted");
    io.replaceChildren(h("h3", {}, "input"), jsonBlock(started ? started.input : undefined),
      h("h3", {}, "output"), view.status === "completed" ? jsonBlock(view.output)
        : h("p", { class: "muted" }, view.status === "running" ? "not yet" : view.reason || "none"));
    const waiting = view.status === "running" ? view.waiting_for.join(",") : "";
    if (waiting !== shownWaiting) {  // keep a half-filled form while other events arrive
      shownWaiting = waiting;
      actions.replaceChildren(...(view.status === "running" ? [section("Act",
        ...(await waitingForms(view, graph, refresh)),
        cancelForm(runId, refresh))] : []));
    }
  };
  const explain = async () => {
    explainBox.textContent = await api.get(`/v1/runs/${runId}/explain`, { text: true, signal });
  };
  const refresh = async () => {
    view = await api.get(`/v1/runs/${runId}`, { signal });
    await draw();
    await explain();
  };
  await draw();
  await explain();
  if (view.status !== "running") return;
  // Live: follow the event stream; redraw (at most every 200 ms) as events arrive.
  let pending = null;
  const onEvent = (e) => {
    if (events.length && e.seq <= events[events.length - 1].seq) return;
    events = [...events, e];
    if (!pending) {
      pending = setTimeout(async () => {
        pending = null;
        try {
          await refresh();
        } catch (exc) {
          showError(exc);
        }
      }, 200);
    }
  };
  signal.addEventListener("abort", () => clearTimeout(pending));
  live.classList.add("on");
  const last = events.length ? events[events.length - 1].seq : 0;
  api.follow(runId, last, onEvent, signal).then(async () => {
    clearTimeout(pending);
    pending = null;
    if (!signal.aborted) {
      events = await api.get(`/v1/runs/${runId}/events`, { signal });
      await refresh();
    }
  }).catch(showError);
}

// --- approvals ------------------------------------------------------------------------

async function renderApprovals(_, signal) {
  main.replaceChildren(h("div", { class: "page-head" }, h("h1", {}, "Approvals")),
    h("p", { class: "muted" }, "Runs waiting for a signal, newest first. Each form is built " +
      "from the schema of the step that waits; it is sent with a dedup id, so sending twice " +
      "records one signal."));
  const list = h("div", { class: "approvals" });
  main.append(list);
  const graphs = new Map();
  const shown = new Map();  // run id -> element (kept while the run still waits)
  const load = async () => {
    const waiting = [];
    for (let offset = 0; offset !== null && offset < 2000;) {
      const data = await api.get(`/v1/runs?status=running&detail=1&limit=100&offset=${offset}`,
        { signal });
      waiting.push(...data.runs.filter((r) => r.detail && r.detail.waiting_for.length));
      offset = data.next_offset;
    }
    const keep = new Set(waiting.map((r) => r.run_id));
    for (const [id, node] of shown) {
      if (!keep.has(id)) {
        node.remove();
        shown.delete(id);
      }
    }
    for (const r of waiting) {
      if (shown.has(r.run_id)) continue;
      const key = `${r.workflow}@${r.detail.definition_hash}`;
      if (!graphs.has(key)) graphs.set(key, await graphFor(r.workflow, r.detail.definition_hash, signal));
      const view = await api.get(`/v1/runs/${r.run_id}`, { signal });
      const card = h("article", { class: "card approval-card", "data-run": r.run_id },
        h("div", { class: "page-head" },
          h("h2", {}, h("a", { href: `#/runs/${r.run_id}`, class: "mono" }, shortId(r.run_id))),
          h("span", {}, r.workflow), h("span", { class: "muted" }, `started ${when(r.detail.started_at)}`)),
        ...(await waitingForms(view, graphs.get(key), () => load())),
        cancelForm(r.run_id, () => load()));
      shown.set(r.run_id, card);
      list.append(card);
    }
    if (!list.querySelector(".approval-card")) {
      if (!list.querySelector(".empty")) list.append(h("p", { class: "muted empty" }, "Nothing waits for a signal."));
    } else {
      for (const e of list.querySelectorAll(".empty")) e.remove();
    }
    const count = document.getElementById("approval-count");
    count.hidden = waiting.length === 0;
    count.textContent = String(waiting.length);
  };
  await load();
  every(POLL_MS, load, signal);
}

// --- workflows ------------------------------------------------------------------------

async function renderWorkflows({ parts }, signal) {
  const list = (await api.get("/v1/workflows", { signal })).workflows;
  const name = parts[1] || (list[0] && list[0].name);
  const tabs = h("div", { class: "tabs" }, ...list.map((w) =>
    h("a", { href: `#/workflows/${encodeURIComponent(w.name)}`,
      class: w.name === name ? "active" : "" }, w.name)));
  main.replaceChildren(h("div", { class: "page-head" }, h("h1", {}, "Workflows")), tabs);
  if (!name) {
    main.append(h("p", { class: "muted" }, "No workflows registered."));
    return;
  }
  const summary = list.find((w) => w.name === name);
  const [graph, versions] = await Promise.all([
    api.get(`/v1/workflows/${encodeURIComponent(name)}`, { signal }),
    api.get(`/v1/workflows/${encodeURIComponent(name)}/versions`, { signal })]);
  const rows = versions.versions.map((v) => h("tr", { "data-version": v.hash },
    h("td", { "data-label": "version" }, v.version || ""),
    h("td", { "data-label": "hash", class: "mono" }, v.hash),
    h("td", { "data-label": "newest" }, v.latest ? "newest" : ""),
    h("td", { "data-label": "runs", class: "num" }, h("a", {
      href: `#/runs?workflow=${encodeURIComponent(name)}` }, String(v.runs)))));
  const signals = graph.nodes.filter((n) => n.kind === "signal");
  main.append(
    summary && summary.description ? h("p", {}, summary.description) : "",
    section("Graph", h("div", { class: "graph-box" }, drawGraph(graph))),
    section("Versions", table(["version", "definition hash", "", "runs"], rows, "versions"),
      h("p", { class: "muted" }, `${versions.counted} runs counted` +
        (versions.complete ? "" : " (the newest only)") +
        (versions.other_runs ? `; ${versions.other_runs} on versions not registered here` : ""))),
    ...signals.map((n) => section(`Signal “${n.signal}” (step ${n.id})`, jsonBlock(n.schema))),
    section("Mermaid", h("details", {}, h("summary", {}, "source"),
      h("pre", { class: "json" }, graph.mermaid))));
}

// --- audit ----------------------------------------------------------------------------

async function renderAudit({ parts }, signal) {
  const runId = parts[1] || "";
  const input = h("input", { type: "text", name: "run", value: runId, id: "audit-run",
    placeholder: "run id", class: "mono", "aria-label": "run id" });
  const form = h("form", { class: "inline-form" }, input,
    h("button", { type: "submit" }, "Verify"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    go(`/audit/${input.value.trim()}`);
  });
  main.replaceChildren(h("div", { class: "page-head" }, h("h1", {}, "Audit")),
    h("p", { class: "muted" }, "Checks a run's stored log as `rulebound replay --verify` " +
      "does: the hash chain, the fold, and every decision re-derived from the definition. " +
      "The export is what `rulebound export` writes; check it offline with " +
      "`rulebound verify FILE --head HASH`."), form);
  if (!runId) {
    const recent = await api.get("/v1/runs?limit=10", { signal });
    main.append(section("Recent runs", h("ul", { class: "plain" }, ...recent.runs.map((r) =>
      h("li", {}, h("a", { href: `#/audit/${r.run_id}`, class: "mono" }, r.run_id), " ",
        badge(r.status), " ", r.workflow)))));
    return;
  }
  const report = await api.get(`/v1/runs/${encodeURIComponent(runId)}/verify`, { signal });
  const download = h("button", { type: "button", id: "download-export" }, "Download export");
  const note = h("span", { class: "form-status", role: "status" });
  download.addEventListener("click", async () => {
    try {
      const blob = await api.getBlob(`/v1/runs/${runId}/export`);
      const url = URL.createObjectURL(blob);
      const a = h("a", { href: url, download: `run-${runId}.jsonl` });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 1000);
      note.textContent = `${blob.size} bytes`;
    } catch (exc) {
      showError(exc);
    }
  });
  main.append(section("Verification",
    h("p", {}, h("span", { class: `badge verdict ${report.verdict}`, id: "verdict" },
      report.verdict), " ", h("a", { href: `#/runs/${runId}` }, "open the run")),
    h("dl", { class: "facts" },
      h("dt", {}, "head hash"), h("dd", { class: "mono", id: "head-hash" }, report.head_hash || "—"),
      h("dt", {}, "events"), h("dd", {}, String(report.events)),
      h("dt", {}, "status"), h("dd", {}, report.status || "—"),
      h("dt", {}, "decisions checked"), h("dd", {}, String(report.decisions_checked))),
    ...(report.findings.length ? [h("h3", {}, "Findings"),
      h("ul", {}, ...report.findings.map((f) => h("li", { class: "error-text" }, f)))] : []),
    ...(report.notices.length ? [h("h3", {}, "Notices"),
      h("ul", {}, ...report.notices.map((f) => h("li", {}, f)))] : []),
    h("div", { class: "buttons" }, download, note)));
}

// --- router ---------------------------------------------------------------------------

const PAGES = {
  runs: (r, s) => (r.parts[1] ? renderRun(r, s) : renderRuns(r, s)),
  approvals: renderApprovals,
  workflows: renderWorkflows,
  audit: renderAudit,
};

async function route() {
  if (page) page.abort.abort();
  const current = { abort: new AbortController() };
  page = current;
  clearError();
  live.classList.remove("on");
  const parsed = parseHash();
  const name = PAGES[parsed.parts[0]] ? parsed.parts[0] : "runs";
  for (const a of document.querySelectorAll("[data-nav]")) {
    a.classList.toggle("active", a.dataset.nav === name);
  }
  document.title = `${name} · rulebound`;
  try {
    await PAGES[name](parsed, current.abort.signal);
    if (page === current) main.dataset.ready = name === "runs" && parsed.parts[1] ? "run" : name;
  } catch (exc) {
    if (page === current) showError(exc);
  }
}

window.addEventListener("hashchange", () => {
  delete main.dataset.ready;
  route();
});

// Ask for a token before the first call when the server wants one (its public OpenAPI
// document says so), rather than after a refused request.
async function boot() {
  if (!api.token()) {
    try {
      const doc = await (await fetch("/openapi.json")).json();
      if (doc.security && doc.security.length) {
        renderToken();
        return;
      }
    } catch {
      // no document: the first call will tell
    }
  }
  route();
}
boot();
