"""Several processes, same result: data sharding, summed statistics, sharded selection, one checkpoint.

The two-process tests start `accelerate launch --multi_gpu --num_processes 2` (two gloo CPU processes)
on tests/dist_worker.py and compare with the same worker run as one plain process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_gradprune.calibration.data import micro_batches, round_robin, round_robin_chunks
from llm_gradprune.parallel import RowShards, all_reduce_sum_, rank_offsets
from llm_gradprune.selection.masks import iter_masks

from .conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
LAUNCH = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# -- data sharding (pure) ----------------------------------------------------------------------
@pytest.mark.parametrize("n_blocks,batch,world", [(10, 2, 2), (9, 2, 2), (7, 1, 3), (3, 2, 4), (8, 3, 2)])
def test_shard_reads_every_block_once_with_single_process_batches(n_blocks, batch, world):
    blocks = torch.arange(n_blocks).view(-1, 1)
    single = [mb.view(-1).tolist() for mb in micro_batches(blocks, batch)]
    shares = [
        [mb.view(-1).tolist() for mb in round_robin(micro_batches(blocks, batch), r, world)]
        for r in range(world)
    ]
    read = [b for share in shares for mb in share for b in mb]
    assert sorted(read) == list(range(n_blocks))  # none missed, none twice
    # each micro-batch is one of the single-process micro-batches, whole
    assert sorted(mb for share in shares for mb in share) == sorted(single)
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1


def test_round_robin_uneven_hand_worked():
    # 5 micro-batches on 2 ranks: rank 0 gets 0, 2, 4 and rank 1 gets 1, 3
    assert round_robin(list("abcde"), 0, 2) == ["a", "c", "e"]
    assert round_robin(list("abcde"), 1, 2) == ["b", "d"]
    assert round_robin(list("a"), 1, 2) == []  # a rank may get nothing; the sums still add up


def test_shard_samples_keeps_grad_accum_groups_whole():
    items = list(range(7))  # grad_accum 2: samples (0, 1), (2, 3), (4, 5), (6,)
    assert round_robin_chunks(items, 2, 0, 2) == [0, 1, 4, 5]
    assert round_robin_chunks(items, 2, 1, 2) == [2, 3, 6]  # the short last sample stays last on its rank
    assert round_robin_chunks(items, 1, 1, 2) == round_robin(items, 1, 2)


# -- collectives without a process group are the identity ----------------------------------------
def test_all_reduce_sum_single_process_is_identity():
    ts = [torch.arange(5.0), torch.ones(3, 2)]
    info = all_reduce_sum_(ts, chunk_elems=4)
    assert ts[0].tolist() == [0, 1, 2, 3, 4] and info["calls"] == 0 and info["elements"] == 11


def test_tie_offsets_single_process():
    assert rank_offsets([2, 0, 3], cumulative=True) == [0, 2, 2]
    assert rank_offsets([2, 0, 3], cumulative=False) == [0, 0, 0]


@pytest.mark.parametrize("scope,nm", [("tensor", None), ("row", None), ("global", None), ("row", (2, 4))])
def test_sharded_masks_equal_plain_masks_in_one_process(scope, nm):
    g = torch.Generator().manual_seed(0)
    scores = {f"t{i}": torch.randint(0, 5, (6, 8), generator=g).float() for i in range(3)}  # many ties
    numel = {k: v.numel() for k, v in scores.items()}
    plain = dict(iter_masks(list(scores), scores.__getitem__, scope=scope, sparsity=0.4, nm=nm, chunk_elems=7,
                            numel=numel))  # fmt: skip
    sharded = dict(iter_masks(list(scores), scores.__getitem__, scope=scope, sparsity=0.4, nm=nm, numel=numel,
                              chunk_elems=7, collective=RowShards()))  # fmt: skip
    for k in scores:
        assert torch.equal(plain[k], sharded[k]), k


# -- two processes vs one ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    ref = subprocess.Popen([sys.executable, str(WORKER), str(out)], env=env(), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    two = subprocess.run([*LAUNCH, str(WORKER), str(out)], env=env(), cwd=ROOT, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    ref_out = ref.communicate(timeout=300)[0]
    assert ref.returncode == 0, ref_out[-3000:]
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    return torch.load(out / "w1.pt", weights_only=False), torch.load(out / "w2.pt", weights_only=False)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.slow
def test_two_processes_read_every_block_once(runs):
    one, two = runs
    assert two["world"] == 2 and one["world"] == 1
    single = one["seen"][0]
    r0, r1 = two["seen"]
    assert len(single) == 5 and len(r0) == 3 and len(r1) == 2  # uneven: 5 micro-batches on 2 ranks
    assert sorted(r0 + r1) == sorted(single)  # same micro-batches, each whole, none twice or missed
    blocks = [b for mb in r0 + r1 for b in mb]
    assert len(set(blocks)) == len(blocks) == 10


@pytest.mark.slow
def test_two_processes_same_statistics(runs):
    one, two = runs
    assert set(one["stats"]) == set(two["stats"]) and len(one["stats"]) == 4 * 14
    worst = max(max_rel(two["stats"][k], one["stats"][k]) for k in one["stats"])
    assert worst < 1e-5
    assert two["counts"] == one["counts"]  # batches, tokens, per-tensor sample counts summed exactly
    # grad_accum 2 (a sample = 2 micro-batches; 5 micro-batches = 3 samples, the last one short)
    worst = max(max_rel(two["stats_ga2"][k], one["stats_ga2"][k]) for k in one["stats_ga2"])
    assert worst < 1e-5 and two["counts_ga2"] == one["counts_ga2"]
    assert set(one["counts_ga2"]["counts"].values()) == {3}
    assert max_rel(one["stats_ga2"]["grad_sq_sum/model.layers.0.mlp.up_proj.weight"],
                   one["stats"]["grad_sq_sum/model.layers.0.mlp.up_proj.weight"]) > 1e-3  # fmt: skip


@pytest.mark.slow
def test_two_processes_same_masks_every_criterion_and_scope(runs):
    one, two = runs
    assert len(one["masks"]) == 32  # 8 criteria x (tensor, row, global) + 8 x 2:4
    for case, masks in one["masks"].items():
        assert masks.keys() == two["masks"][case].keys()
        for name, m in masks.items():
            assert torch.equal(m, two["masks"][case][name]), (case, name)
            if case[0] != "ria":  # refused on row shards
                assert torch.equal(m, two["fsdp_masks"][case][name]), ("fsdp", case, name)
        assert two["reports"][case]["zero_weights"] == one["reports"][case]["zero_weights"]
        if case[0] != "ria":
            assert two["fsdp_reports"][case]["zero_weights"] == one["reports"][case]["zero_weights"]
        assert two["reports"][case]["calibration"]["processes"] == 2


@pytest.mark.slow
def test_two_processes_share_the_layer_wise_work_and_give_one_process_masks(runs):
    """Layer-wise with 2 processes: each rank solves its share of every block's tensors (largest first to
    the least loaded rank) and the results are broadcast; masks, reports and updated weights are those of
    one process (sparsegpt with true_sequential and 2:4, wanda + lsq)."""
    from llm_gradprune.parallel import Collective

    one, two = runs
    for case, masks in one["lw_masks"].items():
        for name, m in masks.items():
            assert torch.equal(m, two["lw_masks"][case][name]), (case, name)
        assert two["lw_reports"][case] == one["lw_reports"][case]
    for key in ("lw_weights", "block_weights"):  # lsq, and lsq + block refit: bit for bit
        for name, w in one[key].items():
            assert torch.equal(w, two[key][name]), (key, name)
    assert not all(torch.equal(one["lw_weights"][n], one["block_weights"][n]) for n in one["lw_weights"])
    owners = Collective.owners.__get__(type("Two", (Collective,), {"processes": 2})())
    # gate (8) to rank 0; q (4), k (2), v (2) to rank 1, the less loaded, until both hold 8
    assert owners({"q": 4, "k": 2, "v": 2, "gate": 8}) == {"gate": 0, "q": 1, "k": 1, "v": 1}


@pytest.mark.slow
def test_two_processes_prune_every_expert_as_one_process(runs):
    """Replicated processes on a tiny Mixtral: routed tokens summed, every expert's mask identical
    (layer-wise Hessians of experts a rank never routed to are summed too); FSDP refuses experts."""
    one, two = runs
    assert set(one["moe_masks"]) == {"token_fisher/row", "block_fisher/row", "sparsegpt", "wanda/2:4/obs"}
    for case, masks in one["moe_masks"].items():
        assert len(masks) == 24
        for name, m in masks.items():
            assert torch.equal(m, two["moe_masks"][case][name]), (case, name)
        assert two["moe_reports"][case] == one["moe_reports"][case]
    assert "fused expert matrix: FSDP row shards" in two["moe_fsdp"]


@pytest.mark.slow
def test_fsdp_same_statistics_without_gathering(runs):
    one, two = runs
    worst = max(max_rel(two["fsdp_stats"][k], one["stats"][k]) for k in one["stats"])
    assert worst < 1e-5
    fc = two["fsdp_counts"]
    assert fc["batches"] == 5 and fc["counts"] == one["counts"]["counts"]
    assert fc["act_tokens"] == one["counts"]["act_tokens"] and fc["tokens_total"] == one["counts"]["tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_sharded_selection_splits_ties_across_ranks_like_one_process(runs, scope):
    from .dist_worker import tied_scores

    full = tied_scores()
    plain = dict(iter_masks(list(full), full.__getitem__, scope=scope, sparsity=0.45, chunk_elems=5,
                            numel={k: v.numel() for k, v in full.items()}))  # fmt: skip
    got = runs[1]["tied_scores"][scope]
    for k in full:
        assert torch.equal(got[k], plain[k]), k
    assert sum(int(m.sum()) for m in got.values()) == sum(int(m.sum()) for m in plain.values())


@pytest.mark.slow
def test_accelerate_fsdp2_prepare_and_state_dict_match_one_process(runs):
    one, two = runs
    acc = two["accelerate_fsdp2"]
    assert acc["placements"] == "(Shard(dim=0),)"
    case = ("gblm", "global", "unstructured")
    assert acc["zero_weights"] == one["reports"][case]["zero_weights"]
    ref = tiny_pruned(one["masks"][case])
    assert acc["state_dict"].keys() == ref.keys()  # tied lm_head written once, as by one process
    for k, v in ref.items():
        assert torch.equal(acc["state_dict"][k], v), k


def tiny_pruned(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The worker's tiny Llama with the single-process masks applied."""
    sd = {k: v.clone() for k, v in make_tiny_llama(seed=0, intermediate=67).state_dict().items()}
    for name, m in masks.items():
        sd[name][m] = 0
    return {k: v for k, v in sd.items() if k != "lm_head.weight"}


