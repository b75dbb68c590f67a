//! Live heap bytes, for `/metrics` (`voicegate_heap_allocated_bytes`): a counting wrapper
//! around the system allocator.
//!
//! RSS alone cannot tell a leak from allocator fragmentation (freed memory the allocator keeps
//! for reuse). Next to RSS, the live-bytes figure can: on a box that runs for months, a gauge
//! that climbs with the number of calls taken is a leak; a flat one under a creeping RSS is
//! the allocator's business. The `voicegate` binary installs [`CountingAllocator`] as its
//! global allocator; a program that does not (a test binary) reads 0 from [`allocated_bytes`].
//!
//! Cost: one relaxed atomic add or subtract per allocation, reallocation and free.
//!
//! The one module with `unsafe` code: a `GlobalAlloc` impl cannot be written without it.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting the bytes it has handed out and not yet had back.
///
/// ```ignore
/// #[global_allocator]
/// static ALLOCATOR: voicegate::health::heap::CountingAllocator =
///     voicegate::health::heap::CountingAllocator;
/// ```
#[derive(Debug, Default, Clone, Copy)]
pub struct CountingAllocator;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged and only
// adds bookkeeping on an atomic counter, so `System`'s guarantees carry over as they are.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc_zeroed`'s contract.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is; `ptr` came from this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::realloc`'s contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // On failure the old block stays allocated and the count stays as it was.
            if new_size >= layout.size() {
                ALLOCATED.fetch_add(new_size - layout.size(), Ordering::Relaxed);
            } else {
                ALLOCATED.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

/// Bytes currently allocated through [`CountingAllocator`] (requested sizes, without the
/// allocator's own overhead); 0 when it is not the global allocator.
pub(crate) fn allocated_bytes() -> usize {
    ALLOCATED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_alloc_realloc_and_free() {
        // Called directly (not as the test binary's global allocator): the counter is
        // process-wide, but nothing else uses this allocator here.
        let a = CountingAllocator;
        let before = allocated_bytes();
        let layout = Layout::from_size_align(1000, 8).unwrap();
        // SAFETY: a non-zero-size layout; the block is freed below with the same layout.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            assert_eq!(allocated_bytes() - before, 1000);
            let p = a.realloc(p, layout, 4000);
            assert!(!p.is_null());
            assert_eq!(allocated_bytes() - before, 4000);
            let grown = Layout::from_size_align(4000, 8).unwrap();
            let p = a.realloc(p, grown, 10);
            assert_eq!(allocated_bytes() - before, 10);
            a.dealloc(p, Layout::from_size_align(10, 8).unwrap());
            let z = a.alloc_zeroed(layout);
            assert!(std::slice::from_raw_parts(z, 1000).iter().all(|&b| b == 0));
            assert_eq!(allocated_bytes() - before, 1000);
            a.dealloc(z, layout);
        }
        assert_eq!(allocated_bytes(), before);
    }
}
