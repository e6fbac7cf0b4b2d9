//! A small, strict HTTP/1.1 subset for the control socket: one request per
//! connection, `Content-Length` bodies only, bounded head and body. The
//! peers are vbd's own CLI and local tools, so this is all that is needed,
//! and it keeps a full HTTP stack out of the build.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest request or response head.
pub const MAX_HEAD: usize = 16 << 10;
/// Largest request body (VM configs and volume specs are small).
pub const MAX_BODY: usize = 1 << 20;
/// Largest response body the client accepts (volume reads are ≤ 1 MiB).
pub const MAX_RESPONSE: usize = 4 << 20;

/// Why an HTTP exchange failed.
#[derive(Debug, Error)]
pub enum HttpError {
    /// Reading from or writing to the socket failed.
    #[error("I/O error")]
    Io(#[from] std::io::Error),
    /// The bytes are not an HTTP/1.1 message; holds what was wrong.
    #[error("malformed HTTP: {0}")]
    Malformed(&'static str),
    /// The request line and headers exceed `MAX_HEAD`.
    #[error("request head is larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// The body exceeds the limit; holds its declared length in bytes.
    #[error("body of {0} bytes is larger than allowed")]
    BodyTooLarge(usize),
    /// `Transfer-Encoding: chunked`, which this small server does not speak.
    #[error("chunked bodies are not supported; send Content-Length")]
    Chunked,
    /// The client could not reach a `vbd serve` on the control socket.
    #[error(
        "cannot connect to the control socket {} (is `vbd serve` running with this --control path?)",
        path.display()
    )]
    Connect {
        /// The control socket's path.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, `DELETE`, ...
    pub method: String,
    /// Path without the query, split on '/', empty segments dropped.
    pub segments: Vec<String>,
    /// Query parameters in order, undecoded.
    pub query: Vec<(String, String)>,
    /// Exactly `Content-Length` bytes.
    pub body: Vec<u8>,
}

impl Request {
    /// A query parameter's value.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A response to send.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type` header.
    pub content_type: &'static str,
    /// The whole body (sent with `Content-Length`).
    pub body: Vec<u8>,
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        _ => "Status",
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Splits a head into its first line and lower-cased headers.
fn parse_head(head: &[u8]) -> Result<(String, Vec<(String, String)>), HttpError> {
    let text = std::str::from_utf8(head).map_err(|_| HttpError::Malformed("head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or("").to_owned();
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (k, v) = line
            .split_once(':')
            .ok_or(HttpError::Malformed("header without ':'"))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    Ok((first, headers))
}

fn content_length(headers: &[(String, String)], max: usize) -> Result<usize, HttpError> {
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && !v.eq_ignore_ascii_case("identity"))
    {
        return Err(HttpError::Chunked);
    }
    let len = match headers.iter().find(|(k, _)| k == "content-length") {
        Some((_, v)) => v
            .parse::<usize>()
            .map_err(|_| HttpError::Malformed("bad Content-Length"))?,
        None => 0,
    };
    if len > max {
        return Err(HttpError::BodyTooLarge(len));
    }
    Ok(len)
}

fn parse_target(target: &str) -> (Vec<String>, Vec<(String, String)>) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let segments = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let query = query
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    (segments, query)
}

/// Reads one request, enforcing the size limits.
pub async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> Result<Request, HttpError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = find_head_end(&buf) {
            break end;
        }
        if buf.len() > MAX_HEAD {
            return Err(HttpError::HeadTooLarge);
        }
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            return Err(HttpError::Malformed("connection closed inside the head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    if head_end > MAX_HEAD {
        return Err(HttpError::HeadTooLarge);
    }
    let (first, headers) = parse_head(&buf[..head_end])?;
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed("bad request line"));
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err(HttpError::Malformed("bad request line"));
    }
    let len = content_length(&headers, MAX_BODY)?;
    let mut body = buf[head_end..].to_vec();
    if body.len() > len {
        return Err(HttpError::Malformed("more bytes than Content-Length"));
    }
    let have = body.len();
    body.resize(len, 0);
    r.read_exact(&mut body[have..]).await?;
    let (segments, query) = parse_target(target);
    Ok(Request {
        method: method.to_owned(),
        segments,
        query,
        body,
    })
}

/// Writes a response and closes the exchange.
pub async fn write_response<W: AsyncWrite + Unpin>(
    w: &mut W,
    resp: &Response,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len()
    );
    w.write_all(head.as_bytes()).await?;
    w.write_all(&resp.body).await?;
    w.flush().await
}

/// Sends one request over the Unix socket and returns status and body.
pub fn call(
    socket: &Path,
    method: &str,
    target: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), HttpError> {
    let mut s = UnixStream::connect(socket).map_err(|source| HttpError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let body = body.unwrap_or(&[]);
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: vbd\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut buf = Vec::new();
    s.take((MAX_HEAD + MAX_RESPONSE + 1) as u64)
        .read_to_end(&mut buf)?;
    let head_end = find_head_end(&buf).ok_or(HttpError::Malformed("response without a head"))?;
    let (first, headers) = parse_head(&buf[..head_end])?;
    let status = first
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(HttpError::Malformed("bad status line"))?;
    let len = content_length(&headers, MAX_RESPONSE)?;
    let body = buf[head_end..].to_vec();
    if body.len() != len {
        return Err(HttpError::Malformed(
            "body length differs from Content-Length",
        ));
    }
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(raw: &[u8]) -> Result<Request, HttpError> {
        let mut r = raw;
        read_request(&mut r).await
    }

    #[tokio::test]
    async fn parses_a_request_with_body_and_query() {
        let req =
            parse(b"POST /v1/vms/web/disks?wait=5&x HTTP/1.1\r\nContent-Length: 4\r\n\r\n{\"a\"")
                .await
                .unwrap();
        assert_eq!(req.method, "POST");
        assert_eq!(req.segments, ["v1", "vms", "web", "disks"]);
        assert_eq!(req.param("wait"), Some("5"));
        assert_eq!(req.param("x"), Some(""));
        assert_eq!(req.body, b"{\"a\"");
    }

    #[tokio::test]
    async fn rejects_oversized_and_chunked_and_malformed() {
        let big = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert!(matches!(
            parse(big.as_bytes()).await,
            Err(HttpError::BodyTooLarge(_))
        ));
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        huge.extend(b"\r\n\r\n");
        assert!(matches!(parse(&huge).await, Err(HttpError::HeadTooLarge)));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").await,
            Err(HttpError::Chunked)
        ));
        assert!(matches!(
            parse(b"GET /\r\n\r\n").await,
            Err(HttpError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc").await,
            Err(HttpError::Io(_))
        ));
    }

    #[test]
    fn a_missing_socket_is_named_with_its_cause_once() {
        let e = call(
            Path::new("/nonexistent/vbd-control.sock"),
            "GET",
            "/v1/status",
            None,
            Duration::from_secs(1),
        )
        .unwrap_err();
        let text = crate::error::Chain(&e).to_string();
        assert!(
            text.starts_with("cannot connect to the control socket /nonexistent/vbd-control.sock"),
            "{text}"
        );
        assert_eq!(
            text.matches("No such file or directory").count(),
            1,
            "{text}"
        );
    }
}
