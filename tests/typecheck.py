"""Type-check the tree with mypy (config: [tool.mypy] in pyproject.toml); tests/test_lint.py runs it.

    python tests/typecheck.py [extra mypy arguments]

`setup.py` maps the role folders into one namespace (`common/` is `asyncps` itself, `ps/` is
`asyncps.ps`, ...), which mypy cannot see: the editable install goes through an import hook it does
not run, and mypy names a module after the folder it sits in. So this builds
build/typecheck/asyncps/..., a tree of real folders holding a symlink to each source file, from
setup.py's own package table (read from setup.py, not repeated here), checks that tree, and prints
mypy's findings with the real paths (ps/shard.py, not build/typecheck/asyncps/ps/shard.py).
The cache sits in build/typecheck-cache, so a second run takes a few seconds.
"""
import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREE = os.path.join(REPO, "build", "typecheck")
SOURCE_SUFFIXES = (".py", ".pyi")


def role_packages():
    """setup.py's PACKAGES ({"asyncps.ps.optim": "ps/optim", ...}), computed by setup.py's own code
    with its closing setup() call left out, so a new role folder or sub-package needs no edit here."""
    with open(os.path.join(REPO, "setup.py")) as f:
        module = ast.parse(f.read(), "setup.py")
    module.body = [node for node in module.body
                   if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                           and getattr(node.value.func, "id", None) == "setup")]
    namespace: dict = {"__name__": "setup_packages"}
    here = os.getcwd()
    os.chdir(REPO)  # setup.py walks folders relative to the repository root
    try:
        exec(compile(module, "setup.py", "exec"), namespace)
    finally:
        os.chdir(here)
    return namespace["PACKAGES"]


def build_tree():
    """Lay out build/typecheck/<package path>/<file> -> <role folder>/<file>; returns {link: real}
    with both relative to the repository root, to rewrite mypy's paths back.

    Updated in place, each link swapped in atomically and strays removed, never wiped: two runs
    at once (two engineers' test runs in one tree) lay out the same tree without tripping over
    each other, and mypy's cache, which is keyed by path, stays warm."""
    links = {}
    for package, folder in sorted(role_packages().items()):
        target_dir = os.path.join(TREE, *package.split("."))
        os.makedirs(target_dir, exist_ok=True)
        for name in sorted(os.listdir(os.path.join(REPO, folder))):
            if name.endswith(SOURCE_SUFFIXES):
                real = os.path.join(REPO, folder, name)
                links[os.path.join(target_dir, name)] = os.path.relpath(real, target_dir)
    for link, target in links.items():
        if not (os.path.islink(link) and os.readlink(link) == target):
            tmp = f"{link}.{os.getpid()}.tmp"
            os.symlink(target, tmp)
            os.replace(tmp, link)
    for root, dirs, files in os.walk(TREE, topdown=False):  # a file or package that is gone
        for name in files:
            path = os.path.join(root, name)
            if path not in links and not path.endswith(".tmp"):
                os.unlink(path)
        if root != TREE and not os.listdir(root):
            try:
                os.rmdir(root)
            except OSError:  # another run just laid a file in it
                pass
    return {os.path.relpath(link, REPO): os.path.relpath(os.path.join(os.path.dirname(link), target), REPO)
            for link, target in links.items()}


def real_paths(text, links):
    """mypy's output with every tree path replaced by the file it links to."""
    out = []
    for line in text.splitlines(keepends=True):
        path, sep, rest = line.partition(":")
        out.append(links.get(path, path) + sep + rest if sep else line)
    return "".join(out)


def main(argv):
    links = build_tree()
    proc = subprocess.run([sys.executable, "-m", "mypy", *argv], cwd=REPO, capture_output=True, text=True)
    sys.stdout.write(real_paths(proc.stdout, links))
    sys.stderr.write(proc.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
