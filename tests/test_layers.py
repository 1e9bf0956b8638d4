"""The dependency rule, checked by walking the imports of every module of the two packages.

- skyrt.runtime (the torch-free layer) never imports skyrt.export or the demo package, not even
  lazily inside a function: it reaches torch-side code by name through runtime/registry.py;
- no module of skyrt.runtime imports torch (TORCH_ALLOWED is the exception list, kept empty);
- no import cycle among skyrt modules.

Imports are read from the source (ast), so function-level and TYPE_CHECKING imports count too.
Folders map to packages as pyproject.toml's wheel.packages says. The checks are plain functions
run here on the tree and on a small synthetic package that breaks every rule (so they can fail).
"""
from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME, EXPORT, DEMO = "skyrt.runtime", "skyrt.export", "skyrt_demo"
TORCH_ALLOWED: set[str] = set()  # runtime modules allowed to import torch: none


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted name as imported (a module, or a package / module for `from x import name`)
    file: Path
    line: int

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def wheel_packages(root: Path = ROOT) -> dict[Path, str]:
    """{folder: package name} from pyproject.toml's [tool.scikit-build] wheel.packages."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    packages = config["tool"]["scikit-build"]["wheel"]["packages"]
    return {root / folder: name.replace("/", ".") for name, folder in packages.items()}


def module_files(packages: dict[Path, str]) -> dict[str, Path]:
    """{dotted module name: file} of every .py file under the package folders."""
    modules = {}
    for folder, package in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute dotted name a `from ... import` statement reads from."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]  # a module's relative imports start from its package
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    """Every import statement of `path` (module level, in functions, under TYPE_CHECKING alike).
    `from pkg import name` names the module pkg.name when there is one, else pkg."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, path, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, is_package, node)
            for alias in node.names:
                child = f"{source}.{alias.name}"
                found.append(Import(module, child if child in known else source, path, node.lineno))
    return list(dict.fromkeys(found))  # `from m import a, b` is one import of m


def all_imports(packages: dict[Path, str]) -> tuple[dict[str, Path], list[Import]]:
    modules = module_files(packages)
    known = set(modules)
    return modules, [imp for name, path in modules.items() for imp in imports_of(name, path, known)]


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _known_module(target: str, known: set[str]) -> str | None:
    """The module of ours that `target` names (its longest known prefix), None for outside code."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return None


def forbidden_edges(imports: list[Import], layer: str, forbidden: tuple[str, ...]) -> list[Import]:
    """Imports from inside `layer` of anything inside one of `forbidden`."""
    return [i for i in imports if _within(i.importer, layer) and any(_within(i.target, f) for f in forbidden)]


def torch_imports(imports: list[Import], layer: str, allowed: set[str]) -> list[Import]:
    return [i for i in imports if _within(i.importer, layer) and _within(i.target, "torch")
            and i.importer not in allowed]


def import_cycles(imports: list[Import], known: set[str]) -> list[list[str]]:
    """The strongly connected groups (more than one module, or one importing itself) of the graph
    of imports among our modules, each as a cycle through all its members (first member repeated)."""
    graph: dict[str, set[str]] = {m: set() for m in known}
    for i in imports:
        target = _known_module(i.target, known)
        if target is not None:
            graph[i.importer].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm (the packages are small: recursion is fine)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph[v]:
                groups.append(_cycle_through(sorted(group), graph))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def _cycle_through(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A closed walk from group[0] visiting every member (shortest hops inside the group)."""
    members = set(group)

    def path(a: str, b: str) -> list[str]:  # breadth-first, a -> ... -> b, inside the group
        previous = {a: None}
        frontier = [a]
        while frontier:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == b:
                        walk = [w, v]
                        while previous[walk[-1]] is not None:
                            walk.append(previous[walk[-1]])
                        return walk[::-1]
                    if w not in previous:
                        previous[w] = v
                        nxt.append(w)
            frontier = nxt
        raise AssertionError(f"{b} is not reachable from {a}")

    walk = [group[0]]
    for target in group[1:]:
        if target not in walk:
            walk += path(walk[-1], target)[1:]
    return walk + path(walk[-1], group[0])[1:]


def _report(title: str, bad: list[Import]) -> str:
    return title + "\n" + "\n".join(f"  {i.where()}: {i.importer} imports {i.target}" for i in bad)


# ----------------------------------------------------------------------------------------------
# The tree


def test_the_tree_maps_both_packages():
    modules, imports = all_imports(wheel_packages())
    assert f"{RUNTIME}.pipeline" in modules and f"{EXPORT}.dit" in modules
    assert any(i.target == f"{RUNTIME}.model_config" for i in imports)  # the walker sees real imports


def test_runtime_never_imports_export_or_the_demo():
    _, imports = all_imports(wheel_packages())
    bad = forbidden_edges(imports, RUNTIME, (EXPORT, DEMO))
    assert not bad, _report("skyrt.runtime must reach torch-side code by name (runtime/registry.py):", bad)


def test_runtime_never_imports_torch():
    _, imports = all_imports(wheel_packages())
    bad = torch_imports(imports, RUNTIME, TORCH_ALLOWED)
    assert not bad, _report("the torch-free runtime imports torch:", bad)


# Rule 2: the torch layer may use the runtime's torch-free modules (configs, latents, RoPE, manifests,
# the backend interface it implements), never what drives or serves a stream; rule 4: nothing in the
# wheel imports the demo package.
RUNTIME_DRIVERS = tuple(f"{RUNTIME}.{m}" for m in (
    "pipeline", "kvcache", "api", "cli", "server", "fleet",
    "backends.onnxruntime_backend", "backends.tensorrt_backend", "backends.exported_graphs"))


