"""The outer loop: the DiLoCo wrapper, fragment schedules and overlap."""

from lowcomm.optim.diloco import OVERLAP_MODES, DiLoCo, DiLoCoStats
from lowcomm.optim.fragments import check_partition, fragment_bytes, partition
from lowcomm.optim.schedule import FragmentSchedule, StaggeredSchedule

__all__ = [
    "OVERLAP_MODES",
    "DiLoCo",
    "DiLoCoStats",
    "FragmentSchedule",
    "StaggeredSchedule",
    "check_partition",
    "fragment_bytes",
    "partition",
]
