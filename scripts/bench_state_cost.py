"""Cost of resumable calibration on a real model: state size, save/restore time, fingerprint time.

    nice -n 10 python scripts/bench_state_cost.py [--model builtin:smollm2-135m] \
        [--criteria fisher,gblm] [--out out/bench_state_cost.json]

For each criterion: the statistics it keeps are filled with random numbers (the cost of a save does not
depend on their values), saved as a calibration state (safetensors + state.json, fsynced, renamed)
and restored into fresh accumulators, which must be bit-identical. No calibration is run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from llm_gradprune.calibration.assets import resolve_model
from llm_gradprune.calibration.stats import make_statistics
from llm_gradprune.io.calib_state import CalibState, model_fingerprint
from llm_gradprune.scoring import criteria
from llm_gradprune.targets import find_targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--criteria", default="fisher,gblm")
    ap.add_argument("--out", default="out/bench_state_cost.json")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=torch.float32)
    t = time.perf_counter()
    fp = model_fingerprint(model)
    t_fp = time.perf_counter() - t
    targets = find_targets(model)
    params = {f"{n}.weight": m.weight for n, m in targets.items()}
    rows = []
    for name in args.criteria.split(","):
        crit = criteria.get(name)
        needs = crit.statistics(crit.resolve_params({}))
        stats = make_statistics(needs, targets)
        gen = torch.Generator().manual_seed(0)
        for x in (t for a in stats.accumulators() for t in a.tensors().values()):
            x.copy_(torch.rand(x.shape, generator=gen))
        folder = Path(tempfile.mkdtemp(prefix="state-bench-"))
        identity = {"config": {}, "model": fp, "data": None}
        try:
            ck = CalibState(folder, 1, False, identity)
            ck.stats = stats
            t = time.perf_counter()
            saved = ck.save(1, 0, 0.0)
            t_save = time.perf_counter() - t
            size = sum(p.stat().st_size for p in saved.iterdir())
            again = make_statistics(needs, targets)
            t = time.perf_counter()
            CalibState(folder, 1, True, identity).restore(again)
            t_load = time.perf_counter() - t
            mine = {k: t for a in stats.accumulators() for k, t in a.tensors().items()}
            equal = all(torch.equal(mine[k], t) for a in again.accumulators() for k, t in a.tensors().items())
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        rows.append({"criterion": name, "statistics": sorted(needs), "state_mb": size / 1e6,
                     "save_s": t_save, "restore_s": t_load, "restored_bit_identical": equal})  # fmt: skip
    print(f"model {args.model}: {len(params)} target tensors, "
          f"{sum(p.numel() for p in params.values()):,} weights, fingerprint {t_fp:.2f} s")  # fmt: skip
    print(f"{'criterion':<10} {'statistics':<28} {'state MB':>9} {'save s':>7} {'restore s':>9} identical")
    for r in rows:
        print(f"{r['criterion']:<10} {','.join(r['statistics']):<28} {r['state_mb']:>9.1f} "
              f"{r['save_s']:>7.2f} {r['restore_s']:>9.2f} {r['restored_bit_identical']}")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"model": args.model, "fingerprint_s": t_fp, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
