"""What a restore of "one table" from a dump restores: the table as a DBA means it.

``pg_restore -t orders`` restores the table's definition and rows and nothing that hangs off
it. `select_tables` reads the dump's table of contents (``pg_restore -l``) and the definitions
of its entries (``pg_restore -s``) and picks, for each table asked for: its definition and rows,
its column defaults, constraints, indexes, triggers, rules, policies, extended statistics,
comments and privileges, the sequences it owns (identity and ``serial`` columns) with their
current values, and what those need and the target database lacks (the table's schema, a
sequence a default draws from, a trigger's function). The restore then runs ``pg_restore -L``
with exactly those entries, in the dump's order.

Foreign keys: one from a picked table is restored when the table it references is restored too
or exists in the target database; otherwise it is skipped and reported. One from another table
that references a picked table is reported with its statement, not restored (that table's rows
were not restored with it).

Words: an *entry* is one line of the dump's table of contents (``dumpId; tableoid oid TYPE
SCHEMA TAG OWNER``); its *definition* is the SQL ``pg_restore -s`` prints under the header
``-- Name: TAG; Type: TYPE; Schema: SCHEMA``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from keepwell.errors import UsageError

# the kinds pg_restore -t matches, and every other TYPE a table of contents uses (longest first,
# since several begin with another)
RELATIONS = ("TABLE", "VIEW", "MATERIALIZED VIEW", "FOREIGN TABLE", "SEQUENCE")
_TYPES = sorted({
    *RELATIONS, "TABLE DATA", "MATERIALIZED VIEW DATA", "SEQUENCE SET", "SEQUENCE OWNED BY",
    "DEFAULT", "CONSTRAINT", "FK CONSTRAINT", "CHECK CONSTRAINT", "INDEX", "INDEX ATTACH",
    "TRIGGER", "EVENT TRIGGER", "RULE", "POLICY", "ROW SECURITY", "STATISTICS", "COMMENT",
    "ACL", "DEFAULT ACL", "SECURITY LABEL", "SCHEMA", "FUNCTION", "PROCEDURE", "AGGREGATE",
    "TYPE", "DOMAIN", "EXTENSION", "COLLATION", "CONVERSION", "CAST", "OPERATOR",
    "OPERATOR CLASS", "OPERATOR FAMILY", "TEXT SEARCH CONFIGURATION",
    "TEXT SEARCH DICTIONARY", "TEXT SEARCH PARSER", "TEXT SEARCH TEMPLATE", "PUBLICATION",
    "PUBLICATION TABLE", "PUBLICATION TABLES IN SCHEMA", "SUBSCRIPTION", "LARGE OBJECT",
    "BLOB", "BLOBS", "SERVER", "FOREIGN DATA WRAPPER", "USER MAPPING", "ACCESS METHOD",
    "ENCODING", "STDSTRINGS", "SEARCHPATH", "DATABASE", "DATABASE PROPERTIES",
    "PROCEDURAL LANGUAGE", "TRANSFORM", "SHELL TYPE", "CONSTRAINT TRIGGER",
}, key=len, reverse=True)
_HEADER_RE = re.compile(r"^-- Name: (.*); Type: (.*?); Schema: (.*?); Owner: .*$")
_PLAIN_RE = re.compile(r"^[a-z_][a-z0-9_$]*$")


@dataclass(frozen=True)
class TocEntry:
    line: str
    dump_id: int
    type: str
    schema: str
    tag: str

    @property
    def key(self) -> tuple[str, str, str]:
        return self.type, self.schema, self.tag


def parse_list(text: str) -> list[TocEntry]:
    """The entries of ``pg_restore -l`` output."""
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith(";"):
            continue
        head, sep, rest = line.partition("; ")
        if not sep or not head.strip().isdigit():
            continue
        parts = rest.split(" ", 2)
        if len(parts) < 3:
            continue
        body = parts[2]
        kind = next((t for t in _TYPES if body.startswith(t + " ")), None)
        if kind is None:
            continue
        schema, _, tail = body[len(kind) + 1:].partition(" ")
        tag = tail.rsplit(" ", 1)[0] if " " in tail else tail
        out.append(TocEntry(line, int(head), kind, schema, tag))
    return out


def parse_definitions(script: str) -> dict[tuple[str, str, str], str]:
    """(type, schema, tag) -> the SQL ``pg_restore -s`` prints for that entry."""
    out: dict[tuple[str, str, str], str] = {}
    key: tuple[str, str, str] | None = None
    body: list[str] = []
    for line in script.splitlines():
        m = _HEADER_RE.match(line)
        if m:
            if key is not None:
                out[key] = "\n".join(body)
            key, body = (m.group(2), m.group(3), m.group(1)), []
        elif key is not None and not line.startswith("--"):
            body.append(line)
    if key is not None:
        out[key] = "\n".join(body)
    return out


def ident(name: str) -> str:
    """A name as pg_dump writes it in SQL (quoted unless plain lower case)."""
    return name if _PLAIN_RE.match(name) else '"' + name.replace('"', '""') + '"'


def qualified(schema: str, name: str) -> str:
    return f"{ident(schema)}.{ident(name)}"


def _unqualify(text: str) -> tuple[str, str]:
    """(schema, name) of a qualified name as written in SQL."""
    m = re.match(r'^("(?:[^"]|"")*"|[^."]+)\.("(?:[^"]|"")*"|[^."(]+)$', text.strip())
    if not m:
        return "public", text.strip()

    def plain(part: str) -> str:
        return part[1:-1].replace('""', '"') if part.startswith('"') else part

    return plain(m.group(1)), plain(m.group(2))


@dataclass
class Target:
    """What the target database already has (looked up before choosing)."""

    relations: set[tuple[str, str]] = field(default_factory=set)  # tables and sequences
    schemas: set[str] = field(default_factory=set)
    functions: set[tuple[str, str]] = field(default_factory=set)


@dataclass
class Selection:
    entries: list[TocEntry]
    tables: list[tuple[str, str]]
    restored: dict[str, list[str]]  # kind of object -> names
    skipped: list[str]  # one line each: what, and why


def _match_tables(toc: list[TocEntry], names: list[str], schemas: list[str]
                  ) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for name in names:
        schema, _, bare = name.rpartition(".") if "." in name and not name.startswith('"') \
            else ("", "", name)
        hits = [(e.schema, e.tag) for e in toc if e.type in RELATIONS and e.tag == bare
                and (e.schema == schema if schema else not schemas or e.schema in schemas)]
        if not hits:
            where = f" in schema {', '.join(schemas)}" if schemas and not schema else ""
            raise UsageError(f"the dump holds no table {name}{where}",
                             hint="list its tables with pg_restore -l, or check --schema")
        found += [h for h in hits if h not in found]
    return found


def select_tables(toc: list[TocEntry], defs: dict[tuple[str, str, str], str],
                  names: list[str], schemas: list[str], target: Target) -> Selection:
    """The entries that restore tables `names` (optionally only in `schemas`) completely."""
    tables = _match_tables(toc, names, schemas)
    quals = {qualified(s, t): (s, t) for s, t in tables}
    q_alt = "|".join(re.escape(q) for q in quals)
    keep: set[tuple[str, str, str]] = set()
    restored: dict[str, list[str]] = {}
    skipped: list[str] = []

    def take(entry: TocEntry, kind: str | None = None, name: str | None = None) -> None:
        keep.add(entry.key)
        if kind:
            restored.setdefault(kind, []).append(name or entry.tag)

    def sql(e: TocEntry) -> str:
        return defs.get(e.key, "")

    by_key = {e.key: e for e in toc}
    sequences: set[str] = set()  # qualified names of sequences restored with the tables
    indexes: set[str] = set()
    for e in toc:
        if (e.schema, e.tag) in tables and e.type in (*RELATIONS, "TABLE DATA",
                                                      "MATERIALIZED VIEW DATA"):
            take(e)
        on_table = re.search(rf"ALTER TABLE (?:ONLY )?(?:{q_alt})\s", sql(e)) if q_alt else None
        if e.type == "DEFAULT" and on_table:
            take(e, "defaults")
        elif e.type in ("CONSTRAINT", "CHECK CONSTRAINT") and on_table:
            take(e, "constraints", e.tag.split(" ", 1)[-1])
        elif e.type == "INDEX" and re.search(rf"\sON (?:ONLY )?(?:{q_alt}) USING", sql(e)):
            take(e, "indexes")
            indexes.add(qualified(e.schema, e.tag))
        elif e.type in ("TRIGGER", "CONSTRAINT TRIGGER", "RULE", "POLICY") and re.search(
                rf"\s(?:ON|TO) (?:{q_alt})[\s;]", sql(e)):
            take(e, e.type.lower().replace("constraint ", "") + "s", e.tag.split(" ", 1)[-1])
        elif e.type == "ROW SECURITY" and on_table:
            take(e, "row security")
        elif e.type == "STATISTICS" and re.search(rf"\sFROM (?:{q_alt});", sql(e)):
            take(e, "statistics")
        elif e.type == "SEQUENCE OWNED BY" and re.search(rf"OWNED BY (?:{q_alt})\.", sql(e)):
            take(e)
            sequences.add(qualified(e.schema, e.tag))
        elif e.type == "SEQUENCE" and re.match(rf"ALTER TABLE (?:{q_alt}) ALTER COLUMN",
                                               sql(e).lstrip()):
            sequences.add(qualified(e.schema, e.tag))  # an identity column's
    # sequences: owned ones, and those a restored default draws from that the target lacks
    for e in toc:
        if e.type == "DEFAULT" and e.key in keep:
            for ref in re.findall(r"nextval\('([^']+)'::regclass\)", sql(e)):
                s, n = _unqualify(ref)
                if qualified(s, n) not in sequences and (s, n) not in target.relations:
                    sequences.add(qualified(s, n))
    for e in toc:
        if e.type in ("SEQUENCE", "SEQUENCE SET") and qualified(e.schema, e.tag) in sequences:
            take(e, "sequences" if e.type == "SEQUENCE SET" else None)
    # foreign keys
    for e in toc:
        if e.type != "FK CONSTRAINT":
            continue
        body = sql(e)
        owner = re.search(r"ALTER TABLE (?:ONLY )?(\S+)\s", body)
        ref = re.search(r"REFERENCES (\S+?)\(", body)
        if not owner or not ref:
            continue
        src, dst = _unqualify(owner.group(1)), _unqualify(ref.group(1))
        con = e.tag.split(" ", 1)[-1]
        if src in tables:
            if dst in tables or dst in target.relations:
                take(e, "foreign keys", con)
            else:
                skipped.append(f"foreign key {con} of {qualified(*src)}: it references"
                               f" {qualified(*dst)}, which is neither restored nor in the"
                               " database")
        elif dst in tables:
            statement = " ".join(body.split())
            skipped.append(f"foreign key {con} of {qualified(*src)} references a restored"
                           f" table but belongs to one that is not restored; add it with:"
                           f" {statement}")
    # comments and privileges of what is restored
    objects = set(quals) | sequences | indexes
    o_alt = "|".join(re.escape(o) for o in objects)
    for e in toc:
        if e.type in ("COMMENT", "ACL", "SECURITY LABEL") and o_alt and re.search(
                rf"\s(?:{o_alt})(?:[\s.]|$)", sql(e)):
            on = re.search(r"COMMENT ON CONSTRAINT (\S+) ON ", sql(e))
            if on and on.group(1).strip('"') not in (
                    restored.get("constraints", []) + restored.get("foreign keys", [])):
                continue  # the comment of a foreign key that is not restored
            take(e, "comments" if e.type == "COMMENT" else "privileges"
                 if e.type == "ACL" else None, e.tag)
    # what the target lacks for the above
    for s, _ in tables:
        if s not in target.schemas:
            entry = by_key.get(("SCHEMA", "-", s))
            if entry is not None:
                take(entry, "schemas")
    for e in toc:
        if e.type in ("TRIGGER", "CONSTRAINT TRIGGER") and e.key in keep:
            for fn in re.findall(r"EXECUTE (?:FUNCTION|PROCEDURE) (\S+?)\(", sql(e)):
                s, n = _unqualify(fn)
                if (s, n) not in target.functions:
                    for f in toc:
                        if f.type == "FUNCTION" and f.schema == s and f.tag.split("(")[0] == n:
                            take(f, "functions", f.tag)
    chosen = [e for e in toc if e.key in keep]
    return Selection(chosen, tables, restored, skipped)

