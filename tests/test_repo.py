"""The repository keeps its promises: CI runs README's test command, shipped configs load."""

import re
from pathlib import Path

import pytest

from polar_train.config import load_config

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return [line for block in blocks[:2] for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_exactly_the_readme_test_command():
    install_and_demo, install_and_test = readme_commands()
    assert "pytest" in install_and_test and "configs/demo.yaml" in install_and_demo
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert install_and_test in ci_lines


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.output_dir and cfg.data.train_files


def test_no_line_is_over_120_characters():
    over = [f"polar_train/{p.relative_to(REPO / 'polar_train')}:{number}: {len(line)} characters"
            for p in sorted((REPO / "polar_train").rglob("*.py"))
            for number, line in enumerate(p.read_text().splitlines(), start=1) if len(line) > 120]
    assert over == [], "lines over 120 characters (wrap them):\n" + "\n".join(over)


def test_no_module_is_over_450_lines():
    sizes = {str(p.relative_to(REPO / "polar_train")): len(p.read_text().splitlines())
             for p in (REPO / "polar_train").rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 450} == {}
    assert "engine/protocol.py" in sizes and "checkpoint.py" in sizes  # the walk found the package


def polar_imports() -> dict[str, set[str]]:
    """module -> the polar_train modules it imports anywhere in its body (also inside functions and
    under ``if TYPE_CHECKING:``: an annotation-only import back is still a cycle)."""
    import ast

    graph = {}
    for path in (REPO / "polar_train").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("polar_train"):
                package = REPO / node.module.replace(".", "/")  # `from package import submodule`: the submodule
                subs = {f"{node.module}.{a.name}" for a in node.names if (package / f"{a.name}.py").is_file()}
                found.update(subs or {node.module})
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("polar_train"))
        graph[name] = found - {name}
    return graph


def test_modules_import_one_way():
    """No import cycles (lazy and ``TYPE_CHECKING`` imports count); checkpoint and export see engines only through the
    protocol; model code imports no engine, checkpoint or training code; only engine/deepspeed*
    imports deepspeed."""
    graph = polar_imports()
    for start in graph:  # depth-first from every module: a path back to it is a cycle
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                assert nxt != start, " -> ".join([*path, nxt])
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    for name in ("polar_train.checkpoint", "polar_train.export"):
        engine_parts = {m for m in graph[name] if m.startswith("polar_train.engine")}
        assert engine_parts <= {"polar_train.engine.protocol", "polar_train.engine.dist"}
    for name, imported in graph.items():
        if name.startswith("polar_train.model"):
            assert not {m for m in imported if m.split(".")[1] in ("engine", "checkpoint", "export", "train")}, name
        uses_deepspeed = "import deepspeed" in (REPO / (name.replace(".", "/") + ".py")).read_text() \
            if (REPO / (name.replace(".", "/") + ".py")).is_file() else False
        assert not uses_deepspeed or name.startswith("polar_train.engine.deepspeed"), name


def test_only_train_run_cli_and_config_take_the_whole_config():
    """Each component receives its own section(s) (STYLE: config per component): a parameter
    annotated ``Config`` is allowed in ``train.run``, cli.py and config.py only."""
    import ast

    takers = []
    for path in sorted((REPO / "polar_train").rglob("*.py")):
        module = str(path.relative_to(REPO / "polar_train"))
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            annotations = [ast.unparse(a.annotation) for a in arguments if a.annotation is not None]
            if any(re.search(r"\bConfig\b", text) for text in annotations):
                takers.append(f"{module}:{node.name}")
    assert [t for t in takers if t != "train.py:run" and not t.startswith(("cli.py:", "config.py:"))] == []
    assert "train.py:run" in takers  # the scan sees annotations
