"""Consistency checks for the Slicer extension metadata and packaging files.

These tests need only the standard library and pytest. They check that:

* the extension metadata in the top-level CMakeLists.txt agrees with the
  ExtensionsIndex description files BrainUNet.s4ext and BrainUNet.json;
* BrainUNet.json only uses keys allowed by the catalog entry schema;
* the extension and module icons exist and are 128x128 PNG files;
* every file that BrainUNetSegmentation/CMakeLists.txt lists (or globs) for
  the scripted module exists, and every Python file of the ``brainunet``
  package is installed.

The CMake files are read with a small interpreter that understands only the
commands used here (set, file(GLOB/GLOB_RECURSE), list(SORT/FILTER/APPEND)).
If the CMake files start using something else, extend the interpreter rather
than weakening the checks.
"""

from __future__ import annotations

import fnmatch
import json
import re
import struct
from pathlib import Path
from urllib.parse import urlparse

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EXTENSION_NAME = "BrainUNet"
MODULE_NAME = "BrainUNetSegmentation"
MODULE_DIR = REPO_ROOT / MODULE_NAME

TOP_CMAKE = REPO_ROOT / "CMakeLists.txt"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
S4EXT = REPO_ROOT / f"{EXTENSION_NAME}.s4ext"
CATALOG_JSON = REPO_ROOT / f"{EXTENSION_NAME}.json"

EXTENSION_ICON = REPO_ROOT / "Resources" / f"{EXTENSION_NAME}.png"
MODULE_ICON = MODULE_DIR / "Resources" / "Icons" / f"{MODULE_NAME}.png"
ICON_SIZE = (128, 128)

CATALOG_SCHEMA_URL = (
    "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
    "slicer-extension-catalog-entry-schema-v1.0.1.json"
)
# Properties of slicer-extension-catalog-entry-schema-v1.0.1.json
# ("additionalProperties": false there).
CATALOG_ALLOWED_KEYS = {
    "$schema",
    "category",
    "scm_url",
    "scm_revision",
    "scm_type",
    "build_dependencies",
    "build_subdirectory",
    "enabled",
    "tier",
}
CATALOG_REQUIRED_KEYS = {"$schema", "category", "scm_url"}


# ---------------------------------------------------------------------------
# Minimal CMake reader
# ---------------------------------------------------------------------------

_CMAKE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", ";": "\\;"}


def _cmake_commands(text: str) -> list[tuple[str, list[tuple[str, bool]]]]:
    """Split CMake source into (command, [(argument, quoted), ...]).

    Handles line comments, quoted arguments with escapes and nested
    parentheses in unquoted arguments (e.g. ``if((A) AND B)``).
    """
    commands = []
    i, n = 0, len(text)
    ident = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
    while i < n:
        c = text[i]
        if c == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        if c.isspace():
            i += 1
            continue
        m = ident.match(text, i)
        if not m:
            raise ValueError(f"unexpected character {c!r} at offset {i}")
        name = m.group(0).lower()
        i = m.end()
        while i < n and text[i] in " \t":
            i += 1
        if i >= n or text[i] != "(":
            raise ValueError(f"expected '(' after {name!r} at offset {i}")
        i += 1
        args: list[tuple[str, bool]] = []
        depth = 0
        while True:
            if i >= n:
                raise ValueError(f"unterminated command {name!r}")
            c = text[i]
            if c.isspace():
                i += 1
            elif c == "#":
                while i < n and text[i] != "\n":
                    i += 1
            elif c == '"':
                i += 1
                buf = []
                while True:
                    if i >= n:
                        raise ValueError("unterminated quoted argument")
                    c = text[i]
                    if c == "\\" and i + 1 < n:
                        nxt = text[i + 1]
                        if nxt == "\n":  # line continuation
                            pass
                        else:
                            buf.append(_CMAKE_ESCAPES.get(nxt, nxt))
                        i += 2
                    elif c == '"':
                        i += 1
                        break
                    else:
                        buf.append(c)
                        i += 1
                args.append(("".join(buf), True))
            elif c == "(":
                depth += 1
                i += 1
            elif c == ")":
                i += 1
                if depth == 0:
                    break
                depth -= 1
            else:
                start = i
                while i < n and not text[i].isspace() and text[i] not in '()#"':
                    i += 1
                args.append((text[start:i], False))
        commands.append((name, args))
    return commands


