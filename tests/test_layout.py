"""The package's shape: parts a newcomer can see, small modules, imports that go one way."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bnonly_dist"
MAX_TOP_LEVEL_MODULES = 12
MAX_MODULE_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def direct_imports() -> dict[str, set[str]]:
    """Module -> the package's modules its import statements name, anywhere in its text (function-local
    imports too)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    named = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bnonly_dist"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("bnonly_dist"))
        named[name] = {m for m in found if m in modules and m != name}
    return named


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules importing it runs (function-local imports too)."""
    graph = {}
    for name, found in direct_imports().items():
        # Importing a.b.c runs the package a.b's __init__ first (but never the importer's own packages).
        parents = {".".join(m.split(".")[:i]) for m in found for i in range(2, m.count(".") + 1)}
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        graph[name] = {m for m in found | parents if m not in own}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_circle_finder_finds_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_parts_and_module_sizes():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    for part in ("config", "run", "launch", "perf", "models", "data", "engines", "analysis"):
        assert (PACKAGE / part / "__init__.py").is_file(), part
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    long = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert long == {}


# The floors of the package, ground floor first, in the order of the README's Layout section: a module
# imports only from its own floor or the ones below. The top-level modules sit where they serve: the
# rendezvous (torch-free) and logsafe under everything, dist on config, modes beside the models, network and
# logs with the run that uses them, cli on top.
FLOORS = [
    ("bnonly_dist", "bnonly_dist.config", "bnonly_dist.rendezvous", "bnonly_dist.logsafe"),
    ("bnonly_dist.dist",),
    ("bnonly_dist.models", "bnonly_dist.modes"),
    ("bnonly_dist.data",),
    ("bnonly_dist.engines",),
    ("bnonly_dist.run", "bnonly_dist.network", "bnonly_dist.logs"),
    ("bnonly_dist.launch",),
    ("bnonly_dist.perf", "bnonly_dist.gpu_check"),
    ("bnonly_dist.analysis",),
    ("bnonly_dist.cli", "bnonly_dist.cli_args"),
]


def floor(module: str) -> int:
    """The floor of a module: that of the longest part name it starts with (the package itself: only its
    __init__, so that a new top-level module must be given a floor here)."""
    best = max((prefix for level in FLOORS for prefix in level
                if module == prefix or (prefix != "bnonly_dist" and module.startswith(prefix + "."))), key=len)
    return next(i for i, level in enumerate(FLOORS) if best in level)


def upward_imports() -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in direct_imports().items() for d in deps if floor(d) > floor(m))


def test_imports_go_down_the_floors():
    assert upward_imports() == []


def test_every_module_has_a_floor_and_an_upward_import_is_found():
    assert all(floor(m) >= 0 for m in direct_imports())
    assert floor("bnonly_dist.config.plan") < floor("bnonly_dist.models.bn_groups") < floor("bnonly_dist.run.train")
    assert floor("bnonly_dist.cli") == len(FLOORS) - 1


def test_nothing_imports_the_cli():
    assert [m for m, deps in import_graph().items() if "bnonly_dist.cli" in deps] == []
