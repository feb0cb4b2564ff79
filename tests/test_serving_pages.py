"""PageManager: allocation by hand, refcounts through share_prefix, leak and sharing detection."""

from dataclasses import dataclass, field

import pytest

from nfsearch.serving.pages import PageLeakError, PageManager


@dataclass
class Seq:
    page_table: list[int] = field(default_factory=list)


def test_allocate_grows_tables_and_slots_follow_pages():
    pm = PageManager(num_pages=8, page_size=4)
    a, b = Seq(), Seq()
    pm.allocate(a, 5)                     # 2 pages
    pm.allocate(b, 4)                     # 1 page
    pm.allocate(a, 8)                     # still 2 pages
    assert (a.page_table, b.page_table, pm.num_free_pages, pm.num_used_pages) == ([0, 1], [2], 5, 3)
    assert [pm.slot(a, p) for p in (0, 3, 4, 7)] == [0, 3, 4, 7]
    pm.allocate(b, 9)                     # 3 pages: 2 and the next free, 3 and 4
    assert b.page_table == [2, 3, 4] and pm.slot(b, 8) == 16
    assert pm.num_pages_needed(a, 13) == 2 and pm.can_allocate(a, 20) and not pm.can_allocate(a, 21)
    assert pm.max_tokens_coverable(a) == (2 + 3) * 4
    pm.check_no_leaks([a, b])


def test_free_returns_pages_and_reuse_order():
    pm = PageManager(4, 2)
    a, b = Seq(), Seq()
    pm.allocate(a, 4)
    pm.allocate(b, 2)
    pm.free(a)
    assert a.page_table == [] and pm.num_free_pages == 3
    c = Seq()
    pm.allocate(c, 6)                     # the never-used page 3 first, then a's freed 0 and 1
    assert c.page_table == [3, 0, 1]
    pm.free(b), pm.free(c)
    pm.check_no_leaks()


def test_allocate_beyond_free_pages_raises():
    pm = PageManager(2, 4)
    with pytest.raises(PageLeakError, match="can_allocate"):
        pm.allocate(Seq(), 9)


def test_shared_prefix_refcounts():
    pm = PageManager(8, 4)
    a, b = Seq(), Seq()
    pm.allocate(a, 10)                    # pages 0, 1, 2 (the third partly full)
    pm.share_prefix(a, b, 10)             # only whole pages are shared: 0 and 1
    assert b.page_table == [0, 1] and pm.refcounts[:3] == [2, 2, 1]
    pm.check_no_leaks([a, b])
    pm.free(a)
    assert pm.refcounts[:3] == [1, 1, 0] and pm.num_free_pages == 6
    pm.check_no_leaks([b])
    pm.free(b)
    pm.check_no_leaks()


def test_check_no_leaks_catches_a_leak_and_a_shared_page():
    pm = PageManager(4, 4)
    a = Seq()
    pm.allocate(a, 8)
    with pytest.raises(PageLeakError, match="page 0 leaked"):
        pm.check_no_leaks()               # a ended without free
    intruder = Seq([1])                   # a page table copied, not shared through the manager
    with pytest.raises(PageLeakError, match="page 1 shared without a reference"):
        pm.check_no_leaks([a, intruder])
    pm.free(a)
    with pytest.raises(PageLeakError, match="already free"):
        pm.free(Seq([0]))
