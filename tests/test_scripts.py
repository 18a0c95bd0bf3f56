"""Every script in scripts/ still runs as installed: it opens with a docstring saying how to run it, its
--help exits 0 and names its options, every name it imports from the package or a sibling script
(those imported inside functions too) still exists, and none edits the import path."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
PY = sorted(SCRIPTS.glob("*.py"))
SH = sorted(SCRIPTS.glob("*.sh"))


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def is_script(path: Path) -> bool:
    """Has an `if __name__ == "__main__":` block (protocol.py is a module the benchmarks share)."""
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree(path).body)


def options(path: Path) -> list[str]:
    """The --flags the script's parser declares and shows (argparse.SUPPRESS ones are hidden)."""
    found = []
    for node in ast.walk(tree(path)):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"):
            continue
        hidden = any(k.arg == "help" and "SUPPRESS" in ast.unparse(k.value) for k in node.keywords)
        first = node.args[0] if node.args else None
        if not hidden and isinstance(first, ast.Constant) and str(first.value).startswith("--"):
            found.append(first.value)
    return found


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in tree(path).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names}
    return names


def run_help(cmd: list[str]) -> subprocess.CompletedProcess:
    # from an unrelated folder and with no path added: the scripts must find the installed package
    return subprocess.run([*cmd, "--help"], capture_output=True, text=True, cwd="/", timeout=120)


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess]:
    cmds = {p.name: [sys.executable, str(p)] for p in PY if is_script(p)}
    cmds |= {p.name: ["bash", str(p)] for p in SH}
    with ThreadPoolExecutor(max_workers=4) as pool:  # each run is mostly importing torch
        return dict(zip(cmds, pool.map(run_help, cmds.values()), strict=True))


def test_every_file_but_the_shared_protocol_is_a_script():
    """A new script is covered by the tests below as it is; a module only imported would skip --help."""
    assert {p.name for p in PY if not is_script(p)} == {"protocol.py"}


@pytest.mark.parametrize("path", [p for p in PY if is_script(p)], ids=lambda p: p.name)
def test_help_exits_0_and_names_every_option(path, helps):
    proc = helps[path.name]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: ")
    if path.name == "prune_llama.py":  # only forwards to `llm-gradprune prune`, whose tests cover the flags
        assert proc.stdout.startswith("usage: llm-gradprune prune ")
        return
    flags = options(path)
    assert flags, path.name
    assert [f for f in flags if f not in proc.stdout] == []


@pytest.mark.parametrize("path", SH, ids=lambda p: p.name)
def test_shell_scripts_print_their_header_on_help(path, helps):
    proc = helps[path.name]
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = path.read_text().splitlines()[1].removeprefix("# ")  # the line under the shebang
    assert proc.stdout.startswith(first + "\n")
    if path.name == "gpu_check.sh":  # then the flags of the Python script it runs
        assert [f for f in options(SCRIPTS / "gpu_check.py") if f not in proc.stdout] == []


@pytest.mark.parametrize("path", PY, ids=lambda p: p.name)
def test_docstring_shows_how_to_run_it_and_no_path_is_edited(path):
    doc = ast.get_docstring(tree(path)) or ""
    assert doc, path.name
    if is_script(path):
        assert f"scripts/{path.name}" in doc or f"scripts.{path.stem}" in doc, path.name
    text = path.read_text()
    assert "sys.path" not in text and "PYTHONPATH" not in text


@pytest.mark.parametrize("path", SH, ids=lambda p: p.name)
def test_shell_scripts_use_the_installed_package(path):
    assert "PYTHONPATH" not in path.read_text()


@pytest.mark.parametrize("path", PY, ids=lambda p: p.name)
def test_every_imported_name_exists(path):
    """Imports inside functions run only when a benchmark does: a renamed module would go unnoticed."""
    siblings = {p.stem: p for p in PY}
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("llm_gradprune", *siblings):
                    assert importlib.util.find_spec(alias.name) or alias.name in siblings, alias.name
        if not isinstance(node, ast.ImportFrom) or node.level or node.module is None:
            continue
        source = siblings.get(node.module)
        if node.module.startswith("tests."):  # a reference implementation the tests share
            source = ROOT.joinpath(*node.module.split(".")).with_suffix(".py")
        if source is not None:
            missing = {a.name for a in node.names} - top_level_names(source)
            assert not missing, (path.name, node.module, missing)
        elif node.module.split(".")[0] == "llm_gradprune":
            module = importlib.import_module(node.module)
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            missing = [n for n in missing if importlib.util.find_spec(f"{node.module}.{n}") is None]
            assert not missing, (path.name, node.module, missing)


@pytest.mark.slow
def test_bench_structured_family_speed_runs_on_toy_shapes(tmp_path):
    """The family speed path end to end at toy sizes (nothing is timed seriously): it loads tests/families.py
    by its path, shrinks a dense and an MoE family both ways and records every row without an error."""
    out = tmp_path / "bench.json"
    args = ["speed", "--family", "llama", "qwen2_moe", "--hidden", "128", "--layers", "2", "--experts", "4",
            "--reps", "1", "--seq", "16", "--new-tokens", "2", "--threads", "1", "--json", str(out), "--key", "smoke"]  # fmt: skip
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_structured.py"), *args], capture_output=True,
                          text=True, cwd="/", timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())["smoke"]["result"]["family_speed"]
    for name, second in (("llama", "heads"), ("qwen2_moe", "experts")):
        rows = [r for k, r in result[name].items() if k != "setup"]
        assert [r.get("error") for r in rows] == [None, None], rows
        assert [r["structure"] for r in rows] == ["channels", second]
        assert all(0 < r["decoder_kept"] < 1 and r["pruned_decode_tps"] > 0 for r in rows)


def test_a_record_that_accumulates_rows_keeps_every_runs_command(tmp_path, monkeypatch):
    """bench_block and bench_regional add rows to one key run by run: each run's command stays listed."""
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(SCRIPTS))
    benchjson = importlib.import_module("benchjson")
    rec = tmp_path / "bench.json"
    args = SimpleNamespace(out=str(tmp_path / "out.json"), record=str(rec), key="calib", threads=1)
    for rows in ("a", "b"):
        monkeypatch.setattr(sys, "argv", ["bench_block.py", "--rows", rows])
        benchjson.save(args, {"rows": rows}, append=True)
    entry = json.loads(rec.read_text())["calib"]
    assert [c.split()[-1] for c in entry["commands"]] == ["a", "b"] and entry["result"] == {"rows": "b"}
    monkeypatch.setattr(sys, "argv", ["bench_block.py", "--rows", "c"])
    benchjson.save(args, {"rows": "c"})  # a result measured whole in one run: its command alone
    assert [c.split()[-1] for c in json.loads(rec.read_text())["calib"]["commands"]] == ["c"]
