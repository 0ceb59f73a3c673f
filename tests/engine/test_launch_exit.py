"""How spawned workers end: output flushed, ranks leave together, a C++ abort shows a Python stack."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import os, sys, time
    sys.path.insert(0, {repo!r})
    import torch.distributed as dist
    from dino_research.engine.launch import launch

    def main(mode, out):
        rank = dist.get_rank()
        if mode == "abort" and rank == 1:
            os.abort()  # what a C++ std::terminate ends in
        if rank == 0:
            time.sleep(1.5)  # rank 0 still busy (a final checkpoint) when rank 1 is done
            with open(os.path.join(out, "rank1.pid")) as f:
                pid = f.read()
            try:  # state R/S: rank 1 still waits for rank 0; Z or gone: it already left
                with open(f"/proc/{{pid}}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                state = "gone"
            with open(os.path.join(out, "rank1_state_when_rank0_finished"), "w") as f:
                f.write(state)
        else:
            with open(os.path.join(out, "rank1.pid"), "w") as f:
                f.write(str(os.getpid()))
        print(f"last line of rank {{rank}}", end="")  # block-buffered into a pipe: lost unless flushed

    if __name__ == "__main__":
        launch(main, 2, args=(sys.argv[1], sys.argv[2]))
        print("\\nlauncher returned")
''')


def _run(tmp_path, mode):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(repo=str(REPO)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout into a pipe: buffered
    return subprocess.run([sys.executable, str(script), mode, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_finished_workers_flush_and_leave_together(tmp_path):
    proc = _run(tmp_path, "ok")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Workers end with os._exit (no interpreter shutdown); what they printed is still there.
    assert "last line of rank 0" in proc.stdout and "last line of rank 1" in proc.stdout
    assert proc.stdout.rstrip().endswith("launcher returned")
    # Rank 1 returned at once but its process waited for rank 0 to finish (the barrier).
    assert (tmp_path / "rank1_state_when_rank0_finished").read_text() in ("R", "S", "D")


def test_an_aborting_worker_prints_its_python_stack(tmp_path):
    proc = _run(tmp_path, "abort")
    assert proc.returncode != 0
    assert "Fatal Python error: Aborted" in proc.stderr
    assert "in main" in proc.stderr and "job.py" in proc.stderr  # the frame that aborted
