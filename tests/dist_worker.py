"""Worker for tests/test_distributed.py: the library run by 1 or 2 processes, results written to files.

    accelerate launch --multi_gpu --num_processes 2 tests/dist_worker.py OUT_DIR     # 2 gloo CPU processes
    python tests/dist_worker.py OUT_DIR                                            # the 1-process reference

Writes OUT_DIR/w{world}.pt (rank 0): the summed statistics, every criterion x scope (+ 2:4) mask set of
the replicated-model path (data sharded by micro-batch), the same for the FSDP2 path (each rank's
rows gathered), and which blocks every rank read. One launch covers every case: starting two Python
processes with transformers costs more than all the pruning here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_gradprune import JobConfig, prune_  # noqa: E402
from llm_gradprune.calibration.data import micro_batches, round_robin, round_robin_chunks  # noqa: E402
from llm_gradprune.calibration.loop import (  # noqa: E402
    calibrate,
    causal_lm_loss,
    gather_statistics,
    reduce_counters_,
    reduce_statistics_,
)
from llm_gradprune.calibration.stats import ActStats, GradStats, Statistics  # noqa: E402
from llm_gradprune.errors import ConfigError  # noqa: E402
from llm_gradprune.parallel import Collective, RowShards, make_accelerator, world  # noqa: E402
from llm_gradprune.parallel.fsdp import fully_shard_model  # noqa: E402
from llm_gradprune.targets import find_targets  # noqa: E402
from tests.conftest import make_blocks, make_tiny_llama  # noqa: E402
from tests.families import BY_NAME, MOVING_2OF4  # noqa: E402

CRITERIA = ("magnitude", "gradient", "taylor", "fisher", "wanda", "gblm", "blend", "ria")
CASES = [(c, s, "unstructured") for c in CRITERIA for s in ("tensor", "row", "global")]
CASES += [(c, "row", "2:4") for c in CRITERIA]
NUM_BLOCKS, SEQ_LEN, BATCH = 10, 16, 2  # 5 micro-batches: 3 on rank 0, 2 on rank 1


def tiny():
    # intermediate 67: gate/up have an odd row count, so FSDP splits them unevenly (34 + 33 rows)
    return make_tiny_llama(seed=0, intermediate=67)


def config(criterion: str, scope: str, pattern: str):
    # 2:4 needs rows divisible by 4: down_proj reads 67 inputs, so it stays dense there
    exclude = ["down_proj"] if pattern != "unstructured" else []
    kw = {"scope": scope} if pattern == "unstructured" else {"pattern": pattern}
    return JobConfig.from_flat(
        {
            "criterion": criterion,
            **kw,
            "batch_size": BATCH,
            "num_samples": NUM_BLOCKS,
            "seq_len": SEQ_LEN,
            "progress": False,
            "exclude": exclude,
            "select_chunk_elems": 1000,
            "allow_empty_tensors": True,
        }
    ).prune  # (small chunks: several per scope)


def all_stats(model, batches, accelerator, grad_accum: int = 1):
    targets = find_targets(model)
    params = {f"{n}.weight": m.weight for n, m in targets.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    gs = GradStats(params, ("grad_sum", "grad_abs_sum", "grad_sq_sum"), grad_accum=grad_accum)
    acts = ActStats(targets)
    stats = Statistics({"grad": gs, "act": acts})
    counters = calibrate(model, batches, stats, accelerator=accelerator, progress=False)
    reduce_statistics_(stats, Collective(), chunk_elems=700)
    reduce_counters_(counters, Collective())
    out = {f"{s}/{n}": t.clone() for s, per in gs.sums.items() for n, t in per.items()}
    out.update({f"act_sq_sum/{n}": t.clone() for n, t in acts.sums.items()})
    return out, {
        "counts": gs.counts,
        "act_tokens": acts.tokens,
        **{k: counters[k] for k in ("batches", "tokens")},
    }


def gather_rows(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank-ordered concatenation of every rank's rows (test only: the library never gathers)."""
    import torch.distributed as dist

    parts: list = [None] * world()[1]
    dist.all_gather_object(parts, {k: v.cpu() for k, v in local.items()})
    return {k: torch.cat([p[k] for p in parts]) for k in local}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)  # tiny matrices: more threads only fight over the shared cores
    accelerator = make_accelerator()
    rank, size = world()
    blocks = make_blocks(NUM_BLOCKS, SEQ_LEN, seed=1)
    mbs = micro_batches(blocks, BATCH)
    mine = round_robin(mbs, rank, size)
    result: dict = {"world": size}

    # which blocks each rank read, seen from inside the loss
    seen: list[list[int]] = []

    def recording_loss(model, batch):
        seen.append([int(b[0]) * 1000 + int(b[1]) for b in batch])  # first two tokens name a block
        return causal_lm_loss(model, batch)

    model = tiny()
    calibrate(
        model,
        mine,
        Statistics({"act": ActStats(find_targets(model))}),
        loss_fn=recording_loss,
        progress=False,
    )
    result["seen"] = gather_objects(seen, size)

    stats, counts = all_stats(tiny(), mine, accelerator if size > 1 else None)
    result["stats"], result["counts"] = stats, counts
    ga2 = round_robin_chunks(mbs, 2, rank, size)  # grad_accum 2: whole groups of 2 micro-batches per rank
    result["stats_ga2"], result["counts_ga2"] = all_stats(tiny(), ga2, accelerator if size > 1 else None, 2)

    result["masks"], result["reports"] = {}, {}
    for case in CASES:
        res = prune_(tiny(), mine, config(*case), accelerator=accelerator if size > 1 else None)
        result["masks"][case] = res.masks
        result["reports"][case] = {k: res.report[k] for k in ("zero_weights", "masked_weights")}
        result["reports"][case]["calibration"] = res.report["calibration"]

    if size > 1:  # FSDP2 path: every rank sees every micro-batch, each its piece of it
        model = fully_shard_model(tiny())
        targets = find_targets(model)
        needs = {"grad_mean", "grad_abs_mean", "grad_sq_mean", "act_sq_mean"}
        stats, counters = gather_statistics(
            model, mbs, needs, targets, collective=RowShards(), progress=False
        )
        gs, acts = stats.grad, stats.by_source["act"]
        local = {f"{s}/{n}": t for s, per in gs.sums.items() for n, t in per.items()}
        fsdp_stats = gather_rows(local)
        fsdp_stats.update({f"act_sq_sum/{n}": t.clone() for n, t in acts.sums.items()})
        result["fsdp_stats"] = fsdp_stats
        result["fsdp_counts"] = {"counts": gs.counts, "act_tokens": acts.tokens, "batches": counters["batches"],
                                 "tokens_total": counters["tokens"]}  # fmt: skip
        result["fsdp_masks"], result["fsdp_reports"] = {}, {}
        for case in CASES:
            if case[0] == "ria":  # refused on row shards (its column sums span ranks): test_support.py
                continue
            model = fully_shard_model(tiny())
            res = prune_(model, mbs, config(*case))
            result["fsdp_masks"][case] = gather_rows(res.masks)
            result["fsdp_reports"][case] = {k: res.report[k] for k in ("zero_weights", "masked_weights")}
    result["moe_masks"], result["moe_reports"] = moe_cases(mine, accelerator if size > 1 else None)
    result["lw_masks"], result["lw_reports"] = moe_cases(mine, accelerator if size > 1 else None, "llama_untied",
                                                         LAYER_WISE_CASES)  # fmt: skip
    result["lw_weights"] = layer_wise_weights(mine, accelerator if size > 1 else None)
    result["block_weights"] = layer_wise_weights(mine, accelerator if size > 1 else None,
                                                 {"block_steps": 3, "block_lr": 1e-3, "block_batch": 1})  # fmt: skip
    if size > 1:
        try:
            cfg = JobConfig.from_flat({"progress": False, "criterion": "fisher"}).prune
            prune_(fully_shard_model(BY_NAME["mixtral"].build()), mbs, cfg)
            result["moe_fsdp"] = "ran"
        except ConfigError as err:
            result["moe_fsdp"] = str(err)
    if size > 1:
        result["tied_scores"] = tied_selection(rank, size)
        result["accelerate_fsdp2"] = accelerate_fsdp2(accelerator, mbs)
    if rank == 0:
        torch.save(result, Path(out_dir) / f"w{size}.pt")
    accelerator.wait_for_everyone()


