"""The run directory's lock: a second writer is refused at once with the holder's name, a lock left
by a killed process is taken over, and of several processes racing for it exactly one wins.
Holders and racers are separate processes (a lock is per process)."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from torchrec_mec.cli import main
from torchrec_mec.pipeline import RunLock, RunLockedError, load_settings, run_stages
from torchrec_mec.pipeline.lock import LOCK_FILE

LOCK_PY = Path(__file__).resolve().parents[1] / "torchrec_mec" / "pipeline" / "lock.py"
LOAD = textwrap.dedent(f"""
    import importlib.util
    spec = importlib.util.spec_from_file_location("lock", {str(LOCK_PY)!r})
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)  # the module alone (standard library): no torch to import
""")
HOLD = LOAD + textwrap.dedent("""
    import sys, time
    lock.RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
""")

RACE = LOAD + textwrap.dedent("""
    import os, sys, time
    run_dir, go = sys.argv[1], sys.argv[2]
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    try:
        lock.RunLock(run_dir).acquire()
    except lock.RunLockedError as e:
        print("refused", e, flush=True)
    else:
        print("won", flush=True)
        time.sleep(3)  # hold it while the others try
""")


def _python(code, *args):
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _holder(run_dir):
    """A process that takes the lock and keeps it until killed."""
    proc = _python(HOLD, run_dir)
    line = proc.stdout.readline()
    assert line.strip() == "locked", proc.stderr.read()
    return proc


def test_second_writer_is_refused_naming_host_pid_and_time(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    holder = _holder(run_dir)
    try:
        with pytest.raises(RunLockedError) as e:
            RunLock(run_dir).acquire()
        message = str(e.value)
        assert f"is in use by pid {holder.pid} on {socket.gethostname()} since " in message
        since = json.loads(open(os.path.join(run_dir, LOCK_FILE)).read())["since"]
        assert since in message
        # Every command goes through the runner, which takes the lock before it looks at anything.
        assert main(["report", "--out", run_dir]) == 1
        assert f"pid {holder.pid}" in capsys.readouterr().err
        with pytest.raises(RunLockedError):
            run_stages(run_dir, "compress", load_settings("sample"), progress=False)
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    run_dir = str(tmp_path / "run")
    holder = _holder(run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = RunLock(run_dir)
    with caplog.at_level("WARNING", logger="torchrec_mec"):
        previous = lock.acquire()
    try:
        assert previous is not None and previous.pid == holder.pid
        assert f"took over the lock left by pid {holder.pid}" in caplog.text
        mine = json.loads(open(os.path.join(run_dir, LOCK_FILE)).read())
        assert mine["pid"] == os.getpid()
    finally:
        lock.release()
    assert open(os.path.join(run_dir, LOCK_FILE)).read() == "", "release clears the holder"
    again = RunLock(run_dir)
    assert again.acquire() is None  # a released lock is not stale
    again.release()


def test_processes_racing_for_a_stale_lock_one_wins(tmp_path):
    run_dir = str(tmp_path / "run")
    holder = _holder(run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    go = str(tmp_path / "go")
    racers = [_python(RACE, run_dir, go) for _ in range(4)]
    for p in racers:  # all four imported and spinning on the start signal
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    open(go, "w").close()
    results = [p.communicate(timeout=120)[0].strip() for p in racers]
    assert sum(r == "won" for r in results) == 1, results
    winner = racers[[r == "won" for r in results].index(True)].pid
    for r in results:
        assert r == "won" or r.startswith(f"refused {run_dir} is in use by pid {winner} on "), r
