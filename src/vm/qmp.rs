//! A QMP client over QEMU's Unix socket, on the `qapi` crate's types.
//!
//! One reader task owns the socket's read half: it routes each reply to the
//! command waiting for its `id` and copies each event into every
//! subscriber's unbounded queue. Commands therefore never consume events,
//! and a subscriber registered before a command sees every event the
//! command causes. Parsing what QEMU sends is sans-IO, in [`message`].

pub mod message;

use crate::lock::MutexExt;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qapi::qmp::{QMP, qmp_capabilities};
use qapi::{Command, Execute};
use serde_json::Value;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use self::message::{Message, classify, decode_reply, parse_greeting, parse_line};
use crate::error::Chain;

/// Longest QMP message accepted; replies such as `query-qmp-schema` are
/// large, but a peer must not make us buffer without bound.
pub const MAX_MESSAGE: u64 = 16 << 20;

/// Why a QMP operation failed.
#[derive(Debug, Error)]
pub enum QmpError {
    /// QEMU's QMP socket could not be connected to.
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the connected socket failed.
    #[error("QMP socket I/O failed")]
    Io(#[from] std::io::Error),
    /// The first message was not a QMP greeting.
    #[error("QEMU sent an unexpected greeting: {greeting}")]
    Greeting {
        /// What QEMU sent instead.
        greeting: serde_json::Value,
        /// Why it is not a greeting.
        #[source]
        source: serde_json::Error,
    },
    /// A command got no reply in time.
    #[error("QMP command {command} got no reply within {after:?}; QEMU may be hung")]
    Timeout {
        /// The QMP command name.
        command: &'static str,
        /// How long it waited.
        after: Duration,
    },
    /// The socket closed before the reply came.
    #[error("QMP connection closed while {command} was in flight; QEMU probably exited")]
    Closed {
        /// The QMP command name.
        command: &'static str,
    },
    /// QEMU answered the command with an error.
    #[error("QEMU refused {command}: {desc} ({class:?})")]
    Qemu {
        /// The QMP command name.
        command: &'static str,
        /// QEMU's error class.
        class: qapi::ErrorClass,
        /// QEMU's description of the error.
        desc: String,
    },
    /// The reply does not have the shape the command's schema gives.
    #[error("cannot decode QEMU's reply to {command}")]
    Decode {
        /// The QMP command name.
        command: &'static str,
        /// What serde_json said.
        #[source]
        source: serde_json::Error,
    },
    /// The command's arguments could not be serialised.
    #[error("cannot encode QMP command {command}")]
    Encode {
        /// The QMP command name.
        command: &'static str,
        /// What serde_json said.
        #[source]
        source: serde_json::Error,
    },
}

/// One asynchronous QMP event.
#[derive(Clone, Debug)]
pub struct QmpEvent {
    /// The event name, e.g. `DEVICE_DELETED`.
    pub name: String,
    /// The event's `data` member (`null` when absent).
    pub data: Value,
    raw: Value,
}

impl QmpEvent {
    /// The event as the `qapi` schema types it; `None` for events this
    /// schema does not know or whose shape differs in this QEMU.
    pub fn typed(&self) -> Option<qapi::qmp::Event> {
        serde_json::from_value(self.raw.clone()).ok()
    }

    /// The `device` of a `DEVICE_DELETED` event.
    pub fn deleted_device(&self) -> Option<String> {
        match self.typed()? {
            qapi::qmp::Event::DEVICE_DELETED { data, .. } => data.device,
            _ => None,
        }
    }
}

/// A subscriber's queue of events, in arrival order.
pub struct EventStream {
    rx: mpsc::UnboundedReceiver<QmpEvent>,
}

impl EventStream {
    /// The next event; `None` once the connection is gone and the queue empty.
    pub async fn next(&mut self) -> Option<QmpEvent> {
        self.rx.recv().await
    }

