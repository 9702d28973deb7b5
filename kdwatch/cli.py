"""The ``kdwatch`` command line: the composition root that wires settings, Kafka and the database."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console

from kdwatch.durations import parse_duration_ms
from kdwatch.errors import KdwatchError

app = typer.Typer(help="Fidelity monitoring and SLOs for distilled models.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
dev_kafka_app = typer.Typer(help="A local Apache Kafka broker for development and tests.", no_args_is_help=True)
topics_app = typer.Typer(help="Kafka topics.", no_args_is_help=True)
reference_app = typer.Typer(help="PSI reference baselines per model.", no_args_is_help=True)
db_app = typer.Typer(help="The database.", no_args_is_help=True)
app.add_typer(dev_kafka_app, name="dev-kafka")
app.add_typer(topics_app, name="topics")
app.add_typer(reference_app, name="reference")
app.add_typer(db_app, name="db")
silence_app = typer.Typer(help="Silences: mute matching alerts for a while.", no_args_is_help=True)
app.add_typer(silence_app, name="silence")

err = Console(stderr=True)
DEFAULT_HOME = Path(".kdwatch")


def _duration(value: str, name: str) -> int:
    try:
        return parse_duration_ms(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=name) from None


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(record).decode() + "\n")


# ---- offline ----


@app.command()
def analyze(
    predictions: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="predictions (.jsonl or .parquet)")],
    teacher: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="teacher replays (.jsonl or .parquet)")] = None,
    labels: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="labels (.jsonl or .parquet)")] = None,
    window: Annotated[str, typer.Option(help="window size")] = "1m",
    grace: Annotated[str, typer.Option(help="join grace after a window closes")] = "10m",
    reference: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="PSI baseline (.jsonl or .parquet)")] = None,
    slo: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="SLO YAML: backtest it on these windows")] = None,
    partitions: Annotated[int, typer.Option(min=1, help="reproduce a topic's layout: join per Kafka partition of request_id")] = 1,
    engine: Annotated[str, typer.Option(help="local (this process) or spark (README: History on Spark)")] = "local",
    master: Annotated[str, typer.Option(help="with --engine spark: the Spark master URL")] = "local[2]",
) -> None:
    """Analyse JSONL or Parquet files with no broker and no database; one JSON object per window on stdout.

    Parquet inputs are validated and computed on columns (README: "Parquet input"), with the same
    results. With --slo, one JSON object per notification the SLO engine would have sent follows the windows.
    """
    from kdwatch.analyzer.window import window_result  # the rest only when needed: start-up counts (RESULTS.md)
    from kdwatch.collector.offline import analyze_files, load_reference
    from kdwatch.runtime import tune_gc

    tune_gc()
    window_ms, grace_ms = _duration(window, "--window"), _duration(grace, "--grace")
    if slo is not None:
        from kdwatch.slo.config import load_slo_file
    slo_config = load_slo_file(slo) if slo is not None else None  # a bad file fails before any work
    # Read before the inputs: on a second thread beside them, Arrow aborted the process at exit now and then.
    refs = load_reference(reference) if reference is not None else {}
    if engine not in ("local", "spark"):
        raise typer.BadParameter("local or spark", param_hint="--engine")
    if engine == "spark":
        windows, counters = _analyze_on_spark(master, predictions, teacher, labels, window_ms, grace_ms, refs, partitions)
    else:
        windows, counters = analyze_files(
            predictions, teacher, labels, window_ms=window_ms, grace_ms=grace_ms, references=refs,
            partitions=partitions, partitioner=_kafka_partitioner() if partitions > 1 else None)
    results = []
    for key in sorted(windows, key=lambda k: (k.window_start, k.model, k.student_version)):
        result = window_result(key.model, key.student_version, key.window_start, window_ms, windows[key], refs.get(key.model))
        _emit(result)
        results.append((key, result))
    if slo_config is not None:
        from kdwatch.slo.engine import WindowInput, backtest
        inputs = [WindowInput(key.model, key.student_version, key.window_start + window_ms, windows[key], result)
                  for key, result in results]
        for notification in backtest(slo_config, inputs):
            _emit(notification)
    rejected = {f"{kind}.{reason}": count for (kind, reason), count in sorted(counters.items()) if reason != "valid"}
    if rejected:
        err.print(f"[yellow]not counted in any window metric:[/] {rejected}")


def _kafka_partitioner() -> Any:  # Callable[[bytes, int], int]
    from kdwatch.collector.consumer import kafka_partition  # Kafka's client loads only when --partitions asks for it

    return kafka_partition


def _analyze_on_spark(master: str, predictions: Path, teacher: Path | None, labels: Path | None, window_ms: int,
                      grace_ms: int, refs: dict[str, Any], partitions: int) -> tuple[dict[Any, Any], dict[tuple[str, str], int]]:
    try:
        from kdwatch import spark as on_spark
    except ImportError as exc:
        err.print(f"--engine spark needs PySpark ({exc.name} is missing): pip install 'kdwatch[spark]'")
        raise typer.Exit(2) from None
    session = on_spark.session(master)
    try:
        rows, counters = on_spark.collect(*on_spark.analyze(session, predictions, teacher, labels, window_ms=window_ms,
                                                            grace_ms=grace_ms, references=refs, partitions=partitions))
    finally:
        session.stop()
    return {key: state for key, state, _result in rows}, counters


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL file of one kind of event")],
    target: Annotated[Path, typer.Argument(dir_okay=False, help="Parquet file to write")],
    kind: Annotated[str, typer.Option(help="prediction, teacher or label")] = "prediction",
) -> None:
    """Convert contract-v1 JSONL to Parquet for the columnar `analyze`; invalid lines go to TARGET.rejected.jsonl."""
    from kdwatch.collector.parquet_io import convert_jsonl

    if kind not in ("prediction", "teacher", "label"):
        raise typer.BadParameter("must be prediction, teacher or label", param_hint="--kind")
    rejected = target.with_name(target.name + ".rejected.jsonl")
    written, reasons = convert_jsonl(source, target, kind, rejected)
    if reasons:
        err.print(f"[yellow]{sum(reasons.values())} invalid line(s) written to {rejected}:[/] {reasons}")
    else:
        rejected.unlink(missing_ok=True)
    err.print(f"wrote {written} {kind} rows to {target}")


@app.command()
def generate(
    out: Annotated[Path, typer.Option(help="directory for predictions.jsonl, teacher.jsonl, labels.jsonl")],
    n: Annotated[int, typer.Option(min=1, help="number of predictions")] = 10_000,
    seed: int = 0,
    rate: Annotated[float, typer.Option(help="predictions per second of event time")] = 50.0,
) -> None:
    """Write synthetic contract-v1 traffic to JSONL files."""
    from kdwatch.generator import TrafficSpec
    from kdwatch.generator import generate as gen

    out.mkdir(parents=True, exist_ok=True)
    names = {"prediction": "predictions.jsonl", "teacher": "teacher.jsonl", "label": "labels.jsonl"}
    handles = {kind: (out / name).open("wb") for kind, name in names.items()}
    try:
        for kind, _rid, value in gen(TrafficSpec(seed=seed, events_per_second=rate), n):
            handles[kind].write(value + b"\n")
    finally:
        for handle in handles.values():
            handle.close()
    err.print(f"wrote {n} predictions to {out}")


# ---- streaming ----


def _metrics_server(port: int | None) -> Any:
    """A registry served over HTTP on ``port`` (all interfaces, as /metrics), or None without a port."""
    if port is None:
        return None
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    start_http_server(port, registry=registry)
    return registry


def _settings(**overrides: Any) -> Any:
    from kdwatch.settings import load_settings

    return load_settings(**overrides)


@app.command()
def collect(
    bootstrap_servers: Annotated[str | None, typer.Option(help="overrides KDWATCH_BOOTSTRAP_SERVERS")] = None,
    database_url: Annotated[str | None, typer.Option(help="overrides KDWATCH_DATABASE_URL")] = None,
    group_id: Annotated[str | None, typer.Option(help="overrides KDWATCH_GROUP_ID")] = None,
    idle_exit: Annotated[float | None, typer.Option(help="exit after this many seconds without records")] = None,
    metrics_port: Annotated[int | None, typer.Option(envvar="KDWATCH_METRICS_PORT",
                                                     help="serve the collector's own Prometheus metrics on this port")] = None,
) -> None:
    """Run a collector (one consumer-group member) until interrupted."""
    from kdwatch.wiring import build_collector, collector_config, open_store

    settings = _settings(bootstrap_servers=bootstrap_servers, database_url=database_url, group_id=group_id)
    collector = build_collector(collector_config(settings), open_store(settings.database_url), registry=_metrics_server(metrics_port))
    stop = threading.Event()
    from kdwatch.runtime import tune_gc

    tune_gc()
    # Partition assignments and revocations are rare and tell an operator who owns what: logged at INFO.
    logging.getLogger("kdwatch.collector").setLevel(logging.INFO)
    err.print(f"collector {settings.group_id} consuming from {settings.bootstrap_servers}")
    try:
        collector.run(stop, idle_exit_s=idle_exit)
    except KeyboardInterrupt:
        stop.set()
    err.print(f"processed {collector.processed} records")


@app.command()
def produce(
    bootstrap_servers: Annotated[str | None, typer.Option(help="overrides KDWATCH_BOOTSTRAP_SERVERS")] = None,
    n: Annotated[int, typer.Option(min=1)] = 10_000,
    seed: int = 0,
) -> None:
    """Produce synthetic contract-v1 traffic into the three topics."""
    from kdwatch.generator import TrafficSpec
    from kdwatch.loadgen import produce_traffic

    settings = _settings(bootstrap_servers=bootstrap_servers)
    count = produce_traffic(settings, TrafficSpec(seed=seed), n)
    err.print(f"produced {count} records")


@app.command()
def windows(
    database_url: Annotated[str | None, typer.Option(help="overrides KDWATCH_DATABASE_URL")] = None,
    model: str | None = None,
) -> None:
    """Print the stored windows (merged across partitions) as JSON lines, like `analyze`."""
    from kdwatch.analyzer.window import window_result
    from kdwatch.storage.sql import SqlStore

    settings = _settings(database_url=database_url)
    store = SqlStore.from_url(settings.database_url.get_secret_value())
    refs = store.references()
    for key, (state, final, window_ms) in sorted(store.windows(model=model).items(), key=lambda kv: kv[0].window_start):
        record = window_result(key.model, key.student_version, key.window_start, window_ms, state, refs.get(key.model))
        record["final"] = final
        _emit(record)


@topics_app.command("create")
def topics_create(
    bootstrap_servers: Annotated[str | None, typer.Option()] = None,
    partitions: Annotated[int, typer.Option(min=1)] = 4,
) -> None:
    """Create the three co-partitioned topics and their dead-letter topics."""
    from kdwatch.collector.consumer import DLT_SUFFIX, ensure_topics

    settings = _settings(bootstrap_servers=bootstrap_servers)
    names = [settings.topic_predictions, settings.topic_teacher, settings.topic_labels]
    ensure_topics(settings.bootstrap_servers, names + [n + DLT_SUFFIX for n in names], partitions, settings.kafka_options())
    err.print(f"topics ready: {names} ({partitions} partitions each)")


@reference_app.command("set")
def reference_set(
    model: Annotated[str, typer.Option()],
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL baseline predictions")],
    database_url: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Store (or replace) a model's PSI baseline; collectors started afterwards use it."""
    from kdwatch.collector.offline import load_reference
    from kdwatch.storage.sql import SqlStore

    refs = load_reference(file)
    if model not in refs:
        raise typer.BadParameter(f"no predictions of model {model!r} in {file}", param_hint="--model")
    store = SqlStore.from_url(_settings(database_url=database_url).database_url.get_secret_value())
    store.migrate()
    store.put_reference(model, refs[model])
    err.print(f"reference for {model}: {len(refs[model].features)} features, fingerprint {refs[model].fingerprint}")


