//! Bounded capture of a guest's stdout and stderr.
//!
//! A guest that prints must never block, fail or make the host buffer
//! without bound: the first `capacity` bytes are kept, the rest are counted
//! and dropped.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

#[derive(Debug, Default)]
struct Buffer {
    kept: Vec<u8>,
    dropped: u64,
}

/// A write-only pipe that keeps at most `capacity` bytes.
#[derive(Debug, Clone)]
pub(crate) struct BoundedPipe {
    capacity: usize,
    buffer: Arc<Mutex<Buffer>>,
}

impl BoundedPipe {
    pub(crate) fn new(capacity: usize) -> Self {
        BoundedPipe {
            capacity,
            buffer: Arc::default(),
        }
    }

    fn push(&self, bytes: &[u8]) {
        let mut b = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
        let room = self.capacity.saturating_sub(b.kept.len());
        let take = room.min(bytes.len());
        b.kept.extend_from_slice(&bytes[..take]);
        b.dropped += (bytes.len() - take) as u64;
    }

    /// The kept bytes and how many were dropped.
    pub(crate) fn take(&self) -> (Vec<u8>, u64) {
        let mut b = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
        (std::mem::take(&mut b.kept), std::mem::take(&mut b.dropped))
    }
}

/// Most bytes the guest may hand over in one write; it always may.
const WRITE_PERMIT: usize = 64 << 10;

#[wasmtime_wasi::async_trait]
impl OutputStream for BoundedPipe {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for BoundedPipe {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for BoundedPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for BoundedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for BoundedPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_bytes_and_counts_the_rest() {
        let p = BoundedPipe::new(4);
        p.push(b"abc");
        p.push(b"def");
        assert_eq!(p.take(), (b"abcd".to_vec(), 2));
    }
}
