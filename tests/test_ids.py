from datetime import datetime, timezone

from pg_backup_api.core import ids

NOW = datetime(2026, 11, 27, 9, 32, 1, tzinfo=timezone.utc)


def test_first_candidate_is_the_reference_timestamp_format():
    assert next(ids.candidates(NOW)) == "20261127T093201"


def test_later_candidates_add_a_numeric_suffix():
    first_four = [c for _, c in zip(range(4), ids.candidates(NOW))]
    assert first_four == ["20261127T093201", "20261127T093201-2", "20261127T093201-3", "20261127T093201-4"]


def test_ids_are_validated_before_they_become_paths():
    assert ids.is_valid_id("20261127T093201")
    assert ids.is_valid_id("20261127T093201-12")
    for bad in ["", "../../etc/passwd", "20261127T093201.json", "20261127T093201-", "x20261127T093201",
                "20261127T093201\n", "20261127T0932011"]:
        assert not ids.is_valid_id(bad), bad


def test_sort_key_orders_suffixes_numerically():
    unordered = ["20261127T093202", "20261127T093201-10", "20261127T093201", "20261127T093201-9"]
    assert sorted(unordered, key=ids.sort_key) == [
        "20261127T093201", "20261127T093201-9", "20261127T093201-10", "20261127T093202"]
