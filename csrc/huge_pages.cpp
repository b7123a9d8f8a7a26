#include "huge_pages.h"

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

#if defined(__linux__)
#include <malloc.h>
#include <sys/mman.h>
#endif

namespace lowrank_merge {
namespace {

std::mutex scope_mutex;  // guards everything below
int open_scopes = 0;

#if defined(__linux__)

constexpr size_t kHugePageBytes = size_t{2} << 20;

// A buffer of the huge-page allocator.
struct HugePageBuffer {
  void* data;
  size_t bytes;
};

// The huge-page allocator's buffers handed out and not yet freed, by address.
std::unordered_map<void*, size_t> live_buffers;
// Buffers freed while a scope is open, kept for the next request of the same
// size, and the byte counts that bound them.
std::vector<HugePageBuffer> idle_buffers;
size_t idle_bytes = 0;
size_t live_bytes = 0;       // buffers handed out and not yet freed
size_t peak_live_bytes = 0;  // the most live bytes since the outermost scope opened

// Under scope_mutex. Frees idle buffers, smallest first, until `limit` bytes
// or fewer are idle.
void release_idle_buffers(size_t limit) {
  std::sort(idle_buffers.begin(), idle_buffers.end(), [](const HugePageBuffer& a, const HugePageBuffer& b) {
    return a.bytes > b.bytes;
  });
  while (idle_bytes > limit) {
    std::free(idle_buffers.back().data);
    idle_bytes -= idle_buffers.back().bytes;
    idle_buffers.pop_back();
  }
}

// Under scope_mutex. The idle bytes a miss may keep with `live_after` bytes
// live: what the peak of live bytes leaves room for, or twice the largest idle
// buffer. When live bytes grow from layer to layer (an in-memory merge keeping
// its outputs) the peak leaves no room at all, and every output is a miss. With
// room for one buffer, each output evicted all but the largest stack, and the
// others were faulted in again in every block: ViT-B/32's qkv stack beside the
// MLP's, and the Gram matrices. With room for two, a ViT-B/32 x 8 cart_merge
// took 10.2-11.0 s against 11.0-12.2 s (medians, alternating processes), its
// peak RSS +60 MiB (benchmarks/NOTES.md, 2026-12-03, fourth session).
size_t idle_bytes_to_keep(size_t live_after) {
  size_t largest = 0;
  for (const auto& idle : idle_buffers) largest = std::max(largest, idle.bytes);
  return std::max(peak_live_bytes > live_after ? peak_live_bytes - live_after : 0, 2 * largest);
}

// Under scope_mutex. An idle buffer of exactly `bytes` bytes (removed from
// the idle list), or nullptr.
void* take_idle_buffer(size_t bytes) {
  const auto found = std::find_if(
      idle_buffers.begin(), idle_buffers.end(), [&](const HugePageBuffer& idle) { return idle.bytes == bytes; });
  if (found == idle_buffers.end()) return nullptr;
  void* data = found->data;
  idle_bytes -= bytes;
  idle_buffers.erase(found);
  return data;
}

// Under scope_mutex. Hands a live buffer back: kept idle while a scope is
// open, else freed.
void release_live_buffer(std::unordered_map<void*, size_t>::iterator live) {
  const HugePageBuffer buffer{live->first, live->second};
  live_buffers.erase(live);
  live_bytes -= buffer.bytes;
  if (open_scopes > 0) {
    idle_buffers.push_back(buffer);
    idle_bytes += buffer.bytes;
  } else {
    std::free(buffer.data);
  }
}

// The deleter of every buffer the allocator hands out.
void free_huge_page_buffer(void* data) {
  std::lock_guard<std::mutex> lock(scope_mutex);
  const auto live = live_buffers.find(data);
  TORCH_INTERNAL_ASSERT(live != live_buffers.end(), "lowrank_merge: freeing an unknown huge-page buffer");
  release_live_buffer(live);
}

at::Allocator* previous_allocator = nullptr;  // torch's CPU allocator, installed again after the scopes

// The raw deleter (at::Allocator::raw_deallocate, which oneDNN's buffers go
// through) frees with whatever allocator is installed at that moment, so it
// also meets pointers of the previous allocator: from before the scope, or
// small. One of ours that was raw-freed by the previous allocator after the
// scopes closed (glibc free, which posix_memalign allows) leaves a stale
// address behind; should malloc hand that address out again, the block is
// only taken for ours if it is at least as large as ours was, so no write can
// overrun it.
void free_raw_buffer(void* data) {
  {
    std::lock_guard<std::mutex> lock(scope_mutex);
    const auto live = live_buffers.find(data);
    if (live != live_buffers.end()) {
      if (malloc_usable_size(data) >= live->second) {
        release_live_buffer(live);
        return;
      }
      live_bytes -= live->second;  // stale: freed elsewhere
      live_buffers.erase(live);
    }
  }
  previous_allocator->raw_deleter()(data);
}

// Allocations from kHugePageBytes up: an idle buffer of exactly that size
// when there is one (reuse touches no fresh page; on the 2-core VMs a fresh
// 2 MiB page costs 0.3-3 ms to fault in, benchmarks/NOTES.md), else
// posix_memalign + madvise. Sizes are not rounded up to whole huge pages: a
// tensor kept after the merge would hold the rest of its last page. On a
// miss, idle buffers are freed, smallest first, as far as needed to keep live
// + idle bytes within the peak of live bytes or within two buffers of it
// (idle_bytes_to_keep): the reuse raises the memory a merge holds by twice
// its largest buffer at most. The last scope's close frees them all. Smaller
// allocations go to the allocator that was installed before. (The buffers
// are not reported to torch's memory profiler.)
struct HugePageAllocator final : at::Allocator {
  at::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kHugePageBytes) return previous_allocator->allocate(nbytes);
    void* data = nullptr;
    {
      std::lock_guard<std::mutex> lock(scope_mutex);
      data = take_idle_buffer(nbytes);
      if (data == nullptr) release_idle_buffers(idle_bytes_to_keep(live_bytes + nbytes));
      live_bytes += nbytes;
      peak_live_bytes = std::max(peak_live_bytes, live_bytes);
    }
    if (data == nullptr) {
      if (posix_memalign(&data, kHugePageBytes, nbytes) != 0) {
        std::lock_guard<std::mutex> lock(scope_mutex);
        live_bytes -= nbytes;
        return previous_allocator->allocate(nbytes);  // the previous allocator reports the failure
      }
      madvise(data, nbytes, MADV_HUGEPAGE);  // a hint: without THP the pages stay 4 KiB
    }
    {
      std::lock_guard<std::mutex> lock(scope_mutex);
      const auto [live, inserted] = live_buffers.try_emplace(data, nbytes);
      if (!inserted) {  // a stale address (see free_raw_buffer), handed out again
        live_bytes -= live->second;
        live->second = nbytes;
      }
    }
    // The context is the data pointer, as at::Allocator::raw_allocate requires.
    return {data, data, &free_huge_page_buffer, at::Device(at::kCPU)};
  }

