"""Relay benchmark: many connected devices drive the real server through the real protocol.

    .venv/bin/python bench/relay_bench.py [--devices 1000] [--seconds 15] [--rate 2000]
                                          [--idle 10000] [--procs 1] [--runs 3]
                                          [--loadgen c|python]

It seeds accounts and devices straight into a fresh SQLite database (synchronous=FULL), starts
`medrelay-server serve` on 127.0.0.1 pinned to CPU 1, and runs load-generator processes pinned to
CPU 0 that log in as devices and exchange pre-encrypted 512-byte envelopes: half the devices send
to the other half, every recipient acknowledges each `deliver` frame at once.

Load generators (`--loadgen`):

- `c` (default): bench/loadgen/loadgen.c, compiled on first use with `gcc -O2` into
  ~/.cache/medrelay-bench/ (keyed by the source's hash; nothing is built in the tree). One
  epoll loop drives all connections. This script does the protocol work that needs the codec and
  writes it into a plan file: session tokens are seeded into the database with the devices, so the
  tool logs in with `hello` and `resume` (no signatures); each sender gets a ready-made
  deterministic-CBOR `send` frame whose message id, rid and payload timestamp the tool overwrites.
  Recipients check exactly-once, in-order delivery from a counter in the payload, and the tool
  drains (waits for every send to be answered and delivered) after the window.
- `python`: bench/loadclient.py on asyncio (hello, welcome, auth with the device key). It tops
  out near 100% of one core at a few thousand envelopes/s, below the server: kept for comparison.

Phases:

- throughput: every sender keeps a pipeline of sends in flight; delivered envelopes per second
  counted at the recipients over the measurement window;
- latency: a fixed total rate (2,000 envelopes/s); send-to-deliver latency from a timestamp in
  the payload (p50, p99);
- idle: that many devices connected and authenticated, then the server's resident memory;
- ceiling: the same throughput pattern against `bench/minimal_relay.py` (length-prefixed frames,
  no storage) and our ratio to it. Recipients acknowledge to an id no client has (NO_CLIENT) and
  ignore the relay's 8-byte answers to their acknowledgements.

Every figure is the median of `--runs` runs. CPU: `*_server_cpu_pct` spans the whole phase
(logins and drain included); with `c` the tool announces its window, so `*_server_window_cpu_pct`
is the server (or minimal relay) over exactly the window. The load generators' CPU use (over the
load period, warm-up included; `*_load_window_cpu_pct` over the window alone, `c` only) is
reported so it is visible when they, not the server, are the limit: with one load process on one
core, anything near 100% means the figure measures the load generator. With `c`,
`lost_or_duplicated` sums answered sends never delivered and deliveries seen twice (0 when
sound). Every loop is bounded in count and time; all traffic is on 127.0.0.1; only processes
this script started are stopped, by PID.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import hashlib
import json
import multiprocessing as mp
import os
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadclient import Device, free_port, seed, seed_sessions, session_token, username

from medrelay.protocol.frames import encode_frame
from medrelay.protocol.messages import (
    Ack,
    Deliver,
    Error,
    Hello,
    OutboundEnvelope,
    Resume,
    Send,
    Sent,
)

REPO = Path(__file__).resolve().parent.parent
PAYLOAD_SIZE = 512
SERVER_CPU = 1
LOAD_CPU = 0
CONNECT_TIMEOUT_S = 120.0
PHASE_GRACE_S = 30.0
DRAIN_S = 5.0
IDLE_HOLD_S = 5.0
LOGIN_CONCURRENCY = 100  # connections logging in at once (the C tool)
NO_CLIENT = 0xFFFFFFFF  # minimal relay: a destination no client registers (acknowledgements)


# -- load-generator processes ---------------------------------------------------------------


@dataclass
class LoadResult:
    delivered: int = 0
    window_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)


def payload(now_ns: int, filler: bytes) -> bytes:
    return struct.pack(">Q", now_ns) + filler


async def _run_pairs(
    pairs: Sequence[tuple[int, int]],
    port: int,
    clinic: str,
    mode: str,
    seconds: float,
    warmup: float,
    rate: float,
    depth: int,
) -> LoadResult:
    result = LoadResult()
    filler = os.urandom(PAYLOAD_SIZE - 8)
    logins = [Device.login(i, port, clinic) for pair in pairs for i in pair]
    connected: list[Device] = list(
        await asyncio.wait_for(asyncio.gather(*logins), CONNECT_TIMEOUT_S)
    )
    senders = connected[0::2]
    receivers = connected[1::2]
    start = time.monotonic()
    window_start = start + warmup
    deadline = window_start + seconds
    stop = asyncio.Event()
    counts = {"delivered": 0}

    async def receive(device: Device) -> None:
        while not stop.is_set():
            try:
                messages = await asyncio.wait_for(device.messages(), 1.0)
            except TimeoutError:
                continue
            now_mono = time.monotonic()
            now_ns = time.time_ns()
            for message in messages:
                if isinstance(message, Deliver):
                    device.ws.send(encode_frame(Ack(seqs=tuple(i.seq for i in message.items))))
                    if window_start <= now_mono <= deadline:
                        counts["delivered"] += len(message.items)
                        if mode == "latency":
                            for item in message.items:
                                sent_ns = struct.unpack_from(">Q", item.ciphertext or b"")[0]
                                result.latencies_ms.append((now_ns - sent_ns) / 1e6)

    async def pipeline(sender: Device, to: int) -> None:
        sender.ws.send(
            b"".join(sender.send_frame(to, payload(time.time_ns(), filler)) for _ in range(depth))
        )
        while not stop.is_set():
            try:
                messages = await asyncio.wait_for(sender.messages(), 1.0)
            except TimeoutError:
                continue
            answered = 0
            for message in messages:
                if isinstance(message, Sent):
                    answered += 1
                elif isinstance(message, Error):
                    result.errors.append(message.code)
            if answered and time.monotonic() < deadline:
                # Like a client with a backlog: the next sends go out in one message.
                sender.ws.send(
                    b"".join(
                        sender.send_frame(to, payload(time.time_ns(), filler))
                        for _ in range(answered)
                    )
                )

    async def paced(all_senders: list[tuple[Device, int]]) -> None:
        interval = 1.0 / rate
        next_at = time.monotonic()
        k = 0
        while time.monotonic() < deadline and not stop.is_set():
            sender, to = all_senders[k % len(all_senders)]
            sender.send(to, payload(time.time_ns(), filler))
            k += 1
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def drain(sender: Device) -> None:
        while not stop.is_set():
            try:
                for message in await asyncio.wait_for(sender.messages(), 1.0):
                    if isinstance(message, Error):
                        result.errors.append(message.code)
            except TimeoutError:
                continue

    tasks = [asyncio.ensure_future(receive(r)) for r in receivers]
    pairs_devices = [(s, r.index) for s, r in zip(senders, receivers, strict=True)]
    if mode == "throughput":
        tasks += [asyncio.ensure_future(pipeline(s, to)) for s, to in pairs_devices]
    else:
        tasks += [asyncio.ensure_future(drain(s)) for s, _ in pairs_devices]
        tasks.append(asyncio.ensure_future(paced(pairs_devices)))
    cpu0 = time.process_time()
    await asyncio.sleep(max(0.0, deadline - time.monotonic()) + 0.5)
    result.cpu_s = time.process_time() - cpu0
    result.wall_s = time.monotonic() - start
    stop.set()
    await asyncio.wait(tasks, timeout=3)
    for task in tasks:
        task.cancel()
    for device in connected:
        device.ws.close()
    result.delivered = counts["delivered"]
    result.window_s = seconds
    return result


async def _run_idle(indices: Sequence[int], port: int, clinic: str, hold_s: float) -> LoadResult:
    result = LoadResult()
    connected: list[Device] = []
    for start in range(0, len(indices), 200):  # bounded concurrency while logging in
        batch = [Device.login(i, port, clinic) for i in indices[start : start + 200]]
        connected += await asyncio.wait_for(asyncio.gather(*batch), CONNECT_TIMEOUT_S)
    result.delivered = len(connected)
    await asyncio.sleep(hold_s)
    for device in connected:
        device.ws.close()
    return result


def _load_process(job: dict[str, Any], queue: mp.Queue[dict[str, Any]]) -> None:
    os.sched_setaffinity(0, {LOAD_CPU})
    try:
        if job["mode"] == "idle":
            result = asyncio.run(
                _run_idle(job["indices"], job["port"], job["clinic"], job["hold_s"])
            )
        else:
            result = asyncio.run(
                _run_pairs(
                    job["pairs"],
                    job["port"],
                    job["clinic"],
                    job["mode"],
                    job["seconds"],
                    job["warmup"],
                    job["rate"],
                    job["depth"],
                )
            )
        queue.put(result.__dict__)
    except Exception as exc:  # reported, not swallowed: the phase fails loudly
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def run_load(jobs: list[dict[str, Any]], timeout_s: float) -> list[dict[str, Any]]:
    context = mp.get_context("spawn")
    queue: mp.Queue[dict[str, Any]] = context.Queue()
    processes = [context.Process(target=_load_process, args=(job, queue)) for job in jobs]
    for process in processes:
        process.start()
    results = [queue.get(timeout=timeout_s) for _ in processes]
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"load generator failed: {errors[0]}")
    return results


# -- the compiled load generator (bench/loadgen/loadgen.c) -----------------------------------

LOADGEN_SOURCE = REPO / "bench" / "loadgen" / "loadgen.c"
# Markers the plan writer finds in an encoded template; the tool overwrites them per send.
_ID_MARKER = bytes(range(0xA0, 0xB0))
_STAMP_MARKER = bytes(range(0xC0, 0xD0))  # 8-byte send time, then 8-byte counter
_RID_TEMPLATE = 0x10000  # rids stay in [2^16, 2^32): always a 4-byte CBOR uint (head 0x1a)


def build_loadgen() -> Path:
    """Compile loadgen.c once per source version into the user's cache directory."""
    source = LOADGEN_SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medrelay-bench"
    binary = cache / f"loadgen-{digest}"
    if binary.exists():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f".loadgen-{digest}.{os.getpid()}"
    try:
        subprocess.run(
            ["gcc", "-O2", "-Wall", "-Wextra", "-o", str(partial), str(LOADGEN_SOURCE)],
            check=True,
            timeout=120,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(f"cannot build {LOADGEN_SOURCE} ({exc}); try --loadgen python") from exc
    partial.replace(binary)  # atomic: a concurrent run sees the whole binary or none
    return binary


def _offset(frame: bytes, marker: bytes) -> int:
    at = frame.find(marker)
    if at < 0 or frame.find(marker, at + 1) >= 0:
        raise ValueError("template marker not found exactly once")
    return at


def send_template(to: int, filler: bytes) -> tuple[bytes, int, int, int]:
    """A `send` frame to device "d" of user `to`, and the offsets of its message id, payload
    stamp (time and counter) and rid, for the C tool to overwrite."""
    frame = encode_frame(
        Send(
            rid=_RID_TEMPLATE,
            message_id=_ID_MARKER,
            envelopes=(OutboundEnvelope(username(to), "d", _STAMP_MARKER + filler),),
        )
    )
    rid_key = b"\x63rid\x1a" + _RID_TEMPLATE.to_bytes(4, "big")
    return (
        frame,
        _offset(frame, _ID_MARKER),
        _offset(frame, _STAMP_MARKER),
        _offset(frame, rid_key) + 5,
    )


def _plan_head(mode: str, port: int, args: argparse.Namespace, samples: Path) -> list[str]:
    return [
        "loadgen-plan 1",
        f"mode {mode}",
        f"port {port}",
        "path /v1/ws",
        f"seconds {args.seconds}",
        f"warmup {args.warmup}",
        f"rate {args.rate / args.procs}",
        f"depth {args.depth}",
        f"hold {IDLE_HOLD_S}",
        f"drain {DRAIN_S}",
        f"connect_timeout {CONNECT_TIMEOUT_S}",
        f"login_concurrency {LOGIN_CONCURRENCY}",
        f"samples {samples}",
    ]


def _hello_line() -> str:
    return f"hello {encode_frame(Hello(versions=(1,), agent='relay-bench-c')).hex()}"


def _resume_hex(index: int) -> str:
    return encode_frame(Resume(rid=1, token=session_token(index))).hex()


def pairs_plan(
    mode: str, pairs: Sequence[tuple[int, int]], port: int, args: argparse.Namespace, samples: Path
) -> str:
    filler = os.urandom(PAYLOAD_SIZE - len(_STAMP_MARKER))
    lines = [*_plan_head(mode, port, args, samples), _hello_line()]
    for sender, recipient in pairs:
        frame, id_off, ts_off, rid_off = send_template(recipient, filler)
        lines.append(f"conn S {_resume_hex(sender)} {frame.hex()} {id_off} {ts_off} {rid_off}")
        lines.append(f"conn R {_resume_hex(recipient)} - -1 -1 -1")
    return "\n".join(lines) + "\n"


def idle_plan(indices: Sequence[int], port: int, args: argparse.Namespace) -> str:
    lines = [*_plan_head("idle", port, args, Path("-")), _hello_line()]
    lines += [f"conn I {_resume_hex(i)} - -1 -1 -1" for i in indices]
    return "\n".join(lines) + "\n"


def minimal_plan(port: int, offset: int, pairs: int, args: argparse.Namespace) -> str:
    """bench/minimal_relay.py: each client's first frame is its id; a sender's frame is
    `destination ‖ stamp ‖ filler`; a recipient acknowledges to NO_CLIENT."""
    filler = os.urandom(PAYLOAD_SIZE - len(_STAMP_MARKER))
    ack = struct.pack(">II", 4 + 8, NO_CLIENT) + bytes(8)
    lines = [*_plan_head("minimal", port, args, Path("-")), f"ack {ack.hex()}"]
    for k in range(pairs):
        sender, recipient = offset + 2 * k, offset + 2 * k + 1
        frame = struct.pack(">II", 4 + PAYLOAD_SIZE, recipient) + _STAMP_MARKER + filler
        lines.append(f"conn S {struct.pack('>II', 4, sender).hex()} {frame.hex()} -1 8 -1")
        lines.append(f"conn R {struct.pack('>II', 4, recipient).hex()} - -1 -1 -1")
    return "\n".join(lines) + "\n"


def start_c_load(binary: Path, plan: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(binary), str(plan)],
        stdout=subprocess.PIPE,
        preexec_fn=lambda: os.sched_setaffinity(0, {LOAD_CPU}),  # noqa: PLW1509
    )