@db_app.command("upgrade")
def db_upgrade(database_url: Annotated[str | None, typer.Option()] = None) -> None:
    """Apply database migrations."""
    from kdwatch.storage.sql import SqlStore

    SqlStore.from_url(_settings(database_url=database_url).database_url.get_secret_value()).migrate()
    err.print("database schema is current")


# ---- the SLO engine ----


def _live_engine(settings: Any, slo_file: Path | None, metrics_port: int | None) -> Any:
    from kdwatch.wiring import build_live_engine, live_config, open_store, store_slos

    store = open_store(settings.database_url)
    if slo_file is not None:  # the file replaces the stored SLO document; the API may edit it afterwards
        store_slos(store, slo_file)
    return build_live_engine(store, live_config(settings), registry=_metrics_server(metrics_port))


@app.command()
def engine(
    slo: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="SLO YAML (replaces the stored SLOs)")] = None,
    once: Annotated[bool, typer.Option(help="one evaluation cycle, then exit")] = False,
    database_url: Annotated[str | None, typer.Option()] = None,
    metrics_port: Annotated[int | None, typer.Option(envvar="KDWATCH_METRICS_PORT",
                                                     help="serve the engine's own Prometheus metrics on this port")] = None,
) -> None:
    """Run the live SLO engine over the stored windows: alerts, notifications, retrain webhooks."""
    settings = _settings(database_url=database_url)
    live = _live_engine(settings, slo, metrics_port)
    interval = parse_duration_ms(settings.engine_interval) / 1000
    while True:
        for note in live.run_once():
            _emit(note)
        sys.stdout.flush()
        if once:
            return
        time.sleep(interval)


