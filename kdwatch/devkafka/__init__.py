"""A real single-node Apache Kafka 4.x (KRaft broker + controller) for development and tests.

The jars come from Maven Central through ``mvn dependency:copy-dependencies`` (pom.xml beside this
file) into a cache shared by every checkout; the broker runs as ``java -cp 'jars/*' kafka.Kafka``
on free loopback ports. Ready means an admin client can list topics.

>>> broker = DevKafka(Path(".kdwatch/kafka"))   # doctest: +SKIP
>>> broker.start().bootstrap                     # doctest: +SKIP
'127.0.0.1:41234'
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from kdwatch.errors import DevKafkaError

KAFKA_VERSION = "4.1.1"
POM = Path(__file__).with_name("pom.xml")
DEFAULT_CACHE = Path(os.environ.get("KDWATCH_CACHE", Path.home() / ".cache" / "kdwatch"))

LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {logdir}/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
"""

SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:{cport}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}
advertised.listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={datadir}
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
auto.create.topics.enable=false
message.max.bytes=16777216
"""


TLS_STORE_PASSWORD = "kdwatch-dev-only"  # a throwaway keystore for the local broker, never a real secret


def _with_tls(properties: str, port: int, tls_port: int, keystore: Path) -> str:
    """Add an SSL listener (the PLAINTEXT one stays for the broker's own use and for other clients)."""
    out = properties.replace(f"listeners=PLAINTEXT://127.0.0.1:{port},", f"listeners=PLAINTEXT://127.0.0.1:{port},SSL://127.0.0.1:{tls_port},")
    out = out.replace("listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                      "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL")
    return out + (f"ssl.keystore.location={keystore}\nssl.keystore.type=PKCS12\n"
                  f"ssl.keystore.password={TLS_STORE_PASSWORD}\nssl.key.password={TLS_STORE_PASSWORD}\n")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def jars_dir(cache: Path = DEFAULT_CACHE) -> Path:
    return cache / f"kafka-{KAFKA_VERSION}" / "jars"


def ensure_jars(cache: Path = DEFAULT_CACHE) -> Path:
    """Fetch the broker's jars with Maven once; later calls reuse the cache."""
    target = jars_dir(cache)
    marker = target / ".complete"
    if marker.exists():
        return target
    mvn = shutil.which("mvn")
    if mvn is None:
        raise DevKafkaError("Maven (mvn) is needed to fetch the Kafka jars: run `make setup` or install maven and a JDK 17")
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    result = subprocess.run(
        [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies", "-DincludeScope=runtime",
         f"-DoutputDirectory={target}"],
        capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise DevKafkaError(f"mvn failed to fetch the Kafka jars:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    marker.write_text(KAFKA_VERSION)
    return target


@dataclass
class BrokerInfo:
    pid: int
    port: int
    controller_port: int
    home: str
    tls_port: int | None = None  # the SSL listener, when started with tls=True

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def tls_bootstrap(self) -> str | None:
        return None if self.tls_port is None else f"127.0.0.1:{self.tls_port}"

    @property
    def ca_file(self) -> str | None:
        """The PEM certificate clients trust for the SSL listener."""
        return None if self.tls_port is None else str(Path(self.home) / "tls" / "ca.pem")


class DevKafka:
    """Start, stop and inspect one local broker whose files live under ``home``."""

    def __init__(self, home: Path, cache: Path = DEFAULT_CACHE) -> None:
        self.home = home.resolve()
        self.cache = cache
        self.state_file = self.home / "broker.json"
        self._process: subprocess.Popen[bytes] | None = None  # when started by this object

    def _java(self) -> str:
        java = shutil.which("java")
        if java is None:
            raise DevKafkaError("Java 17+ is needed to run the broker: run `make setup` or install a JDK")
        return java

    def info(self) -> BrokerInfo | None:
        """The running broker, or None (a stale state file is removed)."""
        if not self.state_file.exists():
            return None
        info = BrokerInfo(**json.loads(self.state_file.read_text()))
        try:
            os.kill(info.pid, 0)
        except ProcessLookupError:
            self.state_file.unlink(missing_ok=True)
            return None
        return info

    def start(self, port: int | None = None, timeout_s: float = 90.0, tls: bool = False) -> BrokerInfo:
        """Start the broker (or return the running one); ``tls`` adds an SSL listener with a self-signed certificate."""
        running = self.info()
        if running is not None:
            return running
        jars = ensure_jars(self.cache)
        java = self._java()
        port = port or free_port()
        cport = free_port()
        datadir, logdir = self.home / "data", self.home / "logs"
        shutil.rmtree(datadir, ignore_errors=True)
        datadir.mkdir(parents=True)
        logdir.mkdir(parents=True, exist_ok=True)
        props = self.home / "server.properties"
        text = SERVER_PROPERTIES.format(port=port, cport=cport, datadir=datadir)
        tls_port = None
        if tls:
            tls_port = free_port()
            text = _with_tls(text, port, tls_port, self._certificate())
        props.write_text(text)
        log4j = self.home / "log4j2.properties"
        log4j.write_text(LOG4J2.format(logdir=logdir))
        jvm = _jvm_flags(logdir, log4j)
        classpath = f"{jars}/*"
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        fmt = subprocess.run(
            [java, *jvm, "-cp", classpath, "kafka.tools.StorageTool", "format", "--standalone",
             # --cluster-id=ID: an id may start with "-", which would read as an option
             f"--cluster-id={cluster_id}", "-c", str(props)], capture_output=True, text=True, check=False)
        if fmt.returncode != 0:
            raise DevKafkaError(f"formatting the broker storage failed: {fmt.stderr[-2000:] or fmt.stdout[-2000:]}")
        return self._launch(java, jvm, classpath, props, logdir, port, cport, timeout_s, tls_port)

    def _certificate(self) -> Path:
        """A self-signed key pair for 127.0.0.1 (PKCS12 keystore, made with the JDK's keytool) and its PEM."""
        keytool = shutil.which("keytool")
        if keytool is None:
            raise DevKafkaError("keytool (part of the JDK) is needed for the TLS listener")
        folder = self.home / "tls"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        store, password = folder / "broker.p12", TLS_STORE_PASSWORD
        for args in (["-genkeypair", "-alias", "broker", "-keyalg", "RSA", "-keysize", "2048", "-validity", "30",
                      "-dname", "CN=127.0.0.1", "-ext", "SAN=ip:127.0.0.1,dns:localhost"],
                     ["-exportcert", "-alias", "broker", "-rfc", "-file", str(folder / "ca.pem")]):
            result = subprocess.run([keytool, *args, "-keystore", str(store), "-storetype", "PKCS12", "-storepass", password,
                                     "-noprompt"], capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise DevKafkaError(f"keytool failed: {result.stderr[-1000:] or result.stdout[-1000:]}")
        return store

    def _launch(self, java: str, jvm: list[str], classpath: str, props: Path, logdir: Path, port: int, cport: int,
                timeout_s: float, tls_port: int | None = None) -> BrokerInfo:
        out = (logdir / "stdout.log").open("ab")
        process = subprocess.Popen([java, *jvm, "-cp", classpath, "kafka.Kafka", str(props)],
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self._process = process
        info = BrokerInfo(process.pid, port, cport, str(self.home), tls_port)
        self.state_file.write_text(json.dumps(info.__dict__))
        try:
            wait_ready(info.bootstrap, timeout_s, process)
        except DevKafkaError:
            self.stop()
            raise
        return info

    def restart(self, down_s: float = 0.0, timeout_s: float = 90.0) -> BrokerInfo:
        """Stop the broker and start it again on the same ports and data (a broker restart, not a new cluster)."""
        info = self.info()
        if info is None:
            raise DevKafkaError("no broker to restart")
        self.stop()
        time.sleep(down_s)
        logdir = self.home / "logs"
        log4j = self.home / "log4j2.properties"
        jvm = _jvm_flags(logdir, log4j)
        return self._launch(self._java(), jvm, f"{ensure_jars(self.cache)}/*", self.home / "server.properties", logdir,
                            info.port, info.controller_port, timeout_s, info.tls_port)

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the broker; True when one was running."""
        info = self.info()
        if info is None:
            return False
        with contextlib.suppress(ProcessLookupError):  # it exited by itself meanwhile
            os.killpg(info.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(info.pid, 0)
            except ProcessLookupError:
                break
            _reap(info.pid)
            time.sleep(0.2)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(info.pid, signal.SIGKILL)
            _reap(info.pid)
        self.state_file.unlink(missing_ok=True)
        if self._process is not None:
            self._process.wait(timeout=10)
            self._process = None
        return True


def _jvm_flags(logdir: Path, log4j: Path) -> list[str]:
    """What kafka-server-start.sh would add when calling java directly."""
    return ["-Xms256m", "-Xmx512m", "-XX:+UseG1GC", "-Djava.awt.headless=true", f"-Dkafka.logs.dir={logdir}",
            f"-Dlog4j2.configurationFile=file:{log4j}"]


def _reap(pid: int) -> None:
    """Collect our own child's exit status so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):  # not our child (started by another process)
        os.waitpid(pid, os.WNOHANG)


def wait_ready(bootstrap: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Block until an admin client can list topics on ``bootstrap``."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise DevKafkaError(f"the broker exited with status {process.returncode}; see its logs")
        # A plain TCP probe first: kafka-python leaks the sockets of refused connection attempts.
        host, port = bootstrap.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
        except OSError as exc:
            last_error = exc
            time.sleep(0.3)
            continue
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
            try:
                admin.list_topics()
                return
            finally:
                admin.close()
        except (KafkaError, OSError) as exc:
            last_error = exc
            time.sleep(0.5)
    raise DevKafkaError(f"broker at {bootstrap} not ready after {timeout_s:.0f}s: {last_error}")
