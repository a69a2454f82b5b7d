import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import benchmark
import blocksparse
import blocksparse_fused
import blocksparse_int8
import utils

FUSED = ["fused"] if blocksparse_fused.available() else []
needs_int8 = pytest.mark.skipif(blocksparse_int8.unavailable_reason(32) is not None,
                                reason="the int8 kernels cannot run on this CPU")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv):
    return benchmark.main(benchmark.get_args_parser().parse_args(argv))


def test_smoke_benchmark_times_every_variant_and_they_match_offline(tmp_path):
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    rows = run(["--smoke", "--device", "cpu", "--kernels", "auto,bmm", "--output-json", str(out_json),
                "--csv", str(out_csv)])
    by_name = {row["variant"]: row for row in rows}
    assert list(by_name) == ["dense", "online", "offline", "torch", "bsr", "bsr-bmm"]
    for name in ["online", "torch", "bsr", "bsr-bmm"]:
        assert by_name[name]["matches_offline"], f"{name} differs from offline by {by_name[name]['max_diff']}"
        assert by_name[name]["ms"] > 0
    assert "converted" in by_name["bsr"]["note"]
    saved = json.loads(out_json.read_text())
    assert saved["machine"]["threads"] == torch.get_num_threads()
    assert saved["machine"]["processor"] == benchmark.cpu_model() and saved["machine"]["processor"]
    assert saved["machine"]["fused_kernel"].startswith("loaded in" if FUSED else "unavailable")
    assert [row["variant"] for row in saved["rows"]] == list(by_name)
    assert out_csv.read_text().splitlines()[0].startswith("variant,ms")


def test_baselines_pick_the_variants_timed_beside_bsr():
    rows = run(["--smoke", "--device", "cpu", "--baselines", "torch", "--iters", "1"])
    assert [row["variant"] for row in rows] == ["dense", "torch", "bsr"]
    assert all(row["matches_offline"] for row in rows[1:]), "offline still checks every variant, untimed"


def test_device_defaults_to_what_the_machine_has():
    parser = benchmark.get_args_parser()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert parser.parse_args([]).device == expected
    assert f"here {expected})" in " ".join(parser.format_help().split())


def test_output_check_catches_a_wrong_output():
    ref = torch.randn(4, 10)
    assert benchmark.compare(ref + 1e-6, ref, torch.float32)[2]
    assert not benchmark.compare(ref + 1.0, ref, torch.float32)[2]


def test_layer_mode_checks_every_kernel_against_dense():
    rows = run(["--layer", "64x128", "--tokens", "20", "--sparsity-linear", "0.5", "--sp-linear-tile-size", "32",
                "--device", "cpu", "--kernels", "all", "--iters", "1", "--warmup", "0"])
    names = [row["variant"].split(" ")[0] for row in rows]
    assert names == ["dense", "torch", "bsr-auto", *[f"bsr-{k}" for k in FUSED], "bsr-bmm", "bsr-dense"]
    assert all(row["matches_dense"] for row in rows)


def test_layer_mode_times_an_mlp_pair():
    rows = run(["--layer", "64x128x64", "--tokens", "9", "--sparsity-linear", "0.5", "--sp-linear-tile-size", "16",
                "--device", "cpu", "--kernels", "auto,bmm", "--iters", "1", "--warmup", "0"])
    by_name = {row["variant"].split(" ")[0]: row for row in rows}
    assert list(by_name) == ["dense", "torch", "bsr-auto", "bsr-bmm"]
    assert all(row["matches_dense"] for row in rows)


