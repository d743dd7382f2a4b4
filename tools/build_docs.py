"""Build kelly's README and documentation site without quarto.

    python tools/build_docs.py                  # README.md and the site in _site/
    python tools/build_docs.py --readme         # README.md only
    python tools/build_docs.py --no-readme --site-dir /tmp/site
    python tools/build_docs.py --no-execute     # signatures and prose only (no example outputs)
    python tools/build_docs.py --process nbs/09_exporters.ipynb   # execute and process one notebook (cached)

`nbdev_docs` is the quarto route (where quarto is installed). This script is the offline route used here
and in CI. Each notebook goes through nbdev's processors (they add a `show_doc` for every exported symbol)
with two changes: every code cell that the tests run (all but the cells flagged with `tst_flags`, e.g.
`#| notest`) is executed, so each example's output (tables, piano rolls, spectrograms, audio players) is on
the page, and `show_doc` renders with `tools/docs_render.py` (parameter tables, links inside the site).
Processed notebooks are cached in `_proc/` under a hash of the notebook, the package and this tooling, so a
second build, or a build after `tests/test_notebooks.py` ran them through `--process`, executes nothing.
The processed notebooks become markdown pages (outputs' images and audio as files beside them) and
mkdocs-material builds a static site with navigation and search. The README is generated from
`nbs/index.ipynb` (its markdown and code, no outputs).
"""
import argparse
import base64
import concurrent.futures
import configparser
import hashlib
import html
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/"nbs"
STAGE = ROOT/".docs_build"
PROC = ROOT/"_proc"
ASSETS = "outputs"                 # folder of the site (beside the pages) holding outputs' images and audio
PLOT_FORMAT = "png"                # matplotlib figures on the pages: plain PNG (retina doubles every side)
MAX_TEXT_LINES = 40                # longer text outputs are cut to this many lines on the page
DATA_URI = re.compile(r"""(src|href)=(["'])data:(image|audio)/([\w.+-]+);base64,([A-Za-z0-9+/=\s]+)\2""")
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
MIME_EXT = {"png": "png", "jpeg": "jpg", "svg+xml": "svg", "wav": "wav", "x-wav": "wav", "mpeg": "mp3", "ogg": "ogg", "flac": "flac"}
PROC_VERSION = 1                   # bump when processing changes what lands in _proc/ (invalidates the cache)
CACHE_INPUTS = ("settings.ini", "tools/docs_render.py")  # besides the notebook, kelly/*.py and PROC_VERSION
GALLERY = NBS/"gallery"            # small committed files the notebooks show (part of the cache key)
sys.path.insert(0, str(ROOT/"tools"))


class DocsBuildError(RuntimeError):
    "A notebook that could not be executed or processed for the site (the message names the notebook and cell)."
DIRECTIVE = re.compile(r"^\s*#\|.*$\n?", re.M)
TARGET_ATTR = re.compile(r"\{target=[\"'][^\"']*[\"']\}")
FRONT_MATTER = re.compile(r"^---\n(.*?)\n---", re.S)
HIDDEN_DIRECTIVES = ("#|hide", "#|include:false", "#|default_exp")


def _src(cell) -> str:
    s = cell["source"]
    return "".join(s) if isinstance(s, list) else s


def _directives(src: str) -> set:
    return {line.strip().replace(" ", "") for line in src.splitlines() if line.strip().startswith("#|")}


def _is_hidden(src: str) -> bool:
    return any(d.startswith(HIDDEN_DIRECTIVES) for d in _directives(src))


def _md_output(cell) -> str:
    "The markdown a `show_doc` cell rendered, if any."
    for out in cell.get("outputs", []):
        data = out.get("data", {})
        if "text/markdown" in data: return "".join(data["text/markdown"])
    return ""


class Assets:
    "Writes outputs' images and audio as files under `<docs>/outputs/` and names them `<page>-<n>.<ext>`."
    def __init__(self, docs: Path | None, page: str):
        self.docs, self.page, self.n = docs, page, 0

    def save(self, data: bytes, ext: str) -> str:
        "Write `data` as the next asset of this page; return its URL relative to the page."
        self.n += 1
        name = f"{ASSETS}/{self.page}-{self.n}.{ext}"
        if self.docs is not None:
            (self.docs/ASSETS).mkdir(exist_ok=True)
            (self.docs/name).write_bytes(data)
        return name

    def inline_to_files(self, markup: str) -> str:
        "Replace base64 `data:` URIs of images and audio in HTML with files."
        def sub(m):
            attr, q, kind, sub_type, payload = m.groups()
            ext = MIME_EXT.get(sub_type.lower(), sub_type.lower().split("+")[0])
            url = self.save(base64.b64decode("".join(payload.split())), ext)
            return f"{attr}={q}{url}{q}"
        return DATA_URI.sub(sub, markup)


