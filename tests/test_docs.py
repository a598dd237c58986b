"""The documentation: docs/ builds as a MkDocs site with --strict (every link between pages and every anchor
resolves, every page is in the nav, the topology picture is drawn into it), the configuration page's tables
agree with app/config.py and app/conf/, the README stays a short entry page whose links resolve, no page shows
a path of one machine, the model list and the GPU requirements have one source each, and every benchmark
file a figure cites exists. About 25 s, most of it the site's build (which needs Graphviz's dot)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from app.config import compose_config

pytestmark = pytest.mark.slow  # the MkDocs build and the configs composed for the tables

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
    # The topology picture, drawn from docs/topology.dot by the build's hook, is in the site and on its page.
    topology = (site / "topology.svg").read_text()
    assert topology.startswith("<?xml") and "<svg" in topology
    for box in ("head pod", "CPU worker group", "GPU worker group", "KubeRay operator", "Argo CD", "Prometheus", "S3"):
        assert box in topology, box
    assert '<img alt="What runs where' in (site / "kubernetes" / "index.html").read_text()
    assert 'src="../topology.svg"' in (site / "kubernetes" / "index.html").read_text()
    # The report's screenshot (scripts/screenshot-report.sh) stays small enough to keep in the repository.
    assert (site / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (DOCS / "report.png").stat().st_size < 300_000


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


# ---------------------------------------------------------------------------------------------------
# One source for each fact: the model list (app.model.MODEL_NAMES) and the GPU requirements
# (app.device.IMAGE_REQUIREMENTS). The Dockerfile's baked models and its requirements comment are checked by
# tests/test_dockerfile.py.
# ---------------------------------------------------------------------------------------------------

def test_every_list_of_the_models_is_app_model_names():
    from app.model import MODEL_NAMES
    from app.plan import DEFAULT_BATCH_SIZES

    group = {path.stem: yaml.safe_load(path.read_text())["name"] for path in (ROOT / "app" / "conf" / "model").glob("*.yaml")}
    assert group == {name: name for name in MODEL_NAMES}  # the config group (and so the configuration page)
    assert list(DEFAULT_BATCH_SIZES) == list(MODEL_NAMES)
    # The batch-size table of the performance page: every model once, with the sizes app/plan.py picks.
    rows = table_rows((DOCS / "performance.md").read_text(), "Batch sizes")
    shown = {name: {"cpu": int(cpu), "gpu": int(gpu)} for models, cpu, gpu in rows for name in backticked(models)}
    assert shown == DEFAULT_BATCH_SIZES
    # No page counts the models in words, which a new model would make wrong.
    for page in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        assert not re.search(r"\b(two|three|four|five|six) (torchvision )?(FasterRCNN )?models\b", page.read_text(), re.I), page


# Where the GPU requirements are stated or explained: one docs section, and the exact words of
# IMAGE_REQUIREMENTS (the app's error message says them) anywhere else.
GPU_REQUIREMENT_MENTION = re.compile(r"\bR\d{3}\b|Turing|compute capability \d+\.\d+ or (?:newer|more)")
GPU_REQUIREMENTS_SECTION = "### GPU requirements\n"


def flowing(text: str) -> str:
    """Text with its lines joined and comment markers dropped, as a sentence wrapped over a YAML comment reads."""
    return re.sub(r"\s+", " ", " ".join(re.sub(r"^\s*#*\s*", "", line) for line in text.splitlines()))


def test_the_gpu_requirements_are_stated_once():
    from app.device import IMAGE_REQUIREMENTS

    page = (DOCS / "kubernetes.md").read_text()
    before, section = page.split(GPU_REQUIREMENTS_SECTION, 1)
    section, after = section.split("\n### ", 1)
    assert f"GPU nodes need {IMAGE_REQUIREMENTS}" in flowing(section)
    texts = {"docs/kubernetes.md (outside its GPU requirements)": before + after}
    for path in [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "charts" / "ray-detect" / "README.md",
                 ROOT / "charts" / "ray-detect" / "values.yaml", *sorted(DOCS.rglob("*.md"))]:
        if path != DOCS / "kubernetes.md":
            texts[str(path.relative_to(ROOT))] = path.read_text()
    for name, text in texts.items():
        rest = flowing(text).replace(IMAGE_REQUIREMENTS, "")
        assert not GPU_REQUIREMENT_MENTION.findall(rest), (name, [rest[max(m.start() - 60, 0):m.end() + 20]
                                                                  for m in GPU_REQUIREMENT_MENTION.finditer(rest)])
    # The README and the GPU group's values state them, and say where they are explained.
    for path in (ROOT / "README.md", ROOT / "charts" / "ray-detect" / "values.yaml"):
        assert IMAGE_REQUIREMENTS in flowing(path.read_text()) and "GPU requirements" in path.read_text(), path


def test_every_benchmark_file_a_page_cites_exists():
    """Measured figures cite the file that holds their run (benchmarks/...), which a reader can open."""
    cited = set()
    for page in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        cited |= set(re.findall(r"benchmarks/[\w.*-]*\w", page.read_text()))
    assert "benchmarks/gpu-h200-2026-12-04.txt" in cited
    for path in sorted(cited):  # a name or a pattern (benchmarks/gpu-*.txt)
        assert [found for found in ROOT.glob(path) if found.is_file()], path