def test_layer_sweep_covers_the_grid_and_plots_per_token_count(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "layer.png"
    rows = run(["--layer", "64x128x64", "--device", "cpu", "--sweep-sparsity", "0.5,0.9", "--sweep-tile-size", "16,32",
                "--sweep-tokens", "3,20", "--iters", "1", "--warmup", "0", "--plot", str(path)])
    assert [(r["tile_size"], r["sparsity"], r["tokens"]) for r in rows] == [
        (t, s, n) for t in (16, 32) for s in (0.5, 0.9) for n in (3, 20)]
    assert all(r["matches_dense"] for r in rows)
    assert path.stat().st_size > 0


def test_sweep_writes_a_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sweep.png"
    rows = run(["--smoke", "--device", "cpu", "--sweep-sparsity", "0.5,0.75", "--sweep-tile-size", "16",
                "--sweep-batch-size", "1,3", "--plot", str(path)])
    assert [(r["tile_size"], r["sparsity"], r["batch"]) for r in rows] == [
        (16, 0.5, 1), (16, 0.5, 3), (16, 0.75, 1), (16, 0.75, 3)]
    assert all(r["matches_offline"] for r in rows)
    assert path.stat().st_size > 0


@pytest.mark.parametrize("argv,message", [
    (["--layer", "64by128"], "must be INxOUT"),
    (["--layer", "64x100", "--sp-linear-tile-size", "32"], "does not divide"),
    (["--layer", "64x128x100", "--sp-linear-tile-size", "32"], "does not divide every side"),
    (["--layer", "64x128x64x32"], "must be INxOUT"),
    (["--smoke", "--kernels", "fast"], "unknown fast"),
    (["--smoke", "--sweep-sparsity", "0.5,1.5"], "must be in [0, 1)"),
    (["--smoke", "--sweep-batch-size", "8,0"], "every batch size must be at least 1"),
    (["--smoke", "--baselines", "dense,fast"], "--baselines: unknown fast"),
    (["--smoke", "--sweep-tokens", "8"], "needs --layer"),
    (["--smoke", "--plot", "x.png"], "--plot needs a sweep"),
    (["--model", "vit_b_16", "--device", "cpu"], "nothing to make sparse"),
    (["--model", "no_such_net", "--sparsity-linear", "0.9"], "not a classification model"),
])
def test_rejects_bad_flags_with_a_clear_message(argv, message):
    args = benchmark.get_args_parser().parse_args(argv + ["--device", "cpu"])
    with pytest.raises(utils.InputError, match=message.replace("[", r"\[").replace(")", r"\)")):
        benchmark.main(args)


def benchmark_script(argv, **env):
    """Run `python benchmark.py ARGV` as a user does, its stderr a pipe (not a terminal), warnings shown."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run([sys.executable, "benchmark.py", *argv], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)


def error_lines(stderr):
    """The lines of an error exit: the error and the pointer to --help, nothing else of ours (no usage)."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("W")]  # torch's own CUDA notice


def test_bad_flag_exits_2_with_one_line():
    proc = benchmark_script(["--layer", "64by128", "--device", "cpu"])
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [
        "benchmark.py: error: --layer '64by128' must be INxOUT (one Linear, e.g. 768x3072) or INxHIDDENxOUT (an MLP "
        "pair, e.g. 768x3072x768)", "Try 'benchmark.py --help' for the flags."], proc.stderr
    assert "Traceback" not in proc.stderr


def test_malformed_flag_is_its_error_and_a_pointer_to_help_without_the_usage():
    proc = benchmark_script(["--iters", "x"])
    assert proc.returncode == 2
    assert "usage:" not in proc.stderr, proc.stderr
    assert error_lines(proc.stderr) == ["benchmark.py: error: argument --iters: invalid int value: 'x'",
                                        "Try 'benchmark.py --help' for the flags."], proc.stderr


@pytest.mark.parametrize("argv,message", [
    (["--model", "vit_tiny", "--image-size", "30", "--sparsity-linear", "0.9", "--sp-linear-tile-size", "16"],
     "--image-size 30 is not a multiple of vit_tiny's patch size 4; pass 28 or 32"),
    (["--smoke", "--blocksize", "24"], "block size 24 divides no Linear layer of vit_tiny"),
], ids=["image-size-off-the-patch-grid", "blocksize-dividing-no-layer"])
def test_settings_that_cannot_run_are_refused_with_one_line(argv, message):
    proc = benchmark_script([*argv, "--device", "cpu"])
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "ms" not in proc.stdout.split("\n")[-2:], proc.stdout
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr


def test_a_log_gets_one_line_warnings_and_no_progress_bars_and_other_ranks_stay_quiet():
    # Tile 32 on vit_tiny's 10-class head: "sparsity 0.9 is above the maximum ..." warns.
    argv = ["--smoke", "--device", "cpu", "--iters", "1", "--baselines", "dense", "--kernels", "bmm"]
    proc = benchmark_script(argv)
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "above the maximum" in line]
    assert warned and all(line.startswith("warning: sparsity 0.9") for line in warned), proc.stderr
    assert "UserWarning" not in proc.stderr and "warnings.warn" not in proc.stderr, proc.stderr
    assert "timing rounds" not in proc.stderr and "variants" not in proc.stderr, "a progress bar in a log"
    other_rank = benchmark_script(argv, RANK="1", WORLD_SIZE="2")
    assert other_rank.returncode == 0, other_rank.stderr
    assert "above the maximum" not in other_rank.stderr, other_rank.stderr


