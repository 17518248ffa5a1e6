"""Request bodies to images, in memory only: a bounded read, one encoded image or a multipart form of them.

Nothing here touches the filesystem (Starlette's own form parser spools uploads over 1 MB to disk, so
multipart is parsed with python-multipart's in-memory callbacks). Every refusal is a ``BadRequest``
with the HTTP status it deserves and one line that names the problem.
"""
from __future__ import annotations

import zlib
from typing import AsyncIterator

import numpy as np

from twins_deploy.errors import TwinsDeployError
from twins_deploy.metadata import ModelMetadata
from twins_deploy.serving.options import MAX_IMAGES_PER_REQUEST


class BadRequest(Exception):
    """A request the server refuses: ``status`` (4xx/5xx) and a one-line message for ``{"error": ...}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


async def read_body(headers, stream: AsyncIterator[bytes], limit: int) -> bytes:
    """The whole body, decompressed, or 413 as soon as it is known to exceed ``limit``: from Content-Length
    before reading anything, else while streaming (chunked uploads)."""
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise BadRequest(400, f"Content-Length is not a number: {declared[:40]!r}")
        if int(declared) > limit:
            raise BadRequest(413, f"the body is {int(declared):,} bytes; this server takes at most {limit:,} "
                                  "(--max-body-mb)")
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"the body is over {limit:,} bytes, the most this server takes (--max-body-mb)")
        chunks.append(chunk)
    return decoded_body(b"".join(chunks), headers.get("content-encoding"), limit)


def decoded_body(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body without its Content-Encoding (gzip or deflate, as tritonclient may send), bounded by ``limit``
    after decompression too."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(400, f"Content-Encoding {encoding[:20]!r} is not accepted: send gzip, deflate or none")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(400, f"the {encoding} body does not decompress: {exc}") from None
    if len(data) > limit:
        raise BadRequest(413, f"the body decompresses to over {limit:,} bytes, the most this server takes "
                              "(--max-body-mb)")
    return data


def images_from_body(body: bytes, content_type: str | None) -> list[bytes]:
    """The encoded images of a predict request: the body itself, or each ``file`` part of a multipart form."""
    if not body:
        raise BadRequest(400, "the body is empty: send an encoded image (JPEG, PNG, WebP, ...) or a multipart "
                              "form with 'file' parts")
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        return [body]
    files = _multipart_files(body, content_type or "")
    if not files:
        raise BadRequest(400, "the multipart form has no 'file' part with data")
    if len(files) > MAX_IMAGES_PER_REQUEST:
        raise BadRequest(400, f"the form has {len(files)} images; send at most {MAX_IMAGES_PER_REQUEST} per request")
    return files


def _multipart_files(body: bytes, content_type: str) -> list[bytes]:
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest(400, "the multipart Content-Type has no boundary")
    parts: list[tuple[str, bytearray]] = []
    header = {"field": b"", "value": b""}
    state = {"name": ""}

    def on_header_field(data, start, end):
        header["field"] += data[start:end]

    def on_header_value(data, start, end):
        header["value"] += data[start:end]

    def on_header_end():
        if header["field"].lower() == b"content-disposition":
            state["name"] = parse_options_header(header["value"])[1].get(b"name", b"").decode("latin-1")
        header["field"], header["value"] = b"", b""

    def on_part_begin():
        state["name"] = ""

    def on_headers_finished():
        parts.append((state["name"], bytearray()))

    def on_part_data(data, start, end):
        parts[-1][1].extend(data[start:end])

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data})
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise BadRequest(400, f"the multipart form is malformed: {str(exc).splitlines()[0]}") from None
    return [bytes(data) for name, data in parts if name == "file" and data]


def preprocess_images(images: list[bytes], metadata: ModelMetadata) -> np.ndarray:
    """(N, 3, H, W) float32, preprocessed as the model was trained; 413 for a decompression bomb, 400 for
    anything that does not decode."""
    from twins_deploy.preprocess import ImageTooLarge, load_image, preprocess

    arrays = []
    for index, data in enumerate(images):
        where = f"image {index + 1} of {len(images)}" if len(images) > 1 else "the image"
        try:
            arrays.append(preprocess(load_image(data), metadata))
        except ImageTooLarge as exc:
            raise BadRequest(413, f"{where}: {_reason(exc)}") from None
        except TwinsDeployError as exc:
            raise BadRequest(400, f"{where} cannot be decoded: {_reason(exc)}") from None
        except Exception as exc:  # a decoder's own error on hostile bytes: still the client's input
            raise BadRequest(400, f"{where} cannot be decoded: {type(exc).__name__}: {exc}") from None
    return np.stack(arrays)


def _reason(exc: Exception) -> str:
    """The library's message without the 'image bytes' prefix our loader adds."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for prefix in ("cannot decode image bytes: ", "image bytes "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text
