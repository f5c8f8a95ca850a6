"""Repository and file commands: init, backup, snapshots, ls, diff, dump, stats, restore, forget,
prune, check (and the ``key`` group of keepwell.cli.keys). Parsing and rendering only."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from keepwell.cli import keys
from keepwell.cli.common import (
    GLOBALS,
    HostFilterOption,
    JsonOption,
    KeepDailyOption,
    KeepHourlyOption,
    KeepLastOption,
    KeepMonthlyOption,
    KeepTagOption,
    KeepWeeklyOption,
    KeepWithinDailyOption,
    KeepWithinHourlyOption,
    KeepWithinMonthlyOption,
    KeepWithinOption,
    KeepWithinWeeklyOption,
    KeepWithinYearlyOption,
    KeepYearlyOption,
    KindFilterOption,
    PasswordFileOption,
    PathFilterOption,
    RepoOption,
    TagFilterOption,
    human_bytes,
    keep_policy,
    open_repo,
    print_json,
    refuse_empty,
    resolve_password,
    resolve_repo,
    snapshot_filter,
    tags_given,
)
from keepwell.errors import EXIT_FAILURE, EXIT_PARTIAL, DamagedSnapshotError, UsageError

if TYPE_CHECKING:
    from keepwell.repository import Repository, Snapshot


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
             "--from-password-file",
             help="Password file of the --copy-chunker-params-from repository (default: "
                  "$KEEPWELL_FROM_PASSWORD, then $KEEPWELL_FROM_PASSWORD_FILE).")] = None,
         allow_non_empty: Annotated[bool, typer.Option(
             "--allow-non-empty",
             help="Create the repository even where other files already are.")] = False,
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
         append_keys: Annotated[bool, typer.Option(
             "--append-keys",
             help="Make a repository (format version 2) that can have append keys: keys that "
                  "add backups but can read and delete nothing (docs/security.md).")] = False,
         json_: JsonOption = False) -> None:
    """Create a new repository (in an empty location, unless --allow-non-empty)."""
    from keepwell.backends.registry import open_backend
    from keepwell.repository import Repository

    refuse_empty("--copy-chunker-params-from", copy_chunker_params_from,
                 "give the repository, or leave the option out")
    refuse_empty("--from-password-file", from_password_file, "give the file, or leave the option out")
    location = resolve_repo(repo)
    levels: dict[str, Any] = {"compression": compression, "fast_compression": fast_compression,
                              "page_compression": page_compression,
                              "require_empty": not allow_non_empty, "append_keys": append_keys}
    if copy_chunker_params_from:
        from keepwell.cli.copy import open_source
        from keepwell.repository.copy import init_like

        with open_source(copy_chunker_params_from, from_password_file) as src:
            r = init_like(open_backend(location), resolve_password(password_file, confirm=True), src,
                          **levels)
    else:
        if from_password_file:
            raise UsageError("--from-password-file is for --copy-chunker-params-from")
        r = Repository.init(open_backend(location), resolve_password(password_file, confirm=True),
                            **levels)
    if json_:
        print_json({"id": r.id, "location": location,
                    "chunker_params_from": copy_chunker_params_from,
                    "version": r.config["version"]})
    else:
        print(f"created repository {r.id[:10]} at {location}"
              + (f" (chunker parameters of {copy_chunker_params_from})"
                 if copy_chunker_params_from else ""))


def _count_in_background(progress: Progress, paths: list[str], selection: Any,
                         one_file_system: bool) -> None:
    import threading

    from keepwell.sources.files.archiver import scan_totals

    threading.Thread(target=scan_totals, args=(paths, progress.set_total), daemon=True,
                     kwargs={"selection": selection, "one_file_system": one_file_system},
                     name="kw-count").start()


def selection_of(exclude: list[str] | None, exclude_file: list[str] | None,
               iexclude: list[str] | None, iexclude_file: list[str] | None,
               exclude_if_present: list[str] | None, exclude_caches: bool,
               exclude_larger_than: str | None) -> Any:
    """The `Selection` backup's exclusion options describe (each repeated option adds up)."""
    from keepwell.sources.files.select import CACHEDIR_TAG, Selection, TagFile, read_pattern_file
    from keepwell.units import parse_size

    refuse_empty("--exclude", exclude, "give a pattern, or no --exclude")
    refuse_empty("--iexclude", iexclude, "give a pattern, or no --iexclude")
    excludes = list(exclude or [])
    for f in exclude_file or []:
        excludes += read_pattern_file(f)
    iexcludes = list(iexclude or [])
    for f in iexclude_file or []:
        iexcludes += read_pattern_file(f)
    tags = [TagFile.parse(t) for t in exclude_if_present or []]
    if exclude_caches:
        tags.append(CACHEDIR_TAG)
    larger = (parse_size(exclude_larger_than, "--exclude-larger-than")
              if exclude_larger_than is not None else None)
    return Selection(excludes, iexcludes=iexcludes, tag_files=tags, larger_than=larger)


