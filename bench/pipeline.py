"""Pipeline benchmark: events/s from the module topics to committed ClickHouse rows, for one worker with the full
rules, next to a raw aiokafka consume + Avro decode of the same topics in the same run; and the billing query
(cost by partner and day) over generated CDRs.

    .venv/bin/python bench/pipeline.py [--events 60000] [--billing-rows 10000000] [--skip-billing]

What runs: an embedded Tansu broker and chDB (this process serves chDB to the worker through the ClickHouse-HTTP
shim, as in `ocpi-pipeline dev`), and the worker as a child process (`ocpi-pipeline worker`). The topics are
filled first (realistic traffic: Locations, EVSE status PATCHes, Session PUT + PATCHes, CDRs, some retries and
late pushes); then the worker starts, and the clock runs from its first row in ClickHouse to the moment every
event has its raw_events row and every CDR its reconciliation row (stage 2 included). Group join and table
recovery are not counted: they happen once per worker start.

The raw baseline reads the same topics with one aiokafka consumer (no group) and decodes every record's body
with `fastavro.schemaless_reader` on the current schema, doing nothing else: the baseline the issue defines,
with nothing of ours in it, so no change of ours moves it. The same consume with our codec's `decode_event`
(the generated reader of `infra.avro_reader`, what the worker decodes with) is printed too, with the ratio
against it.

The stage-1 floor runs the worker's own stage-1 code (`pipeline.agents.fold`) over the same records in this
process, without Kafka, Faust or ClickHouse (states in dicts, rows encoded but not sent): the CPU per event of
the decode, the rules and the row encoding, which no transport or batching change can remove. Both in-process
measures run with the worker's garbage-collector settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import BytesIO
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastavro
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from infra.clickhouse.client import connect
from infra.clickhouse.migrations import migrate
from infra.codec import HEADER_SIZE, encode_event
from infra.codec import decode_event as codec_decode
from infra.gc_tuning import tune_gc
from infra.kafka.embedded import EmbeddedBroker
from infra.process import spawn
from infra.settings import Settings, load_settings
from ocpi.canonical import content_hash, to_builtins
from ocpi.decode import decode
from ocpi.model import CDR, Location, Session
from pipeline.agents import Process, fold
from pipeline.cdrs import process_cdrs
from pipeline.facts import encode_facts
from pipeline.locations import process_locations
from pipeline.records import RawMessage, decode_all
from pipeline.retention import Pseudonymizer
from pipeline.sessions import process_sessions
from pipeline.sink import encode_rows
from pipeline.stack import Stack
from pipeline.stage import StageOutput, StageRules
from pipeline.state import CdrState, Codec, LocationState, SessionState
from tests.unit.avro.convert import current_schema
from tests.unit.pipeline.builders import cdr, evse, location, session

PARTIES = (("NL", "TNM"), ("NL", "EVB"), ("BE", "BEC"))
PROFILE = bool(os.environ.get("BENCH_PROFILE"))  # run the worker under cProfile (worker.prof in the logs)


class Traffic:
    """Encoded pushes in publishing order: (topic kind, key, Avro value)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, bytes]] = []
        self.now = datetime.now(UTC)
        self.cdrs = 0

    def push(self, kind: str, cc: str, pid: str, object_id: str, level: str, operation: str, payload_type: str,
             payload: dict[str, Any], evse_uid: str | None = None) -> None:
        # Received when the CPO says it changed (its `last_updated`), as live traffic would be: the pipeline's
        # event-time rules (grace periods, settling) see the hours the stories span, not one instant.
        received_at = max(payload.get("last_updated", self.now), self.now - timedelta(days=1))
        self.records.append((kind, f"{cc}/{pid}/{object_id}".encode(), encode_event({
            "event_id": os.urandom(16).hex(), "partner_id": "bench", "module": kind.upper(), "operation": operation,
            "level": level, "country_code": cc, "party_id": pid, "object_id": object_id, "evse_uid": evse_uid,
            "connector_id": None, "received_at": received_at, "request_id": "r", "correlation_id": "c",
            "from_country_code": None, "from_party_id": None, "to_country_code": None, "to_party_id": None,
            "source": "PUSH", "content_hash": content_hash(payload), "relaxations": [],
            "payload": (payload_type, payload)})))


