"""What the benchmarks report of the machine they ran on (its CPU changes from day to day): the manifests' own."""
from sparserm.manifest import cpu_info, machine_info

__all__ = ["cpu_info", "machine_info"]