class CMakeScope:
    """Evaluates the handful of CMake commands used by the extension."""

    def __init__(self, source_dir: Path):
        self.source_dir = source_dir
        self.vars: dict[str, list[str]] = {
            "CMAKE_CURRENT_SOURCE_DIR": [source_dir.as_posix()],
            "CMAKE_SOURCE_DIR": [REPO_ROOT.as_posix()],
        }
        self.commands: list[tuple[str, list[str]]] = []

    def _expand(self, arg: str, quoted: bool) -> list[str]:
        def repl(m: re.Match) -> str:
            return ";".join(self.vars.get(m.group(1), []))

        value = arg
        # Expand innermost references first, repeatedly.
        while True:
            new = re.sub(r"\$\{([A-Za-z0-9_]+)\}", repl, value)
            if new == value:
                break
            value = new
        if quoted:
            return [value]
        return [item for item in value.split(";") if item != ""]

    def run(self, path: Path) -> "CMakeScope":
        for name, raw_args in _cmake_commands(path.read_text(encoding="utf-8")):
            args: list[str] = []
            for arg, quoted in raw_args:
                args.extend(self._expand(arg, quoted))
            self.commands.append((name, args))
            handler = getattr(self, f"_cmd_{name}", None)
            if handler is not None:
                handler(args)
        return self

    def _cmd_set(self, args: list[str]) -> None:
        var, values = args[0], args[1:]
        if "PARENT_SCOPE" in values:
            values = values[: values.index("PARENT_SCOPE")]
        if "CACHE" in values:
            values = values[: values.index("CACHE")]
        self.vars[var] = values

    def _cmd_file(self, args: list[str]) -> None:
        mode = args[0]
        if mode not in ("GLOB", "GLOB_RECURSE"):
            return
        var = args[1]
        rest = args[2:]
        relative = None
        patterns = []
        i = 0
        while i < len(rest):
            a = rest[i]
            if a == "RELATIVE":
                relative = Path(rest[i + 1])
                i += 2
            elif a == "LIST_DIRECTORIES":
                i += 2
            elif a in ("CONFIGURE_DEPENDS", "FOLLOW_SYMLINKS"):
                i += 1
            else:
                patterns.append(a)
                i += 1
        found: list[str] = []
        for pattern in patterns:
            pat = Path(pattern)
            if not pat.is_absolute():
                pat = self.source_dir / pat
            base, name_pattern = pat.parent, pat.name
            if any(ch in str(base) for ch in "*?["):
                raise NotImplementedError(f"wildcards in directory part: {pattern}")
            if not base.is_dir():
                continue
            candidates = base.rglob("*") if mode == "GLOB_RECURSE" else base.glob("*")
            for f in candidates:
                if f.is_file() and fnmatch.fnmatchcase(f.name, name_pattern):
                    found.append(
                        f.relative_to(relative).as_posix() if relative else f.as_posix()
                    )
        self.vars[var] = sorted(set(found))

    def _cmd_list(self, args: list[str]) -> None:
        op, var = args[0], args[1]
        items = self.vars.get(var, [])
        if op == "SORT":
            self.vars[var] = sorted(items)
        elif op == "APPEND":
            self.vars[var] = items + args[2:]
        elif op == "FILTER":
            mode, kind, regex = args[2], args[3], args[4]
            assert kind == "REGEX", args
            rx = re.compile(regex)
            keep = mode == "INCLUDE"
            self.vars[var] = [x for x in items if bool(rx.search(x)) == keep]
        elif op in ("LENGTH", "GET", "FIND"):
            pass
        else:
            raise NotImplementedError(f"list({op}) is not understood by this test")

    def calls(self, name: str) -> list[list[str]]:
        return [args for cmd, args in self.commands if cmd == name]


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def top() -> CMakeScope:
    return CMakeScope(REPO_ROOT).run(TOP_CMAKE)


