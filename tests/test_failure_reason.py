"""Why a recovery failed, in one line: `reason` quotes Barman's own error messages after its exit code.

The whole output stays in `output`; `reason` is what a client (or `pg-backup-api wait`) shows.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pg_backup_api.barman_io.commands import MAX_ERROR_CHARS, MAX_ERRORS, errors_in

NOT_EMPTY = ("The restore operation cannot proceed because the destination folder '/srv/pg/restore' is "
             "not empty. To prevent accidental data loss, the destination must be empty.")


def test_barmans_error_lines_are_the_reason_in_the_order_printed():
    output = ("pg-backup-api: ssh multiplexed: one master connection to db2\n"
              "Starting remote restore for server pg using backup 20261127T010000\n"
              f"ERROR: {NOT_EMPTY}\n"
              "EXCEPTION: [Errno 28] No space left on device\n")
    assert errors_in(output) == [NOT_EMPTY, "[Errno 28] No space left on device"]


def test_a_line_that_only_mentions_an_error_is_not_one():
    assert errors_in("Copying 'ERROR: x.conf'\nno errors found\n  ERROR: indented by a hook\n") == []


def test_colours_of_a_terminal_are_not_part_of_the_message():
    assert errors_in("\x1b[31mERROR: Cannot connect to remote host\x1b[0m\n") == ["Cannot connect to remote host"]


def test_a_message_printed_twice_is_quoted_once_and_at_most_three_are_quoted():
    output = "".join(f"ERROR: failure {n}\nERROR: failure {n}\n" for n in range(10))
    assert errors_in(output) == ["failure 0", "failure 1", "failure 2"]


def test_a_very_long_message_is_cut_and_says_so():
    (message,) = errors_in("ERROR: " + "x" * 5000 + "\n")
    assert len(message) == MAX_ERROR_CHARS and message.endswith("…")


PIECES = st.sampled_from(["ERROR: ", "EXCEPTION:", "ERROR:x", "\n", "\r", "\r\n", "\x0b", "\x85", "\u2028",
                          "\x1b[31m", "\x1b[0m", " ", "\t", "x", "é", "…"])


@given(st.text() | st.lists(PIECES | st.text(max_size=5), max_size=60).map("".join))
def test_any_output_gives_at_most_three_distinct_one_line_messages(output):
    found = errors_in(output)
    assert len(found) <= MAX_ERRORS and len(set(found)) == len(found)
    for message in found:
        assert message and len(message) <= MAX_ERROR_CHARS
        assert message == message.strip() and not set(message) & set("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
