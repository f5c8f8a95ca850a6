"""Optional extras: which ``pip install 'keepwell[EXTRA]'`` provides which import.

keepwell imports an optional SDK only where it is needed (a backend when its scheme is used, a
database driver when a database command runs). When one is missing, `missing_extra` turns the
``ImportError`` into a `MissingExtraError` that names the extra to install.
"""

from __future__ import annotations

from keepwell.errors import MissingExtraError

# top-level module -> the extra that installs it (pyproject.toml, [project.optional-dependencies])
EXTRA_OF_MODULE = {
    "obstore": "s3",
    "paramiko": "sftp",
    "psycopg": "postgres",
    "psycopg_binary": "postgres",
    "google_crc32c": "postgres",
    "pymysql": "mysql",
    "pydantic": "control",
    "pydantic_core": "control",
    "yaml": "control",
    "prometheus_client": "control",
    "cronsim": "control",
    "opentelemetry": "tracing",
    "pyfuse3": "mount",
    "trio": "mount",
    "temporalio": "fleet",
}


def missing_extra(exc: ImportError, what: str | None = None) -> MissingExtraError | None:
    """The error to show for a failed import of an optional dependency; None when the import
    that failed is not one of them (a bug, to be shown as such)."""
    name = (exc.name or "").split(".", 1)[0]
    extra = EXTRA_OF_MODULE.get(name)
    if extra is None:
        return None
    needs = f"{what} needs" if what else "this command needs"
    return MissingExtraError(f"{needs} the Python package {name!r}, which is not installed",
                             hint=f"install it with: pip install 'keepwell[{extra}]'")