@pytest.mark.parametrize("rewarm", [False, True])
def test_time_forwards_interleaves_variants_alternates_their_order_and_rewarms_on_request(rewarm):
    calls = []

    def variant(name):
        return lambda x: calls.append(name) or x

    medians, first, outs = benchmark.time_forwards({"a": variant("a"), "b": variant("b")}, torch.zeros(1), warmup=2,
                                                   iters=3, device=torch.device("cpu"), rewarm=rewarm)
    assert set(medians) == set(first) == set(outs) == {"a", "b"}
    timed_rounds = calls[4:]  # first calls and one warm-up round come before
    forward, backward = (["a", "a", "b", "b"], ["b", "b", "a", "a"]) if rewarm else (["a", "b"], ["b", "a"])
    assert timed_rounds == forward + backward + forward  # no variant always goes first


class _Net(nn.Module):
    """Stands for a model class several variants share (VisionTransformer)."""

    def __init__(self, activation):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.activation = activation

    def forward(self, x):
        return self.activation(self.fc(x))


def test_compiled_variants_keep_their_compiled_code_apart():
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list as cache_entries

    torch.manual_seed(0)
    x = torch.randn(2, 4)
    torch._dynamo.reset()
    variants = {"relu": _Net(nn.ReLU()), "tanh": _Net(nn.Tanh())}
    compiled = {name: benchmark.compile_apart(model, name) for name, model in variants.items()}
    for name, fn in compiled.items():
        torch.testing.assert_close(fn(x), variants[name](x))
    # torch.compile(model) would have cached (and recompiled) both variants on _Net.forward's code.
    assert cache_entries(_Net.forward.__code__) == []
    codes = [fn._torchdynamo_orig_callable.__code__ for fn in compiled.values()]
    assert codes[0] is not codes[1] and all(len(cache_entries(code)) == 1 for code in codes)


##### --quantize int8 #####


@needs_int8
def test_smoke_benchmark_times_the_int8_model_beside_bsr_and_checks_it_by_relative_l2():
    rows = run(["--smoke", "--device", "cpu", "--quantize", "int8", "--baselines", "dense", "--iters", "1"])
    by_name = {row["variant"]: row for row in rows}
    assert list(by_name) == ["dense", "bsr", "bsr-int8"]
    int8 = by_name["bsr-int8"]
    assert int8["matches_offline"] and int8["ms"] > 0, int8
    assert 0 <= int8["rel_l2"] <= benchmark.INT8_TOLERANCE == int8["allowed_diff"] and "max_diff" not in int8
    assert "max_diff" in by_name["bsr"] and "rel_l2" not in by_name["bsr"]
    assert re.search(r"24 Linear converted .*; .*:\d+", int8["note"]), "every Linear but the head, kernels counted"


@needs_int8
@pytest.mark.parametrize("sparsity", ["0.5", "0"])  # 0: the dense int8 layer
def test_layer_mode_adds_int8_rows_for_the_kernels_auto_and_fused(sparsity):
    rows = run(["--layer", "64x128", "--tokens", "20", "--sparsity-linear", sparsity, "--sp-linear-tile-size", "32",
                "--device", "cpu", "--kernels", "auto", "--iters", "1", "--warmup", "0", "--quantize", "int8"])
    by_name = {row["variant"].split(" ")[0]: row for row in rows}
    assert list(by_name) == ["dense", "torch", "bsr-auto", "int8-auto", "int8-fused"]
    assert all(row["matches_dense"] for row in rows)
    assert 0 < by_name["int8-fused"]["rel_l2"] <= benchmark.INT8_TOLERANCE


