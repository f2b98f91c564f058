"""The outer loop: the DiLoCo wrapper, fragment schedules and overlap."""

from lowcomm.optim.diloco import MAX_SKIPPED_ROUNDS, OVERLAP_MODES, DiLoCo
from lowcomm.optim.fragments import check_partition, fragment_bytes, partition
from lowcomm.optim.schedule import DeadlineSchedule, FragmentSchedule, StaggeredSchedule
from lowcomm.optim.stats import DiLoCoStats, MemoryReport

__all__ = [
    "MAX_SKIPPED_ROUNDS",
    "OVERLAP_MODES",
    "DiLoCo",
    "DeadlineSchedule",
    "DiLoCoStats",
    "FragmentSchedule",
    "MemoryReport",
    "StaggeredSchedule",
    "check_partition",
    "fragment_bytes",
    "partition",
]
