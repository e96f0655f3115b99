"""Hub ids: plan from the hub before downloading any weights.

A hub id (``org/name`` or ``org/name@revision``) is pinned to the commit sha the hub reports
(``HfApi.model_info``); everything after uses that sha, so the files planned are the files
downloaded. The small files (config, tokenizer, chat template, index) are downloaded whole into the
huggingface_hub cache; each safetensors header is read with two HTTP range requests (its 8-byte
length, then the header), so the whole plan runs before a weight byte is fetched. After the plan,
only the weight files it reads are downloaded (:func:`download`), at the pinned sha.

With ``HF_HUB_OFFLINE=1`` a hub id resolves from the local cache as before (all files present).
No torch import here: header-only paths stay light.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from deltaport.errors import CheckpointError

LOG = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")
#: the small files downloaded whole before planning (everything but weights)
SMALL_PATTERNS = ["*.json", "*.jinja", "tokenizer*", "*.model", "*.txt", "*.tiktoken", "README.md"]
#: what the offline path takes from the cache (small files plus safetensors weights)
OFFLINE_PATTERNS = SMALL_PATTERNS + ["*.safetensors"]


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (at import), or as set in the environment now."""
    env = os.environ.get("HF_HUB_OFFLINE", "")
    if env.strip().lower() in ("1", "on", "yes", "true"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


def looks_like_hub_id(s: str) -> bool:
    return bool(HUB_ID.match(s)) and not s.startswith((".", "/", "~"))


def looks_like_path(s: str) -> bool:
    """A string the user most likely meant as a local path: starts with ./ ../ / ~, has a path
    separator but not the one-slash hub shape, or names a parent that exists."""
    if s.startswith((".", "/", "~")) or "\\" in s:
        return True
    name = s.split("@", 1)[0] if HUB_ID.match(s) else s  # a revision may hold slashes (refs/pr/1)
    if name.count("/") != 1:
        return "/" in name
    return Path(name.split("/", 1)[0]).expanduser().is_dir()


def split_ref(source: str, revision: str | None) -> tuple[str, str | None]:
    repo_id, _, rev = source.partition("@")
    return repo_id, rev or revision


def download_hint(repo_id: str, revision: str | None = None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return f"`hf download {repo_id}{rev}`"


@dataclass
class HubRepo:
    """One hub repository pinned to a commit."""

    repo_id: str
    requested: str | None  # the revision the user asked for (None: the default branch)
    sha: str  # the commit every file is read at
    sizes: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    license: str | None = None
    dir: Path | None = None  # the cache snapshot directory (small files present, weights once downloaded)

    @property
    def ref(self) -> str:
        return f"{self.repo_id}@{self.sha}"


def _hub_error(what: str, repo_id: str, exc: Exception) -> CheckpointError:
    name = type(exc).__name__
    if name in ("RepositoryNotFoundError", "GatedRepoError"):
        fix = "check the id (and HF_TOKEN for gated or private models)"
    elif name == "RevisionNotFoundError":
        fix = "check the revision after '@'"
    else:
        fix = "check the id, your network and HF_TOKEN for gated models"
    lead = f"no local directory {repo_id}, and " if what == "resolve" else ""
    return CheckpointError(f"{lead}cannot {what} hub id {repo_id!r}: {name}: {exc}; {fix}")


def pin(repo_id: str, revision: str | None) -> HubRepo:
    """Ask the hub which commit ``revision`` is, and the files (with sizes) at that commit."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many types (404, auth, network)
        raise _hub_error("resolve", repo_id, exc) from None
    if not info.sha:
        raise CheckpointError(f"the hub did not report a commit for {repo_id!r} at {revision or 'main'}; "
                              "pass a revision (org/name@sha)")
    sizes = {}
    for s in info.siblings or []:
        size = s.lfs.size if s.lfs is not None else s.size
        sizes[s.rfilename] = int(size) if size is not None else -1
    lic = None
    if info.card_data is not None:
        lic = getattr(info.card_data, "license", None)
    if lic is None:
        lic = next((t.split(":", 1)[1] for t in (info.tags or []) if t.startswith("license:")), None)
    return HubRepo(repo_id, revision, info.sha, sizes, lic if isinstance(lic, str) else None)


def fetch_small(repo: HubRepo) -> Path:
    """Download the repository's small files (config, tokenizer, chat template, index) at the pinned sha."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id=repo.repo_id, revision=repo.sha, allow_patterns=SMALL_PATTERNS)
    except Exception as exc:  # noqa: BLE001
        raise _hub_error("download the small files of", repo.repo_id, exc) from None
    repo.dir = Path(path)
    return repo.dir


def _range(url: str, start: int, end: int, headers: dict) -> bytes:
    from huggingface_hub.utils import get_session, hf_raise_for_status

    r = get_session().get(url, headers={**headers, "Range": f"bytes={start}-{end}"})
    hf_raise_for_status(r)
    data = r.content
    if r.status_code == 200 and len(data) > end - start + 1:  # a server that ignores Range sent the whole file
        data = data[start:end + 1]
    return data


def remote_header_bytes(repo: HubRepo, filename: str) -> tuple[bytes, int, int, str]:
    """A safetensors file's JSON header from the hub by two range requests (its length, then its JSON):
    no byte past the header is requested. Returns (header bytes, data start offset, file size or -1,
    the name errors use);
    :func:`deltaport.io.tensors.parse_header` validates the header as for a local file."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    where = f"{repo.repo_id}@{repo.sha[:12]}/{filename}"
    url = hf_hub_url(repo.repo_id, filename, revision=repo.sha)
    headers = build_hf_headers()
    headers["Accept-Encoding"] = "identity"
    try:
        head = _range(url, 0, 7, headers)
        if len(head) < 8:
            raise CheckpointError(f"shard {where} is truncated ({len(head)} bytes); the file on the hub is not safetensors")
        n = int.from_bytes(head[:8], "little")
        size = repo.sizes.get(filename, -1)
        if n > 100_000_000 or (size >= 0 and n > size - 8):
            raise CheckpointError(f"shard {where}: header length {n} is implausible for a {size}-byte file; "
                                  "it is not a valid safetensors file")
        raw = _range(url, 8, 8 + n - 1, headers)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(f"read the header of {filename} of", repo.repo_id, exc) from None
    return raw, 8 + n, size, where


def is_cached(repo: HubRepo, filename: str) -> bool:
    return repo.dir is not None and (repo.dir / filename).is_file()


def download(repo: HubRepo, filenames: list[str]) -> None:
    """Download ``filenames`` at the pinned sha into the cache snapshot the plan points at."""
    from huggingface_hub import hf_hub_download

    for f in filenames:
        if is_cached(repo, f):
            continue
        try:
            hf_hub_download(repo.repo_id, f, revision=repo.sha)
        except Exception as exc:  # noqa: BLE001
            raise _hub_error(f"download {f} of", repo.repo_id, exc) from None


def cache_dir() -> Path:
    """The huggingface_hub cache directory (where downloads land)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def snapshot_offline(repo_id: str, rev: str | None, source: str) -> tuple[Path, str | None]:
    """Resolve a hub id from the local cache (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id=repo_id, revision=rev, allow_patterns=OFFLINE_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - offline cache miss and friends
        raise CheckpointError(
            f"no local directory {source}, and the hub id {source!r} is not in the local cache while HF_HUB_OFFLINE "
            f"is set ({type(exc).__name__}); download it first ({download_hint(repo_id, rev)}) or pass a local "
            "directory") from None
    return path, path.name if path.parent.name == "snapshots" else rev
