"""Receiver throughput: pushes/s and latency of session PUT, session PATCH and CDR POST, acknowledged only after
the embedded Kafka (Tansu) acknowledged them with acks=all, on ONE receiver process served by granian.

In the same run, for scale:
  (a) a bare Litestar endpoint under granian that only parses the same bodies (msgspec), no rules, no Kafka,
      and (a+kafka) the same endpoint that also sends the body to Kafka (acks=all) and awaits the ack: the
      ceiling of answering after the broker's ack, before any OCPI work;
  (b) the PyPI package `extrawest-ocpi` (py_ocpi: FastAPI, pydantic 1) on an in-memory store, under granian,
      from a virtualenv of its own (bench/.venvs/extrawest, created on the first run).
Load: wrk (one thread, fixed connections), cycling through pre-built requests with distinct ids; a warm-up
run is discarded. Everything shares the machine's cores (load generator, server, broker).

    .venv/bin/python bench/receivers.py [--duration 10] [--connections 64] [--skip-extrawest]

A benchmark, not a test: it prints the figures, the ratios and the targets, and writes them as JSON under
bench/results/ (gitignored). See bench/README.md for the figures measured here and what bounds them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from infra.kafka.admin import ensure_topics  # noqa: E402
from infra.kafka.embedded import EmbeddedBroker, free_port  # noqa: E402
from infra.process import spawn, terminate  # noqa: E402
from infra.settings import load_settings  # noqa: E402
from pipeline.stack import Stack  # noqa: E402
from receivers.registry import PartnerRegistry, PartyRole  # noqa: E402

BENCH = REPO / "bench"
EXAMPLES = REPO.parent / "shared" / "ocpi" / "examples"
VENV = BENCH / ".venvs" / "extrawest"
RESULTS = BENCH / "results"
GRANIAN = "2.8.7"  # the project's pin, for (b) too
IDS = 2000  # distinct objects per scenario (a CPO pushes many objects, each under its own Kafka key)
TARGET_RATE, TARGET_P99_MS, TARGET_VS_B, TARGET_VS_A = 2500.0, 50.0, 2.0, 0.40

LUA = r"""
-- Requests are pre-built from a file (method, path, body per line), then cycled: no per-request Lua work.
local requests = {}
local i = 0
local errors = 0
init = function(args)
  local headers = {["Authorization"] = args[2], ["Content-Type"] = "application/json"}
  for line in io.lines(args[1]) do
    local method, path, body = line:match("^(%u+)\t([^\t]+)\t(.*)$")
    requests[#requests + 1] = wrk.format(method, path, headers, body)
  end
end
request = function()
  i = i % #requests + 1
  return requests[i]
end
"""


@dataclass
class Result:
    name: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: str
    load_before: float  # 1-minute load average when the run started: other work on the box lowers the figures


# --- payloads ---------------------------------------------------------------------------------------------

def session(i: int) -> dict[str, Any]:
    body = json.loads((EXAMPLES / "session_example_2_short_finished.json").read_text())
    body["id"] = f"S{i:06d}"
    return body


def session_patch(i: int) -> dict[str, Any]:
    return {"kwh": 12.5, "status": "ACTIVE",
            "charging_periods": [{"start_date_time": "2015-06-29T23:09:10Z",
                                  "dimensions": [{"type": "ENERGY", "volume": 4.2}, {"type": "TIME", "volume": 0.5}]}],
            "last_updated": "2015-06-29T23:39:09Z"}


CDR_TEMPLATE = {
    "country_code": "BE", "party_id": "BEC", "id": "12345",
    "start_date_time": "2015-06-29T21:39:09Z", "end_date_time": "2015-06-29T23:37:32Z", "session_id": "101",
    "cdr_token": {"country_code": "DE", "party_id": "TNM", "uid": "012345678", "type": "RFID",
                  "contract_id": "DE8ACC12E46L89"},
    "auth_method": "WHITELIST",
    "cdr_location": {"id": "LOC1", "name": "Gent Zuid", "address": "F.Rooseveltlaan 3A", "city": "Gent",
                     "postal_code": "9000", "country": "BEL",
                     "coordinates": {"latitude": "3.729944", "longitude": "51.047599"}, "evse_uid": "3256",
                     "evse_id": "BE*BEC*E041503003", "connector_id": "1", "connector_standard": "IEC_62196_T2",
                     "connector_format": "SOCKET", "connector_power_type": "AC_1_PHASE"},
    "currency": "EUR",
    "charging_periods": [{"start_date_time": "2015-06-29T21:39:09Z", "dimensions": [{"type": "TIME", "volume": 1.973}],
                          "tariff_id": "12"}],
    "total_cost": {"excl_vat": 4.00, "incl_vat": 4.40}, "total_energy": 15.342, "total_time": 1.973,
    "total_time_cost": {"excl_vat": 4.00, "incl_vat": 4.40}, "last_updated": "2015-06-29T23:37:32Z",
}


def cdr(i: int) -> dict[str, Any]:
    body = copy.deepcopy(CDR_TEMPLATE)
    body["id"] = f"C{i:06d}"
    return body


SESSIONS = "/ocpi/emsp/2.2.1/sessions/BE/BEC"
SCENARIOS: dict[str, tuple[str, Any]] = {  # name -> (method, request builder (i) -> (path, body))
    "session PUT": ("PUT", lambda i: (f"{SESSIONS}/S{i:06d}", session(i))),
    "session PATCH": ("PATCH", lambda i: (f"{SESSIONS}/S{i:06d}", session_patch(i))),
    "CDR POST": ("POST", lambda i: ("/ocpi/emsp/2.2.1/cdrs", cdr(i))),
}


def requests_file(workdir: Path, scenario: str, *, cdr_path: str = "/ocpi/emsp/2.2.1/cdrs") -> Path:
    method, build = SCENARIOS[scenario]
    path = workdir / f"{scenario.replace(' ', '_')}.tsv"
    with path.open("w") as out:
        for i in range(1, IDS + 1):
            url, body = build(i)
            if method == "POST":
                url = cdr_path
            out.write(f"{method}\t{url}\t{json.dumps(body, separators=(',', ':'))}\n")
    return path


# --- load -------------------------------------------------------------------------------------------------

_DURATION = re.compile(r"([\d.]+)(us|ms|s|m)\b")


def _ms(text: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"unexpected wrk duration {text!r}")
    value, unit = float(match[1]), match[2]
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


async def _run(command: list[str]) -> str:
    """A subprocess without blocking the loop: this process serves the embedded ClickHouse to the receivers."""
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"{command[0]} failed: {err.decode()[-500:]}")
    return out.decode()


async def wrk(name: str, base_url: str, requests: Path, token: str, *, duration: int, connections: int,
              script: Path) -> Result:
    load = os.getloadavg()[0]
    header = "Token " + base64.b64encode(token.encode()).decode()
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "--latency", "-s",
               str(script), base_url, "--", str(requests), header]
    warmup = [*command[:3], "-d3s", *command[4:]]
    await _run(warmup)
    out = await _run(command)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE)[1])  # type: ignore[index]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE)[1])  # type: ignore[index]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sockets = re.search(r"Socket errors:(.*)", out)
    return Result(name, rate, p50, p99, int(bad[1]) if bad else 0, sockets[1].strip() if sockets else "", load)


async def check_once(base_url: str, token: str, scenario: str, *, cdr_path: str = "/ocpi/emsp/2.2.1/cdrs") -> None:
    """One request of the scenario must be accepted, so the load measures success, not refusals."""
    method, build = SCENARIOS[scenario]
    url, body = build(IDS + 1)
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.request(
            method, base_url + (cdr_path if method == "POST" else url), json=body,
            headers={"Authorization": "Token " + base64.b64encode(token.encode()).decode()})
    answer = response.json()
    status = answer.get("status_code") if isinstance(answer, dict) else None
    if response.status_code >= 300 or status not in (None, 1000):
        raise SystemExit(f"{scenario} at {base_url} is refused: {response.status_code} {response.text[:300]}")


async def wait_http(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    async with httpx.AsyncClient(timeout=2) as client:
        for _ in range(300):
            if process.poll() is not None:
                raise SystemExit(f"server exited ({process.returncode}); see {log}")
            try:
                await client.get(url)
                return
            except httpx.TransportError:
                await asyncio.sleep(0.1)
    raise SystemExit(f"server did not answer; see {log}")


def granian(app: str, port: int) -> list[str]:
    """The same server options as the receivers' (pipeline.stack): one worker, no websockets."""
    return ["-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--no-ws", "--log-level", "warning", "--working-dir", str(BENCH), app]


# --- the three servers ------------------------------------------------------------------------------------

async def run_ours(workdir: Path, script: Path, args: argparse.Namespace, *, label: str = "ours",
                   pythonpath: str | None = None) -> list[Result]:
    """The receivers as `ocpi-pipeline dev` runs them (pipeline.stack): granian, one worker, the embedded broker.

    `pythonpath` adds packages to the receivers' environment only (the uvloop variant).
    """
    if pythonpath is not None:
        os.environ["PYTHONPATH"] = pythonpath  # the Stack's children inherit our environment
    env = {"OCPI_DATA_DIR": str(workdir / "data"), "OCPI_HTTP_PORT": str(free_port()),
           "OCPI_TOPIC_PARTITIONS": "4", "OCPI_KAFKA_SEND_TIMEOUT": "10", "PATH": os.environ.get("PATH", "")}
    stack = await Stack(load_settings(env), run_worker=False).start()
    try:
        assert stack.clickhouse is not None
        registry = PartnerRegistry(stack.clickhouse)
        roles = [PartyRole(country_code="BE", party_id="BEC", role="CPO")]
        _partner, token = await asyncio.to_thread(registry.register_direct, "bench-cpo", "Bench CPO", roles)
        results = []
        for scenario in SCENARIOS:
            await check_once(stack.base_url, token, scenario)
            print(f"  {label}: {scenario} ...", flush=True)
            results.append(await wrk(f"{label} {scenario}", stack.base_url, requests_file(workdir, scenario), token,
                               duration=args.duration, connections=args.connections, script=script))
        return results
    finally:
        await stack.stop()
        os.environ.pop("PYTHONPATH", None)


async def run_granian_app(name: str, python: str, app: str, workdir: Path, script: Path, args: argparse.Namespace,
                          token: str, scenarios: list[str], cdr_path: str,
                          env: dict[str, str] | None = None) -> list[Result]:
    port = free_port()
    log = workdir / f"{name}.log"
    process = spawn([python, *granian(app, port)], env={**os.environ, **(env or {})}, log_path=log)
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_http(base + "/", process, log)
        results = []
        for scenario in scenarios:
            await check_once(base, token, scenario, cdr_path=cdr_path)
            print(f"  {name}: {scenario} ...", flush=True)
            results.append(await wrk(f"{name} {scenario}", base, requests_file(workdir, scenario, cdr_path=cdr_path),
                               token, duration=args.duration, connections=args.connections, script=script))
        return results
    finally:
        terminate(process, 10)


def uvloop_path() -> str | None:
    """A directory holding uvloop for the receivers' variant, or None when it is installed already (then the
    plain run uses it: granian's `--loop auto` prefers it)."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        pass
    else:
        return None
    target = BENCH / ".venvs" / "uvloop"
    if not (target / "uvloop").is_dir():
        print(f"  installing uvloop into {target} ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target), "uvloop"],
                       check=True)
    return str(target)


def extrawest_python() -> str:
    """The virtualenv of (b), created on first use (its pins conflict with ours: pydantic 1, FastAPI 0.101)."""
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"  creating {VENV} (extrawest-ocpi, granian {GRANIAN}) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    check = subprocess.run([str(python), "-c", "import py_ocpi, granian"], capture_output=True)
    if check.returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", "extrawest-ocpi", f"granian=={GRANIAN}"],
                       check=True)
    return str(python)


# --- report -----------------------------------------------------------------------------------------------

def report(results: list[Result]) -> dict[str, Any]:
    by = {r.name: r for r in results}
    print(f"\n{'scenario':<32}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}{'load':>7}")
    for r in results:
        print(f"{r.name:<32}{r.requests_per_s:>10.0f}{r.p50_ms:>9.1f}{r.p99_ms:>9.1f}{r.non_2xx:>9}"
              f"{r.load_before:>7.1f}" + (f"  sockets: {r.socket_errors}" if r.socket_errors else ""))
    put = by["ours session PUT"]
    verdicts: dict[str, tuple[float, float | None, bool]] = {
        "session PUT rate": (put.requests_per_s, TARGET_RATE, put.requests_per_s >= TARGET_RATE),
        "session PUT p99 ms": (put.p99_ms, TARGET_P99_MS, put.p99_ms < TARGET_P99_MS),
    }
    bare = by.get("bare session PUT")
    if bare:
        ratio = put.requests_per_s / bare.requests_per_s
        verdicts["ours / (a) bare parse"] = (ratio, TARGET_VS_A, ratio >= TARGET_VS_A)
    for scenario in SCENARIOS:
        other = by.get(f"extrawest {scenario}")
        if other:
            ratio = by[f"ours {scenario}"].requests_per_s / other.requests_per_s
            target = TARGET_VS_B if scenario == "session PUT" else None
            verdicts[f"ours / (b) extrawest, {scenario}"] = (ratio, target, target is None or ratio >= target)
    ceiling = by.get("bare+kafka session PUT")
    if ceiling:
        verdicts["ours / (a+kafka) parse and ack"] = (put.requests_per_s / ceiling.requests_per_s, None, True)
    fast = by.get("ours+uvloop session PUT")
    if fast:
        rate_ok = fast.requests_per_s >= TARGET_RATE
        verdicts["with uvloop: session PUT rate"] = (fast.requests_per_s, TARGET_RATE, rate_ok)
        verdicts["with uvloop: session PUT p99 ms"] = (fast.p99_ms, TARGET_P99_MS, fast.p99_ms < TARGET_P99_MS)
        if bare:
            ratio = fast.requests_per_s / bare.requests_per_s
            verdicts["with uvloop: ours / (a) bare parse"] = (ratio, TARGET_VS_A, ratio >= TARGET_VS_A)
    print()
    for what, (value, target, ok) in verdicts.items():
        goal = f"target {'<' if 'p99' in what else '>='} {target:g}" if target is not None else "no target"
        print(f"{what:<40}{value:>9.2f}   {goal:<16}{'' if target is None else ('met' if ok else 'MISSED')}")
    return {"results": [asdict(r) for r in results],
            "verdicts": {k: {"value": v, "target": t, "met": ok} for k, (v, t, ok) in verdicts.items()}}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run (after 3 s warm-up)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections of wrk")
    parser.add_argument("--skip-extrawest", action="store_true", help="leave out (b)")
    parser.add_argument("--skip-uvloop", action="store_true",
                        help="leave out the run of the receivers with uvloop added (it runs only where uvloop "
                             "is not installed: uvloop is a dependency, so the plain run uses it)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install -y wrk)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-receivers-"))
    script = workdir / "requests.lua"
    script.write_text(LUA)
    started = time.monotonic()
    try:
        print(f"cores: {os.cpu_count()}, wrk -t1 -c{args.connections}, {args.duration} s per run", flush=True)
        if os.getloadavg()[0] > 0.7:
            print(f"  note: load average {os.getloadavg()[0]:.1f} before the start; other work lowers the figures")
        results = await run_ours(workdir, script, args)
        uvloop = None if args.skip_uvloop else uvloop_path()
        if uvloop is not None:
            results += await run_ours(workdir, script, args, label="ours+uvloop", pythonpath=uvloop)
        results += await run_granian_app("bare", sys.executable, "bare_app:app", workdir, script, args, "none",
                                         list(SCENARIOS), "/ocpi/emsp/2.2.1/cdrs")
        with EmbeddedBroker() as broker:
            await asyncio.to_thread(ensure_topics, broker.bootstrap, ["bench"], 4)
            results += await run_granian_app("bare+kafka", sys.executable, "bare_app:app", workdir, script, args,
                                             "none", ["session PUT"], "/ocpi/emsp/2.2.1/cdrs",
                                             env={"BENCH_KAFKA_BOOTSTRAP": broker.bootstrap})
        if not args.skip_extrawest:
            results += await run_granian_app("extrawest", extrawest_python(), "extrawest_app:app", workdir, script,
                                             args, "bench-token", list(SCENARIOS), "/ocpi/emsp/2.2.1/cdrs/")
        summary = report(results)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"receivers-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({**summary, "connections": args.connections, "duration_s": args.duration,
                               "cores": os.cpu_count(), "seconds": round(time.monotonic() - started)}, indent=2))
    print(f"\nwritten to {out.relative_to(REPO)}")


if __name__ == "__main__":
    asyncio.run(main())
