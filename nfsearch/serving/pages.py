"""KV cache pages: a free list and a refcount per page; each sequence holds its page table.

A page is shared (refcount > 1) only through share_prefix, so prefix caching or forked sequences can
reuse whole pages; the scheduler itself never shares. check_no_leaks catches a page kept after its
sequences ended, or one referenced more often than its refcount says.
"""

from collections import Counter, deque
from collections.abc import Iterable
from typing import Protocol

DEFAULT_PAGE_SIZE = 16


class PageLeakError(RuntimeError):
    """Page accounting is broken (a bug, not a user error)."""


class HasPageTable(Protocol):
    page_table: list[int]


class PageManager:
    def __init__(self, num_pages: int, page_size: int = DEFAULT_PAGE_SIZE):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.refcounts = [0] * num_pages
        self._free: deque[int] = deque(range(num_pages))

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        """Pages that hold num_tokens tokens of one sequence."""
        return -(-num_tokens // self.page_size)

    def num_pages_needed(self, seq: HasPageTable, num_tokens_total: int) -> int:
        """New pages seq needs so its table covers num_tokens_total tokens."""
        return max(0, self.pages_for(num_tokens_total) - len(seq.page_table))

    def can_allocate(self, seq: HasPageTable, num_tokens_total: int) -> bool:
        return self.num_pages_needed(seq, num_tokens_total) <= len(self._free)

    def max_tokens_coverable(self, seq: HasPageTable) -> int:
        """Tokens seq's table could cover if it took every free page."""
        return (len(seq.page_table) + len(self._free)) * self.page_size

    def allocate(self, seq: HasPageTable, num_tokens_total: int) -> None:
        """Grow seq's page table to cover num_tokens_total tokens (never shrinks it)."""
        needed = self.num_pages_needed(seq, num_tokens_total)
        if needed > len(self._free):
            raise PageLeakError(f"allocate: {needed} pages needed, {len(self._free)} free "
                                "(the caller must check can_allocate)")
        for _ in range(needed):
            page = self._free.popleft()
            self.refcounts[page] = 1
            seq.page_table.append(page)

    def share_prefix(self, src: HasPageTable, dst: HasPageTable, num_tokens: int) -> None:
        """Give dst (with an empty table) src's whole pages covering the first num_tokens tokens."""
        if dst.page_table:
            raise PageLeakError("share_prefix: the destination already holds pages")
        for page in src.page_table[:num_tokens // self.page_size]:
            self.refcounts[page] += 1
            dst.page_table.append(page)

    def free(self, seq: HasPageTable) -> None:
        """Drop seq's reference to each of its pages; a page whose refcount reaches 0 is free again."""
        for page in seq.page_table:
            if self.refcounts[page] <= 0:
                raise PageLeakError(f"free: page {page} is already free")
            self.refcounts[page] -= 1
            if self.refcounts[page] == 0:
                self._free.append(page)
        seq.page_table = []

    def slot(self, seq: HasPageTable, position: int) -> int:
        """Where the K/V of seq's token at position lives: page * page_size + offset."""
        return seq.page_table[position // self.page_size] * self.page_size + position % self.page_size

    def check_no_leaks(self, live: Iterable[HasPageTable] = ()) -> None:
        """Raise PageLeakError unless every page's refcount equals its references from live sequences
        and the free list holds exactly the unreferenced pages, once each.

        With no live sequences (every request ended) this means every page is free.
        """
        references = Counter(page for seq in live for page in seq.page_table)
        for page, count in enumerate(self.refcounts):
            if references[page] != count:
                kind = "leaked" if references[page] < count else "shared without a reference"
                raise PageLeakError(f"page {page} {kind}: refcount {count}, "
                                    f"referenced by {references[page]} live sequences")
        free = Counter(self._free)
        if any(n > 1 for n in free.values()):
            raise PageLeakError("a page is on the free list twice")
        unreferenced = {p for p, count in enumerate(self.refcounts) if count == 0}
        if set(free) != unreferenced:
            raise PageLeakError(f"free list {sorted(free)[:8]}... differs from the unreferenced pages")
