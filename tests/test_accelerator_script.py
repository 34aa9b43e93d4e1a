"""benchmarks/accelerator.py's dry run: the device sequence on CPU at toy sizes, with
stand-in PyTorch peers, so that the script a GPU session runs in one call cannot rot.
Slow-ish by nature (every part compiles its programs, ~100 s of CPU cold): the JAX
compilation cache under the user's cache folder brings a second run to ~25 s."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from conftest import xla_flags_without_devices

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accelerator.py"
PEER = {"plain_torch": {"train_steps_per_s": {"median": 10.0}, "prune_step": {"median_ms": 2.0},
                        "eval_samples_per_s": {"median": 100.0}, "calls_per_s": {"median": 5.0},
                        "merge_time": {"median_ms": 1.0}, "eval_samples_per_s_merged": {"median": 100.0},
                        "eval_samples_per_s_unmerged": {"median": 50.0}},
        "config": {}, "env": {}}
W3_FLOP = 64_000_000  # per train step at batch 64, in the stand-in flops.jsonl


def _cache_env() -> dict:
    """The test session's JAX compilation cache (conftest's, through the environment), else
    the user's cache folder's, for every program (loading beats compiling)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    cache = jax.config.jax_compilation_cache_dir or str(Path(base) / "jaxcl" / "jax-tests")
    return {"JAX_COMPILATION_CACHE_DIR": cache,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    peers = tmp_path_factory.mktemp("peers")
    for name in ("w1_packnet_mlp", "w2_packnet_resnet", "w3_clr_resnet", "w4_nccl", "w5_rescl", "w6_l2p_vit"):
        # the W6 peer prints its rates at the top level (../shared/peers/w6_l2p_vit.py)
        peer = {**PEER, **PEER["plain_torch"]} if name == "w6_l2p_vit" else PEER
        (peers / f"{name}.py").write_text(f"import json\nprint('peer log line')\nprint(json.dumps({peer!r}))\n")
    (peers / "common.py").write_text("")
    (peers / "flops.jsonl").write_text(json.dumps({"workload": "w3_clr_resnet", "flop_per_unit": {
        "train_step": W3_FLOP}}) + "\n")
    out = tmp_path_factory.mktemp("out")
    env = {**_cache_env(), **os.environ, "PYTHONPATH": str(ROOT)}  # a cache set in the environment wins
    env["XLA_FLAGS"] = xla_flags_without_devices()
    p = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--peers", str(peers),
                        "--peers-python", sys.executable], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1200)
    rows = [json.loads(x) for x in (out / "accelerator.jsonl").read_text().splitlines()]
    return p, rows, out


def test_the_dry_run_runs_every_part_and_exits_0(dry_run):
    p, rows, out = dry_run
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import accelerator
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert {r["part"] for r in rows} == set(accelerator.PARTS)
    keys = {"part", "figure", "jaxcl", "unit", "ref", "ref_name", "ratio", "share_of_peak", "ref_share_of_peak",
            "peak_device_bytes", "status", "note", "part_s", "part_cpu_s"}
    for r in rows:
        assert keys <= set(r), r
        assert r["status"] == "ok", r  # every part ran, W6's ViT-Ti/16 included
    tests = next(r for r in rows if r["part"] == "tests")
    assert tests["figure"] == "collected" and tests["jaxcl"] >= 4  # the marked subset is selected


def test_each_workload_sits_beside_its_peer_with_the_ratio(dry_run):
    _, rows, _ = dry_run
    main = {"W1": "train_steps_per_s", "W2": "train_steps_per_s", "W3": "train_steps_per_s",
            "W4": "calls_per_s", "W5": "train_steps_per_s", "W6": "train_steps_per_s"}
    for part, figure in main.items():
        r = next(x for x in rows if x["part"] == part and x["figure"] == figure)
        ref = PEER["plain_torch"][figure]["median"]
        assert r["ref"] == ref and r["ref_name"] == "torch" and r["jaxcl"] > 0
        assert r["ratio"] == round(r["jaxcl"] / ref, 3)
        assert next(x for x in rows if x["part"] == part and x["figure"] == "last_loss_finite")["jaxcl"] is True
    merge = next(x for x in rows if x["part"] == "W5" and x["figure"] == "merge_time")
    assert merge["unit"] == "ms" and merge["ref"] == 1.0


def test_bf16_reports_its_mfu_from_the_scaled_flop_count(dry_run):
    _, rows, _ = dry_run
    r = next(x for x in rows if x["part"] == "W3_bf16" and x["figure"].startswith("train_steps_per_s_b"))
    batch = int(r["figure"].rsplit("_b", 1)[1])
    peak_gflops = 100.0  # the dry run's stand-in peak
    assert r["share_of_peak"] == pytest.approx(r["jaxcl"] * W3_FLOP * batch / 64 / (peak_gflops * 1e9), abs=1e-4)
    loss = next(x for x in rows if x["part"] == "W3_bf16" and x["figure"] == "bf16_last_loss")
    assert loss["status"] == "ok"


def test_seeds_rows_compare_the_program_with_one_seed(dry_run):
    _, rows, _ = dry_run
    for part in ("seeds_W2", "seeds_W3"):
        got = {x["figure"]: x for x in rows if x["part"] == part}
        wall = next(v for k, v in got.items() if k.startswith("wall_s_2_seeds"))
        assert wall["ref_name"] == "1 seed" and wall["ratio"] == round(wall["jaxcl"] / wall["ref"], 3)
        diff = next(v for k, v in got.items() if k.startswith("seed0_matrix_max_abs_diff"))
        assert diff["jaxcl"] <= 0.02  # seed 0 inside the program is seed 0 alone


def test_the_table_and_the_raw_records_are_written(dry_run):
    _, rows, out = dry_run
    table = (out / "accelerator.md").read_text().splitlines()
    header = next(i for i, x in enumerate(table) if x.startswith("| part | figure |"))
    body = [x for x in table[header + 2:] if x.startswith("|")]
    assert len(body) == len(rows)
    assert all(x.count("|") == table[header].count("|") for x in body)
    raw = [json.loads(x) for x in (out / "accelerator-raw.jsonl").read_text().splitlines()]
    assert {r["part"] for r in raw} >= {"env", "tests", "W1", "W2", "W3", "W4", "W5", "W3_bf16", "seeds_W2"}
