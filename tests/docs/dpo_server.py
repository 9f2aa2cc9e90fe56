"""A fork server for the README blocks' `dpo` (tests/test_docs.py): import torch, transformers and
dpocli once, then run each `dpo ...` of a block in a forked child that calls `dpocli.cli.app.main`, the
console script's own entry point, with the caller's arguments, folder, environment and stdio.

It only saves the ~5 s import per command; the command itself runs exactly as `dpo` would run it.
Usage: python dpo_server.py SOCKET (serves until killed); clients: dpo_client.py.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback

import torch  # noqa: F401  (the slow imports, done once, before any fork)
import transformers  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

import dpocli.cli.app
import dpocli.eval.evaluate  # noqa: F401
import dpocli.precompute.run  # noqa: F401
import dpocli.train.loop  # noqa: F401


def serve(path: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    while True:
        conn, _ = server.accept()
        message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:
            server.close()
            conn.close()
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            sys.argv = ["dpo", *request["args"]]
            code = 0
            try:
                dpocli.cli.app.main()
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        for fd in fds:
            os.close(fd)
        _, status = os.waitpid(pid, 0)
        conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
