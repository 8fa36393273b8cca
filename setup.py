"""Maps the role folders into the `asyncps` namespace.

`common/` is the package `asyncps` itself; `ps/`, `worker/`, `chief/`, `protos/`, `cli/` become
`asyncps.ps`, `asyncps.worker`, ... . Sub-packages are found by walking each folder, so adding one
needs no edit here.
"""
import os

from setuptools import setup

ROLE_DIRS = {
    "asyncps": "common",
    "asyncps.cli": "cli",
    "asyncps.chief": "chief",
    "asyncps.protos": "protos",
    "asyncps.ps": "ps",
    "asyncps.worker": "worker",
}


def _packages():
    found = {}
    for package, folder in ROLE_DIRS.items():
        for root, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
            if "__init__.py" in files:
                rel = os.path.relpath(root, folder)
                name = package if rel == "." else package + "." + rel.replace(os.sep, ".")
                found[name] = root
    return found


PACKAGES = _packages()
setup(packages=sorted(PACKAGES), package_dir=PACKAGES, package_data={"asyncps.protos": ["*.proto"]})