def _text(v) -> str: return "".join(v) if isinstance(v, list) else str(v)


ANSI = re.compile(r"\x1B(?:[@-Z\\-_]|\[[0-?]*[ -/]*[@-~])")   # terminal colour codes in captured output


def _pre(text: str) -> str:
    lines = ANSI.sub("", text).rstrip("\n").splitlines()
    if len(lines) > MAX_TEXT_LINES: lines = lines[:MAX_TEXT_LINES] + [f"... ({len(lines) - MAX_TEXT_LINES} more lines)"]
    return f'<pre class="cell-output-text">{html.escape(chr(10).join(lines))}</pre>' if lines else ""


def outputs_to_html(cell, assets: Assets) -> str:
    "The outputs of an executed cell as HTML for the page: images and audio as files, tables as they are, text in `<pre>`."
    parts = []
    for out in cell.get("outputs", []):
        kind = out.get("output_type")
        if kind == "stream":
            if out.get("name") == "stdout": parts.append(_pre(_text(out.get("text", ""))))
            continue
        if kind not in ("execute_result", "display_data"): continue
        data = out.get("data", {})
        if WIDGET_MIME in data: continue   # a live widget needs a kernel; its text repr says nothing on a static page
        img = next((m for m in ("image/png", "image/jpeg") if m in data), None)
        if img:
            src = assets.save(base64.b64decode(_text(data[img])), MIME_EXT[img.split("/")[1]])
            parts.append(f'<img src="{src}" alt="output of the cell above" loading="lazy">')
        elif "image/svg+xml" in data:
            parts.append(f'<img src="{assets.save(_text(data["image/svg+xml"]).encode(), "svg")}" alt="output of the cell above">')
        elif "text/html" in data:
            parts.append(assets.inline_to_files(_text(data["text/html"])))
        elif "text/markdown" in data:
            parts.append(_text(data["text/markdown"]))
            continue
        elif "text/plain" in data:
            parts.append(_pre(_text(data["text/plain"])))
    body = "\n".join(p for p in parts if p.strip())
    return f'<div class="cell-output">\n{body}\n</div>' if body else ""


def notebook_to_markdown(nb: dict, *, for_readme: bool = False, assets: Assets | None = None) -> tuple[str, str]:
    "Markdown for a (processed or raw) notebook, and its title; with `assets`, code cells' outputs too."
    title, parts = "", []
    for cell in nb["cells"]:
        src = _src(cell)
        if cell["cell_type"] == "raw":
            m = FRONT_MATTER.match(src)
            if m:
                meta = yaml.safe_load(m.group(1)) or {}
                title = meta.get("title", title)
                parts.append(f"# {title}\n\n> {meta['description']}" if meta.get("description") else f"# {title}")
            continue
        if cell["cell_type"] == "markdown":
            if "AUTOGENERATED! DO NOT EDIT" in src: continue
            if not title:
                m = re.match(r"#\s+(.+)", src)
                if m: title = m.group(1).strip()
            parts.append(TARGET_ATTR.sub("", src))
            continue
        # code cell
        if _is_hidden(src): continue
        d = _directives(src)
        if "#|echo:false" in d:
            md = _md_output(cell)
            if md:
                parts.append(TARGET_ATTR.sub("", md.replace("\n---\n", "\n", 1).lstrip("-\n")))
                continue
        if for_readme and ("#|exec_doc" in d or "#|echo:false" in d): continue
        code = DIRECTIVE.sub("", src).strip()
        if code and "#|echo:false" not in d: parts.append(f"```python\n{code}\n```")
        if assets is not None and not for_readme and "#|output:false" not in d:
            out = outputs_to_html(cell, assets)
            if out: parts.append(out)
    return "\n\n".join(p.strip() for p in parts if p.strip()) + "\n", title or "kelly"


HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def page_anchors(md: str) -> set:
    "The ids mkdocs gives the headings of a markdown page."
    import docs_render
    return {docs_render.anchor(h) for h in HEADING.findall(FENCE.sub("", md))}


def local_links(pages: dict) -> dict:
    """Point nbdev's links to kelly symbols (`https://<doc_host>/<baseurl>/core.html#config`) at this site's pages
    (`00_core.html#config`); a symbol without its own section (a method) links to its class, else to the page."""
    import docs_render
    prefix = re.escape(docs_render.doc_prefix())
    by_nbdev_name = {docs_render.nbdev_page(f"{p}.html"): p for p in pages}
    anchors = {p: page_anchors(md) for p, md in pages.items()}
    link = re.compile(prefix + r"([\w.-]+\.html)(?:#([^)\s\"']*))?")

    def sub(m):
        page = by_nbdev_name.get(m.group(1)) or (m.group(1)[:-5] if m.group(1)[:-5] in pages else None)
        if page is None: return m.group(0)
        a = m.group(2) or ""
        for cand in (a, a.split(".")[0]):
            slug = docs_render.anchor(cand)
            if slug and slug in anchors[page]: return f"{page}.html#{slug}"
        return f"{page}.html"
    return {p: link.sub(sub, md) for p, md in pages.items()}


