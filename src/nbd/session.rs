//! What a finished handshake agreed on: everything transmission needs.

use super::export::ExportInfo;

/// How replies are framed, chosen during the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyMode {
    /// Simple replies only (no `NBD_OPT_STRUCTURED_REPLY`).
    Simple,
    /// Structured reply chunks (`NBD_OPT_STRUCTURED_REPLY`).
    Structured,
    /// 32-byte request and reply headers (`NBD_OPT_EXTENDED_HEADERS`).
    Extended,
}

/// Context id we hand out for `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// The negotiated state of one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// The export the client attached to.
    pub export: ExportInfo,
    /// Transmission flags exactly as sent to the client.
    pub flags: u16,
    /// Which reply format the client negotiated.
    pub mode: ReplyMode,
    /// Set when the client selected `base:allocation` for this export.
    pub base_allocation: Option<u32>,
}

impl Session {
    /// Whether the client was told it may use a feature flag.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}
