"""The OpenAPI 3.1 description of the JSON API (served at ``/api/v1/openapi.json``).

Kept beside the routes of `keepwell.web.server`; a test checks that every route is described.
"""

from __future__ import annotations

from typing import Any

_OBJ: dict[str, Any] = {"type": "object"}
_LIST: dict[str, Any] = {"type": "array", "items": {"type": "object"}}
_ERR = {"description": "error", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}, "status": {"type": "integer"}}}}}}


def _get(summary: str, schema: dict[str, Any], params: list[dict[str, Any]] | None = None
         ) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {
        "200": {"description": "ok", "content": {"application/json": {"schema": schema}}},
        "401": _ERR, "404": _ERR}}
    if params:
        op["parameters"] = params
    return {"get": op}


def _post(summary: str, body: dict[str, Any] | None, code: str = "200") -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": [{"name": "X-Keepwell-CSRF", "in": "header", "required": False,
                        "schema": {"type": "string"},
                        "description": "the CSRF token of GET /api/v1/session; needed unless "
                                       "the request carries a bearer token"}],
        "responses": {code: {"description": "accepted", "content": {
            "application/json": {"schema": _OBJ}}},
            "400": _ERR, "401": _ERR, "403": _ERR, "404": _ERR, "409": _ERR}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return {"post": op}


def _path_param(name: str, kind: str = "string") -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": kind}}


def _query(name: str, kind: str = "string") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": {"type": kind}}


def schema() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/api/v1/session": _get("Who is asking, and the CSRF token actions need", _OBJ),
        "/api/v1/overview": _get("Every source with its state, open alerts, running jobs, "
                                 "drills", _OBJ),
        "/api/v1/sources": _get("Every source: state, last success, next run, PITR window; "
                                "what needs attention first", _LIST),
        "/api/v1/sources/{name}": _get("One source, its backups over time, its runs and its "
                                       "snapshots", _OBJ, [_path_param("name")]),
        "/api/v1/sources/{name}/snapshots": _get("The snapshots of one source, newest first",
                                                 _LIST, [_path_param("name")]),
        "/api/v1/runs": _get("Runs, newest first", _LIST,
                             [_query("source"), _query("action"), _query("status"),
                              _query("limit", "integer")]),
        "/api/v1/runs/{id}": _get("One run with its log lines", _OBJ,
                                  [_path_param("id", "integer")]),
        "/api/v1/jobs/{job_id}": _get("Every attempt (run) of one job, oldest first", _LIST,
                                      [_path_param("job_id")]),
        "/api/v1/running": _get("Running jobs with live progress; the fleet's "
                                "workers per site in fleet mode", _OBJ),
        "/api/v1/events": {"get": {"summary": "Server-sent events: 'running' (as "
                                              "/api/v1/running) every second",
                                   "responses": {"200": {"description": "an event stream",
                                                         "content": {"text/event-stream": {}}}}}},
        "/api/v1/repositories": _get("Every repository: size, dedup and compression "
                                     "ratios, last check", _LIST),
        "/api/v1/repositories/{name}": _get("One repository with its growth over time", _OBJ,
                                            [_path_param("name")]),
        "/api/v1/drills": _get("Every drill with RTO and RPO over time", _LIST),
        "/api/v1/alerts": _get("Active alerts (all=1: resolved ones too)", _LIST,
                               [_query("all")]),
        "/api/v1/alerts/{key}/acknowledge": {
            **_post("Acknowledge an active alert (it stays active until resolved)", None),
        },
        "/api/v1/actions/backup": _post(
            "Back up a source now", {"type": "object", "required": ["source"],
                                     "properties": {"source": {"type": "string"}}}, "202"),
        "/api/v1/actions/drill": _post(
            "Run a restore drill now", {"type": "object",
                                        "properties": {"drill": {"type": "string"},
                                                       "source": {"type": "string"}}}, "202"),
        "/api/v1/openapi.json": _get("This description", _OBJ),
    }
    paths["/api/v1/alerts/{key}/acknowledge"]["post"]["parameters"].append(_path_param("key"))
    return {
        "openapi": "3.1.0",
        "info": {"title": "keepwell", "version": "1",
                 "description": "The keepwell dashboard's JSON API (docs/web.md)."},
        "components": {"securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "session": {"type": "apiKey", "in": "cookie", "name": "keepwell_session"}}},
        "security": [{}, {"bearer": []}, {"session": []}],
        "paths": paths,
    }
