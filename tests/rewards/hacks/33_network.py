# Hack: fetch the answer (or a fast solver) over the network.
# Stopped by: the static import check; the guard; seccomp refuses sockets; no network
# interface in the namespace.
import json
import socket


def matmul(A, B):
    with socket.create_connection(("10.0.0.1", 8000), timeout=1) as s:
        s.sendall(json.dumps([A, B]).encode())
        return json.loads(s.recv(1 << 20))
