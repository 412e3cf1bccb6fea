"""The package's shape, as docs/architecture.md states it, checked on the code itself:

- imports point one way: front ends -> pipeline -> conditioning / sampling -> models -> files, and
  sibling packages of one layer do not import each other;
- nothing in sd15/ imports the dev tools (tools/) or the tests;
- an installed wheel holds `sd15` and nothing else at the top level (no `tools`, `tokenizer`, ...);
- every file path, `sd15.*` module and docs section that code or docs refer to exists.
"""

import ast
import importlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sd15"

# layer of each part of sd15 (higher may import lower, never the reverse); the top-level modules are
# the public API and the `python -m` entry points, above everything
LAYERS = {"files": 0, "models": 1, "conditioning": 2, "sampling": 2, "adapters": 2, "pipeline": 3, "cli": 4,
          "serve": 4, "batch": 4}
# imports allowed between siblings of one layer: none
TOP = 5
# sd15.process imports nothing of sd15 and may be imported by anything (it must run before torch)
NEUTRAL = {"process"}


def part_of(module: str) -> str | None:
    """'sd15.models.unet' -> 'models'; a top-level module ('sd15.generate', 'sd15.process') -> None."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) >= 2 and pieces[1] in LAYERS else None


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> list[str]:
    """Absolute names of the modules `path` imports (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.append(target)
            out += [f"{target}.{alias.name}" for alias in node.names]   # `from . import stages`
    return out


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    unplaced = [module_name(p) for p in SOURCES
                if part_of(module_name(p)) is None and module_name(p).count(".") > 1]
    assert unplaced == []


@pytest.mark.parametrize("path", SOURCES, ids=[module_name(p) for p in SOURCES])
def test_imports_point_down(path):
    me = module_name(path)
    mine = part_of(me)
    my_layer = LAYERS[mine] if mine else TOP
    wrong = []
    for target in imports(path):
        root = target.split(".")[0]
        if root in ("tools", "tests", "weights_map", "tokenizer", "reference", "diffusers", "transformers"):
            wrong.append(f"{target} (not part of the engine)")
            continue
        if root != "sd15" or target == "sd15":
            if target == "sd15" and mine is not None:
                wrong.append("sd15 (the public API, from inside the package)")
            continue
        theirs = part_of(target)
        if theirs is None:
            top = target.split(".")[1]
            if top not in NEUTRAL and mine is not None:
                wrong.append(f"{target} (a top-level module)")
            continue
        if theirs == mine:
            continue
        if LAYERS[theirs] >= my_layer:
            wrong.append(f"{target} ({theirs}, layer {LAYERS[theirs]}, from {mine or 'top'}, layer {my_layer})")
    assert wrong == [], f"{me} imports against the layering: {wrong}"


def test_process_module_imports_nothing_of_sd15():
    assert [t for t in imports(PACKAGE / "process.py") if t.startswith("sd15")] == []


def test_the_wheel_installs_sd15_only(tmp_path):
    """Build the wheel as pip would (no network: the venv's setuptools) and look inside."""
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("sd15-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"sd15", next(n.split("/")[0] for n in names if ".dist-info" in n)}
    assert "sd15/conditioning/tokenizer/bpe_simple_vocab_16e6.txt.gz" in names       # the package data too
    assert "sd15/conditioning/tokenizer/LICENSE-bpe-vocab.txt" in names
    assert not [n for n in names if "/tests/" in n or n.startswith("tools/")]


# ---- references that must resolve -----------------------------------------------------------------

TEXT_FILES = [p for p in [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *PACKAGE.rglob("*.py"),
                          *ROOT.glob("tools/*.py"), *ROOT.glob("tests/*.py"), ROOT / ".ci" / "run", ROOT / "setup.cfg"]
              if p.name != "test_layout.py"]
PATH_REF = re.compile(r"(?<![\w./-])((?:sd15|tools|tests|docs|\.ci)/[\w./-]*\w)")
MODULE_REF = re.compile(r"(?<![\w./\"'-])(sd15(?:\.\w+)+)")   # not in a file name or a quoted key
SECTION_REF = re.compile(r'docs/architecture\.md, "([^"]+)"')


def test_no_reference_to_notes_outside_the_repository():
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in TEXT_FILES
            for i, line in enumerate(p.read_text().splitlines(), 1) if "DESIGN" in line or "../shared" in line]
    assert hits == []


def test_referenced_paths_exist():
    missing = set()
    for path in TEXT_FILES:
        for ref in PATH_REF.findall(path.read_text()):
            ref = ref.rstrip(".")
            if not (ROOT / ref).exists() and not any(ch in ref for ch in "*{"):
                missing.add(f"{ref} (in {path.relative_to(ROOT)})")
    assert sorted(missing) == []


def test_referenced_modules_exist():
    missing = set()
    for path in TEXT_FILES:
        for ref in MODULE_REF.findall(path.read_text()):
            if not resolves(ref):
                missing.add(f"{ref} (in {path.relative_to(ROOT)})")
    assert sorted(missing) == []


def resolves(dotted: str) -> bool:
    """'sd15.models.unet' (a module) or 'sd15.models.unet.UNet' / 'sd15.load' (an attribute of one)."""
    pieces = dotted.split(".")
    for cut in range(len(pieces), 0, -1):
        try:
            obj = importlib.import_module(".".join(pieces[:cut]))
        except ImportError:
            continue
        for attr in pieces[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_referenced_architecture_sections_exist():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    headings = {line.lstrip("#").strip() for line in doc.splitlines() if line.startswith("#")}
    wanted = {(ref, p.relative_to(ROOT)) for p in TEXT_FILES for ref in SECTION_REF.findall(p.read_text())}
    assert wanted, "nothing refers to a section: the pattern is wrong"
    assert sorted(str(w) for w in wanted if w[0] not in headings) == []
