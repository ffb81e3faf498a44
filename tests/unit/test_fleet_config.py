"""Fleet config (cluster/fleet_config.py) and replica placement (cluster/placement.py):
what a YAML file turns into, and the clear errors for what it must not contain."""

from __future__ import annotations

import textwrap

import pytest

from lmfleet.cluster.fleet_config import (
    ControllerConfig,
    engine_options,
    fleet_config_from_dict,
    load_fleet_config,
)
from lmfleet.cluster.placement import ReplicaPlacement

FLEET_YAML = """
cluster: prod
controller:
  reconcile_interval_s: 0.25
  unhealthy_after: 2
models:
  - name: chat
    path: default
    min_replicas: 1
    max_replicas: 3
    scheduler: mlfq
    engine:
      max_num_seqs: 8
      host-kv-memory: 1GiB
    autoscaling:
      target_load_per_replica: 2
      upscale_delay_s: 0.5
  - name: batch
    replicas: 2
    cpus_per_rank: 2
    engine: {device: cuda, dtype: bfloat16}
"""


def test_a_fleet_yaml_becomes_deployments_with_engine_options(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET_YAML)
    fleet = load_fleet_config(path)
    assert fleet.cluster == "prod"
    assert fleet.controller == ControllerConfig(reconcile_interval_s=0.25, unhealthy_after=2)
    chat, batch = fleet.models
    assert (chat.autoscaling.min_replicas, chat.autoscaling.max_replicas) == (1, 3)
    assert chat.autoscaling.target_load_per_replica == 2.0
    assert chat.autoscaling.upscale_delay_s == 0.5
    assert chat.autoscaling.downscale_delay_s == 30.0  # the default
    assert chat.engine_options() == {"max_num_seqs": 8, "host_kv_memory": 1 << 30,
                                     "scheduler": "mlfq"}
    assert batch.engine_options() == {"device": "cuda", "dtype": "bfloat16",
                                      "scheduler": "fcfs"}
    assert chat.placement == ReplicaPlacement(1, 1, use_gpu=False, cpus_per_rank=1.0)
    assert (batch.autoscaling.min_replicas, batch.autoscaling.max_replicas) == (2, 2)
    assert batch.placement.bundles() == [{"CPU": 2.0, "GPU": 1.0}]
    assert fleet.model("batch") is batch


@pytest.mark.parametrize("change, message", [
    ({"models": []}, "models: a list of at least one model"),
    ({"modles": []}, "unknown key 'modles'"),
    ({"models": [{"path": "default"}]}, r"models\[0\]: 'name' is required"),
    ({"models": [{"name": "a"}, {"name": "a"}]}, "'a' is used twice"),
    ({"models": [{"name": "a", "path": "/no/such/model"}]}, r"models\[0\]\.path: model not"),
    ({"models": [{"name": "a", "replicas": 2, "max_replicas": 3}]}, "not both"),
    ({"models": [{"name": "a", "min_replicas": 3, "max_replicas": 2}]}, "max_replicas"),
    ({"models": [{"name": "a", "scheduler": "lifo"}]}, "scheduler must be one of"),
    ({"models": [{"name": "a", "tp": 0}]}, "tp must be an integer >= 1"),
    ({"models": [{"name": "a", "pp": 0}]}, "pp must be an integer >= 1"),
    ({"models": [{"name": "a", "engine": {"tensor_parallel_size": 2}}]},
     "unknown key 'tensor_parallel_size'"),
    ({"models": [{"name": "a", "engine": {"pipeline_parallel_size": 2}}]},
     "unknown key 'pipeline_parallel_size'"),
    ({"models": [{"name": "/srv/models/llama"}]}, "a file path; name the model"),
    ({"models": [{"name": "~/llama"}]}, "a file path; name the model"),
    ({"models": [{"name": "a", "engine": {"max_num_seq": 8}}]},
     r"models\[0\]\.engine: unknown key 'max_num_seq'"),
    ({"models": [{"name": "a", "engine": {"max_num_seqs": "many"}}]},
     r"engine\.max_num_seqs: expected an int, got 'many'"),
    ({"models": [{"name": "a", "engine": {"block_size": 24}}]},
     r"models\[0\]\.engine: invalid block_size=24: must be a power of two"),
    ({"models": [{"name": "a", "engine": {"scheduler": "mlfq"}}]}, "unknown key 'scheduler'"),
    ({"models": [{"name": "a", "autoscaling": {"upscale_delay_s": -1}}]}, "upscale_delay_s"),
    ({"models": [{"name": "a", "autoscaling": {"min_replicas": 2}}]}, "unknown key"),
    ({"controller": {"replica_ttl_s": 0.1}, "models": [{"name": "a"}]},
     "replica_ttl_s .* must exceed"),
    ({"controller": {"unhealthy_after": 0}, "models": [{"name": "a"}]}, "unhealthy_after"),
])
def test_bad_fleet_configs_name_the_place_and_the_problem(change, message):
    data = {"models": [{"name": "a"}]} | change
    with pytest.raises(ValueError, match=message):
        fleet_config_from_dict(data, source="fleet.yaml")


def test_unreadable_or_invalid_yaml_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read fleet config"):
        load_fleet_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        load_fleet_config(bad)
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text(textwrap.dedent("- a\n- b\n"))
    with pytest.raises(ValueError, match="expected a mapping, got list"):
        load_fleet_config(not_mapping)


def test_engine_options_are_checked_like_the_worker_checks_them():
    assert engine_options({"dtype": "float32", "max-model-len": 512}, "e") == {
        "dtype": "float32", "max_model_len": 512}
    with pytest.raises(ValueError, match="e.host_kv_memory"):
        engine_options({"host_kv_memory": "4 gigs"}, "e")
    with pytest.raises(ValueError, match="unknown key 'port'"):
        engine_options({"port": 1}, "e")


def test_tp_and_pp_keys_become_the_replicas_parallel_engine_options():
    fleet = fleet_config_from_dict({"models": [{"name": "a", "tp": 3, "pp": 2},
                                               {"name": "b"}]})
    options = [m.engine_options() for m in fleet.models]
    assert (options[0]["tensor_parallel_size"], options[0]["pipeline_parallel_size"]) == (3, 2)
    assert "pipeline_parallel_size" not in options[1]


def test_placement_lays_out_one_bundle_per_rank_stage_major():
    placement = ReplicaPlacement(tp=2, pp=3, use_gpu=True)
    assert placement.world_size == 6
    assert placement.bundles() == [{"CPU": 1.0, "GPU": 1.0}] * 6
    assert placement.strategy == "PACK"  # stages may sit on different nodes
    assert [placement.rank_bundle(s, r) for s in range(3) for r in range(2)] == list(range(6))
    with pytest.raises(ValueError, match="outside pp=3 x tp=2"):
        placement.rank_bundle(3, 0)
    tp3 = ReplicaPlacement(tp=3, use_gpu=True, cpus_per_rank=2)
    assert tp3.strategy == "STRICT_PACK"  # tensor-parallel ranks share one node
    assert tp3.bundles() == [{"CPU": 2.0, "GPU": 1.0}] * 3
    assert tp3.rank0_resources() == {"CPU": 2.0, "GPU": 1.0}
    assert ReplicaPlacement(cpus_per_rank=0.5).bundles() == [{"CPU": 0.5}]
    with pytest.raises(ValueError, match="pp must be an integer >= 1"):
        ReplicaPlacement(pp=0)
    with pytest.raises(ValueError, match="cpus_per_rank"):
        ReplicaPlacement(cpus_per_rank=0)
