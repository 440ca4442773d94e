"""Which recorded threads a scrape re-checks with conversations.replies, and which it keeps recording."""

from doppel.slack.scrape_state import recorded_threads, threads_to_recheck

RECORDED = {
    "1000.000100": "1500.000100",  # started before the listed range, active recently
    "1100.000100": "1150.000100",  # started before the listed range, quiet since before the window
    "1900.000100": "1950.000100",  # the history call lists it again, with its latest_reply
}


def test_rechecks_threads_not_listed_again_but_active_within_the_window():
    assert threads_to_recheck(RECORDED, "1800.000100", rescan_from=1200) == {"1000.000100": "1500.000100"}


def test_window_edge_is_exclusive_and_microseconds_count():
    assert threads_to_recheck(RECORDED, "1800.000100", rescan_from=1500.0001) == {}
    assert threads_to_recheck(RECORDED, "1800.000100", rescan_from=1500.000099) == {
        "1000.000100": "1500.000100"
    }


def test_no_window_rechecks_nothing():
    assert threads_to_recheck(RECORDED, "1800.000100", rescan_from=None) == {}


def test_records_threads_within_the_cutoff_sorted_and_forgets_deleted_ones():
    threads = {"1900.000100": "1950.000100", "1000.000100": "", "10000.000100": "10001.000100"}
    threads["0999.000100"] = "1500.000100"
    assert list(recorded_threads(threads, cutoff=1000)) == ["1900.000100", "10000.000100"]
