"""The dashboard and its JSON API (``keepwell web``; the daemon serves it when ``web.listen``
is set).

`views` shapes the control plane's figures into plain dicts, `pages` renders them as HTML,
`openapi` describes the API, `server` routes and guards requests; `serve` builds a server for a
config. Built on the standard library's HTTP server: no extra dependency.
"""
