"""The pure parts of the restore guards: WAL record rewriting, live paths, fetch policy, hook
options, and the choice of what makes up a table in a dump."""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest

from keepwell.errors import RestoreTargetError, UsageError
from keepwell.sources.postgres.catalog import BaseBackup
from keepwell.sources.postgres.liveservers import LivePaths, LiveServer
from keepwell.sources.postgres.restoretarget import plan_layout
from keepwell.sources.postgres.tablepick import (
    Target,
    parse_definitions,
    parse_list,
    select_tables,
)
from keepwell.sources.postgres.walcommand import parse_args
from keepwell.sources.postgres.walguard import FetchPolicy
from keepwell.sources.postgres.walnames import Lsn
from keepwell.sources.postgres.walrecords import (
    RECORD_HEADER,
    TablespaceCreate,
    WalLayout,
    record_crc,
    rewrite_location,
)

PAGE = 8192
SEG = 4 * PAGE


def tablespace_record(oid: int, path: str) -> bytes:
    data = struct.pack("<I", oid) + path.encode() + b"\0"
    body = bytes([255, len(data)]) + data
    head = RECORD_HEADER.pack(RECORD_HEADER.size + len(body), 7, 0, 0, 5, 0)
    record = bytearray(head + body)
    struct.pack_into("<I", record, 20, record_crc(record))
    return bytes(record)


def place(segment: bytearray, offset: int, record: bytes) -> None:
    """Write `record` at `offset`, skipping the page header where it crosses a page."""
    pos = offset
    for byte in record:
        if pos % PAGE == 0:
            pos += 24
        segment[pos] = byte
        pos += 1


@pytest.mark.parametrize("offset", [40, PAGE - 32], ids=["in-page", "across-pages"])
def test_rewrite_location_keeps_the_record_valid(tmp_path: Path, offset: int) -> None:
    name = "000000010000000000000000"
    segment = bytearray(SEG)
    record = tablespace_record(16400, "/srv/live/ts2")
    place(segment, offset, record)
    (tmp_path / name).write_bytes(bytes(segment))
    layout = WalLayout(1, SEG, PAGE, lambda n: str(tmp_path / n) if n == name else None)
    create = TablespaceCreate(Lsn(offset), "16400", "/srv/live/ts2")
    rewrite_location(layout, create, "")
    rewritten = layout.read(Lsn(offset), len(record))
    assert len(rewritten) == len(record) and record_crc(rewritten) == struct.unpack_from(
        "<I", rewritten, 20)[0]
    assert bytes(rewritten[30:]) == b"\0" * (len("/srv/live/ts2") + 1)
    rewrite_location(layout, TablespaceCreate(Lsn(offset), "16400", ""), "/srv/a")
    assert b"/srv/a\0" in bytes(layout.read(Lsn(offset), len(record)))
    from keepwell.sources.postgres.errors import ToolError

    with pytest.raises(ToolError, match="longer"):
        rewrite_location(layout, create, "/a/path/much/longer/than/the/record")


def test_live_paths_conflict_in_both_directions(tmp_path: Path) -> None:
    live = LivePaths([LiveServer(1, str(tmp_path / "main"), (str(tmp_path / "ts"),))],
                     ours=str(tmp_path / "restored"))
    assert "is the data directory" in str(live.conflict(str(tmp_path / "main")))
    assert "is inside" in str(live.conflict(str(tmp_path / "main" / "base")))
    assert "holds" in str(live.conflict(str(tmp_path)))
    assert "tablespace" in str(live.conflict(str(tmp_path / "ts")))
    assert live.conflict(str(tmp_path / "mainly")) is None
    assert live.conflict(str(tmp_path / "restored")) is None


def test_two_tablespaces_are_never_placed_in_one_directory(tmp_path: Path) -> None:
    """Their files have the same names (PG_15_.../<database>/<relfilenode>): in one directory,
    or one inside the other, a table of one would overwrite a table of the other."""
    t = datetime(2026, 1, 1, tzinfo=UTC)
    backup = BaseBackup("b" * 16, "b" * 8, t, 1, Lsn(0x1000028), Lsn(0x1000100), t, t,
                        16 << 20, 100, "15.2", False,
                        {"16385": {"name": "ts1", "location": "/a"},
                         "16386": {"name": "ts2", "location": "/b"}})
    root, live = str(tmp_path / "r"), LivePaths([])
    for ts1, ts2 in (("same", "same"), ("outer", "outer/inner"), ("x/in", "x")):
        with pytest.raises(RestoreTargetError, match="cannot share a directory"):
            plan_layout(root, backup, delta=False, live=live,
                        tablespace_map={"ts1": str(tmp_path / ts1), "16386": str(tmp_path / ts2)})
    layout = plan_layout(root, backup, delta=False, live=live,
                         tablespace_map={"ts1": str(tmp_path / "one"), "ts2": str(tmp_path / "two")})
    assert [p.directory for p in layout.tablespaces] == [str(tmp_path / "one"),
                                                          str(tmp_path / "two")]
    assert len(plan_layout(root, backup, delta=False, live=live,
                           tablespace_map_all=str(tmp_path / "all")).tablespaces) == 2
    # a tablespace the WAL creates (known by OID) too
    with pytest.raises(RestoreTargetError, match="cannot share a directory"):
        plan_layout(root, backup, delta=False, live=live,
                    tablespace_map={"ts1": str(tmp_path / "x"), "16390": str(tmp_path / "x/y")})
    with pytest.raises(RestoreTargetError, match="inside the target directory"):
        plan_layout(root, backup, delta=False, live=live,
                    tablespace_map={"16390": str(tmp_path / "r" / "ts")})
    # one tablespace named twice, by name and by OID, is no conflict
    plan_layout(root, backup, delta=False, live=live,
                tablespace_map={"ts1": str(tmp_path / "one"), "16385": str(tmp_path / "one")})