  at::DeleterFnPtr raw_deleter() const override {
    return &free_raw_buffer;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

HugePageAllocator huge_page_allocator;

// Under scope_mutex, as the outermost scope opens and closes.
void install_huge_page_allocator() {
  peak_live_bytes = live_bytes;
  previous_allocator = c10::GetCPUAllocator();
  c10::SetCPUAllocator(&huge_page_allocator);
}

void restore_previous_allocator() {
  c10::SetCPUAllocator(previous_allocator);
  release_idle_buffers(0);
}

HugePagePoolBytes pool_bytes() {
  return {static_cast<int64_t>(idle_bytes), static_cast<int64_t>(live_bytes), static_cast<int64_t>(peak_live_bytes)};
}

#else  // transparent huge pages are a Linux feature: scopes only count here

void install_huge_page_allocator() {}
void restore_previous_allocator() {}
HugePagePoolBytes pool_bytes() { return {0, 0, 0}; }

#endif

}  // namespace

void begin_huge_pages() {
  std::lock_guard<std::mutex> lock(scope_mutex);
  if (open_scopes++ == 0) install_huge_page_allocator();
}

void end_huge_pages() {
  std::lock_guard<std::mutex> lock(scope_mutex);
  TORCH_CHECK(open_scopes > 0, "lowrank_merge: end_huge_pages without begin_huge_pages");
  if (--open_scopes == 0) restore_previous_allocator();
}

HugePagePoolBytes huge_page_pool_bytes() {
  std::lock_guard<std::mutex> lock(scope_mutex);
  return pool_bytes();
}

}  // namespace lowrank_merge