LAYER_WISE_CASES = {
    "sparsegpt/true_sequential": {"criterion": "sparsegpt", "true_sequential": True},
    "wanda/lsq": {"criterion": "wanda", "reconstruct": "lsq"},
    "sparsegpt/2:4": {"criterion": "sparsegpt", "pattern": "2:4"},
    "wanda/lsq/block": {"criterion": "wanda", "reconstruct": "lsq", "block_steps": 3, "block_lr": 1e-3},
    "regional/row": {"criterion": "regional"},
    "block_fisher/row": {"criterion": "block_fisher"},
    "wanda/2:4/block-dynamic": MOVING_2OF4,
}
MOE_CASES = {
    "token_fisher/row": {"criterion": "token_fisher"},
    "block_fisher/row": {"criterion": "block_fisher"},
    "sparsegpt": {"criterion": "sparsegpt"},
    "wanda/2:4/obs": {"criterion": "wanda", "pattern": "2:4", "reconstruct": "obs"},
}


def moe_cases(mine, accelerator, family: str = "mixtral", cases: dict = MOE_CASES) -> tuple[dict, dict]:
    """A tiny Mixtral on replicated processes: every expert's masks and routed tokens, as one process.
    Layer-wise, each rank solves its share of a block's tensors and the results are shared."""
    masks, reports = {}, {}
    for case, flat in cases.items():
        model = BY_NAME[family].build()
        res = prune_(
            model, mine, JobConfig.from_flat({"progress": False, **flat}).prune, accelerator=accelerator
        )
        masks[case] = {n: (t.weight == 0).clone() for n, t in find_targets(model).items()}
        reports[case] = {"zero_weights": res.report["zero_weights"], "experts": res.report["experts"]}
    return masks, reports


