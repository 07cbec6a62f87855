"""The wheel folder for a GPU node that has torch but no network (`make gpu-wheels WHEELS=dir`).

    python -m bnonly_dist.perf.wheels DIR [--python-version 3.11] [--split-mib 60]

Downloads exactly the pins of requirements/gpu-wheels.txt as binary wheels for the node's
Python and platform (`pip download --no-deps`: torch, numpy and the rest of a torch
installation are the node's), builds DeepSpeed's pure-Python wheel from its source archive,
then checks the folder: every wheel's requirements are met inside the folder or by what a
torch node has (NODE_HAS), the folder installs offline into an empty --target, and every
module of every wheel imports from there. Prints the size, and with --split-mib cuts a tar of
the folder into parts of that size and prints the command that joins them. The check and the
GPU check's install (gpu_check.py) share this module, which imports only the standard library.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parents[2] / "requirements" / "gpu-wheels.txt"
SOURCE_ONLY = ("deepspeed",)  # published as a source archive: built into a wheel here
# Projects a node with torch, torchvision, tensorboard, numpy, PyYAML, tqdm and matplotlib
# already has (torch's own dependencies included); a requirement on one of them is the node's.
NODE_HAS = {"torch", "torchvision", "numpy", "pyyaml", "tqdm", "tensorboard", "matplotlib", "pillow", "filelock",
            "sympy", "networkx", "jinja2", "fsspec", "setuptools", "triton", "pip"}


IMPORT_LIMIT_S = 120  # importing every module of the folder (DeepSpeed's import alone takes seconds)
NAMESPACES = {"nvidia"}  # shared by NVIDIA's wheels (some ship an __init__.py in it): check what is inside


def project(path: Path) -> str:
    """The distribution name of a wheel file, normalised (PEP 503)."""
    return normalise(path.name.split("-")[0])


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:4])


def wheel_tags(path: Path) -> set[str]:
    """The tags a wheel file name declares ("cp312-cp312-manylinux_2_28_x86_64"; the dotted
    short forms expanded), from its last three fields (PEP 427)."""
    python, abi, platforms = path.name[:-len(".whl")].split("-")[-3:]
    return {f"{p}-{a}-{plat}" for p in python.split(".") for a in abi.split(".") for plat in platforms.split(".")}


def this_pythons_tags() -> set[str] | None:
    """The tags this interpreter installs, by packaging (or the copy pip carries); None without either."""
    try:
        from packaging.tags import sys_tags
    except ImportError:
        try:
            from pip._vendor.packaging.tags import sys_tags
        except ImportError:
            return None
    return {str(tag) for tag in sys_tags()}


def _fits_here_roughly(tag: str) -> bool:
    """Without packaging: this CPython's own tags, pure Python and the stable ABI, any Linux on this machine."""
    import platform
    python, abi, plat = tag.split("-")
    major, minor = sys.version_info[:2]
    own = f"cp{major}{minor}"
    return (python in (own, f"py{major}{minor}", f"py{major}") or (python.startswith("cp3") and abi == "abi3"
            and int(python[3:] or 0) <= minor)) and abi in (own, "abi3", "none") and (
        plat == "any" or (plat.endswith("_" + platform.machine()) and plat.startswith(("linux", "manylinux"))))


def not_for_this_python(folder: Path) -> list[str]:
    """The wheels of the folder this Python cannot install (built for another Python or platform)."""
    tags = this_pythons_tags()
    fits = (lambda tag: tag in tags) if tags is not None else _fits_here_roughly
    return [p.name for p in sorted(folder.glob("*.whl")) if not any(fits(t) for t in wheel_tags(p))]


def pythons_of(names) -> list[str]:
    """The CPython versions (3.X) the wheel names are built for, from their cpXY-cpXY tags (abi3 and
    pure-Python wheels serve many)."""
    found = {m for name in names for m in re.findall(r"-cp3(\d+)-cp3\1[a-z]*-", name)}
    return [f"3.{minor}" for minor in sorted(found, key=int)]


def installed(name: str, version: str | None = None) -> bool:
    """Whether the project is installed here (at that version or a newer one, if given: a wheel
    never shadows a newer installed copy, but replaces an older one, e.g. the typing-extensions
    an older torch brought, older than pydantic needs)."""
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return version is None or _release(have) >= _release(version)


