// keepwell dashboard: plots (uPlot), action buttons, live progress (server-sent events).
(function () {
  "use strict";
  var csrfMeta = document.querySelector('meta[name="keepwell-csrf"]');
  var csrf = csrfMeta ? csrfMeta.content : "";

  function human(v, unit) {
    if (v == null) return "-";
    if (unit === "B") {
      var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
      while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
      return (i ? v.toFixed(1) : v.toFixed(0)) + " " + units[i];
    }
    if (unit === "%") return (100 * v).toFixed(1) + "%";
    return (+v).toFixed(2) + (unit ? " " + unit : "");
  }

  var colors = ["#2b6cb0", "#c05621", "#2f855a", "#6b46c1"];

  function drawPlots() {
    var data = JSON.parse(document.getElementById("plots").textContent || "{}");
    document.querySelectorAll(".plot[data-plot]").forEach(function (el) {
      var p = data[el.dataset.plot];
      if (!p) return;
      if (!p.x.length) {
        el.textContent = p.title + ": no data yet";
        el.classList.add("empty");
        return;
      }
      var series = [{}], values = [p.x];
      p.series.forEach(function (s, i) {
        var unit = s[1];
        series.push({ label: s[0], stroke: colors[i % colors.length], width: 2,
                      points: { show: true, size: 5 },
                      value: function (u, v) { return human(v, unit); } });
        values.push(p[s[0]]);
      });
      if (p.limit != null) {
        series.push({ label: "limit", stroke: "#c53030", dash: [6, 4], width: 1,
                      points: { show: false } });
        values.push(p.x.map(function () { return p.limit; }));
      }
      var unit0 = p.series[0][1];
      var opts = {
        title: p.title, width: Math.max(320, el.clientWidth || 480), height: 220,
        series: series,
        axes: [{}, { size: 70, values: function (u, ticks) {
          return ticks.map(function (t) { return human(t, unit0); }); } }],
      };
      el.textContent = "";
      new uPlot(opts, values, el);
      el.dataset.drawn = "1";
    });
  }

  function act(button) {
    button.disabled = true;
    var opts = { method: "POST", credentials: "same-origin",
                 headers: { "Content-Type": "application/json", "X-Keepwell-CSRF": csrf },
                 body: button.dataset.body || "{}" };
    fetch(button.dataset.post, opts).then(function (r) {
      return r.json().then(function (doc) { return { ok: r.ok, doc: doc }; });
    }).then(function (res) {
      var note = document.createElement("span");
      note.className = res.ok ? "note ok" : "note err";
      note.textContent = res.ok ? (res.doc.job_id ? "queued " + res.doc.job_id : "done")
                                : res.doc.error;
      button.after(note);
      if (res.ok && button.dataset.post.indexOf("/acknowledge") > 0) {
        var row = button.closest("tr");
        if (row) row.remove();
      }
      button.disabled = false;
    });
  }

  function live() {
    var table = document.getElementById("running");
    if (!table || !window.EventSource) return;
    var state = document.getElementById("live-state");
    var source = new EventSource("/api/v1/events");
    source.addEventListener("running", function (ev) {
      var doc = JSON.parse(ev.data);
      table.querySelectorAll("tr[data-job]").forEach(function (r) { r.remove(); });
      doc.jobs.forEach(function (j) {
        var tr = document.createElement("tr");
        tr.dataset.job = j.job_id;
        [j.action + " " + j.name, human(j.bytes_read, "B"), String(j.files_read),
         human(j.bytes_uploaded, "B"), human(j.elapsed, "s")].forEach(function (text) {
          var td = document.createElement("td");
          td.textContent = text;
          tr.appendChild(td);
        });
        table.appendChild(tr);
      });
      state.textContent = "live: " + doc.jobs.length + " running, updated " +
        new Date(doc.time * 1000).toISOString();
      state.dataset.updates = String((+state.dataset.updates || 0) + 1);
    });
  }

  document.addEventListener("click", function (ev) {
    var b = ev.target.closest("button.act");
    if (b) act(b);
  });
  drawPlots();
  live();
})();
