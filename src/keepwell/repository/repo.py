"""The Repository: opening, objects, index, blobs and snapshots.

This is the engine's front door. It knows nothing about databases or schedules: it stores blobs,
trees and snapshots, and reads them back verified. Writing goes through `SnapshotWriter`
(keepwell.repository.writer) and `BlobSink` (keepwell.repository.packer); checking and pruning
live in their own modules.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from keepwell import tokens
from keepwell.backends import wrappers
from keepwell.backends.adaptive import AimdController, adaptive_enabled
from keepwell.backends.base import Backend
from keepwell.backends.cachedir import default_base
from keepwell.backends.dryrun import DryRunBackend
from keepwell.backends.registry import open_backend
from keepwell.backends.resilience import TokenBucket
from keepwell.backends.wrappers import Guard
from keepwell.chunker import Chunker, ChunkerParams
from keepwell.compression import Levels, unpack_payload
from keepwell.crypto import KdfParams, MasterKey, content_name, keyed_id, public_bytes
from keepwell.errors import (
    BackendError,
    DamagedSnapshotError,
    FormatError,
    IntegrityError,
    KeepwellError,
    ObjectNotFoundError,
    RepositoryExistsError,
    RepositoryNotFoundError,
    SnapshotNotFoundError,
    UsageError,
)
from keepwell.repository import keys
from keepwell.repository.damage import Damage, load_damage
from keepwell.repository.events import Events
from keepwell.repository.format import (
    FORMAT_VERSION,
    KIND_CONFIG,
    KIND_INDEX,
    KIND_SNAPSHOT,
    TREE,
    pack_object_name,
)
from keepwell.repository.index import (
    BlobLocation,
    IndexContent,
    MasterIndex,
    decode_index,
    encode_index,
)
from keepwell.repository.keyring import APPEND, FULL, Keyring, append_keyring
from keepwell.repository.owncache import OwnCache, own_cache_directory
from keepwell.repository.packer import UPLOAD_WORKERS
from keepwell.repository.pending import load_pending
from keepwell.repository.snapshot import Snapshot, SnapshotFilter, decode_snapshot
from keepwell.repository.tree import DIR, Node, decode_tree, unusable_name
from keepwell.repository.unindexed import UnindexedPacks, pack_type_of
from keepwell.repository.writer import SnapshotWriter

_REPAIR_INDEX_HINT = "run 'keepwell repair index' to rebuild the index from the packs"


class Repository:
    def __init__(self, backend: Backend, master: MasterKey | Keyring, config: dict[str, Any],
                 key_id: str) -> None:
        self.backend = backend
        # the keys of the key in use (a full or an append key; keepwell.repository.keyring)
        self.master = master if isinstance(master, Keyring) else Keyring.full(master, config)
        self.config = config
        self.key_id = key_id
        self.id_key = bytes.fromhex(config["id_key"])
        self.chunker_params = ChunkerParams.from_dict(config["chunker"])
        self.chunker = Chunker(self.chunker_params)
        self.compression = int(config.get("compression", 3))
        # the level data goes down to where `compression` does not pay (keepwell.compression.Levels)
        self.fast_compression = int(config.get("fast_compression", self.compression))
        # the strong level for database page images (absent in older configs: `compression`)
        self.page_compression = int(config.get("page_compression", self.compression))
        self._levels: dict[tuple[str, bool], Levels] = {}
        self._levels_lock = threading.Lock()
        self.events = Events()
        self._index: MasterIndex | None = None
        self._index_lock = threading.Lock()
        self._trees: OrderedDict[bytes, list[Node]] = OrderedDict()
        self._trees_nodes = 0  # nodes held in _trees
        self.trees_read = 0  # trees read from storage (the others came from _trees)
        # the nodes' encodings, one by one, of the held trees a writer remembered with them
        self._tree_pieces: dict[bytes, list[bytes]] = {}
        self.trees_budget_nodes = self._TREES_BUDGET_NODES
        self._trees_lock = threading.Lock()
        # whole tree packs read so far (a walk reads thousands of trees from a few packs), and
        # where the subtrees of the trees loaded so far are (found in one index pass per tree)
        self._tree_packs: OrderedDict[bytes, bytes] = OrderedDict()
        self._tree_packs_size = 0
        self._tree_locs: dict[bytes, BlobLocation] = {}
        self._pending: dict[bytes, BlobLocation] | None = None
        self._pending_lock = threading.Lock()
        self._snapshots: dict[str, Snapshot] = {}
        # pack id -> the public key of the append key's process that wrote it (the packs
        # written under the master key are not listed), from index objects and pack headers
        self.senders: dict[bytes, bytes] = {}
        self.damage = Damage()  # the damage records the index was loaded with
        # snapshot objects that cannot be read back (id -> why), as `list_snapshots` met them
        self.damaged_snapshots: dict[str, str] = {}
        # (location, options) when opened through `open_repository`: what a worker process
        # needs to open the same storage again (`reopen_repository`)
        self.opened_as: tuple[str, dict[str, Any]] | None = None
        # an append key's own trees and last snapshots (keepwell.repository.owncache): set by
        # `open_repository`, None for a full key
        self.own: OwnCache | None = None

    # -- creating and opening -------------------------------------------------------------------
    @classmethod
    def init(cls, backend: Backend, password: str, *, chunker: ChunkerParams | None = None,
             compression: int = 3, fast_compression: int = 1, page_compression: int = 5,
             kdf: KdfParams | None = None,
             id_key: bytes | None = None, require_empty: bool = False,
             append_keys: bool = False) -> Repository:
        """Create a repository. ``chunker`` and ``id_key`` are given only to share them with
        another repository (``init --copy-chunker-params-from``; see keepwell.repository.copy).
        ``require_empty``: refuse a location that holds anything already. ``append_keys``: a
        repository of version 2, which can have append keys (docs/security.md)."""
        try:
            backend.stat("config")
            raise RepositoryExistsError(f"a repository already exists at {backend.location}")
        except ObjectNotFoundError:
            pass
        if any(True for _ in backend.list("keys/")):
            raise RepositoryExistsError(f"{backend.location} already holds keys of a repository")
        if require_empty and next(iter(backend.list("")), None) is not None:
            raise UsageError(f"{backend.location} is not empty and is not a repository",
                             hint="choose an empty location, or pass --allow-non-empty")
        master = MasterKey.generate()
        params = chunker or ChunkerParams(seed=tokens.randbits(62))
        config: dict[str, Any] = {
            "version": 2 if append_keys else 1,
            "id": tokens.token_hex(32),
            "id_key": id_key.hex() if id_key is not None else tokens.token_hex(32),
            "chunker": params.to_dict(),
            "compression": compression,
            "fast_compression": fast_compression,
            "page_compression": page_compression,
        }
        if append_keys:
            config["public_key"] = public_bytes(master.repository_private_key()).hex()
        key_id = keys.add_key(backend, master, password, kdf)
        data = master.encrypt_object(KIND_CONFIG, json.dumps(config).encode())
        backend.put("config", data)
        return cls(backend, master, config, key_id)

    @classmethod
    def open(cls, backend: Backend, password: str) -> Repository:
        try:
            stored = backend.get("config")
        except ObjectNotFoundError:
            raise RepositoryNotFoundError(f"no repository at {backend.location}") from None
        def opens(master: MasterKey) -> bool:
            try:
                master.decrypt_object(KIND_CONFIG, stored, "config")
                return True
            except IntegrityError:
                return False

        unlocked, key_id = keys.open_with_password(backend, password, opens)
        if isinstance(unlocked, MasterKey):
            config = json.loads(unlocked.decrypt_object(KIND_CONFIG, stored, "config"))
        else:  # an append key: it carries the config, which only full keys can decrypt
            try:
                keyring, config = append_keyring(unlocked)
            except (ValueError, KeyError, TypeError):
                raise FormatError(f"append key {key_id[:10]} of {backend.location} is damaged",
                                  hint="add a new append key with a full key") from None
        if int(config.get("version", 0)) > FORMAT_VERSION:
            raise KeepwellError(
                f"repository format {config['version']} is newer than this keepwell understands",
                hint="upgrade keepwell",
            )
        if isinstance(unlocked, MasterKey):
            return cls(backend, unlocked, config, key_id)
        return cls(backend, keyring, config, key_id)

    @property
    def role(self) -> str:
        """``full`` or ``append``: what the key in use may do (docs/security.md)."""
        return self.master.role

    @property
    def full(self) -> bool:
        return self.master.role == FULL

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def levels(self, kind: str, *, probe: bool = False, pages: bool = False) -> Levels:
        """The compression level chooser for one kind of snapshot data, kept for the life of
        this object, so that each writer starts from what earlier ones of its kind learned.
        ``probe``: a choice of its own for each large blob (see `Levels`). ``pages``: the data
        are database page images, whose strong level is `page_compression`."""
        strong = self.page_compression if pages and self.compression > 0 else self.compression
        if probe:
            return Levels(strong, self.fast_compression, probe=True)
        with self._levels_lock:
            found = self._levels.get((kind, pages))
            if found is None:
                found = self._levels[kind, pages] = Levels(strong, self.fast_compression)
            return found

    @property
    def id(self) -> str:
        return str(self.config["id"])

    # -- encrypted objects ----------------------------------------------------------------------
    def put_object(self, prefix: str, kind: bytes, plain: bytes) -> str:
        stored = self.master.encrypt_object(kind, plain)
        name = content_name(stored)
        self.backend.put(f"{prefix}/{name}", stored)
        return name

    def get_object(self, prefix: str, name: str, kind: bytes) -> bytes:
        return self._open_object(prefix, name, kind, self.backend.get(f"{prefix}/{name}"))

    def _open_object(self, prefix: str, name: str, kind: bytes, stored: bytes) -> bytes:
        if content_name(stored) != name:
            raise IntegrityError(f"{prefix}/{name} does not match its name (corrupt)")
        return self.master.decrypt_object(kind, stored, f"{prefix}/{name}")

    # -- index ----------------------------------------------------------------------------------
    @property
    def index(self) -> MasterIndex:
        if self._index is None:
            with self._index_lock:
                if self._index is None:
                    self._index = self._load_index()
        return self._index

    def _load_index(self, into: MasterIndex | None = None, skip: set[str] | None = None,
                    damage: Damage | None = None) -> MasterIndex:
        idx = into if into is not None else MasterIndex()  # an empty index is falsy
        names = [i.name.split("/", 1)[1] for i in self.backend.list("index/")]
        todo = [n for n in names if not skip or n not in skip]
        # damaged copies stay out of the index, so a backup stores their data again
        damage = self.damage = damage if damage is not None else load_damage(self)

        def load(name: str) -> None:
            # staged in the worker, so each decrypted object is dropped as soon as it is copied
            try:
                content = decode_index(self.get_object("index", name, KIND_INDEX))
                self.senders.update(content.senders)
                idx.stage(name, damage.filter(content))
            except ObjectNotFoundError:
                return  # superseded and deleted by a prune since the listing
            except ValueError as exc:
                raise FormatError(f"index/{name} cannot be decoded: {exc}",
                                  hint=_REPAIR_INDEX_HINT) from None
            except IntegrityError as exc:
                raise IntegrityError(str(exc), hint=_REPAIR_INDEX_HINT) from None

        with ThreadPoolExecutor(4) as pool:
            for _ in pool.map(load, todo):
                pass
        idx.finish()
        return idx

    def refresh_index(self) -> MasterIndex:
        """Bring the index up to date with storage (new index objects, or a prune's rewrite)."""
        with self._index_lock:
            current = {i.name.split("/", 1)[1] for i in self.backend.list("index/")}
            damage = load_damage(self)
            if self._index is None or not self._index.files <= current \
                    or damage.names() != self.damage.names():
                self._index = self._load_index(damage=damage)
            else:
                self._load_index(self._index, skip=self._index.files, damage=damage)
            return self._index

    def write_index(self, content: IndexContent) -> str:
        """Store an index object; each pack an append key wrote keeps its sender (a rewrite
        by prune or repair lists packs it learned of from other index objects or headers)."""
        for pack in content.packs:
            if pack not in content.senders and pack in self.senders:
                content.senders[pack] = self.senders[pack]
        return self.put_object("index", KIND_INDEX, encode_index(content))

    # -- blobs ----------------------------------------------------------------------------------
    def locate(self, blob_id: bytes) -> BlobLocation | None:
        """Where a blob is stored: the index, or else a pack pending deletion.

        A backup that loaded the index just before a prune marked a pack may commit a snapshot
        that uses it; the next prune puts such a pack back into the index, and until then readers
        find the blob through the pending records (read once per process, on the first miss)."""
        loc = self.index.lookup(blob_id)
        if loc is None:
            loc = self._pending_locations().get(blob_id)
        return loc

    def locate_many(self, blob_ids: list[bytes]) -> list[BlobLocation | None]:
        """`locate` for many blobs at once."""
        locs = self.index.lookup_many(blob_ids)
        for i, loc in enumerate(locs):
            if loc is None:
                locs[i] = self._pending_locations().get(blob_ids[i])
        return locs

    def _pending_locations(self) -> dict[bytes, BlobLocation]:
        with self._pending_lock:
            if self._pending is None:
                names = {n for r in load_pending(self) for n in r.packs}
                found: dict[bytes, BlobLocation] = {}
                packs = UnindexedPacks(self, names)
                for name in sorted(names):
                    for e in packs.header(name) or []:
                        found.setdefault(e.id, BlobLocation(
                            bytes.fromhex(name.rsplit("/", 1)[1]), pack_type_of(name), e.offset,
                            e.length, e.raw_length, e.type))
                self._pending = found
            return self._pending

    def load_blob(self, blob_id: bytes, blob_type: int | None = None) -> bytes:
        loc = self.locate(blob_id)
        if loc is None:
            raise IntegrityError(f"blob {blob_id.hex()[:16]} is not in the index",
                                 hint="run 'keepwell check' to see what is affected")
        stored = self.backend.get(pack_object_name(loc.pack_type, loc.pack.hex()), loc.offset, loc.length)
        return self.open_blob(blob_id, loc.type, stored, loc.raw_length, self.sender_of(loc.pack))

    def sender_of(self, pack: bytes) -> bytes | None:
        """The public key of the append key's process that wrote a pack (None: a full key)."""
        if pack not in self.senders:
            self.index  # noqa: B018 - loading the index learns the senders of indexed packs
        return self.senders.get(pack)

    def open_blob(self, blob_id: bytes, blob_type: int, stored: bytes | memoryview, raw_length: int,
                  sender: bytes | None = None) -> bytes:
        """Decrypt, decompress and verify one stored blob; never returns unverified bytes.
        ``sender``: the pack's sender (`sender_of`)."""
        plain = unpack_payload(self.master.decrypt_blob(blob_id, blob_type, stored, sender), raw_length)
        if len(plain) != raw_length or keyed_id(self.id_key, plain) != blob_id:
            raise IntegrityError(f"blob {blob_id.hex()[:16]} does not match its id")
        return plain

    def load_tree(self, tree_id: bytes) -> list[Node]:
        with self._trees_lock:
            hit = self._trees.get(tree_id)
            if hit is not None:
                self._trees.move_to_end(tree_id)
                return hit
        own = self.own.tree(tree_id) if self.own is not None else None
        if own is not None:  # an append key's own tree, from its local cache
            nodes = decode_tree(own)
        else:
            loc = self._tree_locs.pop(tree_id, None) or self.locate(tree_id)
            if loc is None:
                raise IntegrityError(f"tree {tree_id.hex()[:16]} is not in the index",
                                     hint="run 'keepwell check' to see what is affected")
            nodes = decode_tree(self.open_blob(tree_id, loc.type, self._tree_bytes(loc),
                                               loc.raw_length, self.sender_of(loc.pack)))
            self.trees_read += 1
        subtrees = [n.subtree for n in nodes if n.subtree is not None]
        if subtrees and own is None:  # the walk asks for these next
            if len(self._tree_locs) > 100_000:
                self._tree_locs.clear()
            for sub, sub_loc in zip(subtrees, self.index.lookup_many(subtrees), strict=True):
                if sub_loc is not None:
                    self._tree_locs[sub] = sub_loc
        self._hold_tree(tree_id, nodes)
        return nodes

    def remember_tree(self, tree_id: bytes, nodes: list[Node], pieces: list[bytes] | None = None) -> None:
        """Hold a tree just written as if it had been loaded: ``nodes`` in the order of the
        tree blob and equal to what decoding it gives (`tree.as_decoded`), never changed
        afterwards; ``pieces``: each node's encoding (`tree.encode_pieces`), for a later
        writing of the directory with only some entries changed (`tree_pieces`). A watcher's
        next commit comes back to the directories it just wrote."""
        self._hold_tree(tree_id, nodes, pieces)

    def tree_pieces(self, tree_id: bytes) -> list[bytes] | None:
        """The encodings of the nodes of a held tree, in its order, if it was remembered with
        them (a tree loaded from storage has none)."""
        with self._trees_lock:
            return self._tree_pieces.get(tree_id)

    def forget_tree(self, tree_id: bytes) -> None:
        """Stop holding a tree (one a writer has just superseded): room for those that will be
        asked for. Loading it again reads it from storage."""
        with self._trees_lock:
            nodes = self._trees.pop(tree_id, None)
            if nodes is not None:
                self._trees_nodes -= len(nodes)
                self._tree_pieces.pop(tree_id, None)

    def _hold_tree(self, tree_id: bytes, nodes: list[Node], pieces: list[bytes] | None = None) -> None:
        with self._trees_lock:
            if tree_id not in self._trees:
                self._trees[tree_id] = nodes
                self._trees_nodes += len(nodes)
                if pieces is not None:
                    self._tree_pieces[tree_id] = pieces
                while self._trees_nodes > self.trees_budget_nodes and len(self._trees) > 1:
                    gone, held = self._trees.popitem(last=False)
                    self._trees_nodes -= len(held)
                    self._tree_pieces.pop(gone, None)

    # Decoded trees kept for lookups that come back to them (`find_node`, `ls`, `diff`): a
    # bound on their nodes (about 0.5 KiB each), not on their count, since one directory can
    # hold 100,000 files. A walk reads each tree once, so holding more only grows memory: a
    # bound of 4,096 trees held half the nodes of a 59,000-file restore, 27 MiB. A caller that
    # comes back to many trees (the watcher's commits) raises `trees_budget_nodes`.
    _TREES_BUDGET_NODES = 4096

    _TREE_PACKS_BUDGET = 64 * 1024 * 1024

    def _tree_bytes(self, loc: BlobLocation) -> bytes | memoryview:
        """A tree blob's stored bytes, from its whole pack read once (tree packs are small, and
        a walk reads most of the trees of the packs it touches)."""
        name = pack_object_name(loc.pack_type, loc.pack.hex())
        if loc.pack_type != TREE:
            return self.backend.get(name, loc.offset, loc.length)
        with self._trees_lock:
            pack = self._tree_packs.get(loc.pack)
            if pack is not None:
                self._tree_packs.move_to_end(loc.pack)
        if pack is None:
            pack = self.backend.get(name)
            with self._trees_lock:
                if loc.pack not in self._tree_packs:
                    self._tree_packs[loc.pack] = pack
                    self._tree_packs_size += len(pack)
                while self._tree_packs_size > self._TREE_PACKS_BUDGET and len(self._tree_packs) > 1:
                    self._tree_packs_size -= len(self._tree_packs.popitem(last=False)[1])
        if loc.offset + loc.length > len(pack):
            raise IntegrityError(f"tree pack {loc.pack.hex()[:16]} is shorter than the index says",
                                 hint="run 'keepwell check' to see what is affected")
        return memoryview(pack)[loc.offset:loc.offset + loc.length]

    # -- snapshots ------------------------------------------------------------------------------
    def load_snapshot(self, snapshot_id: str) -> Snapshot:
        """The snapshot of that id (the object's full name). `DamagedSnapshotError` if its
        object cannot be read back; storage errors (and a missing object) pass through."""
        snap = self._snapshots.get(snapshot_id)
        if snap is None:
            try:
                stored = self.backend.get(f"snapshots/{snapshot_id}")
                plain = self._open_object("snapshots", snapshot_id, KIND_SNAPSHOT, stored)
                snap = decode_snapshot(snapshot_id, plain)
                if self.master.object_sender(stored) is not None:
                    snap = dataclasses.replace(snap, written_by=APPEND)
            except BackendError:
                raise
            except IntegrityError as exc:
                detail = str(exc).removeprefix(f"snapshots/{snapshot_id} ")
                raise DamagedSnapshotError(f"snapshots/{snapshot_id} is damaged ({detail})",
                                           snapshot_id=snapshot_id) from None
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise DamagedSnapshotError(
                    f"snapshots/{snapshot_id} is damaged (it cannot be decoded: "
                    f"{type(exc).__name__}: {exc})", snapshot_id=snapshot_id) from None
            self._snapshots[snapshot_id] = snap
        return snap

    def snapshot_ids(self) -> list[str]:
        return [i.name.split("/", 1)[1] for i in self.backend.list("snapshots/")]

    def list_snapshots(self, kind: str | None = None) -> list[Snapshot]:
        """Every snapshot that can be read, oldest first. One that cannot is skipped with a
        ``warning`` event naming it (once per snapshot) and recorded in `damaged_snapshots`,
        so that one damaged object never stops the work on the others."""
        ids = self.snapshot_ids()

        def load(i: str) -> Snapshot | DamagedSnapshotError | None:
            try:
                return self.load_snapshot(i)
            except ObjectNotFoundError:
                return None  # forgotten since the listing
            except DamagedSnapshotError as exc:
                return exc

        snaps = []
        with ThreadPoolExecutor(8) as pool:
            for i, found in zip(ids, pool.map(load, ids), strict=True):
                if isinstance(found, DamagedSnapshotError):
                    if i not in self.damaged_snapshots:
                        self.damaged_snapshots[i] = str(found)
                        self.events.emit("warning", message=f"{found}; skipped ({found.hint})")
                elif found is not None:
                    snaps.append(found)
        if kind is not None:
            snaps = [s for s in snaps if s.kind == kind]
        return sorted(snaps, key=lambda s: (s.time, s.id))

    def find_snapshot(self, ref: str, *, kind: str | None = None, host: str | None = None,
                      tags: list[str] | tuple[str, ...] | None = None,
                      paths: list[str] | None = None,
                      where: SnapshotFilter | None = None) -> Snapshot:
        """The snapshot ``ref`` names: ``latest``, the newest one that matches the filters, or a
        unique prefix of an id (4 hex digits or more), which must match them too. The filters
        are ``where`` and the one ``kind``, ``host``, ``tags`` (all of them) and ``paths`` make."""
        filters = [f for f in (where, SnapshotFilter(
            hosts=(host,) if host else (), tag_groups=(tuple(tags),) if tags else (),
            paths=tuple(paths or ()), kinds=(kind,) if kind else ())) if f]
        if ref == "latest":
            snaps = [s for s in self.list_snapshots() if all(f.matches(s) for f in filters)]
            if not snaps:
                said = " ".join(f.describe() for f in filters)
                raise SnapshotNotFoundError("no snapshot matches 'latest'"
                                            + (f" with {said}" if said else ""))
            return snaps[-1]
        if len(ref) < 4 or any(c not in "0123456789abcdef" for c in ref.lower()):
            raise UsageError(f"{ref!r} is not a snapshot id",
                             hint="give 'latest' or at least 4 hex digits of an id")
        matches = [i for i in self.snapshot_ids() if i.startswith(ref.lower())]
        if not matches:
            raise SnapshotNotFoundError(f"no snapshot with id {ref}")
        if len(matches) > 1:
            raise UsageError(f"snapshot id {ref} is ambiguous ({len(matches)} match); give more digits")
        snap = self.load_snapshot(matches[0])
        if kind is not None and snap.kind != kind:
            raise UsageError(f"snapshot {snap.short_id} is a {snap.kind} snapshot, not {kind}")
        for f in filters:
            if not f.matches(snap):
                raise UsageError(f"snapshot {snap.short_id} does not match {f.describe()}",
                                 hint="drop the filter, or name another snapshot")
        return snap

    def forget(self, snapshot_ids: list[str]) -> None:
        """Delete snapshot objects by their full ids (damaged ones too: the id is the name)."""
        for sid in snapshot_ids:
            try:
                self.backend.delete(f"snapshots/{sid}")
            except ObjectNotFoundError:
                pass
            self._snapshots.pop(sid, None)
            self.damaged_snapshots.pop(sid, None)

    # -- reading trees and files ----------------------------------------------------------------
    def walk(self, snap: Snapshot | str, prefix: str = "", *,
             checked: bool = False) -> Iterator[tuple[str, Node]]:
        """Every node under a snapshot (or a tree id), each directory's nodes before its
        subdirectories'. ``checked``: refuse, with an `IntegrityError`, a directory whose names
        cannot all be entries of one directory (`unusable_name`), before yielding any of them."""
        tree = bytes.fromhex(snap.tree if isinstance(snap, Snapshot) else snap)
        stack: list[tuple[bytes, str]] = [(tree, prefix)]
        while stack:
            tree_id, base = stack.pop()
            nodes = self.load_tree(tree_id)
            if checked and (why := unusable_name(nodes)) is not None:
                what = f"snapshot {snap.short_id}" if isinstance(snap, Snapshot) else f"tree {snap[:16]}"
                raise IntegrityError(
                    f"{what} holds {why} in /{base}",
                    hint="backup never writes such a name: the snapshot was damaged or forged, "
                         "and is refused; restore another one")
            subdirs = []
            for node in nodes:
                path = f"{base}/{node.name}" if base else node.name
                yield path, node
                if node.type == DIR and node.subtree is not None:
                    subdirs.append((node.subtree, path))
            stack.extend(reversed(subdirs))

    def find_node(self, snap: Snapshot, path: str) -> Node:
        parts = [p for p in path.strip("/").split("/") if p]
        node = Node(name="", type=DIR, subtree=bytes.fromhex(snap.tree))
        for part in parts:
            if node.type != DIR or node.subtree is None:
                break
            found = next((n for n in self.load_tree(node.subtree) if n.name == part), None)
            if found is None:
                break
            node = found
        else:
            return node
        raise UsageError(f"{path} is not in snapshot {snap.short_id}", hint="list it with 'keepwell ls'")

    def iter_blobs(self, ids: list[bytes], *, lookahead: int = 8) -> Iterator[bytes]:
        """Yield the plaintext of each blob in order, fetching a few ahead in parallel."""
        if len(ids) <= 1:
            for b in ids:
                yield self.load_blob(b)
            return
        with ThreadPoolExecutor(min(lookahead, len(ids))) as pool:
            window = []
            it = iter(ids)
            for b in it:
                window.append(pool.submit(self.load_blob, b))
                if len(window) >= lookahead:
                    break
            while window:
                fut = window.pop(0)
                nxt = next(it, None)
                if nxt is not None:
                    window.append(pool.submit(self.load_blob, nxt))
                yield fut.result()

    def iter_file(self, snap: Snapshot, path: str) -> Iterator[bytes]:
        node = self.find_node(snap, path)
        if node.type != "file":
            raise UsageError(f"{path} in snapshot {snap.short_id} is a {node.type}, not a file")
        yield from self.iter_blobs(node.content)

    def open_file(self, snap: Snapshot, path: str) -> BlobReader:
        return BlobReader(self.iter_file(snap, path))

    def new_snapshot(self, kind: str, paths: list[str], **kw: Any) -> SnapshotWriter:
        return SnapshotWriter(self, kind, paths, **kw)


class BlobReader:
    """A read-only binary stream over verified blobs (for restoring streams)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            rest = bytes(self._buf) + b"".join(self._chunks)
            self._buf = memoryview(b"")
            return rest
        while not self._buf:
            nxt = next(self._chunks, None)
            if nxt is None:
                return b""
            self._buf = memoryview(nxt)
        out = bytes(self._buf[:n])
        self._buf = self._buf[n:]
        return out

    def readinto(self, b: bytearray | memoryview) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_repository(location: str, password: str, *, guard: Guard | None = None,
                    upload_buckets: Sequence[TokenBucket] = (), **options: Any) -> Repository:
    """Open the repository at a location (path or URL), with the usual backend wrappers.

    This is the one way to open a repository by its location, for the CLI and the control
    plane alike. ``options`` are the CLI's (``limit_upload``, ``limit_download`` in KiB/s,
    ``cache_dir``); ``upload_buckets`` are budgets shared with other work in this process and
    ``guard`` may refuse any storage call (a job's deadline and cancellation): see
    `keepwell.backends.wrappers.wrap`. Worker processes open the same storage again from
    `Repository.opened_as`, without the guard; a shared budget keeps them from being used.
    """
    backend = open_storage(location, guard=guard, upload_buckets=upload_buckets, **options)
    repo = Repository.open(backend, password)
    _bind_cache(repo)
    if not repo.full and not options.get("dry_run"):
        base = options.get("cache_dir") or default_base()
        repo.own = OwnCache(own_cache_directory(base, repo.id, repo.key_id), repo.id_key)
    repo.opened_as = (location, {**options, "shared_budgets": len(upload_buckets)}
                      if upload_buckets else dict(options))
    return repo


def open_storage(location: str, *, guard: Guard | None = None,
                 upload_buckets: Sequence[TokenBucket] = (), **options: Any) -> Backend:
    """The backend at a location in the wrappers `open_repository` gives it (for work on the
    objects themselves, such as mirroring a repository to its replica)."""
    return _wrap(open_backend(location), location, options, upload_buckets, guard)


def reopen_repository(location: str, options: dict[str, Any], master_key: bytes,
                      config: dict[str, Any], key_id: str) -> Repository:
    """The same repository in another process, from what `Repository.opened_as` and the keys
    (``Keyring.raw``) hold (no password, no key derivation). Its index starts empty."""
    backend = open_storage(location, **options)
    repo = Repository(backend, Keyring.from_raw(master_key, config), config, key_id)
    _bind_cache(repo)
    repo.opened_as = (location, dict(options))
    repo._index = MasterIndex()
    return repo


def _bind_cache(repo: Repository) -> None:
    """Narrow the local cache (if any) to this repository, now that its id is known."""
    bind = getattr(repo.backend, "bind", None)
    if bind is not None:
        bind(repo.id)


def named_by_content(name: str, data: bytes) -> bool:
    """Whether ``data`` is the object ``name`` (every cached object is named by its hash)."""
    return content_name(data) == name.rsplit("/", 1)[1]


def _wrap(backend: Backend, location: str, options: dict[str, Any],
          upload_buckets: Sequence[TokenBucket], guard: Guard | None) -> Backend:
    """The usual wrappers for ``options``; ``dry_run``: outermost, one that writes nothing."""
    wrapped = _wrap_usual(backend, location, options, upload_buckets, guard)
    return DryRunBackend(wrapped) if options.get("dry_run") else wrapped


def _wrap_usual(backend: Backend, location: str, options: dict[str, Any],
                upload_buckets: Sequence[TokenBucket], guard: Guard | None) -> Backend:
    remote = "://" in location and not location.startswith(("file://", "memory://"))
    up, down = options.get("limit_upload"), options.get("limit_download")
    if not remote and not up and not down and not upload_buckets and guard is None:
        return backend
    cache_dir = (options.get("cache_dir") or default_base()) if remote else None
    # pacing stays below the configured upload limits and budgets (their rates as of now)
    budgets = [r for r in (up * 1024 if up else None, *(b.rate for b in upload_buckets)) if r]
    adaptive = AimdController(UPLOAD_WORKERS, ceiling=min(budgets, default=None),
                              name=str(getattr(backend, "location", "") or location)) \
        if remote and adaptive_enabled(options.get("adaptive")) else None
    return wrappers.wrap(backend, limit_upload=up, limit_download=down, retries=remote,
                         cache_dir=cache_dir, cache_verify=named_by_content,
                         upload_buckets=upload_buckets, guard=guard, adaptive=adaptive)