def test_export_never_imports_the_runtimes_drivers_or_the_demo():
    _, imports = all_imports(wheel_packages())
    bad = forbidden_edges(imports, EXPORT, (*RUNTIME_DRIVERS, DEMO))
    assert not bad, _report("skyrt.export may import the runtime's torch-free modules only (docs/architecture.md):",
                            bad)


def test_runtime_imports_by_name_only_through_the_registry():
    """A dynamic import (__import__, importlib.import_module) elsewhere in the runtime would hide an edge
    from the walker above: runtime/registry.py is the one place that imports by name."""
    bad = []
    for name, path in module_files(wheel_packages()).items():
        if not _within(name, RUNTIME) or name == f"{RUNTIME}.registry":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                called = ast.unparse(node.func)
                if called in ("__import__", "importlib.import_module", "import_module"):
                    bad.append(f"  {path.relative_to(ROOT)}:{node.lineno}: {called}(...)")
    assert not bad, "import by name through runtime/registry.py instead:\n" + "\n".join(bad)


def test_no_import_cycles():
    modules, imports = all_imports(wheel_packages())
    cycles = import_cycles(imports, set(modules))
    assert not cycles, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


# ----------------------------------------------------------------------------------------------
# The checks fail on a package that breaks the rules


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checks_find_bad_edges_cycles_and_torch(tmp_path):
    _write(tmp_path, {
        "rt/__init__.py": "",
        "rt/a.py": "from . import b\n",
        "rt/b.py": "def f():\n    from .sub.c import thing\n",
        "rt/sub/__init__.py": "",
        "rt/sub/c.py": "from .. import a\nimport numpy\n",
        "rt/ok.py": "from .sub import c\n",
        "rt/bad.py": "def g():\n    import torch.nn\n    from ex.tool import x\n",
        "rt/self_loop.py": "from . import self_loop\n",
        "ex/__init__.py": "",
        "ex/tool.py": "from rt import ok\nimport torch\n",
    })
    packages = {tmp_path / "rt": "rt", tmp_path / "ex": "ex"}
    modules, imports = all_imports(packages)
    assert set(modules) == {"rt", "rt.a", "rt.b", "rt.sub", "rt.sub.c", "rt.ok", "rt.bad", "rt.self_loop",
                            "ex", "ex.tool"}

    bad = forbidden_edges(imports, "rt", ("ex",))
    assert [(i.importer, i.target, i.line) for i in bad] == [("rt.bad", "ex.tool", 3)]
    assert bad[0].where() == f"{tmp_path / 'rt' / 'bad.py'}:3"

    torch = torch_imports(imports, "rt", set())
    assert [(i.importer, i.target, i.line) for i in torch] == [("rt.bad", "torch.nn", 2)]  # ex may import torch
    assert torch_imports(imports, "rt", {"rt.bad"}) == []

    cycles = import_cycles(imports, set(modules))
    assert sorted(cycles) == [["rt.a", "rt.b", "rt.sub.c", "rt.a"], ["rt.self_loop", "rt.self_loop"]]


def test_relative_imports_resolve_like_python(tmp_path):
    _write(tmp_path, {"p/__init__.py": "from .q import r\n", "p/q/__init__.py": "from ..s import t\n",
                      "p/q/r.py": "from . import u\nfrom .. import s\nimport os.path\n", "p/s.py": "", "p/q/u.py": ""})
    _, imports = all_imports({tmp_path / "p": "p"})
    got = {(i.importer, i.target) for i in imports}
    assert got == {("p", "p.q.r"), ("p.q", "p.s"), ("p.q.r", "p.q.u"), ("p.q.r", "p.s"),
                   ("p.q.r", "os.path")}


# ----------------------------------------------------------------------------------------------
# The registry: how the runtime reaches torch-side code, and what it says when an extra is missing


def test_the_registry_resolves_every_name():
    from skyrt.runtime import registry

    for name in registry.ENTRIES:
        assert callable(registry.resolve(name)), name
    assert registry.backend_class("torch").__module__ == "skyrt.export.torch_backend"
    assert set(registry.BACKENDS) == {"torch", "onnxruntime", "tensorrt"}


def test_the_registry_names_the_missing_extra(monkeypatch):
    from skyrt.runtime import registry

    monkeypatch.setitem(registry.ENTRIES, "backend:nowhere", ("skyrt_test_absent_module:Backend", "export"))
    try:
        registry.backend_class("nowhere")
    except registry.MissingExtraError as err:
        assert "skyrt_test_absent_module" in str(err) and "pip install 'skyrt[export]'" in str(err)
    else:
        raise AssertionError("a module that is not installed resolved")
    for bad in (lambda: registry.resolve("no:such"), lambda: registry.backend_class("jax")):
        try:
            bad()
        except (KeyError, ValueError) as err:
            assert "torch" in str(err) or "backend:torch" in str(err)  # the message lists what exists
        else:
            raise AssertionError("an unknown name resolved")


def test_publish_leaves_no_half_entry(tmp_path):
    from skyrt.runtime.artifact_cache import publish

    complete = lambda p: (p / "done").is_file()  # noqa: E731
    target = tmp_path / "entry"

    def failing(staging):
        staging.mkdir()
        (staging / "half").write_text("x")
        raise RuntimeError("the exporter died")

    try:
        publish(target, failing, complete)
    except RuntimeError:
        pass
    assert not target.exists() and list(tmp_path.iterdir()) == []  # no entry, no staging folder

    calls = []

    def make(staging):
        calls.append(staging)
        staging.mkdir()
        (staging / "done").write_text("ok")

    assert publish(target, make, complete) == target and (target / "done").is_file()
    assert publish(target, make, complete) == target and len(calls) == 1  # made once
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]
