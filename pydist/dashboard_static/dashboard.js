// pydist dashboard: renders the snapshots the node sends (/api/status once, then /api/events).
"use strict";
(function () {
  var COLORS = ["#4fb3ff", "#3ecf8e", "#ffb84d", "#c792ea", "#ff6b6b", "#7fdbca", "#f78c6c", "#82aaff",
                "#c3e88d", "#ffcb6b", "#89ddff", "#f07178"];
  var colorOf = {};
  var $ = function (id) { return document.getElementById(id); };
  var query = window.location.search || "";

  function color(name) {
    if (!(name in colorOf)) colorOf[name] = COLORS[Object.keys(colorOf).length % COLORS.length];
    return colorOf[name];
  }
  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    for (var k in (attrs || {})) {
      if (k === "text") e.textContent = attrs[k];
      else if (k === "cls") e.className = attrs[k];
      else if (k === "style") e.style.cssText = attrs[k];   // CSSOM: allowed by the page's CSP
      else e.setAttribute(k, attrs[k]);
    }
    (children || []).forEach(function (c) { if (c) e.appendChild(c); });
    return e;
  }
  function fmtNum(n) { return (n === null || n === undefined) ? "-" : String(n); }
  function fmtAge(s) {
    if (s < 60) return s.toFixed(1) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
    return (s / 3600).toFixed(1) + " h";
  }
  function fmtBytes(n) {
    if (n >= 1 << 30) return (n / (1 << 30)).toFixed(1) + " GiB";
    if (n >= 1 << 20) return (n / (1 << 20)).toFixed(1) + " MiB";
    if (n >= 1 << 10) return (n / (1 << 10)).toFixed(1) + " KiB";
    return n + " B";
  }

  function stat(label, value, bad) {
    return el("span", {}, [el("em", {text: label}), el("b", {text: value, cls: bad ? "bad" : ""})]);
  }
  function nodeCard(st, role) {
    var pct = st.workers ? Math.round(100 * st.busy / st.workers) : 0;
    var top = el("div", {cls: "top"}, [
      el("div", {}, [el("span", {cls: "name", text: st.name}), role && role !== "child" ? el("span", {cls: "role", text: role}) : null]),
      el("span", {cls: "addr", text: st.address})]);
    var bar = el("div", {cls: "bar", title: st.busy + " of " + st.workers + " workers busy"}, [el("div", {style: "width:" + pct + "%"})]);
    var stats = el("div", {cls: "stats"}, [
      stat("workers", st.busy + "/" + st.workers), stat("queued", fmtNum(st.queued)), stat("running", fmtNum(st.running)),
      stat("done", fmtNum(st.done)), stat("failed", fmtNum(st.failed), st.failed > 0),
      stat("cpu/mem", Math.round(st.cpu_percent || 0) + "/" + Math.round(st.mem_percent || 0) + "%")]);
    var card = el("div", {cls: "node", id: "node-" + st.name, "data-name": st.name, "data-done": st.done}, [top, bar, stats]);
    card.style.borderLeft = "3px solid " + color(st.name);
    return card;
  }
  function renderTree(snap) {
    var byName = {};
    snap.nodes.forEach(function (n) { byName[n.name] = n; });
    function build(t) {
      var st = byName[t.name];
      var li = el("li", {}, [st ? nodeCard(st, t.role) : el("div", {text: t.name})]);
      if (t.children && t.children.length) {
        var ul = el("ul");
        t.children.forEach(function (c) { ul.appendChild(build(c)); });
        li.appendChild(ul);
      }
      return li;
    }
    var root = el("ul", {}, [build(snap.tree)]);
    // nodes the walk reached but the tree did not place (should not happen): listed below
    var placed = {};
    (function mark(t) { placed[t.name] = 1; (t.children || []).forEach(mark); })(snap.tree);
    snap.nodes.forEach(function (n) { if (!placed[n.name]) root.appendChild(el("li", {}, [nodeCard(n, "detached")])); });
    var tree = $("tree");
    tree.replaceChildren(root);
  }
  function renderTotals(snap) {
    var t = {workers: 0, busy: 0, queued: 0, running: 0, done: 0, failed: 0};
    snap.nodes.forEach(function (n) { for (var k in t) t[k] += (n[k] || 0); });
    $("root-name").textContent = "· " + snap.root;
    $("total-nodes").textContent = snap.nodes.length;
    $("total-workers").textContent = t.busy + "/" + t.workers;
    $("total-queued").textContent = t.queued;
    $("total-running").textContent = t.running;
    $("total-done").textContent = t.done;
    $("total-failed").textContent = t.failed;
    $("total-failed").className = t.failed ? "nonzero" : "";
    var s = snap.stream, rate = 0;
    if (s && s.t.length) for (var n in s.series) rate += s.series[n][s.series[n].length - 1] || 0;
    $("total-rate").textContent = rate.toFixed(rate < 10 ? 1 : 0);
  }
  function renderStream(snap) {
    var cv = $("stream"), s = snap.stream || {t: [], series: {}};
    var dpr = window.devicePixelRatio || 1, w = cv.clientWidth || 900, h = cv.clientHeight || 260;
    if (cv.width !== Math.round(w * dpr)) { cv.width = Math.round(w * dpr); cv.height = Math.round(h * dpr); }
    var ctx = cv.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    var names = Object.keys(s.series).sort();
    var n = s.t.length, pad = {l: 40, r: 10, t: 10, b: 22};
    // the last minute at first, growing to the last 5 minutes as the history fills
    var have = n ? snap.time - s.t[0] : 0;
    var span = Math.min(300, Math.max(60, Math.ceil(have / 60) * 60)), now = snap.time, t0 = now - span;
    var stacked = [], maxY = 1, total = 0;
    for (var i = 0; i < n; i++) {
      var acc = 0, row = [];
      names.forEach(function (nm) { acc += s.series[nm][i] || 0; row.push(acc); });
      stacked.push(row);
      if (acc > maxY) maxY = acc;
      total += acc;
    }
    maxY = niceMax(maxY);
    var X = function (t) { return pad.l + (w - pad.l - pad.r) * (t - t0) / span; };
    var Y = function (v) { return h - pad.b - (h - pad.t - pad.b) * v / maxY; };
    ctx.strokeStyle = "#263241"; ctx.fillStyle = "#7f8c99"; ctx.font = "11px system-ui, sans-serif"; ctx.lineWidth = 1;
    for (var g = 0; g <= 4; g++) {
      var v = maxY * g / 4, y = Y(v);
      ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(w - pad.r, y); ctx.stroke();
      ctx.fillText(v >= 10 ? v.toFixed(0) : v.toFixed(1), 4, y + 4);
    }
    var step = span <= 60 ? 10 : 60, ticks = span / step;
    for (var m = 0; m <= ticks; m++) {
      var ago = span - m * step;
      ctx.fillText(ago === 0 ? "now" : "-" + (step === 60 ? ago / 60 + " min" : ago + " s"), X(t0 + m * step) - 14, h - 6);
    }
    for (var k = names.length - 1; k >= 0; k--) {
      if (!n) break;
      ctx.beginPath();
      ctx.moveTo(X(s.t[0]), Y(0));
      for (var j = 0; j < n; j++) ctx.lineTo(X(s.t[j]), Y(stacked[j][k]));
      ctx.lineTo(X(s.t[n - 1]), Y(0));
      ctx.closePath();
      ctx.fillStyle = color(names[k]) + "99"; ctx.fill();
      ctx.strokeStyle = color(names[k]); ctx.stroke();
    }
    cv.dataset.samples = n;
    cv.dataset.total = total.toFixed(2);
    cv.dataset.last = n ? stacked[n - 1][names.length - 1].toFixed(2) : "0";
    var legend = $("legend");
    legend.replaceChildren.apply(legend, names.map(function (nm) {
      var last = n ? (s.series[nm][n - 1] || 0) : 0;
      return el("span", {}, [el("i", {style: "background:" + color(nm)}), document.createTextNode(nm + " " + last.toFixed(1) + "/s")]);
    }));
  }
  function niceMax(v) {
    var p = Math.pow(10, Math.floor(Math.log10(v))), f = v / p;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * p;
  }
  function renderRunning(snap) {
    var body = $("running"), rows = (snap.tasks || []).map(function (t) {
      var lines = t.output || [], last = lines.length ? lines[lines.length - 1] : "";
      return el("tr", {}, [el("td", {cls: "mono", text: t.function || "?"}), el("td", {text: t.node}),
                           el("td", {text: t.worker}), el("td", {cls: "mono", text: t.id}), el("td", {text: fmtAge(t.age || 0)}),
                           el("td", {cls: "mono out", text: last, title: lines.join("\n")})]);
    });
    if (!rows.length) rows = [el("tr", {cls: "empty"}, [el("td", {colspan: 6, text: "no task running"})])];
    body.replaceChildren.apply(body, rows);
    $("running-count").textContent = (snap.tasks || []).length ? "(" + snap.tasks.length + ")" : "";
  }
  var openFailures = {};
  function renderFailures(snap) {
    var box = $("failures"), fs = snap.failures || [], SHOWN = 6;
    var items = fs.slice(0, SHOWN).map(function (f) {
      var d = el("details", {cls: "failure", "data-id": f.id}, [
        el("summary", {}, [el("span", {cls: "err", text: f.error.split(".").pop() + ": " + f.message}),
                           el("span", {cls: "where", text: f.node + " · worker " + f.worker + " · " + f.id + " · " +
                                       new Date(f.time * 1000).toLocaleTimeString()})]),
        el("pre", {cls: "traceback", text: f.traceback}),
        (f.output && f.output.length) ? el("pre", {cls: "output", text: "last output:\n" + f.output.join("\n")}) : null]);
      if (openFailures[f.id]) d.open = true;
      d.addEventListener("toggle", function () { openFailures[f.id] = d.open; });
      return d;
    });
    if (!items.length) items = [el("div", {cls: "empty-note", text: "no failures"})];
    if (fs.length > SHOWN) items.push(el("div", {cls: "empty-note", text: "and " + (fs.length - SHOWN) + " more (see /api/status)"}));
    box.replaceChildren.apply(box, items);
    $("failures-count").textContent = fs.length ? "(" + fs.length + ")" : "";
  }
  function renderCode(snap) {
    var body = $("code"), rows = (snap.code || []).map(function (b) {
      return el("tr", {}, [el("td", {cls: "mono", text: b.digest.slice(0, 12) + (b.pinned ? " (pinned)" : "")}),
                           el("td", {text: b.files}), el("td", {text: fmtBytes(b.size || 0)}), el("td", {text: b.nodes.join(", ")})]);
    });
    if (!rows.length) rows = [el("tr", {cls: "empty"}, [el("td", {colspan: 4, text: "no code bundles"})])];
    body.replaceChildren.apply(body, rows);
  }
  function renderGroups(snap) {
    var box = $("groups"), gs = snap.groups || [];
    var items = gs.map(function (g) {
      return el("div", {cls: "mono", text: g.group + "  home " + g.node + (g.state ? "  " + g.state : "")});
    });
    if (!items.length) items = [el("div", {cls: "empty-note", text: "no task group active"})];
    box.replaceChildren.apply(box, items);
  }
  function render(snap) {
    if (!snap || !snap.nodes) return;
    renderTotals(snap); renderTree(snap); renderStream(snap); renderRunning(snap);
    renderFailures(snap); renderCode(snap); renderGroups(snap);
    document.body.dataset.seq = snap.seq || 0;
  }
  function live(on, text) {
    var l = $("live"); l.className = "live " + (on ? "on" : "off"); l.textContent = text;
  }
  function connect() {
    fetch("api/status" + query, {credentials: "same-origin"}).then(function (r) {
      if (r.status === 403) { live(false, "403: token missing"); throw new Error("403"); }
      return r.json();
    }).then(render).catch(function () {});
    if (!window.EventSource) return;
    var es = new EventSource("api/events" + query);
    es.onopen = function () { live(true, "live"); };
    es.onmessage = function (e) { try { render(JSON.parse(e.data)); } catch (err) { /* keep going */ } };
    es.onerror = function () { live(false, "reconnecting"); };
  }
  connect();
})();
