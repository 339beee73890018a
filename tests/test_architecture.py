"""The package's shape: the README's reading order is the import order, nothing imports the
experiment configs, the central functions stay short, and the installed packages are complete."""

import ast
import pathlib
import re
import tomllib

from helpers import ROOT

PACKAGE = ROOT / "usss_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
  return {_module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def _project_imports(tree: ast.Module, known: set[str]) -> list[tuple[str, int]]:
  """(imported usss_jax module, line) of every import in the file (names resolved to modules)."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in (
        "usss_jax", "configs"):
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        out.append((full if full in known else node.module, node.lineno))
    elif isinstance(node, ast.Import):
      out += [(a.name, node.lineno) for a in node.names
              if a.name.split(".")[0] in ("usss_jax", "configs")]
  return out


def _reading_order() -> list[str]:
  """The `usss_jax/...` entries of the README's "How the code is organised" block, in order."""
  readme = (ROOT / "README.md").read_text()
  section = readme[readme.index("## How the code is organised"):]
  block = section[section.index("```\n") + 4:]
  block = block[:block.index("```")]
  return re.findall(r"^(usss_jax/\S+)", block, re.M)


def _position(module: str, order: list[str]) -> int:
  """Index of the most specific README entry that covers `module`."""
  path = module.replace(".", "/")
  best, best_len = None, -1
  for i, entry in enumerate(order):
    stem = entry[:-3] if entry.endswith(".py") else entry.rstrip("/")
    covers = path == stem or (entry.endswith("/") and path.startswith(stem + "/")) or (
        entry.endswith("/") and path == stem)
    if covers and len(stem) > best_len:
      best, best_len = i, len(stem)
  assert best is not None, f"{module} is not in the README's reading order"
  return best


def test_every_import_points_back_in_the_readme_reading_order():
  order = _reading_order()
  modules = _modules()
  upward = []
  for name, tree in modules.items():
    if name == "usss_jax":  # the package's public face (Segmenter, losses)
      continue
    here = _position(name, order)
    for imported, line in _project_imports(tree, set(modules)):
      if imported == "usss_jax" or imported.startswith("configs"):
        continue
      if _position(imported, order) > here:
        upward.append(f"{name}:{line} imports {imported}")
  assert not upward, "imports of modules the README reads later:\n" + "\n".join(upward)


def test_the_library_never_imports_the_experiment_configs():
  offenders = [f"{name}:{line}" for name, tree in _modules().items()
               for imported, line in _project_imports(tree, set())
               if imported.split(".")[0] == "configs"]
  assert not offenders, offenders


def test_no_function_imports_a_project_module():
  offenders = []
  for name, tree in _modules().items():
    for func in ast.walk(tree):
      if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for node in ast.walk(func):
          if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
              m.startswith("usss_jax") for m, _ in _project_imports(
                  ast.Module(body=[node], type_ignores=[]), set())):
            offenders.append(f"{name}:{node.lineno}")
  assert not offenders, offenders


def _function_lines(module: str, function: str) -> int:
  tree = _modules()[module]
  node = next(n for n in ast.walk(tree)
              if isinstance(n, ast.FunctionDef) and n.name == function)
  return node.end_lineno - node.lineno + 1


def test_the_step_factory_and_the_loop_fit_on_a_screen():
  assert _function_lines("usss_jax.train_step", "make_train_step") < 80
  assert _function_lines("usss_jax.train", "run_training") < 80
  longest = max((len(p.read_text().splitlines()), p.name) for p in PACKAGE.rglob("*.py"))
  assert longest[0] <= 450, longest


def test_pyproject_installs_every_package_and_the_configs_inside_usss_jax():
  setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
  on_disk = {_module_name(p.parent) for p in PACKAGE.rglob("__init__.py")}
  assert set(setuptools["packages"]) == on_disk | {"usss_jax.configs"}
  assert setuptools["package-dir"] == {"usss_jax.configs": "configs"}
