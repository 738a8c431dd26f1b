//! Ending a connection from outside it: the stream index disconnects a client too slow to keep
//! up, and shutdown asks every connection to finish what it is doing and close.
//!
//! A connection's task is woken once for every frame it sends. Polling the two signals on each
//! of those wakes (a lock apiece) showed in profiles, so they are polled through a waker of
//! their own and only when that waker was woken.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::{watch, Notify};

use crate::panic::lock;

/// Tells every connection that the server is shutting down, and waits until all are closed.
pub struct Shutdown {
    notify: Arc<Notify>,
    /// Whether shutdown has started; each connection holds a receiver until it ends, which is
    /// how the server counts them.
    started: watch::Sender<bool>,
}

/// What a connection holds to hear of shutdown; the server waits for every one to be dropped.
pub struct ShutdownWatch {
    notify: Arc<Notify>,
    started: watch::Receiver<bool>,
}

impl Shutdown {
    /// A shutdown no connection has heard of yet.
    pub fn new() -> Self {
        Shutdown {
            notify: Arc::new(Notify::new()),
            started: watch::Sender::new(false),
        }
    }

    /// A watch for one more connection.
    pub fn watch(&self) -> ShutdownWatch {
        ShutdownWatch {
            notify: self.notify.clone(),
            started: self.started.subscribe(),
        }
    }

    /// Asks every connection to shut down gracefully, and resolves when all have closed.
    pub async fn shut_down(self) {
        // Set before notifying: a connection that starts listening after the notification
        // reads the flag instead.
        self.started.send_replace(true);
        self.notify.notify_waiters();
        self.started.closed().await;
    }
}

/// How an interrupted connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// It finished by itself: the client closed it, or it closed after a graceful shutdown.
    Closed,
    /// Its disconnect fired: a stream on it fell too far behind.
    Disconnected,
}

pin_project_lite::pin_project! {
    /// A hyper connection that ends at once when `disconnect` fires and shuts down gracefully
    /// when the server does. Both signals are held inline, with no allocation of their own.
    pub struct Interruptible<C> {
        #[pin]
        connection: C,
        #[pin]
        disconnected: OwnedNotified,
        #[pin]
        shutdown_started: OwnedNotified,
        // Shut down at the first poll: the server was shutting down already, or is full.
        shut_down_at_once: bool,
        shutting_down: bool,
        signal_waker: Arc<SignalWaker>,
        // Held until the connection ends, which is what shutdown waits for.
        _shutdown: ShutdownWatch,
    }
}

impl<C: GracefulConnection> Interruptible<C> {
    /// Serves `connection` until it ends, `disconnect` fires, or shutdown starts.
    pub fn new(connection: C, disconnect: Arc<Notify>, shutdown: ShutdownWatch) -> Self {
        // Hears `notify_waiters` from the moment it is created, so before the flag is read.
        let shutdown_started = shutdown.notify.clone().notified_owned();
        let started = *shutdown.started.borrow();
        Interruptible {
            connection,
            disconnected: disconnect.notified_owned(),
            shutdown_started,
            shut_down_at_once: started,
            shutting_down: false,
            signal_waker: Arc::new(SignalWaker {
                woken: AtomicBool::new(true),
                task: Mutex::new(None),
            }),
            _shutdown: shutdown,
        }
    }

    /// Like [`Interruptible::new`], for a connection the server has no room for: it serves
    /// what the client has sent already (with 503s), then closes.
    pub fn shutting_down(connection: C, disconnect: Arc<Notify>, shutdown: ShutdownWatch) -> Self {
        Interruptible {
            shut_down_at_once: true,
            ..Self::new(connection, disconnect, shutdown)
        }
    }
}

impl<C: GracefulConnection> Future for Interruptible<C> {
    type Output = Result<Ended, C::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if this.signal_waker.take_woken(cx.waker()) {
            let waker = Waker::from(this.signal_waker.clone());
            let mut signal_cx = Context::from_waker(&waker);
            if this.disconnected.poll(&mut signal_cx).is_ready() {
                return Poll::Ready(Ok(Ended::Disconnected));
            }
            if !*this.shutting_down
                && (*this.shut_down_at_once
                    || this.shutdown_started.poll(&mut signal_cx).is_ready())
            {
                *this.shutting_down = true;
                this.connection.as_mut().graceful_shutdown();
            }
        }
        this.connection.poll(cx).map_ok(|()| Ended::Closed)
    }
}

/// The signals' waker: notes that a signal woke the task, then wakes the task.
struct SignalWaker {
    woken: AtomicBool,
    /// The task to wake. Recorded whenever the signals are polled; a tokio task's waker
    /// always wakes that same task, so a record from an earlier poll is never stale.
    task: Mutex<Option<Waker>>,
}

impl SignalWaker {
    /// Whether a signal woke the task since the last call (the first call says yes); if so,
    /// records `task` as the waker to pass the next signal on to.
    fn take_woken(&self, task: &Waker) -> bool {
        // A plain load first: most polls are for frames, and a swap would write every time.
        if !self.woken.load(Ordering::Relaxed) || !self.woken.swap(false, Ordering::AcqRel) {
            return false;
        }
        let mut recorded = lock(&self.task);
        if !recorded.as_ref().is_some_and(|waker| waker.will_wake(task)) {
            *recorded = Some(task.clone());
        }
        true
    }
}

impl Wake for SignalWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Some(task) = &*lock(&self.task) {
            task.wake_by_ref();
        }
    }
}
