//! [`Outbox`]: the writing side of one framed connection, shared by every task that sends
//! on it. The first sender to find nobody writing becomes the writer: it writes its frame,
//! then whatever others queued meanwhile, until the queue is empty; a sender that finds a
//! writer at work only queues its frame and returns. No writer task stands between a
//! request and the socket (one task wake-up less per message), nobody waits in line for a
//! lock, and a burst still goes out in few writes.
//!
//! It knows frames (the [`codec`](crate::codec)) and a byte sink; nothing of envelopes,
//! requests or what is on the other side.

use std::sync::{Arc, Mutex};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::codec::Encoder;

use crate::codec::{FrameCodec, FrameError};

/// A framed writer shared by tasks. Frames go out whole and in the order they were
/// queued. A sender's future may be dropped at any point (a timeout) without losing or
/// tearing a frame: a frame is queued whole, encoded whole, its bytes stay buffered until
/// written, and a writer dropped mid-write hands the rest to a task of its own.
pub struct Outbox<W> {
    codec: FrameCodec,
    /// Frames queued and not yet encoded, and whether a writer is at work. Held only to
    /// push, take or hand over, never across `.await`.
    queue: Mutex<Queue>,
    /// The sink and the bytes encoded but not yet written. Only the writer (and
    /// [`Outbox::close`]) takes it, so it is never waited for in a line of senders.
    out: tokio::sync::Mutex<Sink<W>>,
}

#[derive(Default)]
struct Queue {
    frames: Vec<Vec<u8>>,
    writing: bool,
}

struct Sink<W> {
    /// `None` once closed.
    write: Option<W>,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin + Send + 'static> Outbox<W> {
    /// An outbox writing to `write`, refusing frames over `codec`'s limit.
    pub fn new(write: W, codec: FrameCodec) -> Arc<Self> {
        Arc::new(Outbox {
            codec,
            queue: Mutex::default(),
            out: tokio::sync::Mutex::new(Sink {
                write: Some(write),
                buf: BytesMut::new(),
            }),
        })
    }

    /// Queues `frame` without writing it: the next [`Outbox::send`] or
    /// [`Outbox::write_queued`] writes it. For callers that cannot wait.
    pub fn push(&self, frame: Vec<u8>) {
        self.queue().frames.push(frame);
    }

    /// Queues `frame` and, unless a writer is at work (it then writes it), writes
    /// everything queued. An error means the connection cannot be written to again.
    pub async fn send(self: &Arc<Self>, frame: Vec<u8>) -> Result<(), FrameError> {
        let becomes_writer = {
            let mut queue = self.queue();
            queue.frames.push(frame);
            !std::mem::replace(&mut queue.writing, true)
        };
        if !becomes_writer {
            return Ok(());
        }
        self.write_as_writer().await
    }

    /// Writes every frame queued so far (and any bytes a dropped writer left), unless a
    /// writer is at work.
    pub async fn write_queued(self: &Arc<Self>) -> Result<(), FrameError> {
        if std::mem::replace(&mut self.queue().writing, true) {
            return Ok(());
        }
        self.write_as_writer().await
    }

    /// The writer's loop: takes the queue and writes it until nothing is left, then hands
    /// the role back.
    async fn write_as_writer(self: &Arc<Self>) -> Result<(), FrameError> {
        let mut role = WriterRole {
            outbox: self.clone(),
            done: false,
        };
        let result = self.write_until_empty().await;
        if result.is_err() {
            self.queue().writing = false;
        }
        role.done = true;
        result
    }