@pytest.fixture(scope="module")
def ext(top: CMakeScope) -> dict[str, list[str]]:
    """EXTENSION_* variables of the top-level CMakeLists.txt."""
    values = {k: v for k, v in top.vars.items() if k.startswith("EXTENSION_")}
    for key in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        "EXTENSION_DEPENDS",
    ):
        assert values.get(key), f"{key} is not set in CMakeLists.txt"
    return values


@pytest.fixture(scope="module")
def s4ext() -> dict[str, str]:
    entries: dict[str, str] = {}
    for line in S4EXT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        assert key not in entries, f"duplicate key {key!r} in {S4EXT.name}"
        entries[key] = value.strip()
    return entries


@pytest.fixture(scope="module")
def catalog() -> dict:
    return json.loads(CATALOG_JSON.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def module() -> CMakeScope:
    return CMakeScope(MODULE_DIR).run(MODULE_CMAKE)


def _depends(values: list[str]) -> list[str]:
    return [] if values == ["NA"] else values


def _strip_git(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len(".git")] if url.endswith(".git") else url


def _github_owner_repo(url: str) -> str:
    parsed = urlparse(_strip_git(url))
    assert parsed.scheme == "https" and parsed.netloc == "github.com", url
    parts = parsed.path.strip("/").split("/")
    assert len(parts) == 2, f"not a GitHub repository URL: {url}"
    return "/".join(parts)


def _raw_url_to_repo_path(url: str, owner_repo: str, revision: str) -> Path:
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/{revision}/"
    assert url.startswith(prefix), f"{url} does not start with {prefix}"
    return REPO_ROOT / url[len(prefix):]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:33]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    length, chunk_type = struct.unpack(">I4s", data[8:16])
    assert chunk_type == b"IHDR" and length == 13, f"{path}: first chunk is not IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# ---------------------------------------------------------------------------
# Top-level CMakeLists.txt
# ---------------------------------------------------------------------------


def test_top_level_cmake_structure(top: CMakeScope) -> None:
    assert top.calls("project") and top.calls("project")[0][0] == EXTENSION_NAME
    assert any(args[:1] == ["Slicer"] for args in top.calls("find_package"))
    # ${Slicer_*} are not defined outside a Slicer build, so the expanded
    # include() arguments are empty; check the raw text instead.
    text = TOP_CMAKE.read_text(encoding="utf-8")
    for var in ("Slicer_USE_FILE", "Slicer_EXTENSION_GENERATE_CONFIG", "Slicer_EXTENSION_CPACK"):
        assert re.search(r"include\(\s*\$\{" + var + r"\}\s*\)", text), f"missing include(${{{var}}})"
    subdirs = [args[0] for args in top.calls("add_subdirectory")]
    assert MODULE_NAME in subdirs
    for sub in subdirs:
        assert (REPO_ROOT / sub / "CMakeLists.txt").is_file(), f"{sub}/CMakeLists.txt missing"


def test_cmake_metadata_values(ext: dict[str, list[str]]) -> None:
    assert ext["EXTENSION_CATEGORY"] == ["Segmentation"]
    assert _depends(ext["EXTENSION_DEPENDS"]) == ["PyTorch"]
    assert len(ext["EXTENSION_DESCRIPTION"]) == 1
    description = ext["EXTENSION_DESCRIPTION"][0]
    assert description.endswith("."), "description should be one full sentence"
    assert "\n" not in description


# ---------------------------------------------------------------------------
# BrainUNet.s4ext
# ---------------------------------------------------------------------------


