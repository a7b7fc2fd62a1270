"""A TCP echo server and a client of it, in one process: not HTTP/2, so a
sidecar in transparent mode must pass it through to where it was going.

usage: echo.py LISTEN_HOST:PORT MESSAGE
Prints one JSON object: what came back, and whether the server saw it.
"""

import json
import socket
import sys
import threading


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    message = sys.argv[2].encode()
    server = socket.create_server((host, int(port)))
    seen = []

    def serve():
        conn, _ = server.accept()
        with conn:
            data = conn.recv(4096)
            seen.append(data.decode())
            conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with socket.create_connection((host, int(port)), timeout=10) as c:
        c.settimeout(10)
        c.sendall(message)
        back = c.recv(4096).decode()
    thread.join(10)
    print(json.dumps({"back": back, "server_saw": seen}))


if __name__ == "__main__":
    main()
