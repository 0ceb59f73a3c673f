#!/usr/bin/env python
"""``tools/train_net.py`` with a fault injected: with ``DINO_KILL_IN_SAVE=N`` in the environment, the process
SIGKILLs itself half-way through writing the N-th checkpoint file it saves (the bytes written so far
are flushed to disk first), as a power cut or the OOM killer would. Used by ``kill_resume.py``.

    DINO_KILL_IN_SAVE=2 python tests/reliability/faulty_train.py --config ... KEY VALUE ...
"""

import io
import os
import runpy
import signal
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def _install_kill_in_save(n: int) -> None:
    real_save = torch.save
    calls = [0]

    def dying_save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] < n or not hasattr(f, "write"):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = dying_save


if __name__ == "__main__":
    if int(os.environ.get("DINO_KILL_IN_SAVE", "0")) > 0:
        _install_kill_in_save(int(os.environ["DINO_KILL_IN_SAVE"]))
    sys.argv[0] = str(REPO / "tools" / "train_net.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
