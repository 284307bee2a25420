"""Relay benchmark: many connected devices drive the real server through the real protocol.

    .venv/bin/python bench/relay_bench.py [--devices 1000] [--seconds 15] [--rate 2000]
                                          [--idle 10000] [--procs 1] [--runs 3]

It seeds accounts and devices straight into a fresh SQLite database (synchronous=FULL), starts
`medrelay-server serve` on 127.0.0.1 pinned to CPU 1, and runs load-generator processes pinned to
CPU 0 that log in as devices (hello, welcome, auth with the device key) and exchange
pre-encrypted 512-byte envelopes: half the devices send to the other half, every recipient
acknowledges each `deliver` frame at once. Phases:

- throughput: every sender keeps a pipeline of sends in flight; delivered envelopes per second
  counted at the recipients over the measurement window;
- latency: a fixed total rate (2,000 envelopes/s); send-to-deliver latency from a timestamp in
  the payload (p50, p99);
- idle: that many devices connected and authenticated, then the server's resident memory;
- ceiling: the same throughput pattern against `bench/minimal_relay.py` (length-prefixed frames,
  no storage) and our ratio to it.

Every figure is the median of `--runs` runs; the load generators' CPU use is reported so it is
visible when they, not the server, are the limit. Every loop is bounded in count and time; all
traffic is on 127.0.0.1; only processes this script started are stopped, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
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
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadclient import Device, free_port, seed

from medrelay.protocol.frames import encode_frame
from medrelay.protocol.messages import Ack, Deliver, Error, Sent

REPO = Path(__file__).resolve().parent.parent
PAYLOAD_SIZE = 512
SERVER_CPU = 1
LOAD_CPU = 0
CONNECT_TIMEOUT_S = 120.0
PHASE_GRACE_S = 30.0


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


# -- the server under test ------------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

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
                await asyncio.wait_for(frames(reader), 1.0)
            except TimeoutError:
                continue
            now = time.monotonic()
            writer.write(struct.pack(">II", 4 + 8, 0) + b"\x00" * 8)  # the acknowledgement
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
    cpu0 = server.cpu_s()
    buckets0 = server.latency_buckets()
    t0 = time.monotonic()
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
        for part in split(pairs, args.procs)
    ]
    results = run_load(
        jobs, timeout_s=CONNECT_TIMEOUT_S + args.seconds + args.warmup + PHASE_GRACE_S
    )
    wall = time.monotonic() - t0
    server_cpu = server.cpu_s() - cpu0
    buckets1 = server.latency_buckets()
    delivered = sum(r["delivered"] for r in results)
    latencies = sorted(x for r in results for x in r["latencies_ms"])
    out = {
        "delivered_per_s": delivered / args.seconds,
        "server_cpu_pct": 100 * server_cpu / wall,
        "load_cpu_pct": 100 * sum(r["cpu_s"] for r in results) / max(r["wall_s"] for r in results),
        "errors": float(sum(len(r["errors"]) for r in results)),
        "server_rss_mib": server.rss_mib(),
    }
    if latencies:
        out["p50_ms"] = latencies[len(latencies) // 2]
        out["p99_ms"] = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        # The server's share: storing an envelope to pushing it (warm-up included).
        out["server_p50_ms"] = bucket_quantile(buckets0, buckets1, 0.50)
        out["server_p99_ms"] = bucket_quantile(buckets0, buckets1, 0.99)
    return out


def idle_phase(server: Server, args: argparse.Namespace, clinic: str) -> dict[str, float]:
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
                seed(f"sqlite:///{data_dir / 'medrelay.db'}", args.devices + args.idle)
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
        "throughput_load_cpu_pct": median("throughput", "load_cpu_pct"),
        "throughput_server_rss_mib": median("throughput", "server_rss_mib"),
        "latency_rate_delivered_per_s": median("latency", "delivered_per_s"),
        "latency_p50_ms": median("latency", "p50_ms"),
        "latency_p99_ms": median("latency", "p99_ms"),
        "latency_server_p50_ms": median("latency", "server_p50_ms"),
        "latency_server_p99_ms": median("latency", "server_p99_ms"),
        "latency_server_cpu_pct": median("latency", "server_cpu_pct"),
        "latency_load_cpu_pct": median("latency", "load_cpu_pct"),
        "idle_connected": median("idle", "connected"),
        "idle_rss_peak_mib": median("idle", "rss_peak_mib"),
        "ceiling_delivered_per_s": median("ceiling", "rate"),
        "ceiling_load_cpu_pct": median("ceiling", "load_cpu_pct"),
        "errors": sum(f.get("errors", 0.0) for p in ("throughput", "latency") for f in figures[p]),
    }
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
