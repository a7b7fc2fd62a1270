"""Shared parts of the benchmarks: real agents, real proxies (agentmesh,
nginx, HAProxy), the load generator, and /proc accounting.

Every proxy runs one worker (one thread or process) pinned to CPU 0 with
taskset; the agents and the load generator share CPU 1. Everything listens
on 127.0.0.1 only, and every run is bounded in time.
"""

import datetime
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The binary under test (also the agents and the load generator): set by
# build().
BIN = os.path.join(ROOT, "target", "release", "agentmesh")
BUILD = "plain: cargo build --release"
PROXY_CPU = "0"
LOAD_CPU = "1"
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


PEERS = {"nginx": "nginx-light", "haproxy": "haproxy", "h2load": "nghttp2-client", "taskset": "util-linux"}


def ensure_packages(wanted=PEERS, check=True):
    """Installs from Debian's packages what is missing of `wanted` (command:
    package; by default nginx, HAProxy and h2load). With check=False a
    failed install is left for the caller to notice."""
    missing = [pkg for cmd, pkg in wanted.items() if shutil.which(cmd) is None]
    if not missing:
        return
    log("installing", " ".join(missing))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=check, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=check, env=env)


def build():
    """Builds the binary the benchmarks run: the profile-guided release
    build of scripts/build-release (the one deploy/Dockerfile ships), or
    with BENCH_BUILD=plain a plain `cargo build --release`; BENCH_BIN=PATH
    runs that binary as it is (CI's smoke runs take the test build: they
    check the harness, not the figures)."""
    global BIN, BUILD
    given = os.environ.get("BENCH_BIN")
    if given:
        BIN = os.path.abspath(given)
        BUILD = f"given: BENCH_BIN={given}"
        log(f"agentmesh: {BIN} ({BUILD})")
        return
    if os.environ.get("BENCH_BUILD", "pgo") != "plain":
        done = subprocess.run([os.path.join(ROOT, "scripts", "build-release")], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
        if done.returncode == 0:
            BIN = done.stdout.strip().splitlines()[-1]
            BUILD = "profile-guided: scripts/build-release"
            log(f"agentmesh: {BIN} ({BUILD})")
            return
        # The report names the build, so a plain one cannot pass for it.
        log("scripts/build-release failed (see above): measuring the plain build instead")
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    BIN = os.path.join(ROOT, "target", "release", "agentmesh")
    BUILD = "plain: cargo build --release"
    log(f"agentmesh: {BIN} ({BUILD})")


_given = set()


def free_port():
    """A loopback port free now and not handed out before in this run: the
    kernel may hand a just-closed port back at once, and a proxy's config
    then names one port twice."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _given:
            _given.add(port)
            return port


def wait_port(port, timeout=10.0, proc=None):
    """Waits until something listens on `port`; fails at once, with the end
    of its log, if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if proc is not None and proc.p.poll() is not None:
                proc.log.flush()
                with open(proc.log.name) as f:
                    tail = f.read()[-2000:]
                raise RuntimeError(f"{proc.cmd[0]} exited ({proc.p.returncode}) before listening "
                                   f"on 127.0.0.1:{port}: {tail.strip()}")
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def machine():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for name, cmd in {"nginx": ["nginx", "-v"], "haproxy": ["haproxy", "-v"], "h2load": ["h2load", "--version"]}.items():
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
            versions[name] = (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired, IndexError):
            versions[name] = "missing"
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "versions": versions,
        "agentmesh_build": BUILD,
    }


def tree(pid):
    """pid and all its descendants."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def user_system(pid):
    """utime and stime of pid and its descendants, in seconds."""
    user = system = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user, system = user + int(fields[11]), system + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return user / TICKS, system / TICKS


def cpu_seconds(pid):
    """utime + stime of pid and its descendants, in seconds."""
    return sum(user_system(pid))


def memory_kib(pid, field):
    """A /proc/PID/status field (VmRSS, VmHWM) summed over the tree, KiB."""
    return memory_kibs(pid, field)[0]


def memory_kibs(pid, *fields):
    """Several /proc/PID/status fields, each summed over the tree, KiB; one
    read of each process's status for all of them."""
    totals = dict.fromkeys(fields, 0)
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    name = line.split(":", 1)[0]
                    if name in totals:
                        totals[name] += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return tuple(totals[f] for f in fields)


