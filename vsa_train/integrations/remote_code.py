"""An export's own code: the vsa_train modules a component needs, copied into its folder at export time.

Stock diffusers loads an export with `trust_remote_code=True` from the files in it, so the folder carries the code
of its pipeline (root) and of its transformer and text encoder (their folders). That code is this package's own
source, rewritten, never a second copy kept by hand:

- the modules a class needs: its module and every vsa_train module that one imports (relatively or not, also
  inside functions), followed transitively;
- each written as one flat file, vsa_train.models.dit -> vsa_train_models_dit.py: diffusers copies a folder's
  code into one flat package of its module cache (diffusers_modules.local, shared by every local folder it
  loads, hence the vsa_train_ prefix; so exports of two vsa_train versions loaded in one process share the first
  one's modules), and its imports of vsa_train become relative imports of those files;
- without Triton: `import triton` becomes `raise ImportError(...)`, so HAVE_TRITON is False, and each
  `if HAVE_TRITON:` block (the kernels' imports) is dropped. VSA runs its PyTorch path there; the kernels' custom
  ops would also clash with this package's in a process that imports both;
- diffusers copies only the files that the component's module imports relatively (not theirs), so that module
  ends with one such import per other file.

`ship` puts that code into an export folder and names it where diffusers looks: model_index.json (a pipeline's
class and its components') and each component's config.json (auto_map, for AutoModel). The VideoDiT exports
(diffusers.py) and the Wan exports (wan_export.py) both ship their code this way.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

from ..provenance import code_commit

PACKAGE = "vsa_train"
ROOT = Path(__file__).resolve().parents[1]  # vsa_train/
NO_TRITON = 'raise ImportError("an export carries the PyTorch path of VSA only")'
DROPPED = "# (an `if HAVE_TRITON:` block: the Triton kernels' imports, which an export does not carry)"


def flat_name(module: str) -> str:
    """The file stem of a module in an export folder: vsa_train.models.dit -> vsa_train_models_dit."""
    return module.replace(".", "_")


def _source(module: str) -> Path | None:
    """The file of a vsa_train module (a package's __init__.py), or None when `module` names none."""
    path = ROOT.joinpath(*module.split(".")[1:])
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if module.startswith(PACKAGE) and candidate.is_file():
            return candidate
    return None


def _rewrite(module: str) -> tuple[str, list[str]]:
    """(module's source with its vsa_train imports made flat and relative and Triton cut out, the modules it needs)."""
    path = _source(module)
    text = path.read_text()
    lines = text.splitlines()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    tree = ast.parse(text)
    edits, needs = [], []  # edits: (first line, last line (1-based), replacement lines)
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "HAVE_TRITON":
            edits.append((node.lineno, node.end_lineno, [DROPPED]))
            node.body, node.orelse = [], []  # its imports are not followed
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
            if names == ["triton"]:
                edits.append((node.lineno, node.end_lineno, [NO_TRITON]))
            elif any(name.split(".")[0] in (PACKAGE, "triton") for name in names):
                raise ValueError(f"{path}:{node.lineno}: an export cannot carry `import {', '.join(names)}`")
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == PACKAGE):
            base = node.module or ""
            if node.level:  # up from this module's package
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            statements, names = [], {}  # names: {flat module: imported names}, one statement each
            for alias in node.names:
                as_name = f" as {alias.asname}" if alias.asname else ""
                if _source(f"{base}.{alias.name}") is not None:  # a submodule: `from ..ops import warm`
                    needs.append(f"{base}.{alias.name}")
                    statements.append(f"from . import {flat_name(f'{base}.{alias.name}')} as "
                                      f"{alias.asname or alias.name}")
                else:
                    needs.append(base)
                    names.setdefault(flat_name(base), []).append(alias.name + as_name)
            statements += [f"from .{flat} import {', '.join(imported)}" for flat, imported in names.items()]
            edits.append((node.lineno, node.end_lineno, statements))
    for first, last, new in sorted(edits, reverse=True):
        head = lines[first - 1]
        indent = head[:len(head) - len(head.lstrip())]
        lines[first - 1:last] = [indent + line for line in new]
    return "\n".join(lines) + "\n", needs


def module_sources(cls: type) -> dict[str, str]:
    """{module: rewritten source} of every vsa_train module `cls` needs, its own module first."""
    todo, sources = [cls.__module__], {}
    while todo:
        module = todo.pop(0)
        if module not in sources:
            sources[module], needs = _rewrite(module)
            todo += needs
    return sources


def write_code(folder: Path, cls: type, commit: str) -> str:
    """Writes the files `cls` needs into `folder`; returns its module's file stem (what model_index.json names)."""
    sources = module_sources(cls)
    main = cls.__module__
    for module, source in sources.items():
        where = _source(module).relative_to(ROOT.parent)
        header = f"# Generated from {where} by vsa_train's export (commit {commit}): the package is the source.\n"
        if module == main:  # diffusers copies the files this one imports relatively, not theirs: import each
            source += "".join(f"from .{flat_name(m)} import __name__ as _  # noqa: E402, F401 (diffusers copies it)\n"
                              for m in sources if m != main)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{flat_name(module)}.py").write_text(header + source)
    return flat_name(main)


def ship(out: Path, components: dict[str, type], pipeline: type | None = None) -> None:
    """The code of each component class into out/<name>/, named by its config.json's auto_map (so
    AutoModel.from_pretrained(out/<name>, trust_remote_code=True) loads it) and, where `out` is a pipeline folder,
    by model_index.json, whose class becomes `pipeline`'s shipped code when given."""
    commit = code_commit()
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else None  # none: a component alone
    if pipeline is not None:
        index["_class_name"] = [write_code(out, pipeline, commit), pipeline.__name__]
    for name, cls in components.items():
        module = write_code(out / name, cls, commit)
        config = json.loads((out / name / "config.json").read_text())
        config["auto_map"] = {"AutoModel": f"{module}.{cls.__name__}"}
        _write_json(out / name / "config.json", config)
        if index is not None:
            index[name] = [module, cls.__name__]
    if index is not None:
        _write_json(index_path, index)


def _write_json(path: Path, data: dict) -> None:
    """As diffusers writes its JSON: sorted keys, indent 2, a final newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
