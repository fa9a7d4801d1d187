"""Page allocator, slot mapping and the paged-layout rules, against plain Python/numpy."""

import numpy as np
import pytest

import kvmmap as km
from kvmmap.pagetable import PageAllocator, check_paged_layout, slot_mapping


def test_alloc_reuses_only_after_two_commits():
    """A dropped page is listed by the newest commit until the next one, and by the
    previous commit until the one after: only then may it be overwritten."""
    a = PageAllocator()
    p = a.alloc(5)
    np.testing.assert_array_equal(p, np.arange(5))
    a.decref(p[[1, 3]])
    assert a.num_pending == 2 and a.num_free == 0
    np.testing.assert_array_equal(a.alloc(1), [5])          # pending pages are not reused
    a.release_pending()                                     # commit 1: retired, still not reused
    assert a.num_pending == 2 and a.num_free == 0
    np.testing.assert_array_equal(a.alloc(1), [6])
    a.release_pending()                                     # commit 2: free
    np.testing.assert_array_equal(a.alloc(2), [1, 3])
    np.testing.assert_array_equal(a.refcounts, [1, 1, 1, 1, 1, 1, 1])


def test_unalloc_returns_pages_at_once_and_retire_holds_free_pages_back():
    a = PageAllocator(np.array([1, 0, 0, 1], np.uint32))
    got = a.alloc(3)
    np.testing.assert_array_equal(got, [1, 2, 4])
    a.unalloc(got)                                          # a failed call gives them back
    np.testing.assert_array_equal(a.refcounts, [1, 0, 0, 1, 0])
    assert a.num_free == 3 and a.num_pending == 0
    with pytest.raises(km.PageTableError):
        a.unalloc([0, 0])                                   # count 2 after the first: not fresh
    a.retire([2, 4])                                        # listed by the other commit
    np.testing.assert_array_equal(a.alloc(2), [1, 5])
    a.release_pending()
    a.release_pending()
    np.testing.assert_array_equal(a.alloc(2), [2, 4])


def test_refcounts_follow_a_numpy_model():
    rng = np.random.default_rng(0)
    a = PageAllocator()
    model = {}
    for _ in range(300):
        op = rng.integers(3)
        if op == 0 or not model:
            for p in a.alloc(int(rng.integers(1, 4))):
                model[int(p)] = 1
        elif op == 1:
            p = int(rng.choice(list(model)))
            a.incref([p])
            model[p] += 1
        else:
            p = int(rng.choice(list(model)))
            a.decref([p])
            model[p] -= 1
            if model[p] == 0:
                del model[p]
        if rng.integers(5) == 0:
            a.release_pending()
    counts = np.zeros(a.high_water, np.uint32)
    for p, n in model.items():
        counts[p] = n
    np.testing.assert_array_equal(a.refcounts, counts)
    assert a.num_free + a.num_pending == int((counts == 0).sum())


def test_double_free_is_refused_and_changes_nothing():
    a = PageAllocator()
    a.alloc(3)
    a.decref([1])
    before = a.refcounts.copy()
    with pytest.raises(km.PageTableError, match="already free"):
        a.decref([0, 1])
    with pytest.raises(km.PageTableError, match="does not exist"):
        a.decref([9])
    with pytest.raises(km.PageTableError, match="does not exist"):
        a.incref([3])
    np.testing.assert_array_equal(a.refcounts, before)


def test_reopen_rebuilds_free_list():
    a = PageAllocator(np.array([1, 0, 2, 0], np.uint32))
    assert a.num_free == 2
    np.testing.assert_array_equal(a.alloc(3), [1, 3, 4])


@pytest.mark.parametrize("first,start,n", [(0, 0, 40), (5, 0, 30), (15, 3, 17), (0, 30, 20)])
def test_slot_mapping(first, start, n):
    P = 16
    bt = np.array([7, 2, 9], np.uint32)
    pos = first + start + np.arange(n)
    ref = np.where(pos // P < len(bt), bt[np.minimum(pos // P, len(bt) - 1)].astype(np.int64) * P + pos % P, -1)
    np.testing.assert_array_equal(slot_mapping(bt, first, start, n, P), ref)


def test_paged_layout_rules():
    ok = dict(indptr=[0, 2, 2, 5], indices=[0, 1, 4, 2, 3], last_page_len=[16, 0, 1], page_size=16, num_pages=5)
    check_paged_layout(**ok)
    for change, rule in [
        ({"indptr": [0, 2, 5]}, 1), ({"indptr": [1, 2, 2, 5]}, 1), ({"indptr": [0, 3, 2, 5]}, 2),
        ({"indptr": [0, 2, 2, 4]}, 3), ({"indices": [0, 1, 5, 2, 3]}, 4),
        ({"last_page_len": [17, 0, 1]}, 5), ({"last_page_len": [16, 1, 1]}, 5), ({"last_page_len": [0, 0, 1]}, 5),
    ]:
        with pytest.raises(km.PageTableError, match=f"rule {rule}"):
            check_paged_layout(**{**ok, **change})
