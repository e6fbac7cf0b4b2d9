//! What the handshake needs to know about an export, without knowing how it
//! is stored.

use super::wire::*;

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest unit of I/O.
    pub minimum: u32,
    /// Size that performs best.
    pub preferred: u32,
    /// Largest request.
    pub maximum: u32,
}

impl Default for BlockSizes {
    /// Byte-granular, 4 KiB preferred, 32 MiB per request: the spec's
    /// interoperable maximum for READ and WRITE payloads.
    fn default() -> Self {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20,
        }
    }
}

/// An export as the protocol sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Opaque to the protocol; the server uses it to find the volume again.
    pub id: usize,
    /// What clients ask for.
    pub name: String,
    /// Shown by `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags, without `NBD_FLAG_SEND_DF` (which depends on the
    /// reply mode the client negotiates).
    pub flags: u16,
    /// Block sizes advertised to clients.
    pub block: BlockSizes,
}

/// What a volume can do, for computing transmission flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    /// Writes are refused.
    pub read_only: bool,
    /// FLUSH is supported.
    pub flush: bool,
    /// FUA is supported.
    pub fua: bool,
    /// TRIM is supported.
    pub trim: bool,
    /// WRITE_ZEROES is supported.
    pub write_zeroes: bool,
    /// FAST_ZERO is supported.
    pub fast_zero: bool,
    /// CACHE is supported.
    pub cache: bool,
    /// Connections share data and flushes (NBD_FLAG_CAN_MULTI_CONN).
    pub multi_conn: bool,
    /// The export is a rotating disk.
    pub rotational: bool,
}

impl Features {
    /// Every optional request a non-rotating export can take, for the
    /// protocol core's own tests and fuzz catalogue (the server derives
    /// its features from each volume's capabilities).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn all(read_only: bool) -> Self {
        Features {
            read_only,
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: true,
            multi_conn: true,
            rotational: false,
        }
    }

    /// The transmission flags that advertise these features.
    pub fn flags(&self) -> u16 {
        let mut f = FLAG_HAS_FLAGS;
        let mut set = |on: bool, bit: u16| {
            if on {
                f |= bit
            }
        };
        set(self.read_only, FLAG_READ_ONLY);
        set(self.flush, FLAG_SEND_FLUSH);
        set(self.fua, FLAG_SEND_FUA);
        set(self.rotational, FLAG_ROTATIONAL);
        // Trim and zeroing are write operations: a read-only export takes none.
        set(self.trim && !self.read_only, FLAG_SEND_TRIM);
        let zeroes = self.write_zeroes && !self.read_only;
        set(zeroes, FLAG_SEND_WRITE_ZEROES);
        set(zeroes && self.fast_zero, FLAG_SEND_FAST_ZERO);
        set(self.cache, FLAG_SEND_CACHE);
        set(self.multi_conn, FLAG_CAN_MULTI_CONN);
        f
    }
}

/// The server's catalogue of exports, as the handshake queries it.
pub trait Exports {
    /// Finds an export by name; the empty name selects the default export.
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// Names and descriptions of every export, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<(String, String)>;
}
