"""The OHIF viewer, served by Hilum from the same origin as its pages and DICOMweb.

Installing: ``hilum viewer install`` runs ``npm pack @ohif/app@3.12.10`` (the prebuilt viewer, a
pinned version), checks the tarball against the pinned SHA-512 integrity (the npm registry's
``dist.integrity``), and unpacks ``package/dist`` into ``[web] ohif_dir`` without ``ort/``
(onnxruntime for OHIF's own AI tools, ~136 MB, never requested). Nothing of the viewer is in the
repository, and nothing is fetched while Hilum runs.

Serving: the bundle loads its chunks from the site root (``window.PUBLIC_URL = '/'``), so its
files are served at the root beside Hilum's routes (a file of the viewer never shadows one of
Hilum's: Flask matches Hilum's fixed routes first); its client-side routes (``/viewer``,
``/microscopy``, …) answer its ``index.html``; and ``/app-config.js`` is generated here, pointing
the viewer at Hilum's own DICOMweb root, instead of the demo server of the one in the package.

Caching (:func:`cache_control`): the bundle's chunks, codecs and fonts carry a hash of their
content in their names (webpack's ``[contenthash]``), so a browser may keep them for a year
without asking again (``immutable``, RFC 8246); every other file of the viewer (``index.html``,
its style sheets, scripts with fixed names) is revalidated on each use (``no-cache``: a 304 when
unchanged), so that installing another version shows at once. A repeated open then costs no
transfer of the 15 MB bundle, and Chromium reuses the code it compiled (V8's code cache).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from config import Settings
from storage.index.models import DEFAULT_PARTITION

log = logging.getLogger(__name__)

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.12.10"
# dist.integrity of @ohif/app@3.12.10 on registry.npmjs.org (SRI: sha512, base64).
OHIF_INTEGRITY = (
    "sha512-0kuF66Mq9c9dMD++bUsTjMrJpXJwaZhz9B4uS244Daw"
    "AjSkTwIYFU93pxPuRUQixaRi7QAHlF3Fe1qudBlZrmA=="
)
PRUNED = ("ort",)  # top-level folders of dist/ never requested
MARKER = ".hilum-ohif"  # written last: the installed version and integrity
# OHIF's client-side routes (modes) that its index.html must answer.
SPA_ROUTES = ("viewer", "microscopy", "segmentation", "tmtv", "localbasic", "dicomweb")


class ViewerInstallError(Exception):
    """The viewer could not be installed; the message says why and what to do."""


def ohif_dir(settings: Settings) -> Path:
    return settings.web.ohif_dir or settings.server.data_dir / "viewers" / "ohif"


def installed(folder: Path) -> bool:
    return (folder / "index.html").is_file()


def integrity_of(path: Path) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def install_ohif(target: Path, *, tarball: Path | None = None, npm: str = "npm") -> bool:
    """Install the pinned viewer into ``target``; False when it was installed already.

    ``tarball``: an already downloaded ``ohif-app-3.12.10.tgz`` (checked all the same);
    otherwise ``npm pack`` fetches it (from npm's cache when it has it)."""
    expected = f"{OHIF_PACKAGE}@{OHIF_VERSION} {OHIF_INTEGRITY}"
    marker = target / MARKER
    if marker.is_file() and marker.read_text().strip() == expected and installed(target):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".ohif-") as work:
        if tarball is None:
            tarball = _npm_pack(Path(work), npm)
        found = integrity_of(tarball)
        if found != OHIF_INTEGRITY:
            raise ViewerInstallError(
                f"{tarball} is not {OHIF_PACKAGE}@{OHIF_VERSION}: its integrity is {found}, "
                f"expected {OHIF_INTEGRITY}; nothing was installed"
            )
        unpacked = Path(work) / "dist"
        _unpack_dist(tarball, unpacked)
        (unpacked / MARKER).write_text(expected + "\n")
        if target.exists():
            shutil.rmtree(target)
        unpacked.rename(target)
    log.info("installed %s@%s into %s", OHIF_PACKAGE, OHIF_VERSION, target)
    return True


