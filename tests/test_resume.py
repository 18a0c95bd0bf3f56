"""Resumable calibration: saved sums continue bit-identically; SIGKILL at any point loses nothing.

The library-level tests crash calibration in-process (a loss_fn that raises) and are fast; the
subprocess test SIGKILLs real `llm-gradprune prune` runs, once between state saves and once inside a
state save, and checks the resumed checkpoint is byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm_gradprune import commands as cli
from llm_gradprune.calibration.loop import calibrate, causal_lm_loss
from llm_gradprune.calibration.stats import ActStats, GradStats, Statistics
from llm_gradprune.config import JobConfig
from llm_gradprune.errors import ConfigError
from llm_gradprune.io.calib_state import (
    CalibState,
    check_state_dir,
    latest_state,
    model_fingerprint,
    resolve_state_dir,
    run_identity,
)
from llm_gradprune.targets import find_targets

from .conftest import make_blocks, make_tiny_llama
from .tiny_folder import kill_when_paused, make_model_folder, make_text_file, start_cli


class Crash(Exception):
    pass


def _stats(model, grad_accum: int = 1):
    targets = find_targets(model)
    params = {f"{n}.weight": m.weight for n, m in targets.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    return GradStats(params, {"grad_sq_sum", "grad_sum"}, grad_accum=grad_accum), ActStats(targets)


def _identity(model, cfg=None):
    return run_identity((cfg or JobConfig()).identity(), model, "d")


def _run(model, batches, ckpt=None, crash_at=None):
    gs, acts = _stats(model)
    seen = []

    def loss_fn(m, b):
        if crash_at is not None and len(seen) == crash_at:
            raise Crash
        seen.append(1)
        # a little randomness in the loss, so a resume must restore the RNG state to match
        return causal_lm_loss(m, b) * (1 + 0.01 * torch.rand(()))

    counters = calibrate(
        model,
        batches,
        Statistics({"grad": gs, "act": acts}),
        loss_fn=loss_fn,
        progress=False,
        calib_state=ckpt,
    )
    return gs, acts, counters


def test_resumed_sums_are_bit_identical(tmp_path):
    model, blocks = make_tiny_llama(), make_blocks(n=7)
    batches = [blocks[i : i + 1] for i in range(7)]
    torch.manual_seed(1)
    ref_g, ref_a, ref_c = _run(model, batches)

    torch.manual_seed(1)
    ckpt = CalibState(tmp_path / "s", 2, False, _identity(model))
    with pytest.raises(Crash):
        _run(model, batches, ckpt, crash_at=5)  # states saved at batches 2 and 4
    torch.manual_seed(123)  # the resumed process starts with another RNG state: the saved one must win
    ckpt = CalibState(tmp_path / "s", 2, True, _identity(model))
    g, a, c = _run(model, batches, ckpt)
    assert ckpt.resumed_from == 4 and c["batches"] == 7 and c["tokens"] == ref_c["tokens"]
    assert c["mean_loss"] == ref_c["mean_loss"]
    for stat in ref_g.sums:
        for name, t in ref_g.sums[stat].items():
            assert torch.equal(t, g.sums[stat][name]), (stat, name)
    for name, t in ref_a.sums.items():
        assert torch.equal(t, a.sums[name]) and a.tokens[name] == ref_a.tokens[name]
    assert g.counts == ref_g.counts


def test_only_the_latest_complete_state_is_kept_and_partials_are_ignored(tmp_path):
    model = make_tiny_llama()
    batches = [make_blocks(n=1, seed=i) for i in range(4)]
    ckpt = CalibState(tmp_path / "s", 1, False, _identity(model))
    _run(model, batches, ckpt)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["step-00000004"]
    # A killed save leaves a .tmp folder; a damaged newer state (short file) must not be picked either.
    (tmp_path / "s" / ".tmp-step-00000005-x").mkdir()
    bad = tmp_path / "s" / "step-00000006"
    bad.mkdir()
    meta = json.loads((tmp_path / "s" / "step-00000004" / "state.json").read_text())
    (bad / "state.json").write_text(json.dumps(meta))
    for f in meta["files"]:
        (bad / f).write_bytes(b"short")
    folder, found = latest_state(tmp_path / "s")
    assert folder.name == "step-00000004" and found["batches_done"] == 4


def test_changed_config_model_or_data_is_refused_naming_the_difference(tmp_path):
    model = make_tiny_llama()
    batches = [make_blocks(n=1, seed=i) for i in range(2)]
    _run(model, batches, CalibState(tmp_path / "s", 1, False, _identity(model)))
    other_cfg = _identity(model, JobConfig.from_flat({"seed": 3, "sparsity": 0.6}))
    with pytest.raises(ConfigError, match=r"config differs .*seed 0 -> 3.*sparsity 0\.5 -> 0\.6"):
        CalibState(tmp_path / "s", 1, True, other_cfg)
    with pytest.raises(ConfigError, match="model's weights differ"):
        CalibState(tmp_path / "s", 1, True, _identity(make_tiny_llama(seed=1)))
    with pytest.raises(ConfigError, match="calibration tokens differ"):
        CalibState(tmp_path / "s", 1, True, {**_identity(model), "data": "other"})
    # run-control keys (where to write, progress bars) may change between the runs
    ok = _identity(
        model, JobConfig.from_flat({"output_dir": "elsewhere", "progress": False, "save_state_every": 7})
    )
    resumed = CalibState(tmp_path / "s", 1, True, ok)
    gs, acts = _stats(model)
    resumed.restore(Statistics({"grad": gs, "act": acts}))
    assert resumed.resumed_from == 2


def test_saves_wait_for_a_group_boundary_and_flush_deferred_folds(tmp_path):
    """Interplay with gradient accumulation / host staging in GradStats: while an accumulation is
    open its partial sum lives outside the sums, so no save; `flush()` folds a deferred gradient."""
    model = make_tiny_llama()
    gs, acts = _stats(model)
    flushed = []
    gs.flush = lambda: flushed.append(True)
    ckpt = CalibState(tmp_path / "s", 2, False, _identity(model))
    ckpt.restore(Statistics({"grad": gs, "act": acts}))
    gs._accumulating = {"partial"}  # mid-window at the due batch: no save yet
    assert gs.accumulating
    ckpt.after_batch(2, 32, 1.0)
    assert latest_state(tmp_path / "s") is None and not flushed
    gs._accumulating = set()  # the window closed one batch later: the due save happens now
    ckpt.after_batch(3, 48, 1.5)
    assert latest_state(tmp_path / "s")[1]["batches_done"] == 3 and flushed == [True]


@pytest.mark.parametrize("stage_on_host", [False, True])
def test_resume_with_grad_accum_and_host_staging_is_bit_identical(tmp_path, stage_on_host):
    model, blocks = make_tiny_llama(), make_blocks(n=7)
    batches = [blocks[i : i + 1] for i in range(7)]

    def run(ckpt=None, crash_at=None):
        gs, acts = _stats(model, grad_accum=2)
        gs.stage_on_host = stage_on_host
        seen = []

        def loss_fn(m, b):
            if crash_at is not None and len(seen) == crash_at:
                raise Crash
            seen.append(1)
            return causal_lm_loss(m, b)

        c = calibrate(model, batches, Statistics({"grad": gs, "act": acts}), loss_fn=loss_fn, progress=False,
                      calib_state=ckpt)  # fmt: skip
        return gs, c

    ref, ref_c = run()
    with pytest.raises(Crash):  # every=3 with groups of 2: saves wait for batches 4 (and 6)
        run(CalibState(tmp_path / "s", 3, False, _identity(model)), crash_at=5)
    assert latest_state(tmp_path / "s")[1]["batches_done"] == 4
    got, c = run(CalibState(tmp_path / "s", 3, True, _identity(model)))
    assert c["samples"] == ref_c["samples"] == 4 and got.counts == ref.counts
    for name, t in ref.sums["grad_sq_sum"].items():
        assert torch.equal(t, got.sums["grad_sq_sum"][name]), name


def test_fingerprint_sees_a_single_changed_sampled_weight():
    a, b = make_tiny_llama(), make_tiny_llama()
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0  # element 0 is always sampled
    assert model_fingerprint(a) != model_fingerprint(b)


def test_existing_state_without_resume_is_refused(tmp_path):
    out = str(tmp_path / "out")
    state = resolve_state_dir(None, out)
    assert state == tmp_path / "out.calib-state"
    check_state_dir(state, out, every=2, resume=False)  # nothing saved yet
    model = make_tiny_llama()
    _run(model, [make_blocks(n=1)] * 2, CalibState(state, 2, False, _identity(model)))
    with pytest.raises(ConfigError, match="saved at batch 2: pass --resume"):
        check_state_dir(state, out, every=2, resume=False)
    check_state_dir(state, out, every=2, resume=True)
    check_state_dir(state, out, every=0, resume=False)  # no state asked for: nothing to protect
    with pytest.raises(ConfigError, match="inside output_dir"):
        check_state_dir(resolve_state_dir(str(tmp_path / "s"), str(tmp_path)), tmp_path, every=0, resume=True)


# -- SIGKILL end to end ---------------------------------------------------------------------------
def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.slow
def test_sigkill_between_and_during_state_saves_then_resume_matches(tmp_path):
    model = make_model_folder(tmp_path / "model")
    text = make_text_file(tmp_path / "t.txt")
    common = ["prune", "--model", str(model), "--dataset", str(text), "--num-samples", "10",
              "--seq-len", "16", "--no-progress"]  # fmt: skip
    # fisher reads gradient sums, wanda activation sums: both are saved and restored
    for crit in ("fisher", "wanda"):
        args = [*common, "--criterion", crit]
        ref = tmp_path / f"ref-{crit}"
        assert cli.main([*args, "--output-dir", str(ref)]) == 0
        out = tmp_path / f"out-{crit}"
        state = tmp_path / f"out-{crit}.calib-state"
        run = [*args, "--output-dir", str(out), "--save-state-every", "2"]

        if crit == "fisher":
            # 1) killed after batch 5, between saves: the state of batch 4 survives
            kill_when_paused(start_cli(run, "batch:5"))
            assert latest_state(state)[1]["batches_done"] == 4 and not out.exists()
            # 2) resumed from 4, killed inside its 2nd save (batch 8: stats written, not yet renamed)
            kill_when_paused(start_cli([*run, "--resume"], "save:2"))
            assert any(p.name.startswith(".tmp-step-00000008") for p in state.iterdir())
            assert latest_state(state)[1]["batches_done"] == 6 and not out.exists()
            # 3) resumed from 6, calibration completes (the final sums are saved at batch 10), then the
            #    run is killed while writing the pruned checkpoint: a resume recalibrates nothing
            kill_when_paused(start_cli([*run, "--resume"], "output-write:1"))
            assert latest_state(state)[1]["batches_done"] == 10 and not out.exists()
            resumed_from = 10
        else:
            # killed inside the 2nd save of a fresh run (batch 4): the state of batch 2 survives
            kill_when_paused(start_cli(run, "save:2"))
            assert latest_state(state)[1]["batches_done"] == 2 and not out.exists()
            resumed_from = 2

        # last) resumed to the end
        proc = start_cli([*run, "--resume"], None)
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        assert "resuming calibration" in stdout and f"(batch {resumed_from})" in stdout
        assert not state.exists()  # cleared once the checkpoint is in place

        ref_files, out_files = _files(ref), _files(out)
        assert ref_files and ref_files == out_files  # byte-identical weights, hence identical masks
        ref_report = json.loads((ref / "pruning_report.json").read_text())
        report = json.loads((out / "pruning_report.json").read_text())
        assert report["per_tensor"] == ref_report["per_tensor"]
        assert report["calibration"]["tokens"] == ref_report["calibration"]["tokens"] == 160
        assert report["calibration"]["mean_loss"] == ref_report["calibration"]["mean_loss"]
        assert report["calibration"]["resumed_from_batch"] == resumed_from


def test_resumed_token_fisher_masks_match_uninterrupted(tmp_path):
    """token_fisher (the default) keeps per-token sums outside GradStats: they must be saved too."""
    from llm_gradprune import prune_

    blocks = make_blocks(n=6)
    batches = [blocks[i : i + 1] for i in range(6)]
    job = JobConfig.from_flat({"criterion": "token_fisher", "num_samples": 6, "seq_len": blocks.shape[1],
                               "progress": False})  # fmt: skip
    cfg = job.prune

    def run(ckpt=None, crash_at=None):
        model, seen = make_tiny_llama(), []

        def loss_fn(m, b):
            if crash_at is not None and len(seen) == crash_at:
                raise Crash
            seen.append(1)
            return causal_lm_loss(m, b)

        return prune_(model, batches, cfg, loss_fn=loss_fn, calib_state=ckpt).masks

    ref = run()
    ident = _identity(make_tiny_llama(), job)
    with pytest.raises(Crash):
        run(CalibState(tmp_path / "s", 2, False, ident), crash_at=5)
    assert latest_state(tmp_path / "s")[1]["batches_done"] == 4
    got = run(CalibState(tmp_path / "s", 2, True, ident))
    assert all(torch.equal(ref[n], got[n]) for n in ref)
