"""README and the documents it links to stay true: the settings table and the command list are checked against the
code, the files, settings and names the documents give against the tree, and their links against the documents."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from infra.settings import documented_settings
from pipeline.cli import cli

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    found = []
    for name, command in group.commands.items():
        found.append((f"{prefix}{name}", command))
        if isinstance(command, click.Group):
            found.extend(_commands(command, f"{prefix}{name} "))
    return found


def test_settings_table_matches_the_settings_module() -> None:
    table = README.split("<!-- settings-table:start -->")[1].split("<!-- settings-table:end -->")[0]
    rows = re.findall(r"^\| `(OCPI_[A-Z_]+)` \| (.*?) \| (.*?) \|$", table, re.MULTILINE)
    documented = [(var, default, doc) for _s, var, default, doc in documented_settings()]
    assert [(v, d.replace("\\|", "|")) for v, _df, d in rows] == [(v, doc) for v, _df, doc in documented]
    for (var, shown_default, _), (_, default, _) in zip(rows, documented, strict=True):
        assert shown_default == (f"`{default}`" if default else "*(empty)*"), var


@pytest.mark.parametrize(("name", "command"), _commands(cli))
def test_every_command_has_help_and_is_in_the_readme(name: str, command: click.Command) -> None:
    result = CliRunner().invoke(cli, [*name.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert f"ocpi-pipeline {name}" in README, f"`ocpi-pipeline {name}` is not documented in README.md"



def test_every_option_the_command_table_shows_exists() -> None:
    """The command table's options (`[--since T]`, `--rebuild`): one renamed or removed sends the reader to a
    usage error."""
    table = README.split("| command | what it does |")[1].split("\n\n")[0]
    wrong = []
    for name, command in _commands(cli):
        if isinstance(command, click.Group):
            continue
        options = {o for param in command.params for o in (*param.opts, *param.secondary_opts)} | {"--help"}
        rows = " ".join(row.split("` |")[0] for row in table.splitlines() if f"`ocpi-pipeline {name}" in row)
        wrong += [f"{name} {option}" for option in sorted(set(re.findall(r"--[a-z][a-z-]*", rows)) - options)]
    assert not wrong, f"README.md's command table shows options the commands do not have: {wrong}"

# README.md is the map; the detail of each topic lives in a document under docs/ it links to.
TOPICS = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "docs").glob("*.md"))
DOCS = {name: (ROOT / name).read_text() for name in ("README.md", "ARCHITECTURE.md", "bench/README.md", *TOPICS)}
# What operators read for the rules, outcomes and anomalies: README and the topic documents.
REFERENCE = "\n".join(text for name, text in DOCS.items() if name == "README.md" or name.startswith("docs/"))
# Read outside the settings module (README says where).
OTHER_VARIABLES = {"OCPI_TANSU_LOG"}


@pytest.mark.parametrize("doc", DOCS)
def test_every_file_path_the_docs_name_exists(doc: str) -> None:
    """`pipeline/sink.py`, `tests/unit/avro/test_generated_reader.py`, `infra/clickhouse/` ...: a file that was
    renamed or removed leaves the reader looking for code that is not there."""
    roots = ("ocpi/", "infra/", "receivers/", "pipeline/", "tests/", "avro/", "dashboards/", "bench/", "tools/",
             "docs/")
    paths = {p for p in re.findall(r"`([A-Za-z0-9_./-]+)`", DOCS[doc]) if p.startswith(roots) and "/" in p}
    paths -= {"infra/avro_schemas",  # where the wheel ships avro/ (pyproject.toml), not a directory of the tree
              "bench/results/", "bench/.venvs/extrawest", "bench/.venvs/uvloop"}  # written by the benchmarks
    missing = sorted(p for p in paths if not (ROOT / p.rstrip("/")).exists()
                     and not (ROOT / (p + ".py")).exists())  # `ocpi/_validate`, `pipeline/ordering`: modules
    assert not missing, f"{doc} names files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_setting_the_docs_name_exists(doc: str) -> None:
    known = {var for _s, var, _d, _m in documented_settings()} | OTHER_VARIABLES
    named = set(re.findall(r"\bOCPI_[A-Z0-9_]*[A-Z0-9]\b", DOCS[doc])) - {"OCPI_TOPIC"}  # `OCPI_TOPIC_*`
    assert not named - known, f"{doc} names settings that do not exist: {sorted(named - known)}"


def test_every_outcome_and_anomaly_kind_is_named_in_the_docs() -> None:
    """raw_events.outcome and anomalies.kind are what operators filter on (`report anomalies --kind`)."""
    from pipeline.records import Anomaly, Outcome

    missing = [kind.value for kind in (*Outcome, *Anomaly) if f"`{kind.value}`" not in REFERENCE]
    assert not missing, f"README.md and docs/ do not name these outcomes or anomaly kinds: {missing}"


def test_the_table_list_names_every_table_and_the_last_migration() -> None:
    from infra.clickhouse.migrations import available_migrations

    migrations = available_migrations()
    created = {name for m in migrations for name in re.findall(
        r"CREATE (?:OR REPLACE )?(?:TABLE|VIEW)(?: IF NOT EXISTS)? (\w+)", m.sql)}
    paragraph = DOCS["docs/pipeline.md"].split("**Tables**:")[1].split("\n\n")[0]
    not_the_pipelines = {"partners"}  # the partner registry (docs/partners.md)
    missing = sorted(t for t in created - not_the_pipelines if f"`{t}`" not in paragraph)
    assert not missing, f"docs/pipeline.md's **Tables** do not name: {missing}"
    span = re.search(r"migrations `(\d{4})`–`(\d{4})`", paragraph)
    assert span is not None and int(span.group(2)) == migrations[-1].version, "docs/pipeline.md's migration range"
    # It said `0006`–: the tables it lists start with 0001 (raw_events), 0002 (sessions, cdrs), 0004, 0005.
    assert int(span.group(1)) == migrations[0].version, "docs/pipeline.md's migration range starts elsewhere"


@pytest.mark.parametrize("doc", DOCS)
def test_every_dotted_name_the_docs_give_resolves(doc: str) -> None:
    """`pipeline.records.sort_out`, `ocpi.compat.RECHECK`, `wire.StoredStruct` ...: a function that was renamed
    leaves the reader looking for it."""
    import importlib

    def resolves(ref: str) -> bool:
        parts = ref.split(".")
        candidates = [parts] if parts[0] in ("ocpi", "infra", "receivers", "pipeline") else [
            [package, *parts] for package in ("pipeline", "receivers", "infra", "ocpi")]
        for candidate in candidates:
            for n in range(len(candidate), 0, -1):
                try:
                    found: object = importlib.import_module(".".join(candidate[:n]))
                except ImportError:
                    continue
                for attribute in candidate[n:]:
                    found = getattr(found, attribute, None)
                if found is not None:
                    return True
                break
        return False

    ours = {"ocpi", "infra", "receivers", "pipeline"}
    modules = ours | {path.stem for package in ours for path in (ROOT / package).glob("*.py")}
    tables = {"cdrs", "sessions", "locations", "reconciliation"}  # `cdrs.session_id` is a column
    refs = {ref for ref in re.findall(r"`([a-z_]+(?:\.[A-Za-z_][A-Za-z0-9_]*)+)`", DOCS[doc])
            if ref.split(".")[0] in modules - tables and ref != "retention.ms"  # a Kafka topic config
            and not re.search(r"\.(py|md|json|avsc|sql|v1)$|^ocpi\.(pipeline|v2_2_1)\.", ref)}
    unresolved = sorted(ref for ref in refs if not resolves(ref))
    assert not unresolved, f"{doc} names what the code does not have: {unresolved}"


def test_dev_says_that_a_configured_kafka_or_clickhouse_is_used() -> None:
    """`dev` was documented as "everything embedded", but it uses the Kafka and ClickHouse the settings name
    (`pipeline.stack.Stack`): run from a shell with production's OCPI_KAFKA_BOOTSTRAP, its worker joined
    production's consumer group and took partitions from it, writing their events into a local chDB."""
    help_text = " ".join(CliRunner().invoke(cli, ["dev", "--help"]).output.split())
    row = next(line for line in README.splitlines() if line.startswith("| `ocpi-pipeline dev` |"))
    for text in (help_text, row):
        assert "OCPI_KAFKA_BOOTSTRAP" in text and "OCPI_CLICKHOUSE_DSN" in text, text


