"""The console in a real browser: runs, a run's path, approvals, cancel, workflows, audit."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from playwright.sync_api import expect

from tests.console.conftest import Console, Server


def _transitions(server: Server, run_id: str) -> list[tuple[str, str]]:
    events = server.call("GET", f"/v1/runs/{run_id}/events")
    return [(e["from_step"], e["to_step"]) for e in events if e["type"] == "TransitionTaken"]


def _drawn(page: Any) -> list[tuple[str, str, int]]:
    return [(p.get_attribute("data-from"), p.get_attribute("data-to"),
             int(p.get_attribute("data-taken")))
            for p in page.query_selector_all("#run-graph path.edge.taken")]


def _demo_runs(server: Server) -> list[dict[str, Any]]:
    return server.call("GET", "/v1/runs?workflow=support-triage&limit=100&detail=1")["runs"]


def test_every_page_at_both_sizes(console: Console, server: Server) -> None:
    """Runs, a run, approvals, workflows and audit render without a browser error, at
    1280x800 and at 390x844; a screenshot of each is kept."""
    page = console.open("/runs", "runs")
    rows = page.query_selector_all("table.runs tbody tr")
    assert len(rows) == 25  # a page of the demo's 37 runs
    assert page.is_enabled("text=older →")
    console.shot("runs")
    page.select_option("#filter-status", "failed")
    page.wait_for_selector('main[data-ready="runs"]')
    # Locators, not wait_for_function: a string predicate is eval'd in the page, which the
    # console's own Content-Security-Policy (rightly) refuses.
    expect(page.locator("table.runs td .badge.completed")).to_have_count(0)
    console.shot("runs-filtered")

    approved = next(r for r in _demo_runs(server)
                    if ("approval", "send") in _transitions(server, r["run_id"]))
    page = console.open(f"/runs/{approved['run_id']}", "run")
    assert page.inner_text("h1").endswith(approved["run_id"][:8])
    console.shot("run")

    server.start_refund(f"A-{secrets.token_hex(3)}")
    page = console.open("/approvals", "approvals")
    page.wait_for_selector(".approval-card form.signal-form")
    console.shot("approvals")

    page = console.open("/workflows/support-triage", "workflows")
    assert page.inner_text("table.versions") .count("newest") == 1
    console.shot("workflows")

    page = console.open(f"/audit/{approved['run_id']}", "audit")
    report = server.call("GET", f"/v1/runs/{approved['run_id']}/verify")
    assert page.inner_text("#verdict") == "OK" == report["verdict"]
    assert page.inner_text("#head-hash") == report["head_hash"]
    console.shot("audit")


def test_drawn_path_is_the_runs_transitions(desktop: Console, server: Server) -> None:
    """For runs that went different ways, the edges drawn as taken are exactly the
    TransitionTaken events the API returns, each with how often it was taken."""
    seen: set[tuple[tuple[str, str], ...]] = set()
    for row in _demo_runs(server):
        taken = _transitions(server, row["run_id"])
        path = tuple(sorted(set(taken)))
        if path in seen:
            continue
        seen.add(path)
        page = desktop.open(f"/runs/{row['run_id']}", "run")
        drawn = _drawn(page)
        assert sorted((a, b) for a, b, _ in drawn) == sorted(set(taken))
        assert all(n == taken.count((a, b)) for a, b, n in drawn)
        assert not page.query_selector("#run-graph .node.current")  # ended: nothing current
    assert len(seen) >= 3  # spam closed, replied, escalated, approved ...


def test_approve_through_the_form_and_watch_it_finish(desktop: Console,
                                                      server: Server) -> None:
    run_id = server.start_refund(f"B-{secrets.token_hex(3)}", 420.0)
    page = desktop.open(f"/runs/{run_id}", "run")
    page.wait_for_selector('#run-graph .node.current[data-step="approval"]')
    assert _drawn(page) == [("check", "approval", 1)]
    # the retried first attempt is on the timeline with its reason
    assert "rate_limited" in page.inner_text("table.timeline")
    page.fill('.approval input[name="by"]', "console test")
    page.fill('.approval input[name="note"]', "fine")
    desktop.shot("run-waiting")
    page.click(".approval button.approve")
    # no reload: the event stream brings the end
    page.wait_for_selector(".page-head .badge.completed", timeout=10_000)
    expect(page.locator("#run-graph path.edge.taken")).to_have_count(3)
    assert sorted(_drawn(page)) == sorted((a, b, 1) for a, b in _transitions(server, run_id))
    desktop.shot("run-approved")
    events = server.call("GET", f"/v1/runs/{run_id}/events")
    signals = [e for e in events if e["type"] == "SignalReceived"]
    assert len(signals) == 1
    assert signals[0]["payload"] == {"approved": True, "by": "console test", "note": "fine"}
    assert signals[0]["signal_id"].startswith("console-")
    assert server.call("GET", f"/v1/runs/{run_id}")["status"] == "completed"


def test_reject_from_the_approvals_queue(desktop: Console, server: Server) -> None:
    run_id = server.start_refund(f"C-{secrets.token_hex(3)}")
    page = desktop.open("/approvals", "approvals")
    card = f'.approval-card[data-run="{run_id}"]'
    page.fill(f'{card} input[name="by"]', "queue test")
    page.click(f"{card} button.reject")
    page.wait_for_selector(card, state="detached", timeout=10_000)
    run = server.wait_for(run_id, lambda r: r["status"] != "running")
    assert run["status"] == "completed"
    assert ("approval", "rejected") in _transitions(server, run_id)


def test_cancel_with_a_reason(desktop: Console, server: Server) -> None:
    run_id = server.start_refund(f"D-{secrets.token_hex(3)}")
    page = desktop.open(f"/runs/{run_id}", "run")
    page.fill('.cancel-form input[name="reason"]', "customer withdrew the request")
    page.click(".cancel-form button")
    page.wait_for_selector(".page-head .badge.cancelled", timeout=10_000)
    desktop.shot("run-cancelled")
    run = server.call("GET", f"/v1/runs/{run_id}")
    assert run["status"] == "cancelled"
    assert "customer withdrew the request" in run["reason"]


def test_download_the_export(desktop: Console, server: Server) -> None:
    run_id = _demo_runs(server)[0]["run_id"]
    page = desktop.open(f"/audit/{run_id}", "audit")
    with page.expect_download() as info:
        page.click("#download-export")
    text = Path(info.value.path()).read_text(encoding="utf-8")
    assert text == server.call("GET", f"/v1/runs/{run_id}/export")
    assert page.inner_text("#head-hash") in text.splitlines()[-1]


def test_the_canary_secret_is_on_no_page(desktop: Console, server: Server) -> None:
    """The ledger executor's API key went into an error message (its first attempt fails
    quoting it); no page, and no API answer the console read, shows it."""
    run_id = server.start_refund(f"E-{secrets.token_hex(3)}")
    assert "rate_limited" in str(server.call("GET", f"/v1/runs/{run_id}/events"))
    pages = [("/runs", "runs"), (f"/runs/{run_id}", "run"), ("/approvals", "approvals"),
             ("/workflows/refund", "workflows"), ("/workflows/support-triage", "workflows"),
             (f"/audit/{run_id}", "audit")]
    for route, ready in pages:
        page = desktop.open(route, ready)
        assert server.canary not in page.content(), route
        assert server.canary not in page.inner_text("body"), route
    assert desktop.bodies
    assert not [b for b in desktop.bodies if server.canary in b]
    assert server.canary not in server.call("GET", f"/v1/runs/{run_id}/export")