def backup(
    paths: Annotated[list[str] | None, typer.Argument(
        help="Files and directories; with --stdin-from-command, the command and its arguments "
             "(after --).")] = None,
    tag: Annotated[list[str] | None, typer.Option(
        "--tag", help="Tag the snapshot (repeatable; 'a,b' gives both).")] = None,
    host: Annotated[str | None, typer.Option(help="Host name to record.")] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        "--exclude", "-e", metavar="PATTERN",
        help="Exclude a pattern (repeatable; docs/operations.md).")] = None,
    exclude_file: Annotated[list[str] | None, typer.Option(
        "--exclude-file", metavar="FILE",
        help="Read exclude patterns from a file, one a line (repeatable).")] = None,
    iexclude: Annotated[list[str] | None, typer.Option(
        "--iexclude", metavar="PATTERN",
        help="Same as --exclude PATTERN but ignores the casing of filenames.")] = None,
    iexclude_file: Annotated[list[str] | None, typer.Option(
        "--iexclude-file", metavar="FILE",
        help="Same as --exclude-file but ignores the casing of filenames in patterns.")] = None,
    exclude_if_present: Annotated[list[str] | None, typer.Option(
        "--exclude-if-present", metavar="FILENAME[:HEADER]",
        help="Exclude the contents of directories containing FILENAME (except FILENAME "
             "itself), if given only those whose FILENAME starts with HEADER (repeatable).")] = None,
    exclude_caches: Annotated[bool, typer.Option(
        "--exclude-caches",
        help="Exclude the contents of directories containing a CACHEDIR.TAG file (except the "
             "tag itself), as the cache directory tagging standard says.")] = False,
    exclude_larger_than: Annotated[str | None, typer.Option(
        "--exclude-larger-than", metavar="SIZE",
        help="Exclude files larger than SIZE (e.g. 500M, 2G).")] = None,
    one_file_system: Annotated[bool, typer.Option("--one-file-system", "-x")] = False,
    fs_snapshot: Annotated[str | None, typer.Option(
        "--fs-snapshot", metavar="METHOD",
        help="Back up a filesystem snapshot taken first, so the files are as they were at one "
             "instant: btrfs, lvm or auto (docs/files.md); it is removed at the end.")] = None,
    files_from: Annotated[list[str] | None, typer.Option(
        "--files-from", metavar="FILE",
        help="Read the files to back up from FILE, one pattern a line ('#' comments and blank "
             "lines skipped; '-': standard input; repeatable, combines with PATHS).")] = None,
    files_from_verbatim: Annotated[list[str] | None, typer.Option(
        "--files-from-verbatim", metavar="FILE",
        help="Read the files to back up from FILE, one path a line, taken literally "
             "(repeatable).")] = None,
    files_from_raw: Annotated[list[str] | None, typer.Option(
        "--files-from-raw", metavar="FILE",
        help="Read the files to back up from FILE, NUL-separated paths (find -print0; "
             "repeatable).")] = None,
    stdin: Annotated[bool, typer.Option("--stdin", help="Back up standard input.")] = False,
    stdin_from_command: Annotated[bool, typer.Option(
        "--stdin-from-command",
        help="Run the command given after -- and back up its output; the snapshot is saved "
             "only if the command exits with status 0.")] = False,
    stdin_filename: Annotated[str | None, typer.Option(
        help="File name of the --stdin / --stdin-from-command data (default: stdin).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", "-n",
        help="Do not upload or write any data, just show what would be done.")] = False,
    parent: Annotated[str | None, typer.Option(
        metavar="SNAPSHOT",
        help="Compare with this snapshot to find unchanged files (default: the latest of this "
             "host with the same paths).")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Read every file again, even those the parent snapshot shows "
                        "unchanged (their content is still stored once).")] = False,
    repo: RepoOption = None, password_file: PasswordFileOption = None, json_: JsonOption = False,
) -> None:
    """Back up files and directories, standard input, or a command's output into a new snapshot."""
    from keepwell.sources.files import backup_paths
    from keepwell.sources.files.targets import PATTERNS, RAW, VERBATIM, read_path_lists

    streamed = stdin or stdin_from_command
    if stdin and stdin_from_command:
        raise UsageError("--stdin and --stdin-from-command exclude each other")
    if stdin and paths:
        raise UsageError("--stdin backs up standard input: give no paths with it")
    if stdin_filename is not None and not streamed:
        raise UsageError("--stdin-filename is for --stdin or --stdin-from-command")
    refuse_empty("--stdin-filename", stdin_filename, "give a file name, or leave the option "
                                                     "out for 'stdin'")
    refuse_empty("--host", host, "give a host name, or leave the option out for this machine's")
    refuse_empty("--parent", parent, "give 'latest' or a snapshot id, or leave the option out")
    lists = ([(PATTERNS, f) for f in files_from or []]
             + [(VERBATIM, f) for f in files_from_verbatim or []]
             + [(RAW, f) for f in files_from_raw or []])
    if streamed and (exclude or exclude_file or iexclude or iexclude_file or exclude_if_present
                     or exclude_caches or exclude_larger_than is not None or one_file_system
                     or lists or fs_snapshot is not None or parent is not None or force):
        raise UsageError("the --exclude*, --iexclude*, --one-file-system, --files-from*, "
                         "--fs-snapshot, --parent and --force options are for paths, not for "
                         "--stdin or --stdin-from-command")
    if force and parent is not None:
        raise UsageError("--force reads every file: give no --parent with it")
    if fs_snapshot is not None:
        from keepwell.sources.files.fssnapshot import METHODS

        if fs_snapshot not in METHODS:
            raise UsageError(f"--fs-snapshot {fs_snapshot!r}: give one of {', '.join(METHODS)}")
    selection = selection_of(exclude, exclude_file, iexclude, iexclude_file, exclude_if_present,
                           exclude_caches, exclude_larger_than)
    if any(f == "-" for _form, f in lists) and sys.stdin.isatty():
        raise UsageError("--files-from* - reads a list from a pipe or a file, not a terminal")
    if lists:
        paths = read_path_lists(lists) + list(paths or [])
    if stdin and sys.stdin.isatty():
        raise UsageError("--stdin reads a pipe or a file, not a terminal",
                         hint="e.g. keepwell backup --stdin < dump.sql")
    tags = tags_given("--tag", tag)
    r = open_repo(repo, password_file, dry_run=dry_run)
    progress = Progress("backup")
    r.events.subscribe(progress)
    errors: list[tuple[str, str]] = []
    if streamed:
        from keepwell.sources.files.stream import backup_command, backup_stdin

        name = stdin_filename or "stdin"
        if stdin_from_command:
            snap = backup_command(r, paths or [], name, host=host, tags=tags)
        else:
            snap = backup_stdin(r, sys.stdin.buffer, name, host=host, tags=tags)
    else:
        if progress.enabled:
            _count_in_background(progress, paths or [], selection, one_file_system)
        res = backup_paths(r, paths or [], selection=selection, one_file_system=one_file_system,
                           tags=tags, host=host, fs_snapshot=fs_snapshot,
                           parent=None if force else parent or "auto")
        snap, errors = res.snapshot, res.errors
    progress.done()
    s = snap.summary
    if dry_run:
        _print_dry_run(snap, errors, json_)
    elif json_:
        print_json({"snapshot": snap.to_json(), "errors": [list(e) for e in errors]})
    else:
        print(f"snapshot {snap.short_id} saved: {s.get('files_new', 0)} new, "
              f"{s.get('files_changed', 0)} changed, {s.get('files_unmodified', 0)} unmodified files; "
              f"{human_bytes(s.get('bytes_processed', s.get('bytes_read', 0)))} processed, "
              f"{human_bytes(s.get('bytes_added', 0))} new, {human_bytes(s.get('bytes_stored', 0))} "
              f"stored, {s.get('duration', 0):.1f}s")
    if s.get("sockets_skipped"):  # as restic does: nothing could restore a socket
        print(f"keepwell: skipped {s['sockets_skipped']} socket(s): a socket cannot be backed up",
              file=sys.stderr)
    if errors:
        print(f"keepwell: {len(errors)} item(s) could not be read; the snapshot is partial",
              file=sys.stderr)
        raise typer.Exit(EXIT_PARTIAL)


