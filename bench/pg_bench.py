"""
`bench/run.py --store postgresql`: the cloud's ingest into PostgreSQL,
against the raw ceiling on the same server in the same run.

A throwaway server of Debian's binaries (meter/tools/pgcluster.py), with
fsync on (an acknowledgement means a durable COMMIT, as in production),
started here and always torn down.  In turns, each run in a fresh database
of that server:

- the real meter-cloud plugin, its [cloud] db the database's URI, loaded
  by a TLS client sending BATCH lines as the gateway sends them (its batch
  size and batches in flight), as the SQLite `cloud` scenario does;
- the raw ceiling (bench/pg_ceiling.py): one connection COPYing the same
  rows into a staging table and moving them with INSERT … SELECT … ON
  CONFLICT DO NOTHING RETURNING, in the same batch size.

Then two cloud nodes in front of one database, each sent half of the
batches at once, against one node: on a 2-core machine the server, the
nodes and the clients share the cores, so this shows what a second node
costs or brings here, not on separate hosts.
"""

from __future__ import annotations

import datetime
import statistics
import threading
import time
from pathlib import Path

import ceilings
import pg_ceiling
from meter import config, wire
from meter.tools import pgcluster

#: The target of issue 19: the cloud's ingest over the raw ceiling.
TARGET_RATIO = 0.6


def _wait_connected(uri: str, cloud, timeout: float = 60.0) -> None:
    """
    Wait until the cloud at C{cloud} has connected to its database and made
    its schema (its first connection does), so the first batch is not
    refused: checked in the database itself, a bounded number of times.
    """
    import psycopg

    deadline = time.monotonic() + timeout
    with psycopg.connect(uri, autocommit=True) as connection:
        while time.monotonic() < deadline:
            (ready,) = connection.execute(
                "SELECT to_regclass('meter_schema') IS NOT NULL AND EXISTS (SELECT 1 FROM pg_inherits"
                " WHERE inhparent = to_regclass('readings'))"
            ).fetchone()
            if ready:
                return
            time.sleep(0.05)
    raise RuntimeError(f"the cloud did not make its schema in {uri} within {timeout:g} s{cloud.tail()}")


def _stored(uri: str) -> dict:
    """
    How many readings the database holds, and what they take on disk (the
    partitions' tables and indexes, TOAST included).
    """
    import psycopg

    with psycopg.connect(uri, autocommit=True) as connection:
        (count,) = connection.execute("SELECT count(*) FROM readings").fetchone()
        (distinct,) = connection.execute("SELECT count(*) FROM (SELECT DISTINCT device_id, taken_at FROM readings) k").fetchone()
        (size,) = connection.execute(
            "SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('readings')"
        ).fetchone()
    size = int(size or 0)  # a numeric sum: a Decimal
    return {"stored": count, "doubled_rows": count - distinct, "bytes": size,
            "bytes_per_reading": round(size / count, 1) if count else None}


def _ceiling_database(cluster: pgcluster.Cluster, name: str, rows: list[tuple]) -> str:
    """
    A fresh database with the cloud's schema and the partitions of the
    rows' months, made by the cloud's own code.
    """
    import psycopg

    from meter.cloud import postgres

    uri = cluster.create_database(name)
    months = {datetime.date(row[2].year, row[2].month, 1) for row in rows}
    with psycopg.connect(uri, autocommit=True) as connection:
        postgres.upgrade(connection)
        postgres.ensure_partitions(connection, sorted(months), set())
    return uri


