"""The QuPath extension catalog (``qupath_extension/catalog/catalog.json``) that a
user adds in QuPath 0.6's *Extensions > Manage extensions > Manage extension
catalogs*, checked against the rules QuPath itself applies when it reads one, and
against the extension's build file, Help URL and README.

The rules are those of QuPath's catalog model: the Java records of the extension
manager QuPath 0.6 ships (``qupath.ext.extensionmanager.core.model``:
``CatalogModel``, ``ExtensionModel``, ``ReleaseModel``, ``VersionRangeModel``,
read with Gson's LOWER_CASE_WITH_UNDERSCORES naming, so the JSON is snake_case)
and the pydantic model ``extension_catalog_model.model`` that QuPath's own
catalog is validated with.  Where the two differ, the stricter one is applied:

- Catalog: ``name``, ``description``, ``extensions`` required; no two extensions
  with the same name.
- Extension: ``name``, ``description``, ``author``, ``homepage``, ``releases``
  required, ``starred`` optional (bool); ``homepage`` an https github.com URL of
  a repository (``/owner/repo``, owner letters and digits only).
- Release: ``name`` and every version ``v<MAJOR>.<MINOR>.<PATCH>`` with an
  optional ``-rc<N>``; ``main_url`` like the homepage; ``version_range``
  required; ``required_dependency_urls``, ``optional_dependency_urls``,
  ``javadoc_urls`` optional lists of https URLs on github.com, maven.scijava.org
  or repo1.maven.org.
- VersionRange: ``min`` required; ``max`` optional and not below ``min``;
  ``excludes`` optional, each within [min, max].  A release candidate sorts
  before its release (v0.6.0-rc4 < v0.6.0).

Unknown keys are refused too: QuPath would silently ignore a misspelt optional
key, which is exactly the mistake a test should catch.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXT = ROOT / "qupath_extension"
CATALOG = EXT / "catalog" / "catalog.json"
BUILD = EXT / "build.gradle.kts"
SETTINGS = EXT / "settings.gradle.kts"
HELP_JAVA = EXT / "src/main/java/qupath/ext/nuclick/core/Help.java"
EXTENSION_JAVA = EXT / "src/main/java/qupath/ext/nuclick/NuClickExtension.java"
README = ROOT / "README.md"

_VERSION = re.compile(r"^v([0-9]+)\.([0-9]+)\.([0-9]+)(?:-rc([0-9]+))?$")
_GITHUB_REPO_PATH = re.compile(r"^/[0-9a-zA-Z]+/[0-9a-zA-Z]+/?")
_DEPENDENCY_HOSTS = {"github.com", "maven.scijava.org", "repo1.maven.org"}
_KEYS = {
    "catalog": ({"name", "description", "extensions"}, set()),
    "extension": ({"name", "description", "author", "homepage", "releases"}, {"starred"}),
    "release": (
        {"name", "main_url", "version_range"},
        {"required_dependency_urls", "optional_dependency_urls", "javadoc_urls"},
    ),
    "version_range": ({"min"}, {"max", "excludes"}),
}


class CatalogError(ValueError):
    pass


def version_key(text: Any) -> tuple[int, int, int, float]:
    """QuPath's ordering of catalog versions; a malformed one is a CatalogError."""
    m = _VERSION.match(text) if isinstance(text, str) else None
    if m is None:
        raise CatalogError(f"version {text!r} is not v<MAJOR>.<MINOR>.<PATCH> with an optional -rc<N>")
    rc = float(m[4]) if m[4] is not None else float("inf")
    return int(m[1]), int(m[2]), int(m[3]), rc


def _keys(obj: Any, kind: str, where: str) -> dict:
    if not isinstance(obj, dict):
        raise CatalogError(f"{where}: a {kind} must be a JSON object")
    required, optional = _KEYS[kind]
    missing = required - obj.keys()
    if missing:
        raise CatalogError(f"{where}: missing {sorted(missing)}")
    unknown = obj.keys() - required - optional
    if unknown:
        raise CatalogError(f"{where}: unknown keys {sorted(unknown)}")
    for key in obj.keys() & {"name", "description", "author"}:
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise CatalogError(f"{where}: '{key}' must be a non-empty string")
    return obj


def _https(url: Any, where: str):
    if not isinstance(url, str):
        raise CatalogError(f"{where}: {url!r} is not a URL")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or " " in url:
        raise CatalogError(f"{where}: {url} is not a well-formed https URL")
    return parts