def _print_dry_run(snap: Any, errors: list[tuple[str, str]], json_: bool) -> None:
    """What a dry run would have stored: the counts of the snapshot it did not save."""
    s = snap.summary
    if json_:
        keep = ("files_new", "files_changed", "files_unmodified", "dirs", "bytes_processed",
                "bytes_read", "bytes_added", "bytes_stored", "blobs_new", "blobs_known", "packs",
                "errors", "sockets_skipped", "duration")
        print_json({"dry_run": True, "paths": snap.paths, "host": snap.host, "kind": snap.kind,
                    "parent": snap.parent, "summary": {k: s[k] for k in keep if k in s},
                    "errors": [list(e) for e in errors]})
        return
    print("dry run: nothing was stored")
    print(f"Files:     {s.get('files_new', 0)} new, {s.get('files_changed', 0)} changed, "
          f"{s.get('files_unmodified', 0)} unmodified")
    print(f"Would add to the repository: {human_bytes(s.get('bytes_added', 0))} "
          f"({human_bytes(s.get('bytes_stored', 0))} stored)")
    print(f"processed {s.get('files_new', 0) + s.get('files_changed', 0) + s.get('files_unmodified', 0)}"
          f" files, {human_bytes(s.get('bytes_processed', s.get('bytes_read', 0)))} in "
          f"{s.get('duration', 0):.1f}s")