def _npm_pack(folder: Path, npm: str) -> Path:
    try:
        packed = subprocess.run(
            [npm, "pack", f"{OHIF_PACKAGE}@{OHIF_VERSION}", "--json", "--pack-destination",
             str(folder)],
            capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
    except FileNotFoundError:
        raise ViewerInstallError(
            f"{npm} is not installed: install Node.js's npm (Debian: apt-get install npm), or "
            "pass --tarball with a downloaded ohif-app-3.12.10.tgz"
        ) from None
    if packed.returncode != 0:
        raise ViewerInstallError(f"npm pack failed: {packed.stderr.strip()[-500:]}")
    (result,) = json.loads(packed.stdout)
    return folder / result["filename"]


def _unpack_dist(tarball: Path, destination: Path) -> None:
    """``package/dist/**`` of ``tarball`` into ``destination``, without the pruned folders; the
    ``data`` filter refuses links and paths that leave the destination."""
    prefix = "package/dist/"
    with tarfile.open(tarball, "r:gz") as archive:
        members = []
        for member in archive.getmembers():
            if not member.name.startswith(prefix) or member.name == prefix.rstrip("/"):
                continue
            relative = member.name[len(prefix) :]
            if relative.split("/", 1)[0] in PRUNED:
                continue
            member.name = relative
            members.append(member)
        destination.mkdir(parents=True)
        archive.extractall(destination, members=members, filter="data")
    if not installed(destination):
        raise ViewerInstallError(f"{tarball} holds no package/dist/index.html")


# The viewer's name of the default partition's data source (its URL: /viewer?…); another
# partition's is ``partition-{name}`` (its URL: /viewer/partition-{name}?…, OHIF's route per
# data source).
DEFAULT_DATA_SOURCE = "dicomweb"


def data_source_name(partition: str) -> str:
    return DEFAULT_DATA_SOURCE if partition == DEFAULT_PARTITION else f"partition-{partition}"


def viewer_url(partition: str, study_instance_uid: str) -> str:
    """Where "Open in viewer" goes for a study of ``partition``."""
    source = "" if partition == DEFAULT_PARTITION else "/" + data_source_name(partition)
    return f"/viewer{source}?StudyInstanceUIDs={study_instance_uid}"


def _data_source(partition: str) -> dict[str, Any]:
    root = "" if partition == DEFAULT_PARTITION else f"/partitions/{partition}"
    return {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": data_source_name(partition),
        "configuration": {
            "friendlyName": "Hilum" if partition == DEFAULT_PARTITION else f"Hilum {partition}",
            "name": "hilum",
            "wadoUriRoot": f"{root}/wado",
            "qidoRoot": f"{root}/dicomweb",
            "wadoRoot": f"{root}/dicomweb",
            "qidoSupportsIncludeField": True,
            "supportsReject": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "dicomUploadEnabled": False,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        },
    }


def app_config(partitions: list[str]) -> str:
    """The viewer's ``window.config``: Hilum's DICOMweb at the same origin, one data source per
    partition in ``partitions`` (those the user may see; docs/architecture.md,
    /work/shared/VIEWERS.md: what 3.12.10 needs against Hilum)."""
    visible = partitions or [DEFAULT_PARTITION]
    default = DEFAULT_PARTITION if DEFAULT_PARTITION in visible else visible[0]
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": data_source_name(default),
        "dataSources": [_data_source(partition) for partition in visible],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n{_FILENAME_FOR_ONNXRUNTIME}"


# onnxruntime-web, bundled in 3.12.10's chunk 7431, finds its own folder from
# document.currentScript and, when it is first required outside a script's execution (that
# property is then null: the order in which cached chunks run decides), from Node's
# ``__filename``, which a browser lacks: "ReferenceError: __filename is not defined", and the
# viewer stops before asking for the study. Its chunks lie at the viewer's root.
_FILENAME_FOR_ONNXRUNTIME = 'var __filename = new URL("/", window.location.href).href;\n'


# webpack's [contenthash] (20 hex digits) in a file's name: ``2108.bundle.<hash>.js``,
# ``app.bundle.<hash>.js``, ``<hash>.wasm``, ``<hash>.woff2``.
_CONTENT_HASHED = re.compile(r"(?:^|[./])[0-9a-f]{20}\.[0-9a-z]+$")
IMMUTABLE = "public, max-age=31536000, immutable"  # RFC 9111 5.2.2.1, RFC 8246
REVALIDATE = "no-cache"  # RFC 9111 5.2.2.4: stored, but asked again (ETag) before each use


def cache_control(path: str) -> str:
    """The Cache-Control of the viewer's file at ``path`` (relative to its folder)."""
    return IMMUTABLE if _CONTENT_HASHED.search(path) else REVALIDATE