def _wheel_text(path: Path, suffix: str) -> str | None:
    with zipfile.ZipFile(path) as wheel:
        name = next((n for n in wheel.namelist() if n.count("/") == 1 and n.endswith(".dist-info/" + suffix)), None)
        return wheel.read(name).decode() if name else None


def wheel_metadata(path: Path):
    return Parser().parsestr(_wheel_text(path, "METADATA") or "")


def modules(path: Path) -> list[str]:
    """The modules a wheel installs, as import names: its top-level packages (for a namespace
    such as nvidia/, the packages inside it: nvidia.dali), or, for a wheel without packages,
    its top-level modules (six.py). DALI's helper scripts (rec2idx.py) are not modules to check."""
    with zipfile.ZipFile(path) as wheel:
        names = wheel.namelist()
    inits = {name[:-len("/__init__.py")] for name in names if name.endswith("/__init__.py")}
    packages, singles = set(), set()
    for name in names:
        top, _, rest = name.partition("/")
        if top.endswith((".dist-info", ".data", ".libs")) or top.startswith("_"):
            continue
        if not rest and top.endswith(".py"):
            singles.add(top[:-3])
        elif top in inits and top not in NAMESPACES:
            packages.add(top)
        elif rest.count("/") >= 1 and f"{top}/{rest.split('/')[0]}" in inits:  # inside a namespace package
            packages.add(f"{top}.{rest.split('/')[0]}")
    return sorted(packages or singles)


def import_failures(names: list[str], env: dict, site: Path | None = None) -> list[str]:
    """'module: error' for each module that does not import in a fresh interpreter with env
    (or imports from outside site, when site is given)."""
    code = ("import importlib, json, sys, pathlib\nbad = []\nfor m in sys.argv[2:]:\n"
            "    try:\n        mod = importlib.import_module(m)\n    except Exception as err:\n"
            "        bad.append(f'{m}: {type(err).__name__}: {err}'.splitlines()[0]); continue\n"
            "    where = getattr(mod, '__file__', None) or next(iter(getattr(mod, '__path__', [])), '')\n"
            "    if sys.argv[1] and not str(pathlib.Path(where).resolve()).startswith(sys.argv[1]):\n"
            "        bad.append(f'{m}: imported from {where}, not from the target')\n"
            "print(json.dumps(bad))\n")
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(site.resolve()) if site else "", *names], env=env,
                              capture_output=True, text=True, timeout=IMPORT_LIMIT_S)
    except subprocess.TimeoutExpired:
        return [f"{n}: the imports took more than {IMPORT_LIMIT_S} s" for n in names]
    if proc.returncode != 0:
        return [f"{n}: the import check itself failed ({proc.stderr.strip().splitlines()[-1:]})" for n in names]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def unmet(folder: Path, python_version: str) -> list[str]:
    """Requirements of the folder's wheels that neither the folder nor a torch node meets."""
    from packaging.requirements import Requirement  # the builder runs where the project is installed
    from packaging.utils import canonicalize_name
    problems, readable = [], []
    for path in sorted(folder.glob("*.whl")):
        try:
            wheel_metadata(path)
            readable.append(path)
        except zipfile.BadZipFile:
            problems.append(f"{path.name} is not a wheel (not a zip file); download it again")
    have = {project(p): wheel_metadata(p)["Version"] for p in readable}
    env = {"python_version": python_version, "python_full_version": python_version + ".0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    extras_wanted: dict[str, set[str]] = {}
    for path in readable:  # which extras other wheels ask of each project (DALI: nvimgcodec[all])
        for text in wheel_metadata(path).get_all("Requires-Dist") or []:
            req = Requirement(text)
            extras_wanted.setdefault(canonicalize_name(req.name), set()).update(req.extras)
    for path in readable:
        for text in wheel_metadata(path).get_all("Requires-Dist") or []:
            req = Requirement(text)
            extras = extras_wanted.get(project(path), set()) | {""}
            if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in extras):
                continue
            name = canonicalize_name(req.name)
            if name in have:
                if not req.specifier.contains(have[name], prereleases=True):
                    problems.append(f"{path.name} needs {req}, the folder has {name} {have[name]}")
            elif name not in NODE_HAS:
                problems.append(f"{path.name} needs {req}, which is neither in the folder nor on a torch node")
    return problems


