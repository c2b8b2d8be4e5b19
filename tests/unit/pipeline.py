"""The backup script's ``{ tar ...; } | gpg | digest | aws`` pipeline, split into commands.

Tar's element of the pipeline is a group that runs the script's
``check_tar_read`` with tar's exit status: it lets 1 ("some files changed
while read", a busy server) pass, and 2 when it came only from directories
deleted while tar read them, and checks that tar met every directory under
its own name. Otherwise the group fails, giving tar's messages (kept in a
file, for the warning of a renamed directory) with the failure. These
helpers check that group word for word and give back each command's words, so
that a test can look at tar's options without the shell syntax around them.
"""

from __future__ import annotations

import re
import shlex

# What follows tar's words in its group: its messages go to a file; the check
# decides, from tar's exit status, and fails the group after passing the
# messages on.
TAR_STATUS_GUARD = re.compile(
    r' 2>(\S+) \|\| tar_status=\$\?; check_tar_read "\$\{tar_status:-0\}" '
    r'\|\| \{ cat -- \1 >&2; exit "\$\{tar_status:-1\}"; \}; \}'
)
CHECK_START = "\ncheck_tar_read() {\n"
PIPELINE_START = "{ tar --create "
# Tar's last words: the database copy's, set in an array when it was copied.
DATABASE_WORDS = ' ${database[@]+"${database[@]}"}'


def split_backup_pipeline(text: str) -> list[list[str]]:
    """Split the backup pipeline into its commands' words: tar, gpg, upload, aws.

    The last element of the pipeline is the upload program, which hashes the
    stream and runs aws for each piece of the archive: its words are split
    where the aws command starts (the word after the piece infix).

    Args:
        text: the pipeline, from ``{ tar --create`` to its end (words may hold
            quoted newlines).

    Returns:
        The words of each command, tar's without the group around it.
    """
    assert text.startswith(PIPELINE_START), text[:80]
    guard = TAR_STATUS_GUARD.search(text)
    assert guard, "tar's status guard is not there"
    assert text[guard.end() :].startswith(" | ")
    tar_text = text[2 : guard.start()].removesuffix(DATABASE_WORDS)
    commands: list[list[str]] = [shlex.split(tar_text), []]
    for word in shlex.split(text[guard.end() + len(" | ") :]):
        if word == "|":
            commands.append([])
        else:
            commands[-1].append(word)
    upload = commands[-1]
    assert upload[:2] == ["python3", "-c"], upload[:2]
    aws_start = upload.index(".part-") + 1  # after: record, piece size, infix
    return [*commands[:-1], upload[:aws_start], upload[aws_start:]]


def database_words(script: str) -> list[str]:
    """Return the words the script gives tar for the database's copy.

    Args:
        script: the whole backup script.

    Returns:
        The words of the ``database=(...)`` assignment made when the database
        was copied (none when the script has no database).
    """
    empty = "\ndatabase=()  # stays empty when the database has not changed since the parent\n"
    if empty not in script:
        assert "database=(" not in script
        return []
    # tar must be given them: the words end tar's command, before its status guard
    guard = TAR_STATUS_GUARD.search(script)
    assert guard, "tar's status guard is not there"
    assert script[: guard.start()].endswith(DATABASE_WORDS), (
        "tar is not given the database's words"
    )
    start = script.index("\ndatabase=(", script.index(empty) + 1) + len("\ndatabase=(")
    return shlex.split(script[start : script.index(")\nfi\n", start)])  # names may hold newlines


def check_words(script: str) -> list[str]:
    """Return the words of the command that ``check_tar_read`` runs.

    Args:
        script: the whole backup script.

    Returns:
        The words: python3, -c, the program, tar's messages, its index, the state,
        the file made on the data volume before tar, ``$1``, the members.
    """
    start = script.index(CHECK_START) + len(CHECK_START)
    lexer = shlex.shlex(script[start:], posix=True)
    lexer.whitespace_split = True
    words = []
    for word in lexer:  # names may hold newlines; every word but the brace is longer
        if word == "}":
            return words
        words.append(word)
    raise AssertionError("check_tar_read has no end")
