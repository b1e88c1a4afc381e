#!/usr/bin/env python3
"""Replaces (or appends) one generated section of perf/RESULTS.md.

Usage: perf/section.py NAME SECTION_FILE
The section is everything from `<!-- NAME:begin` to `<!-- NAME:end -->`; SECTION_FILE holds the new
text, markers included. Used by perf/run.sh, perf/persist.sh and perf/tenants.sh.
"""
import re
import sys

name, section_file = sys.argv[1], sys.argv[2]
section = open(section_file).read()
if not section.endswith("\n"):
    section += "\n"
path = "perf/RESULTS.md"
text = open(path).read()
pattern = re.compile(r"<!-- " + re.escape(name) + r":begin.*?<!-- " + re.escape(name) + r":end -->\n?", re.S)
if pattern.search(text):
    # A function, so backslashes in the section are not read as escapes.
    text = pattern.sub(lambda _: section, text)
else:
    text = text.rstrip("\n") + "\n\n" + section
open(path, "w").write(text)
