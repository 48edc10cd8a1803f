"""The documentation is executable and self-contained.

- Every docstring example in the package runs (doctest, one test per module).
- Every ```python block of README.md and docs/*.md runs as written, in a fresh namespace. A block that
  cannot run on a CPU machine (needs a GPU or several processes) is preceded by a line
  ``<!-- snippet: no-run (reason) -->`` and is only compiled.
- Nothing in the repository cites a file outside it.
- The core install is lean (importing fastcl imports torch and nothing optional), and the CLI behaves.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fastcl
from fastcl import registry

ROOT = Path(__file__).resolve().parent.parent
# What `make docs` renders (the Makefile passes the same list).
API_MODULES = ("fastcl", "fastcl.augment", "fastcl.data", "fastcl.models", "fastcl.evaluation")
NO_RUN = re.compile(r"<!--\s*snippet:\s*no-run\b")


def _modules() -> list[str]:
    names = []
    for package in ("fastcl", "fastcl.kernels"):
        path = importlib.import_module(package).__path__
        names.append(package)
        names += [m.name for m in pkgutil.walk_packages(path, prefix=package + ".") if not m.name.endswith("__main__")]
    return sorted(set(names))


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    globs = {"torch": importlib.import_module("torch"), "fastcl": fastcl}
    for test in finder.find(module, name, globs=dict(globs, **vars(module))):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {name}"


def _snippets() -> list:
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```python":
                start = i + 1
                end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
                runnable = not (i > 0 and NO_RUN.search(lines[i - 1]))
                where = f"{path.relative_to(ROOT)}:{start + 1}"
                found.append(pytest.param(where, "\n".join(lines[start:end]), runnable, id=where))
                i = end
            i += 1
    return found


@pytest.mark.parametrize("where, code, runnable", _snippets())
def test_markdown_python_snippets_run(where, code, runnable, tmp_path, monkeypatch):
    compiled = compile(code, where, "exec")
    if runnable:
        monkeypatch.chdir(tmp_path)
        exec(compiled, {"__name__": "__snippet__"})


# Written so that this line does not match itself.
_OUTSIDE = re.compile(r"(SPEC|PAPERS)\.md|SPEC\s§|\.\./shared|shared/(SPEC|PAPERS)")


def test_nothing_cites_a_file_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    offenders = []
    for name in tracked.stdout.split():
        path = ROOT / name
        if path.suffix in {".png", ".json", ".so"} or not path.is_file():
            continue
        for number, text in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if _OUTSIDE.search(text):
                offenders.append(f"{name}:{number}: {text.strip()[:100]}")
    assert not offenders, "references to files outside the repository:\n" + "\n".join(offenders)


def test_importing_fastcl_loads_no_extra():
    # torch itself may import numpy, tqdm or triton (torch._dynamo) when they are installed; what fastcl
    # adds must be none of the extras' packages and none of the modules that need them.
    extras = (
        "kornia",
        "sklearn",
        "matplotlib",
        "PIL",
        "fastcl.kernels",
        "fastcl.augment",
        "fastcl.profiler",
        "fastcl.train",
        "fastcl.data",
    )
    code = (
        "import sys, fastcl, torch; "
        "fastcl.functional.nt_xent(torch.randn(4, 8), torch.randn(4, 8)); "
        f"print(sorted(m for m in {extras!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_core_dependencies_are_torch_only():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]] == ["torch"]


def test_missing_extra_names_it(monkeypatch):
    from fastcl._extras import require

    monkeypatch.setitem(sys.modules, "kornia", None)  # makes `import kornia` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'fastcl\[augment\]'"):
        require("kornia", "augment", "fastcl.augment")


@pytest.mark.parametrize(
    "argv, code, stream, text",
    [
        ([], 2, "stderr", "usage: fastcl"),
        (["--help"], 0, "stdout", "usage: fastcl"),
        (["nonsense"], 2, "stderr", "unknown command 'nonsense'"),
        (["--version"], 0, "stdout", f"fastcl {fastcl.__version__}"),
    ],
)
def test_cli_entry_point(argv, code, stream, text):
    result = subprocess.run([sys.executable, "-m", "fastcl", *argv], capture_output=True, text=True)
    assert result.returncode == code
    assert text in getattr(result, stream)


def test_api_reference_renders_from_docstrings(tmp_path):
    pytest.importorskip("pdoc")
    env = dict(__import__("os").environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pdoc", "-o", str(tmp_path), *API_MODULES],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    functional = (tmp_path / "fastcl" / "functional.html").read_text()
    for documented in ("nt_xent", "info_nce", "supcon", "sub_dim", "normalize", "distributed", "check_finite"):
        assert documented in functional, documented
    package = (tmp_path / "fastcl.html").read_text()  # the modules are documented where __all__ exports them
    for documented in ("NTXentLoss", "InfoNCELoss", "SupConLoss", "DirectCLRLoss", "available_backends"):
        assert documented in package, documented
    assert (tmp_path / "fastcl" / "compat.html").is_file() and (tmp_path / "fastcl" / "augment.html").is_file()


def test_every_subpackage_is_in_the_wheel():
    import tomllib

    packaged = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fastcl").glob("**/__init__.py")}
    on_disk |= {"fastcl.kernels", "fastcl.csrc"}  # mapped from kernels/ and csrc/ (package-dir)
    assert on_disk <= packaged, f"subpackages missing from pyproject's packages list: {sorted(on_disk - packaged)}"


_PUBLIC = (
    "fastcl",
    "fastcl.functional",
    "fastcl.augment",
    "fastcl.registry",
    "fastcl.compat.supcontrast",
    "fastcl.compat.open_clip",
    "fastcl.compat.lightly",
    "fastcl.compat.pml",
    "fastcl.compat.solo_learn",
    "fastcl.compat.inf_cl",
    "fastcl.compat.directclr",
)


def _public_callables():
    import inspect

    found = []
    for name in _PUBLIC:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", [a for a in vars(module) if not a.startswith("_")]):
            obj = getattr(module, attr)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__.startswith("fastcl"):
                found.append(pytest.param(obj, id=f"{name}.{attr}"))
    return found


@pytest.mark.parametrize("obj", _public_callables())
def test_public_api_docstrings_document_arguments_and_show_an_example(obj):
    import inspect

    doc = inspect.getdoc(obj) or ""
    takes_arguments = any(p.name != "self" for p in inspect.signature(obj).parameters.values())
    if takes_arguments:
        assert any(h in doc for h in ("Args:", "Attributes:")), f"{obj.__qualname__}: no Args/Attributes section"
    assert "Example" in doc, f"{obj.__qualname__}: no Example section"


# ---- the README as a front page, and links that resolve wherever the repository is shown ------------------

README_MAX_LINES = 130  # issue 25: the README is a front page; the rest lives under docs/
_LINK = re.compile(r"(?<!\\)!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_SPAN = re.compile(r"`[^`\n]*`")


def _markdown_files() -> list[Path]:
    command = ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"]  # not the ignored ones
    tracked = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        return [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
    return sorted({ROOT / name for name in tracked.stdout.split()} | {ROOT / "README.md", ROOT / "docs/README.md"})


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file (lower case, punctuation dropped, spaces to
    hyphens, -1, -2, ... for repeats)."""
    seen: dict[str, int] = {}
    anchors = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        if in_code or not re.match(r"#{1,6} ", line):
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", line.lstrip("#").strip()).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(path: Path) -> list[tuple[int, str]]:
    found, in_code = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_code = not in_code
        if not in_code:
            found += [(number, target) for target in _LINK.findall(_CODE_SPAN.sub("", line))]
    return found