def pins(path: Path = REQUIREMENTS) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def download(folder: Path, python_version: str, platforms: list[str]) -> None:
    wanted = pins()
    binary = [p for p in wanted if normalise(p.split("==")[0]) not in SOURCE_ONLY]
    where = [arg for plat in platforms for arg in ("--platform", plat)]
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", *where, "--python-version",
                    python_version, "-d", str(folder), *binary], check=True)
    for pin in wanted:  # pure Python: built with this machine's torch (DeepSpeed's setup imports it)
        if normalise(pin.split("==")[0]) in SOURCE_ONLY:
            subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(folder), pin],
                           check=True)


def check(folder: Path, python_version: str) -> list[str]:
    """Problems of the folder: unmet requirements, a failed offline install, a module that does not import."""
    problems = unmet(folder, python_version)
    if python_version != f"{sys.version_info.major}.{sys.version_info.minor}":
        return problems  # wheels for another Python cannot be installed and imported here
    files = sorted(folder.glob("*.whl"))
    with tempfile.TemporaryDirectory(prefix="gpu-wheels-") as tmp:
        target = Path(tmp) / "site"
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                               "--find-links", str(folder), "--target", str(target), *map(str, files)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            return [*problems, "offline install failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]]
        names = sorted({m for p in files for m in modules(p)})
        env = {**os.environ, "PYTHONPATH": str(target)}
        problems += import_failures(names, env, target)
    return problems


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.whl"))


def split(folder: Path, part_mib: int) -> tuple[list[Path], str]:
    """FOLDER.tar cut into parts of part_mib MiB beside the folder; (parts, the command that joins them)."""
    archive = folder.with_name(folder.name + ".tar")
    shutil.make_archive(str(archive.with_suffix("")), "tar", folder.parent, folder.name)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    parts = []
    with open(archive, "rb") as whole:
        while chunk := whole.read(part_mib * 2**20):
            parts.append(archive.with_name(f"{archive.name}.part-{len(parts):03d}"))
            parts[-1].write_bytes(chunk)
    archive.unlink()
    join = (f"cat {archive.name}.part-* > {archive.name} && echo '{digest}  {archive.name}' | sha256sum -c - "
            f"&& tar -xf {archive.name} && rm {archive.name}")
    return parts, join


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bnonly_dist.perf.wheels", description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="the wheel folder to build (new, or empty)")
    p.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                   help="the node's Python, major.minor (default: this one; only then can the folder be test-installed)")
    p.add_argument("--platform", action="append", help="wheel platform tags (default: manylinux_2_28_x86_64 and "
                   "manylinux2014_x86_64)")
    p.add_argument("--split-mib", type=int, default=0, help="also cut a tar of the folder into parts of this many MiB")
    p.add_argument("--check-only", action="store_true", help="check an existing folder, download nothing")
    args = p.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        print(f"gpu-wheels: --python-version {args.python_version}: give major.minor, e.g. 3.11", file=sys.stderr)
        return 2
    if args.check_only and not args.folder.is_dir():
        print(f"gpu-wheels: {args.folder} is not a folder; build it first (make gpu-wheels WHEELS=dir)", file=sys.stderr)
        return 2
    if not args.check_only:
        if args.folder.exists() and any(args.folder.iterdir()):
            print(f"gpu-wheels: {args.folder} is not empty; pass a new folder (or --check-only)", file=sys.stderr)
            return 2
        args.folder.mkdir(parents=True, exist_ok=True)
        download(args.folder, args.python_version, args.platform or ["manylinux_2_28_x86_64", "manylinux2014_x86_64"])
    problems = check(args.folder, args.python_version)
    for problem in problems:
        print(f"gpu-wheels: {problem}", file=sys.stderr)
    names = [p.name for p in args.folder.glob("*.whl")]
    built = pythons_of(names) or [args.python_version]  # only pure-Python wheels: the version asked for
    print(f"gpu-wheels: {args.folder}: {len(names)} wheels, {size(args.folder) / 2**20:.0f} MiB, for Python "
          f"{' and '.join(built)} (a node with another Python needs NODE_PYTHON=X.Y); "
          + ("NOT usable, see above" if problems else "installs offline and imports"))
    if problems:
        return 1
    if args.split_mib:
        parts, join = split(args.folder, args.split_mib)
        print(f"gpu-wheels: {len(parts)} parts of at most {args.split_mib} MiB beside it "
              f"({parts[0].name} ...); on the node, in the folder that holds them:\n  {join}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
