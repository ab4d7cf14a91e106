"""Under torchrun the job, not each rank, holds the run directory's lock: rank 0 takes it and
every rank learns the outcome (2 gloo ranks)."""
import os

from tests.distributed.multiprocess import run_on_ranks
from torchrec_mec.pipeline import RunLock, RunLockedError, run_stages


def _try_report(rank: int, world_size: int, run_dir: str, result_dir: str) -> None:
    try:
        run_stages(run_dir, "report", progress=False)
        outcome = "ran"
    except RunLockedError as e:
        outcome = f"refused: {e}"
    with open(os.path.join(result_dir, f"rank{rank}"), "w") as f:
        f.write(outcome)


def test_every_rank_of_a_job_is_refused_when_the_directory_is_locked(tmp_path):
    run_dir, results = str(tmp_path / "run"), tmp_path / "results"
    results.mkdir()
    with RunLock(run_dir):
        run_on_ranks(_try_report, run_dir, str(results), world_size=2)
    for rank in (0, 1):
        text = (results / f"rank{rank}").read_text()
        assert text.startswith(f"refused: {run_dir} is in use by pid {os.getpid()} on "), text
