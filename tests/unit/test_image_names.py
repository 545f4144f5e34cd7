"""Every default image name is one `make image` builds: the chart's image, the operator's
exporter image and the names scripts/build-images.sh gives its images agree."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

import turnstorm
from turnstorm.operator.render import DEFAULT_EXPORTER_IMAGE, IMAGE_REPOSITORY

ROOT = Path(__file__).resolve().parents[2]


def built_names() -> dict[str, str]:
    """The image names build-images.sh writes, with $VERSION resolved."""
    script = (ROOT / "scripts" / "build-images.sh").read_text()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    names = dict(re.findall(r'^(\w+_IMAGE)="([^"]+)"$', script, re.MULTILINE))
    return {key: value.replace("$VERSION", version) for key, value in names.items()}


def test_versions_agree() -> None:
    chart = yaml.safe_load((ROOT / "charts" / "turnstorm" / "Chart.yaml").read_text())
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert chart["appVersion"] == pyproject["project"]["version"] == turnstorm.__version__


def test_default_images_are_the_built_ones() -> None:
    names = built_names()
    assert names["TS_IMAGE"] == DEFAULT_EXPORTER_IMAGE == f"{IMAGE_REPOSITORY}:0.1.0"
    values = yaml.safe_load((ROOT / "charts" / "turnstorm" / "values.yaml").read_text())
    chart = yaml.safe_load((ROOT / "charts" / "turnstorm" / "Chart.yaml").read_text())
    assert f"{values['image']['repository']}:{chart['appVersion']}" == names["TS_IMAGE"]
    assert names["RELAY_IMAGE"] == "localhost/turnstorm-relay:0.1.0"


def test_containerfiles_build_what_the_pods_run() -> None:
    turnstorm_file = (ROOT / "images" / "turnstorm.Containerfile").read_text()
    relay_file = (ROOT / "images" / "relay.Containerfile").read_text()
    assert 'ENTRYPOINT ["turnstorm"]' in turnstorm_file
    assert 'x["loadgen"]' in turnstorm_file and 'x["operator"]' in turnstorm_file  # the extras
    assert re.search(r"^USER 65532:65532$", turnstorm_file, re.MULTILINE)  # non-root
    assert 'ENTRYPOINT ["turnserver"]' in relay_file
    assert re.search(r"^USER 65534:65534$", relay_file, re.MULTILINE)  # the pods' relay user
