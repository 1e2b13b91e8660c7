// chargegate web page: live sections over Server-Sent Events, mode forms, and the 24-hour plot (inline SVG).
// No library, no build step. The server renders every section; this file only swaps them in when they change.
"use strict";
(function () {
  var csrf = (document.querySelector('meta[name="csrf"]') || {}).content || "";
  var live = document.getElementById("live");
  var SVG = "http://www.w3.org/2000/svg";

  function say(text, cls) {
    if (!live) return;
    live.textContent = text;
    live.className = cls || "muted";
  }

  function fillForms(root) {
    root.querySelectorAll('input[name="csrf"]').forEach(function (i) { if (!i.value) i.value = csrf; });
  }

  function amount(s) {
    s = Math.abs(s);
    if (s < 120) return Math.round(s) + " s";
    if (s < 7200) return Math.round(s / 60) + " min";
    if (s < 3 * 86400) return (s / 3600).toFixed(1) + " h";
    return Math.round(s / 86400) + " days";
  }

  function relTimes() {
    var now = Date.now();
    document.querySelectorAll("time[data-rel]").forEach(function (t) {
      var at = Date.parse(t.getAttribute("datetime"));
      if (isNaN(at)) return;
      var d = (at - now) / 1000, span = t.querySelector(".rel"), text;
      if (t.getAttribute("data-rel") === "left") text = d >= 0 ? amount(d) + " left" : "ended " + amount(d) + " ago";
      else text = d <= 0 ? amount(d) + " ago" : "in " + amount(d);
      if (span) span.textContent = "(" + text + ")";
    });
  }

  // -- live sections ----------------------------------------------------------------------------------
  function connect() {
    if (!window.EventSource) { say("no live updates in this browser"); return; }
    var es = new EventSource("/events");
    es.addEventListener("open", function () { say("live", "ok"); });
    es.addEventListener("sections", function (ev) {
      var data = JSON.parse(ev.data);
      Object.keys(data).forEach(function (name) {
        var el = document.getElementById("sec-" + name);
        if (!el) return;
        // what the user is doing in a form outlives the re-render: a choice not sent yet, the focus, the answer
        var keep = {};
        el.querySelectorAll("form.mode-form").forEach(function (f) {
          var sel = f.querySelector("select"), res = f.querySelector(".result");
          keep[f.getAttribute("action")] = {
            value: sel && sel.getAttribute("data-touched") ? sel.value : null,
            focus: sel !== null && sel === document.activeElement, result: res ? res.textContent : ""
          };
        });
        el.innerHTML = data[name];
        fillForms(el);
        el.querySelectorAll("form.mode-form").forEach(function (f) {
          var k = keep[f.getAttribute("action")], sel = f.querySelector("select"), res = f.querySelector(".result");
          if (!k) return;
          if (sel && k.value !== null) { sel.value = k.value; sel.setAttribute("data-touched", "1"); }
          if (sel && k.focus) sel.focus();
          if (res && k.result) res.textContent = k.result;
        });
      });
      relTimes();
      document.body.setAttribute("data-updated", String(Date.now()));
      say("live", "ok");
    });
    es.addEventListener("series", function () { plot(); });
    es.addEventListener("error", function () {
      if (es.readyState === EventSource.CLOSED) say("not live: reload the page (or log in again)", "bad");
      else say("reconnecting…", "mid");
    });
  }

  // -- charging mode ------------------------------------------------------------------------------------
  document.addEventListener("change", function (ev) {
    if (ev.target.closest && ev.target.closest("form.mode-form")) ev.target.setAttribute("data-touched", "1");
  });
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    if (!form.classList || !form.classList.contains("mode-form")) return;
    ev.preventDefault();
    var out = form.querySelector(".result");
    var body = new URLSearchParams(new FormData(form));
    var sel = form.querySelector("select");
    if (sel) sel.removeAttribute("data-touched");  // sent: the page shows what is in force from now on
    var action = form.getAttribute("action");
    var answer = function (text) {  // the form may have been re-rendered meanwhile: write into the current one
      var f = document.querySelector('form.mode-form[action="' + action + '"] .result');
      (f || out).textContent = text;
    };
    answer("sending…");
    fetch(form.getAttribute("action"), {
      method: "POST", credentials: "same-origin", body: body,
      headers: { "X-CSRF-Token": csrf, "Accept": "application/json" }
    }).then(function (r) {
      return r.json().then(function (j) { return { status: r.status, body: j }; });
    }).then(function (r) {
      if (r.status === 200) answer("set to " + r.body.mode);
      else if (r.status === 202) answer("sent, waiting for confirmation");
      else answer("refused: " + (r.body.detail || r.status));
    }).catch(function (e) { answer("failed: " + e); });
  });

  // -- the 24-hour plot ----------------------------------------------------------------------------------
  function el(name, attrs, parent) {
    var e = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (parent) parent.appendChild(e);
    return e;
  }

  function draw(box, d) {
    var W = Math.max(300, box.clientWidth || 600), H = 220, L = 36, R = 8, T = 8, B = 22;
    var t0 = Date.parse(d.start), t1 = Date.parse(d.end);
    var ymax = 1;
    (d.fuse || []).forEach(function (f) { if (f > ymax) ymax = f; });
    d.points.forEach(function (p) {
      (p.m || []).concat(p.l || []).forEach(function (v) { if (v !== null && v > ymax) ymax = v; });
    });
    ymax *= 1.1;
    var x = function (t) { return L + (W - L - R) * (t - t0) / (t1 - t0); };
    var y = function (v) { return T + (H - T - B) * (1 - v / ymax); };
    var svg = el("svg", { viewBox: "0 0 " + W + " " + H, width: "100%", height: H, "class": "plot" });
    d.actions.forEach(function (a) {
      var x0 = x(Date.parse(a.start)), x1 = x(Date.parse(a.end));
      var r = el("rect", { x: x0, y: T, width: Math.max(2, x1 - x0), height: H - T - B, "class": "act" }, svg);
      el("title", {}, r).textContent = a.label;
    });
    var step = ymax > 60 ? 20 : (ymax > 25 ? 10 : 5);
    for (var v = 0; v <= ymax; v += step) {
      el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), "class": "grid" }, svg);
      el("text", { x: L - 4, y: y(v) + 4, "class": "tick", "text-anchor": "end" }, svg).textContent = String(v);
    }
    for (var h = Math.ceil(t0 / 3600000) * 3600000; h <= t1; h += 3600000) {
      var hr = new Date(h).getHours();
      if (hr % 3) continue;
      el("line", { x1: x(h), x2: x(h), y1: T, y2: H - B, "class": "grid" }, svg);
      el("text", { x: x(h), y: H - 6, "class": "tick", "text-anchor": "middle" }, svg).textContent = hr + ":00";
    }
    (d.fuse || []).slice(0, 1).forEach(function (f) {
      el("line", { x1: L, x2: W - R, y1: y(f), y2: y(f), "class": "fuse" }, svg);
    });
    function line(get, cls) {
      var runs = [], cur = [], last = null;
      d.points.forEach(function (p) {
        var t = Date.parse(p.t), v = get(p);
        if (v === null || v === undefined || (last !== null && t - last > 180000)) {
          if (cur.length) runs.push(cur);
          cur = [];
        }
        if (v !== null && v !== undefined) cur.push(x(t).toFixed(1) + "," + y(v).toFixed(1));
        last = t;
      });
      if (cur.length) runs.push(cur);
      runs.forEach(function (pts) {
        if (pts.length === 1) pts.push(pts[0]);
        el("polyline", { points: pts.join(" "), "class": cls }, svg);
      });
    }
    line(function (p) {
      var l = (p.l || []).filter(function (v) { return v !== null; });
      return l.length ? Math.min.apply(null, l) : null;
    }, "lim");
    [0, 1, 2].forEach(function (k) { line(function (p) { return p.m ? p.m[k] : null; }, "l" + (k + 1)); });
    el("text", { x: L + 4, y: T + 12, "class": "tick" }, svg).textContent = d.points.length ?
      "A per phase" : "no minutes recorded yet";
    box.replaceChildren(svg);
    box.setAttribute("data-points", String(d.points.length));
    box.setAttribute("data-actions", String(d.actions.length));
  }

  var lastPlot = null, resizeTimer = null;
  window.addEventListener("resize", function () {  // the plot is drawn for the width it has
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(function () {
      var box = document.getElementById("plot");
      if (box && lastPlot) draw(box, lastPlot);
    }, 150);
  });

  function plot() {
    var box = document.getElementById("plot"), sel = document.getElementById("plot-node");
    if (!box || !sel) return;
    fetch("/api/series?hours=24&node=" + encodeURIComponent(sel.value), { credentials: "same-origin" })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(function (d) { lastPlot = d; draw(box, d); })
      .catch(function (e) { box.textContent = "plot not available: " + e.message; });
  }

  document.addEventListener("DOMContentLoaded", function () {
    fillForms(document);
    relTimes();
    setInterval(relTimes, 1000);
    var sel = document.getElementById("plot-node");
    if (sel) sel.addEventListener("change", plot);
    plot();
    connect();
  });
})();
