"""The repository stands alone: nothing in it reads or names a folder beside it or one machine's paths."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import ROOT

# a folder beside the checkout, or an absolute path of one machine (a home, a scratch or a work folder)
OUTSIDE = re.compile(r"\.\./shared|(?<![\w.:/])/(?:work|root|home|Users|tmp|mnt|opt)/")


def tracked_text_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [name for name in listed.decode().split("\0") if name]  # this file too: it names nothing it looks for


def test_no_file_names_a_path_outside_the_repository():
    found = []
    for name in tracked_text_files():
        try:
            text = (ROOT / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue  # weights, pictures; a file deleted in the work tree
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not found, "\n".join(found)


def test_the_pattern_finds_what_it_is_for():
    # written in pieces, so that this file does not name what it looks for
    bad_lines = (
        ".." + "/shared/peers/sdv2",
        "SDV2_SRC=/" + "work/sdv2/src",
        "--json /" + "root/out/x.json",
        "'/" + "tmp/soak'",
    )
    for bad in bad_lines:
        assert OUTSIDE.search(bad), bad
    for fine in ("bench/results/x.json", "rtmp://host/live/key", "http://127.0.0.1:8080/api/home/", "$OUT/x.json"):
        assert not OUTSIDE.search(fine), fine


def test_the_house_in_docs_names_files_that_exist():
    """docs/ENGINE.md's house lists the files as they are; a renamed or removed one turns this red."""
    text = (ROOT / "docs" / "ENGINE.md").read_text()
    house = text.split("## The house", 1)[1].split("```")[1]
    folder, subs, missing = "", [""], []
    for line in house.splitlines():
        if line and not line.startswith(" "):
            folder, subs = line.split()[0], [""]
        for name in re.findall(r"[\w/]+\.py|[\w/]+/", line):
            if name == folder:
                continue
            if name.endswith("/"):
                subs.append(name)
                assert (ROOT / folder / name).is_dir(), f"{folder}{name}"
            elif not any((ROOT / folder / sub / name).is_file() for sub in subs):
                missing.append(f"{folder}{name}")
    assert not missing, missing
