//! The writing half of a connection, in a task of its own: a client that reads slowly
//! never stalls its session, which keeps draining its inbox meanwhile.

use bytes::Bytes;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

pub(super) struct Writer {
    /// Encoded batches for the task; `None` closes the socket after what came before.
    tx: mpsc::UnboundedSender<Option<Bytes>>,
    /// Bytes handed to the task and not yet written.
    pending: Arc<AtomicUsize>,
    /// Woken whenever a batch has been written.
    drained: Arc<Notify>,
}

/// The task has ended: the socket is broken or closed.
pub(super) struct Gone;

impl Writer {
    pub(super) fn spawn<W: AsyncWrite + Unpin + Send + 'static>(mut writer: W) -> Self {
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
    pub(super) fn send(&self, data: Bytes) -> Result<(), Gone> {
        let len = data.len();
        self.pending.fetch_add(len, Ordering::AcqRel);
        self.tx.send(Some(data)).map_err(|_| Gone)
    }

    /// Closes the socket once everything handed over is written.
    pub(super) fn close(&self) {
        let _ = self.tx.send(None);
    }

    /// Bytes handed over and not yet on the socket.
    pub(super) fn unwritten(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Returns once fewer than `limit` bytes wait to be written.
    pub(super) async fn drained_below(&self, limit: usize) {
        loop {
            let drained = self.drained.notified();
            if self.unwritten() < limit {
                return;
            }
            drained.await;
        }
    }
}
