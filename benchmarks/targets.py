"""Issues 21 and 24's speed targets, checked against what ``benchmarks/cpu_targets.sh`` measured.

    python benchmarks/targets.py [/tmp/cpu_targets]

Prints the CPU the figures came from and, per target, the ratio each run measured (the issues ask for three runs of
each) and whether every run met it. The targets are the issues' own, set on a 2-core AMD EPYC: on another CPU the
table says how far that CPU is from them, not whether an issue is done. A file that is missing or holds no figure
shows as "-" (a benchmark that failed: read its file). Exit status 0 whatever the figures say.
"""
import argparse
import glob
import os
import re
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

# A result row of benchmark.py or peers.py: the variant, an optional "(note)", then its time in ms.
ROW = re.compile(r"^(\S+)(?: \([^)]*\))?\s+(\d+(?:\.\d+)?)(?:\s|$)")
CORE_CELL = re.compile(r"(\d+(?:\.\d+)?) ms\s+\d+(?:\.\d+)?x|-")
CORE_SHAPE = "8x12x197x64"  # vit_b_16 at batch 8, the shape of issue 24's core targets
FUSED_CORES = ("fused", "fused-fp32", "fused-avx512bf16", "fused-amx")


def variant_ms(path: str) -> Dict[str, float]:
    """{variant: median ms} of one benchmark.py or peers.py output file ({} when it is missing)."""
    if not os.path.exists(path):
        return {}
    found = {}
    with open(path) as f:
        for line in f:
            match = ROW.match(line)
            if match:
                found.setdefault(match.group(1), float(match.group(2)))
    return found


def core_ms(path: str) -> Dict[str, Dict[str, float]]:
    """{dtype: {column: ms}} of benchmarks/attention_core.py's output at CORE_SHAPE ({} when it is missing)."""
    if not os.path.exists(path):
        return {}
    columns, found = [], {}
    with open(path) as f:
        for line in f:
            words = line.split()
            if words[:2] == ["shape", "dtype"]:
                columns = re.findall(r"sdpa \w+|\S+", line.split("dtype", 1)[1])
            elif words and words[0] == CORE_SHAPE and columns:
                cells = CORE_CELL.findall(line.split(None, 2)[2])
                found[words[1]] = {c: float(ms) for c, ms in zip(columns, cells) if ms}
    return found


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    return numerator / denominator if numerator and denominator else None


class Target(NamedTuple):
    issue: int
    what: str
    at_least: float
    runs: Callable[[str], List[Optional[float]]]  # the measured ratio of each run, from the output folder


def per_run(pattern: str, numerator: str, denominator: str) -> Callable[[str], List[Optional[float]]]:
    """numerator's ms over denominator's in each file matching pattern (a speed-up of denominator's variant)."""
    def runs(folder):
        files = sorted(glob.glob(os.path.join(folder, pattern)))
        return [ratio(ms.get(numerator), ms.get(denominator)) for ms in map(variant_ms, files)]
    return runs


def core_speedup(dtype: str) -> Callable[[str], List[Optional[float]]]:
    """SDPA flash's ms over the fastest fused core's at CORE_SHAPE (the core apply_bsr would keep)."""
    def runs(folder):
        ms = core_ms(os.path.join(folder, "attention_core.txt")).get(dtype, {})
        fused = [ms[c] for c in FUSED_CORES if c in ms]
        return [ratio(ms.get("sdpa flash"), min(fused) if fused else None)]
    return runs


TARGETS = [
    Target(24, "bfloat16, MLP + attention pruned: bsr / dense bfloat16", 4.3,
           per_run("vit_attention_bfloat16_*.txt", "dense", "bsr")),
    Target(24, "float32, MLP + attention pruned: bsr / dense float32", 6.5,
           per_run("vit_attention_float32_*.txt", "dense", "bsr")),
    Target(24, f"attention core {CORE_SHAPE} bfloat16: fastest fused / SDPA flash", 2.5, core_speedup("bfloat16")),
    Target(24, f"attention core {CORE_SHAPE} float32: fastest fused / SDPA flash", 1.5, core_speedup("float32")),
    Target(24, "bfloat16, MLP pruned: bsr / bsr with torch's attention (never slower)", 1.0,
           per_run("vit_mlp_bfloat16_*.txt", "bsr-sdpa", "bsr")),
    Target(24, "float32, MLP pruned: bsr / bsr with torch's attention (never slower)", 1.0,
           per_run("vit_mlp_float32_*.txt", "bsr-sdpa", "bsr")),
    Target(21, "MLP pruned: int8 / bsr bfloat16", 1.4, per_run("vit_mlp_int8_*.txt", "bsr", "bsr-int8")),
    Target(21, "MLP pruned: int8 / dense bfloat16", 3.0, per_run("vit_mlp_int8_*.txt", "dense", "bsr-int8")),
    Target(21, "MLP pruned: SuperBlock int8 / OpenVINO int8", 1.6,
           per_run("peers_mlp*.txt", "openvino-int8", "superblock-int8")),
    Target(21, "MLP + attention pruned: int8 / bsr bfloat16", 1.25,
           per_run("vit_attention_int8_*.txt", "bsr", "bsr-int8")),
    Target(21, "MLP + attention pruned: int8 / dense bfloat16", 5.0,
           per_run("vit_attention_int8_*.txt", "dense", "bsr-int8")),
    Target(21, "MLP + attention pruned: SuperBlock int8 / OpenVINO int8", 3.0,
           per_run("peers_attention*.txt", "openvino-int8", "superblock-int8")),
    Target(21, "MLP pair, block 64: int8 fused / bfloat16 fused", 1.8, per_run("pair_b64_*.txt", "bsr-auto", "int8-fused")),
    Target(21, "MLP pair, block 32: int8 fused / bfloat16 fused", 1.6, per_run("pair_b32_*.txt", "bsr-auto", "int8-fused")),
    Target(21, "dense qkv 768->2304: int8 / dense bfloat16", 1.8, per_run("dense_qkv_*.txt", "dense", "int8-fused")),
]


def machine(folder: str) -> str:
    """The CPU's model name as cpu_targets.sh recorded it."""
    path = os.path.join(folder, "machine.txt")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.startswith("Model name:"):
                    return line.split(":", 1)[1].strip()
    return "unknown CPU (no machine.txt)"


def measured(folder: str) -> List[Tuple[Target, List[Optional[float]], bool]]:
    """(target, each run's ratio, whether every run met it) for every target."""
    found = []
    for target in TARGETS:
        runs = target.runs(folder)
        found.append((target, runs, bool(runs) and all(r is not None and r >= target.at_least for r in runs)))
    return found


def report(folder: str) -> List[str]:
    """The table's lines."""
    lines = [f"targets of issues 21 and 24 (set on the AMD EPYC), measured on: {machine(folder)}",
             f"{'issue':5s}  {'target':72s}  {'at least':>8s}  {'runs':20s}  met"]
    for target, runs, met in measured(folder):
        cells = " ".join("-" if r is None else f"{r:.2f}x" for r in runs) or "-"
        lines.append(f"{target.issue:5d}  {target.what:72s}  {target.at_least:7.2f}x  {cells:20s}  "
                     f"{'yes' if met else 'no'}")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="/tmp/cpu_targets", help="cpu_targets.sh's output folder")
    args = parser.parse_args()
    if not os.path.isdir(args.folder):
        raise SystemExit(f"{args.folder} is not a folder: run benchmarks/cpu_targets.sh first (it writes there)")
    print("\n".join(report(args.folder)))


if __name__ == "__main__":
    main()
