"""Trees for the file benchmarks, built from what this machine has, and the changes made to them
between a first backup and a re-backup.

    trees.py build SHAPE DIR          build the pristine tree of SHAPE in DIR (once; reused)
    trees.py change SHAPE DIR SEED    change a working copy as a day of use would
    trees.py generate DIR FILES [--dirs N]   FILES small files (0.5 to 2 KiB of text) for the
                                      growth benchmark, in N directories (default: a realistic
                                      mix of directory sizes), deterministic

Shapes (each at least 1 GB):
    small   many small source files: every text file under 64 KiB found in this Python's
            standard library, the project's installed packages, /usr/include and
            /usr/share/doc, copied as several versions of one source tree (each version
            changes a line in every file, as the branches of a project do; nothing is stored
            twice by any tool);
    mixed   this Python's lib/ directory and the project's installed packages: sources,
            byte code, shared libraries, data files, a few files of tens of MiB;
    large   a few very large files: a 640 MiB disk image (the files of /usr/lib and /usr/bin laid
            out in 4 KiB blocks with unused zeroed regions between them), a 400 MiB SQLite
            database with an index, and 160 MiB of already-compressed archives.

Changes (deterministic for a seed):
    small, mixed   3 % of the files modified (a line inserted in a text file, 4 KiB
                   overwritten in a binary one), 1 % deleted, 1 % added (modified copies of
                   others in a new directory); as an editor saves, to a new file renamed over
                   the old one;
    large          16 regions of 1 MiB rewritten in place in the disk image, 1 % of the
                   database's rows updated and 0.5 % inserted (through SQLite), the archives
                   untouched.
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import subprocess
import sys
import sysconfig

GB = 1 << 30
SMALL_MAX = 64 * 1024


def _text(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            data = f.read(SMALL_MAX + 1)
    except OSError:
        return None
    if not data or len(data) > SMALL_MAX or b"\0" in data[:8192]:
        return None
    return data


def _sources() -> list[str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    purelib = sysconfig.get_paths()["purelib"]
    return [d for d in (stdlib, purelib, "/usr/include", "/usr/share/doc") if os.path.isdir(d)]


def build_small(dest: str) -> None:
    pool: list[tuple[str, bytes]] = []
    for top in _sources():
        name = top.strip("/").replace("/", "_")
        for root, dirs, files in os.walk(top):
            dirs.sort()
            for f in sorted(files):
                path = os.path.join(root, f)
                if os.path.islink(path):
                    continue
                data = _text(path)
                if data is not None:
                    pool.append((os.path.join(name, os.path.relpath(path, top)), data))
    size = sum(len(d) for _, d in pool)
    versions = max(2, -(-GB * 11 // 10 // size))  # at least 1.1 GiB
    for v in range(versions):
        rng = random.Random(v)
        for rel, data in pool:
            lines = data.split(b"\n")
            at = rng.randrange(len(lines))
            lines.insert(at, b"# version %d of %s" % (v, rel.encode(errors="replace")))
            path = os.path.join(dest, f"v{v}", rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as out:
                out.write(b"\n".join(lines))


def build_mixed(dest: str) -> None:
    stdlib = os.path.dirname(sysconfig.get_paths()["stdlib"])  # lib/
    purelib = sysconfig.get_paths()["purelib"]
    for src, name in ((stdlib, "lib"), (purelib, "site-packages")):
        subprocess.run(["cp", "-a", src, os.path.join(dest, name)], check=True)
        # the project's own virtual environment may sit inside lib/'s copy: nothing else does
    for root, dirs, files in os.walk(dest):
        for f in files:
            path = os.path.join(root, f)
            if os.path.islink(path) and not os.path.exists(path):
                os.unlink(path)


def build_large(dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    rng = random.Random(1)
    # a disk image: files of /usr in 4 KiB blocks, runs of free (zeroed) blocks between them
    image_size = 640 << 20
    with open(os.path.join(dest, "vm.img"), "wb") as img:
        written = 0
        for top in ("/usr/lib", "/usr/bin", "/usr/share"):
            for root, dirs, files in os.walk(top):
                dirs.sort()
                for f in sorted(files):
                    path = os.path.join(root, f)
                    if written >= image_size or os.path.islink(path):
                        continue
                    try:
                        with open(path, "rb") as src:
                            data = src.read(image_size - written)
                    except OSError:
                        continue
                    data += b"\0" * (-len(data) % 4096)
                    if rng.random() < 0.05:  # a free region
                        data += b"\0" * (4096 * rng.randrange(16, 512))
                    data = data[:image_size - written]
                    img.write(data)
                    written += len(data)
        img.write(b"\0" * (image_size - written))
    # a database: rows of text, numbers and keys, with an index, about 400 MiB
    db = sqlite3.connect(os.path.join(dest, "app.sqlite"))
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, account TEXT, kind TEXT, amount REAL,"
               " note TEXT, created INTEGER)")
    words = open(os.path.join(sysconfig.get_paths()["stdlib"], "this.py")).read().split()
    kinds = ["deposit", "withdrawal", "transfer", "fee", "refund", "interest"]
    row = 0
    while os.path.getsize(os.path.join(dest, "app.sqlite")) < 340 << 20:
        rows = []
        for _ in range(50_000):
            row += 1
            rows.append((row, f"ACC-{rng.randrange(10**7):07d}", rng.choice(kinds),
                         round(rng.uniform(-5000, 5000), 2),
                         " ".join(rng.choice(words) for _ in range(rng.randrange(3, 20))),
                         1_600_000_000 + row * 7))
        db.executemany("INSERT INTO events VALUES (?,?,?,?,?,?)", rows)
        db.commit()
    db.execute("CREATE INDEX events_account ON events(account)")
    db.commit()
    db.close()
    # already-compressed archives (as in a directory of downloads or media)
    for i, top in enumerate(("/usr/lib/x86_64-linux-gnu", "/usr/share")):
        out = os.path.join(dest, f"archive-{i}.tar.zst")
        with open(out, "wb") as f:
            tar = subprocess.Popen(["tar", "-cf", "-", "--ignore-failed-read", top],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            head = subprocess.Popen(["head", "-c", str(400 << 20)], stdin=tar.stdout,
                                    stdout=subprocess.PIPE)
            subprocess.run(["zstd", "-q", "-3", "-c"], stdin=head.stdout, stdout=f, check=True)
            head.wait()
            tar.kill()
            tar.wait()


def _files(top: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(top):
        dirs.sort()
        out.extend(os.path.join(root, f) for f in sorted(files)
                   if not os.path.islink(os.path.join(root, f)))
    return out


def _save(path: str, data: bytes) -> None:
    """As an editor saves: a new file renamed over the old one."""
    tmp = path + ".kw-bench-tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    shutil.copymode(path, tmp) if os.path.exists(path) else None
    os.replace(tmp, path)


def _modified(data: bytes, rng: random.Random) -> bytes:
    if b"\0" not in data[:8192]:
        lines = data.split(b"\n")
        lines.insert(rng.randrange(len(lines) + 1), b"# changed %d" % rng.randrange(10**9))
        return b"\n".join(lines)
    at = rng.randrange(max(1, len(data) - 4096))
    return data[:at] + rng.randbytes(min(4096, len(data))) + data[at + 4096:]


def change_tree(top: str, seed: int) -> str:
    rng = random.Random(seed)
    files = _files(top)
    picked = rng.sample(files, len(files) * 5 // 100)
    n_mod, n_del = len(files) * 3 // 100, len(files) // 100
    modified, deleted, copied = picked[:n_mod], picked[n_mod:n_mod + n_del], picked[n_mod + n_del:]
    changed = 0
    for path in modified:
        with open(path, "rb") as f:
            data = f.read()
        new = _modified(data, rng)
        _save(path, new)
        changed += len(new)
    for path in deleted:
        os.unlink(path)
    new_dir = os.path.join(top, f"added-{seed}")
    os.makedirs(new_dir, exist_ok=True)
    for i, path in enumerate(copied):
        with open(path, "rb") as f:
            data = _modified(f.read(), rng)
        with open(os.path.join(new_dir, f"{i:05d}-{os.path.basename(path)}"), "wb") as f:
            f.write(data)
        changed += len(data)
    return (f"{len(modified)} modified, {len(deleted)} deleted, {len(copied)} added of "
            f"{len(files)} files ({changed / (1 << 20):.0f} MiB written)")


def change_large(top: str, seed: int) -> str:
    rng = random.Random(seed)
    image = os.path.join(top, "vm.img")
    size = os.path.getsize(image)
    fd = os.open(image, os.O_WRONLY)
    try:
        for _ in range(16):
            os.pwrite(fd, rng.randbytes(1 << 20), rng.randrange(size // 4096 - 256) * 4096)
    finally:
        os.close(fd)
    db = sqlite3.connect(os.path.join(top, "app.sqlite"))
    (rows,) = db.execute("SELECT max(id) FROM events").fetchone()
    ids = rng.sample(range(1, rows + 1), rows // 100)
    db.executemany("UPDATE events SET amount = amount + 1, note = note || ' (corrected)' "
                   "WHERE id = ?", [(i,) for i in ids])
    db.executemany("INSERT INTO events (account, kind, amount, note, created) VALUES "
                   "(?, 'transfer', ?, 'new', ?)",
                   [(f"ACC-{rng.randrange(10**7):07d}", rng.uniform(-99, 99), 1_700_000_000 + i)
                    for i in range(rows // 200)])
    db.commit()
    db.close()
    return f"16 MiB rewritten in vm.img; {len(ids)} rows updated, {rows // 200} inserted"


def generate(dest: str, count: int, dirs: int | None) -> None:
    """``count`` files of 0.5 to 2 KiB of text; in ``dirs`` directories of equal size, or in a
    tree of directories whose sizes vary as a project's do (1 to 400 files, 3 levels)."""
    rng = random.Random(count)
    words = [w.encode() for w in open(os.path.join(sysconfig.get_paths()["stdlib"],
                                                   "this.py")).read().split()]
    made = 0
    d = 0
    while made < count:
        per = (count // dirs) if dirs else min(count - made, int(rng.paretovariate(1.2) * 8))
        per = max(1, min(per, count - made))
        path = (os.path.join(dest, f"d{d:05d}") if dirs else
                os.path.join(dest, f"a{d % 37:02d}", f"b{d % 1009:04d}", f"c{d:06d}"))
        os.makedirs(path, exist_ok=True)
        for i in range(per):
            n = rng.randrange(512, 2048)
            body = b" ".join(rng.choice(words) for _ in range(n // 6))
            with open(os.path.join(path, f"f{i:04d}.txt"), "wb") as f:
                f.write(b"%d %d\n" % (d, i) + body[:n])
        made += per
        d += 1


def main() -> None:
    cmd = sys.argv[1]
    if cmd == "build":
        shape, dest = sys.argv[2], sys.argv[3]
        tmp = dest + ".building"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        {"small": build_small, "mixed": build_mixed, "large": build_large}[shape](tmp)
        os.replace(tmp, dest)
    elif cmd == "change":
        shape, top, seed = sys.argv[2], sys.argv[3], int(sys.argv[4])
        print(change_large(top, seed) if shape == "large" else change_tree(top, seed))
    elif cmd == "generate":
        dest, count = sys.argv[2], int(sys.argv[3])
        dirs = int(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[4] == "--dirs" else None
        generate(dest, count, dirs)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
