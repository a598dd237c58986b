"""MkDocs hooks (mkdocs.yml `hooks:`): the pictures drawn from text when the docs are built.

Each Graphviz source docs/<name>.dot becomes docs/<name>.svg in the site, drawn by Graphviz's `dot`
(Debian: `apt-get install graphviz`), so a page links `<name>.svg` and no drawing is committed.
"""

import shutil
import subprocess
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files


def on_files(files: Files, config) -> Files:
    dot = shutil.which("dot")
    for source in sorted(Path(config["docs_dir"]).glob("*.dot")):
        if dot is None:
            raise PluginError(f"Graphviz's dot is needed to draw docs/{source.name}: install graphviz "
                             "(Debian and Ubuntu: sudo apt-get install -y graphviz)")
        drawn = subprocess.run([dot, "-Tsvg", str(source)], capture_output=True, check=False)
        if drawn.returncode != 0:
            raise PluginError(f"dot could not draw docs/{source.name}: {drawn.stderr.decode().strip()}")
        files.append(File.generated(config, source.with_suffix(".svg").name, content=drawn.stdout))
    return files