    /// Waits up to `limit` for an event matching `pred`, skipping others.
    /// `None` on timeout or when the connection closed first.
    pub async fn wait_for(
        &mut self,
        limit: Duration,
        mut pred: impl FnMut(&QmpEvent) -> bool,
    ) -> Option<QmpEvent> {
        tokio::time::timeout(limit, async {
            while let Some(e) = self.rx.recv().await {
                if pred(&e) {
                    return Some(e);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
    }
}

type Pending = HashMap<u64, oneshot::Sender<Value>>;

struct Shared {
    pending: Mutex<Option<Pending>>,
    subscribers: Mutex<Vec<mpsc::UnboundedSender<QmpEvent>>>,
}

/// A negotiated QMP connection.
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    greeting: QMP,
    /// How long a command may take unless the caller says otherwise.
    pub default_timeout: Duration,
}

async fn read_message<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    line: &mut Vec<u8>,
) -> std::io::Result<Option<Value>> {
    loop {
        line.clear();
        let n = (&mut *r).take(MAX_MESSAGE).read_until(b'\n', line).await?;
        if n == 0 {
            return Ok(None);
        }
        if line.last() != Some(&b'\n') && n as u64 >= MAX_MESSAGE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("QMP message longer than {MAX_MESSAGE} bytes"),
            ));
        }
        match parse_line(line) {
            Ok(None) => continue,
            Ok(Some(v)) => return Ok(Some(v)),
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
    }
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities. Returns
    /// the client and an event stream that has seen every event since.
    pub async fn connect(path: &Path, limit: Duration) -> Result<(Qmp, EventStream), QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut line = Vec::new();
        let greeting = tokio::time::timeout(limit, read_message(&mut reader, &mut line))
            .await
            .map_err(|_| QmpError::Timeout {
                command: "greeting",
                after: limit,
            })??
            .ok_or(QmpError::Closed {
                command: "greeting",
            })?;
        let greeting = parse_greeting(&greeting)?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Some(HashMap::new())),
            subscribers: Mutex::new(Vec::new()),
        });
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(write),
            shared: shared.clone(),
            next_id: AtomicU64::new(1),
            greeting,
            default_timeout: limit,
        };
        let events = qmp.subscribe();
        tokio::spawn(read_loop(reader, line, shared));
        qmp.execute_for(qmp_capabilities { enable: None }, limit)
            .await?;
        Ok((qmp, events))
    }

    /// QEMU's greeting: version and offered capabilities.
    pub fn greeting(&self) -> &QMP {
        &self.greeting
    }

    /// A new queue that receives every event from now on.
    pub fn subscribe(&self) -> EventStream {
        let (tx, rx) = mpsc::unbounded_channel();
        self.shared.subscribers.locked().push(tx);
        EventStream { rx }
    }

    /// Ends the session: QEMU's monitor serves one client at a time (QEMU
    /// 7.2 stops accepting while one is connected; a second client's
    /// connect succeeds but no greeting comes until the first leaves), so
    /// whoever connects next — another vbd adopting the VM — gets its turn
    /// once this one is gone. Commands after this fail.
    pub async fn close(&self) {
        let mut w = self.writer.lock().await;
        if let Err(e) = w.shutdown().await {
            debug!("QMP shutdown: {e}");
        }
    }

    /// Whether the reader has seen the connection close.
    pub fn is_closed(&self) -> bool {
        self.shared.pending.locked().is_none()
    }

    /// Runs a command with the default timeout.
    pub async fn execute<C: Command>(&self, cmd: C) -> Result<C::Ok, QmpError> {
        self.execute_for(cmd, self.default_timeout).await
    }

    /// Runs a command; fails if no reply arrives within `limit`.
    pub async fn execute_for<C: Command>(
        &self,
        cmd: C,
        limit: Duration,
    ) -> Result<C::Ok, QmpError> {
        let command = C::NAME;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut bytes = serde_json::to_vec(&Execute::<C, u64>::new(cmd, Some(id)))
            .map_err(|source| QmpError::Encode { command, source })?;
        bytes.push(b'\n');
        let (tx, rx) = oneshot::channel();
        match &mut *self.shared.pending.locked() {
            Some(p) => p.insert(id, tx),
            None => return Err(QmpError::Closed { command }),
        };
        debug!(command, id, "qmp execute");
        let sent = async {
            let mut w = self.writer.lock().await;
            w.write_all(&bytes).await?;
            w.flush().await
        };
        let reply = tokio::time::timeout(limit, async {
            sent.await?;
            rx.await.map_err(|_| QmpError::Closed { command })
        })
        .await;
        let reply = match reply {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                self.forget(id);
                return Err(e);
            }
            Err(_) => {
                self.forget(id);
                return Err(QmpError::Timeout {
                    command,
                    after: limit,
                });
            }
        };
        decode_reply::<C>(reply)
    }

    fn forget(&self, id: u64) {
        if let Some(p) = &mut *self.shared.pending.locked() {
            p.remove(&id);
        }
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: BufReader<R>,
    mut line: Vec<u8>,
    shared: Arc<Shared>,
) {
    loop {
        let msg = match read_message(&mut reader, &mut line).await {
            Ok(Some(v)) => v,
            Ok(None) => break,
            Err(e) => {
                warn!("QMP connection failed: {}", Chain(&e));
                break;
            }
        };
        let (id, msg) = match classify(msg) {
            Message::Event(event) => {
                debug!(event = %event.name, "qmp event");
                let mut subs = shared.subscribers.locked();
                subs.retain(|tx| tx.send(event.clone()).is_ok());
                continue;
            }
            Message::Reply { id, body } => (id, body),
            Message::Other(msg) => {
                warn!("QMP message without id or event ignored: {msg}");
                continue;
            }
        };
        let waiter = shared.pending.locked().as_mut().and_then(|p| p.remove(&id));
        match waiter {
            Some(tx) => {
                let _ = tx.send(msg);
            }
            None => debug!(id, "QMP reply for a command that timed out"),
        }
    }
    // Fail every waiting command and end every event stream.
    shared.pending.locked().take();
    shared.subscribers.locked().clear();
}
