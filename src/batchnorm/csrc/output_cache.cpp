// Memory for the kernels' large outputs (y, dx), reused from outputs freed earlier.
//
// A normalization touches each byte of its output once, so on a fresh page the first write
// costs more than the arithmetic: glibc maps blocks over its mmap threshold (128 KiB at
// first, raised as such blocks are freed, up to 32 MiB) anew on every allocation and returns
// them on free, and trims the heap top: an eval BatchNorm2d forward with a 51 MB output took
// 33-37 ms on the 2-core development machine, with torch's kernels as with ours, and 5-6 ms
// in memory already mapped; a chain of BatchNorm1d layers on 200x784 (627 KB outputs)
// page-faulted 8-90 times per layer call, as glibc's heap happened to lie. Training and
// inference loops free and allocate the same sizes step after step, so blocks of at least
// kMinBytes (glibc's first threshold) are kept when freed, up to a limit
// (BATCHNORM_OUTPUT_CACHE_MB, read once; default 1024, 0 turns the cache off), and handed to
// the next output of the same rounded size, most recently freed first; the least recently
// freed go back first. Storage stays resizable (the allocator is the storage's); smaller
// tensors use torch's allocator. torch.profiler's memory profile sees a block allocated
// while a tensor holds it, as it sees torch's own allocations.
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <list>
#include <mutex>

#include "ops.h"

namespace batchnorm_cpu {
namespace {

constexpr size_t kMinBytes = size_t(1) << 17;
constexpr size_t kGranule = size_t(1) << 16;

struct Block {
  void* data;
  size_t size;
};

class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes < kMinBytes || limit_ == 0) return c10::GetCPUAllocator()->allocate(bytes);
    const size_t size = (bytes + kGranule - 1) / kGranule * kGranule;
    Block* block = take(size);
    if (block == nullptr) block = new Block{c10::alloc_cpu(size), size};
    c10::profiledCPUMemoryReporter().New(block->data, size);
    return {block->data, block, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static OutputCache& instance() {
    static OutputCache* cache = new OutputCache();  // never destroyed: frees may come at exit
    return *cache;
  }

 private:
  Block* take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if ((*it)->size == size) {
        Block* block = *it;
        free_.erase(it);
        cached_ -= size;
        return block;
      }
    }
    return nullptr;
  }

  static void release(void* context) {
    Block* block = static_cast<Block*>(context);
    c10::profiledCPUMemoryReporter().Delete(block->data);
    instance().keep(block);
  }

  void keep(Block* block) {
    std::list<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (block->size <= limit_) {
        while (cached_ + block->size > limit_) {
          evicted.push_back(free_.back());
          cached_ -= free_.back()->size;
          free_.pop_back();
        }
        free_.push_front(block);
        cached_ += block->size;
        block = nullptr;
      }
    }
    if (block != nullptr) evicted.push_back(block);
    for (Block* old : evicted) {
      c10::free_cpu(old->data);
      delete old;
    }
  }

  const size_t limit_ = megabytes_setting("BATCHNORM_OUTPUT_CACHE_MB", size_t(1024) << 20);
  std::mutex mutex_;
  std::list<Block*> free_;  // most recently freed first
  size_t cached_ = 0;
};

}  // namespace

at::Tensor empty_output(c10::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &OutputCache::instance(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

}  // namespace batchnorm_cpu