def _cloud_run(workspace_of, scratch: Path, name: str, uri: str, lines: list[bytes], in_flight: int,
               readings: int, nodes: int = 1) -> dict:
    """
    C{nodes} clouds on C{uri}, the batches dealt out among them in turn,
    each node's share sent at once by a client of its own; readings
    committed a second from the first send to the last acknowledgement.
    """
    workspaces = [workspace_of(scratch / f"{name}-node{n + 1}", 1, cloud={"db": uri}) for n in range(nodes)]
    try:
        clouds = [w.start_cloud() for w in workspaces]
        for cloud in clouds:
            _wait_connected(uri, cloud)
        connections = [ceilings.tls_client(w.secrets, w.cloud_port) for w in workspaces]
        shares = [lines[n::nodes] for n in range(nodes)]
        outcomes: list = [None] * nodes
        before = [c.stats() for c in clouds]

        def send(n: int) -> None:
            outcomes[n] = ceilings.send_batches(connections[n], shares[n], in_flight, time_limit=300)

        threads = [threading.Thread(target=send, args=(n,)) for n in range(nodes)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(330)
        elapsed = time.perf_counter() - started
        after = [c.stats() for c in clouds]
        for connection in connections:
            connection.close()
    finally:
        for workspace in workspaces:
            workspace.stop()
    if None in outcomes:
        raise RuntimeError(f"{name}: a client did not finish")
    new = sum(o["new"] for o in outcomes)
    cpu = sum(a["cpu_s"] - b["cpu_s"] for a, b in zip(after, before))
    check = _stored(uri)
    return {
        "nodes": nodes,
        "readings": readings,
        "batch": len(lines) and readings // len(lines),
        "in_flight_per_node": in_flight,
        "batches": sum(o["batches"] for o in outcomes),
        "acked": sum(o["acked"] for o in outcomes),
        "refused": sum(o["refused"] for o in outcomes),
        "new": new,
        "dup": sum(o["dup"] for o in outcomes),
        "seconds": round(elapsed, 4),
        "readings_per_s": round(new / elapsed, 1) if elapsed > 0 else None,
        "cloud_cpu_s": round(cpu, 2),
        "cloud_capacity_per_s": round(new / cpu, 1) if cpu > 0 else None,
        "db": check,
        "exact": check["stored"] == readings and check["doubled_rows"] == 0 and new == readings,
    }


def scenario(args, scratch: Path, readings: list, workspace_of, say) -> dict:
    """
    The cloud on PostgreSQL against the raw ceiling, in turns
    (C{args.cloud_runs} of each, medians compared), then two nodes
    against one.
    """
    batch = config.SCHEMA["gateway"]["batch_readings"][1]
    window = config.SCHEMA["gateway"]["batches_in_flight"][1]
    stored_at = time.time()
    rows = [(r.device_id, r.device_ip, r.taken_at, r.temperature_c, r.humidity_pct, stored_at) for r in readings]
    lines = [wire.encode(wire.Batch(f"{index + 1:016x}", tuple(readings[start:start + batch]))) + b"\n"
             for index, start in enumerate(range(0, len(readings), batch))]
    cluster = pgcluster.Cluster.create(durable=True, prefix="meter-bench-pg-")
    try:
        cluster.start()
        version = cluster_version(cluster)
        say(f"cloud on PostgreSQL {version} (a throwaway server, fsync on, synchronous_commit on): "
            f"{len(readings):,} readings, batches of {batch}, {window} in flight, {args.cloud_runs} runs, "
            f"each beside a run of the raw ceiling (COPY + INSERT … ON CONFLICT RETURNING, batches of {batch})")
        clouds, raws = [], []
        for number in range(args.cloud_runs):
            run = _cloud_run(workspace_of, scratch, f"pg-cloud-{number}", cluster.create_database(f"cloud_{number}"),
                             lines, window, len(readings))
            clouds.append(run)
            raw = pg_ceiling.copy_insert_ceiling(_ceiling_database(cluster, f"ceiling_{number}", rows), rows, batch)
            raws.append(raw)
            say(f"  run {number + 1}: cloud {run['readings_per_s'] or 0:,.0f} readings/s ({run['new']:,} new, "
                f"{run['refused']} refused, exact: {run['exact']}; cloud CPU {run['cloud_cpu_s']} s = "
                f"{run['cloud_capacity_per_s'] or 0:,.0f} per CPU second); raw ceiling {raw['rows_per_s']:,.0f} rows/s")
        one = _median(clouds)
        ceiling = {"batch": batch, "runs_rows_per_s": [r["rows_per_s"] for r in raws],
                   "rows_per_s": round(statistics.median(r["rows_per_s"] for r in raws), 1)}
        ratio = one["readings_per_s"] / ceiling["rows_per_s"] if one["readings_per_s"] else None
        say(f"  median: cloud {one['readings_per_s']:,.0f} readings/s, raw ceiling {ceiling['rows_per_s']:,.0f} rows/s: "
            f"{ratio:.3f}x (target >= {TARGET_RATIO}); {one['db']['bytes_per_reading']} bytes a reading on disk")

        # One node and two, in turns, on the same server.
        pairs = []
        for number in range(args.cloud_runs):
            single = _cloud_run(workspace_of, scratch, f"pg-one-{number}", cluster.create_database(f"one_{number}"),
                                lines, window, len(readings))
            double = _cloud_run(workspace_of, scratch, f"pg-two-{number}", cluster.create_database(f"two_{number}"),
                                lines, window, len(readings), nodes=2)
            pairs.append((single, double))
            say(f"  one node {single['readings_per_s'] or 0:,.0f} readings/s; two nodes, half the batches each, "
                f"{double['readings_per_s'] or 0:,.0f} readings/s (exact: {double['exact']}, "
                f"{double['refused']} refused)")
        one_node = _median([p[0] for p in pairs])
        two_nodes = _median([p[1] for p in pairs])
    finally:
        cluster.destroy()
    return {
        "server": version,
        "as_gateway_sends": one,
        "ceiling": ceiling,
        "ratio_to_raw": round(ratio, 4) if ratio else None,
        "one_node": one_node,
        "two_nodes": two_nodes,
        "two_over_one": round(two_nodes["readings_per_s"] / one_node["readings_per_s"], 3)
        if one_node["readings_per_s"] and two_nodes["readings_per_s"] else None,
        "exact": all(r["exact"] for r in clouds) and all(p[0]["exact"] and p[1]["exact"] for p in pairs),
    }


def cluster_version(cluster: pgcluster.Cluster) -> str:
    import psycopg

    with psycopg.connect(cluster.uri(), autocommit=True) as connection:
        return connection.execute("SHOW server_version").fetchone()[0]


def _median(runs: list[dict]) -> dict:
    """
    One figure for several runs: the last run's counts, the medians of the
    rates, and each run's rates.
    """
    summary = dict(runs[-1])
    for rate in ("readings_per_s", "cloud_capacity_per_s"):
        values = [run[rate] for run in runs]
        summary[rate] = round(statistics.median(values), 1) if None not in values else None
        summary[f"runs_{rate}"] = values
    summary["runs"] = len(runs)
    return summary