def build_traffic(events: int, evses: int = 4) -> Traffic:
    """About `events` pushes: per charging story an EVSE CHARGING PATCH, a Session PUT, two PATCHes (a charging
    period, then COMPLETED with cost), an EVSE AVAILABLE PATCH and a CDR; every 10th story retries its CDR and
    resends its first PUT late (stale). Locations (`evses` EVSEs each, one per 20 stories) are PUT first."""
    traffic = Traffic()
    stories = max(1, events // 6)
    locations = max(1, stories // 20)
    # After the Locations' last_updated (yesterday); the stories span a few hours up to about now.
    stamp = (datetime.now(UTC) - timedelta(hours=6)).replace(microsecond=0)
    tree = location(evses=[evse(f"E{e}") for e in range(1, evses + 1)])
    loc_payload = to_builtins(decode(_json(tree), Location).value)
    put_template = to_builtins(decode(_json(session("S", status="ACTIVE")), Session).value)
    cdr_template = to_builtins(decode(_json(cdr("C", session_id="S")), CDR).value)
    for n in range(locations):
        cc, pid = PARTIES[n % len(PARTIES)]
        payload = {**loc_payload, "country_code": cc, "party_id": pid, "id": f"LOC{n:05d}"}
        traffic.push("locations", cc, pid, f"LOC{n:05d}", "LOCATION", "PUT", "Location", payload)
    slots = locations * evses
    for i in range(stories):
        # Story i charges at EVSE slot i % slots, one hour after the previous story at that EVSE.
        slot = i % slots
        cc, pid = PARTIES[(slot // evses) % len(PARTIES)]
        lid, uid = f"LOC{slot // evses:05d}", f"E{slot % evses + 1}"
        start = stamp + timedelta(hours=i // slots, seconds=slot)
        sid, cid = f"S{i:07d}", f"C{i:07d}"
        kwh = Decimal(i % 997 + 1) / 10
        cost = (kwh * Decimal("0.35")).quantize(Decimal("0.0001"))
        traffic.push("locations", cc, pid, lid, "EVSE", "PATCH", "EVSEPatch",
                     {"status": "CHARGING", "last_updated": start}, evse_uid=uid)
        put = {**put_template, "country_code": cc, "party_id": pid, "id": sid, "location_id": lid, "evse_uid": uid,
               "start_date_time": start, "last_updated": start}
        traffic.push("sessions", cc, pid, sid, "SESSION", "PUT", "Session", put)
        period = {"start_date_time": start, "dimensions": [{"type": "ENERGY", "volume": kwh}]}
        traffic.push("sessions", cc, pid, sid, "SESSION", "PATCH", "SessionPatch",
                     {"kwh": kwh, "charging_periods": [period], "last_updated": start + timedelta(minutes=30)})
        end = start + timedelta(minutes=45)
        traffic.push("sessions", cc, pid, sid, "SESSION", "PATCH", "SessionPatch",
                     {"status": "COMPLETED", "end_date_time": end, "total_cost": {"excl_vat": cost},
                      "last_updated": end})
        traffic.push("locations", cc, pid, lid, "EVSE", "PATCH", "EVSEPatch",
                     {"status": "AVAILABLE", "last_updated": end}, evse_uid=uid)
        charge = {**cdr_template, "country_code": cc, "party_id": pid, "id": cid, "session_id": sid, "cdr_location": {
                      **cdr_template["cdr_location"], "id": lid, "evse_uid": uid},
                  "start_date_time": start, "end_date_time": end, "total_energy": kwh,
                  "total_cost": {"excl_vat": cost}, "last_updated": end}
        traffic.push("cdrs", cc, pid, cid, "CDR", "POST", "CDR", charge)
        traffic.cdrs += 1
        if i % 10 == 0:
            traffic.push("cdrs", cc, pid, cid, "CDR", "POST", "CDR", charge)
            traffic.push("sessions", cc, pid, sid, "SESSION", "PUT", "Session", put)
    return traffic


def _json(body: dict[str, Any]) -> bytes:
    import msgspec

    return msgspec.json.Encoder(decimal_format="number").encode(body)


async def publish(bootstrap: str, topics: dict[str, str], records: list[tuple[str, bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    try:
        futures = [await producer.send(topics[kind], value=value, key=key) for kind, key, value in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


@contextlib.contextmanager
def worker_gc() -> Iterator[None]:
    """The worker's garbage-collector settings (`infra.gc_tuning.tune_gc`) in this process for a while, so the
    in-process measures compare like with like (and this process's chDB objects are not walked per batch)."""
    threshold = gc.get_threshold()
    tune_gc()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


Decoder = Callable[[bytes], Any]
# Parsed by fastavro from the newest .avsc file, not taken from our codec.
_EVENT_SCHEMA = fastavro.parse_schema(current_schema())


def fastavro_decode(value: bytes) -> Any:
    """fastavro's reader on the body of a single-object record (the header skipped), with the codec's options."""
    body = BytesIO(value)
    body.seek(HEADER_SIZE)
    return fastavro.schemaless_reader(body, _EVENT_SCHEMA, None, return_record_name=True,
                                      return_record_name_override=True)


async def raw_consume(bootstrap: str, topics: list[str], total: int, decode: Decoder = fastavro_decode) -> float:
    """aiokafka consume + decode of every record: records/s."""
    with worker_gc():
        return await _consume_and_decode(bootstrap, topics, total, decode)


async def _consume_and_decode(bootstrap: str, topics: list[str], total: int, decode: Decoder) -> float:
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                fetch_max_bytes=32 * 1024 * 1024, max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    try:
        done = 0
        started = time.perf_counter()
        while done < total:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for messages in batch.values():
                for message in messages:
                    decode(message.value)
                done += len(messages)
        return done / (time.perf_counter() - started)
    finally:
        await consumer.stop()


Stage = tuple[Process, Codec[Any]]


def stage1_floor(traffic: Traffic, batch: int, rules: StageRules, rounds: int = 3) -> dict[str, float]:
    """µs per event of stage 1 in this process, best of `rounds`: Avro decode, rules (state read and written as
    bytes, facts encoded), ClickHouse row encoding."""
    stages: dict[str, Stage] = {"locations": (process_locations, Codec(LocationState)),
                                "sessions": (process_sessions, Codec(SessionState)),
                                "cdrs": (process_cdrs, Codec(CdrState))}
    topics: dict[str, list[RawMessage]] = {kind: [] for kind in stages}
    for kind, key, value in traffic.records:
        topics[kind].append(RawMessage(kind, 0, len(topics[kind]), key, value))
    pseudonym = Pseudonymizer(b"b" * 32)
    best: dict[str, float] = {}
    with worker_gc():
        for _ in range(rounds):
            spent = _stage1_round(stages, topics, batch, rules, pseudonym)
            if not best or sum(spent.values()) < sum(best.values()):
                best = spent
    return {name: seconds / len(traffic.records) * 1e6 for name, seconds in best.items()}


def _stage1_round(stages: dict[str, Stage], topics: dict[str, list[RawMessage]], batch: int, rules: StageRules,
                  pseudonym: Pseudonymizer) -> dict[str, float]:
    spent = {"decode": 0.0, "rules": 0.0, "rows": 0.0}
    for kind, (process, codec) in stages.items():
        table: dict[str, bytes | None] = {}
        messages = topics[kind]
        for start in range(0, len(messages), batch):
            t0 = time.perf_counter()
            records, _dead = decode_all(messages[start:start + batch])
            t1 = time.perf_counter()
            out = StageOutput(pseudonym)
            overlays = fold(records, lambda _anchor, table=table: table.get, codec, process, rules, out)  # type: ignore[misc]
            for facts in out.facts.values():
                encode_facts(facts)
            for _anchor, overlay in overlays:
                table.update(overlay.changes)
            t2 = time.perf_counter()
            for rows in out.batch.tables().values():
                encode_rows(rows)
            spent["decode"] += t1 - t0
            spent["rules"] += t2 - t1
            spent["rows"] += time.perf_counter() - t2
    return spent


def scalar(client: Any, sql: str) -> int:
    return int(client.query(sql).result_rows[0][0])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_wait_seconds(pid: int) -> float:
    """How long the process's threads have been runnable but waiting for a CPU (Linux schedstat; live threads)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


@dataclass
class Machine:
    """CPU seconds over the measured run: the worker's (and its wait for a CPU), this process's (chDB, serving
    the worker's inserts, and the bench's polls), the broker's."""

    worker: float = 0.0
    worker_wait: float = 0.0
    clickhouse: float = 0.0
    broker: float = 0.0

    @classmethod
    def now(cls, worker: int, broker: int | None) -> Machine:
        return cls(cpu_seconds(worker), cpu_wait_seconds(worker), cpu_seconds(os.getpid()),
                   cpu_seconds(broker) if broker else 0.0)

    def __sub__(self, other: Machine) -> Machine:
        return Machine(self.worker - other.worker, self.worker_wait - other.worker_wait,
                       self.clickhouse - other.clickhouse, self.broker - other.broker)


async def pipeline_rate(stack: Stack, total: int, cdrs: int, timeout: float, broker: int | None,
                        ) -> tuple[float, float, float, Machine]:
    """Start the worker; (events/s to stage-1 rows, events/s incl. reconciliation, seconds of the full run, the
    CPU the machine spent over that run)."""
    client = stack.clickhouse
    assert client is not None
    profile = ["-m", "cProfile", "-o", str(stack.log_dir / "worker.prof")] if PROFILE else []
    stack.children["worker"] = spawn([sys.executable, *profile, "-m", "pipeline", "--log-level", "info", "worker"],
                                     env=stack.child_environment(), log_path=stack.log_dir / "worker.log")
    worker = stack.children["worker"].pid
    deadline = time.monotonic() + timeout
    first = None
    stage1 = None
    while time.monotonic() < deadline:
        stack.check_children()
        raw = await asyncio.to_thread(scalar, client, "SELECT count() FROM raw_events")
        if raw and first is None:
            first = time.perf_counter()
            at_first = Machine.now(worker, broker)
        if first is not None and stage1 is None and raw >= total and await asyncio.to_thread(
                scalar, client, "SELECT count() FROM raw_events FINAL") >= total:
            stage1 = time.perf_counter()
        if first is not None and stage1 is not None and await asyncio.to_thread(
                scalar, client, "SELECT count() FROM reconciliation FINAL WHERE subject = 'CDR' "
                                "AND outcome != 'AWAITING_SESSION'") >= cdrs:  # matched, not merely seen
            end = time.perf_counter()
            return total / (stage1 - first), total / (end - first), end - first, Machine.now(worker, broker) - at_first
        await asyncio.sleep(0.1)
    raise TimeoutError("the worker did not finish in time; see " + str(stack.log_dir / "worker.log"))


def billing(client: Any, database: str, rows: int) -> dict[str, float]:
    """Generate `rows` CDRs server-side (the materialized view fills billing_lines) and their credit links, and time
    the billing query on what billing reads (`billable_lines`: duplicate credits left out)."""
    migrate(client, database)
    client.database = database
    started = time.perf_counter()
    chunk = 2_000_000
    for offset in range(0, rows, chunk):
        n = min(chunk, rows - offset)
        client.command(f"""
            INSERT INTO cdrs (country_code, party_id, cdr_id, partner_id, start_date_time, end_date_time, session_id,
                auth_method, authorization_reference, token_uid, token_type, contract_id, location_id, evse_uid,
                connector_id, currency, total_energy, total_time, total_parking_time, total_cost_excl_vat,
                total_cost_incl_vat, credit, credit_reference_id, last_updated, payload_json, event_id, version,
                received_at, home_charging_compensation)
            SELECT 'NL', concat('P', toString(number % 7)), concat('C', toString(number)),
                concat('partner-', toString(number % 20)),
                toDateTime64('2026-01-01 00:00:00', 6, 'UTC') + toIntervalSecond(number * 3),
                toDateTime64('2026-01-01 01:00:00', 6, 'UTC') + toIntervalSecond(number * 3),
                concat('S', toString(number)), 'WHITELIST', NULL, 'TOK', 'RFID', 'C',
                concat('LOC', toString(number % 500)),
                'E1', '1', 'EUR', toDecimal64((number % 1000) / 10, 4), toDecimal64(1, 4), NULL,
                toDecimal64((number % 777) / 7, 4), NULL, number % 50 = 0, NULL,
                toDateTime64('2026-01-01 01:00:00', 6, 'UTC') + toIntervalSecond(number * 3), '{{}}', '', 1,
                now64(6), number % 100 = 7
            FROM numbers({offset}, {n})""")
    # Every credit (1 CDR in 50) is linked, and 1 % of those are second credits, which billing leaves out.
    client.command("""
        INSERT INTO credit_links (country_code, party_id, credit_cdr_id, credited_cdr_id, partner_id, status,
            credit_cost_excl_vat, credited_cost_excl_vat, amount_matches, received_at, due_at, version)
        SELECT country_code, party_id, cdr_id, concat(cdr_id, '-original'), partner_id,
            if(cityHash64(cdr_id) % 100 = 0, 'DUPLICATE_CREDIT', 'LINKED'), total_cost_excl_vat, NULL, NULL,
            received_at, received_at, 1
        FROM cdrs WHERE credit""")
    generated = time.perf_counter() - started
    # Charging and home charging compensation (1 CDR in 100 here) apart, as the revenue report gives them.
    query = ("SELECT partner_id, day, home_charging_compensation, sum(cost_excl_vat) AS cost, sum(energy_kwh) AS kwh, "
             "count() AS cdrs FROM billable_lines GROUP BY partner_id, day, home_charging_compensation")
    timings = []
    groups = 0
    for _ in range(5):
        t = time.perf_counter()
        groups = len(client.query(query).result_rows)
        timings.append(time.perf_counter() - t)
    view = []
    for _ in range(3):
        t = time.perf_counter()
        client.query("SELECT partner_id, day, home_charging_compensation, sum(cost_excl_vat) FROM billing_daily "
                     "GROUP BY partner_id, day, home_charging_compensation")
        view.append(time.perf_counter() - t)
    return {"rows": rows, "generate_s": generated, "query_median_s": statistics.median(timings),
            "query_best_s": min(timings), "groups": groups, "view_median_s": statistics.median(view)}


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="ocpi-bench-"))
    try:
        await measure(root, args)
    finally:
        if args.keep or PROFILE:
            print(f"data and logs kept in {root}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)


async def measure(root: Path, args: argparse.Namespace) -> None:
    with EmbeddedBroker(log_path=root / "tansu.log") as broker:
        settings = load_settings({
            "OCPI_DATA_DIR": str(root), "OCPI_KAFKA_BOOTSTRAP": broker.bootstrap, "OCPI_KAFKA_FLAVOR": "tansu",
            "OCPI_TOPIC_PARTITIONS": str(args.partitions), "OCPI_PIPELINE_BATCH": str(args.batch),
            "OCPI_ADMIN_TOKEN": "bench-admin-token", "PATH": os.environ.get("PATH", "")})
        if not args.skip_pipeline:
            await run_pipeline(settings, args, broker.pid)
    if not args.skip_billing:
        client = connect(settings.clickhouse_dsn)  # one chDB path per process: the same one, another database
        result = billing(client, "bench_billing", args.billing_rows)
        print(f"billing: {result['rows']:,} CDRs generated in {result['generate_s']:.1f}s; cost by partner and day "
              f"({result['groups']} groups): median {result['query_median_s'] * 1000:.0f} ms, best "
              f"{result['query_best_s'] * 1000:.0f} ms; billing_daily view: median "
              f"{result['view_median_s'] * 1000:.0f} ms", flush=True)


async def run_pipeline(settings: Settings, args: argparse.Namespace, broker: int | None) -> None:
    stack = await Stack(settings.with_overrides(http={"port": 0}), run_worker=False, run_receivers=False).start()
    try:
        t = time.perf_counter()
        traffic = build_traffic(args.events, args.evses)
        total = len(traffic.records)
        print(f"generated {total} events ({traffic.cdrs} CDRs) in {time.perf_counter() - t:.1f}s", flush=True)
        kafka = settings.kafka
        topics = {"locations": kafka.topic_locations, "sessions": kafka.topic_sessions, "cdrs": kafka.topic_cdrs}
        t = time.perf_counter()
        await publish(stack.bootstrap, topics, traffic.records)
        print(f"published in {time.perf_counter() - t:.1f}s", flush=True)
        raw = await raw_consume(stack.bootstrap, list(topics.values()), total)
        print(f"raw aiokafka consume + fastavro decode: {raw:,.0f} events/s", flush=True)
        stage1, full, seconds, spent = await pipeline_rate(stack, total, traffic.cdrs, args.timeout, broker)
        cpu = spent.worker
        print(f"pipeline, one worker, full rules: {stage1:,.0f} events/s to stage-1 rows, "
              f"{full:,.0f} events/s including reconciliation ({seconds:.1f}s; worker CPU {cpu:.1f}s = "
              f"{cpu / seconds:.0%} of one core, {cpu / total * 1e6:.0f} µs per event)", flush=True)
        print(f"the machine over that run ({os.cpu_count()} cores): the worker waited {spent.worker_wait:.1f}s for a "
              f"CPU; ClickHouse (chDB in this process, with the bench's polls) used {spent.clickhouse:.1f}s "
              f"({spent.clickhouse / total * 1e6:.0f} µs per event), the broker {spent.broker:.1f}s; all together "
              f"{(cpu + spent.clickhouse + spent.broker) / seconds:.1f} cores", flush=True)
        raw_after = await raw_consume(stack.bootstrap, list(topics.values()), total)
        raw_mean = (raw + raw_after) / 2
        print(f"raw again: {raw_after:,.0f} events/s; ratio pipeline/raw: {stage1 / raw_mean:.0%} (stage 1), "
              f"{full / raw_mean:.0%} (with reconciliation)", flush=True)
        raw_generated = await raw_consume(stack.bootstrap, list(topics.values()), total, codec_decode)
        print(f"raw aiokafka consume + our codec's decode: {raw_generated:,.0f} events/s; ratio pipeline/that: "
              f"{stage1 / raw_generated:.0%} (stage 1), {full / raw_generated:.0%} (with reconciliation)", flush=True)
        floor = stage1_floor(traffic, args.batch, StageRules.from_settings(
            settings.pipeline, send_timeout_s=settings.kafka.send_timeout_s))
        budget = 1e6 / (raw_mean / 2)  # µs per event at 50 % of the raw rate
        print(f"stage-1 floor in this process (no Kafka, Faust or ClickHouse): decode {floor['decode']:.0f} + rules "
              f"{floor['rules']:.0f} + rows {floor['rows']:.0f} = {sum(floor.values()):.0f} µs per event; 50 % of "
              f"raw leaves {budget:.0f} µs per event for everything", flush=True)
    finally:
        await stack.stop()
        if PROFILE:
            print(f"profile: {stack.log_dir / 'worker.prof'}")


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=60_000, help="pushes in the topics (about)")
    parser.add_argument("--evses", type=int, default=4, help="EVSEs per Location (a charging hub has dozens)")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--batch", type=int, default=load_settings({}).pipeline.batch_max,
                        help="OCPI_PIPELINE_BATCH of the worker (default: the product's)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--billing-rows", type=int, default=10_000_000)
    parser.add_argument("--skip-billing", action="store_true")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the data and logs (a temporary directory)")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(_args()))
