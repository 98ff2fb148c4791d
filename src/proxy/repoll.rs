//! One task's futures that wake each other, polled again at once rather than through the
//! scheduler.
//!
//! A client connection's task drives both sides of each exchange (`serve_connection`): the
//! client side sends a request, which wakes the runtime connection; the runtime connection
//! reads the answer, which wakes the client side. Both wakes happen while the task is being
//! polled, and tokio reschedules a task woken during its own poll as a yield: a write to the
//! I/O driver's eventfd and another `epoll_wait`, twice per forwarded request (`strace` and
//! `perf record -e syscalls:sys_enter_write`, docs/performance.md). [`Repoll`] gives the futures
//! a waker of its own: woken during the task's poll it only marks the pass, and the task polls
//! once more before it returns; woken from anywhere else it wakes the task as usual.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Most passes in one poll of the task: a future that keeps waking itself (a coop budget
/// spent, say) must not keep the worker from other tasks; past it the task yields as usual.
const MAX_PASSES: usize = 16;

/// The waker handed to the futures of one task; see the module doc.
#[derive(Default)]
pub struct Repoll {
    /// Set by every wake: something may make progress if polled again.
    woken: AtomicBool,
    /// True while the task is polling its futures: a wake then is seen by the pass loop.
    polling: AtomicBool,
    /// The task's own waker, for wakes from outside its poll.
    task: AtomicWaker,
}

impl Wake for Repoll {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // SeqCst on both sides: either this load sees the task still polling, or the task's
        // check after it stopped polling sees `woken` (see `poll`).
        self.woken.store(true, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            self.task.wake();
        }
    }
}

impl Repoll {
    /// Runs `pass` with this waker until a pass ends with no wake during it, or `pass`
    /// returns `Ready`. `pass` polls every future of the task once.
    pub fn poll<T>(
        self: &Arc<Self>,
        cx: &mut Context<'_>,
        mut pass: impl FnMut(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.task.register(cx.waker());
        let waker = Waker::from(self.clone());
        let mut inner = Context::from_waker(&waker);
        for _ in 0..MAX_PASSES {
            self.polling.store(true, Ordering::SeqCst);
            self.woken.store(false, Ordering::SeqCst);
            if let Poll::Ready(out) = pass(&mut inner) {
                self.polling.store(false, Ordering::SeqCst);
                return Poll::Ready(out);
            }
            self.polling.store(false, Ordering::SeqCst);
            // A wake during the pass (or racing with its end, from another thread, which saw
            // `polling` and left the task asleep): poll again.
            if !self.woken.load(Ordering::SeqCst) {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// The task's waker: counts its wakes.
    #[derive(Default)]
    struct Task(AtomicUsize);

    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn task() -> (Arc<Task>, Waker) {
        let task = Arc::new(Task::default());
        let waker = Waker::from(task.clone());
        (task, waker)
    }

    #[test]
    fn a_wake_during_the_pass_polls_again_instead_of_waking_the_task() {
        let (task, waker) = task();
        let repoll = Arc::new(Repoll::default());
        let mut passes = 0;
        let out = repoll.poll(&mut Context::from_waker(&waker), |cx| {
            passes += 1;
            if passes == 1 {
                // The client side handing a request to the runtime connection.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(passes)
        });
        assert_eq!(out, Poll::Ready(2));
        assert_eq!(
            task.0.load(Ordering::SeqCst),
            0,
            "the task was not rescheduled"
        );
    }

    #[test]
    fn a_wake_after_the_task_returned_wakes_the_task() {
        let (task, waker) = task();
        let repoll = Arc::new(Repoll::default());
        let mut kept = None;
        let out: Poll<()> = repoll.poll(&mut Context::from_waker(&waker), |cx| {
            kept = Some(cx.waker().clone());
            Poll::Pending
        });
        assert!(out.is_pending());
        assert_eq!(task.0.load(Ordering::SeqCst), 0);
        // An answer from the runtime, later, on another thread.
        let kept = kept.expect("the pass ran");
        std::thread::spawn(move || kept.wake()).join().unwrap();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task was woken");
    }

    #[test]
    fn a_future_that_keeps_waking_itself_yields_after_the_last_pass() {
        let (task, waker) = task();
        let repoll = Arc::new(Repoll::default());
        let mut passes = 0;
        let out: Poll<()> = repoll.poll(&mut Context::from_waker(&waker), |cx| {
            passes += 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        });
        assert!(out.is_pending());
        assert_eq!(passes, MAX_PASSES);
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "woken to run again later");
    }
}
