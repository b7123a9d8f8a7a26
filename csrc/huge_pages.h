// Transparent huge pages for the large CPU buffers of a layer.
//
// A merge allocates fresh buffers of tens of MB to GB per layer (the centered
// stack, the Gram matrices, the iterates), and on Linux the first touch of
// every 4 KiB page of a fresh allocation is a page fault: for a [8, 4096, 14336]
// float32 layer about 2 s of its 17 s on the 2-core Intel VM. Backed by 2 MiB
// pages (madvise MADV_HUGEPAGE, honoured where
// /sys/kernel/mm/transparent_hugepage/enabled is "madvise" or "always", the
// common defaults), the same allocations fault 512x less often; this is what
// torch does for every allocation with THP_MEM_ALLOC_ENABLE=1, an environment
// variable read once at start-up that a library cannot set
// (benchmarks/NOTES.md, 2026-12-02, third session).
#pragma once

#include <c10/core/Allocator.h>

#include <cstdint>
#include <tuple>

namespace lowrank_merge {

// A huge-page scope (below) opened and closed by hand; the private ops
// _begin_huge_pages / _end_huge_pages call these for the Python layer's stacks.
// On Linux, while at least one scope is open, CPU allocations of at least 2 MiB (from
// any thread) are 2 MiB aligned and advised as huge pages, and a buffer freed
// inside the scopes is kept for the next allocation of its size (so a merge
// that opens one scope around all its layers touches fresh pages only for the
// first layer of each shape); smaller ones, and every allocation once the last
// scope has closed, go to torch's CPU allocator as before. Memory allocated
// inside a scope may be freed after it: each buffer carries its own deleter.
// Scopes nest and may overlap across threads. Raw allocations
// (at::Allocator::raw_allocate: oneDNN's buffers) are served and freed alike.
// Elsewhere scopes only count.
void begin_huge_pages();
void end_huge_pages();  // raises if no scope is open

// Bytes of the huge-page buffers: (idle, kept for reuse inside the open
// scopes; live, handed out and not yet freed; the peak of live bytes since the
// outermost scope opened). Idle + live exceed that peak by twice the largest
// idle buffer at most, and idle == 0 once no scope is open. For tests (the
// private op _huge_page_pool_bytes); zeros where scopes only count.
using HugePagePoolBytes = std::tuple<int64_t, int64_t, int64_t>;
HugePagePoolBytes huge_page_pool_bytes();

// begin_huge_pages / end_huge_pages for the lifetime of the object.
class HugePageScope {
 public:
  HugePageScope() { begin_huge_pages(); }
  ~HugePageScope() { end_huge_pages(); }
  HugePageScope(const HugePageScope&) = delete;
  HugePageScope& operator=(const HugePageScope&) = delete;
};

}  // namespace lowrank_merge