def finish_c_load(
    process: subprocess.Popen[bytes],
    timeout_s: float,
    on_event: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The tool's JSON result (the LoadResult fields plus its own checks). Its "event" lines
    (window_start, window_end) go to `on_event` as they come."""
    assert process.stdout is not None
    watchdog = threading.Timer(timeout_s, process.kill)
    watchdog.start()
    try:
        body = []
        for line in process.stdout:  # ends when the tool exits (or the watchdog kills it)
            if line.startswith(b"event "):
                if on_event is not None:
                    on_event(line.split()[1].decode())
            else:
                body.append(line)
        process.wait()
    finally:
        watchdog.cancel()
    try:
        result: dict[str, Any] = json.loads(b"".join(body))
    except ValueError:
        raise RuntimeError(f"load generator exited {process.returncode} without a result") from None
    if "fatal" in result:
        raise RuntimeError(f"load generator failed: {result['fatal']} ({result['error_kinds']})")
    return result


def run_c_load(
    plans: list[str],
    tmp: Path,
    timeout_s: float,
    on_event: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run one tool process per plan (all pinned to LOAD_CPU); results with `latencies_ms`.
    The first process's window events go to `on_event`."""
    binary = build_loadgen()
    processes = []
    for k, text in enumerate(plans):
        plan = tmp / f"plan-{k}.txt"
        plan.write_text(text)
        processes.append(start_c_load(binary, plan))
    results = [
        finish_c_load(p, timeout_s, on_event if k == 0 else None) for k, p in enumerate(processes)
    ]
    for k, result in enumerate(results):
        samples = tmp / f"samples-{k}.bin"
        latencies = array.array("I")
        if samples.exists():
            latencies.frombytes(samples.read_bytes())
        result["latencies_ms"] = [x / 1000 for x in latencies]
    return results


# -- the server under test ------------------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    """User and system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_s(self) -> float:
        return process_cpu_s(self.pid)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def latency_buckets(self) -> dict[float, float]:
        """The server's own send-to-deliver histogram: cumulative counts by upper bound."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        buckets: dict[float, float] = {}
        for match in _BUCKET_LINE.finditer(text):
            buckets[float(match["le"])] = float(match["count"])
        return buckets

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_BUCKET_LINE = re.compile(
    r'^medrelay_send_to_deliver_seconds_bucket\{le="(?P<le>[^"]+)"\} (?P<count>\S+)$', re.M
)


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """Quantile (ms) of the observations between two scrapes, interpolated within its bucket
    as Prometheus's histogram_quantile does."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return float("nan")
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if bound == float("inf"):
                return lower * 1000
            share = (rank - below) / max(cumulative - below, 1e-9)
            return (lower + (bound - lower) * share) * 1000
        lower, below = bound, cumulative
    return lower * 1000


def start_medrelay(data_dir: Path, clinic: str) -> Server:
    port, metrics_port = free_port(), free_port()
    env = dict(os.environ, MEDRELAY_SERVER_CLINIC_ID=clinic, MEDRELAY_LOGGING_LEVEL="warn")
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from medrelay.server.main import main; main()",
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(data_dir / "server.log", "wb"),  # noqa: SIM115 (kept for the process's life)
        preexec_fn=lambda: os.sched_setaffinity(0, {SERVER_CPU}),  # noqa: PLW1509
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited; see {data_dir / 'server.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return Server(process, port, metrics_port)
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not become healthy in 60 s")


def start_minimal(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "minimal_relay.py"), str(port)],
        preexec_fn=lambda: os.sched_setaffinity(0, {SERVER_CPU}),  # noqa: PLW1509
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("minimal relay did not start")


async def _minimal_pairs(
    port: int, offset: int, pairs: int, seconds: float, warmup: float, depth: int
) -> dict[str, float]:
    filler = os.urandom(PAYLOAD_SIZE - 8)
    streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2 * pairs)]
    for i, (_, writer) in enumerate(streams):
        writer.write(struct.pack(">II", 4, offset + i))
    await asyncio.sleep(0.5)
    start = time.monotonic()
    window_start, deadline = start + warmup, start + warmup + seconds
    counts = {"delivered": 0}
    stop = asyncio.Event()

    async def frames(reader: asyncio.StreamReader) -> bytes:
        (n,) = struct.unpack(">I", await reader.readexactly(4))
        return await reader.readexactly(n)

    async def sender(i: int) -> None:
        reader, writer = streams[2 * i]
        frame = struct.pack(">II", 4 + PAYLOAD_SIZE, offset + 2 * i + 1)
        for _ in range(depth):
            writer.write(frame + struct.pack(">Q", time.time_ns()) + filler)
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(frames(reader), 1.0)
            except TimeoutError:
                continue
            writer.write(frame + struct.pack(">Q", time.time_ns()) + filler)

    async def receiver(i: int) -> None:
        reader, writer = streams[2 * i + 1]
        while not stop.is_set():
            try:
                frame = await asyncio.wait_for(frames(reader), 1.0)
            except TimeoutError:
                continue
            if len(frame) == 8:
                # The relay's answer to our own acknowledgement, not a delivery. (Counting and
                # acknowledging it, and acknowledging to id 0, a sender, made an endless echo.)
                continue
            now = time.monotonic()
            writer.write(struct.pack(">II", 4 + 8, NO_CLIENT) + b"\x00" * 8)  # the acknowledgement
            if window_start <= now <= deadline:
                counts["delivered"] += 1

    tasks = [asyncio.ensure_future(sender(i)) for i in range(pairs)]
    tasks += [asyncio.ensure_future(receiver(i)) for i in range(pairs)]
    cpu0 = time.process_time()
    await asyncio.sleep(deadline - time.monotonic() + 0.5)
    cpu = time.process_time() - cpu0
    stop.set()
    await asyncio.wait(tasks, timeout=3)
    for task in tasks:
        task.cancel()
    for _, writer in streams:
        writer.close()
    return {"rate": counts["delivered"] / seconds, "cpu_s": cpu, "wall_s": time.monotonic() - start}


