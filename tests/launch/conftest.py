"""The session's SLURM cluster (skipped, with the reason, where SLURM cannot run)."""
import pytest

from tests.launch.slurm_cluster import SlurmCluster, why_not_available


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running one-node cluster; ``SLURM_CONF`` points this process (and the jobs it submits) at it."""
    reason = why_not_available()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm"))).start()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in cluster.env.items():
            patch.setenv(key, value)
        try:
            yield cluster
        finally:
            cluster.stop()
