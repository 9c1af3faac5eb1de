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

/// The count is the whole process's: tests of this file take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Sends `text`, waits for the hub's `error` answer, and lets every task settle.
async fn exchange(client: &mut common::Client, text: &str) -> isize {
    client.send_text(text).await;
    client.expect("error").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    LIVE.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "current_thread")]
async fn a_connection_gives_back_the_memory_of_a_large_message() {
    let _turn = ONE_AT_A_TIME.lock().await;
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

/// An idle connection holds no read buffer and no queue buffer: fastwebsockets' 8 KiB read
/// buffer (patched in `vendor/fastwebsockets`) and the outbound channel's first block of slots
/// (1.8 KiB, before the outbox became a deque) were most of what a viewer cost. The figure
/// covers both ends, the hub's connection and this process's client (about 5 KiB together in a
/// debug build; 24 KiB before the read buffer went, 7.8 KiB before the queue did).
#[tokio::test(flavor = "current_thread")]
async fn an_idle_connection_holds_no_read_buffer_and_no_queue_buffer() {
    const VIEWERS: usize = 50;
    let _turn = ONE_AT_A_TIME.lock().await;
    let hub = TestHub::start().await;
    // The first connection fills the hub's lazily built state (metrics series, channel entry).
    let mut first = hub.viewer("v-first", &["fleet"]).await;
    let before = exchange(&mut first, r#"{"type":"dance"}"#).await;
    let mut viewers = Vec::with_capacity(VIEWERS);
    for i in 0..VIEWERS {
        viewers.push(hub.viewer(&format!("v{i}"), &["fleet"]).await);
    }
    let after = exchange(&mut first, r#"{"type":"dance"}"#).await;
    let per_connection = (after - before) / VIEWERS as isize;
    println!("{per_connection} bytes per idle connection, hub and client together");
    assert!(
        per_connection < 6 * 1024,
        "an idle connection holds {per_connection} bytes, hub and client together: \
         a read or queue buffer is back"
    );
    drop(viewers);
}

/// The first frames a connection sends (hello, subscribed) make its queue and its writer's
/// list of buffers allocate; once a ping interval, the writer gives both back.
#[tokio::test(flavor = "current_thread")]
async fn an_idle_connection_gives_its_queue_buffers_back_once_a_ping_interval() {
    const VIEWERS: usize = 50;
    let _turn = ONE_AT_A_TIME.lock().await;
    let hub = TestHub::with(|s| {
        s.ws.ping_interval = Duration::from_millis(300);
        s.ws.pong_timeout = Duration::from_secs(30);
    })
    .await;
    let mut viewers = Vec::with_capacity(VIEWERS);
    for i in 0..VIEWERS {
        viewers.push(hub.viewer(&format!("v{i}"), &["fleet"]).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let connected = LIVE.load(Ordering::Relaxed);
    // Past the first ping; the viewers do not read, so nothing else arrives meanwhile.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let pinged = LIVE.load(Ordering::Relaxed);
    let given_back = (connected - pinged) / VIEWERS as isize;
    println!("{given_back} bytes per connection given back after a ping interval");
    assert!(
        given_back >= 256,
        "after a ping interval each connection gave back {given_back} bytes, not its buffers"
    );
    drop(viewers);
}
