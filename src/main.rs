//! The `corpusdb` binary: argument parsing, printing and exit codes over the library.

// glibc's malloc spends measurable time freeing, on the writer thread, buffers that the
// parse threads allocated; mimalloc handles such cross-thread frees cheaply (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Training frees and allocates buffers of the same sizes for every layer of every step,
/// an import every batch: returning the freed memory to the OS and faulting it in again
/// cost a fifth of a CPU step and about 7% of an import (BENCHMARKS.md), so these
/// processes keep it for reuse.
pub fn keep_freed_memory() {
    // Safety: sets one of mimalloc's options; any value is valid for this one.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

/// RocksDB allocates its memtables (in 1 MiB blocks) and write batches (several MiB) with
/// the C allocator. Left to itself, glibc raises its mmap threshold to the largest block
/// freed, so the batches then come from its heap, between the memtables' blocks, and freed
/// memtables stayed there, fragmented: a 3M-record import peaked at 848-880 MiB,
/// 735-753 MiB with the threshold fixed at 4 MiB, in the same time (BENCHMARKS.md). Fixed,
/// every block above it is mapped and unmapped whole.
pub fn return_freed_memtables() {
    // Safety: a mallopt with integer arguments; glibc accepts any size for this one.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

/// Short commands that read the store (plans, batches, categories, queries) lose more
/// time to the kernel zeroing the 2 MiB transparent huge pages mimalloc asks for than
/// the pages save them, and the time varies from run to run: a resumed batch at 10M
/// examples took 0.52-0.94 s with them and 0.55-0.68 s without (BENCHMARKS.md). Long
/// imports and training keep them.
pub fn small_pages_only() {
    // Safety: a prctl with integer arguments; it fails harmlessly where unsupported.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(err) => {
            // A closed pipe (`corpusdb rejects | head`) is not a failure.
            if err.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
