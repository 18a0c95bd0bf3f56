"""Runs the support-table cases of the multi-process paths: two processes, every case in one launch.

    accelerate launch --multi_gpu --num_processes 2 tests/support_worker.py MODEL_DIR TEXT OUT_DIR

Writes OUT_DIR/results.json (rank 0): per case the exit code, what stderr said, and whether an output
folder exists. Each case is the real `llm-gradprune prune` entry point (commands.main) in-process.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llm_gradprune import commands  # noqa: E402
from llm_gradprune.parallel import make_accelerator, world  # noqa: E402
from tests.support_cases import cases, option, settings  # noqa: E402


def flags(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False:
            out.append(f"--no-{key.replace('_', '-')}")
        elif isinstance(value, dict):
            out += [flag, json.dumps(value)]
        else:
            out += [flag, str(value)]
    return out


def main(model_dir: str, text: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    acc = make_accelerator()
    out = Path(out_dir)
    results = {}
    for path, name in cases(["whole_model_multi", "layer_wise_multi", "sharded", "layer_wise_sharded"]):
        key = f"{path}|{name}"
        target = out / key.replace("|", "__").replace(" ", "_").replace("/", "_")
        values = settings(option(name), path, str(out / "tmp"))
        argv = ["prune", "--model", model_dir, "--dataset", text, "--output-dir", str(target), *flags(values)]
        err = io.StringIO()
        logging.getLogger("llm_gradprune").handlers.clear()
        with contextlib.redirect_stderr(err):
            rc = commands.main(argv)
        acc.wait_for_everyone()
        results[key] = {"rc": rc, "stderr": err.getvalue(), "written": target.exists(), "output": str(target)}
    if world()[0] == 0:
        (out / "results.json").write_text(json.dumps(results))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:4])
