"""A real S3 API on 127.0.0.1 (moto's server), and a TCP proxy that cuts connections, for
the object-store tests and the benchmark."""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


class LocalS3:
    """moto's S3 server on a free port of 127.0.0.1; `env()` points segreplay at it."""

    def __init__(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """Variables as the AWS CLI reads them; no profile file is looked at."""
        return {
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def bucket(self, name: str) -> str:
        """The bucket `name`, made if new."""
        try:
            self.client.create_bucket(Bucket=name)
        except self.client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def upload_tree(self, bucket: str, root: Path, prefix: str) -> list[str]:
        """Every file under `root` as `prefix/<relative path>`; the bucket is made if new."""
        self.bucket(bucket)
        keys = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            key = f"{prefix}/{path.relative_to(root).as_posix()}"
            self.client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
            keys.append(key)
        return keys

    def stop(self) -> None:
        self._server.stop()


class CuttingProxy:
    """Forwards 127.0.0.1:port to `target`; once armed, cuts the connection after the
    server has sent `after` more bytes, `times` times over. Records each request's head."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit("//", 1)[-1].split(":")
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._after = 0
        self._cuts_left = 0
        self._sent = 0
        self.cuts = 0
        self.requests: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, after: int, times: int) -> None:
        with self._lock:
            self._after, self._cuts_left, self._sent = after, times, 0

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._target)
            threading.Thread(target=self._upstream, args=(client, server), daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client), daemon=True).start()

    def _upstream(self, client: socket.socket, server: socket.socket) -> None:
        try:
            while data := client.recv(65536):
                if data[:4] in (b"GET ", b"HEAD", b"PUT "):
                    with self._lock:
                        self.requests.append(data.split(b"\r\n\r\n", 1)[0])
                server.sendall(data)
        except OSError:
            pass
        finally:
            _close(server)

    def _downstream(self, server: socket.socket, client: socket.socket) -> None:
        try:
            while data := server.recv(16384):
                with self._lock:
                    cut = self._cuts_left > 0 and self._sent + len(data) > self._after
                    if cut:
                        data = data[: self._after - self._sent]
                        self._cuts_left -= 1
                        self._sent = 0
                        self.cuts += 1
                    elif self._cuts_left > 0:
                        self._sent += len(data)
                client.sendall(data)
                if cut:
                    break
        except OSError:
            pass
        finally:
            _close(client)
            _close(server)

    def close(self) -> None:
        self._listener.close()


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
