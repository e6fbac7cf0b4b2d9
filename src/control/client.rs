//! A blocking client for the control API, used by the CLI.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use super::http::{self, HttpError};

/// Why a control call failed.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("{0}")]
    Api(String),
    #[error("vbd answered {status} with an unreadable body: {body}")]
    BadReply { status: u16, body: String },
    #[error("cannot encode the request: {0}")]
    Encode(serde_json::Error),
}

/// The control socket of a running `vbd serve`.
pub struct ControlClient {
    pub socket: PathBuf,
    /// Per call; stops wait for the guest, so this is generous.
    pub timeout: Duration,
}

impl ControlClient {
    /// A client for `socket`.
    pub fn new(socket: &Path) -> Self {
        ControlClient {
            socket: socket.to_owned(),
            timeout: Duration::from_secs(300),
        }
    }

    /// Raw call: status-checked body bytes.
    pub fn call_raw(
        &self,
        method: &str,
        target: &str,
        body: Option<&[u8]>,
    ) -> Result<Vec<u8>, ClientError> {
        let (status, reply) = http::call(&self.socket, method, target, body, self.timeout)?;
        if (200..300).contains(&status) {
            return Ok(reply);
        }
        let msg = serde_json::from_slice::<serde_json::Value>(&reply)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from));
        Err(match msg {
            Some(m) => ClientError::Api(m),
            None => ClientError::BadReply {
                status,
                body: String::from_utf8_lossy(&reply).into_owned(),
            },
        })
    }

    /// JSON call.
    pub fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: &str,
        target: &str,
        body: Option<&B>,
    ) -> Result<R, ClientError> {
        let bytes = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(ClientError::Encode)?;
        let reply = self.call_raw(method, target, bytes.as_deref())?;
        serde_json::from_slice(&reply).map_err(|_| ClientError::BadReply {
            status: 200,
            body: String::from_utf8_lossy(&reply).into_owned(),
        })
    }
}
