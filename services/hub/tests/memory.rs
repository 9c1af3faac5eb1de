//! Memory a connection keeps: measured with a counting allocator around a real hub and client in
//! this process (its own test binary, so nothing else allocates meanwhile).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use common::TestHub;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is updated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Sends `text`, waits for the hub's `error` answer, and lets every task settle.
async fn exchange(client: &mut common::Client, text: &str) -> isize {
    client.send_text(text).await;
    client.expect("error").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    LIVE.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "current_thread")]
async fn a_connection_gives_back_the_memory_of_a_large_message() {
    let hub = TestHub::start().await;
    let mut viewer = hub.viewer("v", &[]).await;
    let small = r#"{"type":"dance"}"#;
    let large = format!(r#"{{"type":"dance","pad":"{}"}}"#, "x".repeat(60 * 1024));
    exchange(&mut viewer, small).await;
    let before = exchange(&mut viewer, small).await;
    exchange(&mut viewer, &large).await;
    let after = exchange(&mut viewer, small).await;
    let kept = after - before;
    assert!(
        kept < 16 * 1024,
        "the connection kept {kept} bytes after one 60 KiB message"
    );
}
