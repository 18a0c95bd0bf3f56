"""Write the tables the docs take from the registries, between markers, so they cannot drift.

    python scripts/gen_docs.py          # rewrite docs/CRITERIA.md and docs/ARCHITECTURE.md in place
    python scripts/gen_docs.py --check  # exit 1 if a file is out of date (tests/test_docs.py runs it)

Tables: the criteria (score, statistics read, parameters with defaults) from `scoring.criteria`, the
allocations and update rules from theirs, and the support table (execution path x option) from
`support.OPTIONS`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llm_gradprune.calibration.stats import STATISTICS
from llm_gradprune.reconstruction.rules import UPDATES
from llm_gradprune.scoring.allocation import ALLOCATIONS
from llm_gradprune.scoring.criteria import CRITERIA
from llm_gradprune.support import OPTIONS, PATH_TITLES, PATHS, applies

ROOT = Path(__file__).resolve().parents[1]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _params(params: dict) -> str:
    return ", ".join(f"`{k}` = {p.default}" for k, p in params.items()) or "-"


def criteria_table() -> str:
    lines = [
        "| criterion | score (higher = kept) | statistics read | parameters | |",
        "|---|---|---|---|---|",
    ]
    for name, c in CRITERIA.items():
        stats = sorted(c.statistics(c.resolve_params({})))
        reads = ", ".join(f"`{STATISTICS.get(s).accumulator}`" for s in stats) or "none"
        if c.prior_needs is not None:
            reads += " (+ the prior's, when grad_exp > 0)"
        lines.append(f"| `{name}` | {_cell(c.formula)} | {reads} | {_params(c.params)} | {_cell(c.help)} |")
    lines += ["", "| allocation | parameters | statistics read | |", "|---|---|---|---|"]
    for name, a in ALLOCATIONS.items():
        reads = ", ".join(f"`{STATISTICS.get(s).accumulator}`" for s in a.needs) or "none"
        lines.append(f"| `{name}` | {_params(a.params)} | {reads} | {a.help} |")
    lines += ["", "| reconstruct | needs layer Hessians | |", "|---|---|---|"]
    for name, r in UPDATES.items():
        lines.append(f"| `{name}` | {'yes' if r.needs_hessian else 'no'} | {_cell(r.help)} |")
    return "\n".join(lines)


def support_table() -> str:
    head = "| option | " + " | ".join(PATH_TITLES[p] for p in PATHS) + " |"
    lines = [head, "|---" * (len(PATHS) + 1) + "|"]
    reasons = []
    for o in OPTIONS:
        cells = []
        for p in PATHS:
            if not applies(o, p):
                cells.append("n/a")
            elif p in o.refused:
                cells.append("refused")
                if o.refused[p] not in reasons:
                    reasons.append(o.refused[p])
            else:
                cells.append("yes")
        lines.append(f"| {o.name} | " + " | ".join(cells) + " |")
    lines += ["", "Reasons given when refused:", ""] + [f"- {r}" for r in reasons]
    return "\n".join(lines)


BLOCKS = {
    ROOT / "docs" / "CRITERIA.md": {"criteria": criteria_table},
    ROOT / "docs" / "ARCHITECTURE.md": {"support": support_table},
}


def render(text: str, blocks: dict) -> str:
    for name, make in blocks.items():
        start, end = f"<!-- generated:{name}:start -->", f"<!-- generated:{name}:end -->"
        if start not in text or end not in text:
            raise SystemExit(f"no {start} ... {end} markers")
        text = text[: text.index(start) + len(start)] + "\n" + make() + "\n" + text[text.index(end) :]
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report whether the files are current")
    args = ap.parse_args(argv)
    stale = []
    for path, blocks in BLOCKS.items():
        old = path.read_text()
        new = render(old, blocks)
        if new != old:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print("out of date (run python scripts/gen_docs.py): " + ", ".join(str(p) for p in stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
