"""The three parts and their one-way arrows, read from the code's own imports:
Module -> Bridge -> Runtime <- Lab. The runtime and the bridge never import the lab, the runtime
never imports the bridge, and the extension installs no lab code."""
import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

SOURCE = ROOT / "BrainUNetSegmentation"
PARTS = {"brainunet": "Runtime", "brainunet_lab": "Lab", "BrainUNetSegmentationLib": "Bridge",
         "BrainUNetSegmentation": "Module"}
ALLOWED = {("Module", "Bridge"), ("Module", "Runtime"), ("Bridge", "Runtime"), ("Lab", "Runtime")}


def part_of(path: Path) -> str:
    rel = path.relative_to(SOURCE)
    return PARTS[rel.parts[0] if len(rel.parts) > 1 else rel.stem]


def imported_top_levels(path: Path):
    """(top-level package, module name) of every import in a file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(SOURCE).parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] if node.level > 1 else package
                name = ".".join([*base, node.module] if node.module else base)
                yield (base[0] if base else ""), name
            elif node.module:
                yield node.module.split(".")[0], node.module


def import_edges() -> dict:
    edges = {}
    files = [SOURCE / "BrainUNetSegmentation.py"] + [p for d in ("brainunet", "brainunet_lab", "BrainUNetSegmentationLib")
                                                      for p in (SOURCE / d).rglob("*.py")]
    for path in files:
        src = part_of(path)
        for top, name in imported_top_levels(path):
            if top in PARTS and PARTS[top] != src:
                edges.setdefault((src, PARTS[top]), set()).add(f"{path.relative_to(SOURCE)} -> {name}")
    return edges


def test_arrows_between_the_parts_run_one_way():
    edges = import_edges()
    wrong = {k: sorted(v) for k, v in edges.items() if k not in ALLOWED}
    assert not wrong, f"imports against the arrows: {wrong}"
    assert ("Lab", "Runtime") in edges and ("Bridge", "Runtime") in edges and ("Module", "Bridge") in edges


def test_the_runtime_and_bridge_import_no_qt_and_no_slicer_application():
    for folder in ("brainunet", "BrainUNetSegmentationLib"):
        for path in (SOURCE / folder).rglob("*.py"):
            for top, name in imported_top_levels(path):
                assert top not in ("qt", "ctk", "PythonQt"), f"{path}: imports {name}"
                assert not name.startswith(("slicer.app", "slicer.modules", "slicer.util")), f"{path}: imports {name}"
            text = path.read_text(encoding="utf-8")
            assert "slicer.app" not in text and "slicer.modules" not in text, path


def test_the_runtime_command_line_works_without_the_lab():
    blocker = ("import sys, importlib.abc\n"
               "class Block(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path, target=None):\n"
               "        if name.split('.')[0] == 'brainunet_lab': raise ImportError('lab not installed')\n"
               "sys.meta_path.insert(0, Block())\n"
               "import importlib.metadata as md\n"
               "md.entry_points = lambda **kw: []\n"  # an installation without the lab has no entry point
               "from brainunet import cli\n"
               "parser = cli.build_parser()\n"
               "sub = next(a for a in parser._actions if a.dest == 'command')\n"
               "print(sorted(sub.choices))\n")
    out = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, encoding="utf-8", cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(sorted(["batch", "demo", "models", "register", "segment"]))


def test_cmake_installs_the_module_bridge_and_runtime_but_no_lab_code():
    cmake = (SOURCE / "CMakeLists.txt").read_text(encoding="utf-8")
    globs = [line.strip() for line in cmake.splitlines() if line.strip().startswith("${CMAKE_CURRENT_SOURCE_DIR}/")]
    assert "${CMAKE_CURRENT_SOURCE_DIR}/brainunet/*.py" in globs
    assert "${CMAKE_CURRENT_SOURCE_DIR}/${MODULE_NAME}Lib/*.py" in globs
    assert not [g for g in globs if "brainunet_lab" in g]
    assert not list((SOURCE / "brainunet").rglob("training.py")) and not (SOURCE / "brainunet" / "engine").exists()


def test_shipped_code_checks_with_messages_not_bare_asserts():
    """Python -O drops assert statements, and a bare AssertionError tells a user nothing: the module, the
    bridge (scenario checks use scenarios.check) and the runtime raise errors that say what went wrong."""
    shipped = [SOURCE / "BrainUNetSegmentation.py"] + [p for d in ("brainunet", "BrainUNetSegmentationLib")
                                                       for p in (SOURCE / d).rglob("*.py")]
    found = [f"{path.relative_to(SOURCE)}:{node.lineno}" for path in shipped
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(node, ast.Assert)]
    assert not found, f"assert statements in shipped code: {found}"
