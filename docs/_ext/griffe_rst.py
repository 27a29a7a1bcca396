"""A griffe extension: mtlopt's docstrings (reStructuredText markup) as mkdocstrings Markdown.

mtlopt's docstrings are Google style with reST inline markup, as Sphinx reads them. Before
mkdocstrings renders the public objects, this rewrites the markup they use into Markdown:

* ``:func:`mtlopt.x```, ``:class:``, ``:meth:`` (also ``~`` and ``title <target>``) become
  autorefs links when the target is a public object, plain code when it is private, and a
  warning (a failed ``mkdocs build --strict``) when it names nothing;
* ``:math:`...``` and ``.. math::`` blocks become arithmatex math;
* ```text <url>`_`` becomes a Markdown link;
* the shared arguments (``num_tasks``, ``task_specific``, ...) get a link to the page that
  documents them once.

It also warns about a public object without a docstring, and a public function whose
``Args:`` section leaves out one of its parameters.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

logger = griffe.get_logger("mtlopt_docs")

# The documented packages: every public name of these modules is rendered on a reference page.
PUBLIC_MODULES = ("mtlopt", "mtlopt.flax", "mtlopt.datasets")
# Top-level names of other libraries: a reference to them is rendered as code (no inventory is
# fetched: the build runs offline).
EXTERNAL = ("optax", "jax", "flax", "nnx", "numpy", "np", "jnp", "chex", "scipy", "torch")
# Members that implement a protocol rather than the API (jax's pytree registration): neither
# rendered (mkdocs.yml filters them) nor checked.
PROTOCOL = ("tree_flatten", "tree_unflatten")
# The arguments documented once, on reference/shared.md, with their anchors there.
SHARED = {
    "num_tasks": "shared-num_tasks",
    "task_specific": "shared-task_specific",
    "nonfinite": "shared-nonfinite",
    "groups": "shared-groups",
}

_ROLE = re.compile(r":(?:py:)?(func|class|meth|attr|mod|data|obj|exc):`([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_LINK = re.compile(r"`([^`<]+?)\s*<([^>\s]+)>`__?")
_SECTION = re.compile(r"^(\s*)([A-Z][A-Za-z ]*):\s*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _math_blocks(text: str) -> str:
    """``.. math::`` directives as ``$$`` blocks (one per blank-line-separated equation)."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip().startswith(".. math::"):
            out.append(line)
            i += 1
            continue
        base = _indent(line)
        pad = " " * base
        inline = line.strip()[len(".. math::") :].strip()  # ``.. math:: x`` on one line
        body: list[str] = [inline] if inline else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():  # the blank lines after the block stay
            body.pop()
            i -= 1
        equations: list[list[str]] = [[]]
        for b in body:
            if b.strip():
                equations[-1].append(b.strip())
            elif equations[-1]:
                equations.append([])
        if out and out[-1].strip():
            out.append("")
        for eq in equations:
            if eq:
                out += [pad + "$$", *(pad + e for e in eq), pad + "$$", ""]
        if out and not out[-1].strip():
            out.pop()
    return "\n".join(out)


class _Resolver:
    """Public paths of the loaded package and the lookup of a docstring's references."""

    def __init__(self, pkg: griffe.Module) -> None:
        self.pkg = pkg
        self.public: dict[str, str] = {}  # canonical path -> the path it is documented under
        for mod_path in PUBLIC_MODULES:
            mod = self.get(mod_path)
            if mod is None:
                continue
            self.public[mod.path] = mod_path
            names = mod.exports if mod.exports is not None else list(mod.members)
            for name in names:
                name = name if isinstance(name, str) else name.name
                if name.startswith("_") or name not in mod.members:
                    continue
                member = mod.members[name]
                if member.is_module:
                    continue
                try:
                    target = member.final_target if member.is_alias else member
                except griffe.AliasResolutionError:
                    continue
                if not member.is_alias and target.parent is not mod:
                    continue  # imported names without an alias: not documented here
                public = f"{mod_path}.{name}"
                self.public.setdefault(target.path, public)
                if target.is_class:
                    for sub in target.members:
                        if not sub.startswith("_") and sub not in PROTOCOL:
                            self.public.setdefault(f"{target.path}.{sub}", f"{public}.{sub}")

    def get(self, path: str) -> Any:
        parts = path.split(".")
        if parts[0] != self.pkg.name:
            return None
        obj: Any = self.pkg
        for part in parts[1:]:
            try:
                members = obj.members
            except griffe.AliasResolutionError:
                return None
            if part not in members:
                return None
            obj = members[part]
        return obj

    def canonical(self, obj: Any) -> str | None:
        try:
            return obj.final_target.path if obj.is_alias else obj.path
        except griffe.AliasResolutionError:
            return None

    def resolve(self, target: str, owner: Any) -> tuple[str | None, bool]:
        """(the path to link to, or None where private; whether the target names anything).

        A dotted ``mtlopt.`` path is taken as it is; another name is looked up as Sphinx does:
        in the owner's class, the owner (a class), its module and the modules above, then
        ``mtlopt``.
        """
        target = target.lstrip(".")
        if target.startswith(self.pkg.name + "."):
            candidates = [target]
        else:
            scopes = []
            if owner.parent is not None and owner.parent.is_class:
                scopes.append(owner.parent)
            if owner.is_class:
                scopes.append(owner)
            scope = owner.module
            while scope is not None:
                scopes.append(scope)
                scope = scope.parent
            candidates = [f"{s.path}.{target}" for s in scopes]
        for cand in candidates:
            obj = self.get(cand)
            if obj is None:
                continue
            if cand in self.public.values():
                return cand, True
            canonical = self.canonical(obj)
            if canonical in self.public:
                return self.public[canonical], True
            return None, True
        return None, False


