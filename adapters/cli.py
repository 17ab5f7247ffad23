"""The `rulebound` command.

Errors a user can cause (a bad URL, an unknown run, a broken --app) print one line and exit
non-zero; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from domain.errors import RuleboundError
from engine import Engine, Registry, load_app

DEFAULT_STORE = "sqlite:///rulebound.db"


def _store(args: argparse.Namespace) -> str:
    return args.store or os.environ.get("RULEBOUND_STORE") or DEFAULT_STORE


def _registry(args: argparse.Namespace) -> Registry:
    if getattr(args, "app", None):
        return load_app(args.app)
    from adapters.demo.run import demo_registry

    return demo_registry()  # the demo's definitions, so its runs explain out of the box


def _reader(args: argparse.Namespace) -> Engine:
    """An engine that only reads: it does not take charge of unfinished runs."""
    return Engine(_store(args), registry=_registry(args), read_only=True)


async def cmd_demo(args: argparse.Namespace) -> int:
    from adapters.demo.run import TICKETS, run_demo

    return await run_demo(_store(args), tickets=Path(args.tickets) if args.tickets else TICKETS,
                          explain=not args.no_explain)


def _index_progress(position: int, last: int) -> None:
    """Catching up the run index over a long log: say how far it got (on stderr)."""
    if last > 5_000:
        end = "\r" if sys.stderr.isatty() and position < last else "\n"
        print(f"indexing runs: {position}/{last} events", end=end, file=sys.stderr, flush=True)


async def cmd_runs(args: argparse.Namespace) -> int:
    async with _reader(args) as engine:
        await engine.storage.project(progress=_index_progress)
        rows = await engine.runs(status=args.status, workflow=args.workflow, limit=args.limit)
        counts = await engine.count_runs()
    if args.json:
        for row in rows:
            print(json.dumps({"run_id": str(row.run_id), "workflow": row.workflow,
                              "status": row.status, "version": row.version,
                              "created_at": row.created_at.isoformat(),
                              "updated_at": row.updated_at.isoformat()}))
        return 0
    table = [("RUN", "WORKFLOW", "STATUS", "EVENTS", "STARTED", "SECONDS")]
    for row in rows:
        seconds = (row.updated_at - row.created_at).total_seconds()
        table.append((str(row.run_id), row.workflow, row.status, str(row.version),
                      row.created_at.strftime("%Y-%m-%d %H:%M:%S"), f"{seconds:.3f}"))
    _print_table(table, right={3, 5})
    total = sum(counts.values())
    print(f"\n{len(rows)} shown of {total} runs: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


async def cmd_show(args: argparse.Namespace) -> int:
    async with _reader(args) as engine:
        view = await engine.get(args.run)
    if args.json:
        print(json.dumps(view.to_dict(), indent=2, default=str))
        return 0
    print(f"run       {view.run_id}")
    print(f"workflow  {view.workflow} (definition {view.definition_hash[:12]})")
    print(f"status    {view.status}" + (f" — {view.reason}" if view.reason else ""))
    print(f"usage     ${view.usage.cost:.4f}, {view.usage.tokens_in} tokens in, "
          f"{view.usage.tokens_out} out; {view.attempts} attempts, {view.retries} retries")
    if view.output is not None:
        print(f"output    {json.dumps(view.output, default=str)[:300]}")
    table = [("STEP", "STATUS", "VISIT", "ATTEMPT", "OUTPUT / ERROR")]
    for key, step in view.steps.items():
        detail = step.error if step.error else step.output
        table.append((key, step.status, str(step.visit), str(step.attempt),
                      json.dumps(detail, default=str)[:70]))
    print()
    _print_table(table, right={2, 3})
    return 0


async def cmd_explain(args: argparse.Namespace) -> int:
    async with _reader(args) as engine:
        print(await engine.explain(args.run), end="")
    return 0


async def cmd_serve(args: argparse.Namespace) -> int:
    from adapters.http.server import serve

    token = os.environ.get("RULEBOUND_TOKEN") or None
    registry = _registry(args)
    async with Engine(_store(args), registry=registry,
                      max_active_runs=args.max_active_runs) as engine:
        print(f"rulebound: serving {', '.join(registry.names())} on "
              f"http://{args.host}:{args.port} (store {_redact(_store(args))}, "
              f"auth {'on' if token else 'off'})", file=sys.stderr)
        await serve(engine, args.host, args.port, token=token,
                    allow_insecure=args.insecure_no_auth)
    return 0


async def _events_of(args: argparse.Namespace) -> list[Any]:
    async with _reader(args) as engine:
        return await engine.events(args.run)


def _write_lines(path: str | None, lines: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n"
                   for line in lines)
    if path is None:
        sys.stdout.write(text)
        return
    tmp = Path(path + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # a reader never sees half an export


async def cmd_export(args: argparse.Namespace) -> int:
    from engine.audit import export_lines

    events = await _events_of(args)
    await asyncio.to_thread(_write_lines, args.output, export_lines(str(args.run), events))
    if args.output:
        print(f"exported {len(events)} events to {args.output}", file=sys.stderr)
    return 0


def _definition_finder(registry: Registry) -> Any:
    def find(definition_hash: str, name: str) -> Any:
        found = registry.by_hash(definition_hash)
        if found is None and name in registry.names():
            found = registry.latest(name)  # changed definition: check it and name the change
        return found

    return find


def _print_report(report: Any, what: str) -> int:
    if report.ok:
        print(f"OK: {what}: {report.events} events, chain intact, fold clean, "
              f"{report.decisions_checked} decisions re-derived "
              f"(workflow {report.workflow!r}, definition {str(report.definition_hash)[:12]})")
        return 0
    for finding in report.findings:
        print(f"FAILED: {what}: {finding}")
    return 2


def _read_lines(name: str) -> list[dict[str, Any]]:
    path = Path(name)
    if not path.is_file():
        raise RuleboundError(f"no file {name!r}")
    lines = []
    with path.open(encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                try:
                    lines.append(json.loads(raw))
                except json.JSONDecodeError as exc:
                    raise RuleboundError(f"{name}:{number}: not JSON ({exc.msg})") from None
    return lines


async def cmd_verify(args: argparse.Namespace) -> int:
    from engine.audit import verify_lines

    lines = await asyncio.to_thread(_read_lines, args.file)
    report = verify_lines(lines, _definition_finder(_registry(args)))
    return _print_report(report, args.file)


async def cmd_replay(args: argparse.Namespace) -> int:
    from engine.audit import export_lines, verify_lines

    events = await _events_of(args)
    report = verify_lines(export_lines(args.run, events), _definition_finder(_registry(args)))
    if not args.verify:
        if report.state is None:
            return _print_report(report, f"run {args.run}")
        state = report.state
        print(f"run {args.run}: replayed {len(events)} events -> {state.status}; "
              f"cost ${state.cost:.4f}, {state.steps_taken} steps, {state.retries} retries")
        return 0
    return _print_report(report, f"run {args.run}")


async def cmd_graph(args: argparse.Namespace) -> int:
    registry = _registry(args)
    workflow = registry.latest(args.workflow)
    taken: list[tuple[str, str]] = []
    if args.run:
        async with _reader(args) as engine:
            events = await engine.events(args.run)
        definition_hash = getattr(events[0], "definition_hash", None)
        workflow = registry.by_hash(definition_hash) or workflow
        taken = [(e.from_step, e.to_step) for e in events if e.type == "TransitionTaken"]
    if args.format == "json":
        graph = workflow.graph()
        if args.run:
            graph["taken"] = [{"from": a, "to": b} for a, b in taken]
        print(json.dumps(graph, indent=2))
    else:
        print(workflow.mermaid(taken), end="")
    return 0


def _redact(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (
            f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _print_table(rows: list[tuple[str, ...]], right: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells).rstrip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rulebound", description="Event-sourced workflows: the system orchestrates, "
                                      "the model executes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace],
                                             Coroutine[Any, Any, int]],
                help: str, *, store: bool = True, app: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        if store:
            p.add_argument("--store", help="store URL (default: $RULEBOUND_STORE or "
                                           f"{DEFAULT_STORE})")
        if app:
            p.add_argument("--app", help="a Registry to load, as module:attr or file.py:attr")
        return p

    p = command("demo", cmd_demo, "run the bundled support-triage demo")
    p.add_argument("--tickets", help="JSON lines file of tickets (default: the bundled set)")
    p.add_argument("--no-explain", action="store_true", help="skip the explanation at the end")
    p = command("runs", cmd_runs, "list runs, newest first")
    p.add_argument("--status", choices=["running", "completed", "failed", "cancelled"])
    p.add_argument("--workflow")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p = command("show", cmd_show, "show a run's state", app=True)
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p = command("explain", cmd_explain, "explain a run from its events", app=True)
    p.add_argument("run")
    p = command("serve", cmd_serve, "serve the HTTP API", app=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-active-runs", type=int, default=10_000,
                   help="runs in flight before POST /v1/runs answers 503")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback address without RULEBOUND_TOKEN")
    p = command("export", cmd_export, "write a run's events as JSON lines")
    p.add_argument("run")
    p.add_argument("-o", "--output", help="file to write (default: standard output)")
    p = command("verify", cmd_verify, "check an exported log offline: chain, fold, decisions",
                store=False, app=True)
    p.add_argument("file")
    p = command("replay", cmd_replay, "replay a run from the store", app=True)
    p.add_argument("run")
    p.add_argument("--verify", action="store_true",
                   help="also re-derive every decision; names the first divergence")
    p = command("graph", cmd_graph, "print a workflow's graph", app=True)
    p.add_argument("workflow")
    p.add_argument("--format", choices=["mermaid", "json"], default="mermaid")
    p.add_argument("--run", help="mark the path this run took")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(args.handler(args))
    except KeyboardInterrupt:
        print("rulebound: interrupted", file=sys.stderr)
        return 130
    except RuleboundError as exc:
        print(f"rulebound: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"rulebound: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print("rulebound: timed out", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
