"""Studies over AlgoPerf workloads: per-workload configuration, grids, scoring, figures."""
