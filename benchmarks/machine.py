"""What the benchmarks report of the machine they ran on (its CPU changes from day to day)."""
from __future__ import annotations

import os
from pathlib import Path


def cpu_info() -> dict:
    name, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name is None:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model_name": name, "cores": os.cpu_count(), "avx2": "avx2" in flags, "avx512": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx": bool({"amx_tile", "amx_bf16"} & flags)}