def _github_repo_url(url: Any, where: str) -> None:
    parts = _https(url, where)
    if parts.hostname != "github.com" or not _GITHUB_REPO_PATH.match(parts.path):
        raise CatalogError(f"{where}: {url} must point into a github.com repository (/owner/repo)")


def check_version_range(vr: Any, where: str) -> None:
    _keys(vr, "version_range", where)
    low = version_key(vr["min"])
    high = version_key(vr["max"]) if vr.get("max") is not None else None
    if high is not None and low > high:
        raise CatalogError(f"{where}: min {vr['min']} is above max {vr['max']}")
    for excluded in vr.get("excludes") or []:
        v = version_key(excluded)
        if v < low or (high is not None and v > high):
            raise CatalogError(f"{where}: excluded {excluded} is outside [min, max]")


def check_release(release: Any, where: str) -> None:
    _keys(release, "release", where)
    version_key(release["name"])
    _github_repo_url(release["main_url"], f"{where} main_url")
    for key in ("required_dependency_urls", "optional_dependency_urls", "javadoc_urls"):
        urls = release.get(key)
        if urls is None:
            continue
        if not isinstance(urls, list):
            raise CatalogError(f"{where}: '{key}' must be a list of URLs")
        for url in urls:
            if _https(url, f"{where} {key}").hostname not in _DEPENDENCY_HOSTS:
                raise CatalogError(f"{where}: {url} is not on {sorted(_DEPENDENCY_HOSTS)}")
    check_version_range(release["version_range"], f"{where} version_range")


def check_catalog(catalog: Any) -> None:
    """Raise CatalogError with the first rule the catalog breaks."""
    _keys(catalog, "catalog", "catalog")
    extensions = catalog["extensions"]
    if not isinstance(extensions, list):
        raise CatalogError("catalog: 'extensions' must be a list")
    names = [e.get("name") if isinstance(e, dict) else None for e in extensions]
    if len(names) != len(set(names)):
        raise CatalogError("catalog: two extensions have the same name")
    for i, ext in enumerate(extensions):
        where = f"extensions[{i}]"
        _keys(ext, "extension", where)
        _github_repo_url(ext["homepage"], f"{where} homepage")
        if "starred" in ext and not isinstance(ext["starred"], bool):
            raise CatalogError(f"{where}: 'starred' must be true or false")
        if not isinstance(ext["releases"], list):
            raise CatalogError(f"{where}: 'releases' must be a list")
        for j, release in enumerate(ext["releases"]):
            check_release(release, f"{where}.releases[{j}]")


def _gradle_val(name: str) -> str:
    m = re.search(rf'^val {name} = "([^"]+)"$', BUILD.read_text(), re.MULTILINE)
    assert m, f"build.gradle.kts has no 'val {name} = \"...\"'"
    return m[1]


