"""The web dashboard (issue #13): its token, its HTTP surface, and the page in a real headless Chromium.

The browser test loads the page of a running 4-node LocalCluster and checks what a person would look at:
every node drawn, the done counter and the task-stream chart moving while tasks run, a failure with its
traceback, and that a request without the token is refused (403).  It saves a screenshot as an artifact
(``$PYDIST_ARTIFACTS/dashboard.png``, default: the test's tmp folder).  Loopback only: the page loads
nothing from outside the node.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from pydist import ClusterExecutor, LocalCluster
from pydist.dashboard import MAX_STREAMS, dashboard_token
from conftest import wait_for as _wait_for

pytestmark = [pytest.mark.timeout(150), pytest.mark.one_python]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def wait_for(cond, timeout=30.0, what="condition"):
    return _wait_for(cond, timeout, what, 0.05, retry_on=(Exception,))


def slow(x, t=0.05):
    ev = threading.Event()
    ev.wait(t)          # a task that takes a while (not synchronisation)
    return x


def boom(x):
    raise ValueError(f"dashboard test failure {x}")


def get(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def cluster4(_no_children_left_at_session_end):
    with LocalCluster(nodes=4, workers_per_node=1) as c:
        yield c


def test_token_is_derived_from_the_secret():
    a, b = dashboard_token(b"s1"), dashboard_token(b"s1")
    assert a == b and a != dashboard_token(b"s2") and len(a) >= 32
    assert b"s1" not in a.encode()
    with pytest.raises(ValueError):
        dashboard_token(None)


def test_every_route_refuses_without_the_token(cluster4):
    url = cluster4.dashboard_url
    assert url and url.startswith("http://127.0.0.2:")
    parts = urllib.parse.urlsplit(url)
    assert urllib.parse.parse_qs(parts.query)["token"] == [dashboard_token(cluster4.secret)]
    base = f"{parts.scheme}://{parts.netloc}"
    for path in ("/", "/api/status", "/api/events", "/static/dashboard.js", "/nope"):
        code, _, body = get(base + path)
        assert code == 403, (path, code)
        code, _, _ = get(base + path + "?token=" + "0" * 40)
        assert code == 403, (path, "wrong token")
    code, headers, body = get(url)
    assert code == 200 and b"<canvas id=\"stream\"" in body
    assert "pydist_token=" in headers.get("Set-Cookie", "") and "HttpOnly" in headers["Set-Cookie"]
    cookie = headers["Set-Cookie"].split(";")[0]
    code, _, body = get(base + "/api/status", {"Cookie": cookie})
    assert code == 200
    snap = json.loads(body)
    assert {n["name"] for n in snap["nodes"]} == {"node0", "node1", "node2", "node3"}
    assert snap["tree"]["name"] == "node0"
    code, _, body = get(base + "/static/dashboard.js", {"Authorization": "token " + dashboard_token(cluster4.secret)})
    assert code == 200 and b"EventSource" in body
    for evil in ("/static/../cli.py", "/static/%2e%2e/cli.py", "/static/.hidden.js"):
        assert get(base + evil, {"Cookie": cookie})[0] == 404, evil
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("POST", "/api/status?" + parts.query, body=b"x")
    assert conn.getresponse().status == 405
    conn.close()


def test_event_streams_are_bounded(cluster4):
    url = cluster4.dashboard_url
    parts = urllib.parse.urlsplit(url)
    conns = []
    try:
        for _ in range(MAX_STREAMS):
            c = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
            c.request("GET", "/api/events?" + parts.query)
            r = c.getresponse()
            assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"
            line = r.fp.readline()
            conns.append((c, r))
        first = b""
        while not first.startswith(b"data: "):
            first = conns[0][1].fp.readline()
        assert json.loads(first[6:])["root"] == "node0"
        c = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        c.request("GET", "/api/events?" + parts.query)
        assert c.getresponse().status == 503
        c.close()
    finally:
        for c, r in conns:
            c.close()
    # the slots come back once the browsers went away
    wait_for(lambda: get(url.replace("/?", "/api/status?"))[0] == 200, 20, "the dashboard to answer again")


def test_executors_carry_the_url(cluster4, cluster, executor):
    with ClusterExecutor(cluster4.address) as ex:
        assert ex.dashboard_url == cluster4.dashboard_url
    assert executor.dashboard_url == cluster.dashboard_url and cluster.dashboard_url.startswith("http://")
    with ClusterExecutor(max_workers=1) as ex:          # the embedded cluster
        url = ex.dashboard_url
        assert url.startswith("http://127.0.0.") and "token=" in url
        assert get(url)[0] == 200


def test_a_cluster_without_dashboard(proc_guard):
    with LocalCluster(nodes=1, workers_per_node=0, dashboard=False) as c:
        assert c.dashboard_url is None


# ================================================================================ the browser test
def _driver(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("headless Chromium is not installed (apt-get install -y chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--disable-extensions", "--window-size=1440,1100", f"--user-data-dir={tmp_path / 'chrome'}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _text(driver, element_id):
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


def test_dashboard_in_a_real_browser(cluster4, tmp_path):
    driver = _driver(tmp_path)
    artifacts = os.environ.get("PYDIST_ARTIFACTS") or str(tmp_path)
    os.makedirs(artifacts, exist_ok=True)
    shot = os.path.join(artifacts, "dashboard.png")
    try:
        driver.set_page_load_timeout(30)
        driver.get(cluster4.dashboard_url)
        wait_for(lambda: driver.execute_script("return document.querySelectorAll('.node').length") == 4, 30,
                 "the four nodes to be drawn")
        names = driver.execute_script("return [...document.querySelectorAll('.node')].map(e => e.dataset.name)")
        assert sorted(names) == ["node0", "node1", "node2", "node3"]
        # drawn as a tree: node3 sits under node1, which sits under node0
        assert driver.execute_script(
            "return document.querySelector('#node-node1').closest('li').querySelector('#node-node3') !== null")
        wait_for(lambda: _text(driver, "live") == "live", 20, "the event stream to connect")
        done0 = int(_text(driver, "total-done"))
        total0 = float(driver.execute_script("return document.getElementById('stream').dataset.total"))
        with ClusterExecutor(cluster4.address) as ex:
            bad = ex.submit(boom, 7)
            futs = [ex.submit(slow, i, 0.2) for i in range(600)]   # 30 s of work on 4 workers (cancelled)
            wait_for(lambda: int(_text(driver, "total-done")) > done0 + 20, 40, "the done counter to move")
            wait_for(lambda: float(driver.execute_script(
                "return document.getElementById('stream').dataset.total")) > total0, 40, "the chart to move")
            wait_for(lambda: driver.execute_script("return document.querySelectorAll('#running tr:not(.empty)').length") > 0,
                     20, "running tasks to be listed")
            fn = driver.execute_script("return document.querySelector('#running td').textContent")
            assert "slow" in fn
            with pytest.raises(ValueError):
                bad.result(timeout=60)
            wait_for(lambda: "dashboard test failure 7" in _text(driver, "failures"), 20, "the failure to appear")
            tb = driver.execute_script("return document.querySelector('#failures pre.traceback').textContent")
            assert "Traceback" in tb and "boom" in tb and "ValueError" in tb
            driver.execute_script("document.querySelector('#failures details').open = true")
            wait_for(lambda: driver.execute_script("return document.querySelectorAll('#running tr:not(.empty)').length") >= 3,
                     20, "the cluster to be busy for the screenshot")
            driver.save_screenshot(shot)
            for f in futs:
                f.cancel()
        assert os.path.getsize(shot) > 10_000
        print(f"\nscreenshot: {shot}")
        # without the token (and without the cookie the page set) the page is refused
        driver.delete_all_cookies()
        driver.get(cluster4.dashboard_url.split("?")[0])
        assert "403" in driver.execute_script("return document.body.textContent")
        driver.get(cluster4.dashboard_url.split("?")[0] + "api/status")
        assert "403" in driver.execute_script("return document.body.textContent")
    finally:
        driver.quit()


def test_a_node_started_by_hand_serves_it(tmp_path, proc_guard):
    import subprocess
    import sys

    from pydist import security
    from pydist.cluster import read_ready

    secret = security.new_secret()
    env = dict(os.environ, PYDIST_SECRET=secret.decode())
    p = subprocess.Popen([sys.executable, "-m", "pydist.cli", "node", "--host", "127.0.0.7", "--workers", "0",
                          "--name", "solo", "--dashboard", "0", "--watch-stdin", "--code-cache", str(tmp_path / "c"),
                          "--log-level", "WARNING"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        first = p.stdout.readline().decode()
        assert first.startswith("DASHBOARD http://127.0.0.7:"), first
        url = first.split()[1]
        assert url.endswith("?token=" + dashboard_token(secret))
        address = read_ready(p, 20)
        assert address
        with ClusterExecutor(address, secret=secret) as ex:
            assert ex.dashboard_url == url
        code, _, body = get(url.replace("/?", "/api/status?"))
        assert code == 200 and json.loads(body)["root"] == "solo"
        assert get(url.split("?")[0])[0] == 403
    finally:
        p.terminate()
        p.stdin.close()
        p.wait(15)
        p.stdout.close()


def _ring(comm):
    comm.barrier()
    return comm.rank


def test_groups_and_code_bundles_are_listed(cluster4, tmp_path):
    pkg = tmp_path / "dashmod"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("X = 1\n")
    url = cluster4.dashboard_url.replace("/?", "/api/status?")
    with ClusterExecutor(cluster4.address) as ex:
        info = ex.upload_code(str(pkg))
        wait_for(lambda: any(b["digest"] == info.digest for b in json.loads(get(url)[2])["code"]), 20,
                 "the bundle to be listed")
        futs = ex.spawn_group(_ring, 2)
        assert sorted(f.result(timeout=60) for f in futs) == [0, 1]


def test_a_tls_cluster_serves_it_over_https(tmp_path, proc_guard):
    import ssl

    from pydist import security

    p = security.make_certs(str(tmp_path / "certs"), hosts=["127.0.0.1", "127.0.0.2", "localhost"], names=["node"])
    with LocalCluster(nodes=1, workers_per_node=0, tls_cert=p["node"], tls_key=p["node_key"], tls_ca=p["ca"]) as c:
        url = c.dashboard_url
        assert url.startswith("https://127.0.0.2:"), url
        ctx = ssl.create_default_context(cafile=p["ca"])
        with urllib.request.urlopen(url.replace("/?", "/api/status?"), timeout=10, context=ctx) as r:
            assert json.loads(r.read())["root"] == "node0"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url.split("?")[0], timeout=10, context=ctx)
        assert e.value.code == 403
        with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):   # no plain HTTP
            urllib.request.urlopen(url.replace("https://", "http://"), timeout=5)


def test_an_insecure_nodes_dashboard_answers_with_the_token_of_its_url(tmp_path):
    """The DASHBOARD line is printed before the dashboard is imported and served (#15, start-up): with
    no cluster secret its token is random, and the served dashboard must take the one printed."""
    import subprocess
    import sys

    from pydist.cluster import read_ready

    env = dict(os.environ)
    for k in ("PYDIST_SECRET", "PYDIST_SECRET_FILE"):
        env.pop(k, None)
    p = subprocess.Popen([sys.executable, "-m", "pydist.cli", "node", "--host", "127.0.0.8", "--workers", "1",
                          "--name", "open", "--insecure", "--dashboard", "0", "--watch-stdin",
                          "--code-cache", str(tmp_path / "c"), "--log-level", "WARNING"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        first = p.stdout.readline().decode()
        assert first.startswith("DASHBOARD http://127.0.0.8:"), first
        url = first.split()[1]
        assert read_ready(p, 20)
        code, _, body = get(url.replace("/?", "/api/status?"))   # waits in the backlog until served
        assert code == 200 and json.loads(body)["root"] == "open", (code, body[:200])
        assert get(url.replace("/?", "/api/status?").rsplit("=", 1)[0] + "=" + "0" * 40)[0] == 403
    finally:
        p.terminate()
        p.stdin.close()
        p.wait(15)