def snapshots(host: HostFilterOption = None, tag: TagFilterOption = None,
              path: PathFilterOption = None, kind: KindFilterOption = None,
              repo: RepoOption = None, password_file: PasswordFileOption = None,
              json_: JsonOption = False) -> None:
    """List snapshots (those that match the filters)."""
    r = open_repo(repo, password_file)
    flt = snapshot_filter(host, tag, path, kind)
    snaps = [s for s in r.list_snapshots() if flt.matches(s)]
    if json_:
        print_json([s.to_json() for s in snaps])
        return
    print(f"{'ID':8}  {'Time':19}  {'Host':12}  {'Kind':16}  {'Tags':12}  Paths")
    for s in snaps:
        print(f"{s.short_id}  {s.time.astimezone().strftime('%Y-%m-%d %H:%M:%S')}  {s.host[:12]:12}  "
              f"{s.kind[:16]:16}  {','.join(s.tags)[:12]:12}  {' '.join(s.paths)}")
    print(f"{len(snaps)} snapshots")


def ls(snapshot: Annotated[str, typer.Argument(help="Snapshot id or 'latest'.")],
       path: Annotated[str | None, typer.Argument(help="Only this directory or file.")] = None,
       host: HostFilterOption = None, tag: TagFilterOption = None,
       path_filter: PathFilterOption = None, kind: KindFilterOption = None,
       repo: RepoOption = None, password_file: PasswordFileOption = None,
       json_: JsonOption = False) -> None:
    """List the files of a snapshot."""
    refuse_empty("the path", path, "give a path in the snapshot ('/' for all of it), or none")
    r = open_repo(repo, password_file)
    snap = r.find_snapshot(snapshot, where=snapshot_filter(host, tag, path_filter, kind))
    prefix = (path or "").strip("/")
    rows = []
    found = not prefix
    for p, node in r.walk(snap):
        if prefix and not (p == prefix or p.startswith(prefix + "/")):
            continue
        found = True
        if json_:
            rows.append({"path": "/" + p, **node.to_json()})
        else:
            print(f"/{p}" + ("/" if node.type == "dir" else ""))
    if json_:
        print_json(rows)
    if not found:
        raise UsageError(f"{path} is not in snapshot {snap.short_id}")


