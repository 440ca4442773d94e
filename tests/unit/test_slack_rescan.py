"""Which recorded threads a scrape re-checks for late replies, and which it keeps recording."""

from doppel.slack.scrape import recorded_threads, threads_to_recheck

RECORDED = {
    "1000.000100": "1500.000100",  # old thread, active recently
    "1100.000100": "1150.000100",  # old thread, quiet since before the window
    "1900.000100": "1950.000100",  # started after the saved point: the history call returns it
}


def test_rechecks_older_threads_active_within_the_window():
    assert threads_to_recheck(RECORDED, "1800.000100", rescan_from=1200) == {"1000.000100": "1500.000100"}


def test_window_edge_is_exclusive_and_microseconds_count():
    assert threads_to_recheck(RECORDED, "1800.000100", rescan_from=1500.0001) == {}
    assert threads_to_recheck(RECORDED, "1800.000100", rescan_from=1500.000099) == {
        "1000.000100": "1500.000100"
    }


def test_first_run_rechecks_nothing():
    assert threads_to_recheck(RECORDED, None, rescan_from=0) == {}


def test_records_threads_within_the_cutoff_sorted_and_forgets_deleted_ones():
    threads = {"1900.000100": "1950.000100", "1000.000100": "", "10000.000100": "10001.000100"}
    threads["0999.000100"] = "1500.000100"
    assert list(recorded_threads(threads, cutoff=1000)) == ["1900.000100", "10000.000100"]
