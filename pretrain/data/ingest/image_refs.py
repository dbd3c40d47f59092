"""What an image field of a record points at -> the image's bytes, or the reason there are none.

A field holds bytes, a `{"bytes", "path"}` struct (Hugging Face datasets), a local path, or an
http(s) URL. Local paths are confined: a relative path is taken relative to `--image-root` when
given, else to the input file's own folder, and after resolving `..` and symlinks it must stay
under that folder (anything else, `../secret/x.jpg` or `/etc/hostname`, is refused and counted as
`image_path_outside_root`). A URL is looked up in the download cache when there is one (see
download.py: `prepare_data.py --download`), else counted as `remote_image`.
"""
from __future__ import annotations

import os
from typing import Optional

from pretrain.data.ingest.download import UrlCache, is_url


class ImageRefs:
    """Resolves the image fields of one input file."""

    def __init__(self, input_path: str, image_root: str = "", download_cache: str = ""):
        self.root = os.path.realpath(image_root or os.path.dirname(os.path.abspath(input_path)))
        self.cache: Optional[UrlCache] = UrlCache(download_cache) if download_cache else None

    def read(self, value) -> tuple[Optional[bytes], str]:
        """bytes | path | URL | {"bytes", "path"} -> (bytes, '') or (None, reason)."""
        if isinstance(value, dict):
            if value.get("bytes"):
                return bytes(value["bytes"]), ""
            value = value.get("path") or value.get("url")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value), ""
        if not isinstance(value, str) or not value:
            return None, "missing_image"
        if is_url(value):
            if self.cache is None:
                return None, "remote_image"  # run with --download to fetch it
            return self.cache.get(value)
        return self.read_local(value)

    def read_local(self, path: str) -> tuple[Optional[bytes], str]:
        real = os.path.realpath(os.path.join(self.root, path))  # an absolute `path` stays absolute
        if not (real == self.root or real.startswith(self.root.rstrip(os.sep) + os.sep)):
            return None, "image_path_outside_root"
        try:
            with open(real, "rb") as f:
                return f.read(), ""
        except OSError:
            return None, "missing_image_file"