@silence_app.command("add")
def silence_add(
    matcher: Annotated[list[str], typer.Option(help="label=value (repeatable), e.g. slo=agreement")],
    duration: Annotated[str, typer.Option(help="how long, from now")] = "2h",
    author: Annotated[str, typer.Option()] = "",
    comment: Annotated[str, typer.Option()] = "",
    database_url: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Mute the alerts whose labels match every matcher, from now for --duration."""
    import uuid

    from kdwatch.slo.engine import Silence
    from kdwatch.storage.slo_store import SloSqlStore
    from kdwatch.storage.sql import SqlStore

    matchers = {}
    for item in matcher:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"{item!r} is not label=value", param_hint="--matcher")
        matchers[name] = value
    if not author:
        raise typer.BadParameter("a silence needs an author", param_hint="--author")
    store = SqlStore.from_url(_settings(database_url=database_url).database_url.get_secret_value())
    store.migrate()
    now = int(time.time() * 1000)
    silence = Silence(f"sil_{uuid.uuid4().hex[:16]}", matchers, now, now + _duration(duration, "--duration"), author, comment)
    SloSqlStore(store.engine).add_silence(silence)
    print(silence.id)


@silence_app.command("list")
def silence_list(database_url: Annotated[str | None, typer.Option()] = None) -> None:
    """Print every silence as a JSON line."""
    from kdwatch.storage.slo_store import SloSqlStore
    from kdwatch.storage.sql import SqlStore

    store = SqlStore.from_url(_settings(database_url=database_url).database_url.get_secret_value())
    store.migrate()
    for s in SloSqlStore(store.engine).silences():
        _emit({"id": s.id, "matchers": s.matchers, "starts_at": s.starts_at, "ends_at": s.ends_at,
               "created_by": s.created_by, "comment": s.comment})


@silence_app.command("expire")
def silence_expire(silence_id: str, database_url: Annotated[str | None, typer.Option()] = None) -> None:
    """End a silence now."""
    from kdwatch.storage.slo_store import SloSqlStore
    from kdwatch.storage.sql import SqlStore

    store = SqlStore.from_url(_settings(database_url=database_url).database_url.get_secret_value())
    store.migrate()
    if not SloSqlStore(store.engine).expire_silence(silence_id, int(time.time() * 1000)):
        err.print(f"no active silence {silence_id}")
        raise typer.Exit(1)


@app.command()
def deliveries(
    database_url: Annotated[str | None, typer.Option()] = None,
    retry_now: Annotated[bool, typer.Option(help="make every pending delivery due now (after fixing a receiver), "
                                                 "instead of at its next backoff step")] = False,
    receiver: Annotated[str | None, typer.Option(help="with --retry-now: only this receiver's")] = None,
) -> None:
    """Print the notification outbox with each delivery's outcome and attempts, as JSON lines."""
    from kdwatch.storage.slo_store import SloSqlStore
    from kdwatch.storage.sql import SqlStore

    store = SqlStore.from_url(_settings(database_url=database_url).database_url.get_secret_value())
    store.migrate()
    slo_store = SloSqlStore(store.engine)
    if retry_now:
        count = slo_store.retry_now(int(time.time() * 1000), receiver)
        err.print(f"{count} pending deliveries due now: the engine's next cycle attempts them")
        return
    for row in slo_store.deliveries():
        _emit(row)


@app.command("prometheus-rules")
def prometheus_rules(
    slo: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="SLO YAML")] = None,
    self_alerts: Annotated[bool, typer.Option("--self", help="kdwatch's alerts on its own pipeline instead")] = False,
) -> None:
    """Print Prometheus burn-rate rules for the SLOs' counter SLIs (--slo), or kdwatch's self-alerts (--self)."""
    if (slo is None) == (not self_alerts):
        raise typer.BadParameter("give --slo FILE or --self", param_hint="--slo/--self")
    if self_alerts:
        from kdwatch.slo.self_rules import self_rules

        sys.stdout.write("# Generated by `kdwatch prometheus-rules --self`: do not edit (README \"Self-alerts\").\n"
                         "# kdwatch watching itself; the timings assume the defaults (grace 10m, lag refresh every 10 s).\n")
        sys.stdout.write(_rules_yaml(self_rules()))
        return
    from kdwatch.slo.config import load_slo_file
    from kdwatch.slo.prometheus import rules

    sys.stdout.write("# Generated by `kdwatch prometheus-rules --slo " + str(slo) + "`: do not edit.\n")
    sys.stdout.write("# These are the plain SRE workbook rules. kdwatch's own engine also requires the long window's bad\n"
                     "# fraction to be significantly above the threshold (exact binomial bound, alerting.confidence), which\n"
                     "# PromQL cannot compute: at low traffic these rules may fire where `kdwatch engine` stays quiet.\n")
    assert slo is not None
    sys.stdout.write(_rules_yaml(rules(load_slo_file(slo))))


