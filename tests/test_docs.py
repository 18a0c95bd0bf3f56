"""The docs stay true: the tables taken from the registries are current, and the README's layout names
the packages that exist."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_tables_are_current():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"], capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_layout_matches_the_tree():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    package = ROOT / "llm_gradprune"
    for sub in sorted(p.name for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        assert f"{sub}/" in layout, sub
    for mod in sorted(p.stem for p in package.glob("*.py") if p.stem not in ("__init__", "__main__")):
        assert mod in layout, mod
