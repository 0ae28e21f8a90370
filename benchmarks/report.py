"""Turns a pytest-benchmark JSON file into the markdown tables of benchmarks/README.md.

Usage: python benchmarks/report.py .benchmarks/latest.json

Per group: median time per implementation, its ratio to the fused op (how many times slower it
is than the fused op; the per-sample variant where there are two) and the achieved bandwidth (the
`bytes` extra_info over the median time), beside a clone of the same tensor. The synthesis
groups (bench_synthesis.py) get their own table: ms per iteration, images·iterations per second,
the speed-up over the `reference` loop and the loop efficiency `floor / row`; so do the
evaluation groups (bench_eval.py): ms per step (epoch) or per pass (test), images per second.
"""

import json
import re
import sys
from collections import defaultdict


def implementation(bench: dict) -> str:
    params = bench.get("params") or {}
    name = params.get("impl") or params.get("method")
    return str(name or bench["name"].split("[")[0].removeprefix("test_"))


BASELINES = ("fused", "fused_per_sample")


def main(path: str) -> None:
    data = json.load(open(path))
    machine = data.get("machine_info", {})
    print(f"<!-- {machine.get('cpu', {}).get('brand_raw', '?')}, {data.get('datetime', '?')} -->")
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench["group"]].append(bench)
    # Bandwidth yardstick: the clone of the same tensor, keyed by "device (shape)".
    clones = {
        group.removeprefix("clone "): bench["stats"]["median"]
        for group, benches in groups.items()
        if group.startswith("clone ")
        for bench in benches
    }
    families = defaultdict(list)
    for group in groups:
        if group.startswith("synthesis "):
            synthesis_table(group, groups[group])
        elif group.startswith("eval "):
            eval_table(group, groups[group])
        elif not group.startswith("clone "):
            families[re.sub(r" (cpu|cuda) \(.*", "", group)].append(group)
    for family, names in families.items():
        print(f"\n### {family}\n")
        print("| device, shape | implementation | median ms | vs fused | GB/s | clone GB/s |")
        print("|---|---|---:|---:|---:|---:|")
        for group in names:
            benches = sorted(groups[group], key=lambda b: b["stats"]["median"])
            fused = next((b for b in benches if implementation(b) in BASELINES), benches[0])
            key = group.removeprefix(family + " ")
            clone = clones.get(key)
            for bench in benches:
                median = bench["stats"]["median"]
                nbytes = bench.get("extra_info", {}).get("bytes")
                gbps = f"{nbytes / median / 1e9:.1f}" if nbytes else ""
                clone_gbps = ""
                if clone and nbytes:
                    clone_bytes = next(b for b in groups["clone " + key])["extra_info"]["bytes"]
                    clone_gbps = f"{clone_bytes / clone / 1e9:.1f}"
                ratio = median / fused["stats"]["median"]
                print(
                    f"| {key} | {implementation(bench)} | {median * 1e3:.3f} | "
                    f"{ratio:.2f}x | {gbps} | {clone_gbps} |"
                )


def synthesis_table(group: str, benches: list[dict]) -> None:
    medians = {implementation(b): b["stats"]["median"] for b in benches}
    print(f"\n### {group}\n")
    print("| row | ms / iteration | images·it / s | vs reference | floor / row |")
    print("|---|---:|---:|---:|---:|")
    for bench in benches:
        name, median = implementation(bench), bench["stats"]["median"]
        info = bench["extra_info"]
        speedup = f"{medians['reference'] / median:.2f}x" if "reference" in medians else ""
        efficiency = f"{medians['floor'] / median:.2f}" if "floor" in medians else ""
        print(
            f"| {name} | {median * 1e3 / info['iterations']:.1f} | "
            f"{info['image_iterations'] / median:.0f} | {speedup} | {efficiency} |"
        )


def eval_table(group: str, benches: list[dict]) -> None:
    medians = {implementation(b): b["stats"]["median"] for b in benches}
    epoch = group.startswith("eval epoch ")
    print(f"\n### {group}\n")
    print(f"| row | ms / {'step' if epoch else 'pass'} | images / s | vs reference | floor / row |")
    print("|---|---:|---:|---:|---:|")
    for bench in benches:
        name, median = implementation(bench), bench["stats"]["median"]
        info = bench["extra_info"]
        per = median * 1e3 / (info["steps"] if epoch else 1)
        images = info["train_images"] if epoch else info["test_images"]
        speedup = f"{medians['reference'] / median:.2f}x" if "reference" in medians else ""
        efficiency = f"{medians['floor'] / median:.2f}" if "floor" in medians else ""
        print(f"| {name} | {per:.1f} | {images / median:.0f} | {speedup} | {efficiency} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".benchmarks/latest.json")