def _rules_yaml(document: dict[str, Any]) -> str:
    """YAML for Prometheus rule files: multi-line expressions as literal blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    return yaml.dump(document, Dumper=Dumper, sort_keys=False, width=200)


@app.command()
def serve(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    database_url: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Serve the REST API, HTML reports and /metrics."""
    import uvicorn

    from kdwatch.wiring import build_api, open_store

    settings = _settings(database_url=database_url)
    app_ = build_api(open_store(settings.database_url), settings)
    from kdwatch.runtime import tune_gc

    tune_gc()
    uvicorn.run(app_, host=host, port=port, log_level="warning")



@app.command()
def runner(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8100,
    config: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="training config YAML")] = None,
    database_url: Annotated[str | None, typer.Option()] = None,
    registry_dir: Annotated[Path | None, typer.Option(help="model registry directory")] = None,
) -> None:
    """Serve the training runner: signed retrain webhooks in, distilled and gated students out."""
    import logging

    import uvicorn

    try:
        from kdwatch.runner.distill import load_train_config
        from kdwatch.wiring import build_runner, open_store, runner_app, runner_secret
    except ImportError as exc:
        err.print(f"the runner needs PyTorch ({exc.name} is missing): pip install 'kdwatch[runner]'")
        raise typer.Exit(2) from None

    settings = _settings(database_url=database_url, registry_dir=None if registry_dir is None else str(registry_dir))
    secret = runner_secret(settings)
    train = load_train_config(config)
    store = open_store(settings.database_url)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    worker = build_runner(store, secret, Path(settings.registry_dir), train, show_progress=True)
    err.print(f"runner on http://{host}:{port}/webhooks/retrain, registry {settings.registry_dir}")
    uvicorn.run(runner_app(worker), host=host, port=port, log_level="warning")


