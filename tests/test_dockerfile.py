"""The Dockerfile, without a Docker daemon: its build stage's wheel is built from exactly the files it copies."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def build_stage_copies(dockerfile: str) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY in the first stage, the one that builds the wheel."""
    copies: list[tuple[list[str], str]] = []
    stages = 0
    for line in dockerfile.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0].upper() == "FROM":
            stages += 1
            if stages > 1:
                break
        elif words[0].upper() == "COPY":
            assert not any(word.startswith("--from") for word in words), line  # the build stage copies from the context
            *sources, destination = [word for word in words[1:] if not word.startswith("--")]
            copies.append((sources, destination))
    return copies


def context_files() -> set[str]:
    """The build context as a clean checkout has it: the files git tracks or would track (no build leftovers)."""
    listed = subprocess.check_output(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, text=True)
    return {name for name in listed.split("\0") if name and (ROOT / name).is_file()}


def copy_like_docker(sources: list[str], destination: str, workdir: Path, files: set[str]) -> None:
    # COPY a dir DEST copies the directory's contents into DEST; files into a DEST ending in / (or with several
    # sources) keep their names. That is all this Dockerfile uses; anything else fails the test.
    into_dir = destination.endswith("/") or len(sources) > 1
    for source in sources:
        source = str(PurePosixPath(source))
        under = sorted(name for name in files if name == source or name.startswith(source + "/"))
        assert under, f"COPY {source}: not in the build context"
        for name in under:
            if name == source:
                target = workdir / destination / PurePosixPath(source).name if into_dir else workdir / destination
            else:
                target = workdir / destination / PurePosixPath(name).relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target)


def test_the_build_stage_copies_everything_the_wheel_needs(tmp_path: Path) -> None:
    """pyproject maps notifier.migrations to the top-level migrations/ folder: a build stage that copies only
    notifier/ fails in `pip wheel` ("package directory 'migrations' does not exist")."""
    copies = build_stage_copies(DOCKERFILE.read_text())
    assert copies
    workdir, wheels = tmp_path / "src", tmp_path / "wheels"
    files = context_files()
    for sources, destination in copies:
        copy_like_docker(sources, destination, workdir, files)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(workdir)]
    built = subprocess.run(build, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    [wheel] = wheels.glob("notifier-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "notifier/migrations/env.py" in names
    assert any(name.startswith("notifier/migrations/versions/0001") for name in names)
    assert "notifier/catalog/catalog.toml" in names
