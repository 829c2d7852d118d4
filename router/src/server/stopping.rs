//! The router's stop signal, and the response streams it ends.
//!
//! tonic's graceful shutdown waits until every open call has finished, and
//! Watch and LeaseKeepAlive streams never finish by themselves. When the
//! router stops they end with etcd's status for a stopping server,
//! `Unavailable "etcdserver: server stopped"`: etcd's clients retry on
//! Unavailable (a clientv3 watcher reconnects and resumes from the last
//! revision it got), where a bare end of stream would halt them.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::watch;
use tonic::Status;

use crate::error::EtcdError;

/// Set once, when the router begins to stop.
#[derive(Debug)]
pub struct StopSignal(watch::Sender<bool>);

impl Default for StopSignal {
    fn default() -> Self {
        Self(watch::Sender::new(false))
    }
}

impl StopSignal {
    pub fn stop(&self) {
        self.0.send_replace(true);
    }

    pub fn is_stopped(&self) -> bool {
        *self.0.borrow()
    }

    /// `inner`, ended with etcd's "server stopped" once the router stops.
    pub fn end_on_stop<S>(&self, inner: S) -> UntilStopped<S> {
        let mut receiver = self.0.subscribe();
        UntilStopped {
            inner,
            stopped: Some(Box::pin(async move {
                // An error means the signal is gone with the router: stop too.
                let _ = receiver.wait_for(|stopped| *stopped).await;
            })),
        }
    }
}

/// A response stream that ends with etcd's "server stopped" status when the
/// router stops (see the module comment).
pub struct UntilStopped<S> {
    inner: S,
    /// `None` once the stream has ended with that status.
    stopped: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl<S> std::fmt::Debug for UntilStopped<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UntilStopped")
            .field("ended", &self.stopped.is_none())
            .finish_non_exhaustive()
    }
}

impl<S, T> Stream for UntilStopped<S>
where
    S: Stream<Item = Result<T, Status>> + Unpin,
{
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(stopped) = this.stopped.as_mut() else {
            return Poll::Ready(None);
        };
        if stopped.as_mut().poll(cx).is_ready() {
            this.stopped = None;
            return Poll::Ready(Some(Err(EtcdError::Stopped.into())));
        }
        Pin::new(&mut this.inner).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use futures::StreamExt;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::Code;

    use super::*;

    #[tokio::test]
    async fn streams_end_with_etcds_status_when_the_router_stops() {
        let signal = StopSignal::default();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<u32, Status>>(4);
        let mut stream = signal.end_on_stop(ReceiverStream::new(rx));
        tx.send(Ok(1)).await.unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap(), 1);
        signal.stop();
        tx.send(Ok(2)).await.unwrap();
        let status = stream.next().await.unwrap().unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (Code::Unavailable, "etcdserver: server stopped")
        );
        assert!(stream.next().await.is_none());
        // A stream opened after the stop ends at once.
        let (_tx, rx) = tokio::sync::mpsc::channel::<Result<u32, Status>>(4);
        let mut late = signal.end_on_stop(ReceiverStream::new(rx));
        assert_eq!(
            late.next().await.unwrap().unwrap_err().code(),
            Code::Unavailable
        );
    }
}