@pytest.mark.slow
def test_pipeline_two_processes_one_checkpoint_that_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_gradprune.calibration.assets import resolve_model
    from llm_gradprune.config import JobConfig
    from llm_gradprune.job import prune_job

    model_dir = tmp_path / "tiny"
    make_tiny_llama(vocab=49152, intermediate=67).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2-135m")).save_pretrained(model_dir)
    out = tmp_path / "runs"
    out.mkdir()
    two = subprocess.run([*LAUNCH, str(WORKER), "pipeline", str(model_dir), str(out)], env=env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    assert (out / "saves.log").read_text().split() == ["0", "0"]  # main process only, once per run
    for mode in ("replicated", "fsdp"):
        for rank in (0, 1):  # no rank returns before the checkpoint is in place
            after = json.loads((out / f"after_{mode}_{rank}.json").read_text())
            assert after["exists"] and after["report"]["calibration"]["processes"] == 2
        assert not list(out.glob(f".{mode}.partial-*"))

    cfg = JobConfig.from_flat({"model": str(model_dir), "dataset": "builtin:imdb", "criterion": "gblm",
                               "scope": "global", "num_samples": 5, "seq_len": 16, "batch_size": 2,
                               "output_dir": str(tmp_path / "single"), "progress": False,
                               "select_chunk_elems": 1000, "allow_empty_tensors": True})  # fmt: skip
    single = prune_job(cfg)
    assert single["calibration"]["processes"] == 1
    ref = load_file(str(tmp_path / "single" / "model.safetensors"))
    for mode in ("replicated", "fsdp"):
        got = load_file(str(out / mode / "model.safetensors"))
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.equal(got[k], ref[k]), (mode, k)
        report = json.loads((out / mode / "pruning_report.json").read_text())
        assert report["verified"] and report["zero_weights"] == single["zero_weights"]
        model = AutoModelForCausalLM.from_pretrained(out / mode)
        assert int((model.model.layers[0].mlp.gate_proj.weight == 0).sum()) > 0


def tiny_model_dir(tmp_path: Path) -> Path:
    from transformers import AutoTokenizer

    from llm_gradprune.calibration.assets import resolve_model

    model_dir = tmp_path / "tiny"
    make_tiny_llama(vocab=49152).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2-135m")).save_pretrained(model_dir)
    return model_dir


@pytest.mark.slow
def test_one_launched_process_is_not_wrapped_in_ddp(tmp_path):
    """torchrun with one process gives a multi-device type; prepare() would wrap DDP and fail on frozen weights.

    (`--multi_gpu --num_processes 1` is refused by accelerate; an FSDP config with one process is not.)
    """
    cmd = ["accelerate", "launch", "--config_file", str(ROOT / "configs/accelerate/fsdp_8gpu.yaml"),
           "--num_processes", "1", str(ROOT / "scripts/prune_llama.py"), "--model",
           str(tiny_model_dir(tmp_path)), "--num-samples", "2", "--seq-len", "16",
           "--output-dir", str(tmp_path / "out"), "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads((tmp_path / "out" / "pruning_report.json").read_text())
    assert report["calibration"]["processes"] == 1 and report["verified"]


@pytest.mark.slow
def test_fsdp_launch_config_shards_on_cpu(tmp_path):
    """configs/accelerate/fsdp_8gpu.yaml with 2 CPU processes: Accelerate would replicate, we shard."""
    model_dir = tiny_model_dir(tmp_path)
    cmd = ["accelerate", "launch", "--config_file", str(ROOT / "configs/accelerate/fsdp_8gpu.yaml"),
           "--num_processes", "2", str(ROOT / "scripts/prune_llama.py"), "--model", str(model_dir),
           "--criterion", "taylor", "--scope", "tensor", "--num-samples", "4", "--seq-len", "16",
           "--batch-size", "2", "--output-dir", str(tmp_path / "out"), "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads((tmp_path / "out" / "pruning_report.json").read_text())
    assert report["calibration"]["processes"] == 2 and report["calibration"]["sharding"] == "fsdp2"
    assert report["verified"] and report["zero_weights"] == report["target_weights"] // 2


@pytest.mark.parametrize(
    ("method", "together"),
    [
        # SparseGPT's column loop costs about the same per weight at any width: down_proj's wider
        # factorisation weighs more than gate's, but not as much as gate, up and q/k/v together
        (dict(criterion="sparsegpt"), {"down": 0, "o": 0}),
        # lsq's iterations grow with in^2 per row: down_proj alone outweighs the rest of the block
        (dict(criterion="wanda", reconstruct="lsq"), {"down": 0}),
    ],
)
def test_a_block_is_dealt_by_the_cost_of_its_update_rule(method, together):
    """The layer-wise dealing of one Llama-shaped block (hidden 1024, MLP 4096, 4 KV heads of 64) to two
    ranks, from the registered rules' costs (`plan.solve_cost`)."""
    from torch import nn

    from llm_gradprune.config import PruneConfig
    from llm_gradprune.parallel import Collective
    from llm_gradprune.plan import make_plan, solve_cost

    shapes = {"q": (1024, 1024), "k": (256, 1024), "v": (256, 1024), "o": (1024, 1024),
              "gate": (4096, 1024), "up": (4096, 1024), "down": (1024, 4096)}  # fmt: skip
    probe = nn.Linear(8, 8, bias=False)
    plan = make_plan(nn.ModuleDict({"p": probe}), PruneConfig(**method), targets={"p": probe})
    owners = Collective.owners.__get__(type("Two", (Collective,), {"processes": 2})())
    dealt = owners({n: solve_cost(plan, r, c) for n, (r, c) in shapes.items()})
    assert {n for n, r in dealt.items() if r == 0} == set(together)
    assert solve_cost(plan, 1024, 4096) > solve_cost(plan, 4096, 1024) > solve_cost(plan, 1024, 1024)
