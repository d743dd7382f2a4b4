"""How kelly's docs site renders a symbol: `show_doc` with a parameter table.

`tools/build_docs.py` installs `KellyRenderer` as nbdev's `show_doc` renderer while it processes the notebooks.
nbdev's default renderer prints a signature whose types come from the defaults (`tokenizer: NoneType=None`), with
module prefixes (`__main__.SamplingConfig`), exceptions as `def SamplerError(*args, **kwargs)`, every fastai event
of a callback as a parameter, and the comment of `**kwargs` as the return value's. This one renders:

- functions and methods: a short signature, the docstring, and a table of parameters (name, type as annotated,
  default, the comment on the parameter's own line) ending with what it returns;
- dataclasses (configs, reports) and NamedTuples: `class Name(Base)` and a table of their fields with the comment
  on each field's line;
- exceptions: `class Name(Base)` and the docstring (a table only when they define their own `__init__`);
- fastai callbacks: the class's own `__init__` parameters, never the event methods (`before_*`, `after_*`).

Types that are kelly symbols link to their section of the site (`symbol_url`).
"""
import ast
import configparser
import dataclasses
import html
import importlib
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB = "kelly"
SHORT_MODULES = ("builtins", "typing", "collections.abc", "pathlib", "__main__")  # types shown without a prefix
CODE_SPAN = re.compile(r"`([^`]+)`")

_pages: dict | None = None
_current_page: str | None = None   # the page being built: where symbols the notebook itself defines (`__main__`) live


def module_pages() -> dict:
    "Map `kelly.<module>` to the site page (`<notebook stem>.html`) of the notebook that exports it."
    global _pages
    if _pages is None:
        exp = re.compile(r"^\s*#\|\s*default_exp\s+(\S+)", re.M)
        _pages = {}
        for nb in sorted((ROOT/"nbs").glob("*.ipynb")):
            cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
            src = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
            m = exp.search(src)
            if m: _pages[f"{LIB}.{m.group(1)}"] = f"{nb.stem}.html"
    return _pages


def anchor(name: str) -> str:
    "The id mkdocs gives the `### name` heading of a symbol (Python-Markdown's toc slug)."
    from markdown.extensions.toc import slugify
    return slugify(name, "-")


def doc_prefix() -> str:
    "Where nbdev links kelly symbols (`doc_host` + `doc_baseurl` of settings.ini); the build points these links at its pages."
    cfg = configparser.ConfigParser()
    cfg.read(ROOT/"settings.ini")
    d = cfg["DEFAULT"]
    return d.get("doc_host", "").rstrip("/") + "/" + d.get("doc_baseurl", "").strip("/") + "/"


def nbdev_page(page: str) -> str:
    "nbdev's name for a notebook's page (`08_samplers.html` -> `samplers.html`)."
    return re.sub(r"^\d+[a-z]?_", "", page)


def symbol_url(obj) -> str | None:
    """Link to a kelly class or function in nbdev's form (`<doc_prefix>samplers.html#samplingconfig`), which the
    build rewrites to this site's page and section; None for anything else."""
    mod = getattr(obj, "__module__", None) or ""
    page = _current_page if mod == "__main__" else module_pages().get(mod)
    if page is None: return None
    return f"{doc_prefix()}{nbdev_page(page)}#{anchor(obj.__qualname__)}"


def _esc(s) -> str: return html.escape(str(s), quote=False)


def _prose(s: str | None) -> str:
    "A comment as HTML: escaped, `code spans` kept."
    if not s: return ""
    return CODE_SPAN.sub(lambda m: f"<code>{m.group(1)}</code>", _esc(s))


def fmt_type(a, *, link: bool = True) -> str:
    "An annotation as HTML: `A | None`, `Iterator[torch.Tensor]`, kelly classes linked, no module prefix for builtins."
    if a is inspect.Parameter.empty: return ""
    if a is None or a is type(None): return "None"
    if isinstance(a, str): return _esc(a)
    if isinstance(a, (list, tuple)): return "[" + ", ".join(fmt_type(x, link=link) for x in a) + "]"
    origin, args = typing.get_origin(a), typing.get_args(a)
    if origin is typing.Union or isinstance(a, types.UnionType):
        return " | ".join(fmt_type(x, link=link) for x in args)
    if origin is typing.Literal: return "Literal[" + ", ".join(_esc(repr(x)) for x in args) + "]"
    if origin is not None:
        name = getattr(a, "_name", None) or getattr(origin, "__qualname__", str(origin))
        return f"{_esc(name)}[{', '.join(fmt_type(x, link=link) for x in args)}]" if args else _esc(name)
    if a is Ellipsis: return "..."
    if inspect.isclass(a):
        mod, qual = a.__module__, a.__qualname__
        url = symbol_url(a) if link else None
        if url: return f'<a href="{url}">{_esc(qual)}</a>'
        if mod in SHORT_MODULES or mod.split(".")[0] == LIB: return _esc(qual)
        top = mod.split(".")[0]
        if getattr(sys.modules.get(top), a.__name__, None) is a: return _esc(f"{top}.{qual}")
        return _esc(f"{mod}.{qual}")
    return _esc(str(a).replace("typing.", ""))