def test_what_billing_shows_says_which_credits_it_leaves_out() -> None:
    """`report revenue --help` said a credit CDR counts with negative energy and cost, the billing dashboard's
    description and `query --help` named only a second credit of a CDR as left out; `billable_lines`, which all
    three read, also leaves out a credit that names a credit CDR (CREDIT_OF_CREDIT, migration 0018), and neither
    counts at all."""
    import json

    dashboard = json.loads((ROOT / "dashboards" / "billing.json").read_text())["description"]
    for text in (" ".join(CliRunner().invoke(cli, ["report", "revenue", "--help"]).output.split()),
                 " ".join(CliRunner().invoke(cli, ["query", "--help"]).output.split()), dashboard):
        assert "DUPLICATE_CREDIT" in text and "CREDIT_OF_CREDIT" in text, text


def test_billing_total_examples_keep_home_charging_compensation_apart() -> None:
    """`query --help` and README gave `SELECT ... sum(...) FROM billable_lines GROUP BY 1, 2, 3` as the billing
    totals: since 0027 billable_lines holds the lines of home charging compensation CDRs too, amounts owed to drivers,
    which that example added to the charging revenue."""
    help_text = " ".join(CliRunner().invoke(cli, ["query", "--help"]).output.split())
    examples = re.findall(r'query "(SELECT [^"]*FROM billable_lines[^"]*)"', " ".join(REFERENCE.split()) + help_text)
    assert len(examples) >= 2, examples
    for sql in examples:
        assert "home_charging_compensation" in sql, sql


