//! Running as a Linux service: the two halves of systemd's protocol that
//! vbd speaks, written out because they are small (no libsystemd).
//! [`activation`] takes the listening sockets a service manager (or
//! libnbd) passed in, so sockets outlive a restart and clients queue
//! instead of failing; [`notify`] tells the manager when vbd is ready and
//! when it is stopping. Both read the environment once and unset it, so
//! QEMU children never see variables meant for vbd.
//!
//! This module knows nothing of NBD or the control API: the binary's
//! edge maps the sockets to their roles and hands them down.

pub mod activation;
pub mod notify;
