"""Python source as the scaffold emits it: the guide's modules with the package renamed by libcst
(a concrete syntax tree, so comments and formatting stay as the pages show them).

Three steps, each a libcst transform and never a text replacement of code:

* `include`: a template line `# scaffold: include dblayer.prestart seed main` becomes those
  top-level statements of the canonical module, with the comments above them;
* `drop`: top-level statements that define the given names go (and imports left unused);
* `rename`: `dblayer` becomes the reader's package in imports, and in string literals where a
  string names one of the emitted modules (`"dblayer.migrate:upgrade"`) or a `dblayer_` prefix.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from functools import cache
from pathlib import Path

import libcst as cst

SOURCE = Path(__file__).resolve().parent.parent  # src/dblayer: the canonical code
CANONICAL = "dblayer"
# The guide's section markers (`# --8<-- [start:name]`): machinery of the pages, not code.
_MARKER = re.compile(r"[ \t]*# --8<-- \[(?:start|end):[\w-]+\][ \t]*\n?")
_INCLUDE = re.compile(r"^# scaffold: include ([\w.]+) ([\w ]+)\n", flags=re.M)


class ScaffoldError(Exception):
    """A prerequisite the scaffold refuses, said in one line."""


def canonical_text(module: str) -> str:
    """The source of `dblayer.x.y` (a module of this package), without the section markers."""
    parts = module.split(".")
    if parts[0] != CANONICAL:
        raise ScaffoldError(f"not a module of {CANONICAL}: {module}")
    path = SOURCE.joinpath(*parts[1:]).with_suffix(".py")
    return strip_markers(path.read_text("utf-8"))


def strip_markers(text: str) -> str:
    """`text` without the section markers, and without the blank line a marker between two
    blank lines would leave doubled."""
    kept: list[str] = []
    lines = text.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if _MARKER.fullmatch(line):
            following = lines[index + 1] if index + 1 < len(lines) else "\n"
            if kept and not kept[-1].strip() and not following.strip():
                kept.pop()
            continue
        kept.append(line)
    return "".join(kept).rstrip("\n") + "\n" if kept else ""


def _defined_names(statement: cst.CSTNode) -> set[str]:
    """The names a top-level statement defines (a def, a class, an assignment's targets)."""
    if isinstance(statement, cst.FunctionDef | cst.ClassDef):
        return {statement.name.value}
    names: set[str] = set()
    if isinstance(statement, cst.SimpleStatementLine):
        for small in statement.body:
            targets: list[cst.BaseExpression] = []
            if isinstance(small, cst.Assign):
                targets = [target.target for target in small.targets]
            elif isinstance(small, cst.AnnAssign):
                targets = [small.target]
            names |= {target.value for target in targets if isinstance(target, cst.Name)}
    return names


def definitions(module: str, names: Collection[str]) -> str:
    """The top-level statements of `module` that define `names`, in the module's order, each
    with the blank lines and comments above it."""
    tree = cst.parse_module(canonical_text(module))
    found = [s for s in tree.body if _defined_names(s) & set(names)]
    missing = set(names) - set().union(*(_defined_names(s) for s in found))
    if missing:
        raise ScaffoldError(f"{module} no longer defines {', '.join(sorted(missing))}")
    code = [tree.code_for_node(statement) for statement in found]
    return "".join([code[0].lstrip("\n"), *code[1:]])  # the template spaces the first


def include(template: str) -> str:
    """Replace each `# scaffold: include module name…` line with those definitions."""
    return _INCLUDE.sub(lambda m: definitions(m.group(1), m.group(2).split()), template)


def drop(source: str, names: Collection[str]) -> str:
    """`source` without the top-level statements defining `names`, nor the imports only they
    used; an `if TYPE_CHECKING:` block left with no import goes too."""
    return _drop(source, tuple(sorted(names)))


@cache  # libcst is slow: a process that scaffolds several times (the tests) parses each once
def _drop(source: str, names: tuple[str, ...]) -> str:
    tree = cst.parse_module(source)
    if names:
        tree = tree.with_changes(body=[s for s in tree.body if not _defined_names(s) & set(names)])
    for _ in range(2):  # again once an emptied `if TYPE_CHECKING:` went: its name is unused
        used = _UsedNames()
        tree.visit(used)
        tree = tree.visit(_RemoveUnusedImports(used.names))
        tree = tree.with_changes(body=[s for s in tree.body if not _empty_if(s)])
    return tree.code


class _UsedNames(cst.CSTVisitor):
    """Every identifier the code uses outside its imports, and every word of its strings (an
    annotation or `cast("Callable[...]", x)` may name an import in a string)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def visit_Import(self, node: cst.Import) -> bool:
        return False

    def visit_ImportFrom(self, node: cst.ImportFrom) -> bool:
        return False

    def visit_Name(self, node: cst.Name) -> None:
        self.names.add(node.value)

    def visit_Expr(self, node: cst.Expr) -> bool:
        return not isinstance(node.value, cst.SimpleString)  # a docstring names no import

    def visit_SimpleString(self, node: cst.SimpleString) -> None:
        self.names |= set(re.findall(r"\w+", node.value))


class _RemoveUnusedImports(cst.CSTTransformer):
    def __init__(self, used: set[str]) -> None:
        super().__init__()
        self.used = used

    def leave_Import(
        self, original_node: cst.Import, updated_node: cst.Import
    ) -> cst.Import | cst.RemovalSentinel:
        kept = [a for a in updated_node.names if self._bound(a) in self.used]
        if not kept:
            return cst.RemoveFromParent()
        return updated_node.with_changes(names=_last_without_comma(kept))

    def leave_ImportFrom(
        self, original_node: cst.ImportFrom, updated_node: cst.ImportFrom
    ) -> cst.ImportFrom | cst.RemovalSentinel:
        module = updated_node.module
        if isinstance(module, cst.Name) and module.value == "__future__":
            return updated_node
        if isinstance(updated_node.names, cst.ImportStar):
            return updated_node
        kept = [a for a in updated_node.names if self._bound(a) in self.used]
        if not kept:
            return cst.RemoveFromParent()
        if updated_node.lpar is not None:  # one name a line: the last line's comma and break
            last = updated_node.names[-1].comma
            return updated_node.with_changes(names=[*kept[:-1], kept[-1].with_changes(comma=last)])
        return updated_node.with_changes(names=_last_without_comma(kept))

    @staticmethod
    def _bound(alias: cst.ImportAlias) -> str:
        """The name an import binds: its `as` name, else the first part of the dotted name."""
        if alias.asname is not None and isinstance(alias.asname.name, cst.Name):
            return alias.asname.name.value
        node: cst.BaseExpression = alias.name
        while isinstance(node, cst.Attribute):
            node = node.value
        return node.value if isinstance(node, cst.Name) else ""


def _last_without_comma(aliases: list[cst.ImportAlias]) -> list[cst.ImportAlias]:
    return [*aliases[:-1], aliases[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)]


def _empty_if(statement: cst.CSTNode) -> bool:
    """`if TYPE_CHECKING:` whose imports all went (libcst leaves a `pass` in their place)."""
    if not isinstance(statement, cst.If) or statement.orelse is not None:
        return False
    return all(
        isinstance(line, cst.SimpleStatementLine)
        and all(isinstance(small, cst.Pass) for small in line.body)
        for line in statement.body.body
    )


class _RenamePackage(cst.CSTTransformer):
    """The identifier `dblayer`, wherever it stands (`from dblayer.x import y`, `import
    dblayer.x`, `dblayer.x.y`), becomes the package, and `_dblayer_run` `_shop_run`."""

    def __init__(self, package: str) -> None:
        super().__init__()
        self.package = package

    def leave_Name(self, original_node: cst.Name, updated_node: cst.Name) -> cst.Name:
        if updated_node.value == CANONICAL:
            return updated_node.with_changes(value=self.package)
        if updated_node.value.startswith(f"_{CANONICAL}_"):  # the plugin's `_dblayer_run`
            value = f"_{self.package}_" + updated_node.value.removeprefix(f"_{CANONICAL}_")
            return updated_node.with_changes(value=value)
        return updated_node


class _RenameStrings(cst.CSTTransformer):
    """`"dblayer.migrate:upgrade"` -> `"shop.migrate:upgrade"`, `"dblayer_testing_"` ->
    `"shop_testing_"`, `DBLAYER_PG` -> `SHOP_PG`; a mention of a module the reader does not get
    (`dblayer.routing`) stays, as a pointer to the guide."""

    def __init__(self, package: str, modules: Collection[str]) -> None:
        super().__init__()
        self.package = package
        alternatives = "|".join(sorted((re.escape(m) for m in modules), key=len, reverse=True))
        # `dblayer.migrate`, `dblayer_testing_`, `dblayer-pg-`, `~/.cache/dblayer/postgres`, and
        # the string "dblayer" itself (a cache directory's name).
        self.pattern = re.compile(
            rf"\b{CANONICAL}(?=\.(?:{alternatives})\b|_|-pg-|/postgres)|(?<=\"){CANONICAL}(?=\")"
        )
        self.upper = re.compile(rf"\b{CANONICAL.upper()}_")

    def _renamed(self, text: str) -> str:
        text = self.pattern.sub(self.package, text)
        return self.upper.sub(f"{self.package.upper()}_", text)

    def leave_SimpleString(
        self, original_node: cst.SimpleString, updated_node: cst.SimpleString
    ) -> cst.SimpleString:
        return updated_node.with_changes(value=self._renamed(updated_node.value))

    def leave_FormattedStringText(
        self, original_node: cst.FormattedStringText, updated_node: cst.FormattedStringText
    ) -> cst.FormattedStringText:
        """The literal parts of an f-string: `f"dblayer_{name}"`."""
        return updated_node.with_changes(value=self._renamed(updated_node.value))

    def leave_Comment(self, original_node: cst.Comment, updated_node: cst.Comment) -> cst.Comment:
        """A comment naming an emitted module or variable (`DBLAYER_PG`) names the reader's."""
        return updated_node.with_changes(value=self._renamed(updated_node.value))


def rename(source: str, package: str, modules: Collection[str]) -> str:
    """`source` with `dblayer` as `package`: imports, references, and strings naming `modules`
    (dotted paths below the package, like `migrate` or `api.deps`)."""
    return _rename(source, package, tuple(sorted(modules)))


@cache
def _rename(source: str, package: str, modules: tuple[str, ...]) -> str:
    tree = cst.parse_module(source).visit(_RenamePackage(package))
    return tree.visit(_RenameStrings(package, modules)).code


class _SetDefault(cst.CSTTransformer):
    """`name: T = old` in a class body becomes `name: T = value` (a string)."""

    def __init__(self, name: str, value: str) -> None:
        super().__init__()
        self.name, self.value, self.found = name, value, 0

    def leave_AnnAssign(
        self, original_node: cst.AnnAssign, updated_node: cst.AnnAssign
    ) -> cst.AnnAssign:
        target = updated_node.target
        if isinstance(target, cst.Name) and target.value == self.name:
            self.found += 1
            return updated_node.with_changes(value=cst.SimpleString(f'"{self.value}"'))
        return updated_node


def set_default(source: str, name: str, value: str) -> str:
    """`source` with the annotated assignment to `name` (a settings field) defaulting to `value`."""
    transform = _SetDefault(name, value)
    code = cst.parse_module(source).visit(transform).code
    if transform.found != 1:
        raise ScaffoldError(f"{name}: {transform.found} annotated assignments, not one")
    return code


class _DropMembers(cst.CSTTransformer):
    """Class members defining `names` (fields, methods, validators), a field named in a
    validator's decorator, and a keyword argument named so (`get_settings(name=...)`)."""

    def __init__(self, names: Collection[str]) -> None:
        super().__init__()
        self.names = set(names)

    def leave_IndentedBlock(
        self, original_node: cst.IndentedBlock, updated_node: cst.IndentedBlock
    ) -> cst.IndentedBlock:
        kept = [s for s in updated_node.body if not _defined_names(s) & self.names]
        return updated_node.with_changes(body=kept)

    def leave_Call(self, original_node: cst.Call, updated_node: cst.Call) -> cst.Call:
        args = list(updated_node.args)
        kept = [a for a in args if not self._dropped(a)]
        if len(kept) == len(args):
            return updated_node
        if kept and args[-1] not in kept:  # the last one went: its comma and line break stay
            kept[-1] = kept[-1].with_changes(comma=args[-1].comma)
        return updated_node.with_changes(args=kept)

    def _dropped(self, arg: cst.Arg) -> bool:
        if arg.keyword is not None:
            return arg.keyword.value in self.names
        value = arg.value
        return isinstance(value, cst.SimpleString) and value.evaluated_value in self.names


def drop_members(source: str, names: Collection[str]) -> str:
    """`source` without the class members and keyword arguments named `names` (see
    `_DropMembers`), nor the imports only they used."""
    return _drop_members(source, tuple(sorted(names)))


@cache
def _drop_members(source: str, names: tuple[str, ...]) -> str:
    return drop(cst.parse_module(source).visit(_DropMembers(names)).code, ())


def strip(text: str, phrases: Collection[str], where: str) -> str:
    """`text` without each of `phrases` (the guide's references to itself in comments and
    docstrings), each found exactly once: a phrase the guide no longer has is an error."""
    for phrase in phrases:
        if text.count(phrase) != 1:
            raise ScaffoldError(f"{where}: {text.count(phrase)} of {phrase!r}, not one")
        text = text.replace(phrase, "")
    return text
