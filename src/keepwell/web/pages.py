"""The pages, rendered on the server from the dicts of `keepwell.web.views`.

Plain HTML with every value escaped; plots are ``<div class="plot">`` elements whose data travels
in one ``<script type="application/json" id="plots">`` block that ``static/app.js`` draws with
the vendored uPlot (no CDN: the app works offline). A page works without JavaScript except
for its plots, its buttons and live progress.
"""

from __future__ import annotations

import json
import re
import time
from html import escape
from typing import Any, NamedTuple
from urllib.parse import quote

from keepwell.control.schedule import fmt_age, fmt_ts
from keepwell.units import human_bytes


def _e(value: Any) -> str:
    return escape("" if value is None else str(value))


def _bytes(n: Any) -> str:
    return "-" if n is None else human_bytes(float(n))


def _ratio(value: Any, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if pct else f"{value:.2f}×"


def _secs(value: Any) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _status(status: Any) -> str:
    return f'<span class="st st-{_e(status or "none")}">{_e(status or "never")}</span>'


class Viewer(NamedTuple):
    """Who a page is for: the CSRF token their actions carry, and their role: an operator may
    act, a viewer only looks (the page has no action buttons); none on the login page."""

    csrf: str | None
    role: str | None = "operator"

    @property
    def can_act(self) -> bool:
        return self.role == "operator"


NOBODY = Viewer(None, None)
_ACTION_BUTTON = re.compile(r'<button class="act"[^>]*>[^<]*</button>')


def layout(title: str, body: str, viewer: Viewer,
           plots: dict[str, Any] | None = None) -> str:
    data = json.dumps(plots or {}).replace("</", "<\\/")
    csrf = viewer.csrf if viewer.can_act else None
    meta = f'<meta name="keepwell-csrf" content="{_e(csrf)}">' if csrf else ""
    if not viewer.can_act:
        body = _ACTION_BUTTON.sub("", body)
    role = (f'<span class="role" id="role">{_e(viewer.role)}: read only</span>'
            if viewer.role is not None and not viewer.can_act else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{meta}<title>{_e(title)} · keepwell</title>
<link rel="stylesheet" href="/static/uPlot.min.css"><link rel="stylesheet" href="/static/style.css">
</head><body>
<nav><a class="brand" href="/">keepwell</a><a href="/">Overview</a><a href="/drills">Drills</a>
<a href="/running">Running</a>{role}</nav>
<main><h1>{_e(title)}</h1>
{body}
</main>
<script type="application/json" id="plots">{data}</script>
<script src="/static/uPlot.iife.min.js"></script><script src="/static/app.js"></script>
</body></html>
"""


def _pitr_bar(pitr: dict[str, Any] | None, now: float) -> str:
    """The PITR window as a bar over the last days (SVG: no inline styles needed)."""
    if pitr is None:
        return ""
    if pitr.get("error"):
        return f'<span class="muted">PITR unknown: {_e(pitr["error"])}</span>'
    start, end = pitr.get("from"), pitr.get("to")
    if start is None or end is None:
        return '<span class="muted">no PITR window</span>'
    span = max(now - start, 3600.0) * 1.05
    x0 = max(0.0, 200 * (1 - (now - start) / span))
    x1 = max(x0 + 1, 200 * (1 - (now - end) / span))
    title = f"{fmt_ts(start)} .. {fmt_ts(end)} ({fmt_age(pitr.get('seconds'))})"
    return (f'<svg class="pitr" width="200" height="12" role="img" aria-label="{_e(title)}">'
            f'<title>{_e(title)}</title><rect x="0" y="0" width="200" height="12" '
            f'class="pitr-bg"/><rect x="{x0:.1f}" y="0" width="{x1 - x0:.1f}" height="12" '
            f'class="pitr-win"/></svg> <small>{_e(fmt_age(pitr.get("seconds")))}</small>')


def _ack_button(alert: dict[str, Any]) -> str:
    if not alert.get("open"):
        return f'<span class="muted">acknowledged by {_e(alert.get("acknowledged_by"))}</span>'
    return (f'<button class="act" data-post="/api/v1/alerts/{_e(quote(alert["key"], safe=""))}'
            f'/acknowledge">Acknowledge</button>')


def _alerts(alerts: list[dict[str, Any]]) -> str:
    if not alerts:
        return '<p class="muted">No active alerts.</p>'
    rows = "".join(
        f'<tr class="alert" data-key="{_e(a["key"])}"><td>{_e(fmt_ts(a["first_at"]))}</td>'
        f'<td><a href="/sources/{_e(quote(a["source"]))}">{_e(a["source"])}</a></td>'
        f'<td>{_e(a["kind"])}</td><td>{_e(a["message"])}</td><td>{_ack_button(a)}</td></tr>'
        for a in alerts)
    return ('<table id="alerts"><tr><th>since</th><th>source</th><th>kind</th><th>message</th>'
            f'<th></th></tr>{rows}</table>')


def overview(info: dict[str, Any], viewer: Viewer) -> str:
    now = info["time"]
    rows = []
    for s in info["sources"]:
        drill = "-"
        if s["drill_status"]:
            drill = _status(s["drill_status"])
            if s["drill_rto"] is not None:
                drill += f" RTO {_secs(s['drill_rto'])}"
        name = _e(quote(s["source"]))
        rows.append(
            f'<tr class="src state-{s["state"]}" data-source="{_e(s["source"])}">'
            f'<td><span class="dot dot-{s["state"]}"></span>'
            f'<a href="/sources/{name}">{_e(s["source"])}</a> <small>{_e(s["kind"])}</small></td>'
            f'<td>{_status(s["last_status"])}</td>'
            f'<td>{_e(fmt_ts(s["last_success"]))}<br><small>{_e(fmt_age(s["last_success_age"]))}'
            f' ago</small></td><td>{_e(fmt_ts(s["next_run"]))}</td>'
            f'<td>{_pitr_bar(s["pitr"], now)}</td><td>{drill}</td>'
            f'<td>{_e(", ".join(s["open_alerts"]) or "-")}</td>'
            f'<td><button class="act" data-post="/api/v1/actions/backup" '
            f'data-body=\'{_e(json.dumps({"source": s["source"]}))}\'>Back up now</button></td>'
            '</tr>')
    repos = sorted({s["repository"] for s in info["sources"]})
    body = [
        '<table id="sources"><tr><th>source</th><th>last run</th><th>last success</th>'
        '<th>next run</th><th>PITR window</th><th>drill</th><th>alerts</th><th></th></tr>',
        *rows, "</table>",
        f"<h2>Open alerts ({len(info['open_alerts'])})</h2>", _alerts(info["alerts"]),
        f"<h2>Running ({len(info['running'])})</h2>",
        '<p><a href="/running">live progress</a></p>',
        "<h2>Drills</h2>", _drill_table(info["drills"]),
        "<h2>Repositories</h2><ul>",
        *[f'<li><a href="/repositories/{_e(quote(r))}">{_e(r)}</a></li>' for r in repos],
        "</ul>",
    ]
    return layout("Overview", "\n".join(body), viewer)


def _drill_table(drills: list[dict[str, Any]]) -> str:
    if not drills:
        return '<p class="muted">No drills configured.</p>'
    rows = "".join(
        f'<tr><td>{_e(d["drill"])}</td><td><a href="/sources/{_e(quote(d["source"]))}">'
        f'{_e(d["source"])}</a></td><td>{_status(d["last_status"])}</td>'
        f'<td>{_e(fmt_ts(d["last_time"]))}</td><td>{_secs(d["rto"])}</td>'
        f'<td>{_secs(d["rpo"])}</td><td>{_secs(d["max_rpo"])}</td>'
        f'<td><button class="act" data-post="/api/v1/actions/drill" '
        f'data-body=\'{_e(json.dumps({"drill": d["drill"]}))}\'>Drill now</button></td></tr>'
        for d in drills)
    return ('<table class="drills"><tr><th>drill</th><th>source</th><th>last</th><th>when</th>'
            f'<th>RTO</th><th>RPO</th><th>max RPO</th><th></th></tr>{rows}</table>')


def _runs(runs: list[dict[str, Any]]) -> str:
    rows = "".join(
        f'<tr><td><a href="/runs/{r["id"]}">{_e(fmt_ts(r["started_at"]))}</a></td>'
        f'<td>{_e(r["action"])}</td><td>{_status(r["status"])}</td>'
        f'<td>{_secs(r["duration"])}</td><td>{_bytes(r["bytes_read"])}</td>'
        f'<td>{_bytes(r["bytes_stored"])}</td><td>{_e(r["trigger"])}</td>'
        f'<td>{_e((r["snapshot_id"] or "")[:8] or r["error"] or "")}</td></tr>'
        for r in runs)
    return ('<table class="runs"><tr><th>started</th><th>action</th><th>status</th>'
            '<th>duration</th><th>read</th><th>stored</th><th>trigger</th>'
            f'<th>snapshot / error</th></tr>{rows}</table>')


def _series(points: list[dict[str, Any]], *keys: str) -> dict[str, list[Any]]:
    return {"x": [p["time"] for p in points], **{k: [p[k] for p in points] for k in keys}}


def source(info: dict[str, Any], viewer: Viewer) -> str:
    b = info["backups"]
    plots = {
        "duration": {"title": "Backup duration (s)", **_series(b, "duration"),
                     "series": [["duration", "s"]]},
        "bytes": {"title": "Bytes read and stored", **_series(b, "bytes_read", "bytes_stored"),
                  "series": [["bytes_read", "B"], ["bytes_stored", "B"]]},
        "dedup": {"title": "Deduplication (share already stored)", **_series(b, "dedup_ratio"),
                  "series": [["dedup_ratio", "%"]]},
    }
    snaps = "".join(
        f'<tr><td><code>{_e(s["short_id"])}</code></td><td>{_e(fmt_ts(s["time"]))}</td>'
        f'<td>{_e(s["host"])}</td><td>{_e(", ".join(s["tags"]))}</td>'
        f'<td>{_bytes(s["bytes_processed"])}</td><td>{_bytes(s["bytes_added"])}</td></tr>'
        for s in info["snapshots"])
    pitr = ""
    if info["pitr"] is not None:
        pitr = f"<h2>Point-in-time restore</h2><p>{_pitr_bar(info['pitr'], time.time())}"
        if info["pitr"].get("from") is not None:
            pitr += (f" {_e(fmt_ts(info['pitr']['from']))} .. {_e(fmt_ts(info['pitr']['to']))},"
                     f" newest point {_e(fmt_age(info['pitr'].get('end_age')))} ago")
        pitr += "</p>"
    body = f"""
<p>{_status(info["last_status"])} · {_e(info["kind"])} → <a href="/repositories/{_e(quote(info["repository"]))}">{_e(info["repository"])}</a>
 · last success {_e(fmt_ts(info["last_success"]))} · next run {_e(fmt_ts(info["next_run"]))}
 · breaker {_e(info["breaker"])}
 <button class="act" data-post="/api/v1/actions/backup" data-body='{_e(json.dumps({"source": info["source"]}))}'>Back up now</button></p>
{f'<p class="err">{_e(info["last_error"])}</p>' if info["last_error"] else ""}
{pitr}
<div class="plots"><div class="plot" data-plot="duration"></div><div class="plot" data-plot="bytes"></div>
<div class="plot" data-plot="dedup"></div></div>
<h2>Jobs</h2>{_runs(info["runs"])}
<h2>Snapshots ({len(info["snapshots"])})</h2>
<table class="snapshots"><tr><th>id</th><th>time</th><th>host</th><th>tags</th><th>read</th><th>added</th></tr>{snaps}</table>
"""
    return layout(f"Source {info['source']}", body, viewer, plots)


def run(info: dict[str, Any], viewer: Viewer) -> str:
    log = "".join(f'<tr class="log-{_e(line["level"])}"><td>{_e(fmt_ts(line["at"]))}</td>'
                  f'<td>{_e(line["level"])}</td><td>{_e(line["message"])}</td></tr>'
                  for line in info["log"])
    facts = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in info.items()
                    if k not in ("log", "details") and v is not None)
    body = (f'<p><a href="/sources/{_e(quote(info["source"]))}">{_e(info["source"])}</a> · '
            f'{_status(info["status"])}</p><table class="facts">{facts}</table>'
            f'<h2>Log</h2><table class="log">{log}</table>')
    return layout(f"Run {info['id']}: {info['action']} {info['name']}", body, viewer)


def _last_check(c: dict[str, Any] | None) -> str:
    if c is None:
        return "never checked"
    if c["ok"]:
        result = "no errors"
    elif c["errors"]:
        result = f"{c['errors']} errors"
    else:
        result = f"{c['status']}: {c['error'] or ''}"
    read = f"data read: {c['read_data']}" if c["read_data"] else "no data read"
    return (f'{_status(c["status"])} <a href="/runs/{c["run"]}">{_e(fmt_ts(c["time"]))}</a> · '
            f"{_e(result)} · {_e(read)}")


def repository(info: dict[str, Any], viewer: Viewer) -> str:
    g = info["growth"]
    plots = {"growth": {"title": "Repository size from backups (B)", **_series(g, "total"),
                        "series": [["total", "B"]]},
             "added": {"title": "Bytes added per backup", **_series(g, "added"),
                       "series": [["added", "B"]]}}
    err = f'<p class="err">{_e(info["error"])}</p>' if info["error"] else ""
    body = f"""{err}
<table class="facts">
<tr><th>location</th><td>{_e(info["location"])}</td></tr>
<tr><th>replica</th><td>{_e(info["replica"] or "-")}</td></tr>
<tr><th>sources</th><td>{", ".join(f'<a href="/sources/{_e(quote(s))}">{_e(s)}</a>' for s in info["sources"])}</td></tr>
<tr><th>snapshots</th><td>{info["snapshots"]}</td></tr>
<tr><th>stored (packs)</th><td id="stored">{_bytes(info["stored_bytes"])}</td></tr>
<tr><th>distinct data before compression</th><td>{_bytes(info["unique_bytes"])}</td></tr>
<tr><th>logical data of all snapshots</th><td>{_bytes(info["logical_bytes"])}</td></tr>
<tr><th>deduplication ratio</th><td id="dedup">{_ratio(info["dedup_ratio"])}</td></tr>
<tr><th>compression ratio</th><td id="compression">{_ratio(info["compression_ratio"])}</td></tr>
<tr><th>counted</th><td>{_e(fmt_ts(info["counted_at"]))}</td></tr>
<tr><th>last check</th><td id="last-check">{_last_check(info["last_check"])}</td></tr>
</table>
<div class="plots"><div class="plot" data-plot="growth"></div><div class="plot" data-plot="added"></div></div>
"""
    return layout(f"Repository {info['name']}", body, viewer, plots)


def drills(items: list[dict[str, Any]], viewer: Viewer) -> str:
    plots: dict[str, Any] = {}
    parts = [_drill_table(items)]
    for d in items:
        ok = [p for p in d["series"] if p["status"] == "succeeded"]
        key = f"drill-{d['drill']}"
        plots[key] = {"title": f"{d['drill']}: RTO and RPO (s)", **_series(ok, "rto", "rpo"),
                      "series": [["rto", "s"], ["rpo", "s"]], "limit": d["max_rpo"]}
        parts.append(f'<h2>{_e(d["drill"])}</h2><div class="plot" data-plot="{_e(key)}"></div>')
    return layout("Restore drills", "\n".join(parts), viewer, plots)


def running(info: dict[str, Any], viewer: Viewer) -> str:
    rows = "".join(_running_row(j) for j in info["jobs"])
    others = "".join(f'<li>{_e(r["action"])} {_e(r["name"])} since '
                     f'{_e(fmt_ts(r["started_at"]))} (another process)</li>'
                     for r in info["elsewhere"])
    body = (f'<table id="running" data-live="1"><tr><th>job</th><th>read</th><th>files</th>'
            f'<th>uploaded</th><th>elapsed</th></tr>{rows}</table>'
            f'<p class="muted" id="live-state">waiting for live updates…</p>'
            f'<ul>{others}</ul>{_fleet(info.get("fleet"))}')
    return layout("Running jobs", body, viewer)


def _fleet(fleet: dict[str, Any] | None) -> str:
    """The fleet's workers per site (fleet mode only)."""
    if fleet is None:
        return ""
    head = f'<h2>Fleet workers</h2><p class="muted">cluster {_e(fleet["address"])}</p>'
    if "error" in fleet:
        return f'{head}<p class="err" id="fleet-error">{_e(fleet["error"])}</p>'
    rows = "".join(
        f'<tr><td>{_e(site)}</td><td>{len(ws)}</td><td>'
        + ", ".join(f'{_e(w["identity"])} (last poll {_e(fmt_ts(w["last_poll"]))})' for w in ws)
        + "</td></tr>" for site, ws in fleet["workers"].items())
    return (f'{head}<table id="fleet"><tr><th>site</th><th>workers</th><th>polling</th></tr>'
            f"{rows}</table>")


def _running_row(j: dict[str, Any]) -> str:
    return (f'<tr data-job="{_e(j["job_id"])}"><td>{_e(j["action"])} {_e(j["name"])}</td>'
            f'<td>{_bytes(j["bytes_read"])}</td><td>{_e(j["files_read"])}</td>'
            f'<td>{_bytes(j["bytes_uploaded"])}</td><td>{_secs(j["elapsed"])}</td></tr>')


def login(message: str | None) -> str:
    msg = f'<p class="err">{_e(message)}</p>' if message else ""
    body = (f'{msg}<form method="post" action="/login"><label>Token <input type="password" '
            'name="token" autocomplete="current-password" autofocus></label> '
            '<button type="submit">Log in</button></form>')
    return layout("Log in", body, NOBODY)


def error(code: int, message: str) -> str:
    return layout(f"{code}", f'<p class="err">{_e(message)}</p>', NOBODY)
