"""Verified, resumable HTTP downloads of model files (used by ``catalog.pull``).

A file is fetched into ``<name>.part`` (continuing with an HTTP Range request when part of
it is there), checked against the expected size and sha256, and only then renamed into
place. The expected values come from the caller's pins or, for huggingface.co, from the
``X-Linked-Etag`` / ``X-Linked-Size`` headers its ``resolve`` URLs carry for LFS files (read
from a HEAD request that does not follow the redirect to the CDN).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from assistant.errors import ModelMissingError

_CHUNK = 1 << 20
_USER_AGENT = "rkvlm-assistant (model pull)"


class DownloadError(ModelMissingError):
    """A pull failed; the message says why and how to place the files by hand."""

    exit_code = 69  # EX_UNAVAILABLE


class ChecksumError(DownloadError):
    """A downloaded file is not the file the catalogue or the hub describes."""

    exit_code = 65  # EX_DATAERR


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: D401 - urllib hook
        return None


def _hub_facts(url: str, timeout: float) -> dict:
    """sha256, size and commit the hub states for a resolve URL (HEAD, no redirect)."""
    opener = urllib.request.build_opener(_NoRedirect)
    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": _USER_AGENT})
    try:
        with opener.open(req, timeout=timeout) as resp:
            headers = resp.headers
    except urllib.error.HTTPError as e:
        if e.code in (301, 302, 303, 307, 308):
            headers = e.headers
        elif e.code == 404:
            raise urllib.error.URLError(f"{url} does not exist on the server (HTTP 404)") from None
        else:
            raise urllib.error.URLError(f"HTTP {e.code} {e.reason} for {url}") from None
    facts = {}
    etag = (headers.get("X-Linked-Etag") or headers.get("ETag") or "").strip()
    etag = etag.removeprefix("W/").strip('"').lower()
    if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag):
        facts["sha256"] = etag
    size = headers.get("X-Linked-Size")
    if size and size.isdigit():
        facts["size"] = int(size)
    if headers.get("X-Repo-Commit"):
        facts["commit"] = headers["X-Repo-Commit"]
    return facts


def fetch_verified(url: str, dest: Path, sha256: Optional[str] = None, size: Optional[int] = None,
                   progress: bool = True, timeout: float = 30.0) -> dict:
    """Download url into dest, verified; returns {size, sha256, verified_against[, commit]}.

    Continues from ``dest.part``. The expected sha256/size are the caller's pins, else the
    server's ``X-Linked-Etag`` / ``X-Linked-Size`` (huggingface.co states them for LFS files).
    Network failures raise OSError (URLError) or http.client.HTTPException; a mismatch
    ChecksumError (the .part is deleted); nothing to check against DownloadError.
    """
    name = dest.name
    hub = _hub_facts(url, timeout)
    sha = sha256 or hub.get("sha256")
    if sha256 and hub.get("sha256") and hub["sha256"] != sha256:
        raise ChecksumError(f"the server's {name} (sha256 {hub['sha256']}) is not the pinned "
                            f"file (sha256 {sha256}); refusing to download it")
    if sha is None:
        raise DownloadError(f"cannot verify {name}: neither the catalogue nor the server "
                            f"gives its sha256 ({url})")
    size = size or hub.get("size")
    part = dest.with_name(dest.name + ".part")
    _download(url, part, size, progress, timeout)
    got_size = part.stat().st_size
    if size is not None and got_size != size:
        part.unlink()
        raise ChecksumError(f"{name}: downloaded {got_size} bytes, expected {size}; the "
                            "partial file was deleted, run the pull again")
    got = _sha256(part)
    if got != sha:
        part.unlink()
        raise ChecksumError(f"{name}: sha256 {got} does not match the expected {sha}; the "
                            "download was deleted, run the pull again")
    os.replace(part, dest)
    say(progress, f"{name}: verified (sha256 {sha[:12]}...)")
    record = {"size": got_size, "sha256": got,
              "verified_against": "catalogue" if sha256 else "hub"}
    if hub.get("commit"):
        record["commit"] = hub["commit"]
    return record


def verify_existing(url: str, dest: Path, sha256: Optional[str] = None,
                    size: Optional[int] = None, timeout: float = 30.0) -> dict:
    """Check a file already at dest (e.g. copied by hand) without downloading it.

    Needs the network only when no sha256 is pinned. Raises ChecksumError on a mismatch.
    """
    hub = {} if sha256 else _hub_facts(url, timeout)
    sha = sha256 or hub.get("sha256")
    if sha is None:
        raise DownloadError(f"cannot verify {dest}: the server gives no sha256 ({url})")
    got_size = dest.stat().st_size
    expected_size = size or hub.get("size")
    if (expected_size is not None and got_size != expected_size) or _sha256(dest) != sha:
        raise ChecksumError(f"{dest} is not the expected file (sha256 {sha}); delete it and "
                            "pull again")
    record = {"size": got_size, "sha256": sha,
              "verified_against": "catalogue" if sha256 else "hub"}
    if hub.get("commit"):
        record["commit"] = hub["commit"]
    return record


def _download(url: str, part: Path, size: Optional[int], progress: bool, timeout: float) -> None:
    """Fetch url into part, continuing from the bytes already there."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    if size is not None and have == size:
        return
    headers = {"User-Agent": _USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            return  # nothing left to fetch; verification decides
        raise urllib.error.URLError(f"HTTP {e.code} {e.reason} for {url}") from None
    with resp:
        if resp.status == 206:
            start = _range_start(resp.headers.get("Content-Range", ""))
            if start != have:
                raise urllib.error.URLError(f"the server resumed at byte {start}, not {have}")
            mode = "ab"
        else:
            have, mode = 0, "wb"  # the server ignored Range: start over
        total = size or (have + int(resp.headers.get("Content-Length") or 0)) or None
        bar = _Progress(part.name.removesuffix(".part"), total, have) if progress else None
        with open(part, mode) as out:
            while True:
                block = resp.read(_CHUNK)
                if not block:
                    break
                out.write(block)
                have += len(block)
                if bar:
                    bar.update(have)
        if bar:
            bar.done(have)


def _range_start(content_range: str) -> int:
    # "bytes 100-199/200"
    try:
        return int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


class _Progress:
    """A one-line progress bar on stderr, redrawn at most five times a second."""

    def __init__(self, label: str, total: Optional[int], start: int):
        self.label, self.total, self.start = label, total, start
        self.t0 = self.last = time.monotonic()

    def update(self, have: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < 0.2:
            return
        self.last = now
        rate = (have - self.start) / max(now - self.t0, 1e-6)
        if self.total:
            frac = min(have / self.total, 1.0)
            bar = "#" * int(frac * 30)
            text = (f"\r{self.label}  [{bar:<30}] {frac * 100:5.1f}%  {_mb(have)}/{_mb(self.total)}"
                    f"  {_mb(rate)}/s ")
        else:
            text = f"\r{self.label}  {_mb(have)}  {_mb(rate)}/s "
        sys.stderr.write(text)
        sys.stderr.flush()

    def done(self, have: int) -> None:
        self.update(have, force=True)
        sys.stderr.write("\n")
        sys.stderr.flush()


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def say(enabled: bool, text: str) -> None:
    if enabled:
        print(text, file=sys.stderr)