@app.command()
def replayer(
    teacher_torchscript: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="TorchScript teacher")] = None,
    teacher_url: Annotated[str | None, typer.Option(help="HTTP teacher: POST {instances: [{features}]}")] = None,
    teacher_lm_torchscript: Annotated[Path | None, typer.Option(exists=True, dir_okay=False,
                                                               help="generative students: a TorchScript causal LM")] = None,
    teacher_completions_url: Annotated[str | None, typer.Option(
        help="generative students: an OpenAI-compatible /v1/completions returning prompt_logprobs (vLLM)")] = None,
    teacher_model: Annotated[str | None, typer.Option(help="the model name sent to --teacher-completions-url")] = None,
    features: Annotated[str | None, typer.Option(help="feature order for TorchScript, comma-separated")] = None,
    teacher_version: Annotated[str, typer.Option()] = "teacher",
    sample_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="share of predictions replayed")] = 0.1,
    rate: Annotated[list[str] | None, typer.Option(help="per-model sample rate, MODEL=RATE (repeatable)")] = None,
    max_per_second: Annotated[float | None, typer.Option(min=0.001, help="cap on replays per second")] = None,
    group_id: Annotated[str, typer.Option()] = "kdwatch-replayer",
    metrics_port: Annotated[int | None, typer.Option(envvar="KDWATCH_METRICS_PORT", help="serve Prometheus metrics on this port")] = None,
    idle_exit: Annotated[float | None, typer.Option(help="stop after this many idle seconds")] = None,
) -> None:
    """Replay a deterministic sample of predictions through the teacher and publish teacher replays."""
    from prometheus_client import CollectorRegistry

    from kdwatch.collector.replayer import Replayer, ReplayerConfig
    from kdwatch.wiring import build_teacher, model_rates_of

    teacher = build_teacher(torchscript=teacher_torchscript, url=teacher_url, lm_torchscript=teacher_lm_torchscript,
                            completions_url=teacher_completions_url, model=teacher_model, features=features)
    model_rates = model_rates_of(rate or [])
    settings = _settings()
    registry = _metrics_server(metrics_port) or CollectorRegistry()
    config = ReplayerConfig(settings.bootstrap_servers, settings.topic_predictions, settings.topic_teacher, group_id,
                            teacher_version, sample_rate, model_rates, max_per_second, kafka_options=settings.kafka_options())
    err.print(f"replayer {group_id}: {settings.topic_predictions} -> {settings.topic_teacher}, sample rate {sample_rate}")
    Replayer(config, teacher, registry).run(idle_exit_s=idle_exit)


