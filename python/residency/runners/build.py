"""Finding a `llama-server` binary, and building one for this host when there is none.

Lookup order (:func:`find_llama_server`): the configured path, ``llama-server`` on PATH, then the
build this module made earlier. The build (:func:`build_llama_server`, ``residency build-runner``,
``scripts/build-llama-server.sh``) compiles only the ``llama-server`` target from the llama.cpp tree
vendored in the llama-cpp-python sdist (``vendor/llama.cpp``, the same llama.cpp the installed
llama-cpp-python runs), statically linked, into::

    $XDG_CACHE_HOME/residency/llama-server/<llama-cpp-python version>/bin/llama-server

It is idempotent (an existing binary is reused), and a file lock makes concurrent builds wait for
each other instead of racing. Sources and objects are removed after a successful build.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from residency.errors import ConfigError

__all__ = [
    "build_in_background",
    "build_llama_server",
    "cache_dir",
    "cached_llama_server",
    "find_llama_server",
    "main",
]

log = logging.getLogger(__name__)

#: The llama-cpp-python release whose vendored llama.cpp is built when none is installed.
DEFAULT_SDIST_VERSION = "0.3.36"
BINARY = "llama-server"


def sdist_version() -> str:
    """The llama-cpp-python version to build from: the installed one (same llama.cpp), else ours."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return DEFAULT_SDIST_VERSION


def cache_dir(version: str | None = None) -> Path:
    """Where the build for `version` lives, in residency's cache (``RESIDENCY_CACHE_DIR``)."""
    from residency.embedded import cache_dir as residency_cache

    return residency_cache() / BINARY / (version or sdist_version())


def cached_llama_server(version: str | None = None) -> Path | None:
    path = cache_dir(version) / "bin" / BINARY
    return path if path.is_file() and os.access(path, os.X_OK) else None


def find_llama_server(configured: str | None = None) -> Path | None:
    """The llama-server to run: `configured` (must exist), else PATH, else our cached build."""
    if configured:
        path = Path(configured).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            found = shutil.which(configured)
            if found is None:
                raise ConfigError(f"llama_server {configured!r} is not an executable file")
            path = Path(found)
        return path
    on_path = shutil.which(BINARY)
    if on_path:
        return Path(on_path)
    return cached_llama_server()


# ---- the build -------------------------------------------------------------------------------
Progress = Callable[[str], None]


def _print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another build of the same version: wait for it
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _find_sdist(version: str, into: Path, progress: Progress) -> Path:
    """The sdist: ``RESIDENCY_LLAMA_SDIST`` if set, else pip downloads it (source only, no deps,
    no build: seconds, unlike ``--no-binary :all:`` which compiles cmake)."""
    given = os.environ.get("RESIDENCY_LLAMA_SDIST")
    if given:
        return Path(given)
    progress(f"downloading the llama-cpp-python {version} sdist (llama.cpp's sources)")
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
            "--no-binary", "llama-cpp-python", f"llama-cpp-python=={version}",
            "-d", str(into), "--quiet",
        ],
        check=True,
    )  # fmt: skip
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise RuntimeError(f"pip downloaded no llama-cpp-python sdist into {into}")
    return found[0]


def _extract_llama_cpp(sdist: Path, dest: Path) -> None:
    """Extracts only ``*/vendor/llama.cpp/**`` into `dest`, refusing links and escaping paths."""
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) < 4 or parts[1:3] != ("vendor", "llama.cpp"):
                continue
            if not (member.isfile() or member.isdir()) or ".." in parts:
                continue
            target = dest.joinpath(*parts[3:])
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            with src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            target.chmod(0o755 if member.mode & 0o100 else 0o644)
    if not (dest / "tools" / "server").is_dir():
        raise RuntimeError(f"{sdist} carries no vendor/llama.cpp/tools/server")


def cmake_options() -> list[str]:
    """Release, this host's CPU features, CUDA when nvcc is here, nothing but the server."""
    opts = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=ON",
        "-DBUILD_SHARED_LIBS=OFF",  # one self-contained file: the cache holds only the binary
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",  # no download of web UI assets during the build
    ]
    if shutil.which("nvcc"):
        opts.append("-DGGML_CUDA=ON")
    return opts


def _run_streamed(argv: list[str], progress: Progress, log_file: Path) -> None:
    """Runs a build step, its progress lines ("[ 42%] ...") to `progress`, all output to a file."""
    with open(log_file, "a") as out:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if line.startswith(("[", "--")):
                progress(line.rstrip())
        if proc.wait() != 0:
            raise RuntimeError(f"{argv[0]} failed (rc {proc.returncode}); full log: {log_file}")