def layer_wise_weights(mine, accelerator, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """Every target weight after layer-wise lsq with each rank solving its share (and, with `extra`, the
    block refit with gradients summed across ranks): equal to one process."""
    model = BY_NAME["llama_untied"].build()
    flat = {"progress": False, "criterion": "wanda", "reconstruct": "lsq", **(extra or {})}
    prune_(model, mine, JobConfig.from_flat(flat).prune, accelerator=accelerator)
    return {n: t.weight.detach().clone() for n, t in find_targets(model).items()}


def tied_scores() -> dict[str, torch.Tensor]:
    """Integer scores in 0..3: most of them tie with the threshold, and ties span the ranks' rows."""
    g = torch.Generator().manual_seed(3)
    return {f"t{i}": torch.randint(0, 4, (rows, 6), generator=g).float() for i, rows in enumerate((7, 4, 9))}


def tied_selection(rank: int, size: int) -> dict:
    """Each rank holds a contiguous block of rows (as FSDP2 does); masks gathered for the test."""
    from llm_gradprune.selection.masks import iter_masks

    full = tied_scores()
    mine = {k: torch.tensor_split(v, size)[rank] for k, v in full.items()}
    out = {}
    for scope in ("tensor", "global"):
        masks = dict(iter_masks(list(mine), mine.__getitem__, scope=scope, sparsity=0.45, collective=RowShards(),
                                numel={k: v.numel() for k, v in full.items()}, chunk_elems=5))  # fmt: skip
        out[scope] = gather_rows(masks)
    return out


def accelerate_fsdp2(accelerator, mbs) -> dict:
    """Accelerate's own FSDP2 path (prepare + get_state_dict), last because it changes the shared state.

    Accelerate offers FSDP only on accelerators, so the type is forced here; everything after that is
    Accelerate's unmodified code (wrap policy, fully_shard, full state dict gathering).
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from llm_gradprune.parallel.fsdp import full_state_dict, prepare_fsdp2

    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT"
    )
    model = prepare_fsdp2(tiny(), accelerator)
    placements = str(model.model.layers[0].mlp.gate_proj.weight.placements)
    res = prune_(model, mbs, config("gblm", "global", "unstructured"), accelerator=accelerator)
    sd = full_state_dict(model, accelerator)
    return {"placements": placements, "zero_weights": res.report["zero_weights"], "state_dict": sd}


def gather_objects(obj, size: int) -> list:
    if size == 1:
        return [obj]
    import torch.distributed as dist

    parts: list = [None] * size
    dist.all_gather_object(parts, obj)
    return parts


def pipeline(model_dir: str, out_dir: str) -> None:
    """prune_job end to end (replicated, then FSDP2), logging which rank writes a checkpoint."""
    import json

    import llm_gradprune.job as pl
    import llm_gradprune.job.skeleton as skeleton

    torch.set_num_threads(1)
    real_save = skeleton.save_pruned

    def logged_save(*args, **kw):
        with open(Path(out_dir) / "saves.log", "a") as fh:
            fh.write(f"{world()[0]}\n")
        return real_save(*args, **kw)

    skeleton.save_pruned = logged_save  # the one place the job saves
    for fsdp in (False, True):
        out = Path(out_dir) / ("fsdp" if fsdp else "replicated")
        cfg = JobConfig.from_flat({"model": model_dir, "dataset": "builtin:imdb", "criterion": "gblm",
                                   "scope": "global", "num_samples": 5, "seq_len": 16, "batch_size": 2,
                                   "output_dir": str(out), "fsdp": fsdp, "progress": False,
                                   "select_chunk_elems": 1000, "allow_empty_tensors": True})  # fmt: skip
        report = pl.prune_job(cfg)
        # every rank returns only after the checkpoint is in place
        (Path(out_dir) / f"after_{out.name}_{world()[0]}.json").write_text(
            json.dumps({"exists": (out / "pruning_report.json").is_file(), "report": report}, default=str)
        )


if __name__ == "__main__":
    if sys.argv[1] == "pipeline":
        pipeline(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1])
