"""``tokenprune explain`` as a process that dies at the worst moment: rank ``KILL_RANK`` exits
(``os._exit``: no cleanup, no ``finally``) at its ``KILL_AT``-th commit (0-based), after that
chunk's shard was renamed into place and before its commit file is written.

    python -m torch.distributed.run ... _explain_worker.py KILL_RANK KILL_AT <explain options>
"""

from __future__ import annotations

import os
import sys

from tokenprune_kernels.distributed import detect_env
from tokenprune_kernels.explain import cli
from tokenprune_kernels.explain.distributed import PartWriter

EXIT_CODE = 17


def main(argv: list[str]) -> int:
    kill_rank, kill_at = int(argv[0]), int(argv[1])
    if detect_env().rank == kill_rank:
        write = PartWriter._write_commit
        seen = [0]

        def dying(self, path, data):
            if seen[0] == kill_at:
                os._exit(EXIT_CODE)
            seen[0] += 1
            write(self, path, data)

        PartWriter._write_commit = dying
    return cli.main(argv[2:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
