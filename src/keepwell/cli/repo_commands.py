"""Repository and file commands: init, key, backup, snapshots, ls, diff, dump, stats, restore,
forget, prune, check. Parsing and rendering only."""

from __future__ import annotations

import os
import sys
import time
from typing import Annotated, Any

import typer

from keepwell.cli.common import (
    GLOBALS,
    JsonOption,
    PasswordFileOption,
    RepoOption,
    human_bytes,
    open_repo,
    print_json,
    resolve_password,
    resolve_repo,
)
from keepwell.errors import EXIT_FAILURE, EXIT_PARTIAL, DamagedSnapshotError, UsageError

key_app = typer.Typer(help="Manage the passwords of a repository.", no_args_is_help=True)


class Progress:
    """Renders backup/restore events on a terminal; silent in pipes."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() and not GLOBALS.quiet
        self.bytes = 0
        self.files = 0
        self.total = 0
        self.total_files = 0
        self.total_final = False
        self.start = time.monotonic()
        self._last = 0.0

    def set_total(self, files: int, bytes_: int, final: bool) -> None:
        self.total_files, self.total, self.total_final = files, bytes_, final

    def __call__(self, name: str, fields: dict[str, Any]) -> None:
        if name == "bytes":
            self.bytes += fields["n"]
        elif name == "file":
            self.files += 1
        elif name == "files":  # many at once (unchanged files of one directory)
            self.files += fields["n"]
            self.bytes += fields["bytes"]
        elif name == "total":
            self.set_total(fields["files"], fields["bytes"], fields.get("final", True))
            return
        elif name == "error":
            print(f"keepwell: warning: {fields['path']}: {fields['message']}", file=sys.stderr)
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.2:
            return
        self._last = now
        self._render(now)

    def _render(self, now: float) -> None:
        el = now - self.start
        rate = self.bytes / el if el > 0 else 0
        eta = ""
        files = f"{self.files}"
        done = human_bytes(self.bytes)
        if self.total:
            plus = "" if self.total_final else "+"
            files += f"/{self.total_files}{plus}"
            done += f"/{human_bytes(self.total)}{plus} ({min(100.0, 100 * self.bytes / self.total):.0f}%)"
            if self.total_final and rate:
                left = max(0, (self.total - self.bytes) / rate)
                eta = f", ETA {int(left) // 60}:{int(left) % 60:02d}"
        sys.stderr.write(f"\r{self.label}: {files} files, {done}, {human_bytes(rate)}/s{eta}   ")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            self._render(time.monotonic())
            sys.stderr.write("\n")


def init(repo: RepoOption = None, password_file: PasswordFileOption = None,
         copy_chunker_params_from: Annotated[str | None, typer.Option(
             "--copy-chunker-params-from", metavar="SOURCE",
             help="Share the chunker parameters and blob-id key of this repository, so "
                  "'keepwell copy' between the two copies blobs as they are (docs/storage.md).")] = None,
         from_password_file: Annotated[str | None, typer.Option(
             "--from-password-file", envvar="KEEPWELL_FROM_PASSWORD_FILE",
             help="Password file of the --copy-chunker-params-from repository.")] = None,
         compression: Annotated[int, typer.Option(
             "--compression", metavar="LEVEL", min=0, max=19,
             help="zstd level (0: none).")] = 3,
         fast_compression: Annotated[int, typer.Option(
             "--fast-compression", metavar="LEVEL", min=0, max=19,
             help="Level used instead where --compression saves under 3 % on the data being "
                  "written (the same level as --compression: never).")] = 1,
         page_compression: Annotated[int, typer.Option(
             "--page-compression", metavar="LEVEL", min=0, max=19,
             help="Level instead of --compression for database page images (PostgreSQL "
                  "physical backups), where it pays.")] = 5,
         json_: JsonOption = False) -> None:
    """Create a new repository."""
    from keepwell.backends.registry import open_backend
    from keepwell.repository import Repository

    location = resolve_repo(repo)
    if copy_chunker_params_from:
        from keepwell.cli.copy import open_source
        from keepwell.repository.copy import init_like

        with open_source(copy_chunker_params_from, from_password_file) as src:
            r = init_like(open_backend(location), resolve_password(password_file, confirm=True), src,
                          compression=compression, fast_compression=fast_compression,
                          page_compression=page_compression)
    else:
        r = Repository.init(open_backend(location), resolve_password(password_file, confirm=True),
                            compression=compression, fast_compression=fast_compression,
                            page_compression=page_compression)
    if json_:
        print_json({"id": r.id, "location": location,
                    "chunker_params_from": copy_chunker_params_from})
    else:
        print(f"created repository {r.id[:10]} at {location}"
              + (f" (chunker parameters of {copy_chunker_params_from})"
                 if copy_chunker_params_from else ""))


def _count_in_background(progress: Progress, paths: list[str], excludes: list[str],
                         one_file_system: bool) -> None:
    import threading

    from keepwell.sources.files.archiver import scan_totals

    threading.Thread(target=scan_totals, args=(paths, progress.set_total), daemon=True,
                     kwargs={"excludes": excludes, "one_file_system": one_file_system},
                     name="kw-count").start()


def backup(
    paths: Annotated[list[str] | None, typer.Argument(help="Files and directories.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag the snapshot.")] = None,
    host: Annotated[str | None, typer.Option(help="Host name to record.")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", "-e", help="Glob to skip.")] = None,
    exclude_file: Annotated[list[str] | None, typer.Option(help="File of exclude globs.")] = None,
    one_file_system: Annotated[bool, typer.Option("--one-file-system", "-x")] = False,
    stdin: Annotated[bool, typer.Option("--stdin", help="Back up standard input.")] = False,
    stdin_filename: Annotated[str, typer.Option(help="Name for --stdin data.")] = "stdin",
    repo: RepoOption = None, password_file: PasswordFileOption = None, json_: JsonOption = False,
) -> None:
    """Back up files and directories (or standard input) into a new snapshot."""
    from keepwell.sources.files import backup_paths
    from keepwell.sources.files.select import read_pattern_file

    r = open_repo(repo, password_file)
    progress = Progress("backup")
    r.events.subscribe(progress)
    if stdin:
        with r.new_snapshot("stdin", [stdin_filename], host=host, tags=tag or []) as w:
            w.add_stream(stdin_filename, sys.stdin.buffer)
            snap = w.commit()
        errors: list[tuple[str, str]] = []
    else:
        excludes = list(exclude or [])
        for f in exclude_file or []:
            excludes += read_pattern_file(f)
        if progress.enabled:
            _count_in_background(progress, paths or [], excludes, one_file_system)
        res = backup_paths(r, paths or [], excludes=excludes, one_file_system=one_file_system,
                           tags=tag or [], host=host)
        snap, errors = res.snapshot, res.errors
    progress.done()
    s = snap.summary
    if json_:
        print_json({"snapshot": snap.to_json(), "errors": [list(e) for e in errors]})
    else:
        print(f"snapshot {snap.short_id} saved: {s.get('files_new', 0)} new, "
              f"{s.get('files_changed', 0)} changed, {s.get('files_unmodified', 0)} unmodified files; "
              f"{human_bytes(s.get('bytes_processed', s.get('bytes_read', 0)))} processed, "
              f"{human_bytes(s.get('bytes_added', 0))} new, {human_bytes(s.get('bytes_stored', 0))} "
              f"stored, {s.get('duration', 0):.1f}s")
    if errors:
        print(f"keepwell: {len(errors)} item(s) could not be read; the snapshot is partial",
              file=sys.stderr)
        raise typer.Exit(EXIT_PARTIAL)


def snapshots(kind: Annotated[str | None, typer.Option(help="Only this kind.")] = None,
              repo: RepoOption = None, password_file: PasswordFileOption = None,
              json_: JsonOption = False) -> None:
    """List snapshots."""
    r = open_repo(repo, password_file)
    snaps = r.list_snapshots(kind)
    if json_:
        print_json([s.to_json() for s in snaps])
        return
    print(f"{'ID':8}  {'Time':19}  {'Host':12}  {'Kind':16}  {'Tags':12}  Paths")
    for s in snaps:
        print(f"{s.short_id}  {s.time.astimezone().strftime('%Y-%m-%d %H:%M:%S')}  {s.host[:12]:12}  "
              f"{s.kind[:16]:16}  {','.join(s.tags)[:12]:12}  {' '.join(s.paths)}")
    print(f"{len(snaps)} snapshots")


def ls(snapshot: str, path: Annotated[str, typer.Argument()] = "", repo: RepoOption = None,
       password_file: PasswordFileOption = None, json_: JsonOption = False) -> None:
    """List the files of a snapshot."""
    r = open_repo(repo, password_file)
    snap = r.find_snapshot(snapshot)
    prefix = path.strip("/")
    rows = []
    for p, node in r.walk(snap):
        if prefix and not (p == prefix or p.startswith(prefix + "/")):
            continue
        if json_:
            rows.append({"path": "/" + p, **node.to_json()})
        else:
            print(f"/{p}" + ("/" if node.type == "dir" else ""))
    if json_:
        print_json(rows)


def diff(a: str, b: str, repo: RepoOption = None, password_file: PasswordFileOption = None,
         json_: JsonOption = False) -> None:
    """Show what changed between two snapshots."""
    r = open_repo(repo, password_file)
    sa, sb = r.find_snapshot(a), r.find_snapshot(b)
    na = {p: (n.type, n.content, n.mode, n.size) for p, n in r.walk(sa)}
    nb = {p: (n.type, n.content, n.mode, n.size) for p, n in r.walk(sb)}
    out = {"added": sorted(set(nb) - set(na)), "removed": sorted(set(na) - set(nb)),
           "modified": sorted(p for p in set(na) & set(nb) if na[p] != nb[p] and na[p][0] != "dir")}
    if json_:
        print_json(out)
        return
    for sign, key in (("+", "added"), ("-", "removed"), ("M", "modified")):
        for p in out[key]:
            print(f"{sign}    /{p}")
    print(f"{len(out['added'])} added, {len(out['removed'])} removed, {len(out['modified'])} modified")


def dump(snapshot: str, path: str, repo: RepoOption = None,
         password_file: PasswordFileOption = None) -> None:
    """Write one file of a snapshot to standard output."""
    r = open_repo(repo, password_file)
    snap = r.find_snapshot(snapshot)
    out = sys.stdout.buffer
    for chunk in r.iter_file(snap, path):
        out.write(chunk)
    out.flush()


def stats(repo: RepoOption = None, password_file: PasswordFileOption = None,
          json_: JsonOption = False) -> None:
    """Raw versus stored size, deduplication ratio, blob counts."""
    r = open_repo(repo, password_file)
    snaps = r.list_snapshots()
    raw = sum(n.size for s in snaps for _p, n in r.walk(s) if n.type == "file")
    blobs = {"data": 0, "tree": 0}
    unique_raw = 0
    for _bid, loc in r.index.entries():
        blobs["tree" if loc.type == 1 else "data"] += 1
        unique_raw += loc.raw_length
    stored = sum(i.size for p in ("data/", "tree/") for i in r.backend.list(p))
    out = {"snapshots": len(snaps), "total_file_size": raw, "unique_raw_size": unique_raw,
           "stored_size": stored, "dedup_ratio": round(raw / unique_raw, 3) if unique_raw else 0,
           "compression_ratio": round(unique_raw / stored, 3) if stored else 0,
           "blobs": blobs, "index_bytes_in_memory": r.index.nbytes()}
    if json_:
        print_json(out)
        return
    print(f"snapshots:          {len(snaps)}")
    print(f"total file size:    {human_bytes(raw)}")
    print(f"unique data:        {human_bytes(unique_raw)}  (dedup ratio {out['dedup_ratio']}x)")
    print(f"stored:             {human_bytes(stored)}  (compression {out['compression_ratio']}x)")
    print(f"blobs:              {blobs['data']} data, {blobs['tree']} tree")


def restore(snapshot: str,
            target: Annotated[str, typer.Option("--target", "-t", help="Directory to restore into.")],
            include: Annotated[list[str] | None, typer.Option("--include", "-i")] = None,
            exclude: Annotated[list[str] | None, typer.Option("--exclude", "-e")] = None,
            overwrite: Annotated[bool, typer.Option(help="Allow a non-empty target.")] = False,
            repo: RepoOption = None, password_file: PasswordFileOption = None,
            json_: JsonOption = False) -> None:
    """Restore a snapshot; every blob is verified against its id before it is written."""
    from keepwell.sources.files import restore_snapshot

    r = open_repo(repo, password_file)
    snap = r.find_snapshot(snapshot)
    progress = Progress("restore")
    r.events.subscribe(progress)
    res = restore_snapshot(r, snap, target, includes=include or [], excludes=exclude or [],
                           overwrite=overwrite)
    progress.done()
    if json_:
        print_json({"files": res.files, "dirs": res.dirs, "bytes": res.bytes,
                    "errors": [list(e) for e in res.errors]})
    else:
        print(f"restored {res.files} files, {res.dirs} dirs, {human_bytes(res.bytes)} to {target}")
    if res.errors:
        for path, msg in res.errors[:20]:
            print(f"keepwell: {path}: {msg}", file=sys.stderr)
        raise typer.Exit(EXIT_FAILURE)


def forget(
    snapshot_ids: Annotated[list[str] | None, typer.Argument(help="Snapshots to forget.")] = None,
    keep_last: int = 0, keep_hourly: int = 0, keep_daily: int = 0, keep_weekly: int = 0,
    keep_monthly: int = 0, keep_yearly: int = 0,
    keep_within: Annotated[str | None, typer.Option(help="e.g. 7d, 1y6m")] = None,
    keep_tag: Annotated[list[str] | None, typer.Option()] = None,
    kind: Annotated[str | None, typer.Option(help="Only snapshots of this kind.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n")] = False,
    prune_: Annotated[bool, typer.Option("--prune", help="Prune afterwards.")] = False,
    max_unused: Annotated[str, typer.Option(help="With --prune: as prune --max-unused.")] = "5%",
    grace: Annotated[str, typer.Option(help="With --prune: as prune --grace.")] = "1h",
    repo: RepoOption = None, password_file: PasswordFileOption = None, json_: JsonOption = False,
) -> None:
    """Remove snapshots by id or by a --keep-* policy."""
    from keepwell.repository.policy import Policy, apply_policy, parse_duration
    from keepwell.repository.prune import PruneOptions, parse_grace, parse_max_unused

    r = open_repo(repo, password_file)
    damaged: list[str] = []  # named, but unreadable: forgotten by their id alone
    if snapshot_ids:
        remove = []
        for ref in snapshot_ids:
            try:
                remove.append(r.find_snapshot(ref))
            except DamagedSnapshotError as exc:
                damaged.append(exc.snapshot_id)
        kept: list[Any] = []
    else:
        policy = Policy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly,
                        parse_duration(keep_within) if keep_within else None, keep_tag or [])
        if policy.empty():
            raise UsageError("no snapshots and no --keep-* policy given: refusing to forget everything")
        snaps = [s for s in r.list_snapshots(kind) if kind or s.kind in ("files", "stdin", "sqlite")]
        kept, remove = apply_policy(snaps, policy)
    prune_opts = PruneOptions(max_unused=parse_max_unused(max_unused), grace=parse_grace(grace))
    if not dry_run:
        r.forget([s.id for s in remove] + damaged)
    if json_:
        pruned = _run_prune(r, prune_opts, quiet=True) if prune_ and not dry_run else None
        print_json({"keep": [{"id": s.id, "reasons": why} for s, why in kept],
                    "remove": [s.id for s in remove] + damaged, "dry_run": dry_run,
                    **({"prune": pruned} if pruned is not None else {})})
    else:
        for s, why in kept:
            print(f"keep   {s.short_id}  {s.time.astimezone():%Y-%m-%d %H:%M}  {', '.join(why)}")
        for s in remove:
            print(f"{'would remove' if dry_run else 'remove'} {s.short_id}  {s.time.astimezone():%Y-%m-%d %H:%M}")
        for sid in damaged:
            print(f"{'would remove' if dry_run else 'remove'} {sid[:8]}  (damaged)")
        if prune_ and not dry_run:
            _run_prune(r, prune_opts, quiet=False)


def _run_prune(r: Any, opts: Any, *, quiet: bool) -> dict[str, Any]:
    from keepwell.repository.prune import prune as do_prune

    rep = do_prune(r, opts)
    if not quiet:
        for w in rep.warnings:
            print(f"keepwell: warning: {w}", file=sys.stderr)
        would = "would " if rep.dry_run else ""
        print(f"prune: {would}repack {rep.packs_repacked} packs ({human_bytes(rep.bytes_repacked)} "
              f"copied), {would}mark {rep.packs_marked} for deletion, {would}delete "
              f"{rep.packs_deleted} ({human_bytes(rep.bytes_freed)} freed), restored "
              f"{rep.packs_restored}, kept {rep.packs_kept}"
              + (f" ({rep.packs_deferred} unused ones until running backups end)"
                 if rep.packs_deferred else ""))
        if rep.packs_pending:
            why = (f" and the {rep.waiting_for_sessions} running backup(s) that may use them end"
                   if rep.waiting_for_sessions else "")
            print(f"prune: {rep.packs_pending} packs ({human_bytes(rep.bytes_pending)}) are pending "
                  f"deletion; a later prune (or prune --wait) deletes them once the grace period "
                  f"has passed{why}")
    return dict(rep.__dict__)


def prune(
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n")] = False,
    max_unused: Annotated[str, typer.Option(
        help="Unused data allowed to stay in partly used packs: a percentage of the repository "
             "(5%), a size (2G) or 'unlimited'; beyond it, packs are repacked.")] = "5%",
    max_repack_size: Annotated[str | None, typer.Option(
        help="Copy at most this much data while repacking (e.g. 10G).")] = None,
    repack_small: Annotated[bool, typer.Option(
        "--repack-small", help="Also merge packs smaller than half their target size.")] = False,
    grace: Annotated[str, typer.Option(
        help="How long packs stay pending after every backup that might use them ended "
             "(0, 90s, 30min, 2h, 1d); protects restores and checks running meanwhile.")] = "1h",
    wait: Annotated[bool, typer.Option(
        "--wait", help="Wait until this run's packs can be deleted, and delete them.")] = False,
    repo: RepoOption = None, password_file: PasswordFileOption = None,
    json_: JsonOption = False,
) -> None:
    """Repack partly used packs and delete unused ones, in two phases, beside running backups."""
    from keepwell.repository.prune import PruneOptions, parse_grace, parse_max_unused, parse_size

    opts = PruneOptions(
        max_unused=parse_max_unused(max_unused),
        max_repack_bytes=parse_size(max_repack_size, "--max-repack-size") if max_repack_size else None,
        repack_small=repack_small, grace=parse_grace(grace), wait=wait, dry_run=dry_run)
    report = _run_prune(open_repo(repo, password_file), opts, quiet=json_)
    if json_:
        print_json(report)


def check(read_data: Annotated[bool, typer.Option("--read-data")] = False,
          read_data_subset: Annotated[str | None, typer.Option(help="e.g. 10%")] = None,
          repo: RepoOption = None, password_file: PasswordFileOption = None,
          json_: JsonOption = False) -> None:
    """Check structure; with --read-data also decrypt and verify every blob."""
    from keepwell.repository.check import check as do_check

    fraction = 1.0 if read_data else 0.0
    if read_data_subset:
        try:
            fraction = float(read_data_subset.rstrip("%")) / 100
        except ValueError:
            raise UsageError(f"--read-data-subset {read_data_subset!r}: give a percentage like 10%") from None
    rep = do_check(open_repo(repo, password_file), read_data_fraction=fraction)
    if json_:
        print_json(rep.__dict__)
    else:
        for w in rep.warnings:
            print(f"warning: {w}")
        for e in rep.errors:
            print(f"error: {e}")
        print(("no errors were found" if rep.ok else f"{len(rep.errors)} errors found")
              + (f" ({rep.packs_read} packs, {rep.blobs_checked} blobs read)" if fraction else ""))
    if not rep.ok:
        raise typer.Exit(EXIT_FAILURE)


@key_app.command("list")
def key_list(repo: RepoOption = None, password_file: PasswordFileOption = None,
             json_: JsonOption = False) -> None:
    """List the keys (passwords) of the repository."""
    from keepwell.repository.keys import list_keys

    r = open_repo(repo, password_file)
    ks = list_keys(r.backend)
    if json_:
        print_json([{**k.__dict__, "current": k.id == r.key_id} for k in ks])
        return
    for k in ks:
        print(f"{'*' if k.id == r.key_id else ' '} {k.id[:10]}  {k.created[:19]}  {k.username}@{k.host}")


@key_app.command("add")
def key_add(new_password_file: Annotated[str | None, typer.Option(help="File with the new password.")] = None,
            repo: RepoOption = None, password_file: PasswordFileOption = None) -> None:
    """Add a password."""
    from keepwell.repository.keys import add_key

    r = open_repo(repo, password_file)
    new = _new_password(new_password_file)
    print(f"added key {add_key(r.backend, r.master, new)[:10]}")


@key_app.command("remove")
def key_remove(key_id: str, repo: RepoOption = None, password_file: PasswordFileOption = None) -> None:
    """Remove a password (not the one in use)."""
    from keepwell.repository.keys import remove_key

    r = open_repo(repo, password_file)
    remove_key(r.backend, key_id, r.key_id)
    print(f"removed key {key_id}")


@key_app.command("passwd")
def key_passwd(new_password_file: Annotated[str | None, typer.Option()] = None,
               repo: RepoOption = None, password_file: PasswordFileOption = None) -> None:
    """Change the password in use."""
    from keepwell.repository.keys import add_key

    r = open_repo(repo, password_file)
    new_id = add_key(r.backend, r.master, _new_password(new_password_file))
    r.backend.delete(f"keys/{r.key_id}")
    print(f"password changed (key {new_id[:10]})")


def _new_password(path: str | None) -> str:
    if path:
        with open(path, encoding="utf-8") as f:
            pw = f.readline().rstrip("\r\n")
    elif os.environ.get("KEEPWELL_NEW_PASSWORD"):
        pw = os.environ["KEEPWELL_NEW_PASSWORD"]
    elif sys.stdin.isatty():
        pw = typer.prompt("new password", hide_input=True, confirmation_prompt=True)
    else:
        raise UsageError("no new password", hint="pass --new-password-file or set KEEPWELL_NEW_PASSWORD")
    if not pw:
        raise UsageError("empty new password")
    return str(pw)


def register(app: typer.Typer) -> None:
    for fn in (init, backup, snapshots, ls, diff, dump, stats, restore, forget, prune, check):
        app.command()(fn)
    app.add_typer(key_app, name="key")


