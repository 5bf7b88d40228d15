"""The benchmark's helpers; its side-by-side, skew, bf16 and report modes (smoke runs, nothing timed)."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from multirank import REPO

import expert_parallel as ep
from benchmarks import bench as bench_main
from benchmarks import bench_report
from benchmarks.bench_peers import SimpleMoE
from benchmarks.bench_tools import PhaseTape, forced_expert_ids


def test_forced_expert_ids_give_distinct_experts_in_the_asked_shape():
    generator = torch.Generator().manual_seed(0)
    assert forced_expert_ids("router", 5, 8, 2, generator) is None
    assert forced_expert_ids("one", 3, 8, 2, generator).tolist() == [[0, 1]] * 3
    for skew in ("uniform", "zipf"):
        ids = forced_expert_ids(skew, 4000, 8, 2, generator)
        assert ids.shape == (4000, 2) and ids.dtype == torch.long
        assert (ids[:, 0] != ids[:, 1]).all() and ids.min() >= 0 and ids.max() < 8
    counts = torch.bincount(forced_expert_ids("zipf", 4000, 8, 1, generator)[:, 0], minlength=8)
    # Zipf(1) over 8 experts: P(0) = 1 / H_8 = 0.37, P(7) = 0.046.
    assert counts[0] > 0.3 * 4000 and counts[7] < 0.07 * 4000
    assert forced_expert_ids("uniform", 0, 8, 2, generator).shape == (0, 2)


def test_phase_tape_backward_equals_one_autograd_backward():
    torch.manual_seed(0)
    w1, w2 = torch.randn(4, 6, requires_grad=True), torch.randn(6, 3, requires_grad=True)
    x = torch.randn(5, 4, requires_grad=True)
    ((x @ w1).relu() @ w2).square().sum().backward()
    want = [t.grad.clone() for t in (x, w1, w2)]
    for t in (x, w1, w2):
        t.grad = None
    tape = PhaseTape(("first", "second", "loss"))
    with tape.clock("first"):
        h = tape.cut("first", (x @ w1).relu())
    with tape.clock("second"):
        y = tape.cut("second", h @ w2)
    seconds = tape.backward(y.square().sum())
    for got, expected in zip((x.grad, w1.grad, w2.grad), want):
        torch.testing.assert_close(got, expected)
    assert set(seconds) == {f"{p} {w}" for p in ("first", "second", "loss") for w in ("fwd", "bwd")}


@torch.no_grad()
def test_the_benchmarks_simple_moe_is_the_seed_design_that_the_layer_reproduces():
    torch.manual_seed(0)
    simple = SimpleMoE(num_experts=4, d_model=8, d_hidden=16, top_k=2)
    layer = ep.MoELayer(ep.MoEConfig(d_model=8, d_hidden=16, num_experts=4, top_k=2))
    layer.router.weight.copy_(simple.gate.weight)
    layer.router.bias.copy_(simple.gate.bias)
    for g, (first, _, second) in enumerate(simple.experts):
        layer.experts.w1[g].copy_(first.weight.t())
        layer.experts.b1[g].copy_(first.bias)
        layer.experts.w2[g].copy_(second.weight.t())
        layer.experts.b2[g].copy_(second.bias)
    x = torch.randn(32, 8)
    torch.testing.assert_close(layer(x).out, simple(x), rtol=1e-5, atol=1e-6)


SMALL = ["--tokens", "256", "--d-model", "64", "--d-hidden", "128", "--steps", "1", "--warmup", "0"]


def bench(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    run = subprocess.run(
        [*cmd, "-m", "benchmarks.bench", *SMALL, *args], cwd=REPO, capture_output=True, text=True, timeout=180
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


@pytest.mark.dist
@pytest.mark.slow
def test_side_by_side_and_skew_smoke_run_then_the_report(tmp_path):
    out = tmp_path / "bench.json"
    text = bench("--compare", "--capacity", "none,1.25", "--skew", "router,one", "--json", str(out)).stdout
    assert text.count("ratio layer / floor") == 4  # 2 capacity settings x 2 skews
    if importlib.util.find_spec("fairscale") is not None:
        assert "layer / fairscale (dropless)" in text and "fairscale breakdown" in text
    else:
        assert "fairscale skipped: fairscale not importable" in text
    assert "layer / loop (dropless)" in text
    assert "loop skipped: SimpleMoE routes by itself" in text  # the forced all-to-one case
    assert "max_tokens_per_expert=" in text and "refused: " in text and "NOT refused" not in text
    assert "efficiency" in text and "step peak" in text
    plots = tmp_path / "plots"
    report = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_report", str(out), "--plots", str(plots)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert "| skew | setting |" in report.stdout and "| one | dropless |" in report.stdout
    if importlib.util.find_spec("matplotlib") is None:
        assert "no plots: matplotlib is not installed" in report.stdout


@pytest.mark.extras
def test_the_report_draws_both_plots_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra: pip install -e '.[plot]'")
    saved = [str(REPO / "benchmarks" / name) for name in ("skew.json", "tokens.json")]
    report = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_report", *saved, "--plots", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    for name in ("bench_tokens.png", "bench_skew.png"):
        assert f"wrote {tmp_path / name}" in report.stdout
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.dist
@pytest.mark.slow
def test_bf16_mode_reports_the_ratio_and_the_difference_against_fp32_and_the_overlap_table():
    args = (
        "--dtype",
        "bf16",
        "--capacity",
        "none",
        "--impls",
        "layer,floor,floor_a2a",
        "--no-memory",
        "--chunks",
        "1,2",
    )
    text = bench(*args).stdout
    assert "bf16 layer / bf16 floor (dropless)" in text and "same experts chosen: True" in text
    # Issue M's floor: the GEMMs between the two all-to-alls, in fp32 and in bf16.
    assert "layer / floor_a2a (dropless)" in text and "bf16 layer / bf16 floor_a2a (dropless)" in text
    assert "overlap (ExecutionConfig.exchange_chunks" in text
    assert "dropless chunks 1 " in text and "dropless chunks 2 " in text


def test_variant_options_parse_and_one_varying_list_at_a_time(capsys):
    both = "per_assignment,once_per_rank"
    args = bench_main.parse_args(["--dispatch", both, "--compile", "--malloc-default"])
    assert args.dispatch == ["per_assignment", "once_per_rank"] and args.compile == "inductor"
    assert args.malloc == ["default"] and bench_main.parse_args([]).malloc == ["tuned"]
    suffixes = [suffix for suffix, _ in bench_main.layer_variants(args)]
    assert suffixes == ["", " once_per_rank"]
    for bad, message in (
        (["--dispatch", both, "--chunks", "1,2"], "only one of them"),
        (["--dispatch", "once_per_rank", "--chunks", "2"], "--chunks > 1 needs"),
        (["--dispatch", "per_rank"], "'per_rank'"),
        (["--malloc", "tuned,tuned"], "twice"),
        (["--compile", "eager"], "invalid choice"),
    ):
        with pytest.raises(SystemExit):
            bench_main.parse_args(bad)
        assert message in capsys.readouterr().err


@pytest.mark.dist
@pytest.mark.slow
def test_dispatch_compile_and_malloc_variants_smoke_run(tmp_path):
    out = tmp_path / "variants.json"
    args = ["--capacity", "1.25", "--impls", "layer,floor", "--no-memory", "--json", str(out)]
    args += ["--dispatch", "per_assignment,once_per_rank", "--compile", "aot_eager"]
    args += ["--malloc", "default,tuned"]
    text = bench(*args).stdout
    assert "variants (ms: slowest rank" in text and "layer capacity 1.25 compiled: first step" in text
    table = json.loads(out.read_text())["cases"][0]["variants"]
    kinds = ("layer capacity 1.25", "layer capacity 1.25 once_per_rank", "layer capacity 1.25 compiled")
    kinds += ("floor capacity 1.25",)
    want = [f"{kind} malloc {mode}" for mode in ("default", "tuned") for kind in kinds]
    assert list(table) == want
    assert all(row["x floor"]["median"] > 0 for key, row in table.items() if key.startswith("layer"))
    assert table["layer capacity 1.25 malloc default"]["x record"]["per_round"] == [1.0]


def test_report_tables_from_a_sweep_and_weak_scaling():
    def case(tokens: int, ranks: int, ms: float) -> dict:
        timing = {
            "ms": {"fwd": ms / 2, "bwd": ms / 2, "total": ms, "cpu": ms * 0.9},
            "step_peak_mib": [1.0],
            "params_mib": 1.0,
        }
        return {
            "case": {"tokens": tokens, "experts": 8, "d_hidden": 64, "top_k": 2, "skew": "router"},
            "ranks": ranks,
            "impls": {"layer dropless": timing, "floor dropless": timing},
            "layers": {
                "dropless": {"rows_computed": [1.0] * ranks, "dropped_fraction": 0.0, "layer / floor": 1.0}
            },
        }

    one = {"cases": [case(1024, 1, 10.0), case(4096, 1, 40.0)]}
    two = {"cases": [case(1024, 2, 12.5), case(4096, 2, 44.0)]}
    assert "| T 1024, E 8, H 64, top-2 | dropless | 10 | 10 | 1.00 |" in "\n".join(
        bench_report.sweep_table(one["cases"])
    )
    weak = "\n".join(bench_report.weak_scaling([one, two]))
    assert "| T 1024, E 8, H 64, top-2 | 2 | 12 | 0.80 | 11 | 0.80 |" in weak
    assert "| T 4096, E 8, H 64, top-2 | 2 | 44 | 0.91 | 40 | 0.91 |" in weak


@pytest.mark.dist
@pytest.mark.slow
def test_the_trainer_under_forced_routing_and_the_trainer_without_it(tmp_path):
    def run(module: str, options: list[str], *overrides: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", module, *options, "--config", "configs/test.toml"]
        overrides = (f"train.out_dir={tmp_path}", "train.steps=2", "train.eval_every=2", *overrides)
        return subprocess.run([*cmd, *overrides], cwd=REPO, capture_output=True, text=True, timeout=120)

    forced = run("benchmarks.train_forced", ["--routing", "one"])
    assert forced.returncode == 0, forced.stdout[-3000:] + forced.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # All-to-one, top-2 of 4: every token's choices are experts 0 and 1, each keeps `capacity` rows.
    assert all(layer == [0.5, 0.5, 0.0, 0.0] for row in rows for layer in row["expert_share"])
    # 2 sequences of 31 next-byte tokens per micro-batch: capacity 62 * 2 / 4 = 31 of each expert's 62.
    assert all(row["dropped_fraction"] == 0.5 for row in rows)
    assert "val_loss" in rows[-1] and (tmp_path / "expert_load.png").exists()

    bad = run("benchmarks.train_forced", ["--routing", "skewed"])
    assert bad.returncode == 2 and "--routing" in bad.stderr and "'skewed'" in bad.stderr
    gone = run("launch.train", [], "train.forced_routing=zipf")  # the trainer has no such option now
    assert gone.returncode != 0 and "forced_routing" in gone.stderr


@pytest.mark.dist
@pytest.mark.slow
def test_generation_latency_smoke_run_reports_both_dispatches_for_both_models(tmp_path):
    out = tmp_path / "latency.json"
    cmd = [sys.executable, "-m", "benchmarks.generate_latency", "--ranks", "2", "--batches", "1"]
    cmd += ["--prompt", "4", "--tokens", "2", "--rounds", "1", "--json", str(out)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert {(r["model"], r["dispatch"]) for r in rows} == {
        (m, d) for m in ("tiny", "larger") for d in ("normal", "fixed")
    }
    for row in rows:
        assert row["prefill_ms"] > 0 and row["decode_ms"] > 0 and 0 < row["collective_share"] < 1
    assert "| tiny | 2 | 1 | fixed |" in run.stdout