def test_pull_help_says_where_the_next_pull_starts() -> None:
    """`pull --help` said a pull starts by default where the last completed pull ended, and each scheduled round
    continues there; it starts where the pulls completed so far end without a gap (1686ad5): after a one-off window
    apart from them (an old one pulled again, one after a gap) the next pull does not start at its end."""
    text = " ".join(CliRunner().invoke(cli, ["pull", "--help"]).output.split())
    assert "last completed pull ended" not in text and "without a gap" in text, text
    docs = " ".join(REFERENCE.split())
    assert "continues where the last completed pull ended" not in docs


def test_the_tests_that_use_the_embedded_broker_are_marked_kafka_as_the_readme_says() -> None:
    """README said `tests/unit` needs no engine but chDB; the jobs' unit tests (archive, replay resume, a rebuild's
    gap) use the session's embedded Tansu broker, and without the `kafka` marker `-m "not kafka"` still started it."""
    import subprocess
    import sys

    development = " ".join(README.split("## Development")[1].split())
    assert "no engines needed except chDB" not in development
    assert "`kafka`" in development and "not kafka" in development
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-m", "not kafka", "tests/unit/jobs/test_replay_resume.py"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    collected = {line.split("::")[1] for line in run.stdout.splitlines() if "::" in line}
    assert collected, run.stdout + run.stderr
    uses_the_broker = "test_a_replay_resumed_after_its_topic_was_recreated_is_planned_again_not_stuck"
    assert uses_the_broker not in collected, "a test that uses the broker fixture is not marked kafka"


def test_every_reconciliation_outcome_is_named_in_the_docs() -> None:
    """`reconciliation.outcome` is what `report reconciliation` and the reconciliation dashboard group by; a credit
    CDR's own row, `CREDIT`, was named nowhere in README.md."""
    source = (ROOT / "pipeline" / "reconcile.py").read_text()
    outcomes = {value for line in re.findall(r"\boutcome = (.+)", source) for value in re.findall(r'"([A-Z_]+)"', line)}
    assert {"MATCHED", "MISMATCH", "CREDIT", "NO_SESSION"} <= outcomes, outcomes
    missing = sorted(o for o in outcomes if f"`{o}`" not in REFERENCE)
    assert not missing, f"README.md and docs/ do not name these reconciliation outcomes: {missing}"


def test_pull_help_says_which_answers_are_retried() -> None:
    """`pull --help` said a page is tried again on 429/503/3xxx; the pull retries every 5xx, a timeout or a refused
    connection, and a Hub's 4002/4003 too (`pipeline.jobs.pull`), as README says."""
    text = " ".join(CliRunner().invoke(cli, ["pull", "--help"]).output.split())
    attempts = text.split("--max-attempts")[1].split("--schedule")[0]
    assert "5xx" in attempts and "timeout" in attempts and "4002/4003" in attempts, attempts


def test_replay_help_says_what_the_timeout_bounds() -> None:
    """`replay --help` said --timeout is the seconds --wait and --rebuild may take; a rebuild waits up to that long
    for its worker at each of its steps (the build, its internal topics, the gap after the swap, its internal topics
    again), so it may take several times as long."""
    text = " ".join(CliRunner().invoke(cli, ["replay", "--help"]).output.split())
    timeout = text.split("--timeout")[1].split("--job")[0]
    assert "each" in timeout and "step" in timeout, timeout