class RstToMarkdown(griffe.Extension):
    """Rewrites the public objects' docstrings (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != "mtlopt":
            return
        resolver = _Resolver(pkg)
        done: set[str] = set()
        for canonical, public in sorted(resolver.public.items()):
            obj = resolver.get(canonical)
            if obj is None or canonical in done:
                continue
            done.add(canonical)
            obj = obj.final_target if obj.is_alias else obj
            if obj.is_attribute:
                if obj.docstring is not None:
                    obj.docstring.value = self.convert(obj.docstring.value, obj, resolver)
                continue
            if obj.docstring is None or not obj.docstring.value.strip():
                logger.warning(f"{public}: public object without a docstring ({obj.filepath})")
                continue
            obj.docstring.value = self.convert(obj.docstring.value, obj, resolver)
            if obj.is_function:
                self.check_args(obj, public)
            self.check_entries(obj, public)

    def convert(self, text: str, obj: Any, resolver: _Resolver) -> str:
        where = f"{obj.path} ({obj.relative_filepath}:{obj.lineno})"

        def role(match: re.Match) -> str:
            kind, content = match.group(1), match.group(2).strip()
            titled = re.fullmatch(r"(.+?)\s*<([^>]+)>", content, re.S)
            if titled:
                title, target = " ".join(titled.group(1).split()), titled.group(2)
            else:
                target = content
                title = target.lstrip("~.")
                if content.startswith("~"):
                    title = title.rsplit(".", 1)[-1]
                if kind in ("func", "meth"):
                    title += "()"
            target = target.lstrip("~")
            if target.split(".")[0] in EXTERNAL:
                return f"`{title}`"
            path, found = resolver.resolve(target, obj)
            if path is not None:
                return f"[`{title}`][{path}]"
            if not found:
                logger.warning(f"{where}: :{kind}:`{content}` names no object")
            return f"`{title}`"

        text = _math_blocks(text)
        text = _MATH_ROLE.sub(lambda m: r"\(" + m.group(1) + r"\)", text)
        text = _ROLE.sub(role, text)
        text = _LINK.sub(lambda m: f"[{' '.join(m.group(1).split())}]({m.group(2)})", text)
        if obj.is_function:
            text = self.link_shared(text)
        return text

    @staticmethod
    def _args_block(
        lines: list[str], titles: tuple[str, ...] = ("Args", "Arguments", "Parameters")
    ) -> tuple[int, int, int] | None:
        """(first line, end, indent of the names) of the ``Args:`` section, or None."""
        for i, line in enumerate(lines):
            m = _SECTION.match(line)
            if m and m.group(2) in titles:
                base = len(m.group(1))
                j = i + 1
                while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
                    j += 1
                body = [line for line in lines[i + 1 : j] if line.strip()]
                if not body:
                    return None
                return i + 1, j, _indent(body[0])
        return None

    def link_shared(self, text: str) -> str:
        lines = text.split("\n")
        block = self._args_block(lines)
        if block is None:
            return text
        start, end, indent = block
        name_re = re.compile(rf"^\s{{{indent}}}(\*{{0,2}}\w+)(?:\s*\([^)]*\))?:")
        heads = [i for i in range(start, end) if name_re.match(lines[i])]
        for k, i in enumerate(heads):
            name = name_re.match(lines[i]).group(1)
            if name not in SHARED:
                continue
            last = (heads[k + 1] if k + 1 < len(heads) else end) - 1
            while not lines[last].strip():
                last -= 1
            lines[last] += f" See [`{name}`][{SHARED[name]}]."
        return "\n".join(lines)

    def check_entries(self, obj: Any, public: str) -> None:
        """Warns about an ``Args:`` or ``Attributes:`` entry that names several things at once
        (``a, b: ...``): the Google style has one name per entry, and mkdocstrings would
        render the second name as the first one's type."""
        lines = obj.docstring.value.split("\n")
        for titles in (("Args", "Arguments", "Parameters"), ("Attributes",)):
            block = self._args_block(lines, titles)
            if block is None:
                continue
            start, end, indent = block
            for line in lines[start:end]:
                m = re.match(rf"^\s{{{indent}}}(\w+(?:\s*,\s*\w+)+)\s*:", line)
                if m:
                    logger.warning(
                        f"{public}: the {titles[0]} entry '{m.group(1)}' names several things; "
                        f"give each its own entry ({obj.relative_filepath}:{obj.lineno})"
                    )

    def check_args(self, func: Any, public: str) -> None:
        lines = func.docstring.value.split("\n")
        block = self._args_block(lines)
        documented: set[str] = set()
        if block is not None:
            start, end, indent = block
            name_re = re.compile(rf"^\s{{{indent}}}\*{{0,2}}(\w+)(?:\s*\([^)]*\))?:")
            documented = {m.group(1) for m in map(name_re.match, lines[start:end]) if m}
        for param in func.parameters:
            if param.name in ("self", "cls") or param.name in documented:
                continue
            if param.kind in (
                griffe.ParameterKind.var_positional,
                griffe.ParameterKind.var_keyword,
            ):
                continue
            logger.warning(
                f"{public}: parameter '{param.name}' is not documented in its Args section "
                f"({func.relative_filepath}:{func.lineno})"
            )
