"""A pool of 2 gloo worker processes for the megatron and reliability tests (the session fixture
``gloo_pool`` in tests/conftest.py starts one per session).

Starting the two processes (and importing megatron.core in each) costs ~5 s, so it happens once per
session; each test then sends a module-level function to both ranks and gets both results back.
"""

import os
import pickle
import secrets
import socket
import subprocess
import sys
from multiprocessing.connection import Listener
from pathlib import Path

import pytest

WORLD = 2
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GlooPool:
    def __init__(self) -> None:
        authkey = secrets.token_hex(16)
        self._listener = Listener(("127.0.0.1", 0), authkey=authkey.encode())
        ctl_port = self._listener.address[1]
        env = dict(os.environ, DPKD_TEST_AUTHKEY=authkey, OMP_NUM_THREADS="1")
        worker = str(Path(__file__).with_name("_worker.py"))
        dist_port = _free_port()
        self._procs = [
            subprocess.Popen([sys.executable, worker, str(r), str(WORLD), str(dist_port), str(ctl_port)], env=env)
            for r in range(WORLD)
        ]
        conns = [self._listener.accept() for _ in range(WORLD)]
        ranks = [c.recv() for c in conns]
        self._conns = [c for _, c in sorted(zip(ranks, conns, strict=True), key=lambda rc: rc[0])]

    def run(self, fn, *args, tp: int = 2, **kwargs):
        """Run module-level ``fn(*args, **kwargs)`` on every rank under tensor parallel size ``tp``;
        returns the list of per-rank results."""
        task = (fn.__code__.co_filename, fn.__name__, args, kwargs, tp)
        for c in self._conns:
            c.send_bytes(pickle.dumps(task))
        results, errors = [], []
        for rank, c in enumerate(self._conns):
            if not c.poll(TIMEOUT_S):
                self.close()
                raise RuntimeError(f"rank {rank} did not answer within {TIMEOUT_S} s (hung collective?)")
            status, value = pickle.loads(c.recv_bytes())
            (results if status == "ok" else errors).append(value if status == "ok" else f"[rank {rank}] {value}")
        if errors:
            pytest.fail("\n".join(errors), pytrace=False)
        return results

    def close(self) -> None:
        for c in self._conns:
            try:
                c.send_bytes(pickle.dumps(None))
            except OSError:
                pass
        for p in self._procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        self._listener.close()