def build_llama_server(
    version: str | None = None,
    *,
    jobs: int | None = None,
    force: bool = False,
    progress: Progress = _print_progress,
) -> Path:
    """Builds llama-server into the cache (or returns the build already there)."""
    version = version or sdist_version()
    directory = cache_dir(version)
    with _locked(directory):
        binary = directory / "bin" / BINARY
        if binary.is_file() and not force:
            return binary
        if shutil.which("cmake") is None:
            raise RuntimeError("building llama-server needs cmake (pip install cmake)")
        started = time.monotonic()
        src, build = directory / "src", directory / "build"
        log_file = directory / "build.log"
        log_file.unlink(missing_ok=True)
        if not (src / "CMakeLists.txt").is_file():
            shutil.rmtree(src, ignore_errors=True)
            with tempfile.TemporaryDirectory() as tmp:
                sdist = _find_sdist(version, Path(tmp), progress)
                progress(f"extracting llama.cpp from {sdist.name}")
                _extract_llama_cpp(sdist, src)
        progress(f"building llama-server into {directory} (minutes; log: {log_file})")
        cmake = shutil.which("cmake") or "cmake"
        configure = [cmake, "-S", str(src), "-B", str(build), *cmake_options()]
        _run_streamed(configure, progress, log_file)
        n = jobs or os.cpu_count() or 1
        _run_streamed(
            [cmake, "--build", str(build), "--target", BINARY, "-j", str(n)], progress, log_file
        )
        built = build / "bin" / BINARY
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(".partial")
        shutil.copy2(built, partial)
        partial.replace(binary)  # atomic: a reader sees no binary or the whole one
        shutil.rmtree(build, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
        progress(f"built {binary} in {time.monotonic() - started:.0f} s")
        return binary


def build_in_background() -> subprocess.Popen[str] | None:
    """Starts ``python -m residency.runners.build`` for `residency serve` when "auto" found no
    llama-server: the server serves with llama-cpp-python meanwhile, and loads after the build
    finishes run llama-server. Its progress goes to the log; it stops with the server (its own
    process group, killed at exit; the next start resumes the build where it stopped)."""
    import atexit
    import threading

    from residency.runners._process import CAN_DIE_WITH_PARENT, die_with_parent

    log.warning(
        "building llama-server for this host in the background into %s (about 15-20 min on 2 "
        "cores); serving with llama-cpp-python until it is done",
        cache_dir(),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "residency", "build-runner"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        # Only prctl(PR_SET_PDEATHSIG): async-signal-safe, so safe with threads running.
        preexec_fn=die_with_parent if CAN_DIE_WITH_PARENT else None,  # noqa: PLW1509
    )

    def forward() -> None:
        assert proc.stdout is not None
        shown = -10
        for line in proc.stdout:
            pct = line[1:4].strip() if line.startswith("[") else ""
            if pct.isdigit() and int(pct) < shown + 10:
                continue  # one progress line per 10 %
            shown = int(pct) if pct.isdigit() else shown
            log.info("llama-server build: %s", line.rstrip())
        rc = proc.wait()
        if rc == 0:
            log.warning("llama-server is built: models loaded from now on run it")
        else:
            log.warning("the llama-server build failed (rc %s): staying on llama-cpp-python", rc)

    def stop() -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, 9)

    threading.Thread(target=forward, name="llama-server-build", daemon=True).start()
    atexit.register(stop)
    return proc


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "build-runner",
        help="build llama.cpp's llama-server for this host into residency's cache",
        description="Build llama-server from the llama.cpp sources in the llama-cpp-python sdist "
        "(reused when already built). Prints the binary's path.",
    )
    _arguments(parser)
    parser.set_defaults(handler=_run)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", "-j", type=int, default=None, help="parallel compile jobs")
    parser.add_argument("--force", action="store_true", help="rebuild even if already built")
    parser.add_argument("--version", default=None, help="llama-cpp-python sdist version")
    parser.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing when a llama-server is on PATH already",
    )


def _run(args: argparse.Namespace) -> int:
    if args.if_missing and not args.force:
        found = shutil.which(BINARY)
        if found:
            print(found)
            return 0
    try:
        path = build_llama_server(args.version, jobs=args.jobs, force=args.force)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as err:
        print(f"residency build-runner: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m residency.runners.build")
    _arguments(parser)
    return _run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
