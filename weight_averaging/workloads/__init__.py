"""Embedded workloads with AlgoPerf's `Workload` interface, small enough for a laptop CPU."""

from weight_averaging.workloads.teacher_student import TeacherStudentWorkload
from weight_averaging.workloads.teacher_student_bn import TeacherStudentBNWorkload

WORKLOADS = {"teacher_student": TeacherStudentWorkload,
             "teacher_student_bn": TeacherStudentBNWorkload}
DEFAULT = "teacher_student"


def get_workload(name: str = DEFAULT, api: str = "jit"):
  """An instance of the embedded workload `name` for `api` ('jit' or 'pmap')."""
  if name not in WORKLOADS:
    raise ValueError(f"unknown embedded workload {name!r}; available: {sorted(WORKLOADS)}")
  return WORKLOADS[name](api=api)
