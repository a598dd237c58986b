"""The documentation: docs/ builds as a MkDocs site with --strict (every link between pages and every anchor
resolves, every page is in the nav), the configuration page's tables agree with app/config.py and app/conf/,
the README stays a short entry page whose links resolve, and no page shows a path of one machine."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from app.config import compose_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of each body row of the first table under `## heading`."""
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    assert len(lines) > 2 and set(lines[1]) <= set("|-: "), heading
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


def leaves(node: dict, prefix: str = "") -> dict:
    """Dotted key -> value of every leaf of a config, unresolved (`${...}` as written)."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out |= leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def composed(overrides=()) -> dict:
    return leaves(OmegaConf.to_container(compose_config(list(overrides)), resolve=False))


def plain(value):
    """Enums (str subclasses) as their strings, so they compare with what YAML reads from the page."""
    return value.value if hasattr(value, "value") else value


def as_shown(text: str, like):
    """A value as the page writes it (YAML), read as the type of the config's value: `0` for a key typed
    str (inference.num_gpus, which is `auto` or a number) is the string "0"."""
    value = yaml.safe_load(text)
    return str(value) if isinstance(plain(like), str) and not isinstance(value, str) else value


def backticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_the_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    pages = set(re.findall(r"[\w/-]+\.md", str(nav)))
    assert pages == {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    for page in pages:
        built = site / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert built.is_file(), page


def test_the_key_table_lists_every_key_once_with_the_composed_default():
    rows = table_rows(CONFIGURATION.read_text(), "Keys")
    keys = [backticked(key)[0] for key, _, _ in rows]
    assert len(keys) == len(set(keys)), [key for key in keys if keys.count(key) > 1]
    defaults = composed()
    assert set(keys) == set(defaults), (set(keys) - set(defaults), set(defaults) - set(keys))
    for key, default, _ in rows:
        key = backticked(key)[0]
        shown = as_shown(backticked(default)[0], defaults[key])
        assert shown == plain(defaults[key]), (key, shown, defaults[key])


@pytest.mark.parametrize("group", sorted(p.name for p in (ROOT / "app" / "conf").iterdir() if p.is_dir()))
def test_the_group_table_says_what_each_option_sets(group):
    """Every option of the group once, and in its row exactly the values it changes from the defaults."""
    rows = [row for row in table_rows(CONFIGURATION.read_text(), "Config groups") if backticked(row[0]) == [group]]
    options = [backticked(option)[0] for _, option, _ in rows]
    assert sorted(options) == sorted(p.stem for p in (ROOT / "app" / "conf" / group).glob("*.yaml"))
    root = yaml.safe_load((ROOT / "app" / "conf" / "config.yaml").read_text())["defaults"]
    default = next(entry[group] for entry in root if isinstance(entry, dict) and group in entry)
    assert [option for _, option, _ in rows if "(default)" in option] == ([f"`{default}` (default)"] if default else [])
    base = composed()
    for _, option, sets in rows:
        option = backticked(option)[0]
        changed = {key: plain(value) for key, value in composed([f"{group}={option}"]).items() if value != base[key]}
        documented = dict(item.split("=", 1) for item in backticked(sets) if "=" in item)
        assert {key: as_shown(value, changed.get(key)) for key, value in documented.items()} == changed, (group, option)


def test_the_readme_is_a_short_entry_page_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "bash scripts/test.sh\n" in readme  # CI runs the README's test command (tests/test_release.py)
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local)
    for link in local:
        assert (ROOT / link).exists(), link


def test_no_page_shows_a_path_of_one_machine():
    machine_path = re.compile(r"(?<![\w.~$])/(?:work|home|tmp|root|Users|mnt/c)/")
    for page in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            assert not machine_path.search(line), f"{page.relative_to(ROOT)}:{number}: {line}"
