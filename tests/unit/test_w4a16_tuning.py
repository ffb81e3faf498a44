"""The tuned W4A16 launch tables (worker/kernels/w4a16_tuning.py): a matmul of M rows takes
the entry of the smallest measured M >= M, the largest past the end, and nothing where
the shape or group size was not measured."""

import json

from lmfleet.worker.kernels.triton_w4a16 import W4A16Launch
from lmfleet.worker.kernels.w4a16_tuning import launch_from_table, table_for, table_path


def test_rows_take_the_next_measured_entry(tmp_path):
    gemv = {"path": "gemv", "block_n": 256, "block_k": 32, "num_warps": 4, "num_stages": 2,
            "splits": None, "programs_per_sm": 8}
    dot = {**gemv, "path": "dot", "block_n": 64, "block_k": 64}
    dequant = {**gemv, "path": "dequant", "block_n": 128}
    path = tmp_path / "GPU.json"
    path.write_text(json.dumps({"group_size": 128, "launches": {
        "6144x4096": {"1": gemv, "16": dot, "4096": dequant}}}))
    assert launch_from_table(path, 1, 6144, 4096, 128) == W4A16Launch(**gemv)
    assert launch_from_table(path, 2, 6144, 4096, 128).path == "dot"
    assert launch_from_table(path, 16, 6144, 4096, 128).path == "dot"
    assert launch_from_table(path, 17, 6144, 4096, 128).path == "dequant"
    assert launch_from_table(path, 9000, 6144, 4096, 128).path == "dequant"
    assert launch_from_table(path, 1, 4096, 4096, 128) is None  # shape not measured
    assert launch_from_table(path, 1, 6144, 4096, 64) is None  # another group size
    assert launch_from_table(tmp_path / "absent.json", 1, 6144, 4096, 128) is None


def test_table_names_are_file_safe():
    assert table_path("NVIDIA H100 80GB HBM3").name == "NVIDIA_H100_80GB_HBM3.json"


def test_a_gpu_without_a_table_takes_one_of_the_same_compute_capability(tmp_path):
    def write(name: str, capability):
        path = tmp_path / table_path(name).name
        path.write_text(json.dumps({"device": name, "capability": capability,
                                    "group_size": 128, "launches": {}}))
        return path

    h100 = write("NVIDIA H100 80GB HBM3", [9, 0])
    a100 = write("NVIDIA A100-SXM4-80GB", [8, 0])
    assert table_for("NVIDIA H100 80GB HBM3", (9, 0), tmp_path) == h100  # its own
    assert table_for("NVIDIA H200", (9, 0), tmp_path) == h100  # same architecture
    assert table_for("NVIDIA A100 80GB PCIe", (8, 0), tmp_path) == a100
    assert table_for("NVIDIA L4", (8, 9), tmp_path) is None  # defaults
    own = write("NVIDIA H200", [9, 0])
    assert table_for("NVIDIA H200", (9, 0), tmp_path) == own


def test_the_committed_tables_name_their_compute_capability():
    from lmfleet.worker.kernels.w4a16_tuning import CONFIG_DIR

    tables = sorted(CONFIG_DIR.glob("*.json"))
    assert tables
    for path in tables:
        capability = json.loads(path.read_text()).get("capability")
        assert isinstance(capability, list) and len(capability) == 2, path.name