def test_the_receivers_bench_says_when_it_runs_the_uvloop_row() -> None:
    """bench/README.md said the `ours+uvloop` row is kept to compare both loops and `--skip-uvloop --help` that
    uvloop is not a dependency yet; it is one (pyproject.toml), and `bench/receivers.py` runs that row only where
    uvloop is not installed (`uvloop_path`), so with the project installed the row never appears."""
    import subprocess
    import sys

    assert '"uvloop' in (ROOT / "pyproject.toml").read_text()
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "receivers.py"), "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True)
    text = " ".join(run.stdout.split())
    assert "not a dependency yet" not in text and "not installed" in text, text
    bench = " ".join(DOCS["bench/README.md"].split())
    assert "the row is kept to compare both loops" not in bench
    assert "run only where uvloop is not installed" in bench


def test_the_ocpi_package_docstring_names_its_modules_and_what_it_re_exports() -> None:
    """`ocpi`'s docstring said everything public is re-exported from the package; `owner_key_part`,
    `canonical_json`, `format_exact_datetime` ... are not, and it left `ocpi.types` out of its import paths."""
    import importlib

    import ocpi

    doc = ocpi.__doc__ or ""
    assert "Everything public is also re-exported" not in doc
    modules = sorted(p.stem for p in (ROOT / "ocpi").glob("*.py") if not p.stem.startswith("_"))
    assert [m for m in modules if f"ocpi.{m}" not in doc] == []
    for ref in re.findall(r"`ocpi\.(\w+)\.(\w+)`", doc):
        assert hasattr(importlib.import_module(f"ocpi.{ref[0]}"), ref[1]) and not hasattr(ocpi, ref[1]), ref


def test_the_partners_doc_lists_the_modules_we_serve() -> None:
    """docs/partners.md listed our Receiver endpoints as "sessions, cdrs, locations, ...", as if we served more
    (tariffs, tokens: the modules a Hub broadcasts); the version details list exactly what the app serves."""
    from receivers.app import create_app
    from receivers.versions import served_endpoints

    served = {str(e.identifier) for e in served_endpoints(create_app(sink=[]), "") if e.role.value == "RECEIVER"}
    row = next(line for line in DOCS["docs/partners.md"].splitlines() if "| RECEIVER |" in line)
    assert {m.strip() for m in row.split("|")[1].split(",")} == served, row


def test_report_help_says_consumer_lag_reads_kafka() -> None:
    """`report --help` said every report reads ClickHouse, and named only the store reports; consumer-lag reads
    the consumer group's offsets from Kafka, and needs a running `dev` or OCPI_KAFKA_BOOTSTRAP (README)."""
    text = " ".join(CliRunner().invoke(cli, ["report", "--help"]).output.split())
    intro = text.split("Options:")[0]
    assert "consumer" in intro and "Kafka" in intro, intro
    assert "They read ClickHouse" not in intro, intro


def test_the_readme_says_the_tests_read_the_ocpi_digest_beside_the_clone() -> None:
    """The tests read the spec's examples and object definitions from ../shared/ocpi, outside the repository: the
    README's "Run the tests" from a fresh clone anywhere else ended in a dozen collection errors (FileNotFoundError),
    and it did not say that the clone needs the digest beside it."""
    from tests.conftest import OCPI_DIGEST

    assert not OCPI_DIGEST.resolve().is_relative_to(ROOT)
    quick_start = " ".join(README.split("## Quick start")[1].split("## Configuration")[0].split())
    assert f"../{OCPI_DIGEST.parent.name}/{OCPI_DIGEST.name}/" in quick_start


def _anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a document's headings: lower case, punctuation dropped, spaces as hyphens, a repeated
    heading's numbered -1, -2 ..."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_the_docs_give_resolves(doc: str) -> None:
    """README is a map to docs/: a link to a document that moved, or to a heading that was renamed, sends the reader
    nowhere."""
    text = re.sub(r"^```.*?^```", "", DOCS[doc], flags=re.M | re.S)  # a code block holds no links
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https://..., mailto:
        path, _, anchor = target.partition("#")
        file = (ROOT / doc).parent / path if path else ROOT / doc
        missing_anchor = file.suffix == ".md" and file.exists() and anchor and anchor not in _anchors(file.read_text())
        if not file.resolve().exists() or missing_anchor:
            broken.append(target)
    assert not broken, f"{doc} links to what does not exist: {broken}"


def test_the_readme_links_every_document_under_docs() -> None:
    """README is the map: a topic document it does not link is one a newcomer never finds."""
    linked = {target.split("#")[0] for target in re.findall(r"\]\(([^)\s]+)\)", README)}
    assert [doc for doc in TOPICS if doc not in linked] == []