def build_readme(out: Path = ROOT/"README.md") -> Path:
    "README.md from nbs/index.ipynb (markdown cells and visible code)."
    nb = json.loads((NBS/"index.ipynb").read_text(encoding="utf-8"))
    md, _ = notebook_to_markdown(nb, for_readme=True)
    out.write_text(md, encoding="utf-8")
    return out


def notebooks() -> list[Path]:
    "The documented notebooks in reading order: index first, then by number."
    nbs = sorted(p for p in NBS.glob("*.ipynb") if not p.name.startswith(("_", ".")))
    return sorted(nbs, key=lambda p: (p.stem != "index", p.stem))


def test_flags() -> set:
    "The `tst_flags` of settings.ini (`notest slow`): cells carrying one run neither in tests nor in the docs build."
    cfg = configparser.ConfigParser()
    cfg.read(ROOT/"settings.ini")
    return set(cfg["DEFAULT"].get("tst_flags", "").split())


def cache_key(nb_path: Path, execute: bool) -> str:
    """Hash of what a processed notebook depends on: the notebook, the package's modules, the gallery files, the
    show_doc renderer, settings.ini, `PROC_VERSION` and whether it was executed."""
    h = hashlib.sha256(f"version={PROC_VERSION} execute={execute}\n".encode())
    for p in [Path(nb_path), *sorted((ROOT/"kelly").glob("*.py")), *(ROOT/c for c in CACHE_INPUTS),
              *sorted(f for f in GALLERY.rglob("*") if f.is_file())]:
        h.update(p.name.encode()); h.update(p.read_bytes())
    return h.hexdigest()


def _procs(execute: bool, nb_name: str = ""):
    "nbdev's processors, with `exec_show_docs` replaced by one that runs every tested cell when `execute`."
    from execnb.shell import CaptureShell
    from nbdev.processors import FilterDefaults, exec_show_docs
    if not execute: return FilterDefaults().procs()
    flags = test_flags()

    class exec_examples(exec_show_docs):
        "Run every code cell that the tests run (not `nbdev_export()`, `eval: false` or a `tst_flags` cell)."
        name = nb_name

        def begin(self):
            self.k = CaptureShell(NBS, mpl_format=PLOT_FORMAT)
            self.k.run_cell("from nbdev.showdoc import show_doc")

        def __call__(self, cell):
            if cell.cell_type != "code" or not cell.source or "nbdev_export" + "(" in cell.source: return
            d = cell.directives_ or {}
            if d.get("eval:", [""])[0].lower() == "false" or flags & d.keys(): return
            self.k.cell(cell)
            if self.k.exc:
                raise DocsBuildError(f"{self.name}: cell {cell.idx_} raised {self.k.exc!r}:\n{cell.source}\n"
                                     f"{self.k.prettytb(fname=self.name)}") from self.k.exc

    return [exec_examples if p is exec_show_docs else p for p in FilterDefaults().procs()]


def is_fresh(nb_path: Path, execute: bool = True) -> bool:
    "Whether `_proc/` holds this notebook processed from exactly its current inputs."
    nb_path = Path(nb_path)
    out, key_file = PROC/nb_path.name, PROC/f"{nb_path.stem}.key"
    return out.exists() and key_file.exists() and key_file.read_text() == cache_key(nb_path, execute)


def process_notebook(nb_path, *, execute: bool = True, force: bool = False) -> Path:
    """Process (and with `execute`, run) one notebook into `_proc/<name>.ipynb`; reuse it while its cache key holds.
    Raises `DocsBuildError` naming the notebook and the cell that failed."""
    nb_path = Path(nb_path).resolve()
    out, key_file = PROC/nb_path.name, PROC/f"{nb_path.stem}.key"
    key = cache_key(nb_path, execute)
    if not force and is_fresh(nb_path, execute): return out
    from execnb.nbio import read_nb, write_nb
    from nbdev.process import NBProcessor
    import docs_render
    PROC.mkdir(exist_ok=True)
    key_file.unlink(missing_ok=True)
    docs_render.install(f"{nb_path.stem}.html")
    os.environ["IN_TEST"] = "1"
    cwd = os.getcwd()
    os.chdir(NBS)
    try:
        nb = read_nb(nb_path)
        NBProcessor(nb=nb, procs=_procs(execute, nb_path.name)).process()
    finally:
        os.chdir(cwd)
        os.environ.pop("IN_TEST", None)
    tmp = out.with_suffix(".ipynb.tmp")
    write_nb(nb, tmp)
    os.replace(tmp, out)
    key_file.write_text(key)
    return out