def diff(a: str, b: str, host: HostFilterOption = None, tag: TagFilterOption = None,
         path: PathFilterOption = None, kind: KindFilterOption = None,
         repo: RepoOption = None, password_file: PasswordFileOption = None,
         json_: JsonOption = False) -> None:
    """Show what changed between two snapshots ('latest' is the newest that matches the filters)."""
    r = open_repo(repo, password_file)
    flt = snapshot_filter(host, tag, path, kind)
    sa, sb = r.find_snapshot(a, where=flt), r.find_snapshot(b, where=flt)
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


def dump(snapshot: Annotated[str, typer.Argument(help="Snapshot id or 'latest'.")],
         path: Annotated[str, typer.Argument(help="File or directory inside the snapshot.")],
         archive: Annotated[str, typer.Option(
             "--archive", metavar="FORMAT",
             help="Archive format of a directory: tar or zip.")] = "tar",
         host: HostFilterOption = None, tag: TagFilterOption = None,
         path_filter: PathFilterOption = None, kind: KindFilterOption = None,
         repo: RepoOption = None, password_file: PasswordFileOption = None) -> None:
    """Print a backed-up file to stdout; a directory as a tar (or zip) archive."""
    from keepwell.sources.files.dump import ARCHIVE_FORMATS, write_tar, write_zip

    if archive not in ARCHIVE_FORMATS:
        raise UsageError(f"--archive {archive!r}: give one of {', '.join(ARCHIVE_FORMATS)}")
    refuse_empty("the path", path, "give a file or directory of the snapshot ('/' for all of it)")
    r = open_repo(repo, password_file)
    snap = r.find_snapshot(snapshot, where=snapshot_filter(host, tag, path_filter, kind))
    node = r.find_node(snap, path)
    out = sys.stdout.buffer
    if node.type != "dir":
        for chunk in r.iter_file(snap, path):
            out.write(chunk)
    else:
        if out.isatty():
            raise UsageError(f"{path} is a directory: its {archive} archive would go to a "
                             "terminal", hint="redirect standard output to a file or a pipe")
        (write_zip if archive == "zip" else write_tar)(r, snap, path, out)
    out.flush()