@pytest.fixture(scope="module")
def catalog() -> dict:
    return json.loads(CATALOG.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def ours(catalog) -> dict:
    (ext,) = [e for e in catalog["extensions"] if e["name"] == "NuClick"]
    return ext


def test_catalog_follows_qupaths_catalog_model(catalog):
    check_catalog(catalog)


def test_latest_release_is_the_version_and_jar_the_build_makes(ours):
    name, version = _gradle_val("extensionName"), _gradle_val("extensionVersion")
    build = BUILD.read_text()
    assert re.search(r"^\s+name = extensionName$", build, re.MULTILINE)
    assert re.search(r"^\s+version = extensionVersion$", build, re.MULTILINE)
    assert 'archiveFileName = "$extensionName-$extensionVersion.jar"' in build
    latest = max(ours["releases"], key=lambda r: version_key(r["name"]))
    assert latest is ours["releases"][0], "QuPath lists releases in catalog order: newest first"
    assert latest["name"] == f"v{version}"
    jar = f"{name}-{version}.jar"
    assert latest["main_url"] == f"{ours['homepage']}/releases/download/v{version}/{jar}"
    names = [r["name"] for r in ours["releases"]]
    assert len(names) == len(set(names)), "each release once"


def test_supported_qupath_versions_are_those_the_extension_is_built_for(ours):
    built_for = re.search(r'version = "([0-9.]+)"', SETTINGS.read_text())[1]
    declared = re.search(r'Version\.parse\("([0-9.]+)"\)', EXTENSION_JAVA.read_text())[1]
    for release in ours["releases"]:
        vr = release["version_range"]
        for v in (built_for, declared):
            assert version_key(vr["min"]) <= version_key(f"v{v}") <= version_key(vr["max"])
        # QuPath 0.6 only: the extension uses 0.6's API (MinimalMetadataStore, fxtras 0.2 dialogs).
        assert version_key(vr["max"]) < version_key("v0.7.0")


def test_help_menu_opens_the_readme_section_on_the_catalogs_homepage(ours):
    java = HELP_JAVA.read_text()
    homepage = re.search(r'HOMEPAGE = "([^"]+)"', java)[1]
    assert homepage == ours["homepage"]
    assert 'README_SECTION = HOMEPAGE + "#qupath-extension"' in java
    # GitHub's anchor for a heading: lower case, spaces to '-'.
    headings = re.findall(r"^## (.+)$", README.read_text(encoding="utf-8"), re.MULTILINE)
    assert "qupath-extension" in [h.strip().lower().replace(" ", "-") for h in headings]


def _valid() -> dict:
    return {
        "name": "Lab catalog",
        "description": "Extensions of our lab",
        "extensions": [
            {
                "name": "A",
                "description": "d",
                "author": "lab",
                "homepage": "https://github.com/mylab/qupath-extension-a",
                "releases": [
                    {
                        "name": "v0.3.0-rc2",
                        "main_url": "https://github.com/mylab/qupath-extension-a/releases/download/v0.3.0-rc2/a.jar",
                        "javadoc_urls": ["https://maven.scijava.org/content/a-javadoc.jar"],
                        "version_range": {"min": "v0.6.0-rc4", "max": "v0.6.0", "excludes": ["v0.6.0-rc5"]},
                    }
                ],
            }
        ],
    }


def _broken(path: str, value: Any) -> dict:
    """The valid sample with one field set (value ...) or deleted (value None on the last key)."""
    doc = _valid()
    node: Any = doc
    *parents, last = path.split(".")
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return doc


def test_the_checker_accepts_a_valid_catalog():
    check_catalog(_valid())


@pytest.mark.parametrize(
    ("path", "value", "why"),
    [
        ("description", None, r"missing \['description'\]"),
        ("extensions.0.author", None, r"missing \['author'\]"),
        ("extensions.0.releases.0.version_range", None, r"missing \['version_range'\]"),
        ("extensions.0.releases.0.version_range.min", None, r"missing \['min'\]"),
        ("extensions.0.releases.0.mainUrl", "https://github.com/a/b", "unknown keys"),
        ("extensions.0.releases.0.name", "0.1.0", "is not v<MAJOR>"),
        ("extensions.0.releases.0.name", "v0.1", "is not v<MAJOR>"),
        ("extensions.0.releases.0.version_range.max", "v0.5.9", "is above max"),
        ("extensions.0.releases.0.version_range.max", "v0.6.0-rc3", "is above max"),
        ("extensions.0.releases.0.version_range.excludes", ["v0.7.0"], "outside"),
        ("extensions.0.releases.0.main_url", "http://github.com/mylab/a/x.jar", "https"),
        ("extensions.0.releases.0.main_url", "https://gitlab.com/mylab/a/x.jar", "github.com repository"),
        ("extensions.0.homepage", "https://github.com/my-lab/a", "github.com repository"),
        ("extensions.0.homepage", "https://github.com", "github.com repository"),
        ("extensions.0.releases.0.javadoc_urls", ["https://example.org/a.jar"], "is not on"),
        ("extensions.0.releases.0.javadoc_urls", "https://github.com/a/b.jar", "must be a list"),
        ("extensions.0.starred", "yes", "true or false"),
        ("extensions.0.name", "", "non-empty string"),
    ],
)
def test_the_checker_refuses_what_qupath_refuses(path, value, why):
    with pytest.raises(CatalogError, match=why):
        check_catalog(_broken(path, value))


def test_the_checker_refuses_two_extensions_of_the_same_name():
    doc = _valid()
    doc["extensions"].append(copy.deepcopy(doc["extensions"][0]))
    with pytest.raises(CatalogError, match="same name"):
        check_catalog(doc)


def test_release_candidates_sort_before_their_release():
    assert version_key("v0.6.0-rc4") < version_key("v0.6.0-rc10") < version_key("v0.6.0") < version_key("v0.6.1")
