"""Write the values table of the chart README (charts/ray-detect/README.md) from values.yaml, so that the
defaults and their descriptions live in one place: values.yaml.

A key whose comment starts with `# -- ` gets a row: the key's dotted path, its default (values.yaml's value,
in YAML flow style) and the comment (its `# -- ` line and the `#` lines that follow, up to the key). A key
without one is a section: its keys get the rows. The table goes between the README's two marker lines.
tests/test_chart.py checks that the README holds what this script writes.

    .venv/bin/python scripts/chart-values-table.py          # rewrite the table
    .venv/bin/python scripts/chart-values-table.py --check  # exit 1 if the README's table is out of date
"""

import re
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parent.parent / "charts" / "ray-detect"
VALUES = CHART / "values.yaml"
README = CHART / "README.md"
BEGIN = "<!-- values table: written by scripts/chart-values-table.py from values.yaml's comments; do not edit -->"
END = "<!-- end of the values table -->"
KEY_LINE = re.compile(r"^( *)([A-Za-z][\w-]*):")


def documented_keys(text: str) -> list[tuple[str, str]]:
    """(dotted path, description) of each key with a `# -- ` comment, in the file's order."""
    rows, stack, comment = [], [], None  # stack: (indent, key) of the enclosing keys
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("# -- "):
            comment = [stripped.removeprefix("# -- ")]
        elif stripped.startswith("#"):
            if comment is not None:
                comment.append(stripped.removeprefix("#").strip())
        elif match := KEY_LINE.match(line):
            indent = len(match.group(1))
            stack = [(i, k) for i, k in stack if i < indent] + [(indent, match.group(2))]
            if comment is not None:
                rows.append((".".join(k for _, k in stack), " ".join(comment)))
            comment = None
        else:
            if comment is not None and stripped:
                raise SystemExit(f"values.yaml:{number}: a `# -- ` comment must stand right above its key")
            comment = None if not stripped else comment
    return rows


def lookup(values: dict, path: str):
    for key in path.split("."):
        values = values[key]
    return values


def flow(value) -> str:
    """A value as YAML writes it on one line: "", {} and [] as such, maps and lists in flow style."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=sys.maxsize).strip()
    return text.removesuffix("...").strip()


def markdown(text: str) -> str:
    """A description as a table cell: `|` escaped, and `<` outside code spans, which Markdown would read as
    the start of an HTML tag."""
    parts = text.replace("|", "\\|").split("`")
    return "`".join(part if i % 2 else part.replace("<", "&lt;") for i, part in enumerate(parts))


def table(values_text: str) -> str:
    values = yaml.safe_load(values_text)
    rows = ["| Key | Default | Description |", "| --- | --- | --- |"]
    for path, description in documented_keys(values_text):
        rows.append(f"| `{path}` | `{flow(lookup(values, path))}` | {markdown(description)} |")
    return "\n".join(rows)


def with_table(readme: str, values_text: str) -> str:
    """The README with the table between its markers replaced by the one values.yaml makes."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1:
        raise SystemExit(f"{README.name} needs one line each of:\n{BEGIN}\n{END}")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table(values_text)}\n{END}{tail}"


def main() -> int:
    readme, wanted = README.read_text(), with_table(README.read_text(), VALUES.read_text())
    if sys.argv[1:] == ["--check"]:
        if readme != wanted:
            print(f"{README} is out of date: run python scripts/chart-values-table.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