def _minimal_process(job: dict[str, Any], queue: mp.Queue[dict[str, Any]]) -> None:
    os.sched_setaffinity(0, {LOAD_CPU})
    queue.put(
        asyncio.run(
            _minimal_pairs(
                job["port"],
                job["offset"],
                job["pairs"],
                job["seconds"],
                job["warmup"],
                job["depth"],
            )
        )
    )


# -- phases ---------------------------------------------------------------------------------


def split(items: Sequence[Any], parts: int) -> list[list[Any]]:
    return [list(items[k::parts]) for k in range(parts)]


def throughput_phase(
    server: Server, args: argparse.Namespace, clinic: str, mode: str
) -> dict[str, float]:
    pairs = [(2 * k, 2 * k + 1) for k in range(args.devices // 2)]
    timeout_s = CONNECT_TIMEOUT_S + args.seconds + args.warmup + DRAIN_S + PHASE_GRACE_S
    window: dict[str, tuple[float, float]] = {}  # event -> (server CPU s, monotonic s)

    def on_event(name: str) -> None:
        window[name] = (server.cpu_s(), time.monotonic())

    parts = split(pairs, args.procs)
    with tempfile.TemporaryDirectory(prefix="medrelay-loadgen-") as tmp_name:
        tmp = Path(tmp_name)
        if args.loadgen == "c":
            plans = [
                pairs_plan(mode, part, server.port, args, tmp / f"samples-{k}.bin")
                for k, part in enumerate(parts)
            ]
            build_loadgen()  # before the clocks start
        cpu0 = server.cpu_s()
        buckets0 = server.latency_buckets()
        t0 = time.monotonic()
        if args.loadgen == "c":
            results = run_c_load(plans, tmp, timeout_s, on_event)
        else:
            jobs = [
                {
                    "mode": mode,
                    "pairs": part,
                    "port": server.port,
                    "clinic": clinic,
                    "seconds": args.seconds,
                    "warmup": args.warmup,
                    "rate": args.rate / args.procs,
                    "depth": args.depth,
                }
                for part in parts
            ]
            results = run_load(jobs, timeout_s=timeout_s)
        wall = time.monotonic() - t0
    server_cpu = server.cpu_s() - cpu0
    buckets1 = server.latency_buckets()
    delivered = sum(r["delivered"] for r in results)
    latencies = sorted(x for r in results for x in r["latencies_ms"])
    out = {
        "delivered_per_s": delivered / args.seconds,
        "server_cpu_pct": 100 * server_cpu / wall,
        "load_cpu_pct": 100 * sum(r["cpu_s"] for r in results) / max(r["wall_s"] for r in results),
        "errors": float(sum(_error_count(r) for r in results)),
        "server_rss_mib": server.rss_mib(),
    }
    if args.loadgen == "c":
        out.update(_c_checks(results))
        if "window_start" in window and "window_end" in window:
            (cpu_a, t_a), (cpu_b, t_b) = window["window_start"], window["window_end"]
            # Over the window alone (server_cpu_pct above spans logins and the drain too).
            out["server_window_cpu_pct"] = 100 * (cpu_b - cpu_a) / max(t_b - t_a, 1e-9)
    if latencies:
        out["p50_ms"] = latencies[len(latencies) // 2]
        out["p99_ms"] = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        # The server's share: storing an envelope to pushing it (warm-up included).
        out["server_p50_ms"] = bucket_quantile(buckets0, buckets1, 0.50)
        out["server_p99_ms"] = bucket_quantile(buckets0, buckets1, 0.99)
    return out


def _error_count(result: dict[str, Any]) -> int:
    errors = result["errors"]
    return len(errors) if isinstance(errors, list) else int(errors)


def _c_checks(results: list[dict[str, Any]]) -> dict[str, float]:
    """The C tool's own figures: window CPU, and whether every answered send was delivered
    exactly once (`lost` counts answered sends never delivered, after the drain)."""
    window = max(r["window_wall_s"] for r in results)
    return {
        "load_window_cpu_pct": 100 * sum(r["window_cpu_s"] for r in results) / max(window, 1e-9),
        "sends_answered": float(sum(r["confirmed"] for r in results)),
        "delivered_total": float(sum(r["delivered_total"] for r in results)),
        "lost": float(sum(max(0, r["confirmed"] - r["delivered_total"]) for r in results)),
        "duplicates": float(sum(r["duplicates"] for r in results)),
        "gaps": float(sum(r["gaps"] for r in results)),
        "acked_seqs": float(sum(r["acked_seqs"] for r in results)),
        "drained": float(all(r["drained"] for r in results)),
    }


def idle_phase_c(server: Server, args: argparse.Namespace) -> dict[str, float]:
    before = server.rss_mib()
    indices = list(range(args.devices, args.devices + args.idle))
    binary = build_loadgen()
    with tempfile.TemporaryDirectory(prefix="medrelay-loadgen-") as tmp_name:
        tmp = Path(tmp_name)
        processes = []
        for k, part in enumerate(split(indices, max(1, args.procs))):
            plan = tmp / f"idle-{k}.txt"
            plan.write_text(idle_plan(part, server.port, args))
            processes.append(start_c_load(binary, plan))
        # Sample the server's memory while the connections are held.
        peak = before
        deadline = time.monotonic() + CONNECT_TIMEOUT_S + IDLE_HOLD_S + PHASE_GRACE_S
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            peak = max(peak, server.rss_mib())
            time.sleep(0.2)
        results = [finish_c_load(p, timeout_s=10) for p in processes]
    return {
        "connected": float(sum(r["ready"] for r in results)),
        "rss_before_mib": before,
        "rss_peak_mib": peak,
        "load_login_s": max(r["login_s"] for r in results),
        "errors": float(sum(_error_count(r) for r in results)),
    }


def idle_phase(server: Server, args: argparse.Namespace, clinic: str) -> dict[str, float]:
    if args.loadgen == "c":
        return idle_phase_c(server, args)
    before = server.rss_mib()
    indices = list(range(args.devices, args.devices + args.idle))
    jobs = [
        {"mode": "idle", "indices": part, "port": server.port, "clinic": clinic, "hold_s": 5.0}
        for part in split(indices, max(1, args.procs))
    ]
    context = mp.get_context("spawn")
    queue: mp.Queue[dict[str, Any]] = context.Queue()
    processes = [context.Process(target=_load_process, args=(job, queue)) for job in jobs]
    for process in processes:
        process.start()
    # Sample the server's memory while the connections are held.
    peak = before
    deadline = time.monotonic() + CONNECT_TIMEOUT_S + 10
    results: list[dict[str, Any]] = []
    while len(results) < len(processes) and time.monotonic() < deadline:
        peak = max(peak, server.rss_mib())
        try:
            results.append(queue.get(timeout=0.5))
        except Exception:  # noqa: S112 (queue.Empty: keep sampling)
            continue
    for process in processes:
        process.join(timeout=10)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"idle connections failed: {errors[0]}")
    connected = sum(r["delivered"] for r in results)
    return {"connected": float(connected), "rss_before_mib": before, "rss_peak_mib": peak}


def ceiling_phase(args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    process = start_minimal(port)
    try:
        context = mp.get_context("spawn")
        queue: mp.Queue[dict[str, Any]] = context.Queue()
        parts = split(list(range(args.devices // 2)), args.procs)
        offsets = [2 * sum(len(p) for p in parts[:k]) for k in range(len(parts))]
        if args.loadgen == "c":
            window: dict[str, tuple[float, float]] = {}

            def on_event(name: str) -> None:
                window[name] = (process_cpu_s(process.pid), time.monotonic())

            with tempfile.TemporaryDirectory(prefix="medrelay-loadgen-") as tmp_name:
                plans = [
                    minimal_plan(port, offset, len(part), args)
                    for part, offset in zip(parts, offsets, strict=True)
                ]
                c_results = run_c_load(
                    plans,
                    Path(tmp_name),
                    CONNECT_TIMEOUT_S + args.seconds + args.warmup + 60,
                    on_event,
                )
            out = {
                "rate": sum(r["delivered"] for r in c_results) / args.seconds,
                "load_cpu_pct": 100
                * sum(r["cpu_s"] for r in c_results)
                / max(r["wall_s"] for r in c_results),
                "errors": float(sum(_error_count(r) for r in c_results)),
            }
            out.update(_c_checks(c_results))
            if "window_start" in window and "window_end" in window:
                (cpu_a, t_a), (cpu_b, t_b) = window["window_start"], window["window_end"]
                out["server_window_cpu_pct"] = 100 * (cpu_b - cpu_a) / max(t_b - t_a, 1e-9)
            return out
        jobs = [
            {
                "port": port,
                "offset": offset,
                "pairs": len(part),
                "seconds": args.seconds,
                "warmup": args.warmup,
                "depth": args.depth,
            }
            for part, offset in zip(parts, offsets, strict=True)
        ]
        processes = [context.Process(target=_minimal_process, args=(job, queue)) for job in jobs]
        for p in processes:
            p.start()
        results = [queue.get(timeout=args.seconds + args.warmup + 60) for _ in processes]
        for p in processes:
            p.join(timeout=10)
        return {
            "rate": sum(r["rate"] for r in results),
            "load_cpu_pct": 100
            * sum(r["cpu_s"] for r in results)
            / max(r["wall_s"] for r in results),
        }
    finally:
        process.terminate()
        process.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000, help="connected devices under load")
    parser.add_argument("--seconds", type=float, default=15.0, help="measurement window")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--rate", type=float, default=2000.0, help="latency phase, envelopes/s")
    parser.add_argument("--depth", type=int, default=8, help="sends in flight per sender")
    parser.add_argument("--idle", type=int, default=10000, help="idle devices (0 to skip)")
    parser.add_argument("--procs", type=int, default=1, help="load-generator processes")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--skip-ceiling", action="store_true")
    parser.add_argument(
        "--loadgen",
        choices=("c", "python"),
        default="c",
        help="load generator: compiled bench/loadgen/loadgen.c, or asyncio (bench/loadclient.py)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    clinic = "bench.local"
    figures: dict[str, list[dict[str, float]]] = {
        "throughput": [],
        "latency": [],
        "idle": [],
        "ceiling": [],
    }
    for run in range(args.runs):
        # Each phase gets a fresh database and server: a phase must not inherit the queues
        # the one before left behind.
        phases: list[tuple[str, Any]] = [
            ("throughput", lambda server: throughput_phase(server, args, clinic, "throughput")),
            ("latency", lambda server: throughput_phase(server, args, clinic, "latency")),
        ]
        if args.idle:
            phases.append(("idle", lambda server: idle_phase(server, args, clinic)))
        for name, phase in phases:
            with tempfile.TemporaryDirectory(prefix="medrelay-bench-") as tmp:
                data_dir = Path(tmp)
                url = f"sqlite:///{data_dir / 'medrelay.db'}"
                seed(url, args.devices + args.idle)
                if args.loadgen == "c":
                    seed_sessions(url, args.devices + args.idle)
                server = start_medrelay(data_dir, clinic)
                try:
                    figures[name].append(phase(server))
                finally:
                    server.stop()
        if not args.skip_ceiling:
            figures["ceiling"].append(ceiling_phase(args))
        print(f"run {run + 1}/{args.runs} done", file=sys.stderr)

    def median(phase: str, key: str) -> float:
        values = [f[key] for f in figures[phase] if key in f]
        return statistics.median(values) if values else float("nan")

    summary = {
        "throughput_delivered_per_s": median("throughput", "delivered_per_s"),
        "throughput_server_cpu_pct": median("throughput", "server_cpu_pct"),
        "throughput_server_window_cpu_pct": median("throughput", "server_window_cpu_pct"),
        "throughput_load_cpu_pct": median("throughput", "load_cpu_pct"),
        "throughput_load_window_cpu_pct": median("throughput", "load_window_cpu_pct"),
        "throughput_server_rss_mib": median("throughput", "server_rss_mib"),
        "latency_rate_delivered_per_s": median("latency", "delivered_per_s"),
        "latency_p50_ms": median("latency", "p50_ms"),
        "latency_p99_ms": median("latency", "p99_ms"),
        "latency_server_p50_ms": median("latency", "server_p50_ms"),
        "latency_server_p99_ms": median("latency", "server_p99_ms"),
        "latency_server_cpu_pct": median("latency", "server_cpu_pct"),
        "latency_server_window_cpu_pct": median("latency", "server_window_cpu_pct"),
        "latency_load_cpu_pct": median("latency", "load_cpu_pct"),
        "latency_load_window_cpu_pct": median("latency", "load_window_cpu_pct"),
        "idle_connected": median("idle", "connected"),
        "idle_rss_peak_mib": median("idle", "rss_peak_mib"),
        "ceiling_delivered_per_s": median("ceiling", "rate"),
        "ceiling_load_cpu_pct": median("ceiling", "load_cpu_pct"),
        "ceiling_load_window_cpu_pct": median("ceiling", "load_window_cpu_pct"),
        "ceiling_server_window_cpu_pct": median("ceiling", "server_window_cpu_pct"),
        "errors": sum(f.get("errors", 0.0) for p in ("throughput", "latency") for f in figures[p]),
    }
    if args.loadgen == "c":
        # Every answered send delivered exactly once, in order, after the drain (0 when sound).
        summary["lost_or_duplicated"] = sum(
            f.get("lost", 0.0) + f.get("duplicates", 0.0)
            for p in ("throughput", "latency", "ceiling")
            for f in figures[p]
        )
    summary["ratio_to_ceiling"] = (
        summary["throughput_delivered_per_s"] / summary["ceiling_delivered_per_s"]
    )
    if args.json:
        print(json.dumps({"summary": summary, "runs": figures}, indent=2))
    else:
        for key, value in summary.items():
            print(f"{key:32} {value:12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
