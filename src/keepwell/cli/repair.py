"""The ``repair`` commands: ``repair index``, ``repair packs``, ``repair snapshots`` and
``repair --from-repo R``. Parsing and rendering only; the work is done by
keepwell.repository.repair and keepwell.repository.repair_snapshots (docs/operations.md,
"Repairing a damaged repository").
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Annotated, Any

import typer

from keepwell.cli.common import (
    JsonOption,
    PasswordFileOption,
    RepoOption,
    human_bytes,
    open_repo,
    print_json,
)
from keepwell.cli.copy import FromPasswordFileOption, FromRepoOption, open_source
from keepwell.errors import EXIT_PARTIAL, UsageError

DryRunOption = Annotated[bool, typer.Option("--dry-run", "-n", help="Report what would be done; "
                                                                    "write nothing.")]

app = typer.Typer(
    help="Repair a damaged repository: rebuild the index, salvage packs, rewrite snapshots "
         "without what is lost, or take lost data from a replica (--from-repo).",
    invoke_without_command=True,
)


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        print(f"keepwell: warning: {w}", file=sys.stderr)


def _finish(report: Any, json_: bool, lines: list[str], partial: str | None = None) -> None:
    if json_:
        print_json(asdict(report))
    else:
        _warn(report.warnings)
        for line in lines:
            print(line)
    if partial:
        print(f"keepwell: {partial}", file=sys.stderr)
        raise typer.Exit(EXIT_PARTIAL)


@app.callback()
def repair(
    ctx: typer.Context,
    from_repo: FromRepoOption = None,
    from_password_file: FromPasswordFileOption = None,
    dry_run: DryRunOption = False,
    repo: RepoOption = None, password_file: PasswordFileOption = None, json_: JsonOption = False,
) -> None:
    """With --from-repo: take good copies of lost or damaged blobs from a replica."""
    if ctx.invoked_subcommand is not None:
        return  # its own options apply
    if not from_repo:
        raise UsageError("say what to repair: index, packs, snapshots, or --from-repo REPLICA",
                         hint="see 'keepwell repair --help'")
    from keepwell.repository.repair_snapshots import repair_from

    with open_source(from_repo, from_password_file) as replica, open_repo(repo, password_file) as r:
        rep = repair_from(r, replica, dry_run=dry_run)
    would = "would take" if dry_run else "took"
    lines = [f"{rep.trees_checked} trees walked, {rep.blobs_lost} lost blob(s); {would} "
             f"{rep.blobs_taken} from {rep.replica}"
             + ("" if dry_run else f" ({human_bytes(rep.bytes_stored)} in {rep.packs_written} packs)")]
    for line in rep.blobs_unavailable[:20]:
        lines.append(f"unavailable: {line}")
    partial = (f"{len(rep.blobs_unavailable)} lost blob(s) are not in the replica either; "
               "'keepwell repair snapshots' removes what uses them" if rep.blobs_unavailable else None)
    _finish(rep, json_, lines, partial)


@app.command("index")
def index(dry_run: DryRunOption = False, repo: RepoOption = None,
          password_file: PasswordFileOption = None, json_: JsonOption = False) -> None:
    """Rebuild the index from the packs' own headers."""
    from keepwell.repository.repair import repair_index

    with open_repo(repo, password_file) as r:
        rep = repair_index(r, dry_run=dry_run)
    verb = "would write" if dry_run else "wrote"
    lines = [f"{len(rep.packs_added)} pack(s) added, {len(rep.packs_dropped)} dropped (missing), "
             f"{len(rep.index_damaged)} unreadable index object(s)"]
    lines += [f"added   {n}" for n in rep.packs_added[:20]]
    lines += [f"dropped {n}" for n in rep.packs_dropped[:20]]
    if rep.index_written or (dry_run and (rep.packs_added or rep.packs_dropped or rep.index_damaged)):
        lines.append(f"{verb} a new index of {rep.packs} packs, {rep.blobs} blobs, superseding "
                     f"{rep.index_superseded} index object(s)")
    else:
        lines.append("the index matches the packs; nothing to do")
    lines += [f"removed {n}" for n in rep.removed]
    _finish(rep, json_, lines)


@app.command("packs")
def packs(pack_ids: Annotated[list[str] | None, typer.Argument(
              help="Packs to verify (ids or id prefixes, or object names); default: every "
                   "indexed pack.")] = None,
          dry_run: DryRunOption = False, repo: RepoOption = None,
          password_file: PasswordFileOption = None, json_: JsonOption = False) -> None:
    """Verify packs; salvage the intact blobs of damaged ones and record the damaged blobs."""
    from keepwell.repository.repair import repair_packs

    with open_repo(repo, password_file) as r:
        rep = repair_packs(r, pack_ids or None, dry_run=dry_run)
    lines = [f"{rep.packs_read} pack(s), {rep.blobs_read} blob(s) read: "
             f"{len(rep.packs_damaged)} damaged, {len(rep.packs_missing)} missing from storage"]
    lines += [f"missing {n}" for n in rep.packs_missing[:20]]
    if rep.packs_damaged or rep.packs_missing:
        would = "would " if dry_run else ""
        lines.append(f"{would}salvage {rep.blobs_salvaged} intact blob(s)"
                     + ("" if dry_run else f" into {rep.packs_written} new pack(s)")
                     + f"; {rep.blobs_damaged} blob(s) are lost until a backup stores their data "
                       "again or 'keepwell repair --from-repo' takes them from a replica")
        if not dry_run:
            lines.append("the damaged packs left the index and are pending deletion (a later "
                         "'keepwell prune' deletes them)")
    else:
        lines.append("no damaged pack found")
    _finish(rep, json_, lines)


@app.command("snapshots")
def snapshots(snapshot_ids: Annotated[list[str] | None, typer.Argument(
                  help="Snapshots to repair (id prefixes); default: every snapshot.")] = None,
              keep_originals: Annotated[bool, typer.Option(
                  "--keep-originals", help="Keep the damaged snapshots beside the repaired "
                                           "ones.")] = False,
              dry_run: DryRunOption = False, repo: RepoOption = None,
              password_file: PasswordFileOption = None, json_: JsonOption = False) -> None:
    """Rewrite snapshots that reference lost data without the lost files (tag 'repaired')."""
    from keepwell.repository.repair_snapshots import repair_snapshots

    with open_repo(repo, password_file) as r:
        rep = repair_snapshots(r, snapshot_ids or None, keep_originals=keep_originals,
                               dry_run=dry_run)
    lines = []
    for s in rep.snapshots:
        short = s["id"][:8]
        if s["repaired"]:
            lines.append(f"snapshot {short}: {len(s['removed'])} path(s) removed, repaired as "
                         f"{s['repaired'][:8]}" + (", original forgotten" if s["forgotten"] else ""))
        else:
            lines.append(f"snapshot {short}: {len(s['removed'])} path(s) "
                         + ("would be removed" if dry_run else "lost"))
        lines += [f"  removed {p}" for p in s["removed"][:20]]
    lines.append(f"{rep.checked} snapshot(s) checked, {len(rep.snapshots)} damaged")
    _finish(rep, json_, lines)


def register(main: typer.Typer) -> None:
    main.add_typer(app, name="repair")