def test_output_check_of_int8_variants_is_the_relative_l2_error():
    ref = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    assert benchmark.compare(ref * 1.05, ref, torch.float32, int8=True)[0] == pytest.approx(0.05, rel=1e-4)
    assert not benchmark.compare(ref * 1.2, ref, torch.float32, int8=True)[2]


@needs_int8
@pytest.mark.parametrize("kernel,expected", [("fused", r"(int8/(amx|vnni):[12] ){1,2}mlp-int8:1"),
                                             ("bmm", r"int8/bmm:2")])
def test_kernel_counts_name_int8_layers_and_fused_int8_mlps(kernel, expected):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()
    blocksparse.apply_bsr(model, 32, min_sparsity=0.0, kernel=kernel, quantize="int8",
                          quantize_filter_fn=lambda module, fqn: True)
    assert re.fullmatch(expected, benchmark._kernel_counts(model)), benchmark._kernel_counts(model)


@pytest.mark.parametrize("argv,message", [
    (["--layer", "64x128", "--sp-linear-tile-size", "8"], "--quantize int8 takes a block size that is a multiple "
                                                          "of 16 (--blocksize, or --sp-linear-tile-size), not 8"),
    (["--smoke", "--sweep-sparsity", "0.5"], "--quantize int8 times a model or a --layer, not a sweep"),
])
def test_int8_flag_mistakes_are_clear_errors(argv, message):
    args = benchmark.get_args_parser().parse_args(argv + ["--device", "cpu", "--quantize", "int8"])
    with pytest.raises(utils.InputError, match=re.escape(message)):
        benchmark.main(args)


def test_int8_on_a_cpu_without_the_int8_kernels_is_an_error_naming_the_instruction_set(monkeypatch):
    monkeypatch.setenv("SUPERBLOCK_HIDE_ISA", "amx,vnni")
    args = benchmark.get_args_parser().parse_args(["--smoke", "--device", "cpu", "--quantize", "int8"])
    with pytest.raises(utils.InputError, match=r"--quantize int8 needs the int8 CPU kernels, which cannot run here: "
                                               r"they need AMX \(amx_int8\) or AVX-512 VNNI \(avx512_vnni\);") as e:
        benchmark.main(args)
    assert str(e.value).endswith("; drop --quantize") and "\n" not in str(e.value)


def test_bsr_onednn_is_bsr_with_its_products_on_onednn_where_it_chose_our_amx_kernel():
    rows = run(["--smoke", "--device", "cpu", "--dtype", "bfloat16", "--baselines", "dense,bsr-onednn",
                "--kernels", "fused", "--iters", "1"])
    by_name = {row["variant"]: row for row in rows}
    assert list(by_name) == ["dense", "bsr-onednn", "bsr-fused"]
    assert by_name["bsr-onednn"]["matches_offline"] and by_name["bsr-fused"]["matches_offline"]
    assert "/amx" not in by_name["bsr-onednn"]["note"]
    amx = FUSED and "amx" in blocksparse_fused.product_kinds(torch.bfloat16, 32)
    if not amx:
        assert "/amx" not in by_name["bsr-fused"]["note"], "our AMX kernel only where it runs"


@pytest.mark.skipif(not FUSED, reason="the fused kernel's extension is unavailable here")
def test_kernel_counts_mark_float_layers_on_our_amx_kernel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 64)).eval().bfloat16()
    blocksparse.apply_bsr(model, 32, min_sparsity=0.0, kernel="fused")
    for module in model.modules():
        if hasattr(module, "products"):
            module.products = "amx"
    assert benchmark._kernel_counts(model) == "fused/amx:3 mlp/amx:1"
    benchmark._products_on_onednn(model)
    assert benchmark._kernel_counts(model) == "fused:3 mlp:1"