def fmt_default(d) -> str:
    "A default value as HTML (empty when there is none)."
    if d is inspect.Parameter.empty or d is dataclasses.MISSING: return ""
    if inspect.isfunction(d) or inspect.isclass(d): return f"<code>{_esc(d.__qualname__)}</code>"
    return f"<code>{_esc(repr(d))}</code>"


def _comments(src: str) -> dict:
    "Line number (1-based) -> text of the comment on that line."
    res = {}
    try:
        for t in tokenize.generate_tokens(io.StringIO(src).readline):
            if t.type == tokenize.COMMENT: res[t.start[0]] = t.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError, SyntaxError): pass
    return res


def _source(obj) -> str | None:
    try: return textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError): return None


def param_comments(fn) -> dict:
    """The comment on each parameter's own line (the last parameter on a line owns its comment), and `return`:
    the comment on the line of `) -> R:` when no parameter sits on that line."""
    src = _source(fn)
    if src is None: return {}
    try: tree = ast.parse(src)
    except SyntaxError: return {}
    node = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if node is None: return {}
    comments = _comments(src)
    a = node.args
    params = [*a.posonlyargs, *a.args, *([a.vararg] if a.vararg else []), *a.kwonlyargs, *([a.kwarg] if a.kwarg else [])]
    by_line = {}
    for p in params: by_line[p.end_lineno] = p.arg      # the last one on a line wins
    res = {name: comments[line] for line, name in by_line.items() if line in comments}
    if node.returns is not None and node.returns.lineno not in by_line and node.returns.lineno in comments:
        res["return"] = comments[node.returns.lineno]
    return res


def field_comments(cls) -> dict:
    "The comment on the line of each annotated field in a class body (dataclasses, NamedTuples)."
    src = _source(cls)
    if src is None: return {}
    try: tree = ast.parse(src)
    except SyntaxError: return {}
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    if node is None: return {}
    comments = _comments(src)
    return {s.target.id: comments[s.end_lineno] for s in node.body
            if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.end_lineno in comments}


def _hints(obj) -> dict:
    try: return typing.get_type_hints(obj)
    except Exception:
        return getattr(obj, "__annotations__", {}) or {}


def _is_callback(cls) -> bool:
    cb = sys.modules.get("fastai.callback.core")
    return cb is not None and inspect.isclass(cls) and issubclass(cls, cb.Callback)


def _event_names() -> set:
    cb = sys.modules.get("fastai.callback.core")
    return set(getattr(cb, "_events", [])) if cb else set()


def _row(name, typ, default, details) -> str:
    return (f'<tr data-param="{_esc(name)}"><td><code>{_esc(name)}</code></td><td class="param-type">{typ}</td>'
            f'<td class="param-default">{default}</td><td class="param-details">{details}</td></tr>')


