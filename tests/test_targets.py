import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.join(ROOT, "benchmarks"))  # after the root: benchmarks/attention_core.py must not shadow the module
import targets  # noqa: E402

# Excerpts in the formats benchmark.py, peers.py and attention_core.py print.
MODEL = """torch 2.14.1+cu130, 2 threads, AMD EPYC (2 CPUs), device cpu, bfloat16, compile off
variant       ms      speedup_vs_dense  matches_offline  note
dense         {dense}  1.00              True
bsr           {bsr}   4.51              True             fused:48 mlp:12
bsr-int8      {int8}   5.02              True             int8/vnni:48
"""
LAYER = """MLP pair 768x3072x768, 1576 tokens, block 64, sparsity 0.9
variant                            ms    speedup_vs_dense  max_diff
torch                                                                skipped: does not take bfloat16 on cpu
dense                              9.43  1.00              0
bsr-auto (fused/fused mlp)         {bsr}  5.13              0.0009766
int8-auto (int8/amx:2 mlp-int8:1)  1.10  5.34
int8-fused                         {int8}  5.64
"""
CORE = """AMD EPYC, torch 2.14.1+cu130, 2 threads
           shape     dtype         sdpa flash          sdpa math              plain              fused         fused-fp32   fused-avx512bf16          fused-amx
     8x12x197x64  bfloat16   10.00 ms  1.00x   22.64 ms  0.44x    3.00 ms  3.33x    5.00 ms  2.00x    4.00 ms  2.50x    8.00 ms  1.25x                  -
     8x12x197x64   float32   10.50 ms  1.00x   21.14 ms  0.50x    8.60 ms  1.22x    7.50 ms  1.40x                  -                  -                  -
     1x12x197x64  bfloat16    1.00 ms  1.00x    2.00 ms  0.50x    1.00 ms  1.00x    0.10 ms 10.00x    0.10 ms 10.00x    0.10 ms 10.00x                  -
"""
PEERS = """AMD EPYC (avx512), torch 2.14.1, 2 threads, onnx 1.23.2
building superblock-int8
variant              median ms  min-max ms  vs SuperBlock best
openvino-int8        {openvino}     381-435     1.00x
superblock-int8      {int8}     240-250     1.00x
"""


def write(folder, name, text):
    with open(os.path.join(folder, name), "w") as f:
        f.write(text)


def rows_by_target(folder):
    """{target: (each run's ratio rounded, met)}."""
    return {t.what: ([None if r is None else round(r, 2) for r in runs], met)
            for t, runs, met in targets.measured(str(folder))}


def test_each_run_is_read_and_a_target_is_met_only_when_every_run_meets_it(tmp_path):
    write(tmp_path, "machine.txt", "Model name:   AMD EPYC 9R14\n")
    for run, bsr in ((1, 50.0), (2, 40.0), (3, 45.0)):  # dense 200 ms: 4.0x, 5.0x, 4.44x
        write(tmp_path, f"vit_attention_bfloat16_{run}.txt", MODEL.format(dense=200.0, bsr=bsr, int8=bsr))
    for run in (1, 2, 3):  # 6.6x in every run
        write(tmp_path, f"vit_attention_float32_{run}.txt", MODEL.format(dense=660.0, bsr=100.0, int8=100.0))
    rows = rows_by_target(tmp_path)
    assert targets.report(str(tmp_path))[0].endswith("AMD EPYC 9R14")
    assert rows["bfloat16, MLP + attention pruned: bsr / dense bfloat16"] == ([4.0, 5.0, 4.44], False)
    assert rows["float32, MLP + attention pruned: bsr / dense float32"] == ([6.6, 6.6, 6.6], True)
    assert "  4.00x 5.00x 4.44x  " in targets.report(str(tmp_path))[2]


def test_int8_layer_core_and_peer_ratios_come_from_their_own_rows(tmp_path):
    write(tmp_path, "pair_b64_1.txt", LAYER.format(bsr=2.0, int8=1.0))
    write(tmp_path, "vit_mlp_int8_1.txt", MODEL.format(dense=300.0, bsr=150.0, int8=100.0))
    write(tmp_path, "attention_core.txt", CORE)
    write(tmp_path, "peers_mlp.txt", PEERS.format(openvino=400.0, int8=250.0))
    rows = rows_by_target(tmp_path)
    assert rows["MLP pair, block 64: int8 fused / bfloat16 fused"] == ([2.0], True)
    assert rows["MLP pruned: int8 / bsr bfloat16"] == ([1.5], True)
    assert rows["MLP pruned: int8 / dense bfloat16"] == ([3.0], True)
    assert rows["MLP pruned: SuperBlock int8 / OpenVINO int8"] == ([1.6], True)
    # The fastest fused core at vit_b_16's batch-8 shape (fused-fp32 in bfloat16), not plain and not batch 1.
    assert rows["attention core 8x12x197x64 bfloat16: fastest fused / SDPA flash"] == ([2.5], True)
    assert rows["attention core 8x12x197x64 float32: fastest fused / SDPA flash"] == ([1.4], False)


def test_missing_files_and_rows_show_as_unmeasured_and_unmet(tmp_path):
    write(tmp_path, "dense_qkv_1.txt", "RuntimeError: something broke\n")
    rows = rows_by_target(tmp_path)
    assert rows["dense qkv 768->2304: int8 / dense bfloat16"] == ([None], False)
    assert rows["MLP pruned: SuperBlock int8 / OpenVINO int8"] == ([], False)
    assert targets.report(str(tmp_path))[-1].split()[-2:] == ["-", "no"]
    assert "unknown CPU" in targets.report(str(tmp_path))[0]