def _process_one(args):
    nb_path, execute, force = args
    start = time.time()
    try: return nb_path, process_notebook(nb_path, execute=execute, force=force), None, time.time() - start
    except Exception as e: return nb_path, None, f"{type(e).__name__}: {e}", time.time() - start


def process_notebooks(force: bool = False, *, execute: bool = True, workers: int = 2) -> Path:
    "Process every documented notebook into `_proc/` (in `workers` fresh processes); raise naming every failure."
    todo = [(p, execute, force) for p in notebooks() if force or not is_fresh(p, execute)]
    print(f"  {len(notebooks()) - len(todo)} notebooks already processed in {PROC}, {len(todo)} to process", flush=True)
    ctx = multiprocessing.get_context("spawn")
    failures = []
    fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}   # a new process per notebook
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, **fresh) as ex:
        for nb_path, out, err, secs in ex.map(_process_one, todo):
            print(f"  {nb_path.name}: {'FAILED' if err else 'ok'} ({secs:.1f} s)", flush=True)
            if err: failures.append(f"{nb_path.name}: {err}")
    if failures: raise DocsBuildError("notebooks that could not be built for the site:\n" + "\n\n".join(failures))
    return PROC


def build_site(site_dir: Path, force: bool = False, *, execute: bool = True, workers: int = 2) -> Path:
    "Build the static site into `site_dir` with mkdocs-material (strict), executing the notebooks unless told not to."
    proc = process_notebooks(force, execute=execute, workers=workers)
    if STAGE.exists(): shutil.rmtree(STAGE)
    docs = STAGE/"docs"
    docs.mkdir(parents=True)
    nav, pages = [], {}
    for nb_path in notebooks():
        processed = proc/nb_path.name
        nb = json.loads(processed.read_text(encoding="utf-8"))
        pages[nb_path.stem], title = notebook_to_markdown(nb, assets=Assets(docs, nb_path.stem))
        page = "index.md" if nb_path.stem == "index" else f"{nb_path.stem}.md"
        nav.append({("Home" if page == "index.md" else f"{nb_path.stem.split('_')[0]} {title}"): page})
    import docs_render
    external = docs_render.doc_prefix()
    for stem, md in local_links(pages).items():
        if external in md:
            raise DocsBuildError(f"{stem}: a link to {external} has no page on this site: "
                                 f"{md[md.index(external):md.index(external) + 120]!r}")
        (docs/f"{stem}.md").write_text(md, encoding="utf-8")
    css = NBS/"styles.css"
    if css.exists(): shutil.copy(css, docs/"styles.css")
    config = {
        "site_name": "kelly",
        "site_description": "A notebook-first, literate Python library for deep learning on music",
        "docs_dir": "docs",
        "site_dir": str(Path(site_dir).resolve()),
        "use_directory_urls": False,
        "theme": {"name": "material", "features": ["navigation.sections", "content.code.copy"]},
        "markdown_extensions": ["tables", "admonition", "attr_list", "md_in_html",
                                {"pymdownx.highlight": {"use_pygments": True}}, "pymdownx.superfences",
                                {"toc": {"permalink": True}}],
        "extra_css": ["styles.css"] if css.exists() else [],
        "plugins": ["search"],
        "nav": nav,
        "validation": {"links": {"anchors": "warn"}},   # with --strict: a link to a missing section fails the build
    }
    (STAGE/"mkdocs.yml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(STAGE/"mkdocs.yml")],
                   check=True, cwd=STAGE, env=env)
    return Path(site_dir)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", action="store_true", help="only regenerate README.md")
    ap.add_argument("--no-readme", action="store_true", help="leave README.md alone, build the site only")
    ap.add_argument("--site-dir", default=str(ROOT/"_site"), help="where to write the site (default _site/)")
    ap.add_argument("--no-execute", action="store_true", help="do not run the examples (pages without outputs)")
    ap.add_argument("--force", action="store_true", help="ignore the cache in _proc/ and process every notebook again")
    ap.add_argument("--workers", type=int, default=2, help="notebooks processed at once (default 2)")
    ap.add_argument("--process", nargs="+", metavar="NOTEBOOK",
                    help="only execute and process these notebooks into _proc/ (what the notebook tests call)")
    args = ap.parse_args(argv)
    if args.process:
        for nb in args.process: print(f"processed {process_notebook(nb, execute=not args.no_execute, force=args.force)}")
        return
    if not args.no_readme: print(f"wrote {build_readme()}")
    if not args.readme:
        print(f"wrote site to {build_site(Path(args.site_dir), args.force, execute=not args.no_execute, workers=args.workers)}")


if __name__ == "__main__":
    main()
