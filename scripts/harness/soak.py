"""One chaos soak: start the stack, run load and chaos, drain, audit; and clean up after it."""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from messages.errors import ConfigurationError
from messages.plumbing.management import ManagementApi
from messages.plumbing.settings import redact
from scripts.harness.audit import audit, check_queues, read_snapshot
from scripts.harness.chaos_options import ChaosError, Options, make_order, say
from scripts.harness.chaos_plan import BrokerRestart, Chaos, Progress, plan_chaos
from scripts.harness.chaos_report import build_report
from scripts.harness.drain import drain
from scripts.harness.load import Load
from scripts.harness.observe import Orchestrator, Probe
from scripts.harness.scale import Infrastructure, NodeOutages
from scripts.harness.supervisor import Supervisor, build_services, soak_stack
from scripts.harness.vhost import vhost_url


def soak(opts: Options, infra: Infrastructure, vhost: str, data_dir: Path) -> dict[str, Any]:
    """Start the stack, run load and chaos, drain, audit; return the report."""
    url, mgmt = vhost_url(infra.amqp_url, vhost), infra.management
    rng = random.Random(opts.seed)
    orders = [make_order(rng) for _ in range(opts.sagas)]
    started = time.monotonic()
    stack = soak_stack(url, data_dir, infra.service_env)
    supervisor = Supervisor(build_services(opts, stack), started)
    orchestrator = Orchestrator(stack)
    probe = Probe(url)
    progress = Progress()
    chaos = Chaos(
        plan_chaos(opts, rng),
        supervisor,
        progress,
        BrokerRestart(opts.broker_restart_cmd, vhost),
        mgmt,
        rng,
        NodeOutages(infra.cluster, opts.scale.node_down_s, rng) if infra.cluster else None,
    )
    try:
        if probe.depths([]) is None:
            raise ChaosError(f"cannot reach RabbitMQ at {redact(url)} over AMQP")
        say(f"starting {', '.join(supervisor.services)} ...")
        supervisor.start()
        say(f"[{time.monotonic() - started:7.1f}s] stack ready; placing {opts.sagas} orders")
        chaos.start()
        load = Load(opts, url, orchestrator, orders, progress, started).run()
        placed = {str(o.request.saga_id): o.request for o in orders[: load.placed]}
        say(f"[{time.monotonic() - started:7.1f}s] load done; waiting for the stack to drain")
        end_by = time.monotonic() if load.stalled else load.last_placed + opts.drain_timeout
        drained = drain(
            orchestrator, set(placed), supervisor, probe, end_by, opts.settle_s, progress
        )
        chaos.stop()
        snap = read_snapshot(stack, orchestrator, placed)
        quiet_since = drained.quiet_since or time.monotonic()
        queues = check_queues(mgmt, vhost, probe, quiet_since, snap.outbox)
        checks = [*audit(opts, snap, set(placed)), queues]
        return build_report(
            opts, infra, vhost, data_dir, orders, snap, load, drained, chaos, supervisor, checks
        )
    finally:
        chaos.stop()
        supervisor.stop()
        probe.close()


def prepare_data_dir(opts: Options) -> Path:
    """--data-dir, new or empty; else a temporary directory."""
    if opts.data_dir is None:
        return Path(tempfile.mkdtemp(prefix="saga-chaos-"))
    if opts.data_dir.exists() and any(opts.data_dir.glob("*.db")):
        raise ChaosError(f"{opts.data_dir} holds databases already; give a new or empty directory")
    opts.data_dir.mkdir(parents=True, exist_ok=True)
    return opts.data_dir


def cleanup(
    opts: Options, mgmt: ManagementApi, vhost: str | None, data_dir: Path | None, clean: bool
) -> None:
    """Delete the vhost, and a temporary data directory unless there is something to see."""
    if opts.keep:
        say(f"kept: vhost {vhost}, data {data_dir}")
        return
    if vhost is not None:
        try:
            mgmt.delete_vhost(vhost)
        except ConfigurationError as exc:
            print(f"warning: could not delete vhost {vhost}: {exc}", file=sys.stderr)
    if data_dir is not None and opts.data_dir is None:
        if clean or not any(data_dir.iterdir()):
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            say(f"logs and databases kept in {data_dir}")
