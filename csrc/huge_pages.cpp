#include "huge_pages.h"

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace lowrank_merge {
namespace {

#if defined(__linux__)

constexpr size_t kHugePageBytes = size_t{2} << 20;

void free_huge_page_buffer(void* data) {
  std::free(data);
}

// Allocations from kHugePageBytes up: posix_memalign + madvise, freed by
// std::free. Smaller ones go to the allocator that was installed before.
// (Its buffers are not reported to torch's memory profiler.)
struct HugePageAllocator final : at::Allocator {
  at::Allocator* previous = nullptr;

  at::DataPtr allocate(size_t nbytes) override {
    void* data = nullptr;
    if (nbytes < kHugePageBytes || posix_memalign(&data, kHugePageBytes, nbytes) != 0) {
      return previous->allocate(nbytes);  // small, or the previous allocator reports the failure
    }
    madvise(data, nbytes, MADV_HUGEPAGE);  // a hint: without THP the pages stay 4 KiB
    return {data, data, &free_huge_page_buffer, at::Device(at::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

HugePageAllocator huge_page_allocator;

void install_huge_page_allocator() {
  huge_page_allocator.previous = c10::GetCPUAllocator();
  c10::SetCPUAllocator(&huge_page_allocator);
}

void restore_previous_allocator() {
  c10::SetCPUAllocator(huge_page_allocator.previous);
}

#else  // transparent huge pages are a Linux feature: scopes only count here

void install_huge_page_allocator() {}
void restore_previous_allocator() {}

#endif

std::mutex scope_mutex;
int open_scopes = 0;

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

}  // namespace lowrank_merge
