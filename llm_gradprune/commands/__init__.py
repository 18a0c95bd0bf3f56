"""`llm-gradprune` command line: a thin shell over the library, one file per command.

Each command module has `add_parser(subparsers)` and `run(args) -> exit code`; `COMMANDS` registers
them. Flags come from the config dataclasses (`flags.py`). Every bad input ends in one line on stderr
and exit 2; argparse's own errors too (no usage dump), with a "did you mean" hint for a mistyped flag.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import re
import shlex
import signal
import sys

from .. import __version__
from ..calibration.assets import AssetError
from ..errors import ConfigError
from ..registry import Registry
from . import eval as eval_command
from . import inspect as inspect_command
from . import prune as prune_command
from . import push as push_command
from . import recover as recover_command

PROG = "llm-gradprune"
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)
COMMANDS: Registry = Registry("command")
for _module in (prune_command, eval_command, recover_command, push_command, inspect_command):
    COMMANDS.add(_module.__name__.rsplit(".", 1)[1], _module)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (no usage block), and reads `-1e-4` or `-inf`
    as a value: its own pattern knows only `-1` and `-.5`, and calls anything else a missing argument."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message: str):
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """One line naming the unknown arguments, with the nearest flag of the command for a typo."""
    message = f"unrecognized arguments: {' '.join(extras)}"
    flags = [a.split("=")[0] for a in extras if a.startswith("--")]
    known = [o for a in parser._actions for o in a.option_strings]
    near = difflib.get_close_matches(flags[0], known, n=1) if flags else []
    return message + (f" (did you mean {near[0]}?)" if near else "")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """(the top-level parser, each command's parser)."""
    parser = OneLineParser(prog=PROG, description=(__doc__ or "").splitlines()[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    commands = {}
    for name in COMMANDS:
        p = commands[name] = COMMANDS.get(name).add_parser(sub)
        p.allow_abbrev = False
        p.set_defaults(run=COMMANDS.get(name).run)
    return parser, commands


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (it may have been redirected since the handler was made)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _log_to_stderr() -> None:
    log = logging.getLogger("llm_gradprune")
    if not log.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


class Terminated(KeyboardInterrupt):
    """SIGTERM (a pre-empted cluster job) ends a run as Ctrl-C does."""


def _on_sigterm(signum, frame):
    raise Terminated


def _resume_hint(args: argparse.Namespace, argv: list[str]) -> str:
    """`--resume` command for an interrupted prune or recover whose calibration or training state was
    saved, else ''."""
    command = getattr(args, "command", None)
    if command not in ("prune", "recover"):
        return ""
    from ..io.calib_state import latest_state, resolve_state_dir
    from ..job.recovery import saved_training_step

    try:
        cfg = COMMANDS.get(command).config_from_args(args)
    except ConfigError:
        return ""
    step = saved_training_step(cfg)  # the later of the two: a prune with recovery trains after calibrating
    calib = command == "prune" and (cfg.save_state_every or cfg.resume)
    found = latest_state(resolve_state_dir(cfg.state_dir, cfg.output_dir)) if calib else None
    if step is not None:
        saved = f"training state saved at step {step}"
    elif found is not None:
        saved = f"calibration state saved at batch {found[1]['batches_done']}"
    else:
        return ""
    script = sys.argv[0].endswith("prune_llama.py")
    words = (["python", sys.argv[0]] if script else [PROG, command]) + argv[1:]
    if "--resume" not in words:
        words.append("--resume")
    return f"; {saved}: resume with {shlex.join(words)}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        commands[args.command].error(_unrecognized(commands[args.command], extras))
    _log_to_stderr()
    from ..parallel import world
    from ..status import stage

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.run(args)
    except (ConfigError, AssetError) as err:  # a bad input, or a built-in asset missing
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `llm-gradprune ... | head`: the reader is gone, nothing to report
        return 0
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: one line, no partial output, 130
        if world()[0] == 0:
            what = "SIGTERM" if isinstance(err, Terminated) else "SIGINT (Ctrl-C)"
            saving = stage() == "saving the checkpoint"
            done = "; the output is the previous one or the new complete one (saves are atomic)"
            hint = _resume_hint(args, argv) or (done if saving else "; nothing was written")
            print(f"{PROG}: interrupted by {what} during {stage()}{hint}", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
