"""Markdown tables and PNG plots from benchmarks.bench's JSON files (rank 0's --json output).

    python -m benchmarks.bench_report runs/bench/*.json [--plots docs]

Prints, for the cases found: the side-by-side table, the token and expert
sweeps, the skew table, the layer variants (dispatch modes, chunk counts,
compiled, allocator modes: each against its floor round by round) and weak scaling (files of the same shape at
different rank counts: efficiency = t(1 rank) / t(P ranks) at fixed tokens
per rank). With --plots and matplotlib installed (the `plot` extra), also
writes bench_tokens.png (time per step vs tokens, per implementation) and
bench_skew.png (rows computed per rank, per skew).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def load(paths: list[Path]) -> list[dict]:
    reports = []
    for path in paths:
        report = json.loads(path.read_text())
        report["path"] = str(path)
        reports.append(report)
    return reports


def shape_of(case: dict) -> str:
    c = case["case"]
    return f"T {c['tokens']}, E {c['experts']}, H {c['d_hidden']}, top-{c['top_k']}"


def peak(result: dict) -> str:
    if not result.get("step_peak_mib"):
        return ""
    total = max(result["step_peak_mib"]) + (result.get("params_mib") or 0)
    return f"{total:.0f}"


def compare_table(case: dict) -> list[str]:
    impls, layers = case["impls"], case["layers"]
    base = impls.get("layer dropless", {}).get("ms", {}).get("total")
    lines = [
        f"{shape_of(case)}, {case['ranks']} ranks, skew {case['case']['skew']}:",
        "",
        "| implementation | fwd ms | bwd ms | total ms | cpu ms | x layer dropless | x its floor "
        "| x its floor (cpu) | x floor_a2a | dropped | peak MiB/rank (params + step) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in impls.items():
        if name.startswith(("breakdown", "floor")):
            continue
        ms = result["ms"]
        setting = name.removeprefix("layer ")
        outcome = layers.get(setting, {}) if name.startswith("layer") else {}
        floor = f"{outcome['layer / floor']:.2f}" if "layer / floor" in outcome else ""
        floor_cpu = f"{outcome['layer / floor (cpu)']:.2f}" if "layer / floor (cpu)" in outcome else ""
        # NOTE: the median of the per-round ratios, as bench prints it.
        exchanging = f"{outcome['layer / floor_a2a']:.2f}" if "layer / floor_a2a" in outcome else ""
        dropped = f"{outcome['dropped_fraction']:.1%}" if outcome else ""
        relative = f"{ms['total'] / base:.2f}" if base else ""
        lines.append(
            f"| {name} | {ms['fwd']:.0f} | {ms['bwd']:.0f} | {ms['total']:.0f} | {ms.get('cpu', 0):.0f} "
            f"| {relative} | {floor} | {floor_cpu} | {exchanging} | {dropped} | {peak(result)} |"
        )
    for name, result in impls.items():
        if name.startswith("floor"):
            ms = result["ms"]
            relative = f"{ms['total'] / base:.2f}" if base else ""
            lines.append(
                f"| {name} | {ms['fwd']:.0f} | {ms['bwd']:.0f} | {ms['total']:.0f} | {ms.get('cpu', 0):.0f} "
                f"| {relative} | 1 | 1 | | | {peak(result)} |"
            )
    return lines


PHASES = ("routing", "permutation", "all-to-all", "experts", "combine")


def breakdown_table(case: dict) -> list[str]:
    impls = case["impls"]
    names = [name for name in impls if name.startswith("breakdown")]
    if not names:
        return []
    lines = [
        "| phase | " + " | ".join(name.removeprefix("breakdown ") + " fwd / bwd ms" for name in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for phase in PHASES:
        cells = []
        for name in names:
            ms = impls[name]["ms"]
            cells.append(f"{ms[f'{phase} fwd']:.1f} / {ms[f'{phase} bwd']:.1f}")
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    return lines


def exchange_lines(case: dict) -> list[str]:
    lines = []
    for name, outcome in case["layers"].items():
        ex = outcome.get("exchange")
        if ex:
            mib = sum(ex["bytes_per_rank_per_step"]) / len(ex["bytes_per_rank_per_step"]) / 2**20
            lines.append(
                f"| {shape_of(case)} | {case['case']['skew']} | {name} | {mib:.1f} "
                f"| {ex['layer_seconds'] * 1e3:.0f} "
                f"| {ex['layer_gb_per_s']:.2f} | {ex['plain_gb_per_s']:.2f} | {ex['efficiency']:.2f} "
                f"| {ex.get('plain_same_splits_gb_per_s', float('nan')):.2f} "
                f"| {ex.get('efficiency_same_splits', float('nan')):.2f} |"
            )
    return lines


def variants_table(case: dict) -> list[str]:
    """One row per layer variant and floor (and allocator mode) of bench's "variants": ratios as
    the median of the per-round ratios [min-max]."""
    rows = case.get("variants") or {}
    if not any(row["variant"] not in ("record", "floor") or row["malloc"] for row in rows.values()):
        return []

    def ratio(r: dict | None) -> str:
        return f"{r['median']:.2f} [{r['min']:.2f}–{r['max']:.2f}]" if r else ""

    lines = [
        f"{shape_of(case)}, {case['ranks']} rank(s), skew {case['case']['skew']}:",
        "",
        "| setting | variant | malloc | ms | exchange ms | sys ms | minor faults | × its floor | CPU × floor "
        "| × layer of record | CPU × layer of record |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows.values():
        exchange = f"{row['exchange_ms']:.0f}" if row["exchange_ms"] is not None else ""
        sys_ms = f"{row['sys_ms']:.0f}" if "sys_ms" in row else ""
        lines.append(
            f"| {row['setting']} | {row['variant']} | {row['malloc'] or ''} | {row['ms']:.0f} | {exchange} "
            f"| {sys_ms} | {row['minor_faults']:.0f} | {ratio(row['x floor'])} "
            f"| {ratio(row['x floor (cpu)'])} | {ratio(row['x record'])} "
            f"| {ratio(row.get('x record (cpu)'))} |"
        )
    for key, seconds in case.get("compile_seconds", {}).items():
        lines.append(f"\n{key}: first step {seconds:.0f} s (compilation, untimed)")
    return lines


def sweep_table(cases: list[dict]) -> list[str]:
    """One row per case and layer setting: layer, floor, peers, the phase shares."""
    lines = [
        "| shape | setting | layer ms | floor ms | layer / floor | layer / floor (cpu) | loop ms "
        "| fairscale ms | routing % | permutation % | all-to-all % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        impls = case["impls"]
        for name, outcome in case["layers"].items():
            layer = impls.get(f"layer {name}")
            if not layer:
                continue
            floor = impls.get(f"floor {name}")
            total = layer["ms"]["total"]
            shares = []
            breakdown = impls.get(f"breakdown {name}")
            for phase in ("routing", "permutation", "all-to-all"):
                if breakdown:
                    ms = breakdown["ms"]
                    shares.append(f"{100 * (ms[f'{phase} fwd'] + ms[f'{phase} bwd']) / total:.1f}")
                else:
                    shares.append("")
            loop, fair = impls.get("loop"), impls.get("fairscale")
            lines.append(
                f"| {shape_of(case)} | {name} | {total:.0f} | {floor['ms']['total'] if floor else 0:.0f} "
                f"| {outcome.get('layer / floor', float('nan')):.2f} "
                f"| {outcome.get('layer / floor (cpu)', float('nan')):.2f} "
                f"| {loop['ms']['total'] if loop else float('nan'):.0f} "
                f"| {fair['ms']['total'] if fair else float('nan'):.0f} | " + " | ".join(shares) + " |"
            )
    return lines


def skew_table(cases: list[dict]) -> list[str]:
    lines = [
        "| skew | setting | layer ms | slowest / mean rank work | dropped | rows computed per rank "
        "| step peak MiB per rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        impls = case["impls"]
        for name, outcome in case["layers"].items():
            layer = impls.get(f"layer {name}")
            if not layer:
                continue
            rows = " / ".join(f"{v:.0f}" for v in outcome["rows_computed"])
            peaks = " / ".join(f"{v:.0f}" for v in layer["step_peak_mib"] or [])
            ratio = outcome.get("slowest / mean rank")
            lines.append(
                f"| {case['case']['skew']} | {name} | {layer['ms']['total']:.0f} "
                f"| {'' if ratio is None else f'{ratio:.2f}'} | {outcome['dropped_fraction']:.1%} "
                f"| {rows} | {peaks} |"
            )
        if case.get("refusal"):
            refusal = case["refusal"]
            lines.append(
                f"| {case['case']['skew']} "
                f"| dropless, max_tokens_per_expert={refusal['max_tokens_per_expert']} "
                f"| {'refused: ValueError' if refusal['error'] else 'NOT refused'} | | | | |"
            )
    return lines


def weak_scaling(reports: list[dict]) -> list[str]:
    """Layer dropless time per shape and rank count; efficiency t1 / tP, wall-clock and CPU time."""
    times: dict[str, dict[int, tuple[float, float]]] = {}
    for report in reports:
        for case in report["cases"]:
            layer = case["impls"].get("layer dropless")
            if layer and case["case"]["skew"] == "router":
                ms = layer["ms"]
                times.setdefault(shape_of(case), {})[case["ranks"]] = (ms["total"], ms.get("cpu", math.nan))
    lines = [
        "| shape | ranks | layer dropless ms | efficiency t1 / tP | cpu ms (busiest rank) | cpu t1 / tP |",
        "|---|---|---|---|---|---|",
    ]
    for shape, by_ranks in times.items():
        if len(by_ranks) < 2 or 1 not in by_ranks:
            continue
        wall1, cpu1 = by_ranks[1]
        for ranks in sorted(by_ranks):
            wall, cpu = by_ranks[ranks]
            lines.append(
                f"| {shape} | {ranks} | {wall:.0f} | {wall1 / wall:.2f} | {cpu:.0f} | {cpu1 / cpu:.2f} |"
            )
    return lines if len(lines) > 2 else []


def plot_tokens(cases: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for case in cases:
        if case["case"]["skew"] != "router":
            continue
        for name, result in case["impls"].items():
            if not name.startswith("breakdown"):
                series.setdefault(name, []).append((case["case"]["tokens"], result["ms"]["total"]))
    series = {name: sorted(points) for name, points in series.items() if len(points) > 1}
    if not series:
        return False
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for name, points in series.items():
        axes.plot(*zip(*points), marker="o", label=name)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("tokens per rank")
    axes.set_ylabel("forward + backward, ms (slowest rank)")
    axes.set_title("time per step vs tokens")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def plot_skew(cases: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []  # (label, rows per rank), for the cases of one shape and rank count with several skews
    by_shape: dict[tuple, list[dict]] = {}
    for case in cases:
        by_shape.setdefault((shape_of(case), case["ranks"]), []).append(case)
    cases = max(by_shape.values(), key=lambda group: len({c["case"]["skew"] for c in group}), default=[])
    for case in cases:
        for name, outcome in case["layers"].items():
            bars.append((f"{case['case']['skew']}\n{name}", outcome["rows_computed"]))
    if len({case["case"]["skew"] for case in cases}) < 2:
        return False
    ranks = len(bars[0][1])
    figure, axes = plt.subplots(figsize=(max(6.4, 0.9 * len(bars)), 4.2))
    width = 0.8 / ranks
    for r in range(ranks):
        axes.bar(
            [i + r * width for i in range(len(bars))], [rows[r] for _, rows in bars], width, label=f"rank {r}"
        )
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(bars))], [label for label, _ in bars], fontsize=8)
    axes.set_ylabel("rows computed per step")
    axes.set_title("rank load vs skew")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--plots", type=Path, help="write PNG plots into this folder")
    args = parser.parse_args(argv)
    reports = load(args.files)
    for report in reports:
        m = report["machine"]
        print(f"\n### {report['path']}\n")
        print(
            f"{m['cpu']} ({m['cpu_capability']}, {m.get('cores', '?')} logical cores), torch {m['torch']}, "
            f"{m['world_size']} ranks x {m['threads_per_rank']} thread(s); load average "
            f"{' '.join(f'{v:.2f}' for v in m.get('load_average', []))} at the start, "
            f"{' '.join(f'{v:.2f}' for v in m.get('load_average_end', []))} at the end"
        )
        print(
            f"command: `torchrun --standalone --nproc-per-node {m['world_size']} -m benchmarks.bench "
            f"{' '.join(report.get('argv', []))}`\n"
        )
        cases = report["cases"]
        skews = {case["case"]["skew"] for case in cases}
        if len(cases) == 1 and len(cases[0]["impls"]) > 3:
            print("\n".join(compare_table(cases[0])), "\n")
            print("\n".join(breakdown_table(cases[0])), "\n")
        elif len(skews) > 1:
            print("\n".join(skew_table(cases)), "\n")
        else:
            print("\n".join(sweep_table(cases)), "\n")
        for case in cases:
            variants = variants_table(case)
            if variants:
                print("\n".join(variants), "\n")
        exchange = [line for case in cases for line in exchange_lines(case)]
        if exchange:
            print(
                "| shape | skew | setting | MiB sent per rank per step | layer ms in exchanges | layer GB/s "
                "| plain even GB/s | efficiency | plain same splits GB/s | efficiency |"
            )
            print("|---|---|---|---|---|---|---|---|---|---|")
            print("\n".join(exchange), "\n")
    weak = weak_scaling(reports)
    if weak:
        print("\n### weak scaling\n")
        print("\n".join(weak))
    if args.plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("no plots: matplotlib is not installed (pip install -e '.[plot]')")
            return 0
        args.plots.mkdir(parents=True, exist_ok=True)
        all_cases = [case for report in reports for case in report["cases"]]
        for name, plot in (("bench_tokens.png", plot_tokens), ("bench_skew.png", plot_skew)):
            if plot(all_cases, args.plots / name):
                print(f"wrote {args.plots / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