class Proc:
    def __init__(self, cmd, cpu, log_path, env=None):
        self.cmd = cmd
        full = ["taskset", "-c", cpu, *cmd] if cpu is not None else cmd
        self.log = open(log_path, "w")
        self.p = subprocess.Popen(full, stdout=self.log, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, **(env or {})), start_new_session=True)

    @property
    def pid(self):
        return self.p.pid

    def stop(self):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(timeout=5)
        self.log.close()


class Agents:
    """Demo agents, pinned with the load generator."""

    def __init__(self, workdir, specs):
        """specs: list of dicts with name and optional agent flags."""
        self.procs, self.ports, self.names = [], [], []
        for spec in specs:
            port = free_port()
            # --no-trace-echo: the agent does not send a call's traceparent
            # back (a hook of the tracing tests, no work of any proxy's).
            cmd = [BIN, "agent", "--listen", f"127.0.0.1:{port}", "--name", spec["name"], "--no-trace-echo"]
            for flag in ("delay_ms", "max_concurrency", "delay_after", "fail_ratio", "tls_cert", "tls_key"):
                if spec.get(flag) is not None:
                    cmd += ["--" + flag.replace("_", "-"), str(spec[flag])]
            self.procs.append(Proc(cmd, LOAD_CPU, os.path.join(workdir, f"agent-{spec['name']}.log"),
                                   env={"RUST_LOG": "warn"}))
            self.ports.append(port)
            self.names.append(spec["name"])
        for port, proc in zip(self.ports, self.procs):
            wait_port(port, proc=proc)

    def stop(self):
        for p in self.procs:
            p.stop()


AGENTMESH_STRATEGIES = ["round_robin", "weighted", "least_connections", "latency", "performance", "hot_cold"]


class Proxy:
    """One proxy in front of the agents: kind is agentmesh, nginx, haproxy
    or direct (no proxy: the load goes straight to the agents)."""

    def __init__(self, kind, strategy, label=None, extra="", top="", headers=(), tls=None, ports=None):
        """extra: more TOML for an agentmesh cluster (e.g. 'choices = "all"');
        top: more top-level TOML (e.g. a [telemetry] table); headers: metadata
        ("name: value") the load generator sends with every call to it;
        tls: the files of tls_files(), to reach the agents over TLS 1.3 (and
        ports: those agents, instead of the run's own)."""
        self.kind, self.strategy, self.extra, self.top = kind, strategy, extra, top
        self.headers = tuple(headers)
        self.tls, self.ports = tls, ports
        self.label = label or (kind if kind == "direct" else f"{kind} {strategy}")
        self.proc = None
        self.port = None

    def start(self, workdir, ports):
        ports = self.ports or ports
        tls = self.tls
        if self.kind == "direct":
            self.targets = [f"127.0.0.1:{p}" for p in ports]
            return
        self.port = free_port()
        self.targets = [f"127.0.0.1:{self.port}"]
        name = self.label.replace(" ", "-")
        if self.kind == "agentmesh":
            path = os.path.join(workdir, f"{name}.toml")
            endpoints = ", ".join(f'{{ address = "127.0.0.1:{p}" }}' for p in ports)
            with open(path, "w") as f:
                # No [runtime]: pinned to one CPU, the default is one event
                # loop (a current-thread runtime), as a pod with a CPU limit
                # of 1 gets it.
                f.write(f"""[listener]
proxy = "127.0.0.1:{free_port()}"
[admin]
listen = "127.0.0.1:{free_port()}"
[[cluster]]
name = "agents"
strategy = "{self.strategy}"
# nginx and HAProxy are given no limits either.
max_in_flight = 1000000
max_in_flight_per_endpoint = 1000000
{self.extra}
local_port = "127.0.0.1:{self.port}"
endpoints = [{endpoints}]
{f'tls = {{ ca = "{tls["ca"]}", server_name = "{TLS_NAME}" }}' if tls else ""}
{self.top}
""")
            self.proc = Proc([BIN, "run", "--config", path], PROXY_CPU,
                             os.path.join(workdir, f"{name}.log"), env={"RUST_LOG": "warn"})
        elif self.kind == "nginx":
            path = os.path.join(workdir, f"{name}.conf")
            servers = "\n".join(f"    server 127.0.0.1:{p};" for p in ports)
            method = "least_conn;" if self.strategy == "least_conn" else ""
            with open(path, "w") as f:
                f.write(f"""worker_processes 1;
daemon off;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}.err warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/{name}-body;
  proxy_temp_path {workdir}/{name}-proxy;
  fastcgi_temp_path {workdir}/{name}-fastcgi;
  uwsgi_temp_path {workdir}/{name}-uwsgi;
  scgi_temp_path {workdir}/{name}-scgi;
  upstream agents {{
    {method}
{servers}
    keepalive 64;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
  }}
  server {{
    listen 127.0.0.1:{self.port} http2;
    http2_max_concurrent_streams 10000;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_max_body_size 0;
    location / {{
      grpc_pass {"grpcs" if tls else "grpc"}://agents;
{nginx_tls(tls)}
      grpc_read_timeout 300s;
      grpc_send_timeout 300s;
    }}
  }}
}}
""")
            self.proc = Proc(["nginx", "-c", path], PROXY_CPU, os.path.join(workdir, f"{name}.log"))
        elif self.kind == "haproxy":
            path = os.path.join(workdir, f"{name}.cfg")
            ssl = (f" ssl verify required ca-file {tls['ca']} verifyhost {TLS_NAME} sni str({TLS_NAME}) "
                   "alpn h2 ssl-min-ver TLSv1.3") if tls else ""
            servers = "\n".join(f"  server a{i} 127.0.0.1:{p} proto h2{ssl}" for i, p in enumerate(ports))
            with open(path, "w") as f:
                f.write(f"""global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout client 300s
  timeout server 300s
  timeout connect 5s
  option http-keep-alive
frontend fe
  bind 127.0.0.1:{self.port} proto h2
  default_backend be
backend be
  balance {self.strategy}
  http-reuse always
{servers}
""")
            self.proc = Proc(["haproxy", "-f", path], PROXY_CPU, os.path.join(workdir, f"{name}.log"))
        else:
            raise ValueError(self.kind)
        wait_port(self.port, proc=self.proc)
        time.sleep(0.2)

    def cpu(self):
        return cpu_seconds(self.proc.pid) if self.proc else 0.0

    def user_system(self):
        return user_system(self.proc.pid) if self.proc else (0.0, 0.0)

    def memory(self, field):
        return self.memories(field)[0]

    def memories(self, *fields):
        return memory_kibs(self.proc.pid, *fields) if self.proc else (0,) * len(fields)

    def stop(self):
        if self.proc:
            self.proc.stop()
            self.proc = None


