"""`make package-check`: build the sdist and the wheel as a user would, check them, install the wheel into a
clean virtual environment and use it.

1. ``python -m build``: the sdist, then the wheel built from the unpacked sdist (so the sdist alone builds);
2. ``twine check --strict`` on both (metadata, the README renders as the long description);
3. contents: LICENSE in both, ``fastcl/py.typed`` and the Triton kernels in the wheel, no tests in the sdist;
4. a fresh venv with only the torch build named by ``--torch`` (installed first, as the README says), then
   the README's ``pip install .`` from the checkout (core, no extra) and every ```python block of README.md
   as written, run from outside the checkout;
5. the wheel installed over it in the same venv: import, one loss call with its gradient, the lazy
   submodules and the ``fastcl`` entry point.

Usage: python .ci/package_check.py [--torch 'torch==2.13.0'] [--keep]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "dist"

USE = """
import subprocess, sys, torch, fastcl
z1 = torch.randn(32, 16, requires_grad=True)
loss = fastcl.NTXentLoss(temperature=0.5)(z1, torch.randn(32, 16))
loss.backward()
loss = loss.detach()
assert loss.ndim == 0 and torch.isfinite(loss) and z1.grad.abs().sum() > 0, loss
assert 'nt_xent' in fastcl.registry.LOSSES and fastcl.torch_backend.chunk_size
assert fastcl.__file__.startswith(sys.prefix), fastcl.__file__  # the installed wheel, not the checkout
print('fastcl', fastcl.__version__, 'from', fastcl.__file__, 'loss', round(loss.item(), 4))
"""


def readme_examples() -> list[str]:
    """The ```python blocks of README.md (all of them must run on the core install)."""
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def run(*command: str, cwd: Path = ROOT) -> None:
    shown = [c if "\n" not in c else repr(c.strip().splitlines()[0] + " ...") for c in command]
    print("+", " ".join(shown), flush=True)
    subprocess.run(command, cwd=cwd, check=True)


def check_contents(sdist: Path, wheel: Path) -> None:
    with tarfile.open(sdist) as archive:
        sdist_names = [name.split("/", 1)[1] for name in archive.getnames() if "/" in name]
    with zipfile.ZipFile(wheel) as archive:
        wheel_names = archive.namelist()
    problems = []
    if "LICENSE" not in sdist_names:
        problems.append("sdist: no LICENSE")
    if not any(name.endswith(".dist-info/licenses/LICENSE") for name in wheel_names):
        problems.append("wheel: no LICENSE in its .dist-info/licenses/")
    for needed in ("fastcl/py.typed", "fastcl/kernels/block.py", "fastcl/csrc/block_kernels.cu"):
        if needed not in wheel_names:
            problems.append(f"wheel: no {needed}")
    shipped_tests = [name for name in sdist_names if name.startswith("tests/")]
    if shipped_tests:
        problems.append(f"sdist: ships {len(shipped_tests)} test files (MANIFEST.in prunes tests/)")
    if any(name.startswith("tests/") for name in wheel_names):
        problems.append("wheel: ships tests/")
    if problems:
        sys.exit("package-check failed:\n  " + "\n  ".join(problems))
    print(f"contents: {sdist.name} ({len(sdist_names)} files), {wheel.name} ({len(wheel_names)} files) as expected")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--torch", default="torch==2.13.0", help="the torch requirement the clean venv installs first")
    parser.add_argument("--keep", action="store_true", help="keep the clean venv (printed) for inspection")
    args = parser.parse_args()
    start = time.monotonic()
    shutil.rmtree(DIST, ignore_errors=True)
    run(sys.executable, "-m", "build", "--outdir", str(DIST), str(ROOT))
    (sdist,), (wheel,) = DIST.glob("*.tar.gz"), DIST.glob("*.whl")
    run(sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel))
    check_contents(sdist, wheel)

    scratch = Path(tempfile.mkdtemp(prefix="fastcl-package-check-"))
    try:
        venv = scratch / "venv"
        run(sys.executable, "-m", "venv", str(venv))
        python = str(venv / "bin" / "python")
        run(python, "-m", "pip", "install", "-q", args.torch)  # first, so fastcl's torch requirement is satisfied
        run(python, "-m", "pip", "install", "-q", str(ROOT))  # the README's `pip install .` from a clone
        examples = readme_examples()
        for number, code in enumerate(examples, 1):
            print(f"README.md python block {number} of {len(examples)}:", flush=True)
            run(python, "-c", code, cwd=scratch)
        run(python, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", str(wheel))
        run(python, "-c", USE, cwd=scratch)
        run(str(venv / "bin" / "fastcl"), "--version", cwd=scratch)
        installed = sum(f.stat().st_size for f in venv.glob("lib/python*/site-packages/fastcl/**/*") if f.is_file())
        print(f"wheel {wheel.stat().st_size / 1e3:.0f} kB, installed package {installed / 1e6:.1f} MB")
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"package-check passed in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
