"""Chart <-> program contract, with the real binaries when they are built.

Runs `node-agent ca` with exactly the environment the chart gives the CA
container (ports and paths moved to a temp dir / localhost) and the Secret the
chart generates, then checks what ztunnel relies on: the CA serves TLS with a
certificate that verifies against the chart's published root
(`istio-ca-root-cert`) for the host name in ztunnel's `CA_ADDRESS`, with ALPN
h2 (gRPC). The Kubernetes API is unreachable on purpose: the CA must still
start (it retries its pod watch); readiness is not asserted.

Skipped, with the reason, when target/debug/node-agent is not built
(`make test` builds it first).
"""

from __future__ import annotations

import base64
import errno
import os
import socket
import ssl
import subprocess
import tempfile
import time
import unittest
from pathlib import Path
from urllib.parse import urlparse

from chart_render import REPO, load_chart, render

NODE_AGENT = Path(os.environ.get("NODE_AGENT_BIN", REPO / "target" / "debug" / "node-agent"))

KUBECONFIG_UNREACHABLE = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "http://127.0.0.1:1"}}]
users: [{name: u, user: {token: unused}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
"""


_next_port = 20_000 + os.getpid() * 97 % 10_000


def _bindable(family: socket.AddressFamily, host: str, port: int) -> bool:
    try:
        with socket.socket(family) as s:
            s.bind((host, port))
        return True
    except OSError as e:
        # No IPv6 on this machine: only IPv4 can conflict.
        return family == socket.AF_INET6 and e.errno != errno.EADDRINUSE


def free_port() -> int:
    """A port below the kernel's ephemeral range that nothing is bound to.

    Port 0 would hand out an ephemeral port, which any outgoing connection may
    take before the CA binds it (seen in CI: READY_PORT "Address already in
    use"). Same rule as e2e::free_port in Rust.
    """
    global _next_port
    try:
        end = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        end = 32_768
    end = max(end, 21_000)
    for _ in range(end - 20_000):
        port = _next_port
        _next_port = 20_000 + (_next_port + 1 - 20_000) % (end - 20_000)
        if _bindable(socket.AF_INET, "0.0.0.0", port) and _bindable(socket.AF_INET6, "::", port):
            return port
    raise RuntimeError("no free TCP port below the ephemeral range")


@unittest.skipUnless(NODE_AGENT.exists(), f"{NODE_AGENT} not built (make test builds the binaries first)")
class BuiltInCaWithChartConfig(unittest.TestCase):
    def test_ca_serves_tls_trusted_by_the_published_root(self):
        r = render(load_chart())
        with tempfile.TemporaryDirectory(prefix="gm-ca-") as tmp:
            certs = Path(tmp) / "cacerts"
            certs.mkdir()
            for key, value in r.get("Secret", "mesh-ca-certs")["data"].items():
                (certs / key).write_bytes(base64.b64decode(value))
            root_pem = r.get("ConfigMap", "istio-ca-root-cert")["data"]["root-cert.pem"]
            (Path(tmp) / "root-cert.pem").write_text(root_pem)
            kubeconfig = Path(tmp) / "kubeconfig"
            kubeconfig.write_text(KUBECONFIG_UNREACHABLE)

            env = r.env("Deployment", "mesh-ca", "ca")
            grpc, ready, metrics = free_port(), free_port(), free_port()
            self.assertEqual(env["CA_LISTEN_ADDR"], "[::]:15012")
            env.update(
                CA_CERT_DIR=str(certs),
                CA_LISTEN_ADDR=f"127.0.0.1:{grpc}",
                READY_PORT=str(ready),
                METRICS_PORT=str(metrics),
                POD_NAME="mesh-ca-test",
                POD_NAMESPACE="istio-system",
                KUBECONFIG=str(kubeconfig),
                PATH="/usr/bin:/bin",
                NO_COLOR="1",
            )
            ca_host = urlparse(r.env("DaemonSet", "ztunnel", "istio-proxy")["CA_ADDRESS"]).hostname
            log = Path(tmp) / "ca.log"
            with open(log, "w") as out:
                proc = subprocess.Popen([str(NODE_AGENT), "ca"], env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                ctx = ssl.create_default_context(cafile=str(Path(tmp) / "root-cert.pem"))
                ctx.set_alpn_protocols(["h2"])
                deadline = time.monotonic() + 20
                last_error: Exception | None = None
                while time.monotonic() < deadline:
                    if proc.poll() is not None:
                        self.fail(f"node-agent ca exited {proc.returncode}: {log.read_text()[-2000:]}")
                    try:
                        with socket.create_connection(("127.0.0.1", grpc), timeout=2) as sock:
                            with ctx.wrap_socket(sock, server_hostname=ca_host) as tls:
                                self.assertEqual(tls.selected_alpn_protocol(), "h2")
                                self.assertEqual(tls.version(), "TLSv1.3")
                                break
                    except (ConnectionRefusedError, socket.timeout) as e:
                        last_error = e
                        time.sleep(0.2)
                else:
                    self.fail(f"CA not serving on {grpc} within 20 s ({last_error}): {log.read_text()[-2000:]}")
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


if __name__ == "__main__":
    unittest.main()
