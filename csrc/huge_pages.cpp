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

constexpr size_t kHugePageBytes = size_t{2} << 20;

void free_huge_page_buffer(void* data) {
  std::free(data);
}

// Allocations from kHugePageBytes up: posix_memalign + madvise, freed by
// std::free. Smaller ones go to the allocator that was installed before.
struct HugePageAllocator final : at::Allocator {
  at::Allocator* previous = nullptr;

  at::DataPtr allocate(size_t nbytes) override {
    void* data = nullptr;
    if (nbytes < kHugePageBytes || posix_memalign(&data, kHugePageBytes, nbytes) != 0) {
      return previous->allocate(nbytes);  // small, or the previous allocator reports the failure
    }
#if defined(MADV_HUGEPAGE)
    madvise(data, nbytes, MADV_HUGEPAGE);  // a hint: without THP the pages stay 4 KiB
#endif
    return {data, data, &free_huge_page_buffer, at::Device(at::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

std::mutex scope_mutex;
int open_scopes = 0;
HugePageAllocator huge_page_allocator;

}  // namespace

void begin_huge_pages() {
  std::lock_guard<std::mutex> lock(scope_mutex);
  if (open_scopes++ == 0) {
    huge_page_allocator.previous = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&huge_page_allocator);
  }
}

void end_huge_pages() {
  std::lock_guard<std::mutex> lock(scope_mutex);
  TORCH_CHECK(open_scopes > 0, "lowrank_merge: end_huge_pages without begin_huge_pages");
  if (--open_scopes == 0) c10::SetCPUAllocator(huge_page_allocator.previous);
}

}  // namespace lowrank_merge