def test_s4ext_has_required_keys(s4ext: dict[str, str]) -> None:
    required = {
        "scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage",
        "contributors", "category", "iconurl", "status", "description",
        "screenshoturls", "enabled",
    }
    missing = required - s4ext.keys()
    assert not missing, f"{S4EXT.name} lacks {sorted(missing)}"
    assert s4ext["scm"] == "git"
    assert s4ext["build_subdirectory"] == "."
    assert s4ext["enabled"] in ("0", "1")


def test_s4ext_matches_cmake(s4ext: dict[str, str], ext: dict[str, list[str]]) -> None:
    assert s4ext["homepage"] == ext["EXTENSION_HOMEPAGE"][0]
    assert s4ext["category"] == ext["EXTENSION_CATEGORY"][0]
    assert s4ext["description"] == ext["EXTENSION_DESCRIPTION"][0]
    assert s4ext["contributors"] == ", ".join(ext["EXTENSION_CONTRIBUTORS"])
    assert s4ext["iconurl"] == ext["EXTENSION_ICONURL"][0]
    assert s4ext["screenshoturls"].split() == ext["EXTENSION_SCREENSHOTURLS"]
    assert _depends(s4ext["depends"].split()) == _depends(ext["EXTENSION_DEPENDS"])


def test_scm_url_matches_homepage(s4ext: dict[str, str], ext: dict[str, list[str]]) -> None:
    assert _strip_git(s4ext["scmurl"]) == _strip_git(ext["EXTENSION_HOMEPAGE"][0])


# ---------------------------------------------------------------------------
# BrainUNet.json (ExtensionsIndex catalog entry)
# ---------------------------------------------------------------------------


def test_catalog_json_follows_schema(catalog: dict) -> None:
    assert catalog["$schema"].rstrip("#") == CATALOG_SCHEMA_URL
    assert CATALOG_REQUIRED_KEYS <= catalog.keys()
    extra = catalog.keys() - CATALOG_ALLOWED_KEYS
    assert not extra, f"keys not allowed by the catalog schema: {sorted(extra)}"
    assert isinstance(catalog["build_dependencies"], list)
    assert all(isinstance(d, str) for d in catalog["build_dependencies"])
    assert catalog.get("tier", 5) in (1, 3, 5)
    assert catalog.get("scm_type", "git") in ("git", "local")
    assert isinstance(catalog.get("enabled", True), bool)


def test_catalog_json_matches_cmake_and_s4ext(
    catalog: dict, s4ext: dict[str, str], ext: dict[str, list[str]]
) -> None:
    assert catalog["category"] == ext["EXTENSION_CATEGORY"][0] == s4ext["category"]
    assert catalog["build_dependencies"] == _depends(ext["EXTENSION_DEPENDS"])
    assert catalog["build_dependencies"] == _depends(s4ext["depends"].split())
    assert catalog["scm_url"] == s4ext["scmurl"]
    assert _strip_git(catalog["scm_url"]) == _strip_git(ext["EXTENSION_HOMEPAGE"][0])
    assert catalog.get("scm_revision") == s4ext["scmrevision"]
    assert catalog.get("build_subdirectory", ".") == s4ext["build_subdirectory"]
    assert catalog.get("enabled", True) == (s4ext["enabled"] == "1")


# ---------------------------------------------------------------------------
# Icons and screenshot URLs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("icon", [EXTENSION_ICON, MODULE_ICON], ids=lambda p: p.name)
def test_icon_is_128_png(icon: Path) -> None:
    assert icon.is_file(), f"{icon.relative_to(REPO_ROOT)} is missing"
    assert _png_size(icon) == ICON_SIZE


def test_icon_url_points_to_extension_icon(ext: dict[str, list[str]], s4ext: dict[str, str]) -> None:
    owner_repo = _github_owner_repo(ext["EXTENSION_HOMEPAGE"][0])
    path = _raw_url_to_repo_path(ext["EXTENSION_ICONURL"][0], owner_repo, s4ext["scmrevision"])
    assert path == EXTENSION_ICON
    assert _png_size(path) == ICON_SIZE


