"""`dpo` for the README blocks: hands argv, folder, environment and stdio to dpo_server.py and exits
with the command's exit code. Needs DPO_DOCS_SOCKET."""

import json
import os
import socket
import sys

conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.connect(os.environ["DPO_DOCS_SOCKET"])
request = {"args": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}
socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
reply = b""
while not reply.endswith(b"\n"):
    chunk = conn.recv(64)
    if not chunk:
        sys.exit("dpo docs server: no reply")
    reply += chunk
sys.exit(int(reply))
