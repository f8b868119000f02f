//! The writing half of a connection, in a task of its own: a client that reads slowly
//! never stalls its session, which keeps draining its inbox meanwhile.

use bytes::Bytes;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

pub(crate) struct Writer {
    /// Encoded batches for the task; `None` closes the socket after what came before.
    tx: mpsc::UnboundedSender<Option<Bytes>>,
    /// Bytes handed to the task and not yet written.
    pending: Arc<AtomicUsize>,
    /// Woken whenever a batch has been written.
    drained: Arc<Notify>,
}

/// The task has ended: the socket is broken or closed.
pub(crate) struct Gone;

impl Writer {
    pub(crate) fn spawn<W: AsyncWrite + Unpin + Send + 'static>(mut writer: W) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Option<Bytes>>();
        let pending = Arc::new(AtomicUsize::new(0));
        let drained = Arc::new(Notify::new());
        let (left, wake) = (pending.clone(), drained.clone());
        tokio::spawn(async move {
            while let Some(item) = rx.recv().await {
                let Some(data) = item else {
                    let _ = writer.shutdown().await;
                    break;
                };
                let written = writer.write_all(&data).await.is_ok() && writer.flush().await.is_ok();
                left.fetch_sub(data.len(), Ordering::AcqRel);
                wake.notify_waiters();
                if !written {
                    // The receiver goes with this task: the session's next send fails.
                    break;
                }
            }
        });
        Self {
            tx,
            pending,
            drained,
        }
    }

    /// Hands `data` to the task.
    pub(crate) fn send(&self, data: Bytes) -> Result<(), Gone> {
        let len = data.len();
        self.pending.fetch_add(len, Ordering::AcqRel);
        self.tx.send(Some(data)).map_err(|_| Gone)
    }

    /// Closes the socket once everything handed over is written.
    pub(crate) fn close(&self) {
        let _ = self.tx.send(None);
    }

    /// Bytes handed over and not yet on the socket.
    pub(crate) fn unwritten(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Returns once fewer than `limit` bytes wait to be written.
    pub(crate) async fn drained_below(&self, limit: usize) {
        self.drain().below(limit).await
    }

    /// A handle that waits for the writes to drain, apart from the writer.
    pub(crate) fn drain(&self) -> Drain {
        Drain {
            pending: self.pending.clone(),
            drained: self.drained.clone(),
        }
    }
}

/// Waits for a writer's backlog to shrink, without borrowing the writer.
#[derive(Clone)]
pub(crate) struct Drain {
    pending: Arc<AtomicUsize>,
    drained: Arc<Notify>,
}

impl Drain {
    /// Returns once fewer than `limit` bytes wait to be written.
    pub(crate) async fn below(&self, limit: usize) {
        loop {
            let drained = self.drained.notified();
            if self.pending.load(Ordering::Acquire) < limit {
                return;
            }
            drained.await;
        }
    }
}
