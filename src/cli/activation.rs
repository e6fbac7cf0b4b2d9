//! The sockets a service manager passed to `vbd serve`, by role. A socket's
//! role is its name (`FileDescriptorName=` in the .socket unit): `control`
//! for the control API (Unix), `metrics` for Prometheus (TCP), anything else
//! (`nbd`, systemd's default of the unit's name, libnbd's `unknown`) an NBD
//! listener, Unix or TCP. A connection passed instead of a listener (a
//! unit with Accept=yes) is one client, for `--stdin`.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;

use std::os::fd::OwnedFd;

use anyhow::{Result, bail};
use tracing::info;
use vbd::server::{ListenError, Listener, Transport};
use vbd::service::activation::Passed;

/// The name that makes a passed socket the control API's.
pub(crate) const CONTROL: &str = "control";
/// The name that makes a passed socket the metrics listener.
pub(crate) const METRICS: &str = "metrics";

/// Passed sockets, sorted.
#[derive(Default)]
pub(crate) struct Sockets {
    /// NBD listeners.
    pub(crate) nbd: Vec<Listener>,
    /// The control API's socket.
    pub(crate) control: Option<UnixListener>,
    /// The metrics listener.
    pub(crate) metrics: Option<TcpListener>,
    /// A client's connection (Accept=yes), kept when `one_client`.
    pub(crate) connection: Option<OwnedFd>,
}

/// Checks each passed socket and gives it its role. A passed connection is
/// refused unless vbd serves `one_client` (`--stdin`).
pub(crate) fn by_role(passed: Vec<Passed>, one_client: bool) -> Result<Sockets> {
    let mut out = Sockets::default();
    for Passed { fd, name } in passed {
        let l = match Listener::inherited(fd, &name) {
            Err(ListenError::Connected { fd, .. }) if one_client && out.connection.is_none() => {
                info!(name, "client connection passed by the service manager");
                out.connection = Some(fd);
                continue;
            }
            other => other?,
        };
        let role = match (name.as_str(), l.transport) {
            (CONTROL, Transport::Unix) if out.control.is_none() => {
                out.control = Some(UnixListener::from(l.fd));
                CONTROL
            }
            (METRICS, Transport::Tcp) if out.metrics.is_none() => {
                out.metrics = Some(TcpListener::from(l.fd));
                METRICS
            }
            (CONTROL | METRICS, _) => bail!(
                "socket {name:?} ({}) passed by the service manager cannot serve {name}: \
                 give one {name} socket, {}",
                l.addr,
                if name == CONTROL {
                    "a Unix one"
                } else {
                    "a TCP one"
                },
            ),
            _ => {
                info!(name, address = %l.addr, "NBD listener passed by the service manager");
                out.nbd.push(l);
                continue;
            }
        };
        info!(name, role, "socket passed by the service manager");
    }
    Ok(out)
}
