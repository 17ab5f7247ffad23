"""Three `rulebound serve` processes on one throwaway PostgreSQL: a working cluster.

Runs with parallel steps and signal waits are started and signalled through random
replicas over HTTP; replicas are killed with SIGKILL (and started again) and paused with
SIGSTOP for longer than their lease (then SIGCONT). An execution ledger kept by the app,
outside the engine, and the stored logs then show:

- every run ended;
- no step whose success was stored ran again, and every re-execution follows an abandoned
  attempt (re-executions never exceed the attempts cut off by kills and pauses);
- no signal was recorded twice for one id;
- failover: from a kill to the first event the new owner writes for the dead one's runs;
- writes refused by fencing, from the replicas' /metrics.

The seed is printed (RULEBOUND_CLUSTER_SEED=N repeats the schedule of faults).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = f"{Path(__file__).with_name('cluster_app.py')}:registry"
RUNS = 200
LEASE = 2.0
REPLICAS = 3
STALL = 120  # seconds after the faults end by which every run must have ended
TERMINAL = {"completed", "failed", "cancelled"}


class Replica:
    def __init__(self, n: int, store: str, tmp: Path, ledger: Path) -> None:
        self.n, self.store, self.tmp, self.ledger = n, store, tmp, ledger
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = ""
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.log = self.tmp / f"replica{self.n}.{self.starts}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RULEBOUND_CLUSTER_LEDGER":
               str(self.ledger)}
        env.pop("RULEBOUND_TOKEN", None)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rulebound", "serve", "--app", APP, "--store",
                 self.store, "--port", "0", "--lease-time", str(LEASE), "--drain-timeout",
                 "1"], stderr=out, stdout=out, env=env, cwd=ROOT)
        give_up = time.monotonic() + 60
        while time.monotonic() < give_up:
            found = re.search(r"on (http://127\.0\.0\.1:\d+) ", self.log.read_text())
            if found:
                self.base = found.group(1)
                return
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            time.sleep(0.05)
        raise AssertionError(f"replica {self.n} did not start: {self.log.read_text()[-2000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Cluster:
    def __init__(self, replicas: list[Replica], rng: random.Random) -> None:
        self.replicas, self.rng = replicas, rng
        self.down: set[int] = set()  # replicas killed or paused right now
        self.session: aiohttp.ClientSession | None = None
        self.refused = 0

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        """A client: a random replica that is up; another one on a connection error or a 5xx."""
        assert self.session is not None
        for _ in range(400):
            up = [r for r in self.replicas if r.n not in self.down]
            replica = self.rng.choice(up)
            try:
                async with self.session.request(method, replica.base + path,
                                                timeout=aiohttp.ClientTimeout(total=5),
                                                **kw) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status < 500:
                        return resp.status, body
            except (TimeoutError, aiohttp.ClientError):
                pass
            self.refused += 1
            await asyncio.sleep(0.1)
        raise AssertionError(f"no replica answered {method} {path}")


@pytest.mark.slow
@pytest.mark.postgres
async def test_a_cluster_of_three_survives_kills_and_pauses(postgres_url: str,
                                                           tmp_path: Path) -> None:
    seed = int(os.environ.get("RULEBOUND_CLUSTER_SEED") or random.randrange(2**31))
    print(f"\ncluster: seed {seed} (RULEBOUND_CLUSTER_SEED={seed} to repeat)")
    rng = random.Random(seed)
    ledger = tmp_path / "ledger.jsonl"
    replicas = [Replica(n, postgres_url, tmp_path, ledger) for n in range(REPLICAS)]
    for replica in replicas:
        replica.start()
    cluster = Cluster(replicas, rng)
    kills: list[tuple[float, int]] = []  # (wall time, pid)
    pauses: list[int] = []
    fenced_after_pause = 0
    try:
        async with aiohttp.ClientSession() as session:
            cluster.session = session
            ids: dict[int, str] = {}
            signalled: set[str] = set()

            async def start_all() -> None:
                async def one(i: int) -> None:
                    status, body = await cluster.call(
                        "POST", "/v1/runs", json={"workflow": "cluster", "input": {"i": i}},
                        headers={"Idempotency-Key": f"run-{i}"})
                    assert status in (200, 201), body
                    ids[i] = body["run_id"]
                tasks = []
                for i in range(RUNS):
                    tasks.append(asyncio.create_task(one(i)))
                    await asyncio.sleep(0.04)
                await asyncio.gather(*tasks)

            async def approve() -> None:
                while len(signalled) < RUNS:
                    for run_id in list(ids.values()):
                        if run_id in signalled:
                            continue
                        status, body = await cluster.call("GET", f"/v1/runs/{run_id}")
                        if body.get("status") in TERMINAL:
                            signalled.add(run_id)
                        elif "go" in (body.get("waiting_for") or []):
                            for _ in range(2 if rng.random() < 0.2 else 1):  # some resend
                                status, answer = await cluster.call(
                                    "POST", f"/v1/runs/{run_id}/signals/go", json={},
                                    headers={"Idempotency-Key": f"go-{run_id}"})
                                assert status in (202, 409), answer
                            signalled.add(run_id)
                    await asyncio.sleep(0.2)

            async def chaos() -> None:
                nonlocal fenced_after_pause
                for round_ in range(4):
                    await asyncio.sleep(rng.uniform(2.0, 3.5))
                    victim = rng.choice(replicas)
                    cluster.down.add(victim.n)
                    if round_ == 1:  # a pause longer than the lease, then it wakes up
                        assert victim.proc is not None
                        pauses.append(victim.pid)
                        victim.proc.send_signal(signal.SIGSTOP)
                        await asyncio.sleep(LEASE * 2.5)
                        victim.proc.send_signal(signal.SIGCONT)
                        await asyncio.sleep(LEASE)
                        _, metrics = await _metrics(session, victim)
                        fenced_after_pause += metrics.get("rulebound_fenced_writes_total", 0)
                    else:
                        kills.append((time.time(), victim.pid))
                        victim.kill()
                        await asyncio.sleep(1.0)
                        await asyncio.to_thread(victim.start)
                    cluster.down.discard(victim.n)

            starting = asyncio.create_task(start_all())
            approving = asyncio.create_task(approve())
            await chaos()
            await starting
            try:
                async with asyncio.timeout(STALL):
                    await approving
                    for run_id in ids.values():
                        while True:
                            _, body = await cluster.call("GET", f"/v1/runs/{run_id}")
                            if body["status"] in TERMINAL:
                                assert body["status"] == "completed", body
                                break
                            await asyncio.sleep(0.2)
            except TimeoutError:
                raise AssertionError(await _stalled(cluster, seed, ids.values(),
                                                    postgres_url)) from None
            logs = {}
            for run_id in ids.values():
                _, events = await cluster.call("GET", f"/v1/runs/{run_id}/events")
                logs[run_id] = events
            metrics = [await _metrics(session, r) for r in replicas]
    finally:
        for replica in replicas:
            replica.stop()

    figures = _check(seed, logs, ledger, kills)
    figures.update(
        fenced_writes_after_pause=fenced_after_pause, pauses=len(pauses),
        takeovers=sum(m.get("rulebound_takeovers_total", 0) for _, m in metrics),
        client_retries=cluster.refused)
    print(f"cluster figures: {json.dumps(figures)}")


async def _stalled(cluster: Cluster, seed: int, run_ids: Any, url: str) -> str:
    """What a stall looks like: each run not ended, its last events, its parking and its
    shard's lease, and the replicas' logs."""
    import psycopg

    lines = [f"seed {seed}: runs not ended {STALL} s after the faults stopped"]
    pids = {r.n: r.pid for r in cluster.replicas}
    lines.append(f"replica pids: {pids}")
    with psycopg.connect(url) as conn:
        for run_id in run_ids:
            _, body = await cluster.call("GET", f"/v1/runs/{run_id}")
            if body.get("status") in TERMINAL:
                continue
            _, events = await cluster.call("GET", f"/v1/runs/{run_id}/events")
            tail = [{k: e.get(k) for k in ("type", "step", "attempt", "worker", "at")}
                    for e in events[-6:]]
            shard = int(run_id.replace("-", ""), 16) % 64
            parked = conn.execute("SELECT until FROM rulebound_parked WHERE run_id = %s",
                                  (run_id,)).fetchall()
            lease = conn.execute("SELECT owner, epoch, expires_at > now() FROM "
                                 "rulebound_leases WHERE shard = %s", (shard,)).fetchall()
            lines.append(f"{run_id} {body.get('status')} waiting_for={body.get('waiting_for')}"
                         f" parked={parked} shard {shard} lease={lease} "
                         f"last events: {json.dumps(tail)}")
    for replica in cluster.replicas:
        lines.append(f"--- replica {replica.n} (pid {replica.pid}) {replica.log.name}:")
        lines.append(replica.log.read_text()[-3000:])
    return "\n".join(lines)


async def _metrics(session: aiohttp.ClientSession, replica: Replica
                   ) -> tuple[int, dict[str, float]]:
    async with session.get(replica.base + "/metrics") as resp:
        text = await resp.text()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            values[name] = float(value)
    return replica.n, values


def _check(seed: int, logs: dict[str, list[dict[str, Any]]], ledger: Path,
           kills: list[tuple[float, int]]) -> dict[str, Any]:
    executions: dict[tuple[str, str, int], list[int]] = defaultdict(list)
    by_pid: dict[tuple[str, str, int], list[int]] = defaultdict(list)
    for line in ledger.read_text().splitlines():
        row = json.loads(line)
        run, step, visit = row["key"].rsplit(":", 2)
        executions[(run, step, int(visit))].append(row["attempt"])
        by_pid[(run, step, int(visit))].append(row["pid"])
    succeeded: dict[tuple[str, str, int], int] = {}
    abandoned = 0
    failovers: list[float] = []
    for run_id, events in logs.items():
        visit: dict[str, int] = {}
        ids = Counter(e.get("signal_id") for e in events
                      if e["type"] == "SignalReceived" and e.get("signal_id"))
        assert all(n == 1 for n in ids.values()), (seed, run_id, ids)
        for e in events:
            if e["type"] == "StepScheduled":
                visit[e["step"]] = e["visit"]
            elif e["type"] == "AttemptSucceeded":
                succeeded[(run_id, e["step"], visit[e["step"]])] = e["attempt"]
            elif e["type"] == "AttemptAbandoned":
                abandoned += 1
        for when, pid in kills:  # from the kill to the new owner's first event in a run the
            owner_pid = None     # dead engine was driving
            for e in events:
                at = datetime.fromisoformat(e["at"]).timestamp()
                if at >= when:
                    if owner_pid == pid:
                        failovers.append(at - when)
                    break
                if e["type"] == "AttemptStarted":
                    owner_pid = int(e["worker"].split(":")[1])
    reexecutions = sum(len(a) - 1 for a in executions.values())
    for key, attempts in executions.items():
        assert key in succeeded, (seed, key, "executed, never succeeded")
        assert max(attempts) <= succeeded[key], (seed, key, "ran again after its success")
        assert len(set(attempts)) == len(attempts), (seed, key, "an attempt ran twice")
    assert reexecutions <= abandoned, (seed, reexecutions, abandoned)
    failovers.sort()

    def pct(p: float) -> float | None:
        return round(failovers[min(len(failovers) - 1, int(p * len(failovers)))], 2) \
            if failovers else None

    return {"seed": seed, "runs": len(logs), "runs_completed": len(logs),
            "executions": sum(len(a) for a in executions.values()),
            "reexecutions": reexecutions, "abandoned": abandoned, "kills": len(kills),
            "failover_p50_s": pct(0.5), "failover_p99_s": pct(0.99),
            "failover_mean_s": round(statistics.mean(failovers), 2) if failovers else None}
