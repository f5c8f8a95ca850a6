#!/usr/bin/env bash
# The main job on embedded defaults: a local repository in ./demo/repo, the bundled example tree
# and an example SQLite database; back up, change, back up again, restore both, verify.
# The backups run through the control plane (demo/keepwell.yaml), so they leave a job history
# behind (demo/history.db): `keepwell web -c demo/keepwell.yaml` shows them with their plots.
set -euo pipefail
cd "$(dirname "$0")/.."
KW=.venv/bin/keepwell
export KEEPWELL_REPOSITORY=demo/repo KEEPWELL_PASSWORD_FILE=demo/password
mkdir -p demo
[ -s demo/password ] || (umask 077; .venv/bin/python -c "import secrets; print(secrets.token_urlsafe(24))" > demo/password)
[ -e demo/repo/config ] || $KW init
rm -rf demo/data demo/restore
cp -a examples/demo-tree demo/data
cat > demo/keepwell.yaml <<YAML
# written by examples/demo.sh: the demo's backups as sources of the control plane
version: 1
history: history.db              # the job history, beside this file
scratch: scratch                 # drills restore here
repositories:
  demo:
    location: repo
    password: file:$PWD/demo/password
sources:
  files:
    kind: files
    repository: demo
    paths: [data]
    excludes: [app.db]           # backed up by the sqlite source, consistently
    tags: [demo]
  app:
    kind: sqlite
    repository: demo
    path: data/app.db
    tags: [demo]
drills:
  files-drill: {source: files}
  app-drill: {source: app, tables: {orders: 1}}
YAML
CONF="-c demo/keepwell.yaml"
.venv/bin/python - <<'PY'
import sqlite3
con = sqlite3.connect("demo/data/app.db")
con.execute("create table if not exists orders(id integer primary key, item text, qty int)")
con.executemany("insert into orders(item, qty) values (?, ?)", [(f"item-{i}", i % 7) for i in range(5000)])
con.commit()
PY
echo "== first backup (keepwell run: recorded in the job history)"
$KW run $CONF files
$KW run $CONF app
echo "== change a few files and rows"
echo "a new line" >> demo/data/docs/notes-2.txt
echo "brand new file" > demo/data/docs/new.txt
rm demo/data/docs/notes-5.txt
.venv/bin/python -c "
import sqlite3; c=sqlite3.connect('demo/data/app.db'); c.execute(\"update orders set qty=qty+1 where id<50\"); c.execute(\"insert into orders(item,qty) values ('late',1)\"); c.commit()"
echo "== second backup"
$KW run $CONF files
$KW run $CONF app
$KW snapshots
$KW stats
echo "== restore both file snapshots and both database snapshots, verify"
ids=$($KW snapshots --kind files --json | .venv/bin/python -c "import json,sys; print(' '.join(s['id'] for s in json.load(sys.stdin)[-2:]))")
dbs=$($KW snapshots --kind sqlite --json | .venv/bin/python -c "import json,sys; print(' '.join(s['id'] for s in json.load(sys.stdin)[-2:]))")
n=0; for id in $ids; do n=$((n+1)); $KW restore "$id" --target "demo/restore/files-$n"; done
n=0; for id in $dbs; do n=$((n+1)); $KW sqlite restore "$id" --target "demo/restore/db-$n.db"; done
diff -r --no-dereference demo/data "demo/restore/files-2$(cd demo/data && pwd)" -x app.db && echo "latest files: byte-identical"
.venv/bin/python - <<'PY'
import sqlite3
a = sqlite3.connect("demo/data/app.db").execute("select * from orders order by id").fetchall()
b = sqlite3.connect("demo/restore/db-2.db").execute("select * from orders order by id").fetchall()
c = sqlite3.connect("demo/restore/db-1.db").execute("select count(*) from orders").fetchone()[0]
assert a == b, "restored database differs"
print(f"latest database: identical ({len(b)} rows); first database: {c} rows")
PY
$KW check --read-data
echo "== restore drills (recorded in the job history: RTO and RPO)"
$KW drill $CONF files-drill
$KW drill $CONF app-drill
echo "== done: repository in demo/repo, restores in demo/restore"
echo "== the job history is in demo/history.db; see it in the dashboard:"
echo "   $KW web -c demo/keepwell.yaml    # then open http://127.0.0.1:9378/"
