"""cgroup.py without touching the real cgroup filesystem: detection, validation, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from turnstorm.relay.cgroup import CgroupError, CpuCgroup, Hierarchy, detect


def test_detects_v1_cpu_when_cgroup2_has_no_cpu(tmp_path: Path) -> None:
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("\n")
    mounts = [(str(unified), "cgroup2", ["rw"]),
              ("/sys/fs/cgroup/cpuacct", "cgroup", ["rw", "cpuacct"]),
              ("/sys/fs/cgroup/cpu", "cgroup", ["rw", "relatime", "cpu"])]
    assert detect(mounts) == Hierarchy(1, "/sys/fs/cgroup/cpu")


def test_prefers_cgroup2_with_cpu(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    mounts = [("/sys/fs/cgroup/cpu", "cgroup", ["rw", "cpu"]),
              (str(tmp_path), "cgroup2", ["rw"])]
    assert detect(mounts) == Hierarchy(2, str(tmp_path))


def test_no_cpu_controller_is_a_clear_error() -> None:
    with pytest.raises(CgroupError, match="cpu controller"):
        detect([("/sys/fs/cgroup/memory", "cgroup", ["rw", "memory"])])


def test_quota_follows_the_cpu_limit() -> None:
    assert CpuCgroup("a", 0.5).quota_us == 50_000
    assert CpuCgroup("a", 2).quota_us == 200_000
    assert CpuCgroup("a", 0.001).quota_us == 1000  # the kernel's minimum quota


@pytest.mark.parametrize("name", ["", "../escape", "a/b", "x" * 65])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(CgroupError, match="cgroup name"):
        CpuCgroup(name, 0.5)


def test_non_positive_limit_is_refused() -> None:
    with pytest.raises(CgroupError, match="positive"):
        CpuCgroup("a", 0)


def test_missing_hierarchy_names_the_path(tmp_path: Path) -> None:
    group = CpuCgroup("a", 0.5, hierarchy=Hierarchy(1, str(tmp_path / "absent")))
    with pytest.raises(CgroupError, match="absent"):
        group.create()


def test_add_before_create_is_an_error() -> None:
    with pytest.raises(CgroupError, match="not created"):
        CpuCgroup("a", 0.5).add(1)


def test_remove_without_create_is_a_no_op() -> None:
    CpuCgroup("a", 0.5).remove()