def stats(snapshot_ids: Annotated[list[str] | None, typer.Argument(
              help="Snapshots to count (ids or 'latest'); default: all that match the filters.")] = None,
          mode: Annotated[str, typer.Option(
              "--mode", metavar="MODE",
              help="Counting mode: restore-size (default), files-by-contents, blobs-per-file "
                   "or raw-data.")] = "restore-size",
          host: HostFilterOption = None, tag: TagFilterOption = None,
          path: PathFilterOption = None, kind: KindFilterOption = None,
          repo: RepoOption = None, password_file: PasswordFileOption = None,
          json_: JsonOption = False) -> None:
    """Count the size of the snapshots named or filtered (all by default): what a restore
    writes, distinct files, blobs per file, or the raw data as stored (docs/operations.md)."""
    from keepwell.repository.stats import parse_mode, snapshot_stats

    parse_mode(mode)
    r = open_repo(repo, password_file)
    flt = snapshot_filter(host, tag, path, kind)
    if snapshot_ids:
        snaps = list({s.id: s for s in (r.find_snapshot(i, where=flt) for i in snapshot_ids)}.values())
    else:
        snaps = [s for s in r.list_snapshots() if flt.matches(s)]
    out = snapshot_stats(r, snaps, mode, whole=not (snapshot_ids or flt))
    if json_:
        print_json(out)
        return
    rows = [("Snapshots processed", str(out["snapshots"]))]
    if "total_file_count" in out:
        rows.append(("Total File Count", str(out["total_file_count"])))
    if "total_blob_count" in out:
        rows.append(("Total Blob Count", str(out["total_blob_count"])))
    if mode == "raw-data":
        rows += [("Total Uncompressed Size", human_bytes(out["total_uncompressed_size"])),
                 ("Total Size", human_bytes(out["total_size"])),
                 ("Compression Ratio", f"{out['compression_ratio']}x"),
                 ("Compression Space Saving", f"{out['compression_space_saving']}%"),
                 ("Total File Size", human_bytes(out["total_file_size"])),
                 ("Deduplication Ratio", f"{out['dedup_ratio']}x"),
                 ("Blobs", f"{out['blobs']['data']} data, {out['blobs']['tree']} tree")]
    else:
        rows.append(("Total Size", human_bytes(out["total_size"])))
    print(f"Stats in {mode} mode:")
    for label, value in rows:
        print(f"{label:>25}:  {value}")


def restore(snapshot: str,
            target: Annotated[str, typer.Option("--target", "-t", help="Directory to restore into.")],
            include: Annotated[list[str] | None, typer.Option(
                "--include", "-i", help="Restore only what this pattern matches (repeatable).")] = None,
            exclude: Annotated[list[str] | None, typer.Option(
                "--exclude", "-e", help="Skip what this pattern matches (repeatable).")] = None,
            overwrite: Annotated[bool, typer.Option(help="Allow a non-empty target.")] = False,
            verify: Annotated[bool, typer.Option(
                "--verify", help="Then read every restored file back and compare it with the "
                                 "snapshot.")] = False,
            dry_run: Annotated[bool, typer.Option(
                "--dry-run", "-n", help="Write nothing: say what would be restored.")] = False,
            host: HostFilterOption = None, tag: TagFilterOption = None,
            path: PathFilterOption = None, kind: KindFilterOption = None,
            repo: RepoOption = None, password_file: PasswordFileOption = None,
            json_: JsonOption = False) -> None:
    """Restore a snapshot; every blob is verified against its id before it is written. An
    --include that matches nothing is reported and makes the exit code non-zero."""
    from keepwell.sources.files import restore_snapshot
    from keepwell.sources.files.select import Matcher

    refuse_empty("--include", include, "give a pattern, or no --include to restore everything")
    refuse_empty("--exclude", exclude, "give a pattern, or no --exclude")
    if dry_run and verify:
        raise UsageError("--verify reads back what a restore wrote: --dry-run writes nothing")
    r = open_repo(repo, password_file)
    snap = r.find_snapshot(snapshot, where=snapshot_filter(host, tag, path, kind))
    if dry_run:
        _restore_plan(r, snap, target, include or [], exclude or [], overwrite, json_)
        return
    progress = Progress("restore")
    r.events.subscribe(progress)
    includes = Matcher(include or [])
    res = restore_snapshot(r, snap, target, includes=includes, excludes=exclude or [],
                           overwrite=overwrite, verify=verify)
    progress.done()
    unmatched = includes.unmatched()
    checked = res.verified
    if json_:
        print_json({"files": res.files, "dirs": res.dirs, "bytes": res.bytes,
                    "errors": [list(e) for e in res.errors], "unmatched_includes": unmatched,
                    "metadata": res.metadata.to_json(),
                    **({"verified": {"files": checked.files, "bytes": checked.bytes,
                                     "errors": [list(e) for e in checked.errors]}}
                       if checked is not None else {})})
    else:
        print(f"restored {res.files} files, {res.dirs} dirs, {human_bytes(res.bytes)} to {target}")
        if checked is not None:
            print(f"verified {checked.files} files, {human_bytes(checked.bytes)}: "
                  + (f"{len(checked.errors)} differ from the snapshot" if checked.errors
                     else "identical to the snapshot"))
    for pattern in unmatched:
        print(f"keepwell: warning: --include {pattern} matched nothing in snapshot {snap.short_id}",
              file=sys.stderr)
    # what could not be restored for want of privilege or support: one line each, and a
    # partial restore only if the user could have had it (an unprivileged user cannot ask for
    # owners, privileged attributes or device nodes)
    level = "note" if res.metadata.complete else "warning"
    for note in res.metadata.notes():
        print(f"keepwell: {level}: {note}", file=sys.stderr)
    differ = checked.errors if checked is not None else []
    if res.errors or differ:
        for path_, msg in (res.errors + differ)[:20]:
            print(f"keepwell: {path_}: {msg}", file=sys.stderr)
        raise typer.Exit(EXIT_FAILURE)
    if unmatched:  # nothing at all, or not all that was asked for
        raise typer.Exit(EXIT_PARTIAL if res.files or res.dirs else EXIT_FAILURE)
    if not res.metadata.complete:
        raise typer.Exit(EXIT_PARTIAL)