def _table(head: str, rows: list[str]) -> str:
    if not rows: return ""
    return (f'<table class="kelly-params"><thead><tr><th>{head}</th><th>type</th><th>default</th><th>details</th>'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _callable_params(fn, *, skip: set = frozenset()) -> tuple[list[str], list[str], str]:
    "Signature pieces, table rows and the returns row of a function (or a class's `__init__`)."
    try: sig = inspect.signature(fn)
    except (ValueError, TypeError): return [], [], ""
    hints, comments = _hints(fn), param_comments(fn)
    pieces, rows, star_done = [], [], False
    for i, p in enumerate(sig.parameters.values()):
        if p.name in skip or (i == 0 and p.name in ("self", "cls")): continue
        if p.kind == p.KEYWORD_ONLY and not star_done: pieces.append("*"); star_done = True
        if p.kind == p.VAR_POSITIONAL: star_done = True
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        shown = prefix + p.name
        pieces.append(shown + ("" if p.default is p.empty else f"={p.default!r}"))
        anno = hints.get(p.name, p.annotation)
        rows.append(_row(shown, fmt_type(anno), fmt_default(p.default), _prose(comments.get(p.name))))
    ret = hints.get("return", sig.return_annotation)
    ret_row = ""
    if ret is not inspect.Signature.empty and ret is not None or comments.get("return"):
        ret_row = _row("returns", fmt_type(ret), "", _prose(comments.get("return")))
        rows.append(ret_row.replace('data-param="returns"', 'data-param="return" class="param-return"', 1))
    return pieces, rows, ret_row


def _bases(cls) -> str:
    if issubclass(cls, tuple) and hasattr(cls, "_fields"): return "(NamedTuple)"
    bs = [b for b in cls.__bases__ if b is not object]
    if not bs: return ""
    return "(" + ", ".join(re.sub(r"<[^>]+>", "", fmt_type(b, link=False)) for b in bs) + ")"


def exported(sym):
    """The package's own object for a symbol the notebook defined in its shell (`__main__`), whose source (and so
    its comments) Python cannot find; `sym` itself when there is none."""
    if getattr(sym, "__module__", None) != "__main__" or _current_page is None: return sym
    mod = next((m for m, p in module_pages().items() if p == _current_page), None)
    try: obj = importlib.import_module(mod) if mod else None
    except ImportError: return sym
    for part in getattr(sym, "__qualname__", "").split("."):
        obj = getattr(obj, part, None)
    return obj if obj is not None else sym


def render(sym, name: str | None = None, title_level: int = 3) -> str:
    "The markdown (with an HTML table) for one symbol on the site."
    if isinstance(sym, property): sym = sym.fget
    sym = exported(sym)
    sym = inspect.unwrap(sym) if callable(sym) and not inspect.isclass(sym) else sym
    nm = name or getattr(sym, "__qualname__", None) or getattr(sym, "__name__", str(sym))
    doc = inspect.getdoc(sym) or ""
    if inspect.isclass(sym) and doc and doc == inspect.getdoc(sym.__mro__[1] if len(sym.__mro__) > 1 else object):
        doc = ""  # inherited docstring (e.g. NamedTuple's, Exception's): nothing of its own to say
    out, table = [], ""
    if inspect.isclass(sym):
        kind = "exception" if issubclass(sym, BaseException) else "class"
        sig = f"class {nm.split('.')[-1]}{_bases(sym)}"
        if dataclasses.is_dataclass(sym):
            hints, comments = _hints(sym), field_comments(sym)
            for c in reversed(sym.__mro__[1:]):   # fields inherited from a dataclass base keep their comments
                if dataclasses.is_dataclass(c): comments = {**field_comments(c), **comments}
            rows = []
            for f in dataclasses.fields(sym):
                d = f.default if f.default is not dataclasses.MISSING else (
                    f.default_factory if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
                rows.append(_row(f.name, fmt_type(hints.get(f.name, f.type)), fmt_default(d), _prose(comments.get(f.name))))
            table = _table("field", rows)
        elif issubclass(sym, tuple) and hasattr(sym, "_fields"):
            hints, comments, defaults = _hints(sym), field_comments(sym), getattr(sym, "_field_defaults", {})
            rows = [_row(f, fmt_type(hints.get(f, inspect.Parameter.empty)), fmt_default(defaults.get(f, inspect.Parameter.empty)),
                         _prose(comments.get(f))) for f in sym._fields]
            table = _table("field", rows)
        elif kind == "exception" and "__init__" not in sym.__dict__:
            table = ""
        else:
            init, skip = sym.__init__, (_event_names() if _is_callback(sym) else set())
            if init is not object.__init__:
                pieces, rows, _ = _callable_params(init, skip=skip)
                rows = [r for r in rows if 'data-param="return"' not in r]
                table = _table("parameter", rows)
    else:
        pieces, rows, _ = _callable_params(sym)
        sig = f"{nm}({', '.join(pieces)})"
        try:
            ret = inspect.signature(sym).return_annotation
            if ret is not inspect.Signature.empty:
                sig += " -> " + re.sub(r"<[^>]+>", "", html.unescape(fmt_type(_hints(sym).get("return", ret), link=False)))
        except (ValueError, TypeError): pass
        table = _table("parameter", rows)
    out.append(f"{'#' * title_level} {nm}")
    out.append(f"```python\n{sig}\n```")
    if doc: out.append(re.sub(r"^(\s*)(.+)", r"\1*\2*", doc, count=1))
    if table: out.append(table)
    return "\n\n".join(out)


class KellyRenderer:
    "A `show_doc` renderer (nbdev's interface: `renderer(sym, name=, title_level=)` with `_repr_markdown_`)."
    def __init__(self, sym, name: str | None = None, title_level: int = 3):
        self.sym, self.name, self.title_level = sym, name, title_level

    def _repr_markdown_(self) -> str:
        from nbdev.doclinks import NbdevLookup
        head = "---\n\n"
        try: src = NbdevLookup().code(self.sym)
        except Exception: src = None
        if src: head += f'[source]({src}){{target="_blank" style="float:right; font-size:smaller"}}\n\n'
        return head + render(self.sym, self.name, self.title_level)

    def __repr__(self) -> str: return render(self.sym, self.name, self.title_level)


def install(page: str | None = None):
    "Make nbdev's `show_doc` (in this process) render with `KellyRenderer`, for the site page `page` (`08_samplers.html`)."
    global _current_page
    import nbdev.showdoc
    nbdev.showdoc.BasicMarkdownRenderer = KellyRenderer
    _current_page = page
