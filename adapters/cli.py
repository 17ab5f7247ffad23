"""The `rulebound` command.

Errors a user can cause (a bad URL, an unknown run, a broken --app) print one line and exit
non-zero; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from collections.abc import Set as AbstractSet
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import unquote, urlsplit
from uuid import UUID

from rulebound.domain.errors import RuleboundError, RunNotFound

if TYPE_CHECKING:  # imported by the commands that use them: `--help` needs none of it
    from rulebound.engine import Engine, Registry
    from rulebound.engine.retention import Retention

DEFAULT_STORE = "sqlite:///rulebound.db"
# The exit codes of `verify` and `replay --verify` (their one home: rulebound.engine.audit).
EXIT_CODES = """exit codes:
  0  OK: every check passed, against the definition the run started on
  1  the command could not run: no such file or run, not an export, a bad --head
     or --app, a malformed command line
  2  FAILED: a divergence: the log was edited, cut or does not fold, or the
     definition no longer derives a recorded decision or the run's limits
  3  NOTICE only: the definition is another version than the run started on,
     but every recorded decision and limit re-derives from it
  4  UNCHECKED: chain and fold intact, but the run's workflow version is not in
     the registry, so its decisions could not be re-derived (pass --app
     module:attr naming the Registry that defines it)"""


def counted(n: int, word: str) -> str:
    from rulebound.domain.explain import counted as real

    return real(n, word)


def _store(args: argparse.Namespace) -> str:
    return args.store or os.environ.get("RULEBOUND_STORE") or DEFAULT_STORE


def _registry(args: argparse.Namespace) -> Registry:
    from rulebound.engine.registry import load_app

    if getattr(args, "app", None):
        return load_app(args.app)
    from rulebound.adapters.demo.run import demo_registry

    return demo_registry()  # the demo's definitions, so its runs explain out of the box


def _run_uuid(raw: str) -> UUID:
    try:
        return UUID(str(raw))
    except ValueError:
        raise RunNotFound(f"{raw!r} is not a run id") from None


async def _records(engine: Engine, raw: str) -> list[Any]:
    """A run's stored records, exactly as stored (for export and verification)."""
    run_id = _run_uuid(raw)
    records = await engine.storage.read(run_id, 0)
    if not records:
        raise RunNotFound(f"no run {run_id}")
    return records


def _head_of(records: list[Any]) -> str | None:
    """The hash of the last stored event: the anchor an auditor compares an export with."""
    try:
        head = json.loads(records[-1].data).get("hash")
    except (ValueError, AttributeError, IndexError):
        return None
    return head if isinstance(head, str) else None


def _existing_store(url: str) -> str:
    """`url`, unless it names a SQLite file that does not exist: a command that only reads
    must not create an empty database for a mistyped path and then report 'no run'."""
    parts = urlsplit(url)
    if parts.scheme.lower() == "sqlite" and not parts.netloc:
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if path and not Path(path).exists():
            raise RuleboundError(
                f"no store at {path!r}: the SQLite file does not exist (check --store or "
                "RULEBOUND_STORE; `rulebound demo` and `rulebound serve` create one)")
    return url


def _reader(args: argparse.Namespace, registry: Registry | None = None) -> Engine:
    """An engine that only reads: it does not take charge of unfinished runs, and it opens
    only a store that exists. `registry`: the definitions to explain runs with (default:
    --app, or the demo's)."""
    from rulebound.engine.engine import Engine

    if registry is None:
        registry = _registry(args)
    return Engine(_existing_store(_store(args)), registry=registry, read_only=True)


async def cmd_demo(args: argparse.Namespace) -> int:
    from rulebound.adapters.demo.run import TICKETS, run_demo

    return await run_demo(_store(args), tickets=Path(args.tickets) if args.tickets else TICKETS,
                          explain=not args.no_explain)


def _index_progress(position: int, last: int) -> None:
    """Catching up the run index over a long log: say how far it got (on stderr)."""
    if last > 5_000:
        end = "\r" if sys.stderr.isatty() and position < last else "\n"
        print(f"indexing runs: {position}/{last} events", end=end, file=sys.stderr, flush=True)