def _restore_plan(r: Repository, snap: Snapshot, target: str, include: list[str],
                  exclude: list[str], overwrite: bool, json_: bool) -> None:
    """``restore --dry-run``: what the restore would write, and nothing written."""
    from keepwell.sources.files.restorer import plan_restore
    from keepwell.sources.files.select import Matcher

    includes = Matcher(include)
    plan = plan_restore(r, snap, target, includes=includes, excludes=exclude,
                        overwrite=overwrite)
    unmatched = includes.unmatched()
    if json_:
        print_json({"dry_run": True, "files": plan.files, "dirs": plan.dirs, "bytes": plan.bytes,
                    "symlinks": plan.links, "other": plan.other, "unmatched_includes": unmatched})
    else:
        print(f"would restore {plan.files} files, {plan.dirs} dirs, {plan.links} symbolic "
              f"links, {human_bytes(plan.bytes)} from snapshot {snap.short_id} to {target}")
    for pattern in unmatched:
        print(f"keepwell: warning: --include {pattern} matched nothing in snapshot {snap.short_id}",
              file=sys.stderr)
    if unmatched:
        raise typer.Exit(EXIT_PARTIAL if plan.files or plan.dirs else EXIT_FAILURE)


def forget(
    snapshot_ids: Annotated[list[str] | None, typer.Argument(help="Snapshots to forget.")] = None,
    keep_last: KeepLastOption = 0, keep_hourly: KeepHourlyOption = 0,
    keep_daily: KeepDailyOption = 0, keep_weekly: KeepWeeklyOption = 0,
    keep_monthly: KeepMonthlyOption = 0, keep_yearly: KeepYearlyOption = 0,
    keep_within: KeepWithinOption = None, keep_within_hourly: KeepWithinHourlyOption = None,
    keep_within_daily: KeepWithinDailyOption = None,
    keep_within_weekly: KeepWithinWeeklyOption = None,
    keep_within_monthly: KeepWithinMonthlyOption = None,
    keep_within_yearly: KeepWithinYearlyOption = None, keep_tag: KeepTagOption = None,
    host: HostFilterOption = None, tag: TagFilterOption = None,
    path: PathFilterOption = None,
    kind: Annotated[list[str] | None, typer.Option(
        "--kind", help="Only snapshots of this kind (repeatable; default: files, stdin and "
                       "sqlite, as databases keep their own retention).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n")] = False,
    prune_: Annotated[bool, typer.Option("--prune", help="Prune afterwards.")] = False,
    max_unused: Annotated[str | None, typer.Option(
        help="With --prune: as prune --max-unused (default: 5%).")] = None,
    grace: Annotated[str | None, typer.Option(
        help="With --prune: as prune --grace (default: 1h).")] = None,
    repo: RepoOption = None, password_file: PasswordFileOption = None, json_: JsonOption = False,
) -> None:
    """Remove snapshots by id, or those a --keep-* policy does not keep (among the snapshots
    that match the filters; grouped by host, paths and kind)."""
    from keepwell.repository.prune import PruneOptions, parse_max_unused
    from keepwell.repository.retention import apply_policy, source_group
    from keepwell.units import parse_seconds

    policy = keep_policy(locals())
    if snapshot_ids and not policy.empty():
        raise UsageError("give snapshot ids or a --keep-* policy, not both")
    if not prune_ and (max_unused is not None or grace is not None):
        raise UsageError("--max-unused and --grace are for --prune")
    prune_opts = PruneOptions(max_unused=parse_max_unused("5%" if max_unused is None else max_unused),
                              grace=parse_seconds("1h" if grace is None else grace, "--grace"))
    flt = snapshot_filter(host, tag, path, kind)
    r = open_repo(repo, password_file)
    damaged: list[str] = []  # named, but unreadable: forgotten by their id alone
    if snapshot_ids:
        remove = []
        for ref in snapshot_ids:
            try:
                remove.append(r.find_snapshot(ref, where=flt))
            except DamagedSnapshotError as exc:
                damaged.append(exc.snapshot_id)
        kept: list[Any] = []
    else:
        if policy.empty():
            raise UsageError("no snapshots and no --keep-* policy given: refusing to forget everything")
        snaps = [s for s in r.list_snapshots() if flt.matches(s)
                 and (kind or s.kind in ("files", "stdin", "sqlite"))]
        kept, remove = apply_policy(snaps, policy, group_by=source_group)
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
    from keepwell.repository.prune import PruneOptions, parse_max_unused
    from keepwell.units import parse_seconds, parse_size

    opts = PruneOptions(
        max_unused=parse_max_unused(max_unused),
        max_repack_bytes=parse_size(max_repack_size, "--max-repack-size") if max_repack_size is not None else None,
        repack_small=repack_small, grace=parse_seconds(grace, "--grace"), wait=wait, dry_run=dry_run)
    report = _run_prune(open_repo(repo, password_file), opts, quiet=json_)
    if json_:
        print_json(report)