def test_every_relative_link_in_the_markdown_resolves():
    broken = []
    for path in _markdown_files():
        for number, target in _links(path):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            where = f"{path.relative_to(ROOT)}:{number}: {target}"
            file_part, _, anchor = target.partition("#")
            if file_part.startswith("/"):
                broken.append(f"{where} (absolute path: breaks on the repository's page)")
                continue
            resolved = (path.parent / file_part).resolve() if file_part else path
            if ROOT not in resolved.parents and resolved != ROOT:
                broken.append(f"{where} (outside the repository)")
            elif not resolved.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{where} (no heading with that anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    top = "\n".join(text.splitlines()[:15])
    assert "nothing in fastcl has run on a GPU yet" in top  # the status is on the first screen
    for loss in ("InfoNCE", "NT-Xent", "SupCon", "DCL", "SigLIP"):
        assert loss in top, loss
    commands = re.findall(r"^make (\w[\w-]*)", text, flags=re.M)
    assert commands == ["demo", "test"], commands  # exactly the two set-up commands
    install = text[text.index("## Install") :]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in install
    assert re.search(r"^pip install \.\s", install, re.M)  # from a clone, not from a registry
    assert "[docs/README.md](docs/README.md)" in text


# ---- packaging ----------------------------------------------------------------------------------------------


def test_license_is_the_verbatim_apache_2_text():
    import hashlib

    # The MD5 of the Apache Software Foundation's LICENSE-2.0.txt, as most projects ship it unmodified.
    assert hashlib.md5((ROOT / "LICENSE").read_bytes()).hexdigest() == "3b83ef96387f14655fc854ddc3c6bd57"


def test_package_metadata_says_what_is_true():
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, setuptools = pyproject["project"], pyproject["tool"]["setuptools"]
    assert project["version"] == fastcl.__version__
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "urls" not in project  # no public repository or documentation site exists yet: no invented URL
    assert "py.typed" in setuptools["package-data"]["fastcl"] and (ROOT / "fastcl" / "py.typed").is_file()
    assert {"build", "twine"} <= {re.split(r"[<>=;\[ ]", d)[0] for d in project["optional-dependencies"]["dev"]}
    pins = (ROOT / "constraints" / "test.txt").read_text()
    assert re.search(r"^build==", pins, re.M) and re.search(r"^twine==", pins, re.M)
    assert re.search(rf"^version: {re.escape(fastcl.__version__)}$", (ROOT / "CITATION.cff").read_text(), re.M)
    assert f"## {fastcl.__version__}" in (ROOT / "CHANGELOG.md").read_text()
    manifest = (ROOT / "MANIFEST.in").read_text().splitlines()
    assert "prune tests" in manifest and any(line.startswith("include LICENSE") for line in manifest)


def test_ci_runs_the_package_check():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make package-check" in ci
    assert "package-check:" in (ROOT / "Makefile").read_text()


# --- each formula written once: docs/spec.md's sections, named by the registry, linked by the docstrings ---

_SPEC_HEADINGS = [
    line.lstrip("#").strip() for line in (ROOT / "docs" / "spec.md").read_text().splitlines() if line.startswith("##")
]
_SPEC_CITATION = re.compile(r'docs/spec\.md,\s+"([^"]+)"')


def test_every_spec_citation_in_the_code_names_a_section():
    """``docs/spec.md, "Name"`` in a docstring or comment resolves to a heading that begins with Name."""
    cited = {}
    for path in sorted((ROOT / "fastcl").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py")):
        for name in _SPEC_CITATION.findall(path.read_text()):
            cited.setdefault(name, path.relative_to(ROOT))
    assert cited, "no citation found: the pattern no longer matches how the docstrings cite docs/spec.md"
    dangling = {name: str(at) for name, at in cited.items() if not any(h.startswith(name) for h in _SPEC_HEADINGS)}
    assert not dangling, f"citations of docs/spec.md sections that do not exist: {dangling}"


@pytest.mark.parametrize("name", list(registry.LOSSES))
def test_each_loss_docstring_names_its_registry_formula(name):
    """The registry names the one spec section that defines a loss; that section names the loss's module and
    functional, the module's docstring links it, and the functional's docstring begins with its name."""
    entry = registry.get(name)
    sections = [h for h in _SPEC_HEADINGS if h.startswith(entry.formula)]
    assert len(sections) == 1, (entry.formula, sections)
    assert f"`{entry.module.__name__}`" in sections[0] and f"`functional.{name}`" in sections[0], sections[0]
    assert entry.formula in _SPEC_CITATION.findall(entry.module.__doc__), entry.module.__name__
    assert entry.formula in entry.functional.__doc__.splitlines()[0], entry.functional.__doc__.splitlines()[0]
