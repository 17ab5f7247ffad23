// A workflow graph as SVG, laid out top-down in layers, with a run's path drawn on it.
//
// graph: the answer of GET /v1/workflows/{name} (nodes, edges, start).
// run (optional): { taken: [[from, to], ...], visited: Set(step), current: Set(step),
//                   failed: Set(step) } — node ids are the graph's (branches map to parents).

const NS = "http://www.w3.org/2000/svg";
const W = 150;
const H = 40;
const GAP_X = 36;
const GAP_Y = 56;
const FORWARD = new Set(["next", "route", "timeout", "failure"]);

function el(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function layers(graph) {
  const ids = graph.nodes.map((n) => n.id);
  const extra = new Set();
  for (const e of graph.edges) {
    for (const end of [e.from, e.to]) {
      if (end !== "*" && !ids.includes(end)) extra.add(end);
    }
  }
  const all = [...ids, ...[...extra].sort()];
  const out = new Map(all.map((id) => [id, []]));
  for (const e of graph.edges) {
    if (FORWARD.has(e.kind) && out.has(e.from) && out.has(e.to)) out.get(e.from).push(e);
  }
  // Back edges (those that close a cycle) are found by a depth-first walk from the start.
  const back = new Set();
  const state = new Map();
  const walk = (id) => {
    state.set(id, 1);
    for (const e of out.get(id)) {
      const s = state.get(e.to);
      if (s === 1) back.add(e);
      else if (s === undefined) walk(e.to);
    }
    state.set(id, 2);
  };
  walk(graph.start);
  for (const id of all) if (!state.has(id)) walk(id);
  // Longest path over the forward edges that remain (a DAG): rank 0 is the start.
  const rank = new Map(all.map((id) => [id, 0]));
  for (let changed = true, rounds = 0; changed && rounds < all.length + 1; rounds++) {
    changed = false;
    for (const id of all) {
      for (const e of out.get(id)) {
        if (back.has(e)) continue;
        if (rank.get(e.to) < rank.get(id) + 1) {
          rank.set(e.to, rank.get(id) + 1);
          changed = true;
        }
      }
    }
  }
  const last = Math.max(0, ...[...rank.entries()].filter(([id]) => !extra.has(id))
    .map(([, r]) => r));
  for (const id of extra) rank.set(id, Math.max(rank.get(id), last + 1));
  const rows = [];
  for (const id of all) {
    const r = rank.get(id);
    (rows[r] = rows[r] || []).push(id);
  }
  return { rows: rows.filter(Boolean), back };
}

function label(node) {
  if (!node) return "";
  if (node.kind === "parallel") return `${node.id}: ${(node.branches || []).join(" + ")}`;
  if (node.kind === "map") return `${node.id} (map)`;
  if (node.kind === "signal") {
    return node.id === node.signal ? `${node.id} (signal)` : `${node.id}: ${node.signal}`;
  }
  return node.id;
}

const SPECIAL = { $end: "end", $fail: "fail" };

export function drawGraph(graph, run = null) {
  const { rows, back } = layers(graph);
  const widest = Math.max(...rows.map((r) => r.length));
  const width = widest * W + (widest + 1) * GAP_X;
  const height = rows.length * H + (rows.length + 1) * GAP_Y;
  const pos = new Map();
  rows.forEach((row, r) => {
    const span = row.length * W + (row.length - 1) * GAP_X;
    row.forEach((id, i) => {
      pos.set(id, { x: (width - span) / 2 + i * (W + GAP_X), y: GAP_Y + r * (H + GAP_Y) });
    });
  });
  const byId = new Map(graph.nodes.map((n) => [n.id, n]));
  const svg = el("svg", {
    viewBox: `0 0 ${width} ${height}`, class: "graph", role: "img",
    "aria-label": `graph of workflow ${graph.workflow}`,
  });
  svg.style.maxWidth = `${width}px`;  // CSSOM, not a style attribute (the page's CSP)
  const defs = el("defs");
  for (const [name, cls] of [["arrow", "arrow"], ["arrow-taken", "arrow taken"]]) {
    const marker = el("marker", {
      id: name, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7,
      orient: "auto-start-reverse",
    });
    marker.append(el("path", { d: "M0,0 L10,5 L0,10 z", class: cls }));
    defs.append(marker);
  }
  svg.append(defs);
  const taken = new Map();
  for (const [from, to] of run ? run.taken : []) {
    const key = `${from}\u0000${to}`;
    taken.set(key, (taken.get(key) || 0) + 1);
  }
  const drawn = new Set();
  const edges = el("g", { class: "edges" });
  const curve = (a, b, isBack) => {
    if (isBack) {  // around the right-hand side
      const x = Math.max(a.x, b.x) + W + GAP_X / 2;
      return `M${a.x + W},${a.y + H / 2} C${x},${a.y + H / 2} ${x},${b.y + H / 2} ` +
        `${b.x + W},${b.y + H / 2}`;
    }
    const x1 = a.x + W / 2, y1 = a.y + H, x2 = b.x + W / 2, y2 = b.y;
    const my = (y1 + y2) / 2;
    return `M${x1},${y1} C${x1},${my} ${x2},${my} ${x2},${y2}`;
  };
  const addEdge = (e, isBack, extraEdge) => {
    const a = pos.get(e.from), b = pos.get(e.to);
    if (!a || !b) return;
    const key = `${e.from}\u0000${e.to}`;
    const isTaken = taken.has(key) && !drawn.has(key);
    if (isTaken) drawn.add(key);
    const path = el("path", {
      d: curve(a, b, isBack || (b.y <= a.y)),
      class: `edge ${e.kind}${isTaken ? " taken" : ""}${extraEdge ? " unplanned" : ""}`,
      "data-from": e.from, "data-to": e.to,
      "marker-end": `url(#${isTaken ? "arrow-taken" : "arrow"})`,
    });
    if (isTaken) path.setAttribute("data-taken", String(taken.get(key)));
    path.append(el("title", {}, `${e.from} → ${e.to}: ${e.label || e.kind}` +
      (isTaken ? ` (taken ${taken.get(key)}×)` : "")));
    if (isTaken) edges.append(path);
    else edges.prepend(path);  // taken edges on top
  };
  for (const e of graph.edges) {
    if (e.from === "*") continue;
    addEdge(e, back.has(e), false);
  }
  // A transition the graph does not draw (a limit's jump, say): drawn too, marked unplanned.
  for (const key of taken.keys()) {
    if (drawn.has(key)) continue;
    const [from, to] = key.split("\u0000");
    addEdge({ from, to, kind: "limit", label: "taken" }, false, true);
  }
  svg.append(edges);
  const nodes = el("g", { class: "nodes" });
  for (const [id, p] of pos) {
    const node = byId.get(id);
    const classes = ["node", node ? node.kind : SPECIAL[id] || "special"];
    if (run) {
      if (run.visited.has(id)) classes.push("visited");
      if (run.failed.has(id)) classes.push("failed");
      if (run.current.has(id)) classes.push("current");
      if (run.ended === id) classes.push("visited");
    }
    const g = el("g", { class: classes.join(" "), "data-step": id,
      transform: `translate(${p.x},${p.y})` });
    const special = id in SPECIAL;
    g.append(el("rect", { width: W, height: H, rx: special ? H / 2 : 6 }));
    const text = special ? SPECIAL[id] : label(node);
    g.append(el("text", { x: W / 2, y: H / 2 + 4, "text-anchor": "middle" },
      text.length > 22 ? text.slice(0, 21) + "…" : text));
    const detail = node && node.executor ? `${id} (executor ${node.executor})` : text;
    g.append(el("title", {}, detail));
    nodes.append(g);
  }
  svg.append(nodes);
  return svg;
}

// The graph node a step key belongs to: itself, the parallel step holding a branch, or
// the map step of an item ("name[3]").
export function nodeOf(graph, key) {
  const base = key.replace(/\[\d+\]$/, "");
  if (graph.nodes.some((n) => n.id === base)) return base;
  const parent = graph.nodes.find((n) => (n.branches || []).includes(base));
  return parent ? parent.id : base;
}