def check(read_data: Annotated[bool, typer.Option(
              "--read-data", help="Read all data blobs.")] = False,
          read_data_subset: Annotated[str | None, typer.Option(
              "--read-data-subset", metavar="SUBSET",
              help="Read a subset of data packs: n/m (the n-th of m groups, the same packs "
                   "every time), x% (chosen at random) or a size such as 1G (packs chosen at "
                   "random up to that much).")] = None,
          repo: RepoOption = None, password_file: PasswordFileOption = None,
          json_: JsonOption = False) -> None:
    """Check the repository for errors; with --read-data also download, decrypt and verify
    every blob."""
    from keepwell.repository.check import DataSubset
    from keepwell.repository.check import check as do_check

    subset = DataSubset(fraction=1.0 if read_data else 0.0)
    if read_data_subset is not None:
        if read_data:
            raise UsageError("--read-data reads everything: give it or --read-data-subset, not both")
        subset = DataSubset.parse(read_data_subset)
    rep = do_check(open_repo(repo, password_file), subset=subset)
    if json_:
        print_json(rep.__dict__)
    else:
        for w in rep.warnings:
            print(f"warning: {w}")
        for e in rep.errors:
            print(f"error: {e}")
        print(("no errors were found" if rep.ok else f"{len(rep.errors)} errors found")
              + (f" ({rep.packs_read} packs, {rep.blobs_checked} blobs read)" if subset else ""))
    if not rep.ok:
        raise typer.Exit(EXIT_FAILURE)


def register(app: typer.Typer) -> None:
    for fn in (init, backup, snapshots, ls, diff, dump, stats, restore, forget, prune, check):
        app.command()(fn)
    app.add_typer(keys.app, name="key")