# ---- the local broker ----


@dev_kafka_app.command("start")
def dev_kafka_start(home: Path = DEFAULT_HOME / "kafka", port: int | None = None,
                    tls: Annotated[bool, typer.Option(help="add an SSL listener with a self-signed certificate")] = False) -> None:
    """Start a local single-node KRaft broker (fetches the jars with Maven the first time)."""
    from kdwatch.devkafka import DevKafka

    started = time.monotonic()
    info = DevKafka(home).start(port, tls=tls)
    err.print(f"broker ready in {time.monotonic() - started:.1f}s (pid {info.pid})")
    if info.tls_bootstrap is not None:
        err.print(f"SSL listener {info.tls_bootstrap}: KDWATCH_KAFKA_SECURITY_PROTOCOL=SSL KDWATCH_KAFKA_SSL_CAFILE={info.ca_file}")
    print(info.bootstrap)


@dev_kafka_app.command("stop")
def dev_kafka_stop(home: Path = DEFAULT_HOME / "kafka") -> None:
    """Stop the local broker."""
    from kdwatch.devkafka import DevKafka

    err.print("stopped" if DevKafka(home).stop() else "not running")


@dev_kafka_app.command("status")
def dev_kafka_status(home: Path = DEFAULT_HOME / "kafka") -> None:
    """Print the bootstrap address of the running local broker (exit 1 when none runs)."""
    from kdwatch.devkafka import DevKafka

    info = DevKafka(home).info()
    if info is None:
        err.print("not running")
        raise typer.Exit(1)
    print(info.bootstrap)


@app.command()
def demo(
    home: Path = DEFAULT_HOME,
    minutes: Annotated[int, typer.Option(min=60, help="event minutes of traffic (the first hour is clean)")] = 180,
    per_minute: Annotated[int, typer.Option(min=40, help="predictions per event minute")] = 100,
    generative: Annotated[bool, typer.Option(help="a distilled language model instead, watched token by token")] = False,
) -> None:
    """The closed loop on scikit-learn's digits: broker, collector, SLO engine, API and runner; shift, page, retrain, recovery."""
    if generative:
        from kdwatch.demo_generative import run_generative_demo

        run_generative_demo(home)
        return
    from kdwatch.demo import DemoOptions, run_demo

    run_demo(home, DemoOptions(total_minutes=minutes, per_minute=per_minute))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app()
    except KdwatchError as exc:
        err.print(f"[red]error:[/] {exc}")
        sys.exit(2)
    except Exception as exc:  # SQLAlchemy's OperationalError, if a command loaded SQLAlchemy (its import costs 0.1 s)
        if "sqlalchemy.exc" not in sys.modules or not isinstance(exc, sys.modules["sqlalchemy.exc"].OperationalError):
            raise
        # The driver's message names host and port, never the password (SQLAlchemy hides it).
        err.print(f"[red]error:[/] database unavailable: {str(getattr(exc, 'orig', exc)).strip().splitlines()[0]}")
        sys.exit(3)


if __name__ == "__main__":
    main()
