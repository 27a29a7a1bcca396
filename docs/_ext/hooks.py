"""mkdocs hooks: the benchmark results and benchmarks/README.md, read where they are committed.

The Performance and Which method? pages show the plots and link to the tables that the
benchmark scripts write under ``benchmarks/``; rather than copies in ``docs/``, the files are
added to the site under the same paths (``benchmarks/README.md`` is the Benchmarks page).
"""

from __future__ import annotations

import pathlib

from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = [
    "benchmarks/README.md",
    "benchmarks/results/*.md",
    "benchmarks/results/*.png",
    "benchmarks/results/*.txt",
]


def on_files(files, config):
    for pattern in SOURCES:
        for path in sorted(ROOT.glob(pattern)):
            uri = path.relative_to(ROOT).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_serve(server, config, builder):
    server.watch(str(ROOT / "benchmarks"))
    server.watch(str(ROOT / "CHANGELOG.md"))
    return server