    async fn write_until_empty(&self) -> Result<(), FrameError> {
        let mut out = self.out.lock().await;
        let Sink { write, buf } = &mut *out;
        let mut codec = self.codec;
        loop {
            {
                let mut queue = self.queue();
                if queue.frames.is_empty() && !buf.has_remaining() {
                    queue.writing = false;
                    return Ok(());
                }
                for frame in queue.frames.drain(..) {
                    codec.encode(frame, buf)?;
                }
            }
            let Some(write) = write.as_mut() else {
                return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe).into());
            };
            while buf.has_remaining() {
                if write.write_buf(buf).await? == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
                }
            }
            write.flush().await?;
        }
    }

    /// Shuts the writing side down (the peer reads the end of the stream); later sends
    /// fail. Waits for a write under way.
    pub async fn close(&self) {
        let mut out = self.out.lock().await;
        if let Some(mut write) = out.write.take() {
            let _ = write.shutdown().await;
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().expect("outbox queue poisoned")
    }
}

/// Held by the writer while it writes; dropped before it is `done` (its sender's future
/// dropped mid-write), it gives the role up and leaves the rest to a task of its own, so
/// queued frames are never stranded.
struct WriterRole<W: AsyncWrite + Unpin + Send + 'static> {
    outbox: Arc<Outbox<W>>,
    done: bool,
}

impl<W: AsyncWrite + Unpin + Send + 'static> Drop for WriterRole<W> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.outbox.queue().writing = false;
        // Outside a runtime (it is shutting down) there is nobody left to write to.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let outbox = self.outbox.clone();
            runtime.spawn(async move {
                let _ = outbox.write_queued().await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio_util::codec::FramedRead;

    #[tokio::test]
    async fn frames_go_out_whole_and_in_order() {
        let (near, far) = tokio::io::duplex(64);
        let outbox = Outbox::new(near, FrameCodec::default());
        outbox.push(b"first".to_vec());
        let sender = outbox.clone();
        let writing = tokio::spawn(async move { sender.send(vec![b'x'; 1000]).await });
        let mut frames = FramedRead::new(far, FrameCodec::default());
        assert_eq!(&frames.next().await.unwrap().unwrap()[..], b"first");
        assert_eq!(frames.next().await.unwrap().unwrap().len(), 1000);
        writing.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_dropped_sender_leaves_its_bytes_for_the_next() {
        // A 16-byte pipe: the 1000-byte frame cannot be written in one go.
        let (near, far) = tokio::io::duplex(16);
        let outbox = Outbox::new(near, FrameCodec::default());
        let stalled = tokio::time::timeout(
            std::time::Duration::from_millis(10),
            outbox.send(vec![b'a'; 1000]),
        )
        .await;
        assert!(stalled.is_err(), "the write should not have finished");
        let mut frames = FramedRead::new(far, FrameCodec::default());
        let (read, written) = tokio::join!(frames.next(), outbox.send(b"next".to_vec()));
        written.unwrap();
        assert_eq!(read.unwrap().unwrap().len(), 1000);
        assert_eq!(&frames.next().await.unwrap().unwrap()[..], b"next");
    }

    #[tokio::test]
    async fn a_sender_finding_a_writer_at_work_only_queues() {
        let (near, far) = tokio::io::duplex(16);
        let outbox = Outbox::new(near, FrameCodec::default());
        let writer = outbox.clone();
        let writing = tokio::spawn(async move { writer.send(vec![b'a'; 1000]).await });
        while !outbox.queue().writing {
            tokio::task::yield_now().await;
        }
        // Returns at once although the pipe is full: the writer at work takes the frame.
        outbox.send(b"queued".to_vec()).await.unwrap();
        let mut frames = FramedRead::new(far, FrameCodec::default());
        assert_eq!(frames.next().await.unwrap().unwrap().len(), 1000);
        assert_eq!(&frames.next().await.unwrap().unwrap()[..], b"queued");
        writing.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn close_ends_the_stream_and_later_sends_fail() {
        let (near, far) = tokio::io::duplex(64);
        let outbox = Outbox::new(near, FrameCodec::default());
        outbox.close().await;
        let mut frames = FramedRead::new(far, FrameCodec::default());
        assert!(frames.next().await.is_none());
        assert!(outbox.send(b"late".to_vec()).await.is_err());
    }
}
