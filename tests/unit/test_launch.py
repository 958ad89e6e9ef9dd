"""The pure parts of the bootstrap: which launcher, Slurm node lists and
ports, the address rank 0 publishes under MPI."""

from __future__ import annotations

import pytest

from alltoall.launch import (
    detect_launcher,
    expand_slurm_nodelist,
    first_slurm_host,
    interface_ipv4,
    mpi_master_addr,
    slurm_master_port,
    slurm_task,
)

SRUN = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[003-006]", "SLURM_STEP_NODELIST": "gpu[004-005]"}


@pytest.mark.parametrize(
    "env,has_mpi4py,expected",
    [
        ({}, True, None),
        ({"RANK": "0", "WORLD_SIZE": "2"}, True, "torchrun"),
        ({"RANK": "0", "WORLD_SIZE": "2", **SRUN}, True, "torchrun"),  # torchrun started by srun
        ({"RANK": "0"}, True, None),  # half a torchrun environment is none
        ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1"}, True, "mpi"),
        ({"PMI_SIZE": "4", "PMI_RANK": "1"}, True, "mpi"),  # MPICH / Hydra
        ({"PMIX_RANK": "1"}, True, "mpi"),
        # mpiexec inside an allocation: ranks inherit the per-node proxy's Slurm step variables.
        ({"PMI_SIZE": "8", "PMI_RANK": "5", **SRUN, "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}, True, "mpi"),
        ({"PMI_SIZE": "8", "PMI_RANK": "5", **SRUN, "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}, False, "mpi"),
        # srun --mpi=pmi2 without mpi4py: both describe the same 8 tasks, Slurm's are enough.
        ({"PMI_SIZE": "8", "PMI_RANK": "3", **SRUN}, False, "slurm"),
        ({"PMIX_RANK": "3", **SRUN}, False, "slurm"),
        ({"PMIX_RANK": "3", **SRUN}, True, "mpi"),
        (SRUN, True, "slurm"),
        ({**{k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}, "SLURM_STEPID": "0"}, True, "slurm"),
        # An sbatch script (no step) is not rank 0 of the job.
        ({k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}, True, None),
    ],
)
def test_detect_launcher(env, has_mpi4py, expected):
    assert detect_launcher(env, has_mpi4py=has_mpi4py) == expected


@pytest.mark.parametrize(
    "nodelist,hosts",
    [
        ("node1", ["node1"]),
        ("node1,node2", ["node1", "node2"]),
        ("gpu[003-005,010],cpu1", ["gpu003", "gpu004", "gpu005", "gpu010", "cpu1"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[08-11]", ["n08", "n09", "n10", "n11"]),
        ("r[1-2]n[1,3]", ["r1n1", "r1n3", "r2n1", "r2n3"]),
        ("rack1-node[7-8]-ib", ["rack1-node7-ib", "rack1-node8-ib"]),
        ("a[1],b[2-3],c", ["a1", "b2", "b3", "c"]),
        (" x[1-2] ", ["x1", "x2"]),
        ("10.231.0.[1-2]", ["10.231.0.1", "10.231.0.2"]),
    ],
)
def test_expand_slurm_nodelist(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts
    assert first_slurm_host(nodelist) == hosts[0]


@pytest.mark.parametrize(
    "nodelist,message",
    [
        ("", "empty"),
        ("gpu[1-2", r"unbalanced '\['"),
        ("gpu1-2]", r"unbalanced '\]'"),
        ("gpu[[1]]", r"nested '\['"),
        ("gpu[5-3]", "runs backwards"),
        ("gpu[a-b]", "bad range 'a-b'"),
        ("gpu[]", "bad range ''"),
        ("a,,b", "empty host name"),
    ],
)
def test_bad_slurm_nodelist_names_the_list(nodelist, message):
    with pytest.raises(ValueError, match=message):
        expand_slurm_nodelist(nodelist)


def test_slurm_task_uses_the_step_nodes():
    task = slurm_task(SRUN)
    assert (task.rank, task.world_size, task.local_rank) == (3, 8, 1)
    assert task.master_addr == "gpu004"  # the step's first node, not the job's
    assert task.master_port == slurm_master_port(SRUN)


def test_slurm_task_falls_back_to_the_job_nodes_and_honours_master_vars():
    env = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_NODELIST"}
    assert slurm_task(env).master_addr == "gpu003"
    env = {**env, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "12345"}
    task = slurm_task(env)
    assert (task.master_addr, task.master_port) == ("10.0.0.7", 12345)


def test_slurm_task_without_nodes_or_rank_raises():
    with pytest.raises(ValueError, match="SLURM_STEP_NODELIST"):
        slurm_task({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    with pytest.raises(ValueError, match="incomplete Slurm environment"):
        slurm_task({"SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a"})


def test_slurm_port_is_shared_by_a_step_and_differs_between_steps_and_jobs():
    ports = {slurm_master_port({"SLURM_JOB_ID": str(job), "SLURM_STEP_ID": str(step)})
             for job in range(100, 110) for step in range(3)}
    assert len(ports) == 30
    assert all(20000 <= p < 32000 for p in ports)
    batch = slurm_master_port({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "batch"})
    assert batch == slurm_master_port({"SLURM_JOB_ID": "7"})


def test_mpi_master_addr():
    def addr(env, single_host=False, interfaces=None):
        interfaces = interfaces or {"eth0": "10.231.0.1", "lo": "127.0.0.1"}
        return mpi_master_addr(env, single_host=single_host, hostname="node0", address_of=interfaces.get)

    assert addr({"MASTER_ADDR": "10.9.9.9", "GLOO_SOCKET_IFNAME": "eth0"}) == "10.9.9.9"
    assert addr({"GLOO_SOCKET_IFNAME": "eth0"}) == "10.231.0.1"
    assert addr({"NCCL_SOCKET_IFNAME": "=eth0"}) == "10.231.0.1"  # NCCL's exact-match syntax
    assert addr({"NCCL_SOCKET_IFNAME": "eth0,ib0"}) == "10.231.0.1"
    assert addr({"NCCL_SOCKET_IFNAME": "^docker"}) == "node0"  # an exclusion names no interface
    assert addr({"GLOO_SOCKET_IFNAME": "lo"}) == "node0"  # loopback is useless to other hosts
    assert addr({"GLOO_SOCKET_IFNAME": "missing0"}, single_host=True) == "127.0.0.1"
    assert addr({}, single_host=True) == "127.0.0.1"
    assert addr({}) == "node0"


def test_interface_ipv4_reads_loopback():
    assert interface_ipv4("lo") == "127.0.0.1"
    assert interface_ipv4("no-such-if0") is None
