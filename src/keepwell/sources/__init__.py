"""Sources: what turns something (a file tree, a database, a stream) into snapshots and back.

Each kind of source lives in its own module or package and uses only the public repository API.
"""
