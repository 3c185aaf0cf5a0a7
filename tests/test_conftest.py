"""The suite's own set-up (tests/conftest.py): how its tests are spread over pytest-xdist's
workers."""

from __future__ import annotations


def test_the_tests_of_each_shared_cluster_are_grouped_onto_one_worker(request):
    # Given the session's tests, as this worker collected them
    items = request.session.items
    grouped = {i.nodeid: [m.args[0] for m in i.iter_markers("xdist_group")] for i in items}
    # Then the shared local cluster's tests and the multi-node ones carry their group
    assert {g for groups in grouped.values() for g in groups} <= {"ray", "cluster"}
    assert all(groups == ["ray"] for nodeid, groups in grouped.items()
               if "test_train.py::" in nodeid and "relaunch_resumes" in nodeid)
    # and, under --dist loadgroup, pytest-xdist has put the group into the node id, which is
    # what its scheduler reads (pytest 9.2 silently loses it: pytest-xdist#1386)
    if getattr(request.config.option, "loadgroup", False):
        lost = [nodeid for nodeid, groups in grouped.items() if groups and "@" not in nodeid]
        assert not lost, (f"pytest-xdist did not group {len(lost)} test(s), e.g. {lost[0]}; "
                          "this pytest breaks --dist loadgroup")
