"""A client that disappears: its queued tasks are dropped after its lease, the node stays healthy."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import wait_for
from pydist import ClusterExecutor, LocalCluster, security

pytestmark = [pytest.mark.timeout(90), pytest.mark.one_python]

CLIENT = textwrap.dedent("""
    import sys, threading, time
    from pydist import ClusterExecutor
    ex = ClusterExecutor(address=sys.argv[1], secret=sys.argv[2].encode())
    fs = [ex.submit(time.sleep, 0.2) for _ in range(200)]
    print("SUBMITTED", flush=True)
    threading.Event().wait(600)   # until the test kills us
""")


def test_vanished_client_tasks_are_dropped_after_its_lease():
    with LocalCluster(nodes=1, workers_per_node=1, node_args=["--client-lease", "2"]) as c:
        p = subprocess.Popen([sys.executable, "-c", CLIENT, c.address, c.secret.decode()],
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            assert p.stdout.readline().strip() == b"SUBMITTED"
            node = security.connect(c.address, secret=c.secret)
            try:
                wait_for(lambda: node.status()["queued"] > 100, 10, "the client's tasks to be queued")
                os.kill(p.pid, signal.SIGKILL)
                p.wait(10)
                st = wait_for(lambda: (lambda s: s if s["queued"] == 0 and s["clients"] == 0 else None)(
                    node.status()), 20, "the node to drop the vanished client's tasks")
                assert st["done"] < 100       # far from all 200 ran: they were dropped, not run
            finally:
                node._pyroRelease()
            with ClusterExecutor(address=c.address, secret=c.secret) as ex:   # and it serves others
                assert list(ex.map(abs, [-1, -2, -3])) == [1, 2, 3]
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