async def cmd_runs(args: argparse.Namespace) -> int:
    from rulebound.engine.registry import Registry

    async with _reader(args, Registry()) as engine:  # a listing needs no definitions
        await engine.storage.project(progress=_index_progress)
        rows = await engine.runs(status=args.status, workflow=args.workflow, limit=args.limit)
        counts = await engine.count_runs()
        rows = [await _live(engine, row) if row.status == "running" else row for row in rows]
    now = datetime.now(UTC)
    if args.json:
        for row in rows:
            print(json.dumps({"run_id": str(row.run_id), "workflow": row.workflow,
                              "status": row.status, "version": row.version,
                              "created_at": row.created_at.isoformat(),
                              "updated_at": row.updated_at.isoformat()}))
        return 0
    table = [("RUN", "WORKFLOW", "STATUS", "EVENTS", "STARTED", "SECONDS")]
    for row in rows:
        # a running run has run until now; a finished one from its start to its end
        until = now if row.status == "running" else row.updated_at
        seconds = max(0.0, (until - row.created_at).total_seconds())
        table.append((str(row.run_id), row.workflow, row.status, str(row.version),
                      row.created_at.strftime("%Y-%m-%d %H:%M:%S"), f"{seconds:.3f}"))
    _print_table(table, right={3, 5})
    total = sum(counts.values())
    print(f"\n{len(rows)} shown of {counted(total, 'run')}: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


async def _live(engine: Engine, row: Any) -> Any:
    """A running run's row with its event count and last change read from its log.

    The read model records a run's start and end only (so that listing stays cheap); for the
    few running runs a listing shows, the log says how far each has come.
    """
    try:
        view = await engine.get(row.run_id)
    except RuleboundError:  # a quarantined run: the read model's row is all there is
        return row
    updated = view.updated_at or row.updated_at
    return dataclasses.replace(row, version=max(view.version, row.version),
                               updated_at=max(updated, row.updated_at))


async def cmd_show(args: argparse.Namespace) -> int:
    async with _reader(args) as engine:
        view = await engine.get(args.run)
        records = await _records(engine, args.run)
    # the head as of the state shown (a live run may have moved on between the two reads)
    head = _head_of(records[:view.version] if view.version else records)
    head_seq = min(view.version, len(records)) if view.version else len(records)
    if args.json:
        print(json.dumps({**view.to_dict(), "head_hash": head, "head_seq": head_seq},
                         indent=2, default=str))
        return 0
    print(f"run       {view.run_id}")
    print(f"workflow  {view.workflow} (definition {view.definition_hash[:12]})")
    print(f"status    {view.status}" + (f" — {view.reason}" if view.reason else ""))
    print(f"usage     ${view.usage.cost:.4f}, {view.usage.tokens_in} tokens in, "
          f"{view.usage.tokens_out} out; {counted(view.attempts, 'attempt')}, "
          f"{counted(view.retries, 'retry')}")
    if view.output is not None:
        print(f"output    {json.dumps(view.output, default=str)[:300]}")
    print(f"head      {head} (event {head_seq}; `verify FILE --head` anchors an export)")
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
    """Bind first (a busy port fails before any run is touched), answer /healthz at once,
    open the engine (recovery) while /readyz and the run API say 503 not_ready, then print
    the `serving ... on URL` line: the moment the run API takes requests. SIGTERM and Ctrl-C
    both stop the same way: stop accepting, finish requests in flight, let running attempts
    finish (up to --drain-timeout; those cut off are recorded as abandoned and re-run by the
    next start), then exit 0. A signal during recovery stops it (the next start resumes)."""
    from rulebound.adapters.http.server import address, check_bind, listen, serving

    token = os.environ.get("RULEBOUND_TOKEN") or None
    check_bind(args.host, token, args.insecure_no_auth)  # before the engine opens (recovery)
    retention = _retention(args)
    give_back_after = _seconds(args.give_back_after, "--give-back-after")
    registry = _registry(args)
    sock = listen(args.host, args.port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    caught: list[str] = []

    def on_signal(name: str) -> None:
        caught.append(name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    from rulebound.engine.engine import Engine

    engine = Engine(_store(args), registry=registry, max_active_runs=args.max_active_runs,
                    drain_timeout=args.drain_timeout, lease_time=args.lease_time,
                    retention=retention)
    try:
        async with serving(engine, sock, token=token, give_back_after=give_back_after):
            if await _open_unless_stopped(engine, stop):
                print(f"rulebound: serving {', '.join(registry.names())} on {address(sock)} "
                      f"(store {_redact(_store(args))}, auth {'on' if token else 'off'})",
                      file=sys.stderr, flush=True)
                await stop.wait()
        print(f"rulebound: {caught[0] if caught else 'stop'}: stopped accepting; letting "
              f"running attempts finish (up to {args.drain_timeout:g} s)", file=sys.stderr,
              flush=True)
        await engine.close()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        sock.close()
        await engine.close()  # a no-op when closed above; else (an error) the same drain
    print("rulebound: stopped", file=sys.stderr, flush=True)
    return 0


def _duration(raw: str, flag: str) -> timedelta:
    """An age on the command line: a number of days, or a number with d, h, m or s."""
    text = raw.strip().lower()
    units = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "d")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        seconds = float("nan")
    try:
        if not 0 <= seconds < float("inf"):  # also NaN
            raise OverflowError
        return timedelta(seconds=seconds)
    except OverflowError:
        raise RuleboundError(f"{flag} {raw!r}: expected an age: days (30), or 30d, 12h, "
                             "15m, 10s") from None


def _seconds(raw: str, flag: str) -> float:
    """A number of seconds on the command line, 0 or more (0: off)."""
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not 0 <= seconds < float("inf"):  # also NaN
        raise RuleboundError(f"{flag} {raw!r}: expected a number of seconds, 0 or more "
                             "(0 turns it off)")
    return seconds


def _retention(args: argparse.Namespace) -> Retention | None:
    """serve's retention flags as an Engine setting (None: keep every run)."""
    if args.retain_for is None and args.archive_dir is None:
        return None
    if args.retain_for is None or args.archive_dir is None:
        raise RuleboundError("retention needs both --retain-for AGE and --archive-dir DIR")
    from rulebound.engine.retention import Retention

    folder = Path(args.archive_dir)
    if not folder.parent.is_dir():
        raise RuleboundError(f"--archive-dir {args.archive_dir}: no directory "
                             f"{str(folder.parent)!r}")
    retention = Retention(_duration(args.retain_for, "--retain-for"), folder,
                          every=_duration(args.archive_every, "--archive-every"),
                          workflow=args.archive_workflow)
    # the passes' lines (what was archived, what was kept and why, a failed pass) on stderr
    import logging

    logger = logging.getLogger("rulebound.retention")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("rulebound: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return retention


async def _open_unless_stopped(engine: Engine, stop: asyncio.Event) -> bool:
    """Open the engine; False if `stop` came first (open() is cut off and undoes itself:
    the runs it was recovering are recovered by the next start). open()'s errors propagate."""
    opening = asyncio.ensure_future(engine.open())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({opening, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not opening.done():
            opening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await opening
    if opening.cancelled():
        return False
    opening.result()  # raises what open() raised
    return True


async def _stored_records(args: argparse.Namespace) -> list[Any]:
    async with _reader(args) as engine:
        return await _records(engine, args.run)


def _write_lines(path: str | None, lines: list[dict[str, Any]]) -> None:
    from rulebound.engine.audit import export_text

    text = export_text(lines)
    if path is None:
        sys.stdout.write(text)
        return
    target = Path(path)
    if target.is_dir():
        raise RuleboundError(f"cannot write {path}: it is a directory")
    if not target.parent.is_dir():
        raise RuleboundError(f"cannot write {path}: no directory {str(target.parent)!r}")
    tmp = target.with_name(target.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(target)  # a reader never sees half an export
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RuleboundError(f"cannot write {path}: {exc.strerror or exc}") from None


async def cmd_export(args: argparse.Namespace) -> int:
    from rulebound.engine.audit import export_records

    records = await _stored_records(args)
    lines = export_records(str(_run_uuid(args.run)), records)
    await asyncio.to_thread(_write_lines, args.output, lines)
    if args.output:
        print(f"exported {counted(len(records), 'event')} and a manifest to {args.output}",
              file=sys.stderr)
    return 0


def _cut_off(raw: str) -> datetime:
    """--ended-before: an ISO date or time (UTC unless it names an offset), or an age such
    as 30d or 12h (that long before now)."""
    text = raw.strip()
    units = {"d": 86400, "h": 3600, "m": 60}
    if text[:-1].isdigit() and text[-1:].lower() in units:
        return datetime.now(UTC) - timedelta(seconds=int(text[:-1]) * units[text[-1].lower()])
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise RuleboundError(f"--ended-before {raw!r}: expected a date (2025-01-31), a time "
                             "(2025-01-31T12:00:00+00:00) or an age (30d, 12h)") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _archive_progress(every: float = 1.0) -> Callable[[Any], None]:
    """Long archives say how far they got on stderr, about once a second."""
    shown = [time.monotonic()]

    def report(result: Any) -> None:
        now = time.monotonic()
        if now - shown[0] < every:
            return
        shown[0] = now
        end = "\r" if sys.stderr.isatty() else "\n"
        print(f"archiving: {result.archived} runs archived, {len(result.kept)} kept, "
              f"{result.listed} looked at", end=end, file=sys.stderr, flush=True)

    return report


async def cmd_archive(args: argparse.Namespace) -> int:
    """Export, verify, then remove ended runs (see rulebound.engine.archive)."""
    from rulebound.engine.archive import archive

    before = _cut_off(args.ended_before)
    output = Path(args.output)
    if not output.parent.is_dir():
        raise RuleboundError(f"cannot write to {args.output}: no directory "
                             f"{str(output.parent)!r}")
    crash_after = args.crash_after

    def secured(count: int) -> None:  # test aid: die where it hurts most, files written
        if crash_after is not None and count >= crash_after:
            sys.stderr.flush()
            os._exit(70)

    async with _reader(args) as engine:
        await engine.storage.project(progress=_index_progress)
        result = await asyncio.to_thread(
            archive, engine.storage.store, output, ended_before=before,
            workflow=args.workflow, definition_for=_definition_finder(engine.registry),
            progress=_archive_progress(), batch=max(1, args.batch), after_secured=secured)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    for run_id, why in result.kept[:20]:
        print(f"kept {run_id}: {why}", file=sys.stderr)
    if len(result.kept) > 20:
        print(f"... and {len(result.kept) - 20} more kept", file=sys.stderr)
    reused = f" ({result.reused} found already exported)" if result.reused else ""
    print(f"archived {counted(result.archived, 'run')} ({counted(result.events, 'event')}) "
          f"that ended before {before.isoformat()} to {output}{reused} in "
          f"{result.seconds:.1f} s ({result.rate:.0f} runs/s); "
          f"{counted(len(result.kept), 'run')} kept", file=sys.stderr)
    return 2 if result.failed else 0


def _definition_finder(registry: Registry) -> Any:
    def find(definition_hash: str, name: str) -> Any:
        found = registry.by_hash(definition_hash)
        if found is None and name in registry.names():
            found = registry.latest(name)  # changed definition: check it and name the change
        return found

    return find


def _print_report(report: Any, what: str, *, source: str = "file") -> int:
    """Findings, or the OK lines. Only values the checks derived or matched are printed (the
    status from the last event, never the manifest's word for it), and every string from the
    file goes through repr or `printable`: a crafted log cannot write terminal escapes."""
    from rulebound.engine.audit import printable

    what = printable(what)
    for notice in report.notices:
        print(f"NOTICE: {what}: {notice}")
    if report.failed:
        for finding in report.findings:
            print(f"FAILED: {what}: {finding}")
        return report.exit_code
    if source == "store":
        complete = "as stored"
    elif report.manifest is not None:
        ended = (f"run {report.status}" if report.terminal
                 else "run still going when exported")
        complete = f"complete per its manifest ({ended})"
    elif report.anchored:
        complete = "complete up to the --head anchor"
    else:
        complete = "PARTIAL (no manifest: events cut from the end would go unnoticed)"
    print(f"OK: {what}: {counted(report.events, 'event')}, chain intact (event content; ids "
          f"and run id are not covered), {complete}, fold clean, "
          f"{counted(report.decisions_checked, 'decision')} re-derived (workflow "
          f"{printable(repr(report.workflow))}, definition "
          f"{printable(str(report.definition_hash)[:12])})")
    if report.anchored:
        print(f"anchored: the head hash {report.head_hash} is the --head anchor (every "
              "event's content has the stored values; ids and the run id are not hashed)")
    elif source == "store":
        print(f"head: {report.head_hash}")
    else:
        print(f"unanchored: head {report.head_hash}; a rewritten and re-chained file would "
              "also pass: compare with `rulebound show RUN` in the store, or pass --head HASH")
    if report.notices:
        print(f"NOTICE: {what}: checked against another version of the definition; every "
              "recorded decision and limit re-derives from it")
    return report.exit_code


def _read_lines(name: str) -> list[dict[str, Any]]:
    path = Path(name)
    if not path.is_file():
        raise RuleboundError(f"no file {name!r}")
    lines = []
    with path.open("rb") as f:
        for number, data in enumerate(f, start=1):
            try:
                raw = data.decode("utf-8")
            except UnicodeDecodeError:
                raise RuleboundError(f"{name}:{number}: not UTF-8 text") from None
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise RuleboundError(f"{name}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(line, dict):
                raise RuleboundError(f"{name}:{number}: not a JSON object (got "
                                     f"{type(line).__name__}); is this an export?")
            lines.append(line)
    if not lines:
        raise RuleboundError(f"{name}: empty; an export holds at least a manifest line")
    return lines


def _anchor(raw: str | None) -> str | None:
    if raw is None:
        return None
    head = raw.strip().lower()
    if len(head) != 64 or any(c not in "0123456789abcdef" for c in head):
        raise RuleboundError(f"--head {raw!r}: expected a head hash of 64 hex digits (as "
                             "`rulebound show RUN` prints it)")
    return head


async def cmd_verify(args: argparse.Namespace) -> int:
    from rulebound.engine.audit import EXIT_UNCHECKED, verify_lines

    head = _anchor(args.head)
    registry = _registry(args)
    lines = await asyncio.to_thread(_read_lines, args.file)
    report = verify_lines(lines, _definition_finder(registry),
                          require_manifest=not args.partial, head=head)
    if report.exit_code == EXIT_UNCHECKED:
        return _print_unchecked(report, args.file, args.app)
    return _print_report(report, args.file)


def _print_unchecked(report: Any, what: str, app: str | None) -> int:
    """Every check passed up to the decisions, which need the run's definition: not a
    finding against the log, so not the exit code of a tampered one."""
    from rulebound.engine.audit import EXIT_UNCHECKED, printable

    where = (f"the registry from --app {app}" if app
             else "the demo's registry (no --app given)")
    fix = ("pass the --app holding that version" if app else
           "pass --app module:attr (or path/file.py:attr) naming the Registry that defines it")
    print(f"UNCHECKED: {printable(what)}: {counted(report.events, 'event')}, chain intact, "
          f"fold clean; decisions not re-derived: workflow "
          f"{printable(repr(report.workflow))} version "
          f"{printable(str(report.definition_hash)[:12])} is not in {where}: {fix}")
    return EXIT_UNCHECKED


async def cmd_replay(args: argparse.Namespace) -> int:
    from rulebound.engine.audit import record_lines, verify_lines

    registry = _registry(args)
    records = await _stored_records(args)
    # the bodies exactly as stored, so the chain is checked on what the store holds
    report = verify_lines(record_lines(str(_run_uuid(args.run)), records),
                          _definition_finder(registry), require_manifest=False)
    if not args.verify:
        if report.state is None:
            return _print_report(report, f"run {args.run}", source="store")
        state = report.state
        print(f"run {args.run}: replayed {counted(len(records), 'event')} -> {state.status}; "
              f"cost ${state.cost:.4f}, {counted(state.steps_taken, 'step')}, "
              f"{counted(state.retries, 'retry')}")
        return 0
    return _print_report(report, f"run {args.run}", source="store")


async def cmd_graph(args: argparse.Namespace) -> int:
    from rulebound.domain.events import RunStarted, TransitionTaken

    registry = _registry(args)
    workflow = registry.latest(args.workflow)
    taken: list[tuple[str, str]] = []
    if args.run:
        async with _reader(args) as engine:
            events = await engine.events(args.run)
        first = events[0] if events else None
        if isinstance(first, RunStarted):
            workflow = registry.by_hash(first.definition_hash) or workflow
        taken = [(e.from_step, e.to_step) for e in events if isinstance(e, TransitionTaken)]
    if args.format == "json":
        graph = workflow.graph()
        if args.run:
            graph["taken"] = [{"from": a, "to": b} for a, b in taken]
        print(json.dumps(graph, indent=2))
    else:
        print(workflow.mermaid(taken), end="")
    return 0


def _one_line(exc: BaseException) -> str:
    from rulebound.engine.audit import one_line

    return one_line(exc)


def _redact(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (
            f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _print_table(rows: Sequence[tuple[str, ...]], right: AbstractSet[int] = frozenset()) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells).rstrip())


class _Parser(argparse.ArgumentParser):
    """argparse, but a malformed command line exits 1 like every other user mistake, so that
    `verify`'s 2 and 3 keep their meanings."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rulebound", description="Event-sourced workflows: the system orchestrates, "
                                      "the model executes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace],
                                             Coroutine[Any, Any, int]],
                help: str, *, store: bool = True, app: bool = False,
                epilog: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--max-active-runs", type=int, default=1_000,
                   help="runs in flight before POST /v1/runs answers 503 (default 1000)")
    p.add_argument("--drain-timeout", type=float, default=10.0,
                   help="on SIGTERM or Ctrl-C, seconds running attempts may take to finish "
                        "(default 10)")
    p.add_argument("--lease-time", type=float, default=10.0,
                   help="PostgreSQL: seconds a shard lease lasts; another engine takes a "
                        "stopped one's runs within about this time (default 10)")
    p.add_argument("--give-back-after", metavar="SECONDS", default="10",
                   help="after this many seconds without runs or requests to the run API, "
                        "give freed memory back to the system, once (gc, then glibc's "
                        "malloc_trim where there is one); 0: never (default 10)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback address without RULEBOUND_TOKEN")
    p.add_argument("--retain-for", metavar="AGE",
                   help="retention: archive runs that ended longer ago than AGE (days, or "
                        "30d, 12h, 15m, 10s) to --archive-dir, as `rulebound archive` does, "
                        "in the background")
    p.add_argument("--archive-dir", metavar="DIR",
                   help="retention: where the verified export files go (one per run)")
    p.add_argument("--archive-every", metavar="AGE", default="1h",
                   help="retention: the pause between two passes (default 1h)")
    p.add_argument("--archive-workflow", metavar="W",
                   help="retention: only runs of this workflow (default: all)")
    p = command("export", cmd_export, "write a run's events as JSON lines")
    p.add_argument("run")
    p.add_argument("-o", "--output", help="file to write (default: standard output)")
    p = command("archive", cmd_archive, "move ended runs out of the store: write each one's "
                "export to a directory, read it back and verify it, then remove the run",
                app=True, epilog="Resumable: run it again after an interruption; a file "
                "already written and identical is only verified again. Exit 2 if a run was "
                "kept because its export did not verify.")
    p.add_argument("--ended-before", required=True, metavar="DATE",
                   help="runs that ended before this date or time (UTC unless an offset is "
                        "given), or this long ago: 30d, 12h")
    p.add_argument("--workflow", help="only runs of this workflow")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="directory for the exports (<run id>.jsonl; created if missing)")
    p.add_argument("--batch", type=int, default=200, metavar="N",
                   help="runs removed per store transaction (default 200)")
    p.add_argument("--crash-after", type=int, help=argparse.SUPPRESS)  # tests: exit abruptly
    p = command("verify", cmd_verify, "check an exported log offline: completeness, chain, "
                "fold, decisions", store=False, app=True, epilog=EXIT_CODES)
    p.add_argument("file")
    p.add_argument("--head", metavar="HASH",
                   help="the run's head hash from the store (`rulebound show RUN`): the log "
                        "must end on it, which also catches a rewritten, re-chained file")
    p.add_argument("--partial", action="store_true",
                   help="accept a log without its closing manifest (checked as a prefix: "
                        "events cut from its end cannot be noticed)")
    p = command("replay", cmd_replay, "replay a run from the store", app=True,
                epilog=EXIT_CODES)
    p.add_argument("run")
    p.add_argument("--verify", action="store_true",
                   help="also re-derive every decision and the run's limits from the "
                        "definition; names the first divergence")
    p = command("graph", cmd_graph, "print a workflow's graph", app=True)
    p.add_argument("workflow")
    p.add_argument("--format", choices=["mermaid", "json"], default="mermaid")
    p.add_argument("--run", help="mark the path this run took")
    return parser


def _stdout_closed() -> int:
    """The reader of our output went away (`rulebound runs | head`): stop quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the exit-time flush does not complain
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 141  # 128 + SIGPIPE, as a shell reports a command killed by a closed pipe


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = asyncio.run(args.handler(args))
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return code
    except KeyboardInterrupt:
        print("rulebound: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _stdout_closed()
    except RuleboundError as exc:
        print(f"rulebound: {_one_line(exc)}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"rulebound: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1
    except TimeoutError:
        print("rulebound: timed out", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
