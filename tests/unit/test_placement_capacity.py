"""Whether a replica's placement can ever fit a cluster's nodes (cluster/placement.py
`unplaceable_reason`), from node resource totals as Ray reports them."""

from __future__ import annotations

from lmfleet.cluster.placement import ReplicaPlacement, unplaceable_reason

CPU_NODE = {"CPU": 16.0, "memory": 6.4e10}
GPU_NODE = {"CPU": 16.0, "GPU": 1.0}
TWO_GPU_NODE = {"CPU": 32.0, "GPU": 2.0}


def test_a_gpu_replica_on_cpu_nodes_names_what_is_missing():
    why = unplaceable_reason(ReplicaPlacement(use_gpu=True), [CPU_NODE, CPU_NODE])
    assert why is not None
    assert "1 GPU" in why and "0 GPU" in why and "--device cpu" in why
    assert unplaceable_reason(ReplicaPlacement(use_gpu=True), [CPU_NODE, GPU_NODE]) is None


def test_tensor_parallel_ranks_need_one_node_pipeline_stages_may_spread():
    tp2 = ReplicaPlacement(tp=2, use_gpu=True)
    why = unplaceable_reason(tp2, [GPU_NODE, GPU_NODE])  # 2 GPUs, but not on one node
    assert why is not None and "2 GPU on one node" in why and "tp=2" in why
    assert unplaceable_reason(tp2, [GPU_NODE, TWO_GPU_NODE]) is None
    pp2 = ReplicaPlacement(pp=2, use_gpu=True)
    assert unplaceable_reason(pp2, [GPU_NODE, GPU_NODE]) is None
    assert "the cluster" in unplaceable_reason(pp2, [GPU_NODE, CPU_NODE])


def test_cpu_replicas_count_cpus_per_rank():
    big = ReplicaPlacement(cpus_per_rank=24.0)
    assert "24 CPU" in unplaceable_reason(big, [CPU_NODE])
    assert unplaceable_reason(big, [TWO_GPU_NODE]) is None
    assert unplaceable_reason(ReplicaPlacement(), []) is not None  # no node alive