def test_fetch_policy_and_hook_options() -> None:
    policy = FetchPolicy("inside", {"16400": "/t"}, None, 2, True, "point")
    _cmd, _pos, opts = parse_args(["fetch", "f", "p", *policy.args()])
    again = FetchPolicy.parse(tablespaces=opts["--tablespaces"],
                              tablespace_map=opts["--tablespace-map"].split("\n"),
                              timeline=opts["--timeline"], allow_gap="--allow-gap" in opts,
                              target=opts["--target"])
    assert again == policy and again.wanted_location("16400") == "/t"
    assert parse_args(["push", "p", "--repo", "a", "--repo", "b"])[2]["--repo"] == "a\nb"
    with pytest.raises(UsageError, match="given twice"):
        parse_args(["push", "p", "--cluster", "a", "--cluster", "b"])
    with pytest.raises(UsageError):
        FetchPolicy.parse(tablespace_map=["name=/dir"])


TOC = """\
;
; Archive created at 2026-12-07 00:47:29 UTC
215; 1259 16386 TABLE public customers postgres
217; 1259 16395 TABLE public orders postgres
3380; 0 0 COMMENT public TABLE orders postgres
216; 1259 16394 SEQUENCE public orders_id_seq postgres
3383; 0 0 SEQUENCE OWNED BY public orders_id_seq postgres
3209; 2604 16398 DEFAULT public orders id postgres
3370; 0 16395 TABLE DATA public orders postgres
3386; 0 0 SEQUENCE SET public orders_id_seq postgres
3218; 2606 16405 CONSTRAINT public orders orders_pkey postgres
3215; 1259 16411 INDEX public orders_created_idx postgres
3216; 1259 16412 INDEX public customers_name_idx postgres
3222; 2606 16406 FK CONSTRAINT public orders orders_customer_fkey postgres
"""
DEFS = """\
-- Name: orders; Type: TABLE; Schema: public; Owner: postgres
CREATE TABLE public.orders (id integer NOT NULL, customer integer);
-- Name: TABLE orders; Type: COMMENT; Schema: public; Owner: postgres
COMMENT ON TABLE public.orders IS 'x';
-- Name: orders_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: postgres
ALTER SEQUENCE public.orders_id_seq OWNED BY public.orders.id;
-- Name: orders id; Type: DEFAULT; Schema: public; Owner: postgres
ALTER TABLE ONLY public.orders ALTER COLUMN id SET DEFAULT nextval('public.orders_id_seq'::regclass);
-- Name: orders orders_pkey; Type: CONSTRAINT; Schema: public; Owner: postgres
ALTER TABLE ONLY public.orders
    ADD CONSTRAINT orders_pkey PRIMARY KEY (id);
-- Name: orders_created_idx; Type: INDEX; Schema: public; Owner: postgres
CREATE INDEX orders_created_idx ON public.orders USING btree (created);
-- Name: customers_name_idx; Type: INDEX; Schema: public; Owner: postgres
CREATE INDEX customers_name_idx ON public.customers USING btree (name);
-- Name: orders orders_customer_fkey; Type: FK CONSTRAINT; Schema: public; Owner: postgres
ALTER TABLE ONLY public.orders
    ADD CONSTRAINT orders_customer_fkey FOREIGN KEY (customer) REFERENCES public.customers(id);
"""


def test_a_table_is_restored_with_what_hangs_off_it() -> None:
    toc, defs = parse_list(TOC), parse_definitions(DEFS)
    assert [e.type for e in toc][:2] == ["TABLE", "TABLE"] and toc[4].type == "SEQUENCE OWNED BY"
    sel = select_tables(toc, defs, ["orders"], [], Target(schemas={"public"}))
    ids = [e.dump_id for e in sel.entries]
    assert ids == [217, 3380, 216, 3383, 3209, 3370, 3386, 3218, 3215]
    assert "customers" in sel.skipped[0] and "orders_customer_fkey" in sel.skipped[0]
    # with customers in the database, the foreign key comes back too
    sel = select_tables(toc, defs, ["orders"], [],
                        Target({("public", "customers")}, {"public"}))
    assert sel.restored["foreign keys"] == ["orders_customer_fkey"] and not sel.skipped
    with pytest.raises(UsageError, match="no table nosuch"):
        select_tables(toc, defs, ["nosuch"], [], Target())


def test_a_fetched_segment_of_another_cluster_is_refused(tmp_path: Path) -> None:
    from keepwell.sources.postgres.catalog import Catalog
    from keepwell.sources.postgres.errors import ForeignClusterError
    from keepwell.sources.postgres.walguard import check_segment_identity

    def segment(sysid: int) -> Path:
        path = tmp_path / f"seg-{sysid}"
        head = struct.pack("<HHIQI4xQII", 0xD110, 0x0002, 1, 0, 0, sysid, 16 << 20, PAGE)
        path.write_bytes(head + bytes(PAGE - len(head)))
        return path

    cat = Catalog("main", system_identifier=42)
    check_segment_identity("000000010000000000000001", str(segment(42)), cat)
    with pytest.raises(ForeignClusterError, match="system identifier 43"):
        check_segment_identity("000000010000000000000001", str(segment(43)), cat)