def test_screenshot_urls_point_into_repository(ext: dict[str, list[str]], s4ext: dict[str, str]) -> None:
    owner_repo = _github_owner_repo(ext["EXTENSION_HOMEPAGE"][0])
    for url in ext["EXTENSION_SCREENSHOTURLS"]:
        path = _raw_url_to_repo_path(url, owner_repo, s4ext["scmrevision"])
        assert path.suffix.lower() == ".png" and path.is_file(), path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"


# ---------------------------------------------------------------------------
# Module CMakeLists.txt
# ---------------------------------------------------------------------------


def test_module_cmake_builds_scripted_module(module: CMakeScope) -> None:
    assert module.vars.get("MODULE_NAME") == [MODULE_NAME]
    builds = module.calls("slicermacrobuildscriptedmodule")
    assert len(builds) == 1
    args = builds[0]
    assert args[args.index("NAME") + 1] == MODULE_NAME
    assert "SCRIPTS" in args and "RESOURCES" in args


def test_module_cmake_registers_python_unittest() -> None:
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    assert re.search(
        r"if\s*\(\s*BUILD_TESTING\s*\)\s*(#[^\n]*\n\s*)*"
        r"slicer_add_python_unittest\s*\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)\s*"
        r"endif\s*\(",
        text,
    ), "missing if(BUILD_TESTING) slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py) endif()"


def test_module_references_main_script_and_ui(module: CMakeScope) -> None:
    scripts = module.vars.get("MODULE_PYTHON_SCRIPTS", [])
    resources = module.vars.get("MODULE_PYTHON_RESOURCES", [])
    assert f"{MODULE_NAME}.py" in scripts
    assert f"Resources/UI/{MODULE_NAME}.ui" in resources
    assert f"Resources/Icons/{MODULE_NAME}.png" in resources


def test_module_listed_files_exist(module: CMakeScope) -> None:
    listed = module.vars.get("MODULE_PYTHON_SCRIPTS", []) + module.vars.get(
        "MODULE_PYTHON_RESOURCES", []
    )
    assert listed
    missing = [f for f in listed if not (MODULE_DIR / f).is_file()]
    assert not missing, f"files listed in {MODULE_NAME}/CMakeLists.txt do not exist: {missing}"
    assert len(listed) == len(set(listed)), "a file is listed twice"


def _package_files(subdir: str, suffixes: tuple[str, ...] | None, exclude_py: bool) -> list[str]:
    base = MODULE_DIR / subdir
    if not base.is_dir():
        return []
    out = []
    for f in base.rglob("*"):
        if not f.is_file() or "__pycache__" in f.parts:
            continue
        if exclude_py and f.suffix in (".py", ".pyc"):
            continue
        if suffixes is not None and f.suffix not in suffixes:
            continue
        out.append(f.relative_to(MODULE_DIR).as_posix())
    return sorted(out)


def test_every_package_python_file_is_installed(module: CMakeScope) -> None:
    scripts = set(module.vars.get("MODULE_PYTHON_SCRIPTS", []))
    expected = _package_files("brainunet", (".py",), exclude_py=False)
    assert expected, "no Python files found under brainunet/"
    missing = [f for f in expected if f not in scripts]
    assert not missing, f"brainunet Python files not in MODULE_PYTHON_SCRIPTS: {missing}"


def test_model_and_terminology_resources_are_installed(module: CMakeScope) -> None:
    resources = set(module.vars.get("MODULE_PYTHON_RESOURCES", []))
    models = _package_files("brainunet/models", None, exclude_py=True)
    terminology = _package_files("Resources/Terminology", None, exclude_py=False)
    assert "brainunet/models/registry.json" in models and any(f.endswith(".pt") for f in models), models
    assert terminology, "no terminology file under Resources/Terminology"
    missing = [f for f in models + terminology if f not in resources]
    assert not missing, f"resource files not in MODULE_PYTHON_RESOURCES: {missing}"
