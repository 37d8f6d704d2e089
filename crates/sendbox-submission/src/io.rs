//! The connection: plain or TLS, read a line at a time with a cap, or a
//! message up to its terminating `.` with dot-unstuffing and a cap.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// The longest command line (RFC 5321 allows 512; AUTH answers are longer).
pub(crate) const MAX_LINE: usize = 4096;

/// A DATA line longer than this is passed on in pieces, so a client
/// cannot make the listener buffer more than this beyond the message.
const MAX_DATA_CHUNK: usize = 64 * 1024;

pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Why reading stopped.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The client closed the connection.
    Closed,
    /// Nothing arrived in time.
    Timeout,
    /// A line beyond [`MAX_LINE`].
    TooLong,
    /// A network error.
    Io(io::Error),
}

/// A message received by [`Conn::read_data`].
pub(crate) struct Data {
    /// Its bytes, dot-unstuffed, every line ending in CRLF.
    pub(crate) bytes: Vec<u8>,
    /// It was larger than allowed: `bytes` holds only the beginning.
    pub(crate) too_big: bool,
}

pub(crate) struct Conn {
    pub(crate) stream: Stream,
    /// Bytes read and not yet consumed.
    buf: Vec<u8>,
}

impl Conn {
    pub(crate) fn new(stream: Stream) -> Conn {
        Conn {
            stream,
            buf: Vec::with_capacity(1024),
        }
    }

    pub(crate) fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::Tls(_))
    }

    /// Whether the client sent more than one command's worth ahead (what a
    /// STARTTLS command injection looks like).
    pub(crate) fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Gives up the TCP stream for a TLS handshake, dropping anything read
    /// ahead in plain text (RFC 3207: nothing from before the handshake
    /// may count after it).
    pub(crate) fn into_tcp(self) -> Option<TcpStream> {
        match self.stream {
            Stream::Plain(s) => Some(s),
            Stream::Tls(_) => None,
        }
    }

    async fn fill(&mut self, timeout: Duration) -> Result<(), ReadError> {
        let mut chunk = [0u8; 8192];
        let read = async {
            match &mut self.stream {
                Stream::Plain(s) => s.read(&mut chunk).await,
                Stream::Tls(s) => s.read(&mut chunk).await,
            }
        };
        match tokio::time::timeout(timeout, read).await {
            Err(_) => Err(ReadError::Timeout),
            Ok(Err(e)) => Err(ReadError::Io(e)),
            Ok(Ok(0)) => Err(ReadError::Closed),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
        }
    }

    /// One line without its line ending (CRLF, or a bare LF).
    pub(crate) async fn read_line(&mut self, timeout: Duration) -> Result<Vec<u8>, ReadError> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.len() > MAX_LINE {
                    return Err(ReadError::TooLong);
                }
                return Ok(line);
            }
            if self.buf.len() > MAX_LINE {
                return Err(ReadError::TooLong);
            }
            self.fill(timeout).await?;
        }
    }

    /// The message after `354`, up to the line `.` (CRLF `.` CRLF only),
    /// within `timeout` in all. Lines starting with a dot lose it; bare LF
    /// line endings become CRLF (so no other server reads the message's
    /// end differently); past `max` bytes the rest is read and dropped.
    pub(crate) async fn read_data(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> Result<Data, ReadError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut data = Data {
            bytes: Vec::new(),
            too_big: false,
        };
        let mut at_line_start = true;
        loop {
            while let Some(piece) = next_piece(&mut self.buf) {
                let (mut line, complete) = piece;
                if at_line_start && complete && line == b".\r\n" {
                    return Ok(data);
                }
                if at_line_start && line.first() == Some(&b'.') {
                    line.remove(0);
                }
                if complete && !line.ends_with(b"\r\n") {
                    line.pop();
                    line.extend_from_slice(b"\r\n");
                }
                at_line_start = complete;
                if data.bytes.len() + line.len() > max {
                    data.too_big = true;
                } else if !data.too_big {
                    data.bytes.extend_from_slice(&line);
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(ReadError::Timeout);
            }
            self.fill(left).await?;
        }
    }

    /// Writes `text` (lines ending in CRLF) and flushes.
    pub(crate) async fn write(&mut self, text: &str) -> io::Result<()> {
        let bytes = text.as_bytes();
        match &mut self.stream {
            Stream::Plain(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
            Stream::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }

    pub(crate) async fn shutdown(&mut self) {
        let _ = match &mut self.stream {
            Stream::Plain(s) => s.shutdown().await,
            Stream::Tls(s) => s.shutdown().await,
        };
    }
}

/// The next line from `buf` (with its LF) and `true`; or, with no LF in
/// the first [`MAX_DATA_CHUNK`] bytes, that much and `false`; or nothing
/// yet. A CR at the end of a piece waits for what follows it.
fn next_piece(buf: &mut Vec<u8>) -> Option<(Vec<u8>, bool)> {
    if let Some(end) = buf.iter().position(|&b| b == b'\n') {
        return Some((buf.drain(..=end).collect(), true));
    }
    if buf.len() >= MAX_DATA_CHUNK {
        let cut = if buf[MAX_DATA_CHUNK - 1] == b'\r' {
            MAX_DATA_CHUNK - 1
        } else {
            MAX_DATA_CHUNK
        };
        return Some((buf.drain(..cut).collect(), false));
    }
    None
}