def measure(proxy, wd, ports, seconds, **load_args):
    """Starts the proxy, warms it up, runs the measured load once; returns
    the load report with the proxy's CPU per call and memory."""
    proxy.start(wd, ports)
    try:
        idle = proxy.memory("VmRSS")
        load(proxy.targets, max(0.3, seconds / 5), headers=proxy.headers,
             **{**load_args, "rate": None, "concurrency": 16})
        c0 = proxy.cpu()
        report = load(proxy.targets, seconds, headers=proxy.headers, **load_args)
        cpu = proxy.cpu() - c0
        report["cpu_us_per_call"] = cpu / max(report["calls"], 1) * 1e6 if proxy.proc else None
        report["rss_idle_kib"] = idle
        report["rss_peak_kib"] = proxy.memory("VmHWM")
        return report
    finally:
        proxy.stop()


def open_streams(proxy, wd, ports, streams, seconds):
    """RSS with `streams` calls held open (each agent delays 1 s), on as
    many connections as it takes at 100 streams each (agentmesh's default
    listener.max_calls_per_connection, and HAProxy's default). Idle RSS is
    also given in its two parts: anonymous memory (the heap, stacks) and
    pages of the binary and its libraries (file-backed, shared with the
    page cache); and per stream, the growth of anonymous memory alone (the
    rest is code that the calls ran for the first time)."""
    proxy.start(wd, ports)
    try:
        idle, anon, files = proxy.memories("VmRSS", "RssAnon", "RssFile")
        connections = max(4, -(-streams // 100))
        report = load(proxy.targets, seconds, concurrency=streams, connections=connections, delay_ms=1000,
                      sample=lambda: proxy.memories("VmRSS", "RssAnon"))
        samples = report.pop("samples") or [(idle, anon)]
        peak, peak_anon = max(s[0] for s in samples), max(s[1] for s in samples)
        return {"rss_idle_kib": idle, "rss_idle_anon_kib": anon, "rss_idle_file_kib": files,
                "rss_open_kib": peak, "kib_per_stream": (peak - idle) / streams if proxy.proc else None,
                "anon_kib_per_stream": (peak_anon - anon) / streams if proxy.proc else None,
                "calls": report["calls"], "errors": report["errors"]}
    finally:
        proxy.stop()


def h2load_run(proxy, wd, ports, body, requests, warmup):
    """Starts the proxy, warms it up with `warmup` h2load requests (which
    opens its upstream connections), runs `requests` more; returns h2load's
    requests/s, the proxy's CPU per request (and its user and system
    parts) and the share of its core it kept busy (below 1.0, the proxy
    was not what bounded the count)."""
    proxy.start(wd, ports)
    try:
        h2load(proxy.targets[0], body, warmup, headers=proxy.headers)
        (u0, s0), t0 = proxy.user_system(), time.monotonic()
        rps = h2load(proxy.targets[0], body, requests, headers=proxy.headers)
        (u1, s1), wall = proxy.user_system(), time.monotonic() - t0
        cpu = (u1 - u0) + (s1 - s0)
        if not proxy.proc:
            return {"rps": rps, "cpu_us_per_req": None, "user_us_per_req": None,
                    "system_us_per_req": None, "core_busy": None}
        return {"rps": rps, "cpu_us_per_req": cpu / requests * 1e6,
                "user_us_per_req": (u1 - u0) / requests * 1e6,
                "system_us_per_req": (s1 - s0) / requests * 1e6, "core_busy": cpu / wall}
    finally:
        proxy.stop()


class Meshed(Proxy):
    """agentmesh with [mesh] on, seeded with two idle sidecars of the same
    cluster, started (on the load CPU) and stopped with it."""

    def __init__(self, label, top="", headers=()):
        super().__init__("agentmesh", "round_robin", label=label, headers=headers)
        self.more = top
        self.peers = []

    def start(self, workdir, ports):
        gossip = [free_port() for _ in range(3)]

        def mesh(i):
            seeds = ", ".join(f'"127.0.0.1:{p}"' for j, p in enumerate(gossip) if j != i)
            return f'[mesh]\nlisten = "127.0.0.1:{gossip[i]}"\nseeds = [{seeds}]\ninsecure = true\n'

        self.peers = [Proxy("agentmesh", "round_robin", label=f"{self.label} idle peer {i}", top=mesh(i))
                      for i in (1, 2)]
        for p in self.peers:
            p.start(workdir, ports)
            subprocess.run(["taskset", "-apc", LOAD_CPU, str(p.proc.pid)],
                                  stdout=subprocess.DEVNULL, check=False)
        self.top = mesh(0) + self.more
        super().start(workdir, ports)
        # The peers find each other within a gossip interval or two.
        time.sleep(1.5)

    def stop(self):
        super().stop()
        for p in self.peers:
            p.stop()


TLS_NAME = "agents.bench"


def tls_files(workdir):
    """A CA and a certificate for the agents (ECDSA P-256, DNS name
    agents.bench), made with openssl: the paths of ca, cert and key."""
    ensure_packages({"openssl": "openssl"})
    d = os.path.join(workdir, "tls")
    os.makedirs(d, exist_ok=True)
    f = {k: os.path.join(d, v) for k, v in
         {"ca": "ca.pem", "ca_key": "ca.key", "cert": "agent.pem", "key": "agent.key", "csr": "agent.csr",
          "ext": "ext"}.items()}
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run = lambda cmd: subprocess.run(cmd, check=True, capture_output=True)  # noqa: E731
    run(["openssl", "req", "-x509", *ec, "-days", "2", "-subj", "/CN=bench-ca", "-keyout", f["ca_key"], "-out", f["ca"]])
    run(["openssl", "req", *ec, "-subj", "/CN=agents", "-keyout", f["key"], "-out", f["csr"]])
    with open(f["ext"], "w") as out:
        out.write(f"subjectAltName=DNS:{TLS_NAME}\nextendedKeyUsage=serverAuth\n")
    run(["openssl", "x509", "-req", "-in", f["csr"], "-CA", f["ca"], "-CAkey", f["ca_key"], "-CAcreateserial",
         "-days", "2", "-extfile", f["ext"], "-out", f["cert"]])
    return f


def nginx_tls(tls):
    """nginx's gRPC-over-TLS settings for the upstream, as agentmesh's."""
    if not tls:
        return ""
    return (f"      grpc_ssl_verify on;\n      grpc_ssl_trusted_certificate {tls['ca']};\n"
            f"      grpc_ssl_name {TLS_NAME};\n      grpc_ssl_server_name on;\n"
            "      grpc_ssl_protocols TLSv1.3;\n      grpc_ssl_session_reuse on;")


def load(targets, duration, concurrency=None, rate=None, connections=4, payload=1024,
         stream=0, delay_ms=0, timeout="30s", sample=None, timeline=None, warmup=0.0,
         histogram=False, headers=()):
    """Runs `agentmesh load` on the load CPU; returns its JSON report. With
    `sample` (a callable), calls it every 50 ms during the run and returns
    the samples too. `warmup` seconds of calls go first, uncounted; with
    `histogram` the report has every latency (`[us, calls]` pairs)."""
    cmd = ["taskset", "-c", LOAD_CPU, BIN, "load", "--json", "--duration", f"{max(1, int(duration * 1000))}ms",
           "--connections", str(connections), "--payload", str(payload), "--stream", str(stream),
           "--delay-ms", str(delay_ms), "--timeout", timeout, "--warmup", f"{int(warmup * 1000)}ms"]
    if histogram:
        cmd.append("--histogram")
    for h in headers:
        cmd += ["--header", h]
    for t in targets:
        cmd += ["--target", t]
    if timeline is not None:
        cmd += ["--timeline", timeline]
    if rate is not None:
        cmd += ["--rate", str(rate)]
    else:
        cmd += ["--concurrency", str(concurrency)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples = []
    limit = time.monotonic() + warmup + duration + 60
    while p.poll() is None:
        if sample is not None:
            samples.append(sample())
        if time.monotonic() > limit:
            p.kill()
            raise RuntimeError("load generator did not finish")
        time.sleep(0.05)
    out, err = p.communicate()
    if p.returncode != 0:
        raise RuntimeError(f"load failed: {err.strip()}")
    report = json.loads(out.strip().splitlines()[-1])
    if sample is not None:
        report["samples"] = samples
    return report


def grpc_body(path, payload):
    """A gRPC-framed InvokeRequest with a `payload`-byte payload, for h2load."""
    # InvokeRequest field 2 (payload, bytes): tag 0x12, varint length, bytes.
    n, varint = payload, b""
    while True:
        byte = n & 0x7F
        n >>= 7
        varint += bytes([byte | (0x80 if n else 0)])
        if not n:
            break
    message = b"\x12" + varint + b"\x5a" * payload
    with open(path, "wb") as f:
        f.write(b"\x00" + len(message).to_bytes(4, "big") + message)


def h2load(target, body, requests, clients=4, streams=16, authority=None, headers=()):
    """Cross-check with nghttp2's h2load: requests/s for unary Invoke."""
    url = f"http://{target}/agentmesh.demo.v1.Agent/Invoke"
    cmd = ["taskset", "-c", LOAD_CPU, "h2load", "-n", str(requests), "-c", str(clients), "-m", str(streams),
           "-d", body, "-H", "content-type: application/grpc", "-H", "te: trailers", url]
    for h in headers:
        cmd[-1:-1] = ["-H", h]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    for line in out.stdout.splitlines():
        if line.startswith("finished in"):
            # finished in 1.23s, 8130.08 req/s, 10.2MB/s
            return float(line.split(",")[1].split()[0])
    raise RuntimeError(f"h2load: {out.stdout[-500:]} {out.stderr[-500:]}")


def interleaved(contenders, rounds, what, run):
    """`run(proxy)` for every contender once per round, the rounds
    interleaved, so that a noisy minute on the machine hits every proxy
    alike; returns each contender's results by label, in round order."""
    results = {}
    for i in range(rounds):
        for p in contenders:
            log(f"{what}, round {i + 1} of {rounds}: {p.label}")
            results.setdefault(p.label, []).append(run(p))
    return results


def merge_histograms(histograms):
    """One histogram of several (`[us, calls]` pairs from `load`)."""
    out = {}
    for h in histograms:
        for value, count in h:
            out[value] = out.get(value, 0) + count
    return sorted([v, c] for v, c in out.items())


def quantile_ms(histogram, q):
    """The latency (ms) at quantile q of a histogram of `[us, calls]` pairs,
    as the HDR histogram reports it: the first value that q of all calls
    are at or below."""
    total = sum(c for _, c in histogram)
    if total == 0:
        return 0.0
    want = max(1, math.ceil(q * total))
    seen = 0
    for value, count in histogram:
        seen += count
        if seen >= want:
            return value / 1000
    return histogram[-1][0] / 1000


def lower_share(ours, theirs, q=0.99, resamples=1000, seed=1):
    """How sure it is that `ours` has the lower merged q-quantile: the share
    of paired bootstrap resamples in which it does (ties count half).

    `ours` and `theirs` are per-slice histograms (`[us, calls]` pairs),
    slice i of each run back to back. Each resample draws slice indices
    with replacement, the same indices for both, and merges each side's
    drawn slices, as the run itself merges all of them."""
    rng = random.Random(seed)
    a, b = _tails(ours, q), _tails(theirs, q)
    n = len(a)
    score = 0.0
    for _ in range(resamples):
        drawn = [rng.randrange(n) for _ in range(n)]
        x, y = _merged_quantile(a, drawn, q), _merged_quantile(b, drawn, q)
        score += 1.0 if x < y else 0.5 if x == y else 0.0
    return score / resamples


def _tails(slices, q):
    """Each slice as (its calls, its `[us, calls]` pairs at or above the
    lowest q-quantile of all the slices). No merge of these slices has its
    q-quantile below that floor, so the calls under it only count."""
    floor = min(quantile_ms(h, q) for h in slices) * 1000
    return [(sum(c for _, c in h), [(v, c) for v, c in h if v >= floor]) for h in slices]


def _merged_quantile(tails, drawn, q):
    """The q-quantile (us) of the drawn slices merged, from their tails."""
    total, counts = 0, {}
    for i in drawn:
        calls, tail = tails[i]
        total += calls
        for v, c in tail:
            counts[v] = counts.get(v, 0) + c
    above = total - max(1, math.ceil(q * total))
    seen = 0
    for v in sorted(counts, reverse=True):
        seen += counts[v]
        if seen > above:
            return v
    return min(counts) if counts else 0


def median(items, key=lambda x: x):
    """The middle item of `items` by `key` (the upper one of an even count)."""
    ordered = sorted(items, key=key)
    return ordered[len(ordered) // 2]


def all_errors(reports):
    """Failed calls by status code, summed over several load reports."""
    out = {}
    for r in reports:
        for code, n in (r["errors"] or {}).items():
            out[code] = out.get(code, 0) + n
    return out


class OtlpSink:
    """An OTLP/gRPC receiver that keeps nothing (bench/otlp_sink.py, in the
    Python environment of scripts/python-env), on the load CPU."""

    def __init__(self, workdir):
        python = subprocess.run([os.path.join(ROOT, "scripts", "python-env")], check=True,
                                stdout=subprocess.PIPE, text=True).stdout.strip()
        self.port = free_port()
        self.proc = Proc([python, os.path.join(ROOT, "bench", "otlp_sink.py"), str(self.port)], LOAD_CPU,
                         os.path.join(workdir, "otlp-sink.log"))
        wait_port(self.port, proc=self.proc)

    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.proc.stop()


def telemetry(endpoint, ratio):
    """The [telemetry] table of a traced agentmesh."""
    return f'[telemetry]\notlp_endpoint = "{endpoint}"\nsample_ratio = {ratio}\n'


# A caller's traceparent with the sampled flag off: what an instrumented
# caller that does not sample sends.
UNSAMPLED = "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


def save(kind, table, results):
    """Writes a report to bench/results/: the Markdown table and the raw
    JSON, named by the local time and `kind` (YYYY-MM-DD-HHMM-kind)."""
    out = os.path.join(ROOT, "bench", "results")
    os.makedirs(out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    path = os.path.join(out, f"{stamp}-{kind}")
    with open(path + ".md", "w") as f:
        f.write(table)
    with open(path + ".json", "w") as f:
        json.dump(results, f, indent=1)
    log(f"saved to bench/results/{stamp}-{kind}.md and .json")


def workdir():
    return tempfile.mkdtemp(prefix="agentmesh-bench-")
